"""Write any ImageSource as WebDataset tar shards per split, in parallel, with a manifest.

On-disk encoding (measured, see BENCHMARKS.md): `raw` stores blocks of preprocessed uint8 images
as one .npy per sample, so reading costs a memcpy instead of a JPEG decode and the per-sample
Python overhead is paid once per block. `jpeg`/`png` store one image per sample, the layout any
WebDataset user can read, at a fraction of the size.

Domains (CycleGAN's unpaired A and B): `gendist shards domains DIR --attribute Eyeglasses` splits
each split S of a shard set into `S.not_Eyeglasses` and `S.Eyeglasses`; `--attribute X,Y` into
`S.X` (X, not Y) and `S.Y` (Y, not X), leaving out images with both or neither. The new splits are
shards like any other (the same sample layout and writer, image bytes copied, not re-encoded),
listed in the manifest with their counts; its "domains" records the rule and the counts per source
split. Running the same attribute again replaces those domain splits.

References (shards/reference/NAME.json, see shards/README.md): what two sites converting the same
dataset must agree on, the counts per split, the preprocessing, the attributes and the carve, and
where known checksums: a content sha256 per split, which holds whatever the shard size, seed or tar
metadata, and the shards' own sha256 for a quick byte-for-byte match. `gendist shards reference`
writes one from a converted set; `gendist shards verify DIR --reference NAME` compares a set with it.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import multiprocessing
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import PIL
import webdataset as wds
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import gendist
from gendist.data.sources import ImageSource, carve_splits

MANIFEST = "manifest.json"
FORMAT = "gendist-shards/1"
Encoding = Literal["raw", "jpeg", "png"]
# CelebA's usual framing: a 140 px square from the 178 px wide aligned image, as a fraction so
# the half-size sample and the full-size images give the same crop.
CELEBA_CROP_FRACTION = 140 / 178
REFERENCE_FORMAT = "gendist-shards-reference/1"
# The shipped references sit beside the package in a checkout, not inside it.
REFERENCE_DIR = Path(gendist.__file__).parents[1] / "shards" / "reference"
# What a shard's bytes depend on besides the images: with the shard sizes, a reference's "layout".
LAYOUT_KEYS = ("encoding", "images_per_sample", "seed")


@dataclass(frozen=True)
class Preprocess:
    size: int = 64
    crop_fraction: float = CELEBA_CROP_FRACTION  # side of the centre square / shorter image side

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if self.size < 4:
            raise ValueError(f"size must be >= 4, got {self.size}")

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Centre square crop then antialiased bicubic resize: HxWx3 uint8."""
        width, height = image.size
        side = self.crop_fraction * min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        resized = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        return np.asarray(resized, dtype=np.uint8)


def preprocessing_record(preprocess: Preprocess) -> dict:
    """The manifest's "preprocessing": the parameters, and in words what they do."""
    return {
        **asdict(preprocess),
        "crop": "centre square, side = crop_fraction x shorter side",
        "resize": "PIL bicubic, antialiased",
    }


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    keys: list[str]
    attributes: np.ndarray  # len(keys) x A, int8


_worker: dict = {}


def _init_worker(
    source: ImageSource, preprocess: Preprocess, encoding: Encoding, per_sample: int, out_dir: Path
) -> None:
    _worker.update(source=source, preprocess=preprocess, encoding=encoding, per_sample=per_sample, out_dir=out_dir)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _encoded(image: np.ndarray, encoding: Encoding) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    if encoding == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        return "jpg", buffer.getvalue()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return "png", buffer.getvalue()


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 read in chunks: shards can be GBs."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def sample_stem(key: str) -> str:
    """The sample key of a jpeg/png image: its source key without the extension, dots and slashes
    made underscores (webdataset groups a sample's members by the name up to the first dot)."""
    return key.rsplit(".", 1)[0].replace(".", "_").replace("/", "_")


def _write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically: a reader sees the old file or the whole new one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)


def _raw_samples(prefix: str, images, attributes, keys: list[str], per_sample: int) -> Iterator[dict]:
    """Samples of the raw layout: blocks of `per_sample` images from the start of a shard (the last
    one shorter), as the loader numbers them. `images` and `attributes` are arrays or lists of rows.
    A key holds no dot: webdataset groups a sample's members by the name up to the first one."""
    prefix = prefix.replace(".", "_")
    for start in range(0, len(keys), per_sample):
        block = slice(start, start + per_sample)
        yield {
            "__key__": f"{prefix}-{start:06d}",
            "images.npy": _npy_bytes(np.stack(images[block])),
            "attrs.npy": _npy_bytes(np.stack(attributes[block]).reshape(len(keys[block]), -1)),
            "keys.txt": "\n".join(keys[block]).encode(),
        }


def _image_sample(stem: str, extension: str, data: bytes, attrs_npy: bytes) -> dict:
    """A sample of the jpeg/png layout: one encoded image and its (1, A) attributes."""
    return {"__key__": stem, extension: data, "attrs.npy": attrs_npy}


def _write_tar(path: Path, samples: Iterable[dict]) -> dict:
    """Write `samples` to the tar `path` (the caller renames it into place); its sha256 and size.
    Members carry mtime 0, not the time of writing, so converting the same images the same way
    gives the same bytes."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _write_shard(task: ShardTask) -> dict:
    """Runs in a worker: read, preprocess and write one shard atomically; report what was skipped.

    A shard whose images were all corrupt is not written: the manifest lists only shards with data,
    which is what the loader checks to refuse an empty split.
    """
    source, preprocess = _worker["source"], _worker["preprocess"]
    encoding, per_sample = _worker["encoding"], _worker["per_sample"]
    name = _shard_name(task.split, task.index)
    final = _worker["out_dir"] / name
    partial = final.with_suffix(".tar.partial")
    images, attributes, keys, corrupt = [], [], [], []
    for key, attrs in zip(task.keys, task.attributes):
        try:
            images.append(preprocess(source.open(key)))
        except (OSError, ValueError) as err:
            corrupt.append(f"{key}: {err}")
            continue
        attributes.append(attrs)
        keys.append(key)
    result = {"split": task.split, "name": name, "count": len(keys), "corrupt": corrupt}
    if not keys:
        return result
    if encoding == "raw":
        samples = _raw_samples(name.removesuffix(".tar"), images, attributes, keys, per_sample)
    else:
        samples = (
            _image_sample(
                sample_stem(key),
                *_encoded(image, encoding),
                _npy_bytes(attrs.reshape(1, -1)),
            )
            for key, image, attrs in zip(keys, images, attributes)
        )
    result.update(_write_tar(partial, samples))
    os.replace(partial, final)
    return result


def write_shards(
    source: ImageSource,
    out_dir: str | Path,
    preprocess: Preprocess = Preprocess(),
    encoding: Encoding = "raw",
    images_per_sample: int = 64,
    shard_size: int = 4096,
    workers: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    carve: Mapping[str, str | float | int] | None = None,
) -> dict:
    """Convert `source` into `out_dir`/{split}-NNNNN.tar plus manifest.json; returns the manifest.

    `carve` ({"val": "0.05", "test": 500}) takes held-out splits the source leaves empty out of its
    train images (see carve_splits); the manifest's "carved" records what was taken.
    Images are shuffled (seeded) before they are cut into shards, so every shard is a random
    sample of its split. The manifest is written last: a folder with a manifest is complete.
    """
    if encoding != "raw" and images_per_sample != 1:
        images_per_sample = 1  # jpeg/png samples hold one image each (plain WebDataset layout)
    if shard_size < images_per_sample:
        raise ValueError(f"shard_size ({shard_size}) must be >= images_per_sample ({images_per_sample})")
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise FileExistsError(f"{out_dir} already holds a shard set ({MANIFEST}); choose another --out or remove it")
    plan, carved = carve_splits(source.plan(), carve or {}, getattr(source, "split_origin", source.name))
    out_dir.mkdir(parents=True, exist_ok=True)
    num_attrs = len(plan.attribute_names)
    tasks = []
    for split, keys in plan.splits.items():
        keys = list(keys)
        random.Random(f"{seed}-{split}").shuffle(keys)
        for index, start in enumerate(range(0, len(keys), shard_size)):
            chunk = keys[start : start + shard_size]
            attrs = np.stack([plan.attributes[k] for k in chunk]) if num_attrs else np.zeros((len(chunk), 0), np.int8)
            tasks.append(ShardTask(split, index, chunk, attrs))
    total = sum(len(t.keys) for t in tasks)
    if total == 0:
        raise ValueError(f"{source.name}: no images to convert (left out: {plan.left_out})")
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))

    started = time.perf_counter()
    results = []
    columns = (
        TextColumn("[bold]shards[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show_progress) as progress:
        bar = progress.add_task(source.name, total=total)
        with multiprocessing.Pool(
            workers, _init_worker, (source, preprocess, encoding, images_per_sample, out_dir)
        ) as pool:
            for result in pool.imap_unordered(_write_shard, tasks):
                results.append(result)
                progress.advance(bar, result["count"] + len(result["corrupt"]))
    seconds = time.perf_counter() - started
    corrupt = [line for r in results for line in r["corrupt"]]
    if not any(r["count"] for r in results):  # so no shard file was written either
        raise ValueError(
            f"{source.name}: no image could be converted, all {len(corrupt)} were corrupt "
            f"(e.g. {corrupt[0]}); wrote no shard set to {out_dir}"
        )

    splits = {}
    for split in plan.splits:
        shards = sorted((r for r in results if r["split"] == split and r["count"]), key=lambda r: r["name"])
        splits[split] = {
            "count": sum(r["count"] for r in shards),
            "shards": [{k: r[k] for k in ("name", "count", "sha256", "bytes")} for r in shards],
        }
    manifest = {
        "format": FORMAT,
        "dataset": source.name,
        "preprocessing": preprocessing_record(preprocess),
        "encoding": encoding,
        "images_per_sample": images_per_sample,
        "attribute_names": plan.attribute_names,
        "splits": splits,
        "carved": carved,
        "domains": {},  # filled by write_domains
        "left_out": {**plan.left_out, "corrupt": len(corrupt)},
        "corrupt_examples": corrupt[:20],
        "seed": seed,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(out_dir / MANIFEST, manifest)
    converted = sum(s["count"] for s in splits.values())
    written = sum(len(s["shards"]) for s in splits.values())
    manifest_summary = (
        f"{converted} images in {written} shards, {seconds:.1f} s "
        f"({converted / seconds:.0f} images/s, {workers} workers)"
    )
    if carved:
        taken = ", ".join(
            f"{split} {c['count']}" + (f" ({c['requested']})" if c["requested"] != str(c["count"]) else "")
            for split, c in carved.items()
        )
        manifest_summary += f"; carved from train by {carved[next(iter(carved))]['rule']}: {taken}"
    emptied = [
        f"; split {split} is EMPTY: all {len(keys)} of its images were corrupt"
        for split, keys in plan.splits.items()
        if keys and not splits[split]["count"]
    ]
    if show_progress:
        progress.console.print(
            f"wrote {out_dir}: {manifest_summary}; left out: {manifest['left_out']}{''.join(emptied)}", soft_wrap=True
        )
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {shard_dir}: convert a dataset first (gendist shards celeba --src ... --out {shard_dir})"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; reconvert the dataset")
    return manifest


@dataclass(frozen=True)
class ShardProblem:
    """A shard that does not match the manifest: missing, changed, or an extra .tar it does not list."""

    kind: Literal["missing", "changed", "extra"]
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.name}: {self.detail}"


@dataclass(frozen=True)
class ShardCheck:
    shard_dir: Path
    listed: int  # shards in the manifest
    problems: list[ShardProblem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"ok: all {self.listed} shards in {self.shard_dir} match {MANIFEST}"
        kinds = Counter(problem.kind for problem in self.problems)
        found = ", ".join(f"{kinds[kind]} {kind}" for kind in ("missing", "changed", "extra") if kinds[kind])
        return f"DAMAGED: {self.shard_dir}: {found} ({self.listed} shards listed in {MANIFEST})"


def _shard_problem(shard_dir: Path, entry: dict) -> ShardProblem | None:
    """How one shard differs from its manifest entry (size where recorded, then sha256), if it does."""
    path = shard_dir / entry["name"]
    if not path.is_file():
        return ShardProblem("missing", entry["name"], f"listed with {entry['count']} images, not found")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:  # manifests written before sizes lack "bytes"
        return ShardProblem("changed", entry["name"], f"{size} bytes, {MANIFEST} says {entry['bytes']}")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        return ShardProblem(
            "changed", entry["name"], f"sha256 {digest[:16]}..., {MANIFEST} says {entry['sha256'][:16]}..."
        )
    return None


def verify_shards(shard_dir: str | Path, show_progress: bool = False) -> ShardCheck:
    """Compare every shard with its manifest entry (size where recorded, then sha256) and look for
    .tar files the manifest does not list. The progress bar goes to stderr, so stdout keeps only
    what the caller prints of the result."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    listed = [shard for split in manifest["splits"].values() for shard in split["shards"]]
    problems = []
    columns = (
        TextColumn("[bold]verify[/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), disable=not show_progress) as progress:
        for entry in progress.track(listed, description=str(shard_dir)):
            if problem := _shard_problem(shard_dir, entry):
                problems.append(problem)
    names = {entry["name"] for entry in listed}
    problems += [
        ShardProblem("extra", path.name, f"not listed in {MANIFEST}")
        for path in sorted(shard_dir.glob("*.tar"))
        if path.name not in names
    ]
    return ShardCheck(shard_dir, len(listed), problems)


def domain_names(attributes: Sequence[str]) -> tuple[str, str]:
    """Domains A and B of an attribute spec: (not_X, X) for one attribute, (X, Y) for two."""
    return (f"not_{attributes[0]}", attributes[0]) if len(attributes) == 1 else (attributes[0], attributes[1])


def domain_signs(manifest: dict, domain: str) -> dict[str, int]:
    """The attribute values (+-1) that put an image in `domain`, from the manifest's domain records:
    not_X: {X: -1}; X (one attribute): {X: +1}; X of the pair X,Y: {X: +1, Y: -1}."""
    for record in manifest.get("domains", {}).values():
        attributes, (a, b) = record["attributes"], record["domains"]
        if domain not in (a, b):
            continue
        if len(attributes) == 1:
            return {attributes[0]: -1 if domain == a else +1}
        x, y = attributes
        return {x: +1, y: -1} if domain == a else {y: +1, x: -1}
    known = [name for record in manifest.get("domains", {}).values() for name in record["domains"]]
    raise ValueError(f"no domain {domain!r} in the shards' manifest; it has: {', '.join(known) or 'none'}")


def _domain_attributes(attribute: str | Sequence[str], attribute_names: list[str], shard_dir: Path) -> list[str]:
    names = [name.strip() for name in attribute.split(",")] if isinstance(attribute, str) else list(attribute)
    if not 1 <= len(names) <= 2 or not all(names):
        raise ValueError(f"--attribute expects one attribute or two separated by a comma, got {attribute!r}")
    if len(names) == 2 and names[0] == names[1]:
        raise ValueError(f"--attribute names {names[0]} twice: two domains need two different attributes")
    if not attribute_names:
        raise ValueError(f"{shard_dir} has no attributes (its source has none): domains need one")
    unknown = [name for name in names if name not in attribute_names]
    if unknown:
        raise ValueError(
            f"unknown attribute {', '.join(unknown)} in {shard_dir}; valid ones: {', '.join(attribute_names)}"
        )
    return names


def _domain_rule(attributes: list[str]) -> str:
    a, b = domain_names(attributes)
    if len(attributes) == 1:
        return f"{a}: {attributes[0]} = -1; {b}: {attributes[0]} = +1"
    x, y = attributes
    return f"{a}: {x} = +1 and {y} = -1; {b}: {y} = +1 and {x} = -1; both or neither: left out"


def _domain_owners(manifest: dict) -> dict[str, str]:
    """Domain split name -> the attribute spec that made it."""
    return {
        f"{split}.{domain}": spec
        for spec, record in manifest.get("domains", {}).items()
        for split in record["splits"]
        for domain in record["domains"]
    }


def _domain_sources(manifest: dict, shard_dir: Path, attributes: list[str], splits: Sequence[str] | None) -> list[str]:
    """The source splits to take domains from, checked: real splits with images whose domain
    split names are free or this spec's own."""
    spec, owners = ",".join(attributes), _domain_owners(manifest)
    if splits is None:
        splits = [name for name, split in manifest["splits"].items() if split["count"] and name not in owners]
        if not splits:
            raise ValueError(f"{shard_dir} has no split with images to take domains from")
    splits = list(dict.fromkeys(splits))
    for split in splits:
        if split in owners:
            raise ValueError(
                f"split {split} of {shard_dir} is itself a domain (of {owners[split]}): name a source split"
            )
        if split not in manifest["splits"]:
            raise ValueError(f"{shard_dir} has no split {split!r}; its splits: {', '.join(manifest['splits'])}")
        if not manifest["splits"][split]["count"]:
            raise ValueError(f"split {split} of {shard_dir} holds no images")
        for domain in domain_names(attributes):
            name = f"{split}.{domain}"
            if name in manifest["splits"] and owners.get(name) != spec:
                made_by = f"the domains of {owners[name]}" if name in owners else "the conversion"
                raise ValueError(f"split {name} of {shard_dir} already exists ({made_by}); {spec} would overwrite it")
    return splits


class _DomainShards:
    """One domain split being written: buffers its samples and cuts them into shards of
    `shard_size` images with the converter's writer, as .tar.partial files until committed."""

    def __init__(self, out_dir: Path, split: str, raw: bool, per_sample: int, shard_size: int) -> None:
        self.out_dir, self.split, self.raw = out_dir, split, raw
        self.per_sample, self.shard_size = per_sample, shard_size
        self.pending: list = []  # raw: (images, attrs, keys) blocks; else whole samples
        self.held = 0
        self.shards: list[dict] = []  # manifest entries
        self.partials: list[Path] = []

    @property
    def count(self) -> int:
        return sum(shard["count"] for shard in self.shards) + self.held

    def add_block(self, images: np.ndarray, attrs: np.ndarray, keys: list[str]) -> None:
        self.pending.append((images, attrs, keys))
        self.held += len(keys)
        while self.held >= self.shard_size:
            self._flush()

    def add_sample(self, sample: dict) -> None:
        self.pending.append(sample)
        self.held += 1
        if self.held >= self.shard_size:
            self._flush()

    def close(self) -> None:
        if self.held:
            self._flush()

    def _flush(self) -> None:
        name = _shard_name(self.split, len(self.shards))
        partial = self.out_dir / (name + ".partial")
        self.partials.append(partial)
        count = min(self.shard_size, self.held)
        if self.raw:
            images, attrs = (np.concatenate([block[i] for block in self.pending]) for i in (0, 1))
            keys = [key for block in self.pending for key in block[2]]
            samples = _raw_samples(
                name.removesuffix(".tar"), images[:count], attrs[:count], keys[:count], self.per_sample
            )
            entry = _write_tar(partial, samples)
            self.pending = [(images[count:], attrs[count:], keys[count:])] if len(keys) > count else []
        else:
            entry = _write_tar(partial, self.pending[:count])
            self.pending = self.pending[count:]
        self.held -= count
        self.shards.append({"name": name, "count": count, **entry})


def _stored_sample(sample: dict, raw: bool) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """A stored sample's attributes (n, A) and, for a raw block, its images (n, H, W, 3) and keys."""
    if raw:
        images = np.load(io.BytesIO(sample["images.npy"]), allow_pickle=False)
        keys = sample["keys.txt"].decode().split("\n")
        if len(keys) != len(images):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
    elif "jpg" not in sample and "png" not in sample:
        raise ValueError("no jpg or png member")
    else:
        images = keys = None
    attrs = np.load(io.BytesIO(sample["attrs.npy"]), allow_pickle=False)
    return attrs.reshape(1 if images is None else len(images), -1), images, keys


def write_domains(
    shard_dir: str | Path,
    attribute: str | Sequence[str],
    splits: Sequence[str] | None = None,
    shard_size: int | None = None,
    show_progress: bool = False,
) -> dict:
    """Split splits of a shard set by an attribute into two domains (CycleGAN's unpaired A and B).

    One attribute X: A = `not_X` (X = -1), B = `X` (X = +1). Two, X,Y: A = `X` (X and not Y),
    B = `Y` (Y and not X); images with both or neither are left out and counted. Each source
    split S (default: every split with images that is not itself a domain) gains splits `S.A` and
    `S.B` in `shard_dir`: S's samples in their stored order, encoded bytes and attributes copied
    (raw blocks re-cut, their pixels unchanged), in shards of `shard_size` images (default: S's
    largest). The manifest lists them under "splits" and the spec under "domains", and is
    replaced atomically once every shard is in place. Running a spec again replaces its domain
    splits of those source splits (and deletes their old shards); a split name that another spec
    or the conversion already uses is refused, and so is a domain left empty. Returns the spec's
    "domains" record.
    """
    from gendist.data.loader import read_samples  # the loader imports this module

    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    attributes = _domain_attributes(attribute, manifest["attribute_names"], shard_dir)
    spec, rule = ",".join(attributes), _domain_rule(attributes)
    splits = _domain_sources(manifest, shard_dir, attributes, splits)
    indices = [manifest["attribute_names"].index(name) for name in attributes]
    domain_a, domain_b = domain_names(attributes)
    raw, per_sample = manifest["encoding"] == "raw", manifest["images_per_sample"]
    # The copies get checksums of their own: a source shard damaged now would pass verify for ever after.
    damaged = [
        p for split in splits for e in manifest["splits"][split]["shards"] if (p := _shard_problem(shard_dir, e))
    ]
    if damaged:
        raise ValueError(
            f"{len(damaged)} shard(s) of {', '.join(splits)} do not match {MANIFEST} ({damaged[0]}); "
            f"see `gendist shards verify {shard_dir}`"
        )

    writers: list[_DomainShards] = []
    counted = {}
    bar_columns = (TextColumn("[bold]domains[/] {task.description}"), BarColumn(), MofNCompleteColumn())
    try:
        with Progress(*bar_columns, console=Console(stderr=True), disable=not show_progress) as progress:
            for split in splits:
                source = manifest["splits"][split]
                size = shard_size or max(shard["count"] for shard in source["shards"])
                pair = [_DomainShards(shard_dir, f"{split}.{d}", raw, per_sample, size) for d in (domain_a, domain_b)]
                writers += pair
                bar = progress.add_task(f"{split} by {spec}", total=source["count"])
                seen = 0
                for sample in read_samples(str(shard_dir), split):
                    try:
                        attrs, images, keys = _stored_sample(sample, raw)
                    except (KeyError, ValueError, OSError, EOFError) as err:
                        raise ValueError(
                            f"sample {sample.get('__key__')} of split {split} in {shard_dir} is damaged ({err}); "
                            f"check the shard set with `gendist shards verify {shard_dir}`"
                        ) from err
                    has = attrs[:, indices] > 0
                    masks = (
                        (~has[:, 0], has[:, 0])
                        if len(indices) == 1
                        else (has[:, 0] & ~has[:, 1], has[:, 1] & ~has[:, 0])
                    )
                    for writer, mask in zip(pair, masks):
                        if mask.any():
                            if raw:
                                writer.add_block(images[mask], attrs[mask], [k for k, m in zip(keys, mask) if m])
                            else:
                                writer.add_sample(sample)
                    seen += len(attrs)
                    progress.advance(bar, len(attrs))
                for writer in pair:
                    writer.close()
                if seen != source["count"]:
                    raise ValueError(
                        f"split {split} of {shard_dir} yielded {seen} images, its manifest lists {source['count']}; "
                        f"check the shard set with `gendist shards verify {shard_dir}`"
                    )
                counts = {domain_a: pair[0].count, domain_b: pair[1].count}
                for domain, other in ((domain_a, domain_b), (domain_b, domain_a)):
                    if not counts[domain]:
                        raise ValueError(
                            f"domain {domain} of split {split} in {shard_dir} is empty: 0 of its {seen} images "
                            f"({other} {counts[other]}, left out {seen - counts[other]})"
                        )
                counted[split] = {"count": seen, "domains": counts, "left_out": seen - sum(counts.values())}
    except BaseException:
        for writer in writers:
            for partial in writer.partials:
                partial.unlink(missing_ok=True)
        raise

    # Commit: the shards into place, then the manifest (atomically), then the old shards it no longer lists.
    replaced = {
        shard["name"] for writer in writers for shard in manifest["splits"].get(writer.split, {}).get("shards", [])
    }
    for writer in writers:
        for partial in writer.partials:
            os.replace(partial, partial.with_suffix(""))
        manifest["splits"][writer.split] = {"count": writer.count, "shards": writer.shards}
    earlier = manifest.setdefault("domains", {}).get(spec, {}).get("splits", {})
    manifest["domains"][spec] = {
        "attributes": attributes,
        "domains": [domain_a, domain_b],
        "rule": rule,
        "splits": {**earlier, **counted},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(shard_dir / MANIFEST, manifest)
    listed = {shard["name"] for split in manifest["splits"].values() for shard in split["shards"]}
    for name in replaced - listed:
        (shard_dir / name).unlink(missing_ok=True)
    return manifest["domains"][spec]


def converted_splits(manifest: dict) -> list[str]:
    """The splits the conversion wrote, without those added to the set later (domains, generated)."""
    derived = set(_domain_owners(manifest)) | set(manifest.get("generated", {}))
    return [split for split in manifest["splits"] if split not in derived]


def split_content_sha256(shard_dir: str | Path, split: str, show_progress: bool = False) -> str:
    """sha256 of a split's images, whatever the shard sizes, blocks, order (seed) and tar metadata.

    Each image's digest covers its sample stem, attributes (int8) and pixels (uint8); the split's is
    the sha256 of those digests sorted. A raw and a png conversion of the same images agree; a jpeg
    one does not (JPEG is lossy), and neither do different Pillow resamplers.
    """
    from gendist.data.loader import decode_sample, read_samples  # the loader imports this module

    manifest = read_manifest(shard_dir)
    raw, size = manifest["encoding"] == "raw", manifest["preprocessing"]["size"]
    digests = []
    bar_columns = (TextColumn("[bold]content[/] {task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*bar_columns, console=Console(stderr=True), disable=not show_progress) as progress:
        bar = progress.add_task(f"{split} of {shard_dir}", total=manifest["splits"][split]["count"])
        for sample in read_samples(str(shard_dir), split):
            attrs, images, keys = _stored_sample(sample, raw)
            if images is None:
                images, keys = decode_sample(sample, size)[0], [sample["__key__"]]
            for key, image, row in zip(keys, images, attrs):
                digest = hashlib.sha256(sample_stem(key).encode() + b"\0")
                digest.update(row.astype(np.int8).tobytes())
                digest.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
                digests.append(digest.digest())
            progress.advance(bar, len(attrs))
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


def reference_names() -> list[str]:
    return sorted(path.stem for path in REFERENCE_DIR.glob("*.json"))


def load_reference(name_or_file: str | Path) -> dict:
    """A reference by name (REFERENCE_DIR/NAME.json) or by the path of its file."""
    path = Path(name_or_file)
    if not path.is_file():
        if path.suffix == ".json" or len(path.parts) > 1:
            raise FileNotFoundError(f"reference file {path} not found")
        path = REFERENCE_DIR / f"{name_or_file}.json"
        if not path.is_file():
            available = ", ".join(reference_names()) or "none"
            raise ValueError(
                f"unknown reference {str(name_or_file)!r}; {REFERENCE_DIR} has: {available} (or pass a .json file)"
            )
    reference = json.loads(path.read_text())
    if reference.get("reference") != REFERENCE_FORMAT:
        raise ValueError(f"{path}: reference format {reference.get('reference')!r} is not {REFERENCE_FORMAT!r}")
    return reference


def make_reference(shard_dir: str | Path, name: str, description: str = "", show_progress: bool = False) -> dict:
    """The reference of a shard set whose shards match its manifest: its converted splits' counts,
    shards and content sha256, its preprocessing, attributes, carve and layout."""
    shard_dir = Path(shard_dir)
    check = verify_shards(shard_dir, show_progress)
    if not check.ok:
        raise ValueError(f"{check.summary()}: a reference must come from an intact set (`gendist shards verify`)")
    manifest = read_manifest(shard_dir)
    splits = {}
    for split in converted_splits(manifest):
        entry = manifest["splits"][split]
        splits[split] = {
            "count": entry["count"],
            "shards": [{key: shard[key] for key in ("name", "count", "sha256")} for shard in entry["shards"]],
        }
        if entry["count"]:
            splits[split]["content_sha256"] = split_content_sha256(shard_dir, split, show_progress)
    return {
        "reference": REFERENCE_FORMAT,
        "name": name,
        "description": description,
        "format": manifest["format"],
        "dataset": manifest["dataset"],
        "preprocessing": manifest["preprocessing"],
        "attribute_names": manifest["attribute_names"],
        "carved": manifest["carved"],
        "splits": splits,
        "layout": {key: manifest[key] for key in LAYOUT_KEYS},
        "made_with": {"pillow": PIL.__version__, "numpy": np.__version__, "webdataset": wds.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_reference(
    shard_dir: str | Path, out: str | Path, description: str | None = None, show_progress: bool = False
) -> dict:
    """Write the reference of `shard_dir` to `out`, named after the file. A reference already there
    is filled in rather than overwritten: the set must match it (see check_reference), and its
    description stays unless a new one is given."""
    out = Path(out)
    earlier = load_reference(out) if out.is_file() else {}
    if earlier:
        check = check_reference(shard_dir, earlier, show_progress)
        if not check.ok:
            raise ValueError(
                f"{shard_dir} does not match the reference {out} it would replace: "
                + "; ".join(str(mismatch) for mismatch in check.mismatches)
            )
    reference = make_reference(shard_dir, out.stem, description or earlier.get("description", ""), show_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, reference)
    return reference


def _shown(value: object) -> str:
    if value is None:
        return "absent"
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


@dataclass(frozen=True)
class ReferenceMismatch:
    """A field (a dotted path into the reference: splits.val.count) whose value differs from it."""

    field: str
    reference: str  # the values as shown
    found: str

    def __str__(self) -> str:
        return f"{self.field}: reference {self.reference}, this set {self.found}"


@dataclass(frozen=True)
class ReferenceCheck:
    name: str
    mismatches: list[ReferenceMismatch]
    notes: list[str]
    compared: str  # what was compared, in words

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        if self.ok:
            return f"ok: matches reference {self.name} ({self.compared})"
        return f"DIFFERS from reference {self.name}: {len(self.mismatches)} field(s) ({self.compared})"


def _record_differences(expected: dict, found: dict, prefix: str) -> Iterator[ReferenceMismatch]:
    """Where two nested records differ, by dotted path: a key one side lacks is one difference."""
    for key in dict.fromkeys([*expected, *found]):
        reference_value, value = expected.get(key), found.get(key)
        if isinstance(reference_value, dict) and isinstance(value, dict):
            yield from _record_differences(reference_value, value, f"{prefix}.{key}")
        elif reference_value != value:
            yield ReferenceMismatch(f"{prefix}.{key}", _shown(reference_value), _shown(value))


def _names_difference(reference: list[str], found: list[str]) -> ReferenceMismatch:
    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

    missing = [name for name in reference if name not in found]
    extra = [name for name in found if name not in reference]
    if not missing and not extra:
        return ReferenceMismatch("attribute_names", f"{len(reference)} names", "the same names in another order")
    return ReferenceMismatch(
        "attribute_names",
        f"{len(reference)} names" + (f", {len(missing)} not in this set ({some(missing)})" if missing else ""),
        f"{len(found)} names" + (f", {len(extra)} not in the reference ({some(extra)})" if extra else ""),
    )


def _shard_bytes(split: dict) -> list[tuple[str, int, str]]:
    return [(shard["name"], shard["count"], shard["sha256"]) for shard in split.get("shards", [])]


def _why_bytes_differ(reference: dict, manifest: dict, split: str) -> str:
    """Why a split whose content matches has other shard files than the reference's."""
    layout = reference.get("layout", {})
    differences = [f"{key} {layout[key]} vs {manifest[key]}" for key in LAYOUT_KEYS if layout.get(key) != manifest[key]]
    sizes = [
        [shard["count"] for shard in entry.get("shards", [])]
        for entry in (reference["splits"][split], manifest["splits"][split])
    ]
    if sizes[0] != sizes[1]:
        differences.append(f"shard sizes {sizes[0]} vs {sizes[1]}")
    return (
        ", ".join(differences)
        or "same layout: tar metadata only, as in shards written before gendist fixed their mtime"
    )


def check_reference(shard_dir: str | Path, reference: dict, show_progress: bool = False) -> ReferenceCheck:
    """Compare a shard set with a reference, field by field.

    The format, dataset, preprocessing, attribute names, carve record and the count of every
    converted split (carved ones too) must equal the reference's. Where the reference holds a
    split's content_sha256, the content must match too: at once when the split's shards are the
    reference's byte for byte (the manifest's sha256; `verify_shards` checks the files against
    it), otherwise by hashing the split's images (split_content_sha256), which a set cut into other
    shard sizes or with another seed passes, with a note saying so.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    mismatches: list[ReferenceMismatch] = []

    def differ(field: str, expected: object, found: object) -> None:
        mismatches.append(ReferenceMismatch(field, _shown(expected), _shown(found)))

    for field in ("format", "dataset"):
        if reference.get(field) != manifest.get(field):
            differ(field, reference.get(field), manifest.get(field))
    for group in ("preprocessing", "carved"):
        mismatches += _record_differences(reference.get(group, {}), manifest.get(group, {}), group)
    if reference["attribute_names"] != manifest["attribute_names"]:
        mismatches.append(_names_difference(reference["attribute_names"], manifest["attribute_names"]))

    byte_equal, content_equal, notes = [], [], []
    for split in dict.fromkeys([*reference["splits"], *converted_splits(manifest)]):
        expected, found = reference["splits"].get(split, {}), manifest["splits"].get(split, {})
        if expected.get("count") != found.get("count"):
            differ(f"splits.{split}.count", expected.get("count"), found.get("count"))
            continue
        content = expected.get("content_sha256")
        if content is None:
            continue
        if _shard_bytes(expected) == _shard_bytes(found):
            byte_equal.append(split)
            continue
        hashed = split_content_sha256(shard_dir, split, show_progress)
        if hashed != content:
            differ(f"splits.{split}.content_sha256", content, hashed)
            continue
        content_equal.append(split)
        why = _why_bytes_differ(reference, manifest, split)
        notes.append(f"{split}: content matches the reference; its shard files differ ({why})")

    compared = f"counts of {len(reference['splits'])} splits, preprocessing, attributes, carve"
    if byte_equal:
        compared += f"; {', '.join(byte_equal)} byte for byte"
    if content_equal:
        compared += f"; {', '.join(content_equal)} by content"
    if not any("content_sha256" in entry for entry in reference["splits"].values()):
        compared += "; the reference holds no checksums yet"
    return ReferenceCheck(reference["name"], mismatches, notes, compared)

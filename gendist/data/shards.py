"""Write any ImageSource as WebDataset tar shards per split, in parallel, with a manifest; read
the manifest back and verify the shards against it.

On-disk encoding (measured, see BENCHMARKS.md): `raw` stores blocks of preprocessed uint8 images
as one .npy per sample, so reading costs a memcpy instead of a JPEG decode and the per-sample
Python overhead is paid once per block. `jpeg`/`png` store one image per sample, the layout any
WebDataset user can read, at a fraction of the size. The format is described in shards/README.md.

Splits added to a set later (CycleGAN's domains: gendist.data.domains; generated faces:
gendist.augment) go through SplitWriter; reference manifests are gendist.data.shard_references.
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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import webdataset as wds
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gendist.data.sources import ImageSource, carve_splits

MANIFEST = "manifest.json"
FORMAT = "gendist-shards/1"
Encoding = Literal["raw", "jpeg", "png"]
# CelebA's usual framing: a 140 px square from the 178 px wide aligned image, as a fraction so
# the half-size sample and the full-size images give the same crop.
CELEBA_CROP_FRACTION = 140 / 178


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


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encoded_image(image: np.ndarray, encoding: Encoding) -> tuple[str, bytes]:
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


def write_json(path: Path, data: dict) -> None:
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
            "images.npy": npy_bytes(np.stack(images[block])),
            "attrs.npy": npy_bytes(np.stack(attributes[block]).reshape(len(keys[block]), -1)),
            "keys.txt": "\n".join(keys[block]).encode(),
        }


def image_sample(stem: str, extension: str, data: bytes, attrs_npy: bytes) -> dict:
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
            image_sample(
                sample_stem(key),
                *encoded_image(image, encoding),
                npy_bytes(attrs.reshape(1, -1)),
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
    write_json(out_dir / MANIFEST, manifest)
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


def shard_problem(shard_dir: Path, entry: dict) -> ShardProblem | None:
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
            if problem := shard_problem(shard_dir, entry):
                problems.append(problem)
    names = {entry["name"] for entry in listed}
    problems += [
        ShardProblem("extra", path.name, f"not listed in {MANIFEST}")
        for path in sorted(shard_dir.glob("*.tar"))
        if path.name not in names
    ]
    return ShardCheck(shard_dir, len(listed), problems)


class SplitWriter:
    """A split being added to a shard set (a domain, generated faces): buffers its samples and cuts
    them into shards of `shard_size` images with the converter's writer, as .tar.partial files
    until the caller commits them."""

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


def stored_sample(sample: dict, raw: bool) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
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

"""Write any ImageSource as WebDataset tar shards per split, in parallel, with a manifest.

On-disk encoding (measured, see BENCHMARKS.md): `raw` stores blocks of preprocessed uint8 images
as one .npy per sample, so reading costs a memcpy instead of a JPEG decode and the per-sample
Python overhead is paid once per block. `jpeg`/`png` store one image per sample, the layout any
WebDataset user can read, at a fraction of the size.
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
from collections.abc import Mapping
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


def _write_shard(task: ShardTask) -> dict:
    """Runs in a worker: read, preprocess and write one shard atomically; report what was skipped.

    A shard whose images were all corrupt is not written: the manifest lists only shards with data,
    which is what the loader checks to refuse an empty split.
    """
    source, preprocess = _worker["source"], _worker["preprocess"]
    encoding, per_sample = _worker["encoding"], _worker["per_sample"]
    name = f"{task.split}-{task.index:05d}.tar"
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
    with wds.TarWriter(str(partial), encoder=False) as sink:
        if encoding == "raw":
            for start in range(0, len(images), per_sample):
                block = slice(start, start + per_sample)
                sink.write(
                    {
                        "__key__": f"{task.split}-{task.index:05d}-{start:06d}",
                        "images.npy": _npy_bytes(np.stack(images[block])),
                        "attrs.npy": _npy_bytes(np.stack(attributes[block]).reshape(len(keys[block]), -1)),
                        "keys.txt": "\n".join(keys[block]).encode(),
                    }
                )
        else:
            for key, image, attrs in zip(keys, images, attributes):
                extension, data = _encoded(image, encoding)
                stem = key.rsplit(".", 1)[0].replace(".", "_").replace("/", "_")
                sink.write({"__key__": stem, extension: data, "attrs.npy": _npy_bytes(attrs.reshape(1, -1))})
    result.update(sha256=file_sha256(partial), bytes=partial.stat().st_size)
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
        "preprocessing": {
            **asdict(preprocess),
            "crop": "centre square, side = crop_fraction x shorter side",
            "resize": "PIL bicubic, antialiased",
        },
        "encoding": encoding,
        "images_per_sample": images_per_sample,
        "attribute_names": plan.attribute_names,
        "splits": splits,
        "carved": carved,
        "left_out": {**plan.left_out, "corrupt": len(corrupt)},
        "corrupt_examples": corrupt[:20],
        "seed": seed,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    partial = out_dir / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1))
    os.replace(partial, out_dir / MANIFEST)
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
            path = shard_dir / entry["name"]
            if not path.is_file():
                problems.append(
                    ShardProblem("missing", entry["name"], f"listed with {entry['count']} images, not found")
                )
                continue
            size = path.stat().st_size
            if "bytes" in entry and size != entry["bytes"]:  # manifests written before sizes lack "bytes"
                problems.append(
                    ShardProblem("changed", entry["name"], f"{size} bytes, {MANIFEST} says {entry['bytes']}")
                )
                continue
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                problems.append(
                    ShardProblem(
                        "changed", entry["name"], f"sha256 {digest[:16]}..., {MANIFEST} says {entry['sha256'][:16]}..."
                    )
                )
    names = {entry["name"] for entry in listed}
    problems += [
        ShardProblem("extra", path.name, f"not listed in {MANIFEST}")
        for path in sorted(shard_dir.glob("*.tar"))
        if path.name not in names
    ]
    return ShardCheck(shard_dir, len(listed), problems)

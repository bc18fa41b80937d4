"""Streaming loader: WebDataset shards -> uint8 batches, one pass over the split per epoch, equal
batch counts on every rank.

Each (rank, loader worker) pair is a slot. Per epoch, the shards are shuffled with a seed shared by
all ranks and laid end to end as one virtual sequence of the split's N images (manifest counts),
rotated by a seeded offset; slot after slot takes a contiguous range of exactly its quota of
batches, so every image is read once and the remainder (N mod world x batch) moves every epoch.
A range starts mid-shard: tars are read seekable, and samples before it cost only their headers.
A damaged shard that yields less than its manifest says does not leave a slot short of batches
(and a rank hanging in a collective): the slot reads on past its range and reports the loss.
Everything random derives from (seed, epoch, slot), so an epoch can be replayed and a resumed run
skips exactly the batches it had already consumed.

A split argument may name a union "a+b" of splits of the shard set (real data and a `gendist augment`
split, say): one sequence of a's shards then b's, its count the sum, read by every reader here.
"""

from __future__ import annotations

import bisect
import io
import itertools
import os
import random
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from gendist.data.shards import read_manifest

Block = tuple[np.ndarray, np.ndarray]  # images (n,H,W,3) uint8, attrs (n,A) int8
# what decode_sample reads; other members are seeked over
_FIELDS = frozenset({"images.npy", "attrs.npy", "jpg", "png"})


def batches_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    """Batches each rank takes per epoch: one pass over the split, less a remainder < world x batch."""
    return num_images // (world_size * batch_size)


@dataclass(frozen=True)
class StreamSpec:
    shard_dir: str
    split: str
    batch_size: int
    image_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle_pool: int = 2048
    hflip: bool = False


@dataclass(frozen=True)
class _Shard:
    path: str
    count: int  # images, as the manifest says


def split_parts(split: str) -> list[str]:
    """The splits a split argument names: "train" is one, the union "train+generated" is train's
    then generated's. An empty or repeated part is refused (an epoch reads each image once)."""
    parts = split.split("+")
    if not all(part.strip() == part and part for part in parts):
        raise ValueError(f"split {split!r} has an empty part or spaces: name splits as a or a+b")
    repeated = sorted({part for part in parts if parts.count(part) > 1})
    if repeated:
        raise ValueError(f"split {split!r} names {', '.join(repeated)} twice: a union reads each split once")
    return parts


def domain_split(split: str, domain: str) -> str:
    """Domain `domain` of a split or union (gendist shards domains): train -> train.Male, a+b -> a.Male+b.Male."""
    return "+".join(f"{part}.{domain}" for part in split_parts(split))


def _split_layout(shard_dir: str, split: str, image_size: int) -> tuple[dict, list[_Shard]]:
    """The manifest and the split's shards, checked against the model's size and for images. A union
    "a+b" of splits of the shard set is one sequence: a's shards, then b's (see split_parts)."""
    manifest = read_manifest(shard_dir)
    if manifest["preprocessing"]["size"] != image_size:
        raise ValueError(
            f"{shard_dir} holds {manifest['preprocessing']['size']}px images but the model wants "
            f"{image_size}px: set model.image_size={manifest['preprocessing']['size']} or convert at that size"
        )
    splits, parts = manifest["splits"], split_parts(split)
    unknown = [part for part in parts if part not in splits or not splits[part]["shards"]]
    if unknown:
        available = ", ".join(name for name, s in splits.items() if s["count"])
        if len(parts) == 1:
            raise ValueError(f"{shard_dir} has no '{split}' shards; splits with data: {available}")
        named = ", ".join(f"'{part}'" for part in unknown)
        raise ValueError(f"{shard_dir} has no {named} shards (in the union '{split}'); splits with data: {available}")
    shards = []
    for part in parts:
        if splits[part]["count"] == 0:
            raise ValueError(
                f"the '{part}' split of {shard_dir} holds no images: its {len(splits[part]['shards'])} "
                f"shards count 0 in the manifest (every source image failed to convert?)"
            )
        shards += [_Shard(str(Path(shard_dir) / s["name"]), s["count"]) for s in splits[part]["shards"]]
    return manifest, shards


class _Counters:
    """Damage seen so far: unreadable samples, shards and tar headers (errors), and images a read
    did not deliver (short)."""

    def __init__(self) -> None:
        self.errors = 0
        self.short = 0


class _ScanningTarFile(tarfile.TarFile):
    """A seekable tar that loses only the member whose header is damaged: ignore_zeros scans on
    past an invalid header, and this also past one that follows a pax or GNU long-name header
    (tarfile raises ReadError there). `damaged` counts those places and a truncated end."""

    damaged = 0

    def next(self) -> tarfile.TarInfo | None:
        while True:
            try:
                return super().next()
            except tarfile.ReadError:
                self.damaged += 1
                if self.offset + tarfile.BLOCKSIZE >= os.fstat(self.fileobj.fileno()).st_size:
                    return None
                self.offset += tarfile.BLOCKSIZE


def _tar_samples(
    path: str, first: int, stop: int, counters: _Counters, fields: frozenset[str] = _FIELDS
) -> Iterator[tuple[int, dict]]:
    """(index, sample) for samples first..stop-1 of a tar, numbered by webdataset's grouping of
    consecutive members by key, with the bytes of `fields`. Earlier samples cost a header read
    each; their data is seeked over."""
    try:
        tar = _ScanningTarFile.open(path, "r:", ignore_zeros=True)
    except (tarfile.TarError, OSError):
        counters.errors += 1
        return
    try:
        index, sample = -1, {}
        while (member := tar.next()) is not None:
            key, field = base_plus_ext(member.name)
            if not member.isreg() or key is None:
                continue
            if key != sample.get("__key__"):
                if index >= first:
                    yield index, sample
                index, sample = index + 1, {"__key__": key}
                if index >= stop:
                    return
            field = field.lower()
            if index >= first and field in fields:
                tar.fileobj.seek(member.offset_data)
                data = tar.fileobj.read(member.size)
                if len(data) == member.size:  # else left out: the sample fails to decode and counts
                    sample[field] = data
        if index >= first:
            yield index, sample
    finally:
        counters.errors += tar.damaged
        tar.close()


def _read_images(
    shard: _Shard, per_sample: int, first: int, stop: int, size: int, counters: _Counters
) -> Iterator[Block]:
    """Images first..stop-1 of a shard (manifest numbering: sample k holds images k*per_sample on),
    in order; undecodable samples are counted and left out."""
    for index, sample in _tar_samples(shard.path, first // per_sample, -(-stop // per_sample), counters):
        try:
            images, attrs = decode_sample(sample, size)
        except Exception:  # any damage in a sample's bytes
            counters.errors += 1
            continue
        base = index * per_sample
        lo, hi = max(first - base, 0), min(stop - base, len(images))
        if lo < hi:
            yield images[lo:hi], attrs[lo:hi]


class ShardStream(IterableDataset):
    """One epoch of batches for one rank: dicts of images (B,3,H,W uint8), attrs (B,A int8) and the
    damage seen since the previous batch: errors (unreadable samples) and short (images of this
    slot's range that its shards did not deliver, replaced by images read past the range)."""

    def __init__(self, spec: StreamSpec, epoch: int = 0, skip_batches: int = 0) -> None:
        super().__init__()
        self.spec, self.epoch, self.skip_batches = spec, epoch, skip_batches
        manifest, self.shards = _split_layout(spec.shard_dir, spec.split, spec.image_size)
        self.per_sample: int = manifest["images_per_sample"]
        self.attribute_names: list[str] = manifest["attribute_names"]
        self.num_images = sum(s.count for s in self.shards)
        self.batches = batches_per_epoch(self.num_images, spec.world_size, spec.batch_size)
        if self.batches == 0:
            ranks = f"{spec.world_size} rank{'s' if spec.world_size > 1 else ''}"
            raise ValueError(
                f"data.batch_size={spec.batch_size} on {ranks} needs at least "
                f"{spec.batch_size * spec.world_size} images per epoch; the '{spec.split}' split of "
                f"{spec.shard_dir} has {self.num_images}"
            )

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        # The DataLoader reads its workers round-robin from worker 0, and logical worker w made
        # batches w, w + W, ... of the epoch; after skipping k batches, loader worker 0 must
        # play logical worker k mod W for the order to continue exactly.
        worker = ((info.id if info else 0) + self.skip_batches) % num_workers
        spec, batches = self.spec, self.batches
        quota = batches // num_workers + (worker < batches % num_workers)
        skip = max(0, -(-(self.skip_batches - worker) // num_workers))  # ceil((k - w) / W)
        if skip >= quota:  # a resume at this slot's end: nothing left to read
            return
        # Ranges lie end to end: rank by rank, and within a rank logical worker by worker.
        before = spec.rank * batches + worker * (batches // num_workers) + min(worker, batches % num_workers)
        order = list(self.shards)
        epoch_rng = random.Random(f"{spec.seed}/{self.epoch}")  # the same on every rank
        epoch_rng.shuffle(order)
        start = epoch_rng.randrange(self.num_images) + before * spec.batch_size
        counters = _Counters()
        slot = spec.rank * num_workers + worker
        rng = np.random.default_rng(random.Random(f"{spec.seed}/{self.epoch}/{slot}").getrandbits(64))
        blocks = self._range(order, start, quota * spec.batch_size, counters)
        errors = short = 0
        for index, (images, attrs) in enumerate(_pooled_batches(blocks, spec, rng)):
            if index >= skip:
                yield {
                    "images": torch.from_numpy(images).permute(0, 3, 1, 2),  # channels_last memory
                    "attrs": torch.from_numpy(attrs),
                    "errors": counters.errors - errors,
                    "short": counters.short - short,
                }
            errors, short = counters.errors, counters.short  # a resumed run reported skipped batches' damage

    def _range(self, order: list[_Shard], start: int, length: int, counters: _Counters) -> Iterator[Block]:
        """`length` images from position `start` of the virtual sequence `order` on, cyclically. What
        a damaged shard does not deliver is made up from the positions after the range."""
        ends = list(itertools.accumulate(s.count for s in order))
        delivered, barren, warned = 0, 0, set()  # barren: positions read since the last image delivered
        position = start
        while delivered < length:
            if barren >= self.num_images:
                raise RuntimeError(
                    f"no readable sample in the '{self.spec.split}' split of {self.spec.shard_dir} "
                    f"({counters.errors} errors in {len(order)} shards)"
                )
            at = position % self.num_images
            i = bisect.bisect_right(ends, at)
            shard = order[i]
            first = at - (ends[i] - shard.count)
            stop = min(shard.count, first + length - delivered)
            got = 0
            for block in _read_images(shard, self.per_sample, first, stop, self.spec.image_size, counters):
                got += len(block[0])
                yield block
            delivered += got
            barren = 0 if got else barren + stop - first
            position += stop - first
            if got < stop - first:
                counters.short += stop - first - got
                if shard.path not in warned:
                    warned.add(shard.path)
                    line = (
                        f"gendist: warning: {shard.path} yielded {got} of the {stop - first} images the manifest "
                        f"lists at {first}..{stop - 1} (of {shard.count}); reading on past this slot's range "
                        f"(rank {self.spec.rank}, epoch {self.epoch})\n"
                    )
                    sys.stderr.write(line)  # in one write: the workers share stderr
                    sys.stderr.flush()


def decode_sample(sample: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    if "images.npy" in sample:
        images = np.load(io.BytesIO(sample["images.npy"]), allow_pickle=False)
    else:
        data = sample.get("jpg") or sample.get("png")
        if data is None:
            raise ValueError(f"sample {sample.get('__key__')} has no images.npy, jpg or png field")
        images = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"sample {sample.get('__key__')}: images of {images.shape} {images.dtype}, "
            f"expected (n,{size},{size},3) uint8"
        )
    attrs = np.load(io.BytesIO(sample["attrs.npy"]), allow_pickle=False).reshape(len(images), -1)
    return images, attrs


def _pooled_batches(blocks: Iterable[Block], spec: StreamSpec, rng: np.random.Generator) -> Iterator[Block]:
    """Mix `shuffle_pool` images from consecutive blocks, then cut them into batches; at the end,
    the pool's last full batches."""
    images: list[np.ndarray] = []
    attrs: list[np.ndarray] = []
    held = 0
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            images.append(block[0])
            attrs.append(block[1])
            held += len(block[0])
            if held < max(spec.shuffle_pool, spec.batch_size):
                continue
        if not held:
            return
        all_images, all_attrs = np.concatenate(images), np.concatenate(attrs)
        order = rng.permutation(held)
        usable = held - held % spec.batch_size
        for start in range(0, usable, spec.batch_size):
            take = order[start : start + spec.batch_size]
            batch = all_images[take]
            if spec.hflip:
                flip = rng.random(len(batch)) < 0.5
                batch[flip] = batch[flip, :, ::-1]
            yield batch, all_attrs[take]
        rest = order[usable:]
        images, attrs, held = [all_images[rest]], [all_attrs[rest]], len(rest)


def read_in_order(shard_dir: str, split: str, image_size: int, limit: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """The first `limit` images (0 = all) of a split in manifest order, no shuffle or flip:
    (images N,H,W,3 uint8, attrs N,A int8, unreadable samples skipped). The evaluation reference."""
    manifest, shards = _split_layout(shard_dir, split, image_size)
    counters = _Counters()
    blocks: list[Block] = []
    held = 0
    for shard in shards:
        if limit and held >= limit:
            break
        stop = min(shard.count, limit - held) if limit else shard.count
        for block in _read_images(shard, manifest["images_per_sample"], 0, stop, image_size, counters):
            blocks.append(block)
            held += len(block[0])
    if not blocks:
        raise RuntimeError(f"no readable image in the '{split}' shards of {shard_dir} ({counters.errors} errors)")
    images, attrs = (np.concatenate(parts) for parts in zip(*blocks))
    return images, attrs, counters.errors


def read_range(shard_dir: str, split: str, image_size: int, start: int = 0, stop: int = 0) -> Iterator[Block]:
    """Images start..stop-1 (stop 0: to the end) of a split by manifest position, in order, as
    blocks; only the samples that hold them are read. A damaged shard raises ValueError: a copy
    (gendist augment's translations) must be whole and the same on every rank."""
    manifest, shards = _split_layout(shard_dir, split, image_size)
    stop = stop or sum(shard.count for shard in shards)
    counters, end = _Counters(), 0
    for shard in shards:
        begin, end = end, end + shard.count
        first, last = max(start - begin, 0), min(stop - begin, shard.count)
        if first < last:
            got = 0
            for block in _read_images(shard, manifest["images_per_sample"], first, last, image_size, counters):
                got += len(block[0])
                yield block
            if got != last - first or counters.errors:
                raise ValueError(
                    f"{shard.path} yielded {got} of the {last - first} images the manifest lists at "
                    f"{first}..{last - 1} ({counters.errors} unreadable samples); check the shard set with "
                    f"`gendist shards verify {shard_dir}`"
                )
        if end >= stop:
            return


def read_attributes(shard_dir: str, split: str, strict: bool = True) -> np.ndarray:
    """Every attribute row of a split (N, A int8) in manifest order, read from the attribute members
    alone (the images are seeked over). A damaged shard raises ValueError, as in read_range, unless
    not `strict`: then its unreadable samples are left out (label counts of a training split)."""
    manifest = read_manifest(shard_dir)
    _, shards = _split_layout(shard_dir, split, manifest["preprocessing"]["size"])
    width, rows = len(manifest["attribute_names"]), []
    for shard in shards:
        counters, got = _Counters(), 0
        for _, sample in _tar_samples(shard.path, 0, sys.maxsize, counters, frozenset({"attrs.npy"})):
            try:
                attrs = np.load(io.BytesIO(sample["attrs.npy"]), allow_pickle=False).reshape(-1, width)
            except Exception:  # any damage in a sample's bytes
                counters.errors += 1
                continue
            rows.append(attrs.astype(np.int8, copy=False))
            got += len(attrs)
        if strict and (counters.errors or got != shard.count):
            raise ValueError(
                f"{shard.path}: {got} attribute rows of the {shard.count} its manifest lists ({counters.errors} "
                f"unreadable samples); check the shard set with `gendist shards verify {shard_dir}`"
            )
    return np.concatenate(rows) if rows else np.zeros((0, width), np.int8)


def read_samples(shard_dir: str, split: str) -> Iterator[dict]:
    """Every sample of a split in manifest order, undecoded: its key and the bytes of its images,
    attributes and (raw blocks) keys.txt; what `gendist shards domains` copies. A shard with a
    damaged tar header or an unreadable tar raises ValueError: a copy must be whole."""
    manifest = read_manifest(shard_dir)
    _, shards = _split_layout(shard_dir, split, manifest["preprocessing"]["size"])
    for shard in shards:
        counters = _Counters()
        for _, sample in _tar_samples(shard.path, 0, sys.maxsize, counters, _FIELDS | {"keys.txt"}):
            yield sample
        if counters.errors:
            raise ValueError(
                f"{shard.path}: {counters.errors} damaged tar header(s) or an unreadable tar; "
                f"check the shard set with `gendist shards verify {shard_dir}`"
            )


def make_loader(
    spec: StreamSpec,
    num_workers: int,
    epoch: int = 0,
    skip_batches: int = 0,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A DataLoader over one epoch; its own generator keeps the global torch RNG untouched.
    `worker_init_fn` runs in each worker (the trainer's sets the workers' signal handling)."""
    stream = ShardStream(spec, epoch, skip_batches)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(spec.seed),
        persistent_workers=False,
        worker_init_fn=worker_init_fn,
    )

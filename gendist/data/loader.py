"""Streaming loader: WebDataset shards -> uint8 batches, equal batch counts on every rank.

Each (rank, loader worker) pair is a slot. Per epoch, the shard list is shuffled with a seed shared
by all ranks and dealt out round-robin to the slots; a slot cycles over its shards until it has
produced its quota, so uneven shards never leave one rank short of batches (and hanging in a
collective). Everything random derives from (seed, epoch, slot), so an epoch can be replayed and a
resumed run skips exactly the batches it had already consumed.
"""
from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gendist.data.shards import read_manifest


def batches_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    """Batches each rank takes per epoch: one pass over the split, at least one."""
    return max(1, num_images // (world_size * batch_size))


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


def split_shards(shard_dir: str, split: str, image_size: int) -> tuple[list[str], int, list[str]]:
    """Shard paths, image count and attribute names of a split, checked against the model's size."""
    manifest = read_manifest(shard_dir)
    if manifest["preprocessing"]["size"] != image_size:
        raise ValueError(
            f"{shard_dir} holds {manifest['preprocessing']['size']}px images but the model wants "
            f"{image_size}px: set model.image_size={manifest['preprocessing']['size']} or convert at that size"
        )
    splits = manifest["splits"]
    if split not in splits or not splits[split]["shards"]:
        available = [name for name, s in splits.items() if s["shards"]]
        raise ValueError(f"{shard_dir} has no '{split}' shards; splits with data: {', '.join(available)}")
    paths = [str(Path(shard_dir) / s["name"]) for s in splits[split]["shards"]]
    return paths, splits[split]["count"], manifest["attribute_names"]


class _Counters:
    """Counts decoded blocks and, as a WebDataset exception handler, skipped shards or samples."""

    def __init__(self) -> None:
        self.errors = 0
        self.decoded = 0

    def __call__(self, exn: Exception) -> bool:
        self.errors += 1
        return True


class ShardStream(IterableDataset):
    """One epoch of batches for one rank: dicts of images (B,3,H,W uint8), attrs (B,A int8), errors."""

    def __init__(self, spec: StreamSpec, epoch: int = 0, skip_batches: int = 0) -> None:
        super().__init__()
        self.spec, self.epoch, self.skip_batches = spec, epoch, skip_batches
        self.shards, self.num_images, self.attribute_names = split_shards(spec.shard_dir, spec.split, spec.image_size)
        self.batches = batches_per_epoch(self.num_images, spec.world_size, spec.batch_size)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        # The DataLoader reads its workers round-robin from worker 0, and logical worker w made
        # batches w, w + W, ... of the epoch; after skipping k batches, loader worker 0 must
        # play logical worker k mod W for the order to continue exactly.
        worker = ((info.id if info else 0) + self.skip_batches) % num_workers
        spec = self.spec
        slot, slots = spec.rank * num_workers + worker, spec.world_size * num_workers
        rng = random.Random(f"{spec.seed}/{self.epoch}/{slot}")
        order = list(self.shards)
        random.Random(f"{spec.seed}/{self.epoch}").shuffle(order)  # same on every rank
        mine = order[slot::slots] or [order[slot % len(order)]]
        quota = self.batches // num_workers + (worker < self.batches % num_workers)
        skip = max(0, -(-(self.skip_batches - worker) // num_workers))  # ceil((k - w) / W)
        counters = _Counters()

        def decode(sample: dict) -> tuple[np.ndarray, np.ndarray]:
            decoded = decode_sample(sample, spec.image_size)
            counters.decoded += 1
            return decoded

        pipeline = wds.DataPipeline(
            lambda: _cycle(mine, rng, counters),
            wds.tarfile_to_samples(handler=counters),
            wds.shuffle(bufsize=max(1, spec.shuffle_pool // 64), initial=1, rng=rng),
            wds.map(decode, handler=counters),
        )
        batches = _pooled_batches(pipeline, spec, np.random.default_rng(rng.getrandbits(64)))
        reported = 0
        for index, (images, attrs) in enumerate(batches):
            if index >= quota:
                return
            if index < skip:
                continue
            yield {
                "images": torch.from_numpy(images).permute(0, 3, 1, 2),  # channels_last memory
                "attrs": torch.from_numpy(attrs),
                "errors": counters.errors - reported,
            }
            reported = counters.errors


def _cycle(urls: list[str], rng: random.Random, counters: _Counters) -> Iterator[dict]:
    """Endless shard stream in a fresh order each pass; fails if a whole pass decoded nothing."""
    passes = 0
    while True:
        order = list(urls)
        rng.shuffle(order)
        for url in order:
            yield {"url": url}
        passes += 1
        # The shuffle buffer may still hold a first pass's only block, so judge after two.
        if passes >= 2 and counters.decoded == 0 and counters.errors:
            raise RuntimeError(f"no readable sample in these shards ({counters.errors} errors): {', '.join(order)}")


def decode_sample(sample: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    if "images.npy" in sample:
        images = np.load(io.BytesIO(sample["images.npy"]), allow_pickle=False)
    else:
        data = sample.get("jpg") or sample.get("png")
        if data is None:
            raise ValueError(f"sample {sample.get('__key__')} has no images.npy, jpg or png field")
        images = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"sample {sample.get('__key__')}: images of {images.shape} {images.dtype}, expected (n,{size},{size},3) uint8")
    attrs = np.load(io.BytesIO(sample["attrs.npy"]), allow_pickle=False).reshape(len(images), -1)
    return images, attrs


def _pooled_batches(blocks, spec: StreamSpec, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Mix `shuffle_pool` images from several blocks, then cut them into batches."""
    images: list[np.ndarray] = []
    attrs: list[np.ndarray] = []
    held = 0
    for block_images, block_attrs in blocks:
        images.append(block_images)
        attrs.append(block_attrs)
        held += len(block_images)
        if held < max(spec.shuffle_pool, spec.batch_size):
            continue
        all_images, all_attrs = np.concatenate(images), np.concatenate(attrs)
        order = rng.permutation(held)
        usable = held - held % spec.batch_size
        for start in range(0, usable, spec.batch_size):
            take = order[start:start + spec.batch_size]
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
    paths, _, _ = split_shards(shard_dir, split, image_size)
    counters = _Counters()
    pipeline = wds.DataPipeline(wds.SimpleShardList(paths), wds.tarfile_to_samples(handler=counters),
                                wds.map(lambda sample: decode_sample(sample, image_size), handler=counters))
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    held = 0
    for block in pipeline:
        blocks.append(block)
        held += len(block[0])
        if limit and held >= limit:
            break
    if not blocks:
        raise RuntimeError(f"no readable image in the '{split}' shards of {shard_dir} ({counters.errors} errors)")
    images, attrs = (np.concatenate(parts) for parts in zip(*blocks))
    count = min(held, limit) if limit else held
    return images[:count], attrs[:count], counters.errors


def make_loader(spec: StreamSpec, num_workers: int, epoch: int = 0, skip_batches: int = 0,
                worker_init_fn: Callable[[int], None] | None = None) -> DataLoader:
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

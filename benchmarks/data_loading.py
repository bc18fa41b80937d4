"""Data benchmarks: shard conversion and loader throughput per on-disk encoding, against a
torchvision ImageFolder + PIL baseline reading the same JPEGs with the same crop and resize.

    .venv/bin/python benchmarks/data_loading.py --src ../shared/data/celeba-sample

All figures come from this one invocation. Loader figures are for ONE process (num_workers=0),
so they are per core, measured over --images images after --warmup images (both loaders: warm page
cache, filled shuffle pool); ratios are against the baseline measured in the same run. Also: the
peak resident set of one loader worker process (num_workers=1).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from gendist.data.loader import ShardStream, StreamSpec, make_loader
from gendist.data.shards import CELEBA_CROP_FRACTION, Preprocess, write_shards
from gendist.data.sources import CelebASource


def timed_rate(batches: Iterator[torch.Tensor], warmup: int, images: int) -> float:
    """Images/s over `images` images after `warmup` images (page cache, shuffle pool, allocator)."""
    seen, started = 0, None
    for real in batches:
        seen += real.shape[0]
        if started is None and seen >= warmup:
            started, seen = time.perf_counter(), 0
        elif started is not None and seen >= images:
            return seen / (time.perf_counter() - started)
    raise RuntimeError("the loader ended before the measurement did")


def endless(make_epoch: Callable[[int], Iterator[torch.Tensor]]) -> Iterator[torch.Tensor]:
    for epoch in itertools.count():
        yield from make_epoch(epoch)


def gendist_batches(shard_dir: Path, size: int, batch: int) -> Iterator[torch.Tensor]:
    spec = StreamSpec(str(shard_dir), "train", batch, size, shuffle_pool=2048)
    for out in endless(lambda epoch: ShardStream(spec, epoch)):
        yield out["images"].float().div_(127.5).sub_(1.0)  # what the trainer does per batch


def baseline_batches(image_root: Path, size: int, batch: int) -> Iterator[torch.Tensor]:
    """pytorch/examples-style: ImageFolder + PIL decode of the aligned JPEGs + crop + resize."""

    def crop(img):
        side = CELEBA_CROP_FRACTION * min(img.size)
        return transforms.functional.center_crop(img, [round(side), round(side)])

    tf = transforms.Compose(
        [
            transforms.Lambda(crop),
            transforms.Resize(size),
            transforms.ToTensor(),
            transforms.Normalize((0.5,) * 3, (0.5,) * 3),
        ]
    )
    loader = DataLoader(datasets.ImageFolder(str(image_root), tf), batch_size=batch, shuffle=True, num_workers=0)
    for real, _ in endless(lambda epoch: loader):
        yield real


def worker_peak_rss(shard_dir: Path, size: int, batch: int, batches: int) -> float:
    """Peak resident set (MiB, VmHWM) of one DataLoader worker process after streaming `batches`
    batches, as the trainer's loader does."""
    loader = iter(make_loader(StreamSpec(str(shard_dir), "train", batch, size, shuffle_pool=2048), num_workers=1))
    for _ in range(batches):
        next(loader)
    (worker,) = psutil.Process().children()
    status = Path(f"/proc/{worker.pid}/status").read_text().splitlines()
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    del loader
    return peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="CelebA in the official layout (folder or zip)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=20000, help="images read per loader measurement")
    parser.add_argument("--warmup", type=int, default=4000, help="images read before each measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = CelebASource(args.src)
        rows = []
        for encoding, per_sample in (("raw", 64), ("raw", 1), ("jpeg", 1), ("png", 1)):
            out = tmp / f"{encoding}-{per_sample}"
            started = time.perf_counter()
            manifest = write_shards(
                source, out, Preprocess(args.size), encoding, per_sample, workers=os.cpu_count(), show_progress=False
            )
            convert = manifest["splits"]["train"]["count"] / (time.perf_counter() - started)
            count = sum(s["count"] for s in manifest["splits"].values())
            size = sum(p.stat().st_size for p in out.glob("*.tar")) / count
            rate = timed_rate(gendist_batches(out, args.size, args.batch), args.warmup, args.images)
            rows.append((f"{encoding} x{per_sample}", convert, size, rate))
            if (encoding, per_sample) == ("raw", 64):
                rss = worker_peak_rss(out, args.size, args.batch, batches=50)

        image_root = tmp / "imagefolder"
        if source.archive is not None:
            with zipfile.ZipFile(source.archive) as archive:
                archive.extractall(image_root)
        else:
            image_root.mkdir()
            (image_root / "img_align_celeba").symlink_to(source.folder.resolve())
        base = timed_rate(baseline_batches(image_root, args.size, args.batch), args.warmup, args.images)

    print(f"\nbaseline ImageFolder+PIL (JPEG decode, crop, resize), 1 process: {base:.0f} images/s\n")
    print(
        f"| encoding (images per sample) | convert images/s ({os.cpu_count()} procs) | bytes/image "
        "| load images/s, 1 core | vs baseline |"
    )
    print("|---|---|---|---|---|")
    for name, convert, size, rate in rows:
        print(f"| {name} | {convert:.0f} | {size:.0f} | {rate:.0f} | {rate / base:.1f}x |")
    print(
        f"\nraw x64, batch {args.batch}: peak RSS of one loader worker (make_loader, num_workers=1) after 50 "
        f"batches: {rss:.0f} MiB"
    )


if __name__ == "__main__":
    main()

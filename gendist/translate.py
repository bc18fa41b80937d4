"""Apply a run's trained translator to images (style transfer), the same under every launcher:

    gendist translate RUN_DIR --src photos/ --out translated/            A -> B with the latest checkpoint
    gendist translate RUN_DIR --src SHARDS --split val.Eyeglasses --direction b_to_a --out out/
    accelerate launch -m gendist.translate RUN_DIR --src photos/ --out translated/     spread over the ranks

`--src` is a folder of images (searched recursively, the converter's suffixes; each centre-cropped and
resized to the model's size as `gendist shards` does) or a shard folder (it holds manifest.json; `--split`
picks the split, by default the source domain's held-out split eval.recon_split.SRC). a_to_b is the
family's first translation (CycleGAN: cyclegan.domains[0] -> [1]), b_to_a the way back. Each input image
gives one PNG under --out with the input's relative path (a shard image: its key) and the suffix .png,
written by the rank that translated it: the ranks take contiguous shares of the images in sorted (shard:
stored) order. Unreadable images are skipped, counted and named.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from gendist import distributed
from gendist.checkpoint import CheckpointError
from gendist.config import ConfigError, RunConfig, load_config
from gendist.data.loader import decode_sample, domain_split, read_samples
from gendist.data.shards import MANIFEST, Preprocess, read_manifest
from gendist.data.sources import FolderSource
from gendist.eval.evaluator import quantised, unit_range
from gendist.families.base import Translate
from gendist.trained import find_checkpoint, load_sampling
from gendist.training.stream import resolve_shards

DIRECTIONS = ("a_to_b", "b_to_a")
NAMED_SKIPS = 20  # unreadable images each rank names; the rest are counted
Read = tuple[str, np.ndarray | str]  # (name, HxWx3 uint8 image) or (name, why it could not be read)


def add_translate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of a translation family (holds config.yaml and checkpoints/)")
    parser.add_argument("--src", required=True, help="a folder of images (recursive) or a shard folder")
    parser.add_argument("--out", required=True, help="output folder: one PNG per input image, same relative name")
    parser.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="a_to_b",
        help="a_to_b: the family's first translation (cyclegan.domains[0] -> [1], default); b_to_a: back",
    )
    parser.add_argument("--checkpoint", help="a checkpoint folder to use instead of the run's latest")
    parser.add_argument("--batch-size", type=int, help="images per batch and rank (default eval.batch_size)")
    parser.add_argument("--split", help="with a shard folder: the split to translate (default eval.recon_split.SRC)")
    parser.add_argument(
        "--crop-fraction",
        type=float,
        help="with a folder of images: side of the centre square crop as a fraction of the shorter side "
        "(default: as the run's training shards were converted, when readable here; else 1.0)",
    )


class FolderImages:
    """The images under a folder, sorted by relative path, preprocessed as the converter does."""

    def __init__(self, root: Path, preprocess: Preprocess) -> None:
        self.source, self.preprocess = FolderSource(root), preprocess
        self.keys = self.source.plan().splits["train"]  # every image: no val fraction
        outputs: dict[Path, str] = {}
        for key in self.keys:
            clash = outputs.setdefault(output_name(key), key)
            if clash != key:
                raise ValueError(f"{root}: {clash} and {key} would both be translated to {output_name(key)}")
        self.description = f"{len(self.keys)} images of {root} (crop fraction {preprocess.crop_fraction:.4f})"

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, start: int, end: int) -> Iterator[Read]:
        for key in self.keys[start:end]:
            try:
                yield key, self.preprocess(self.source.open(key))
            except (OSError, ValueError) as err:
                yield key, str(err)


class ShardImages:
    """The images of one split of a shard folder, in stored order, named by their keys."""

    def __init__(self, shard_dir: Path, split: str, size: int) -> None:
        manifest = read_manifest(shard_dir)
        if manifest["preprocessing"]["size"] != size:
            raise ValueError(
                f"{shard_dir} holds {manifest['preprocessing']['size']}px images but the model translates "
                f"{size}px ones: convert the images at --size {size}"
            )
        if split not in manifest["splits"]:
            raise ValueError(f"{shard_dir} has no split {split!r}; its splits: {', '.join(manifest['splits'])}")
        self.shard_dir, self.split, self.size = shard_dir, split, size
        self.total = manifest["splits"][split]["count"]
        self.description = f"the {self.total} '{split}' images of {shard_dir}"

    def __len__(self) -> int:
        return self.total

    def read(self, start: int, end: int) -> Iterator[Read]:
        """Images start..end-1; only the samples that hold them are decoded."""
        index = 0
        for sample in read_samples(str(self.shard_dir), self.split):
            if index >= end:
                return
            keys = sample["keys.txt"].decode().split("\n") if "keys.txt" in sample else [sample["__key__"]]
            if index + len(keys) > start:
                try:
                    images = decode_sample(sample, self.size)[0]
                except Exception as err:  # any damage in a sample's bytes
                    images = [f"sample {sample['__key__']}: {err}"] * len(keys)
                for offset, (key, image) in enumerate(zip(keys, images)):
                    if start <= index + offset < end:
                        yield key, image
            index += len(keys)


def output_name(key: str) -> Path:
    """Where an input's translation goes, relative to --out: its path with the suffix .png."""
    name = Path(key)
    if name.is_absolute() or ".." in name.parts or not name.name:
        raise ValueError(f"{key!r} is not a relative file name")
    return name.with_suffix(".png")


def _training_manifest(cfg: RunConfig, accelerator: Accelerator) -> dict | None:
    """The manifest of the run's training shards, when this machine has them (the embedded set is rebuilt)."""
    try:
        return read_manifest(resolve_shards(cfg, accelerator))
    except FileNotFoundError:
        return None


def _direction(translate: dict[tuple[str, str], Translate], direction: str) -> tuple[str, str, Translate]:
    first = next(iter(translate))
    src, dst = first if direction == "a_to_b" else first[::-1]
    if (src, dst) not in translate:
        raise ValueError(f"the run translates {first[0]} -> {first[1]} only, not {src} -> {dst} ({direction})")
    return src, dst, translate[(src, dst)]


def _inputs(args: argparse.Namespace, cfg: RunConfig, src: str, manifest: dict | None) -> FolderImages | ShardImages:
    source = Path(args.src)
    if (source / MANIFEST).is_file():
        if args.crop_fraction is not None:
            raise ValueError(f"--crop-fraction applies to a folder of images; {source} holds preprocessed shards")
        return ShardImages(source, args.split or domain_split(cfg.eval.recon_split, src), cfg.model.image_size)
    if args.split:
        raise ValueError(f"--split applies to a shard folder (with {MANIFEST}); {source} is a folder of images")
    if source.is_dir() and Path(args.out).resolve().is_relative_to(source.resolve()):
        raise ValueError(f"--out {args.out} lies inside --src {source}: a second run would translate the outputs")
    crop = args.crop_fraction
    if crop is None:
        crop = manifest["preprocessing"]["crop_fraction"] if manifest else 1.0
    return FolderImages(source, Preprocess(cfg.model.image_size, crop))


def _write(batch: list[tuple[str, np.ndarray]], forward: Translate, out: Path, device: torch.device) -> None:
    """Translate one batch and write each image as a PNG (atomically: no half-written file)."""
    real = unit_range(np.stack([image for _, image in batch]), device)
    with torch.no_grad():
        levels = (quantised(forward(real * 2 - 1)) * 255).round().to(torch.uint8)
    for (key, _), pixels in zip(batch, levels.permute(0, 2, 3, 1).cpu().numpy()):
        path = out / output_name(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        Image.fromarray(pixels).save(partial, format="PNG")
        os.replace(partial, path)


def translate_share(
    inputs: FolderImages | ShardImages,
    start: int,
    end: int,
    forward: Translate,
    out: Path,
    batch_size: int,
    device: torch.device,
) -> tuple[int, list[str]]:
    """Translate images start..end-1 in batches: (images written, 'name: why' of those unreadable)."""
    written, unreadable, batch = 0, [], []
    for key, image in inputs.read(start, end):
        try:
            output_name(key)
        except ValueError as err:  # a shard key that would write outside --out
            image = str(err)
        if isinstance(image, str):
            unreadable.append(f"{key}: {image}")
            continue
        batch.append((key, image))
        if len(batch) == batch_size:
            _write(batch, forward, out, device)
            written, batch = written + len(batch), []
    if batch:
        _write(batch, forward, out, device)
        written += len(batch)
    return written, unreadable


def _report_unreadable(accelerator: Accelerator, unreadable: list[str]) -> None:
    """This rank's first NAMED_SKIPS unreadable images, on stderr."""
    world = accelerator.num_processes
    tag = f"[rank {accelerator.process_index}/{world}] " if world > 1 else ""
    lines = [f"{tag}gendist: warning: skipped unreadable {problem}" for problem in unreadable[:NAMED_SKIPS]]
    if len(unreadable) > NAMED_SKIPS:
        lines.append(f"{tag}gendist: warning: and {len(unreadable) - NAMED_SKIPS} more unreadable images")
    if lines:
        print("\n".join(lines), file=sys.stderr, flush=True)


def translate_run(args: argparse.Namespace) -> int:
    run_dir, out = Path(args.run_dir), Path(args.out)
    cfg = load_config(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir, args.checkpoint)
    batch_size = args.batch_size or cfg.eval.batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    accelerator = distributed.build_fp32_accelerator()
    manifest = _training_manifest(cfg, accelerator)
    sampling, _ = load_sampling(cfg, checkpoint, accelerator, manifest["attribute_names"] if manifest else [])
    if not sampling.translate:
        raise ValueError(
            f"{run_dir} is a {cfg.model.name} run, and the {cfg.model.name} family translates no images "
            "(its sampling has no translate); gendist translate needs a translation family such as cyclegan"
        )
    src, dst, forward = _direction(sampling.translate, args.direction)
    inputs = _inputs(args, cfg, src, manifest)
    world = accelerator.num_processes
    distributed.rank_print(
        accelerator, f"translating {inputs.description}: {src} -> {dst} with {checkpoint}, into {out}"
    )
    out.mkdir(parents=True, exist_ok=True)
    start, end = distributed.chunk_bounds(len(inputs), accelerator.process_index, world)
    written, unreadable = translate_share(inputs, start, end, forward, out, batch_size, accelerator.device)
    _report_unreadable(accelerator, unreadable)
    mine = torch.tensor([[written, len(unreadable)]], dtype=torch.int64, device=accelerator.device)
    counts = distributed.gather_rows(accelerator, mine, world).tolist()
    total_written, total_unreadable = (sum(column) for column in zip(*counts))
    missing = len(inputs) - total_written - total_unreadable  # a damaged shard holding fewer than listed
    shares = " + ".join(str(row[0]) for row in counts)
    distributed.rank_print(
        accelerator,
        f"translated {total_written} of {len(inputs)} images {src} -> {dst} into {out} on {world} "
        f"rank{'s' if world > 1 else ''} ({shares}); {total_unreadable} unreadable, skipped"
        + (f"; {missing} listed in the manifest were not found" if missing > 0 else ""),
    )
    if total_written == 0:
        raise ValueError(f"no image of {inputs.description} could be read and translated")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the translation with user mistakes said in one line (distributed.run_on_every_rank)."""
    return distributed.run_on_every_rank(
        lambda: translate_run(args), (ConfigError, FileNotFoundError, ValueError, CheckpointError)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gendist.translate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_translate_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

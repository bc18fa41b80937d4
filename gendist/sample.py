"""`gendist sample RUN --num N --out DIR`: N images of a run's generator as PNG files, to look at or
to score with other tools (clean-fid, torch-fidelity), on any number of ranks:

    gendist sample runs/dcgan_celeba64 --num 10000 --out samples/dcgan
    accelerate launch --num_processes 8 -m gendist.sample runs/dcgan_celeba64 --num 50000 --out samples/dcgan

Image i (DIR/000000.png, ...) is decoded from row i of one noise matrix drawn with --seed (and, for a
conditional generator, row i of its training split's attributes, cycled). The rows are cut into
fixed global batches of --batch-size that the ranks take in turn, so each image is computed in the
same batch whatever the rank count: the files are the same, byte for byte, on 1 rank or 8. The
generator is the EMA copy where the run keeps one (--no-ema: the trained weights). RUN may also be a
folder `gendist export` wrote: its network is sampled the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gendist import distributed
from gendist.checkpoint import CheckpointError
from gendist.config import ConfigError, load_config
from gendist.data.loader import read_attributes
from gendist.export import is_export, load_export
from gendist.families.base import Generate, Sampling
from gendist.trained import find_checkpoint, load_sampling, trained_attribute_names
from gendist.training.stream import resolve_shards

RECORD = "samples.json"


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of a generator family (dcgan, wgan_gp, cgan, vae, ae, ...)")
    parser.add_argument("--num", type=int, required=True, help="images to write")
    parser.add_argument("--out", required=True, help="folder for NNNNNN.png and samples.json (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--checkpoint", help="a checkpoint folder instead of the latest")
    parser.add_argument("--no-ema", action="store_true", help="the trained generator, not its EMA copy")


@dataclass
class Sampler:
    """What sample_run draws from: a run's generator or an export's (gendist export)."""

    generate: Generate  # z (N, z_dim) and the data's attribute rows (N, A) -> images in [-1, 1]
    label: str
    z_dim: int
    step: int
    source: str  # the checkpoint or export folder


def sample_run(args: argparse.Namespace) -> int:
    if args.num < 1 or args.batch_size < 1:
        raise ValueError(f"--num and --batch-size must be >= 1, got {args.num} and {args.batch_size}")
    run_dir, out = Path(args.run_dir), Path(args.out)
    accelerator = distributed.build_fp32_accelerator()
    from_export = is_export(run_dir) and not (run_dir / "config.yaml").is_file()  # a run folder is a run
    if from_export and (args.checkpoint or args.no_ema):
        raise ValueError(
            f"{run_dir} is an export: it holds one set of weights (--checkpoint and --no-ema do not apply)"
        )
    sampler, labels = (
        _export_sampler(run_dir, accelerator, args) if from_export else _run_sampler(run_dir, accelerator, args)
    )
    refusal = _refused_target(out) if accelerator.is_main_process else None
    refusal = distributed.broadcast_from_main(accelerator, refusal)
    if refusal:
        raise FileExistsError(refusal)
    accelerator.wait_for_everyone()
    noise = torch.randn(args.num, sampler.z_dim, generator=torch.Generator().manual_seed(args.seed))
    started = time.perf_counter()
    starts = list(range(0, args.num, args.batch_size))[accelerator.process_index :: accelerator.num_processes]
    device = accelerator.device
    for start in starts:
        stop = min(start + args.batch_size, args.num)
        with torch.no_grad():
            images = sampler.generate(noise[start:stop].to(device), labels[start:stop].to(device))
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for index, image in zip(range(start, stop), pixels):
            _write_png(out / f"{index:06d}.png", image)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    if accelerator.is_main_process:
        record = {
            "run": str(run_dir),
            "source": sampler.source,
            "step": sampler.step,
            "generator": sampler.label,
            "num": args.num,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "ranks": accelerator.num_processes,
            "seconds": round(seconds, 3),
        }
        (out / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        print(
            f"wrote {args.num} images of {run_dir} step {sampler.step} ({sampler.label}) to {out} in "
            f"{seconds:.1f} s: {args.num / seconds:.0f} images/s on {accelerator.num_processes} rank(s)",
            flush=True,
        )
    return 0


def _run_sampler(run_dir: Path, accelerator, args: argparse.Namespace) -> tuple[Sampler, torch.Tensor]:
    cfg = load_config(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir, args.checkpoint)
    attribute_names = trained_attribute_names(run_dir, cfg)
    sampling, state = load_sampling(cfg, checkpoint, accelerator, attribute_names, ema=not args.no_ema)
    if sampling.generate is None:
        raise ConfigError(
            f"{run_dir} is a {cfg.model.name} run, which generates no images from noise; gendist sample takes the "
            "generator families (gan, dcgan, wgan, wgan_gp, cgan, vae, ae)"
        )
    label = sampling.label + (" (trained weights, --no-ema)" if args.no_ema else "")
    sampler = Sampler(sampling.generate, label, cfg.model.z_dim, state["step"], str(checkpoint))
    return sampler, _labels(cfg, accelerator, sampling, len(attribute_names), args.num)


def _export_sampler(folder: Path, accelerator, args: argparse.Namespace) -> tuple[Sampler, torch.Tensor]:
    generate, spec = load_export(folder, accelerator.device)
    if spec["labels"]:
        raise ConfigError(
            f"{folder} is a conditional generator's export, which needs each sample's labels "
            f"({', '.join(spec['labels'])}); sample its run folder ({spec['run']}), which reads them from its data"
        )
    label = f"{spec['family']} export ({spec['weights']} weights)"
    sampler = Sampler(lambda z, attrs: generate(z), label, spec["z_dim"], spec["step"], str(folder))
    return sampler, torch.zeros(args.num, 0)


def _refused_target(out: Path) -> str | None:
    """Why `out` cannot take the images (it holds other files, or cannot be made), or None after creating it."""
    try:
        if out.exists() and any(out.iterdir()):
            return f"{out} is not empty; give a new folder (its PNG files would mix with these)"
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # said on every rank, not raised on rank 0 alone
        return f"cannot write into {out}: {err}"
    return None


def _labels(cfg, accelerator, sampling: Sampling, attributes: int, count: int) -> torch.Tensor:
    """What a conditional generator is asked for: the attribute rows of its training split (data.split),
    cycled; zeros, unused, for the others."""
    if not sampling.conditioned_on:
        return torch.zeros(count, attributes)
    rows = read_attributes(resolve_shards(cfg, accelerator), cfg.data.split, strict=False)
    return torch.from_numpy(rows[np.arange(count) % len(rows)]).float()


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """A PNG written under a temporary name and renamed: a killed run leaves no truncated image."""
    partial = path.with_name(f".{path.name}.partial")
    Image.fromarray(pixels).save(partial, format="PNG")
    os.replace(partial, path)


def run(args: argparse.Namespace) -> int:
    return distributed.run_on_every_rank(
        lambda: sample_run(args), (ConfigError, FileNotFoundError, FileExistsError, ValueError, CheckpointError)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gendist.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_sample_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

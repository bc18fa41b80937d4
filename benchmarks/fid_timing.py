"""Seconds for FID on N generated images, split into its phases, and gendist's Fréchet distance
against pytorch-fid's scipy-sqrtm one on the same 2048-d statistics.

    .venv/bin/python benchmarks/fid_timing.py --shards shards/celeba-sample64 --num-samples 10000

The generator is a DCGAN-64 (ngf 64) at its initial weights: generation costs the same as for a
trained one. Without pytorch-fid's weights (offline machines) the Inception is the random-init
network of the same architecture, so the timings hold and the FID values mean nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch
from pytorch_fid.fid_score import calculate_frechet_distance

from gendist.config import load_config
from gendist.distributed import build_accelerator
from gendist.eval.evaluator import Evaluator
from gendist.eval.metrics import feature_statistics, frechet_distance, psd_sqrt
from gendist.models.dcgan import Generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="shards/celeba-sample64")
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--num-real", type=int, default=10000)
    parser.add_argument("--inception-weights", default="random")
    args = parser.parse_args()
    accelerator = build_accelerator("no")
    stats_dir = tempfile.mkdtemp(prefix="fid-timing-")
    cfg = load_config(
        None,
        [
            f"data.shards={args.shards}",
            f"eval.num_samples={args.num_samples}",
            f"eval.num_real={args.num_real}",
            f"eval.inception_weights={args.inception_weights}",
            f"eval.stats_dir={stats_dir}",
        ],
    )
    torch.manual_seed(0)
    generator = Generator(cfg.model.z_dim, cfg.model.ngf, cfg.model.image_size).to(accelerator.device).eval()
    evaluator = Evaluator(cfg, accelerator, args.shards)
    started = time.perf_counter()
    reference = evaluator.reference()
    reference_seconds = time.perf_counter() - started
    started = time.perf_counter()
    row = evaluator.evaluate(lambda z, attrs: generator(z), 0, "DCGAN-64 at init")
    eval_seconds = time.perf_counter() - started

    half = reference.count // 2  # two real halves: realistic 2048-d covariances to take distances between
    (mu1, s1), (mu2, s2) = feature_statistics(reference.features[:half]), feature_statistics(reference.features[half:])
    started = time.perf_counter()
    ours = frechet_distance(mu1, s1, mu2, s2)
    ours_seconds = time.perf_counter() - started
    root = psd_sqrt(s1)
    started = time.perf_counter()
    frechet_distance(mu1, s1, mu2, s2, root)
    cached_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scipy_value = calculate_frechet_distance(mu1, s1, mu2, s2)
    scipy_seconds = time.perf_counter() - started

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    print(
        f"device: {device}; torch {torch.__version__}; threads {torch.get_num_threads()}; Inception: "
        f"{row['protocol']['inception']}; {args.num_samples} generated vs {reference.count} real images of "
        f"{args.shards}"
    )
    print("| phase | seconds |\n|---|---|")
    print(
        f"| reference: read + embed {reference.count} real images (once per shard set, then cached) "
        f"| {reference_seconds:.1f} |"
    )
    for phase, seconds in row["seconds"].items():
        print(f"| eval: {phase} | {seconds:.2f} |")
    print(f"| eval: total ({args.num_samples} samples) | {eval_seconds:.1f} |")
    print(f"| Fréchet, gendist (eigh), no cached root | {ours_seconds:.2f} |")
    print(f"| Fréchet, gendist (eigh), reference root cached | {cached_seconds:.2f} |")
    print(f"| Fréchet, pytorch-fid (scipy sqrtm) | {scipy_seconds:.2f} |")
    print(
        f"speed-up of the cached path over scipy: {scipy_seconds / cached_seconds:.1f}x; "
        f"values {ours:.6f} vs {scipy_value:.6f} (relative difference {abs(ours - scipy_value) / abs(scipy_value):.1e})"
    )
    print(f"FID {row['fid']:.3f}, KID {row['kid']:.5f} (meaningless with random weights)")
    assert np.isfinite(ours)


if __name__ == "__main__":
    main()

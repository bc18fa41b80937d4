"""Training throughput per model family: 1 process vs 2 processes (same per-rank batch).

    .venv/bin/python benchmarks/train_throughput.py --steps 30

Each family runs its shipped preset (configs/<family>_celeba64.yaml: widths, n_critic,
optimizer) on the embedded synthetic faces at 64x64 in fp32, through the real entry point:
`python -m gendist.train` for 1 process, `accelerate launch --config_file launch/cpu_2proc.yaml
-m gendist.train` for 2. images/s counts real images consumed (n_critic batches per generator
step; CycleGAN's batches of both domains; SRGAN's two stages apart), over all ranks, from metrics.jsonl, leaving out the
first logging window (start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "gan": "gan_celeba64",
    "dcgan": "dcgan_celeba64",
    "wgan": "wgan_clip_celeba64",
    "wgan_gp": "wgan_gp_celeba64",
    "cgan": "cgan_celeba64",
    "vae": "vae_celeba64",
    "pix2pix": "pix2pix_inpaint_celeba64",
    "cyclegan": "cyclegan_eyeglasses_celeba64",
    "classifier": "classifier_celeba64",
    "srgan_pixel": "srgan_16to64_celeba",
    "srgan_adversarial": "srgan_16to64_celeba",
}
# what a benchmark adds to its preset: its stage, and a content network that needs no trained run
# (a random-init VGG19 costs what torchvision's weights do)
EXTRA = {
    "cgan": ["model.attributes=[Male,Smiling,Blond_Hair,Eyeglasses]"],
    "srgan_pixel": ["srgan.pretrain_steps=100000", "srgan.content=none"],  # stage 1 has no content term
    "srgan_adversarial": ["srgan.pretrain_steps=0", "srgan.content=vgg19", "srgan.vgg_weights=random"],
}


def run(family: str, processes: int, steps: int, batch: int, work: Path) -> float:
    run_dir = work / f"{family}-{processes}"
    overrides = [
        f"train.run_dir={run_dir}",
        f"train.steps={steps}",
        f"train.log_every={max(1, steps // 5)}",
        "train.sample_every=100000",
        "train.checkpoint_every=100000",
        "train.mixed_precision=no",
        "eval.every=0",  # throughput of training alone (the presets evaluate every 5000 steps)
        "data.shards=synthetic",
        f"data.cache_dir={work / 'cache'}",
        f"data.batch_size={batch}",
        "data.num_workers=1",
    ]
    overrides += EXTRA.get(family, [])
    entry = ["-m", "gendist.train", "--config", str(REPO / "configs" / f"{PRESETS[family]}.yaml"), *overrides]
    if processes == 1:
        cmd = [sys.executable, *entry]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / "launch" / "cpu_2proc.yaml"),
            "--main_process_port",
            str(port),
            *entry,
        ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{family} x{processes} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return sum(r["images_per_s"] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--families", nargs="*", default=list(PRESETS))
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; batch {args.batch}/rank; "
        f"{args.steps} steps"
    )
    print("| family | 1 process images/s | 2 processes images/s | 2 vs 1 |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for family in args.families:
            one, two = (run(family, n, args.steps, args.batch, Path(work)) for n in (1, 2))
            print(f"| {family} | {one:.1f} | {two:.1f} | {two / one:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

"""The fast paths gendist turns on by default, one at a time, on the bare DCGAN-64 loop of
benchmarks/loop_overhead.py (same networks, batch, data and EMA; one process, one invocation):

    .venv/bin/python benchmarks/fast_paths.py --rounds 3

memory format (contiguous NCHW vs channels_last NHWC for weights and images) x Adam (torch's
default implementation vs fused=True). Figures: real images/s after 2 warm-up steps, median over
rounds (variants interleaved), and the ratio to contiguous + default Adam (what a hand-written loop
does). On a GPU it also runs bf16.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics

import torch
from loop_overhead import REPO, bare_rate, read_batches

from gendist.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="steps per measurement, 2 of them warm-up")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"

    def config(channels_last: bool, bf16: bool):
        return load_config(
            REPO / "configs" / "dcgan_celeba64.yaml",
            [
                f"train.channels_last={channels_last}",
                f"train.mixed_precision={'bf16' if bf16 else 'no'}",
                f"train.steps={args.steps}",
                "train.log_every=2",
                "data.shards=synthetic",
                f"data.batch_size={args.batch}",
            ],
        )

    batches = read_batches(config(True, False), args.steps, device)  # NHWC, as the loader yields them
    layouts = {True: batches, False: [b.contiguous() for b in batches]}
    variants = list(
        itertools.product([False, True], [False, True], [False, True] if device.type == "cuda" else [False])
    )
    rates: dict[tuple, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved, so drifts of the machine hit every variant alike
        for channels_last, fused, bf16 in variants:
            rate = bare_rate(config(channels_last, bf16), layouts[channels_last], device, fused_adam=fused)
            rates[(channels_last, fused, bf16)].append(rate)
    print(
        f"DCGAN-64 bare loop, batch {args.batch}, {name}, torch {torch.__version__}, "
        f"{args.rounds} rounds of {args.steps - 2} measured steps"
    )
    print(
        "| memory format | Adam | precision | images/s (median) | vs contiguous, default Adam |\n|---|---|---|---|---|"
    )
    for (channels_last, fused, bf16), values in rates.items():
        base = statistics.median(rates[(False, False, bf16)])
        rate = statistics.median(values)
        print(
            f"| {'channels_last' if channels_last else 'contiguous'} | {'fused' if fused else 'default'} | "
            f"{'bf16' if bf16 else 'fp32'} | {rate:.1f} | {rate / base:.2f}x |"
        )


if __name__ == "__main__":
    main()

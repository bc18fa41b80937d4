"""The fast paths gendist turns on by default, one at a time, on a bare DCGAN training step (same
networks, batch and data; one process, one invocation):

    .venv/bin/python benchmarks/fast_paths.py --rounds 3

memory format (contiguous NCHW vs channels_last NHWC for weights and images) x Adam (the default
implementation vs fused=True). Figures: steps/s after 2 warm-up steps, median over rounds, and the
ratio to contiguous + default Adam (what a hand-written loop does). On a GPU it also runs bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from gendist.config import load_config
from gendist.training.gan import build_networks


def steps_per_second(channels_last: bool, fused: bool, bf16: bool, batch: int, steps: int, device: torch.device) -> float:
    cfg = load_config(None, [f"train.channels_last={channels_last}"])
    torch.manual_seed(0)
    generator, critic = (net.to(device) for net in build_networks(cfg, 0))
    real = torch.randn(batch, 3, 64, 64, device=device)
    if channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999), fused=fused or None)
    opt_d = torch.optim.Adam(critic.parameters(), 2e-4, betas=(0.5, 0.999), fused=fused or None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for step in range(steps + 2):
        if step == 2:
            synchronize(device)
            started = time.perf_counter()
        with autocast:
            fake = generator(torch.randn(batch, 100, device=device))
            loss_d = F.softplus(-critic(real).float()).mean() + F.softplus(critic(fake.detach()).float()).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        critic.requires_grad_(False)
        with autocast:
            loss_g = F.softplus(-critic(fake).float()).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        critic.requires_grad_(True)
    synchronize(device)
    return steps / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    variants = list(itertools.product([False, True], [False, True], [False, True] if device.type == "cuda" else [False]))
    rates: dict[tuple, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved, so drifts of the machine hit every variant alike
        for variant in variants:
            rates[variant].append(steps_per_second(*variant, args.batch, args.steps, device))
    print(f"DCGAN-64 step, batch {args.batch}, {name}, torch {torch.__version__}, {args.rounds} rounds of {args.steps} steps")
    print("| memory format | Adam | precision | steps/s (median) | vs contiguous, default Adam |\n|---|---|---|---|---|")
    for (channels_last, fused, bf16), values in rates.items():
        base = statistics.median(rates[(False, False, bf16)])
        rate = statistics.median(values)
        print(f"| {'channels_last' if channels_last else 'contiguous'} | {'fused' if fused else 'default'} | "
              f"{'bf16' if bf16 else 'fp32'} | {rate:.3f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()

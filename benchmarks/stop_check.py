"""Cost of the per-step stop check (distributed.any_rank: one integer all-reduced on the CPU) against the
gradient all-reduce that data-parallel DCGAN-64 training does every step, in the same processes.

    .venv/bin/torchrun --nproc_per_node 2 benchmarks/stop_check.py --repeats 200

The baseline all-reduces one flat tensor the size of the generator's and the discriminator's
parameters (what DDP's buckets carry per step); both are timed over the same world.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as torch_dist

from gendist import distributed
from gendist.config import load_config
from gendist.families.gan import build_networks


def timed(fn, repeats: int) -> float:
    """Median seconds of one call (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    samples = []
    for _ in range(repeats):
        torch_dist.barrier()
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    accelerator = distributed.build_accelerator("no")
    generator, critic = build_networks(load_config("configs/dcgan_celeba64.yaml", ["eval.every=0"]), 0)
    count = sum(p.numel() for net in (generator, critic) for p in net.parameters())
    gradients = torch.zeros(count, device=accelerator.device)
    check = timed(lambda: distributed.any_rank(accelerator, False), args.repeats)
    reduce = timed(lambda: torch_dist.all_reduce(gradients), args.repeats)
    if accelerator.is_main_process:
        print(
            f"{accelerator.num_processes} processes on {accelerator.device}, {torch_dist.get_backend()}: "
            f"stop check {check * 1e6:.0f} us, gradient all-reduce of {count:,} floats {reduce * 1e3:.2f} ms, "
            f"ratio {check / reduce:.4f}"
        )
    distributed.shutdown()


if __name__ == "__main__":
    main()

"""Two processes against one on this machine (same per-rank batch), and the time each step spends
in the gradient all-reduce, for DCGAN-64 through gendist's own training loop.

    .venv/bin/python benchmarks/data_parallel.py --steps 40

Each world size is one launch of this script (torchrun, gloo on CPU / NCCL on GPUs). images/s:
real images consumed per second over all ranks, from the run's logging windows after the first.
All-reduce time: torch.profiler over `--profiled` steps after those windows, summing the duration of
the backend's all_reduce events (the collectives DDP issues for G's and D's gradient buckets, run
on the communication thread, partly under the backward); per step, per rank, mean over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(out: Path, profiled: int, overrides: list[str]) -> None:
    import torch
    import torch.distributed as torch_dist
    from torch.profiler import ProfilerActivity, profile

    from gendist import distributed
    from gendist.config import load_config
    from gendist.training.loop import train
    from gendist.training.session import Session

    cfg = load_config(REPO / "configs" / "dcgan_celeba64.yaml", overrides)
    last_unprofiled = cfg.train.steps - profiled
    profiler = profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    )
    step_done = Session.step_done

    def profiled_step_done(session: Session, values: dict) -> None:
        step_done(session, values)
        if session.state.step == last_unprofiled:  # the steps after it are profiled
            profiler.start()
        elif session.state.step == cfg.train.steps:
            profiler.stop()

    Session.step_done = profiled_step_done
    train(cfg)
    reduce_us = sum(
        e.cpu_time_total + getattr(e, "device_time_total", 0)
        for e in profiler.key_averages()
        if "all_reduce" in e.key and ":" in e.key
    )  # gloo:all_reduce / nccl:all_reduce
    rows = [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    (out / f"rank{rank}.json").write_text(json.dumps({"reduce_s_per_step": reduce_us / 1e6 / profiled, "rows": rows}))
    distributed.shutdown()


def run(processes: int, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"x{processes}"
    out.mkdir()
    logged = args.steps - args.profiled
    overrides = [
        f"train.run_dir={out / 'run'}",
        f"train.steps={args.steps}",
        f"train.log_every={logged // 4}",
        "train.sample_every=100000",
        "train.checkpoint_every=100000",
        "train.mixed_precision=no",
        "data.shards=synthetic",
        f"data.batch_size={args.batch}",
        "data.num_workers=1",
        "eval.every=0",
    ]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = str(max(1, (os.cpu_count() or 2) // processes))
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
        __file__,
        "--worker",
        str(out),
        str(args.profiled),
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if proc.returncode != 0 or len(ranks) != processes:
        sys.exit(f"{processes} processes failed:\n{proc.stderr[-3000:]}")
    rows = [r for r in ranks[0]["rows"] if r["step"] <= logged][1:]
    images_per_s = statistics.harmonic_mean([r["images_per_s"] for r in rows])  # equal-sized windows
    step_s = args.batch * processes / images_per_s
    reduce_s = sum(r["reduce_s_per_step"] for r in ranks) / processes
    return {"images_per_s": images_per_s, "step_s": step_s, "reduce_s": reduce_s, "threads": threads}


def main() -> None:
    if "--worker" in sys.argv:
        index = sys.argv.index("--worker")
        worker(Path(sys.argv[index + 1]), int(sys.argv[index + 2]), sys.argv[index + 3 :])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="generator steps per run, profiled ones included")
    parser.add_argument("--profiled", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        one, two = (run(n, args, Path(work)) for n in (1, 2))
    print(f"DCGAN-64 (ngf = ndf = 64), fp32, batch {args.batch} per rank, embedded synthetic faces")
    print("| processes | threads each | images/s | s per step | all-reduce s per step | all-reduce share |")
    print("|---|---|---|---|---|---|")
    for n, r in ((1, one), (2, two)):
        print(
            f"| {n} | {r['threads']} | {r['images_per_s']:.1f} | {r['step_s']:.3f} | {r['reduce_s']:.4f} | "
            f"{r['reduce_s'] / r['step_s'] * 100:.1f}% |"
        )
    print(f"2 vs 1 processes: {two['images_per_s'] / one['images_per_s']:.2f}x images/s")


if __name__ == "__main__":
    main()

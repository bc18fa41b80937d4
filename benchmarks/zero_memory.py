"""Memory per rank of a wide DCGAN under the plain backend (DDP) and DeepSpeed ZeRO-1 / ZeRO-2, in one
command (each backend is its own 2-rank launch of this script):

    .venv/bin/python benchmarks/zero_memory.py --ngf 256 --steps 3            (CPU: gloo ranks)
    .venv/bin/python benchmarks/zero_memory.py --ngf 512 --gpu --processes 8  (one node's GPUs)

A rank's figures are its peak memory over training steps 2..N (set-up and the first step, which
allocates gradients, buckets and optimizer state, are behind it), and that peak once the last
step's checkpoint is written: on GPUs torch.cuda's peak allocated bytes, on CPUs the peak resident
set less the resident set just before the networks were built, so the Python, torch and DeepSpeed
runtime common to every backend is left out. Ratios are against DDP from the same command. Eval is
off.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH_CONFIGS = {"ddp": "cpu_2proc.yaml", "zero1": "ds_zero1.yaml", "zero2": "ds_zero2.yaml"}


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Start a new peak at the current resident set, after handing freed heap back to the OS (so
    the set-up's temporary copies, e.g. DeepSpeed flattening the parameters, are not counted)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def worker(out: Path, overrides: list[str]) -> None:
    import torch
    import torch.distributed as torch_dist

    from gendist import distributed
    from gendist.config import load_config
    from gendist.training.checkpointing import Checkpointed
    from gendist.training.loop import train
    from gendist.training.session import Session

    on_gpu = torch.cuda.is_available()
    step_done = Session.step_done

    def measured_step_done(session: Session, values: dict) -> None:
        step_done(session, values)
        if session.state.step == 1:  # the training steps that follow set the peak
            torch.cuda.reset_peak_memory_stats() if on_gpu else reset_peak_rss()

    def peak() -> int:
        return torch.cuda.max_memory_allocated() if on_gpu else rss_bytes("VmHWM") - before

    save = Checkpointed.save
    peaks: dict[str, int] = {}

    def measured_save(checkpointed: Checkpointed) -> None:
        peaks["steps"] = peak()  # the last step's checkpoint comes after its optimizer steps
        save(checkpointed)

    Session.step_done, Checkpointed.save = measured_step_done, measured_save
    before = rss_bytes("VmRSS")
    result = train(load_config(None, overrides))
    peaks["with_save"] = peak()
    params = sum(p.numel() for net in (result["generator"], result["discriminator"]) for p in net.parameters())
    kind = "cuda max_memory_allocated" if on_gpu else "peak RSS less the RSS before the networks were built"
    rank = torch_dist.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, **peaks, "kind": kind, "params": params}))
    distributed.shutdown()


def run_backend(backend: str, args: argparse.Namespace, shards: str, scratch: Path) -> list[dict]:
    out = scratch / backend
    out.mkdir()
    config = LAUNCH_CONFIGS[backend]
    if args.gpu and backend == "ddp":
        config = "multi_gpu.yaml"
    overrides = [
        f"model.ngf={args.ngf}",
        f"model.ndf={args.ngf}",
        f"model.image_size={args.image_size}",
        f"data.batch_size={args.batch_size}",
        f"train.steps={args.steps}",
        f"train.run_dir={out / 'run'}",
        f"data.shards={shards}",
        "data.num_workers=1",
        "train.log_every=1",
        "eval.every=0",
        f"train.mixed_precision={args.precision}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / "launch" / config),
        "--num_processes",
        str(args.processes),
        "--main_process_port",
        str(args.port),
        __file__,
        "--worker",
        str(out),
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    ranks = sorted(out.glob("rank*.json"))
    if proc.returncode != 0 or len(ranks) != args.processes:
        sys.exit(f"{backend} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in ranks]


def main() -> None:
    if "--worker" in sys.argv:
        index = sys.argv.index("--worker")
        worker(Path(sys.argv[index + 1]), sys.argv[index + 2 :])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngf", type=int, default=256, help="generator and discriminator width (ndf = ngf)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--gpu", action="store_true", help="DDP through launch/multi_gpu.yaml (NCCL) instead of gloo")
    parser.add_argument("--shards", default="synthetic", help="data.shards (default: the embedded synthetic set)")
    parser.add_argument("--port", type=int, default=29731)
    parser.add_argument("--backends", default="ddp,zero1,zero2")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for backend in args.backends.split(","):
            results[backend] = run_backend(backend, args, args.shards, Path(scratch))
    first = next(iter(results.values()))[0]
    print(
        f"DCGAN ngf=ndf={args.ngf}, {args.image_size}px, {first['params']:,} parameters (G + D), "
        f"{args.processes} ranks, batch {args.batch_size}/rank, precision {args.precision}; per rank, MiB: "
        f"{first['kind']}, over steps 2..{args.steps} and then with the final checkpoint"
    )
    baseline = next(iter(results))
    worst = {
        backend: {key: max(r[key] for r in ranks) for key in ("steps", "with_save")}
        for backend, ranks in results.items()
    }
    for backend, ranks in results.items():
        steps = ", ".join(f"{r['steps'] / 2**20:.0f}" for r in ranks)
        print(
            f"  {backend:6s} steps: {steps} (max {worst[backend]['steps'] / 2**20:.0f}, "
            f"{worst[backend]['steps'] / worst[baseline]['steps']:.2f} x {baseline})   "
            f"with the checkpoint: max {worst[backend]['with_save'] / 2**20:.0f} "
            f"({worst[backend]['with_save'] / worst[baseline]['with_save']:.2f} x {baseline})"
        )


if __name__ == "__main__":
    main()

"""GPU speed (issue 20): DCGAN-64 and WGAN-GP-64 training images/s, eager against `train.compile`,
beside the pytorch/examples DCGAN recipe, the loader alone, and the FID-10k phases; one command.

    .venv/bin/python benchmarks/gpu_throughput.py                                  # on a GPU
    .venv/bin/python benchmarks/gpu_throughput.py --batches 64 --fid-samples 500   # on CPU (about 15 min)

Training: gendist's one loop (`train`) on the family's preset (configs/*_celeba64.yaml) over the
embedded synthetic faces (or `--shards`), bf16 on a GPU and fp32 on CPU, trackers off, grids and
checkpoints outside the measured steps. Variants: eager, `train.compile=default`, and on a GPU
`train.compile=reduce-overhead` (CUDA graphs). The first two logging windows (start-up and
compilation) are not measured; the figure is real images consumed per second over the others
(batch x n_critic per generator step), the median over rounds whose variant order alternates.

The anchor for DCGAN is the pytorch/examples recipe (github.com/pytorch/examples, dcgan/main.py),
reimplemented here: torchvision ImageFolder over PNG files + Resize/CenterCrop/ToTensor/Normalize,
a shuffled DataLoader, its loop (D on real and on fake.detach() with BCE, then G through D), fp32,
no AMP, NCHW, with gendist's DCGAN networks (the same architecture; BCE with logits stands in for
its Sigmoid + BCELoss). WGAN-GP has no such recipe: its anchor is gendist eager.

Loader: batches per second that gendist's loader (one epoch's DataLoader over the shards, the copy
to the device and the normalisation there) and the ImageFolder recipe deliver, per worker count.

FID: benchmarks/fid_timing.py's phases for `--fid-samples` generated images, run as a subprocess
(random-init Inception: the timings hold, the values mean nothing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.state import AcceleratorState

from gendist.config import load_config
from gendist.data.loader import ShardStream, StreamSpec, make_loader
from gendist.models.dcgan import Discriminator, Generator
from gendist.training.loop import train
from gendist.training.stream import resolve_shards

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"dcgan": "dcgan_celeba64", "wgan_gp": "wgan_gp_celeba64"}
WARMUP_WINDOWS = 2  # start-up and compilation


def gendist_rate(family: str, batch: int, compile_mode: str, args: argparse.Namespace, run_dir: Path) -> float:
    """Real images/s of gendist's loop over the logging windows after the warm-up ones."""
    log_every = args.log_every
    steps = log_every * (WARMUP_WINDOWS + args.windows)
    cfg = load_config(
        REPO / "configs" / f"{PRESETS[family]}.yaml",
        [
            f"train.run_dir={run_dir}",
            f"train.steps={steps}",
            f"train.log_every={log_every}",
            f"train.sample_every={steps}",
            f"train.checkpoint_every={steps}",
            f"train.mixed_precision={args.precision}",
            f"train.compile={compile_mode}",
            "train.trackers=[]",
            f"data.shards={args.shards}",
            f"data.batch_size={batch}",
            f"data.num_workers={args.workers}",
            "eval.every=0",
        ],
    )
    try:
        train(cfg)
    finally:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        torch._dynamo.reset()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [(b["images_seen"] - a["images_seen"], b["images_per_s"]) for a, b in zip(rows, rows[1:])]
    windows = windows[WARMUP_WINDOWS - 1 :]  # rows[0] closes the first window
    return sum(n for n, _ in windows) / sum(n / rate for n, rate in windows)


def write_image_folder(shards: str, folder: Path, count: int) -> Path:
    """`count` faces of the shards as PNG files in folder/0/ (ImageFolder wants a class folder)."""
    from PIL import Image

    images = folder / "0"
    images.mkdir(parents=True)
    spec = StreamSpec(shards, "train", 256, 64)
    written = 0
    for batch in ShardStream(spec):
        for image in batch["images"].permute(0, 2, 3, 1).numpy():
            Image.fromarray(image).save(images / f"{written:06d}.png")
            written += 1
            if written == count:
                return folder
    return folder


def examples_loader(folder: Path, batch: int, workers: int) -> torch.utils.data.DataLoader:
    import torchvision.datasets as dset
    import torchvision.transforms as transforms

    dataset = dset.ImageFolder(
        root=str(folder),
        transform=transforms.Compose(
            [
                transforms.Resize(64),
                transforms.CenterCrop(64),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        ),
    )
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )


def examples_rate(folder: Path, batch: int, args: argparse.Namespace, device: torch.device) -> float:
    """The pytorch/examples DCGAN loop: real images/s after its first `log_every * WARMUP_WINDOWS` steps."""
    torch.manual_seed(0)
    net_g, net_d = Generator(100, 64, 64).to(device), Discriminator(64, 64).to(device)
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    warmup, measured = args.log_every * WARMUP_WINDOWS, args.log_every * args.windows
    loader, step, started = examples_loader(folder, batch, args.workers), 0, 0.0
    while step < warmup + measured:
        for real, _ in loader:
            if step == warmup:
                synchronize(device)
                started = time.perf_counter()
            real = real.to(device)
            ones, zeros = torch.ones(batch, device=device), torch.zeros(batch, device=device)
            net_d.zero_grad()
            F.binary_cross_entropy_with_logits(net_d(real), ones).backward()
            fake = net_g(torch.randn(batch, 100, 1, 1, device=device))
            F.binary_cross_entropy_with_logits(net_d(fake.detach()), zeros).backward()
            opt_d.step()
            net_g.zero_grad()
            F.binary_cross_entropy_with_logits(net_d(fake), ones).backward()
            opt_g.step()
            step += 1
            if step == warmup + measured:
                break
    synchronize(device)
    return measured * batch / (time.perf_counter() - started)


def loader_rates(
    shards: str, folder: Path, batch: int, workers: int, device: torch.device, measured: int = 40
) -> tuple[float, float]:
    """Images/s to the device, as floats in [-1, 1], over `measured` batches after the first three
    (workers starting): gendist's loader, then the ImageFolder recipe's."""
    spec = StreamSpec(shards, "train", batch, 64)
    rates = []
    for loader in (make_loader(spec, workers), examples_loader(folder, batch, workers)):
        count, started = 0, None
        for index, item in enumerate(loader):
            images = item["images"] if isinstance(item, dict) else item[0]
            images = images.to(device, non_blocking=True).float()
            if isinstance(item, dict):
                images = images.div_(127.5).sub_(1.0)
            if index == 2:  # workers started
                synchronize(device)
                started = time.perf_counter()
            elif index > 2:
                count += len(images)
            if index == 2 + measured:
                break
        synchronize(device)
        rates.append(count / (time.perf_counter() - started))
    return rates[0], rates[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--families", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--batches", nargs="*", type=int, default=[128, 256, 512, 1024] if cuda else [64])
    parser.add_argument("--precision", choices=["no", "bf16"], default="bf16" if cuda else "no")
    parser.add_argument("--shards", default="synthetic", help="a shard folder, or the embedded synthetic faces")
    parser.add_argument("--workers", type=int, default=8 if cuda else 1, help="loader workers of each training run")
    parser.add_argument("--loader-workers", nargs="*", type=int, default=[1, 2, 4, 8] if cuda else [1])
    parser.add_argument("--log-every", type=int, default=50 if cuda else 5, help="steps per logging window")
    parser.add_argument("--windows", type=int, default=4 if cuda else 3, help="measured windows per run")
    parser.add_argument("--rounds", type=int, default=3 if cuda else 1)
    parser.add_argument("--images", type=int, default=8192 if cuda else 2048, help="PNG files for ImageFolder")
    parser.add_argument("--fid-samples", type=int, default=10000)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; command: {' '.join(sys.argv)}", flush=True)
    variants = ["no", "default"] + (["reduce-overhead"] if cuda else [])
    shards = resolve_shards(load_config(None, [f"data.shards={args.shards}"]), PartialState())
    PartialState._reset_state()

    with tempfile.TemporaryDirectory() as work:
        folder = write_image_folder(shards, Path(work) / "faces", args.images)
        print(
            f"\n| family | batch | pytorch/examples recipe | eager | compiled | "
            f"{'compiled + CUDA graphs | ' if cuda else ''}compiled vs eager | best vs anchor |"
        )
        print("|---|---|---|---|---|" + ("---|" if cuda else "") + "---|---|")
        for family in args.families:
            for batch in args.batches:
                rates: dict[str, list[float]] = {variant: [] for variant in ["examples", *variants]}
                for round_index in range(args.rounds):
                    order = variants if round_index % 2 == 0 else list(reversed(variants))
                    if family == "dcgan":
                        rates["examples"].append(examples_rate(folder, batch, args, device))
                    for variant in order:
                        run_dir = Path(work) / f"{family}-{batch}-{variant}-{round_index}"
                        rates[variant].append(gendist_rate(family, batch, variant, args, run_dir))
                median = {variant: statistics.median(r) for variant, r in rates.items() if r}
                anchor = median.get("examples", median["no"])
                best = max(median[variant] for variant in variants)
                cells = [f"{median[variant]:.0f}" for variant in ["examples", *variants] if variant in median]
                recipe = "" if "examples" in median else "- | "
                print(
                    f"| {family} | {batch} | {recipe}{' | '.join(cells)} | {median['default'] / median['no']:.2f}x "
                    f"| {best / anchor:.2f}x |",
                    flush=True,
                )

        print("\n| loader workers | gendist loader images/s | ImageFolder recipe images/s | ratio |\n|---|---|---|---|")
        for workers in args.loader_workers:
            ours, theirs = loader_rates(shards, folder, args.batches[0], workers, device)
            print(f"| {workers} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.1f}x |", flush=True)

    print(f"\nFID phases, {args.fid_samples} generated images (benchmarks/fid_timing.py):", flush=True)
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "fid_timing.py"),
            f"--shards={shards}",
            f"--num-samples={args.fid_samples}",
            f"--num-real={args.fid_samples}",
        ],
        check=True,
    )


if __name__ == "__main__":
    main()

"""Loop overhead: gendist's GAN training against a bare hand-written PyTorch loop with the same
networks, batch, optimizer, EMA and precision, in one process and one invocation.

    .venv/bin/python benchmarks/loop_overhead.py                 # DCGAN-64 and WGAN-GP-64, CPU fp32
    .venv/bin/python benchmarks/loop_overhead.py --precision bf16 --batch 128   # on a GPU

gendist runs its one training loop (`train`) on the family's preset (configs/*_celeba64.yaml) over the embedded
synthetic faces: its loader (one worker), metrics, progress lines, TensorBoard (and the same run
with train.trackers=[], to show the tracker's cost), and one sample grid and one
checkpoint inside the measured steps (the presets write them every 500 and 1000 steps, so this
overstates their share). The baseline loops over batches read into memory beforehand (no loader
at all) and does what a careful hand-written loop does: the same losses, the critic frozen in the
generator step, the generator's fake reused from the last critic step, an EMA by foreach lerp.
Both skip their first logging window (start-up, allocator warm-up). Rounds alternate baseline and
gendist; each figure is the median over rounds of real images consumed per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gendist.config import load_config
from gendist.data.loader import ShardStream
from gendist.distributed import seed_everything
from gendist.families.gan import build_networks
from gendist.training.loop import train
from gendist.training.stream import resolve_shards

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"dcgan": "dcgan_celeba64", "wgan_gp": "wgan_gp_celeba64"}


def family_config(
    family: str, args: argparse.Namespace, run_dir: Path, log_every: int, trackers: str = "[tensorboard]"
):
    steps = log_every * (args.windows + 1)
    middle = log_every * (args.windows // 2 + 1)  # one grid and one checkpoint inside the measured windows
    return load_config(
        REPO / "configs" / f"{PRESETS[family]}.yaml",
        [
            f"train.run_dir={run_dir}",
            f"train.steps={steps}",
            f"train.log_every={log_every}",
            f"train.sample_every={middle}",
            f"train.checkpoint_every={middle}",
            f"train.mixed_precision={args.precision}",
            "data.shards=synthetic",
            f"data.batch_size={args.batch}",
            "data.num_workers=1",
            "eval.every=0",
            f"train.trackers={trackers}",
        ],
    )


def gendist_rate(cfg) -> float:
    """Real images/s over every logging window but the first, from the run's metrics.jsonl."""
    train(cfg)
    rows = [json.loads(line) for line in (Path(cfg.train.run_dir) / "metrics.jsonl").read_text().splitlines()]
    windows = [(b["images_seen"] - a["images_seen"], b["images_per_s"]) for a, b in zip(rows, rows[1:])]
    return sum(n for n, _ in windows) / sum(n / rate for n, rate in windows)


def bare_rate(cfg, batches: list[torch.Tensor], device: torch.device, fused_adam: bool = False) -> float:
    """The hand-written loop: same networks (same seed), Adam, losses and EMA as gendist's; real
    images/s after the first `train.log_every` steps."""
    seed_everything(cfg.train.seed)
    generator, critic = (net.to(device) for net in build_networks(cfg, 0))
    ema = [p.detach().clone() for p in generator.parameters()]
    betas, fused = tuple(cfg.optim.betas), fused_adam or None
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.optim.lr_g, betas=betas, fused=fused)
    opt_d = torch.optim.Adam(critic.parameters(), lr=cfg.optim.lr_d, betas=betas, fused=fused)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.mixed_precision == "bf16"
        else contextlib.nullcontext()
    )
    wasserstein, n_critic, batch = cfg.model.name == "wgan_gp", cfg.loss.n_critic, cfg.data.batch_size
    warmup_steps, started = cfg.train.log_every, 0.0
    for step in range(cfg.train.steps):
        if step == warmup_steps:
            synchronize(device)
            started = time.perf_counter()
        for k in range(n_critic):
            real = batches[(step * n_critic + k) % len(batches)]
            z = torch.randn(batch, cfg.model.z_dim, device=device)
            with torch.set_grad_enabled(k == n_critic - 1), autocast:
                fake = generator(z)
            with autocast:
                real_out, fake_out = critic(real).float(), critic(fake.detach()).float()
            if wasserstein:
                loss_d = fake_out.mean() - real_out.mean()
                alpha = torch.rand(batch, 1, 1, 1, device=device)
                mixed = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
                with autocast:
                    scores = critic(mixed).float()
                (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
                loss_d = loss_d + cfg.loss.gp_weight * ((grads.float().flatten(1).norm(dim=1) - 1) ** 2).mean()
            else:
                loss_d = F.softplus(-real_out).mean() + F.softplus(fake_out).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        critic.requires_grad_(False)
        with autocast:
            fake_out = critic(fake).float()
        loss_g = -fake_out.mean() if wasserstein else F.softplus(-fake_out).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        critic.requires_grad_(True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(generator.parameters()), 1 - cfg.train.ema_decay)
    synchronize(device)
    measured = cfg.train.steps - warmup_steps
    return measured * n_critic * batch / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def read_batches(cfg, count: int, device: torch.device) -> list[torch.Tensor]:
    """`count` batches of the same shards, as floats in [-1, 1] on the device (as gendist feeds them)."""
    from accelerate import PartialState

    from gendist.data.loader import StreamSpec

    shards = resolve_shards(cfg, PartialState())
    spec = StreamSpec(shards, "train", cfg.data.batch_size, cfg.model.image_size, seed=cfg.train.seed)
    batches = []
    while len(batches) < count:
        for batch in ShardStream(spec):
            batches.append(batch["images"].to(device).float().div_(127.5).sub_(1.0))
            if len(batches) == count:
                break
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(PRESETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--windows", type=int, default=3, help="measured logging windows per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU"
    print(
        f"{name}, torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
        f"precision {args.precision}, {args.rounds} rounds"
    )
    print(
        "| family | bare loop images/s | gendist images/s | gendist vs bare | gendist without trackers images/s "
        "| TensorBoard's cost |\n|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as work:
        for family in args.families:
            log_every = 10 if family == "dcgan" else 2
            probe = family_config(family, args, Path(work) / "probe", log_every)
            batches = read_batches(probe, min(64, probe.train.steps * probe.loss.n_critic), device)
            bare, ours, untracked = [], [], []
            for round_index in range(args.rounds):
                bare.append(bare_rate(probe, batches, device))
                runs = [(ours, "[tensorboard]", "tracked"), (untracked, "[]", "untracked")]
                for rates, trackers, kind in runs if round_index % 2 == 0 else reversed(runs):  # alternate the order
                    run_dir = Path(work) / f"{family}-{round_index}-{kind}"
                    config = family_config(family, args, run_dir, log_every, trackers)
                    rates.append(gendist_rate(config))
            b, g, u = (statistics.median(rates) for rates in (bare, ours, untracked))
            print(
                f"| {family} | {b:.1f} | {g:.1f} | {g / b:.3f} ({(1 - g / b) * 100:+.1f}% slower) | {u:.1f} "
                f"| {(1 - g / u) * 100:+.1f}% |",
                flush=True,
            )
            print(
                f"  rounds: bare {', '.join(f'{r:.1f}' for r in bare)}; gendist {', '.join(f'{r:.1f}' for r in ours)}; "
                f"without trackers {', '.join(f'{r:.1f}' for r in untracked)}"
            )


if __name__ == "__main__":
    main()

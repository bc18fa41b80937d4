"""The GAN training loop (DCGAN today): one D step and one G step per iteration, on Accelerate.

G and D are wrapped for data parallelism separately. The D step makes two forwards (real, fake)
and one backward; the G step runs D frozen and outside gradient sync, so only G's gradients are
all-reduced. Logged values are means over ranks, never rank 0's alone.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from gendist import dist
from gendist.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from gendist.config import RunConfig
from gendist.losses.gan import d_nonsaturating, g_nonsaturating
from gendist.models.dcgan import Discriminator, Generator
from gendist.reporting import Reporter
from gendist.training.common import TrainState, batches_from, prepare_run_dir, resolve_shards, stream_spec


@dataclass
class GanResult:
    generator: nn.Module
    discriminator: nn.Module
    state: TrainState
    run_dir: Path


@contextlib.contextmanager
def frozen(model: nn.Module):
    """No parameter gradients for `model` inside (inputs still get theirs)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def train_gan(cfg: RunConfig) -> GanResult:
    accelerator = dist.build_accelerator(cfg.train.mixed_precision)
    run_dir = prepare_run_dir(cfg, accelerator)
    shard_dir = resolve_shards(cfg, accelerator)
    spec = stream_spec(cfg, shard_dir, accelerator)

    dist.seed_everything(cfg.train.seed)  # identical initial weights on every rank
    generator = Generator(cfg.model.z_dim, cfg.model.ngf, cfg.model.image_size)
    discriminator = Discriminator(cfg.model.ndf, cfg.model.image_size)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.optim.lr_g, betas=cfg.optim.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.optim.lr_d, betas=cfg.optim.betas)
    generator, discriminator, opt_g, opt_d = accelerator.prepare(generator, discriminator, opt_g, opt_d)
    fixed_noise = torch.randn(cfg.train.num_samples, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.train.seed))
    dist.seed_everything(cfg.train.seed, accelerator)  # a distinct noise stream per rank

    state = TrainState()
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        shared, rng = load_checkpoint(checkpoint, accelerator.process_index)
        accelerator.unwrap_model(generator).load_state_dict(shared["generator"])
        accelerator.unwrap_model(discriminator).load_state_dict(shared["discriminator"])
        opt_g.load_state_dict(shared["opt_g"])
        opt_d.load_state_dict(shared["opt_d"])
        if accelerator.scaler is not None and "scaler" in shared:
            accelerator.scaler.load_state_dict(shared["scaler"])
        state.load_state_dict(shared["train_state"])
        if rng is not None:
            set_rng_state(rng)
        dist.rank_print(accelerator, f"resumed from {checkpoint} at step {state.step}")

    def save() -> None:
        dist.average_buffers(accelerator, generator)
        dist.average_buffers(accelerator, discriminator)
        shared = {
            "generator": accelerator.unwrap_model(generator).state_dict(),
            "discriminator": accelerator.unwrap_model(discriminator).state_dict(),
            "opt_g": opt_g.state_dict(),
            "opt_d": opt_d.state_dict(),
            "train_state": state.state_dict(),
            "world_size": accelerator.num_processes,
        }
        if accelerator.scaler is not None:
            shared["scaler"] = accelerator.scaler.state_dict()
        save_checkpoint(accelerator, run_dir, state.step, shared, cfg.train.keep_checkpoints)

    def sample_grid() -> None:
        dist.average_buffers(accelerator, generator)
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(generator)
            model.eval()
            with torch.no_grad():
                images = model(fixed_noise.to(accelerator.device)).float()
            model.train()
            save_image(images, run_dir / "samples" / f"step_{state.step:07d}.png", nrow=8, normalize=True, value_range=(-1, 1))

    reporter = Reporter(run_dir, cfg.train.steps, state.step, accelerator.is_main_process)
    sums = {name: torch.zeros((), device=accelerator.device) for name in ("loss_d", "loss_g", "d_real", "d_fake")}
    data_errors = torch.zeros((), device=accelerator.device)
    window_steps, window_start = 0, time.perf_counter()
    batches = batches_from(spec, cfg.data.num_workers, state, accelerator.device)
    global_batch = cfg.data.batch_size * accelerator.num_processes

    while state.step < cfg.train.steps:
        batch = next(batches)
        real = batch["images"]
        fake = generator(torch.randn(real.shape[0], cfg.model.z_dim, device=accelerator.device))

        real_logits, fake_logits = discriminator(real), discriminator(fake.detach())
        loss_d = d_nonsaturating(real_logits, fake_logits)
        opt_d.zero_grad(set_to_none=True)
        accelerator.backward(loss_d)
        opt_d.step()

        with frozen(discriminator), accelerator.no_sync(discriminator):
            loss_g = g_nonsaturating(discriminator(fake))
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss_g)
        opt_g.step()

        state.step += 1
        state.images_seen += global_batch
        window_steps += 1
        sums["loss_d"] += loss_d.detach()
        sums["loss_g"] += loss_g.detach()
        sums["d_real"] += torch.sigmoid(real_logits.detach().float()).mean()
        sums["d_fake"] += torch.sigmoid(fake_logits.detach().float()).mean()
        data_errors += batch["errors"]

        last = state.step == cfg.train.steps
        if state.step % cfg.train.log_every == 0 or last:
            means = dist.mean_across_ranks(accelerator, {k: v / window_steps for k, v in sums.items()})
            errors = accelerator.reduce(data_errors.clone(), reduction="sum").item()
            seconds = time.perf_counter() - window_start
            state.train_seconds += seconds
            reporter.log(state.step, {**means, "images_per_s": window_steps * global_batch / seconds,
                                      "data_errors": int(errors), "epoch": state.epoch, "images_seen": state.images_seen})
            for value in (*sums.values(), data_errors):
                value.zero_()
            window_steps, window_start = 0, time.perf_counter()
        else:
            reporter.advance(state.step)
        if state.step % cfg.train.sample_every == 0 or last:
            sample_grid()
        if state.step % cfg.train.checkpoint_every == 0 or last:
            save()

    reporter.close()
    if state.train_seconds > 0:
        dist.rank_print(accelerator, f"done: step {state.step}, {state.images_seen} images seen, "
                        f"{state.images_seen / state.train_seconds:.1f} images/s over the training time logged")
    return GanResult(accelerator.unwrap_model(generator), accelerator.unwrap_model(discriminator), state, run_dir)

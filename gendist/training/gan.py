"""The GAN loop for every GAN family: dcgan, cgan (non-saturating), wgan (clipping), wgan_gp.

Per generator step every rank takes exactly `loss.n_critic` critic steps, each on a fresh real
batch of its own; each critic step is its forwards (real, fake, and for WGAN-GP the interpolates)
then ONE backward, so gradients are all-reduced once per step. G and D are wrapped for data
parallelism separately; the G step runs D frozen and outside gradient sync.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torchvision.utils import save_image

from gendist import dist
from gendist.config import RunConfig
from gendist.engines import Update, for_input_gradients
from gendist.eval.evaluator import Generate
from gendist.losses.gan import d_nonsaturating, d_wasserstein, g_nonsaturating, g_wasserstein, gradient_penalty
from gendist.models.conditional import ConditionalDiscriminator, ConditionalGenerator
from gendist.models.dcgan import Discriminator, Generator
from gendist.training.common import (Session, TrainState, apply_hyperparameters, attribute_columns,
                                     build_optimizer, in_memory_format)

GAN_FAMILIES = ("dcgan", "cgan", "wgan", "wgan_gp")


@dataclass
class GanResult:
    generator: nn.Module
    discriminator: nn.Module
    generator_ema: nn.Module | None
    state: TrainState
    run_dir: Path


def build_networks(cfg: RunConfig, num_labels: int) -> tuple[nn.Module, nn.Module]:
    m = cfg.model
    if m.name == "cgan":
        networks = (ConditionalGenerator(num_labels, m.z_dim, m.label_dim, m.ngf, m.image_size),
                    ConditionalDiscriminator(num_labels, m.ndf, m.image_size, m.d_norm))
    else:
        networks = Generator(m.z_dim, m.ngf, m.image_size), Discriminator(m.ndf, m.image_size, norm=m.d_norm)
    return in_memory_format(networks[0], cfg), in_memory_format(networks[1], cfg)


def call(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return model(inputs) if labels is None else model(inputs, labels)


def condition(attrs: torch.Tensor, columns: list[int]) -> torch.Tensor | None:
    """cGAN labels (0/1 floats) from CelebA's +-1 attributes; None for unconditional models."""
    return (attrs[:, columns] > 0).float() if columns else None


def sampler_label(ema: bool) -> str:
    return "generator EMA" if ema else "generator"


def sampler(generator: nn.Module, columns: list[int]) -> Generate:
    """What evaluation scores: the generator (the EMA one in practice) given noise and real attributes."""
    return lambda z, attrs: call(generator, z, condition(attrs, columns))


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


def ema_with_warmup(decay: float):
    """EMA whose decay grows as (1 + n) / (10 + n) up to `decay`: early grids are not dominated by
    the random initial weights (at 0.999, step 250 would still weigh them 78%)."""

    def average(ema_param: torch.Tensor, param: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1.0 + num_averaged) / (10.0 + num_averaged), max=decay).to(ema_param.dtype)
        return d * ema_param + (1 - d) * param

    return average


def discriminator_step(update: Update, critic: nn.Module, cfg: RunConfig, real: torch.Tensor, fake: torch.Tensor,
                       labels: torch.Tensor | None, alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One critic update: forwards, one backward, one optimizer step (and clipping for wgan).

    `alpha` (one per sample) is drawn here unless given, which the equivalence tests do.
    """
    real_scores, fake_scores = call(critic, real, labels), call(critic, fake.detach(), labels)
    stats: dict[str, torch.Tensor] = {}
    if cfg.model.name in ("dcgan", "cgan"):
        loss = d_nonsaturating(real_scores, fake_scores)
        stats["d_real"] = torch.sigmoid(real_scores.detach().float()).mean()
        stats["d_fake"] = torch.sigmoid(fake_scores.detach().float()).mean()
    else:
        loss = d_wasserstein(real_scores, fake_scores)
        stats["wasserstein"] = -loss.detach()
        if cfg.model.name == "wgan_gp":
            if alpha is None:
                alpha = torch.rand(real.shape[0], device=real.device)
            penalty_critic = for_input_gradients(critic)
            penalty = gradient_penalty(lambda x: call(penalty_critic, x, labels), real, fake, alpha)
            loss = loss + cfg.loss.gp_weight * penalty
            stats["gradient_penalty"] = penalty.detach()
    update(loss)
    if cfg.model.name == "wgan":
        with torch.no_grad():
            for param in critic.parameters():
                param.clamp_(-cfg.loss.clip_value, cfg.loss.clip_value)
    stats["loss_d"] = loss.detach()
    return stats


def train_gan(cfg: RunConfig) -> GanResult:
    session = Session(cfg)
    accelerator, device, model_cfg = session.accelerator, session.device, cfg.model
    columns = attribute_columns(model_cfg.attributes, session.attribute_names) if model_cfg.name == "cgan" else []

    dist.seed_everything(cfg.train.seed)  # identical initial weights on every rank
    generator, critic = build_networks(cfg, len(columns))
    ema = None
    if cfg.train.ema_decay > 0:
        ema = AveragedModel(generator, avg_fn=ema_with_warmup(cfg.train.ema_decay), use_buffers=True).to(device)
    opt_g = build_optimizer(generator.parameters(), cfg.optim.lr_g, cfg.optim)
    opt_d = build_optimizer(critic.parameters(), cfg.optim.lr_d, cfg.optim)
    generator, update_g = session.prepare("generator", generator, "opt_g", opt_g)
    critic, update_d = session.prepare("discriminator", critic, "opt_d", opt_d)
    if ema is not None:
        session.register("generator_ema", ema)
        dist.rank_print(accelerator, f"generator EMA: decay {cfg.train.ema_decay} (after its warm-up), a horizon of "
                                     f"about {1 / (1 - cfg.train.ema_decay):.0f} generator steps")
    fixed_noise, fixed_labels = fixed_inputs(cfg, len(columns), device)
    dist.seed_everything(cfg.train.seed, accelerator)  # a distinct noise stream per rank
    session.resume()
    apply_hyperparameters(update_g.optimizer, cfg.optim.lr_g, cfg.optim)
    apply_hyperparameters(update_d.optimizer, cfg.optim.lr_d, cfg.optim)
    sampled = ema.module if ema is not None else accelerator.unwrap_model(generator)

    def write_samples() -> None:
        sampled.eval()
        with torch.no_grad():
            images = call(sampled, fixed_noise, fixed_labels).float()
        sampled.train()
        save_image(images, session.run_dir / "samples" / f"step_{session.state.step:07d}.png", nrow=8,
                   normalize=True, value_range=(-1, 1))

    session.attach(write_samples, sampler(sampled, columns), sampler_label(ema is not None))
    with session:
        while session.running:
            critic_stats: dict[str, torch.Tensor] = {}
            for critic_step in range(cfg.loss.n_critic):
                batch = session.next_batch()
                real, labels = batch["images"], condition(batch["attrs"], columns)
                z = torch.randn(real.shape[0], model_cfg.z_dim, device=device)
                keep_graph = critic_step == cfg.loss.n_critic - 1  # the last fake also trains G
                with torch.set_grad_enabled(keep_graph):
                    fake = call(generator, z, labels)
                stats = discriminator_step(update_d, critic, cfg, real, fake, labels)
                for name, value in stats.items():
                    critic_stats[name] = critic_stats.get(name, 0.0) + value / cfg.loss.n_critic

            with frozen(critic), session.no_sync(critic):
                scores = call(critic, fake, labels)
            loss_g = g_wasserstein(scores) if model_cfg.name in ("wgan", "wgan_gp") else g_nonsaturating(scores)
            update_g(loss_g)
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(generator))
            session.step_done({**critic_stats, "loss_g": loss_g.detach()})

    return GanResult(accelerator.unwrap_model(generator), accelerator.unwrap_model(critic),
                     ema.module if ema is not None else None, session.state, session.run_dir)


def generator_from_checkpoint(cfg: RunConfig, shared: dict, attribute_names: list[str],
                              device: torch.device) -> tuple[Generate, str, None]:
    """The checkpoint's EMA generator (its raw generator when EMA was off), ready to sample, with
    the label its scores carry; GANs have nothing to reconstruct."""
    columns = attribute_columns(cfg.model.attributes, attribute_names) if cfg.model.name == "cgan" else []
    generator, _ = build_networks(cfg, len(columns))
    has_ema = "generator_ema" in shared
    if has_ema:
        ema = AveragedModel(generator, use_buffers=True)
        ema.load_state_dict(shared["generator_ema"])
        generator = ema.module
    else:
        generator.load_state_dict(shared["generator"])
    return sampler(generator.to(device).eval(), columns), sampler_label(has_ema), None


def fixed_inputs(cfg: RunConfig, num_labels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise (and labels) of the sample grids, the same for every run with this seed.

    cGAN grids have 8 columns of fixed noise; row 0 has every attribute off, row i only attribute i on.
    """
    rng = torch.Generator().manual_seed(cfg.train.seed)
    if not num_labels:
        return torch.randn(cfg.train.num_samples, cfg.model.z_dim, generator=rng).to(device), None
    columns = 8
    noise = torch.randn(columns, cfg.model.z_dim, generator=rng).repeat(num_labels + 1, 1)
    labels = torch.zeros(num_labels + 1, num_labels)
    labels[1:] = torch.eye(num_labels)
    return noise.to(device), labels.repeat_interleave(columns, dim=0).to(device)

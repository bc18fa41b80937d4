"""The GAN families: gan (the original, fully connected), dcgan and cgan (non-saturating), wgan
(weight clipping) and wgan_gp on DCGAN networks. They differ in networks and losses only.

Per generator step, `loss.n_critic` critic updates, each on a fresh real batch; each is its
forwards (real, fake, and for WGAN-GP the interpolates) then ONE backward. The last critic
repeat's fake keeps its graph and trains the generator, with the critic frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from gendist.config import ConfigError, RunConfig
from gendist.engines import for_input_gradients
from gendist.families.base import (
    Export,
    Family,
    FamilyInputs,
    Generate,
    Network,
    Phase,
    Sampling,
    Stats,
    StepContext,
    in_memory_format,
)
from gendist.losses.gan import d_nonsaturating, d_wasserstein, g_nonsaturating, g_wasserstein, gradient_penalty
from gendist.models.conditional import ConditionalDiscriminator, ConditionalGenerator
from gendist.models.dcgan import Discriminator, Generator
from gendist.models.fully_connected import FullyConnectedDiscriminator, FullyConnectedGenerator

WASSERSTEIN = ("wgan", "wgan_gp")


def attribute_columns(wanted: list[str], available: list[str]) -> list[int]:
    missing = [name for name in wanted if name not in available]
    if missing:
        raise ConfigError(
            f"model.attributes {missing} are not in this dataset; it has: {', '.join(available) or 'none'}"
        )
    return [available.index(name) for name in wanted]


def generator_spec(cfg: RunConfig, num_labels: int) -> tuple[type[nn.Module], dict]:
    """The generator's class and constructor arguments (what gendist export records)."""
    m = cfg.model
    sizes = {"z_dim": m.z_dim, "ngf": m.ngf, "image_size": m.image_size}
    if m.name == "gan":
        return FullyConnectedGenerator, sizes
    if m.name == "cgan":
        return ConditionalGenerator, {"num_labels": num_labels, "label_dim": m.label_dim, **sizes}
    return Generator, sizes


def build_networks(cfg: RunConfig, num_labels: int) -> tuple[nn.Module, nn.Module]:
    m = cfg.model
    generator_class, kwargs = generator_spec(cfg, num_labels)
    if m.name == "gan":
        critic = FullyConnectedDiscriminator(m.ndf, m.image_size)
    elif m.name == "cgan":
        critic = ConditionalDiscriminator(num_labels, m.ndf, m.image_size, m.d_norm)
    else:
        critic = Discriminator(m.ndf, m.image_size, norm=m.d_norm)
    return in_memory_format(generator_class(**kwargs), cfg), in_memory_format(critic, cfg)


def call(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return model(inputs) if labels is None else model(inputs, labels)


def condition(attrs: torch.Tensor, columns: list[int]) -> torch.Tensor | None:
    """cGAN labels (0/1 floats) from CelebA's +-1 attributes; None for unconditional models."""
    return (attrs[:, columns] > 0).float() if columns else None


def discriminator_loss(
    critic: nn.Module,
    cfg: RunConfig,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor | None,
    alpha: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """The critic's loss on a real and a fake batch, and its statistics.

    `alpha` (one per sample, WGAN-GP) is drawn here unless given, which the equivalence tests do.
    """
    real_scores, fake_scores = call(critic, real, labels), call(critic, fake.detach(), labels)
    stats: Stats = {}
    if cfg.model.name in WASSERSTEIN:
        loss = d_wasserstein(real_scores, fake_scores)
        stats["wasserstein"] = -loss.detach()
        if cfg.model.name == "wgan_gp":
            if alpha is None:
                alpha = torch.rand(real.shape[0], device=real.device)
            penalty_critic = for_input_gradients(critic)
            penalty = gradient_penalty(lambda x: call(penalty_critic, x, labels), real, fake, alpha)
            loss = loss + cfg.loss.gp_weight * penalty
            stats["gradient_penalty"] = penalty.detach()
    else:
        loss = d_nonsaturating(real_scores, fake_scores)
        stats["d_real"] = torch.sigmoid(real_scores.detach().float()).mean()
        stats["d_fake"] = torch.sigmoid(fake_scores.detach().float()).mean()
    stats["loss_d"] = loss.detach()
    return loss, stats


def fixed_inputs(cfg: RunConfig, num_labels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise (and labels) of the sample grids, the same for every run with this seed.

    cGAN grids have 8 columns of fixed noise; row 0 has every attribute off, row i only attribute i on.
    """
    rng = torch.Generator().manual_seed(cfg.train.seed)
    if not num_labels:
        return torch.randn(cfg.train.num_samples, cfg.model.z_dim, generator=rng), None
    columns = 8
    noise = torch.randn(columns, cfg.model.z_dim, generator=rng).repeat(num_labels + 1, 1)
    labels = torch.zeros(num_labels + 1, num_labels)
    labels[1:] = torch.eye(num_labels)
    return noise, labels.repeat_interleave(columns, dim=0)


def declare(inputs: FamilyInputs) -> Family:
    cfg = inputs.cfg
    name, z_dim, n_critic = cfg.model.name, cfg.model.z_dim, cfg.loss.n_critic
    columns = attribute_columns(cfg.model.attributes, inputs.attribute_names) if name == "cgan" else []
    generator, critic = build_networks(cfg, len(columns))
    ema = cfg.train.ema_decay > 0

    def critic_loss(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        batch = ctx.next_batch()
        real, labels = batch["images"], condition(batch["attrs"], columns)
        z = torch.randn(real.shape[0], z_dim, device=ctx.device)
        with torch.set_grad_enabled(ctx.last_repeat):  # the last fake also trains G
            fake = call(ctx.nets["generator"], z, labels)
        ctx.scratch.update(fake=fake, labels=labels)
        return discriminator_loss(ctx.nets["discriminator"], cfg, real, fake, labels)

    def generator_loss(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        scores = call(ctx.nets["discriminator"], ctx.scratch["fake"], ctx.scratch["labels"])
        loss = g_wasserstein(scores) if name in WASSERSTEIN else g_nonsaturating(scores)
        return loss, {"loss_g": loss.detach()}

    @torch.no_grad()
    def clip_critic() -> None:
        for param in critic.parameters():
            param.clamp_(-cfg.loss.clip_value, cfg.loss.clip_value)

    noise, labels = fixed_inputs(cfg, len(columns))

    def sampling(bare: dict[str, nn.Module]) -> Sampling:
        sampled = bare.get("generator_ema", bare["generator"])
        device = next(sampled.parameters()).device

        def write_grids(folder: Path, step: int) -> None:
            with torch.no_grad():
                images = call(sampled, noise.to(device), None if labels is None else labels.to(device)).float()
            save_image(images, folder / f"step_{step:07d}.png", nrow=8, normalize=True, value_range=(-1, 1))

        generate: Generate = lambda z, attrs: call(sampled, z, condition(attrs, columns))  # noqa: E731
        label = "generator EMA" if "generator_ema" in bare else "generator"
        conditioned_on = [inputs.attribute_names[c] for c in columns] if columns else None
        return Sampling(generate, label, write_grids, conditioned_on=conditioned_on)

    notes = (
        [
            f"generator EMA: decay {cfg.train.ema_decay} (after its warm-up), a horizon of about "
            f"{1 / (1 - cfg.train.ema_decay):.0f} generator steps"
        ]
        if ema
        else []
    )
    return Family(
        networks=[
            Network("generator", generator, "opt_g", cfg.optim.lr_g, ema=ema),
            Network("discriminator", critic, "opt_d", cfg.optim.lr_d),
        ],
        phases=[
            Phase(
                "critic",
                "discriminator",
                critic_loss,
                repeats=n_critic,
                after_update=clip_critic if name == "wgan" else None,
            ),
            Phase("generator", "generator", generator_loss, frozen=("discriminator",)),
        ],
        sampling=sampling,
        notes=notes,
        export=Export(
            "generator",
            *generator_spec(cfg, len(columns)),
            labels=[inputs.attribute_names[c] for c in columns] if columns else None,
        ),
    )

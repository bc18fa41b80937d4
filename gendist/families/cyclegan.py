"""CycleGAN (Zhu et al. 2017): unpaired translation between two attribute domains A and B of the
shards (`gendist shards domains`; domain D of split S is the split "S.D"), read as two named
streams "a" and "b", each with its own epochs and resume position.

Networks: generator_ab (G: A -> B) and generator_ba (F: B -> A), ResNet generators with instance
norm; discriminator_a and discriminator_b, PatchGANs on one image. Per step, as the reference
implementation: the generators' phase (both discriminators frozen) minimises least-squares
adversarial losses + lambda x (|F(G(a)) - a| + |G(F(b)) - b|) + identity_weight x lambda x
(|G(b) - b| + |F(a) - a|), one backward stepping both generators (one Adam each: the same update as
one Adam over both); then each discriminator's phase trains it on real images of its domain
against fakes drawn from its pool of 50 past fakes (one pool per discriminator and rank,
checkpointed per rank; its draws come from its own generator, seeded by (train.seed, rank)). The
discriminators' objective is halved, as the paper. Learning rates stay constant, then decay
linearly to 0 from cyclegan.decay_from x train.steps on; the rate is a function of the step, so a
resume restores it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from gendist.data.loader import domain_split
from gendist.distributed import rank_seed
from gendist.families.base import (
    Family,
    FamilyInputs,
    Network,
    Phase,
    Sampling,
    Stats,
    StepContext,
    fixed_real_batch,
    in_memory_format,
)
from gendist.families.image_pool import ImagePool
from gendist.losses.gan import d_least_squares, g_least_squares
from gendist.models.cyclegan import ResnetGenerator
from gendist.models.pix2pix import PatchDiscriminator

GRID_IMAGES = 8
POOL_SEEDS = {"a": 0, "b": 1}  # the two pools of one rank draw differently


def linear_decay(steps: int, decay_from: float):
    """Step (from 1) -> 1 up to decay_from x steps, then linearly down to 1/(decayed steps) at the
    last step (the reference's 'linear' policy over steps instead of epochs)."""
    start = int(decay_from * steps)

    def factor(step: int) -> float:
        return 1.0 - max(0, step - start - 1) / (steps - start) if step > start else 1.0

    return factor


def declare(inputs: FamilyInputs) -> Family:
    cfg = inputs.cfg
    settings, size = cfg.cyclegan, cfg.model.image_size
    domain_a, domain_b = settings.domains
    generators = {
        name: in_memory_format(ResnetGenerator(ngf=cfg.model.ngf, blocks=settings.blocks), cfg)
        for name in ("generator_ab", "generator_ba")
    }
    critics = {
        name: in_memory_format(PatchDiscriminator(3, cfg.model.ndf, settings.patch_layers, size), cfg)
        for name in ("discriminator_a", "discriminator_b")
    }
    pools = {
        stream: ImagePool(settings.pool_size, rank_seed(cfg.train.seed + POOL_SEEDS[stream], inputs.rank))
        for stream in POOL_SEEDS
    }
    cycle, identity = settings.cycle_weight, settings.identity_weight * settings.cycle_weight

    def generators_loss(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        a, b = ctx.next_batch("a")["images"], ctx.next_batch("b")["images"]
        g, f = ctx.nets["generator_ab"], ctx.nets["generator_ba"]
        fake_b, fake_a = g(a), f(b)
        adversarial = g_least_squares(ctx.nets["discriminator_b"](fake_b)) + g_least_squares(
            ctx.nets["discriminator_a"](fake_a)
        )
        cycle_loss = (f(fake_b).float() - a).abs().mean() + (g(fake_a).float() - b).abs().mean()
        loss = adversarial + cycle * cycle_loss
        stats: Stats = {"loss_g_adv": adversarial.detach(), "cycle_l1": cycle_loss.detach()}
        if identity:
            identity_loss = (g(b).float() - b).abs().mean() + (f(a).float() - a).abs().mean()
            loss = loss + identity * identity_loss
            stats["identity_l1"] = identity_loss.detach()
        ctx.scratch.update(a=a, b=b, fake_a=fake_a.detach(), fake_b=fake_b.detach())
        return loss, {"loss_g": loss.detach(), **stats}

    def critic_loss(domain: str):
        def loss(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
            real, fake = ctx.scratch[domain], pools[domain].query(ctx.scratch[f"fake_{domain}"])
            critic = ctx.nets[f"discriminator_{domain}"]
            value = d_least_squares(critic(real), critic(fake))
            return value, {f"loss_d_{domain}": value.detach()}

        return loss

    grids: dict[str, torch.Tensor] = {}  # a fixed batch of each domain, read at the first grid

    def sampling(bare: dict[str, nn.Module]) -> Sampling:
        g, f = bare["generator_ab"], bare["generator_ba"]
        device = next(g.parameters()).device

        def write_grids(folder: Path, step: int) -> None:
            """Rows of 8: A | G(A) | F(G(A)), then B | F(B) | G(F(B))."""
            for stream, domain in (("a", domain_a), ("b", domain_b)):
                if stream not in grids:
                    spec = dataclasses.replace(inputs.spec, split=domain_split(cfg.data.split, domain))
                    grids[stream] = fixed_real_batch(spec, GRID_IMAGES).to(device)
            a, b = grids["a"], grids["b"]
            with torch.no_grad():
                fake_b, fake_a = g(a).float(), f(b).float()
                shown = torch.cat([a, fake_b, f(fake_b).float(), b, fake_a, g(fake_a).float()])
            save_image(shown, folder / f"step_{step:07d}.png", nrow=GRID_IMAGES, normalize=True, value_range=(-1, 1))

        def translator(net: nn.Module):
            return lambda images: net(images).float()

        return Sampling(
            None,
            "cyclegan generators",
            write_grids,
            translate={(domain_a, domain_b): translator(g), (domain_b, domain_a): translator(f)},
        )

    decay = linear_decay(cfg.train.steps, settings.decay_from)
    return Family(
        networks=[
            *(Network(name, net, f"opt_{name}", cfg.optim.lr_g, lr_factor=decay) for name, net in generators.items()),
            *(Network(name, net, f"opt_{name}", cfg.optim.lr_d, lr_factor=decay) for name, net in critics.items()),
        ],
        phases=[
            Phase(
                "generators",
                ("generator_ab", "generator_ba"),
                generators_loss,
                frozen=("discriminator_a", "discriminator_b"),
            ),
            Phase("discriminator_a", "discriminator_a", critic_loss("a")),
            Phase("discriminator_b", "discriminator_b", critic_loss("b")),
        ],
        sampling=sampling,
        streams={"a": domain_split(cfg.data.split, domain_a), "b": domain_split(cfg.data.split, domain_b)},
        per_rank={f"pool_{stream}": pool for stream, pool in pools.items()},
    )

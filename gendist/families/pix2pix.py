"""Pix2Pix face inpainting (Isola et al. 2017): a U-Net fills the hole of a masked face, a PatchGAN
judges (masked input, completed image) pairs; the generator's loss adds lambda x L1 to the image.

Batches are paired by a seeded transform of one image: the mask of sample i of rank r at step t,
with B samples per rank, is a function of (pix2pix.mask_seed, t, r*B + i) alone (gendist.data.masks
train_keys: the sample's index in the step's global batch taken in rank order), so a resumed run
draws the masks the interrupted one drew, ranks draw different masks, and a global batch split over
2 ranks x B gets the masks it gets on 1 rank x 2B. (The loader hands each rank its own stretch of
the epoch, so in training the numbering keeps ranks apart; given the same 2B images split in rank
order and no dropout, one step on 2 ranks equals one on 1 rank: tests/test_families.py.) The U-Net's
decoder dropout is pix2pix.dropout (the paper's 0.5, the generator's only noise; 0 turns it off),
drawn from each rank's own RNG stream. The output keeps the known pixels, G(x)*m + x*(1-m), in
training and in the grids. The discriminator objective is halved, as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from gendist.data.masks import composite, eval_keys, mask_batch, masked_input, train_keys
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
from gendist.losses.gan import d_nonsaturating, g_nonsaturating
from gendist.models.pix2pix import PatchDiscriminator, UNetGenerator

GRID_IMAGES = 8


def declare(inputs: FamilyInputs) -> Family:
    cfg = inputs.cfg
    settings, size = cfg.pix2pix, cfg.model.image_size
    generator = in_memory_format(UNetGenerator(4, 3, cfg.model.ngf, size, dropout=settings.dropout), cfg)
    critic = in_memory_format(PatchDiscriminator(7, cfg.model.ndf, settings.patch_layers, size), cfg)

    def discriminator_loss(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        real = ctx.next_batch()["images"]
        keys = train_keys(ctx.step, ctx.rank, real.shape[0])
        mask = mask_batch(settings.mask, size, settings.mask_seed, keys).to(ctx.device, non_blocking=True)
        condition = masked_input(real, mask)
        completed = composite(ctx.nets["generator"](condition), real, mask)
        ctx.scratch.update(real=real, condition=condition, completed=completed)
        critic_net = ctx.nets["discriminator"]
        real_scores, fake_scores = critic_net(condition, real), critic_net(condition, completed.detach())
        loss = 0.5 * d_nonsaturating(real_scores, fake_scores)
        return loss, {
            "loss_d": loss.detach(),
            "d_real": torch.sigmoid(real_scores.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_scores.detach().float()).mean(),
        }

    def generator_loss(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        real, condition, completed = ctx.scratch["real"], ctx.scratch["condition"], ctx.scratch["completed"]
        adversarial = g_nonsaturating(ctx.nets["discriminator"](condition, completed))
        l1 = (completed.float() - real).abs().mean()
        loss = adversarial + settings.l1_weight * l1
        return loss, {"loss_g": loss.detach(), "loss_g_adv": adversarial.detach(), "l1": l1.detach()}

    grid: list[torch.Tensor] = []  # the fixed real batch and its masks, read at the first grid

    def sampling(bare: dict[str, nn.Module]) -> Sampling:
        model = bare["generator"]
        device = next(model.parameters()).device

        def write_grids(folder: Path, step: int) -> None:
            """Rows of 8: masked input (hole grey), output, target."""
            if not grid:
                real = fixed_real_batch(inputs.spec, GRID_IMAGES).to(device)
                grid.extend(
                    [real, mask_batch(settings.mask, size, cfg.eval.seed, eval_keys(range(len(real)))).to(device)]
                )
            real, mask = grid
            with torch.no_grad():
                completed = composite(model(masked_input(real, mask)).float(), real, mask)
            shown = torch.cat([real * (1 - mask), completed, real])
            save_image(shown, folder / f"step_{step:07d}.png", nrow=GRID_IMAGES, normalize=True, value_range=(-1, 1))

        def complete(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return composite(model(masked_input(images, mask)).float(), images, mask)

        return Sampling(None, "pix2pix generator", write_grids, complete=complete)

    return Family(
        networks=[
            Network("generator", generator, "opt_g", cfg.optim.lr_g),
            Network("discriminator", critic, "opt_d", cfg.optim.lr_d),
        ],
        phases=[
            Phase("discriminator", "discriminator", discriminator_loss),
            Phase("generator", "generator", generator_loss, frozen=("discriminator",)),
        ],
        sampling=sampling,
    )

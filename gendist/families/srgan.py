"""SRGAN face super-resolution (Ledig et al. 2017): SRResNet pre-trained on the pixel loss, then the
adversarial stage from its weights, in one run.

Each batch's low-resolution inputs are its images downsampled srgan.scale times
(gendist.data.resolution.downsample: bicubic, antialiased, quantised to 8 bits): a function of the
image alone, so a resumed run and the evaluation see the inputs training saw. Steps 1 ..
srgan.pretrain_steps run the "pixel" phase (the generator on the pixel loss alone); the steps after
run "discriminator" (non-saturating, real targets against super-resolved ones) then "generator"
(pixel_weight x pixel + content_weight x content + adversarial_weight x non-saturating GAN loss). The
stage is a function of the step, so a resume on either side of the boundary continues exactly; the
generator keeps its Adam state across it.

Content loss: the mean squared difference of a frozen network's features of the output and of the
target. srgan.content=classifier: gendist's own face classifier (a classifier run on data of this
preprocessing, refused otherwise as the judge is), at srgan.classifier_layer; vgg19: torchvision's
VGG19 file from $TORCH_HOME (gendist.models.vgg), at srgan.vgg_layer, the paper's VGG54 by default;
none: no content term. The frozen network runs in float32 outside the networks' autocast.

Batch norm across ranks: each rank normalises over its own batch; the running statistics are
averaged across ranks before every grid, evaluation and checkpoint (gendist.distributed.average_buffers),
as for every family.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

from gendist.config import RunConfig
from gendist.data.loader import read_in_order
from gendist.data.resolution import bicubic_upsample, downsample
from gendist.data.shards import read_manifest
from gendist.families.base import Family, FamilyInputs, Network, Phase, Sampling, Stats, StepContext, in_memory_format
from gendist.losses.gan import d_nonsaturating, g_nonsaturating
from gendist.models.srgan import SRDiscriminator, SRResNet

GRID_IMAGES = 8


def content_network(cfg: RunConfig, shard_dir: str) -> nn.Module | None:
    """The frozen feature network of the content loss (images in [-1, 1] -> a feature map), or None."""
    settings = cfg.srgan
    if settings.content == "none" or not settings.content_weight:
        return None
    if settings.content == "vgg19":
        from gendist.models.vgg import VGG19Features

        return VGG19Features(settings.vgg_weights, settings.vgg_layer)
    from gendist.eval.judge import load_judge  # the judge's checks: a classifier run, trained on this preprocessing

    preprocessing = read_manifest(shard_dir)["preprocessing"]
    classifier = load_judge(settings.classifier, torch.device("cpu"), preprocessing, "srgan.classifier")
    return ClassifierLayer(classifier.network, settings.classifier_layer)


class ClassifierLayer(nn.Module):
    """A frozen attribute classifier's feature map at one layer (stem, stages.0 ...): the rest is not run."""

    def __init__(self, classifier: nn.Module, layer: str) -> None:
        super().__init__()
        layers = ["stem", *(f"stages.{i}" for i in range(len(classifier.stages)))]
        if layer not in layers:
            raise ValueError(f"srgan.classifier_layer={layer!r} is not one of {', '.join(layers)}")
        self.classifier, self.stages = classifier.eval().requires_grad_(False), layers.index(layer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.classifier.stem(images)
        for stage in self.classifier.stages[: self.stages]:
            out = stage(out)
        return out


def pixel_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.mse_loss if kind == "mse" else F.l1_loss


def declare(inputs: FamilyInputs) -> Family:
    cfg = inputs.cfg
    settings, size = cfg.srgan, cfg.model.image_size
    generator = in_memory_format(SRResNet(settings.scale, cfg.model.ngf, settings.blocks), cfg)
    critic = in_memory_format(SRDiscriminator(size, cfg.model.ndf), cfg)
    pixel = pixel_loss(settings.pixel_loss)
    training = inputs.spec is not None
    content = content_network(cfg, inputs.spec.shard_dir) if training else None
    # the grids' fixed held-out batch: the first images of eval.recon_split (read now: a missing split fails at start)
    held_out = read_in_order(inputs.spec.shard_dir, cfg.eval.recon_split, size, GRID_IMAGES)[0] if training else None

    def adversarial_stage(step: int) -> bool:
        return step > settings.pretrain_steps

    def super_resolved(ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        real = ctx.next_batch()["images"]
        return real, ctx.nets["generator"](downsample(real, settings.scale))

    def pixel_phase(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        real, output = super_resolved(ctx)
        loss = pixel(output.float(), real)
        return loss, {"loss_pixel": loss.detach()}

    def discriminator_loss(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        real, output = super_resolved(ctx)
        ctx.scratch.update(real=real, output=output)
        critic_net = ctx.nets["discriminator"]
        real_scores, fake_scores = critic_net(real), critic_net(output.detach())
        loss = d_nonsaturating(real_scores, fake_scores)
        return loss, {
            "loss_d": loss.detach(),
            "d_real": torch.sigmoid(real_scores.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_scores.detach().float()).mean(),
        }

    def generator_loss(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        real, output = ctx.scratch["real"], ctx.scratch["output"]
        pixel_term = pixel(output.float(), real)
        adversarial = g_nonsaturating(ctx.nets["discriminator"](output))
        loss = settings.pixel_weight * pixel_term + settings.adversarial_weight * adversarial
        stats: Stats = {"loss_pixel": pixel_term.detach(), "loss_g_adv": adversarial.detach()}
        if content is not None:
            content.to(ctx.device)  # a no-op after the first step (declarations do not know the device)
            with torch.no_grad():
                target_features = content(real.float())
            content_term = F.mse_loss(content(output.float()), target_features)
            loss = loss + settings.content_weight * content_term
            stats["loss_content"] = content_term.detach()
        stats["loss_g"] = loss.detach()
        return loss, stats

    def sampling(bare: dict[str, nn.Module]) -> Sampling:
        model = bare.get("generator_ema", bare["generator"])
        device = next(model.parameters()).device

        def write_grids(folder: Path, step: int) -> None:
            """Rows of 8: bicubic | super-resolved | target, on the first held-out images."""
            real = torch.from_numpy(held_out).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            low = downsample(real, settings.scale)
            with torch.no_grad():
                output = model(low).float()
            shown = torch.cat([bicubic_upsample(low, settings.scale), output, real])
            save_image(shown, folder / f"step_{step:07d}.png", nrow=GRID_IMAGES, normalize=True, value_range=(-1, 1))

        label = "SRGAN generator EMA" if "generator_ema" in bare else "SRGAN generator"
        return Sampling(None, label, write_grids, super_resolve=model)

    ema = cfg.train.ema_decay > 0
    return Family(
        networks=[
            Network("generator", generator, "opt_g", cfg.optim.lr_g, ema=ema),
            Network("discriminator", critic, "opt_d", cfg.optim.lr_d),
        ],
        phases=[
            Phase("pixel", "generator", pixel_phase, when=lambda step: not adversarial_stage(step)),
            Phase("discriminator", "discriminator", discriminator_loss, when=adversarial_stage),
            Phase("generator", "generator", generator_loss, frozen=("discriminator",), when=adversarial_stage),
        ],
        sampling=sampling,
        notes=[
            f"srgan: x{settings.scale} from {size // settings.scale} px; SRResNet (pixel loss) for steps 1.."
            f"{settings.pretrain_steps}, then the adversarial stage (content: {settings.content})"
        ],
    )

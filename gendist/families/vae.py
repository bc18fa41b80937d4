"""The VAE family, ELBO = reconstruction NLL + beta_t * KL, and its contrast, the plain autoencoder
(model.name=ae): the same network and reconstruction NLL with the code z = mu and no KL term, so the
two differ by the objective alone. One network, one phase.

Both are scored as samplers of N(0, I) codes (the VAE's prior; for the AE a prior it was never
trained towards) and of a Gaussian fitted to their training codes (Sampling.encode: the ex-post
density of Ghosh et al. 2020, the AE's fair baseline), and by held-out reconstruction error.
Grids: prior samples from fixed noise (samples/step_*.png) and, for a fixed real batch, originals
in odd rows above their reconstructions (samples/recon_step_*.png).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from gendist.config import RunConfig
from gendist.families.base import (
    Export,
    Family,
    FamilyInputs,
    Network,
    Phase,
    Sampling,
    Stats,
    StepContext,
    exported_images,
    fixed_real_batch,
    in_memory_format,
)
from gendist.losses.vae import kl_standard_normal, reconstruction_nll
from gendist.models.vae import ConvVAE

SAMPLER_LABELS = {
    "vae": "VAE prior samples (decoder mean)",
    "ae": "autoencoder decoder on N(0, I) codes (decoder mean)",
}


def kl_weight(cfg: RunConfig, step: int) -> float:
    """beta, ramped linearly from 0 over the warm-up (step counts from 1)."""
    warmup = cfg.vae.kl_warmup_steps
    return cfg.vae.beta * (min(1.0, step / warmup) if warmup > 0 else 1.0)


def vae_kwargs(cfg: RunConfig) -> dict:
    """ConvVAE's constructor arguments (what gendist export records)."""
    m = cfg.model
    learn_sigma = cfg.vae.likelihood == "gaussian_learned"
    return {"z_dim": m.z_dim, "ngf": m.ngf, "ndf": m.ndf, "image_size": m.image_size, "learn_sigma": learn_sigma}


def build_vae(cfg: RunConfig) -> ConvVAE:
    return in_memory_format(ConvVAE(**vae_kwargs(cfg)), cfg)


def declare(inputs: FamilyInputs) -> Family:
    cfg = inputs.cfg
    vae_cfg = cfg.vae
    net = build_vae(cfg)

    variational = cfg.model.name == "vae"
    # the decoder's output as images in [-1, 1]: the mean of p(x | z) (Bernoulli logits, or Gaussian means)
    output = "sigmoid" if vae_cfg.likelihood == "bernoulli" else "clamp"

    def objective(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        """The VAE's negative ELBO, or the autoencoder's reconstruction NLL of its deterministic code."""
        real = ctx.next_batch()["images"]
        decoded, mu, logvar = ctx.nets["vae"](real, sample=variational)
        log_sigma = ctx.bare["vae"].log_sigma
        recon = reconstruction_nll(decoded, real, vae_cfg.likelihood, vae_cfg.gaussian_std, log_sigma)
        stats: Stats = {"recon": recon.detach()}
        loss = recon
        if variational:
            kl, beta = kl_standard_normal(mu, logvar), kl_weight(cfg, ctx.step)
            loss = recon + beta * kl
            stats.update(kl=kl.detach(), kl_weight=beta)
        stats["loss"] = loss.detach()
        if log_sigma is not None:
            stats["sigma"] = log_sigma.detach().exp()
        return loss, stats

    noise = torch.randn(cfg.train.num_samples, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.train.seed))
    originals: list[torch.Tensor] = []  # read at the first grid: evaluation alone never needs them

    def sampling(bare: dict[str, nn.Module]) -> Sampling:
        model = bare["vae"]
        device = next(model.parameters()).device

        def generate(z: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:  # attributes unused
            return exported_images(model.decode(z), output)

        def encode(images: torch.Tensor) -> torch.Tensor:
            return model.encode(images)[0]

        def reconstruct(images: torch.Tensor) -> torch.Tensor:
            return exported_images(model.decode(encode(images)), output)

        def write_grids(folder: Path, step: int) -> None:
            if not originals:
                originals.append(fixed_real_batch(inputs.spec, min(32, cfg.train.num_samples)).to(device))
            real = originals[0]
            with torch.no_grad():
                prior, recon = generate(noise.to(device), None), reconstruct(real)
            save_image(prior, folder / f"step_{step:07d}.png", nrow=8, normalize=True, value_range=(-1, 1))
            pairs = torch.stack([real.view(-1, 8, *real.shape[1:]), recon.view(-1, 8, *recon.shape[1:])], dim=1)
            save_image(
                pairs.flatten(0, 2), folder / f"recon_step_{step:07d}.png", nrow=8, normalize=True, value_range=(-1, 1)
            )

        return Sampling(generate, SAMPLER_LABELS[cfg.model.name], write_grids, reconstruct, encode=encode)

    return Family(
        networks=[Network("vae", net, "optimizer", cfg.optim.lr_g)],
        phases=[Phase("elbo" if variational else "reconstruction", "vae", objective)],
        sampling=sampling,
        # the whole autoencoder: decode(z) samples, and its encoder maps faces to codes
        export=Export("vae", ConvVAE, vae_kwargs(cfg), "decode", output),
    )

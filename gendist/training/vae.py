"""The VAE loop: ELBO = reconstruction NLL + beta_t * KL, one optimizer, one backward per step.

Grids: prior samples from fixed noise (samples/step_*.png) and, for a fixed real batch, originals
in odd rows above their reconstructions (samples/recon_step_*.png).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image

from gendist import dist
from gendist.config import RunConfig
from gendist.data.loader import ShardStream
from gendist.eval.evaluator import Generate, Reconstruct
from gendist.losses.vae import decoded_images, kl_standard_normal, reconstruction_nll
from gendist.models.vae import ConvVAE
from gendist.training.common import Session, TrainState, apply_hyperparameters, build_optimizer, in_memory_format


@dataclass
class VaeResult:
    model: nn.Module
    state: TrainState
    run_dir: Path


def kl_weight(cfg: RunConfig, step: int) -> float:
    """beta, ramped linearly from 0 over the warm-up (step counts from 1)."""
    warmup = cfg.vae.kl_warmup_steps
    return cfg.vae.beta * (min(1.0, step / warmup) if warmup > 0 else 1.0)


SAMPLER_LABEL = "VAE prior samples (decoder mean)"


def sampler(net: ConvVAE, likelihood: str) -> Generate:
    """Prior samples: the decoder's mean image for z ~ N(0, I) (attributes unused)."""
    return lambda z, attrs: decoded_images(net.decode(z), likelihood)


def reconstructor(net: ConvVAE, likelihood: str) -> Reconstruct:
    """The decoder's mean image at the posterior mean."""
    return lambda images: decoded_images(net.decode(net.encode(images)[0]), likelihood)


def build_vae(cfg: RunConfig) -> ConvVAE:
    return in_memory_format(ConvVAE(cfg.model.z_dim, cfg.model.ngf, cfg.model.ndf, cfg.model.image_size,
                                    learn_sigma=cfg.vae.likelihood == "gaussian_learned"), cfg)


def vae_from_checkpoint(cfg: RunConfig, shared: dict, device: torch.device) -> tuple[Generate, str, Reconstruct]:
    """The checkpoint's VAE, ready to sample and reconstruct, with the label its scores carry."""
    net = build_vae(cfg)
    net.load_state_dict(shared["vae"])
    net.to(device).eval()
    return sampler(net, cfg.vae.likelihood), SAMPLER_LABEL, reconstructor(net, cfg.vae.likelihood)


def fixed_real_batch(session: Session, count: int) -> torch.Tensor:
    """The first `count` images of epoch 0 as one rank would read them: the same for every run."""
    spec = dataclasses.replace(session.spec, rank=0, world_size=1, batch_size=count)
    images = next(iter(ShardStream(spec)))["images"]
    return images.to(session.device).float().div_(127.5).sub_(1.0)


def train_vae(cfg: RunConfig) -> VaeResult:
    session = Session(cfg)
    accelerator, device, vae_cfg = session.accelerator, session.device, cfg.vae
    dist.seed_everything(cfg.train.seed)
    model = build_vae(cfg)
    optimizer = build_optimizer(model.parameters(), cfg.optim.lr_g, cfg.optim)
    model, update = session.prepare("vae", model, "optimizer", optimizer)
    rng = torch.Generator().manual_seed(cfg.train.seed)
    fixed_noise = torch.randn(cfg.train.num_samples, cfg.model.z_dim, generator=rng).to(device)
    originals = fixed_real_batch(session, min(32, cfg.train.num_samples))
    dist.seed_everything(cfg.train.seed, accelerator)
    session.resume()
    apply_hyperparameters(update.optimizer, cfg.optim.lr_g, cfg.optim)
    net = accelerator.unwrap_model(model)
    generate, reconstruct = sampler(net, vae_cfg.likelihood), reconstructor(net, vae_cfg.likelihood)

    def write_samples() -> None:
        net.eval()
        with torch.no_grad():
            prior, recon = generate(fixed_noise, None), reconstruct(originals)
        net.train()
        step = session.state.step
        save_image(prior, session.run_dir / "samples" / f"step_{step:07d}.png", nrow=8, normalize=True, value_range=(-1, 1))
        pairs = torch.stack([originals.view(-1, 8, *originals.shape[1:]), recon.view(-1, 8, *recon.shape[1:])], dim=1)
        save_image(pairs.flatten(0, 2), session.run_dir / "samples" / f"recon_step_{step:07d}.png", nrow=8,
                   normalize=True, value_range=(-1, 1))

    session.attach(write_samples, generate, SAMPLER_LABEL, reconstruct)
    with session:
        while session.running:
            real = session.next_batch()["images"]
            decoded, mu, logvar = model(real)
            recon = reconstruction_nll(decoded, real, vae_cfg.likelihood, vae_cfg.gaussian_std, net.log_sigma)
            kl = kl_standard_normal(mu, logvar)
            beta = kl_weight(cfg, session.state.step + 1)
            loss = recon + beta * kl
            update(loss)
            values = {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(), "kl_weight": beta}
            if net.log_sigma is not None:
                values["sigma"] = net.log_sigma.detach().exp()
            session.step_done(values)

    return VaeResult(net, session.state, session.run_dir)

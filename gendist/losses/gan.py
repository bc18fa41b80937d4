"""Adversarial losses on discriminator logits, computed in fp32 whatever the autocast dtype."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def d_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), i.e. BCE with targets 1 (real) and 0 (fake)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the generator loss with strong gradients early in training."""
    return F.softplus(-fake_logits.float()).mean()


def d_wasserstein(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """The critic minimises E[D(G(z))] - E[D(x)]: the negative Wasserstein-1 estimate."""
    return fake_scores.float().mean() - real_scores.float().mean()


def g_wasserstein(fake_scores: torch.Tensor) -> torch.Tensor:
    return -fake_scores.float().mean()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = a*x + (1-a)*G(z).

    `alpha` holds one value per sample (shape B), and the norm is taken over all of a sample's
    dimensions (C*H*W) - the two places where implementations in the wild go wrong. The gradient
    is made with create_graph=True, so one ordinary backward of the total critic loss trains
    through it (the pattern that works under DDP).

    Precision: the norms, the penalty and the loss are fp32. Under bf16 mixed precision the input
    gradient is NOT an fp32 gradient: it comes from the backward of the critic's autocast forward
    (bf16 convolutions with fp32 accumulation), then is cast to fp32; against a true fp32 penalty it
    differs by about 3e-3 relative, the same order as the bf16 critic scores themselves.
    """
    a = alpha.view(-1, *([1] * (real.dim() - 1))).to(real.dtype)
    mixed = (a * real.detach() + (1 - a) * fake.detach()).requires_grad_(True)
    scores = critic(mixed).float()
    (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norms = grads.float().flatten(start_dim=1).norm(2, dim=1)
    return ((norms - 1.0) ** 2).mean()


def d_least_squares(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """LSGAN (Mao et al. 2017) discriminator loss with targets 1 (real) and 0 (fake), halved:
    0.5 * (E[(D(x) - 1)^2] + E[D(G(z))^2]).

    The 1/2 is the CycleGAN reference's (``backward_D_basic`` averages its real and fake MSE terms)
    and the paper's ("we divide the objective by 2 while optimizing D, which slows down the rate at
    which D learns, relative to the rate of G"): D's gradients are half those of the plain sum.
    """
    real, fake = real_scores.float(), fake_scores.float()
    return 0.5 * (((real - 1.0) ** 2).mean() + (fake**2).mean())


def g_least_squares(fake_scores: torch.Tensor) -> torch.Tensor:
    """LSGAN generator loss E[(D(G(z)) - 1)^2], not halved (the reference's G term: MSE to target 1)."""
    return ((fake_scores.float() - 1.0) ** 2).mean()

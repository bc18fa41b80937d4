"""ELBO terms, per sample (summed over pixels and latent dimensions), averaged over the batch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in closed form."""
    return (0.5 * (mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())).sum(dim=1).mean()


def reconstruction_nll(
    decoded: torch.Tensor,
    images: torch.Tensor,
    likelihood: str,
    gaussian_std: float,
    log_sigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """-log p(x | z) for images in [-1, 1].

    bernoulli: decoder logits, BCE against pixel intensities in [0, 1] (the common, unnormalised
    choice for non-binary images); gaussian: decoder means, fixed std; gaussian_learned: decoder
    means, std = exp(log_sigma).
    """
    decoded = decoded.float()
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(decoded, (images + 1) / 2, reduction="none")
    elif likelihood in ("gaussian", "gaussian_learned"):
        if likelihood == "gaussian_learned":
            if log_sigma is None:
                raise ValueError("gaussian_learned needs the model's log_sigma")
            log_std = log_sigma.float()
        else:
            log_std = torch.tensor(math.log(gaussian_std), device=decoded.device)
        nll = 0.5 * ((images - decoded) / log_std.exp()) ** 2 + log_std + 0.5 * math.log(2 * math.pi)
    else:
        raise ValueError(f"unknown likelihood {likelihood!r}; use bernoulli, gaussian or gaussian_learned")
    return nll.flatten(start_dim=1).sum(dim=1).mean()

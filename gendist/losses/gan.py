"""Adversarial losses on discriminator logits, computed in fp32 whatever the autocast dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d_nonsaturating(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), i.e. BCE with targets 1 (real) and 0 (fake)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def g_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(G(z)): the generator loss with strong gradients early in training."""
    return F.softplus(-fake_logits.float()).mean()

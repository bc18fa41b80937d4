"""How super-resolution's low-resolution inputs are made: one function for training and evaluation alike.

``downsample`` is bicubic with antialiasing (``F.interpolate(mode="bicubic", antialias=True)``, which
follows PIL's BICUBIC resize, a = -0.5, and is close to MATLAB's ``imresize``, the SR literature's
degradation), computed in float32 whatever the input dtype, clamped, then quantised to the 256 levels of
an 8-bit image: a real LR input is an image file, and the rounding makes the training and evaluation
inputs bit-identical. It is a function of the image alone (no randomness, no seed), so a resumed run and
the evaluation see the LR images the interrupted run saw. ``bicubic_upsample`` is the classical baseline.
Images are (B, 3, H, W) in [-1, 1] (the generator's tanh range); both return float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_scale(scale: int) -> None:
    if not isinstance(scale, int) or scale < 2 or scale & (scale - 1):
        raise ValueError(f"scale must be a power of two >= 2, got {scale!r}")


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")


def downsample(images: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, H / scale, W / scale) in [-1, 1] on the 8-bit levels, float32."""
    _check_scale(scale)
    _check_images(images)
    height, width = images.shape[2:]
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} is not divisible by the scale {scale}")
    low = F.interpolate(
        images.float(), size=(height // scale, width // scale), mode="bicubic", antialias=True, align_corners=False
    )
    return torch.round((low.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # [-1, 1] <-> [0, 255], rounded there


def bicubic_upsample(low: torch.Tensor, scale: int) -> torch.Tensor:
    """The bicubic baseline: (B, 3, h, w) in [-1, 1] -> (B, 3, h * scale, w * scale), float32, clamped to
    [-1, 1] (the cubic kernel's negative lobes overshoot at edges)."""
    _check_scale(scale)
    _check_images(low)
    height, width = low.shape[2:]
    high = F.interpolate(low.float(), size=(height * scale, width * scale), mode="bicubic", align_corners=False)
    return high.clamp(-1, 1)

"""SRGAN's networks (Ledig et al. 2017): the SRResNet generator and the strided-convolution discriminator.

Generator, low resolution (B, 3, h, w) in [-1, 1] -> (B, 3, h*scale, w*scale) in [-1, 1]: a 9x9
convolution and PReLU; `blocks` residual blocks (3x3 convolution, batch norm, PReLU, 3x3
convolution, batch norm, + the block's input); a 3x3 convolution and batch norm added to the first
convolution's output (the long skip); per doubling a 3x3 convolution to 4x the channels, PixelShuffle
(2) and PReLU; a 9x9 convolution to RGB and tanh (the data's range). The paper's widths: ngf 64, 16
blocks (1,548,547 parameters at x4, 1,696,323 at x8).

Discriminator, (B, 3, S, S) in [-1, 1] -> logits (B,): eight 3x3 convolutions of ndf, ndf, 2ndf,
2ndf, 4ndf, 4ndf, 8ndf, 8ndf channels, strides 1, 2 alternating (S/16 at the end), batch norm on
all but the first, LeakyReLU 0.2; then dense 1024, LeakyReLU, dense 1. The paper's 96 px crops end
at 6x6; at 64 px 4x4 (8.4 M of its 13.1 M parameters are the first dense layer at ndf 64; 38.2 M at 128 px).

Activations are not in place: the discriminator runs on real and generated batches before one
backward (in-place LeakyReLU there is what raises "modified by an inplace operation" under DDP in
other implementations). Plain nn.Modules: no distributed or precision code.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def doublings(scale: int) -> int:
    """log2 of an upscaling factor that is a power of two >= 2."""
    count = int(math.log2(scale)) if scale >= 2 else 0
    if count < 1 or 2**count != scale:
        raise ValueError(f"the upscaling factor must be a power of two >= 2 (2, 4, 8), got {scale}")
    return count


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """The generator; see the module docstring."""

    def __init__(self, scale: int = 4, ngf: int = 64, blocks: int = 16) -> None:
        super().__init__()
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(3, ngf, 9, padding=4), nn.PReLU(ngf))
        self.trunk = nn.Sequential(
            *(ResidualBlock(ngf) for _ in range(blocks)),
            nn.Conv2d(ngf, ngf, 3, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
        )
        upsampling: list[nn.Module] = []
        for _ in range(doublings(scale)):
            upsampling += [nn.Conv2d(ngf, 4 * ngf, 3, padding=1), nn.PixelShuffle(2), nn.PReLU(ngf)]
        self.upsample = nn.Sequential(*upsampling)
        self.tail = nn.Sequential(nn.Conv2d(ngf, 3, 9, padding=4), nn.Tanh())

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        features = self.head(low)
        return self.tail(self.upsample(features + self.trunk(features)))


class SRDiscriminator(nn.Module):
    """The discriminator; see the module docstring."""

    def __init__(self, image_size: int = 64, ndf: int = 64) -> None:
        super().__init__()
        if image_size < 16 or image_size % 16:
            raise ValueError(f"the SRGAN discriminator needs an image size divisible by 16, got {image_size}")
        widths = [ndf, ndf, 2 * ndf, 2 * ndf, 4 * ndf, 4 * ndf, 8 * ndf, 8 * ndf]
        layers: list[nn.Module] = [nn.Conv2d(3, ndf, 3, padding=1), nn.LeakyReLU(0.2)]
        for i, (before, after) in enumerate(zip(widths, widths[1:]), start=1):
            stride = 2 if i % 2 else 1
            layers += [nn.Conv2d(before, after, 3, stride, 1, bias=False), nn.BatchNorm2d(after), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        side = image_size // 16
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(widths[-1] * side * side, 1024), nn.LeakyReLU(0.2), nn.Linear(1024, 1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images)).squeeze(1)

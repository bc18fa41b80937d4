"""DCGAN (Radford et al. 2016) generator and discriminator, generalised to any power-of-two size.

At 64x64: z (100) -> 4x4x(8*ngf) -> 8x8x(4*ngf) -> 16x16x(2*ngf) -> 32x32xngf -> 64x64x3 (tanh).
Batch norm everywhere except the generator output and the discriminator input, as in the paper;
the discriminator's normalisation is selectable because WGAN-GP critics must not mix samples.
The discriminator returns logits; the sigmoid lives in the loss (numerically stable under AMP).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def num_doublings(image_size: int) -> int:
    doublings = int(math.log2(image_size)) - 2  # 4x4 -> image_size
    if 2 ** (doublings + 2) != image_size or doublings < 2:
        raise ValueError(f"DCGAN needs a power-of-two image size >= 16, got {image_size}")
    return doublings


def feature_norm(kind: str, channels: int) -> nn.Module:
    """batch | layer (over C,H,W of each sample) | instance | none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; use batch, layer, instance or none")


def dcgan_init(module: nn.Module) -> None:
    """The paper's initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, z_dim: int = 100, ngf: int = 64, image_size: int = 64, channels: int = 3) -> None:
        super().__init__()
        self.z_dim = z_dim
        ups = num_doublings(image_size) - 1
        width = ngf * 2**ups
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(ups):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.z_dim, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, ndf: int = 64, image_size: int = 64, channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        downs = num_doublings(image_size) - 1
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        width = ndf
        for _ in range(downs):
            layers += [
                nn.Conv2d(width, width * 2, 4, 2, 1, bias=norm == "none"),
                feature_norm(norm, width * 2),
                nn.LeakyReLU(0.2, True),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).flatten()

"""The original GAN's networks (Goodfellow et al. 2014): fully connected, no convolutions.

Generator: z -> ReLU layers of 4, 8 and 16 x ngf units -> 3*H*W tanh outputs. Discriminator: two
maxout layers (4 x ndf units of 5 pieces each, as the paper's maxout discriminator) -> one logit.
Neither normalises over the batch, so data-parallel steps equal one large-batch step. The paper's
dropout in D is left out: it would make each rank's step random in its own way.
"""

from __future__ import annotations

import torch
from torch import nn


class Maxout(nn.Module):
    """A linear layer to `units * pieces` outputs, then the maximum over each unit's pieces."""

    def __init__(self, inputs: int, units: int, pieces: int = 5) -> None:
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(inputs, units * pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).view(-1, self.units, self.pieces).amax(dim=2)


class FullyConnectedGenerator(nn.Module):
    def __init__(self, z_dim: int = 100, ngf: int = 64, image_size: int = 64) -> None:
        super().__init__()
        self.image_size = image_size
        widths = [z_dim, 4 * ngf, 8 * ngf, 16 * ngf]
        layers: list[nn.Module] = []
        for inputs, outputs in zip(widths, widths[1:]):
            layers += [nn.Linear(inputs, outputs), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], 3 * image_size * image_size), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, 3, self.image_size, self.image_size)


class FullyConnectedDiscriminator(nn.Module):
    def __init__(self, ndf: int = 64, image_size: int = 64) -> None:
        super().__init__()
        units = 4 * ndf
        self.net = nn.Sequential(Maxout(3 * image_size * image_size, units), Maxout(units, units), nn.Linear(units, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.flatten(start_dim=1)).view(-1)

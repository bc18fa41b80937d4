"""Conditional DCGAN on binary attributes (e.g. CelebA's Male, Smiling, Eyeglasses).

The generator sees z concatenated with a learned embedding of the attribute vector; the
discriminator sees the image with one extra channel: the attributes embedded and reshaped to the
image size (the layout of the seeds' conditional GAN).
"""

from __future__ import annotations

import torch
from torch import nn

from gendist.models.dcgan import Discriminator, Generator


class ConditionalGenerator(nn.Module):
    def __init__(
        self, num_labels: int, z_dim: int = 100, label_dim: int = 50, ngf: int = 64, image_size: int = 64
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(num_labels, label_dim)
        self.net = Generator(z_dim + label_dim, ngf, image_size)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.embed(labels)], dim=1))


class ConditionalDiscriminator(nn.Module):
    def __init__(self, num_labels: int, ndf: int = 64, image_size: int = 64, norm: str = "batch") -> None:
        super().__init__()
        self.image_size = image_size
        self.embed = nn.Linear(num_labels, image_size * image_size)
        self.net = Discriminator(ndf, image_size, channels=4, norm=norm)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        plane = self.embed(labels).view(-1, 1, self.image_size, self.image_size)
        return self.net(torch.cat([images, plane.to(images.dtype)], dim=1))

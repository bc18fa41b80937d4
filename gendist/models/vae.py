"""Convolutional VAE at DCGAN scale: the encoder mirrors the discriminator, the decoder the generator.
The plain autoencoder (model.name=ae) is the same network with the code z = mu.

The decoder returns unbounded values: Bernoulli logits or Gaussian means, as the likelihood in
gendist.losses.vae reads them. With learn_sigma, `log_sigma` is the learned decoder std of the
"gaussian_learned" likelihood (one scalar, as in sigma-VAE); otherwise it is None, so DDP never
waits for the gradient of an unused parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from gendist.models.dcgan import Generator, num_doublings


class ConvVAE(nn.Module):
    def __init__(
        self,
        z_dim: int = 128,
        ngf: int = 64,
        ndf: int = 64,
        image_size: int = 64,
        channels: int = 3,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        downs = num_doublings(image_size)
        layers: list[nn.Module] = []
        width_in, width = channels, ndf
        for _ in range(downs):
            layers += [nn.Conv2d(width_in, width, 4, 2, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, True)]
            width_in, width = width, width * 2
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.to_stats = nn.Linear(width_in * 4 * 4, 2 * z_dim)
        decoder = Generator(z_dim, ngf, image_size, channels)
        self.decoder = nn.Sequential(*list(decoder.net.children())[:-1])  # no tanh: logits or means
        self.z_dim = z_dim
        # shape (1,), not (): DeepSpeed's initial parameter broadcast cannot take 0-dim tensors
        self.log_sigma = nn.Parameter(torch.zeros(1)) if learn_sigma else None

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.encoder(images)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.view(z.shape[0], self.z_dim, 1, 1))

    def forward(self, images: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction (decoder output), mu, logvar; z by the reparameterisation trick, or z = mu
        with `sample` off (the plain autoencoder's deterministic code)."""
        mu, logvar = self.encode(images)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decode(z), mu, logvar

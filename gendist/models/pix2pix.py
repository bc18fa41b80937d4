"""Pix2Pix (Isola et al. 2017) for inpainting: a U-Net generator and a PatchGAN discriminator.

Conventions. A mask ``m`` is (B, 1, H, W) with 1 in the hole and 0 on known pixels; images are in
[-1, 1]. The generator sees the masked image and the mask (``gendist.data.masks.masked_input``: 3 + 1 = 4 channels),
the discriminator sees that input and an image concatenated (4 + 3 = 7 channels), and training and
inference both keep the known pixels (``gendist.data.masks.composite``: G(x)*m + image*(1-m)).

Normalisation defaults to instance norm: batch norm with small per-GPU batches breaks Pix2Pix under
several GPUs (each rank normalises over its own few samples). ``norm`` takes ``feature_norm``'s kinds.

U-Net (``UNetGenerator``). ``n`` encoder layers, each conv 4x4 stride 2 -> norm -> LeakyReLU(0.2),
widths ngf, 2ngf, 4ngf, 8ngf, 8ngf, ...; no norm on the first layer (as the paper) nor on the
innermost one (its map can be 1x1, where instance norm is undefined). ``n`` decoder layers, each
transposed conv 4x4 stride 2 -> norm -> [dropout] -> ReLU, the decoder layer at each resolution
seeing its input concatenated with the encoder activations of that resolution (the skips); the last
one is transposed conv -> tanh. Default depth at 64 px: 5 downsamplings, a 2x2 bottleneck
(``log2(size) - 1``). Each bottleneck unit already sees 94 px > 64 (``unet_receptive_field(5)``), so
a 6th downsampling to 1x1 (the paper's 256 px depth relative to the image) adds no context, only an
8ngf layer and instance norm over 2x2 = 4 values per channel on its neighbours. ``downsamplings``
may be anything from 1 to log2(size) (6 at 64 px, bottleneck 1x1).

Dropout. The paper uses dropout 0.5 in the first three decoder layers (the innermost ones) as the
generator's only noise; ``dropout`` and ``dropout_layers`` default to that (the output layer never
drops). ``model.eval()`` turns dropout off (the paper also kept it on at test time: call
``enable_dropout`` for that). Under data parallelism each rank draws its own masks from its own RNG
for its own samples, and only gradients are averaged; seed the ranks differently (seed + rank) or
they draw the same masks for the same batch positions - still correct, but less varied noise.

PatchGAN (``PatchDiscriminator``). ``layers`` convs 4x4 stride 2 (widths ndf, 2ndf, 4ndf, at most
8ndf; no norm on the first), one 4x4 stride-1 conv with norm, and a 4x4 stride-1 conv to one logit
per patch. The receptive field is ``receptive_field(layers) = 9 * 2**layers - 2``: 16, 34, 70, 142 px
for 1 to 4 layers. The paper's 70 px (3 layers) is 27% of a 256 px image but the whole of a 64 px
one (an ImageGAN), so the default is 2 layers: 34 px, about half of 64 px; its output at 64 px is
(B, 1, 14, 14) logits (``patch_grid``). 1 layer (16 px, a quarter) suits 32 px images.

Initialisation: N(0, 0.02) convolution weights, zero biases, N(1, 0.02) norm scales, as the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from gendist.models.dcgan import dcgan_init, feature_norm


def pix2pix_init(module: nn.Module) -> None:
    """The paper's initialisation: N(0, 0.02) conv weights, zero conv biases, N(1, 0.02) norm scales."""
    dcgan_init(module)
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.bias is not None:
        nn.init.zeros_(module.bias)


def enable_dropout(model: nn.Module) -> nn.Module:
    """Put only the dropout layers back in training mode (the paper's test-time dropout); returns model."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.train()
    return model


def unet_receptive_field(downsamplings: int) -> int:
    """Receptive field in pixels of one bottleneck unit after that many conv 4x4 stride 2 layers."""
    return 1 + 3 * (2**downsamplings - 1)


def _max_downsamplings(image_size: int) -> int:
    n = 0
    while image_size % 2 ** (n + 1) == 0:
        n += 1
    return n


def _width(base: int, level: int) -> int:
    return base * min(2**level, 8)


class UNetGenerator(nn.Module):
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        ngf: int = 64,
        image_size: int = 64,
        downsamplings: int | None = None,
        norm: str = "instance",
        dropout: float = 0.5,
        dropout_layers: int = 3,
    ) -> None:
        super().__init__()
        most = _max_downsamplings(image_size)
        n = max(most - 1, 1) if downsamplings is None else downsamplings
        if not 1 <= n <= most:
            raise ValueError(f"{image_size} px allows 1 to {most} downsamplings (to a 1x1 bottleneck), got {n}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.downsamplings = n
        self.image_size = image_size
        widths = [_width(ngf, i) for i in range(n)]

        self.encoder = nn.ModuleList()
        channels = in_channels
        for i, width in enumerate(widths):
            plain = i == 0 or i == n - 1  # no norm on the input layer and the bottleneck
            self.encoder.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 4, 2, 1, bias=plain or norm == "none"),
                    nn.Identity() if plain else feature_norm(norm, width),
                    nn.LeakyReLU(0.2, True),
                )
            )
            channels = width

        self.decoder = nn.ModuleList()
        for j in range(n):  # j = 0 is the innermost decoder layer
            skip = widths[n - 1 - j]
            in_width = skip if j == 0 else 2 * skip
            if j == n - 1:
                self.decoder.append(nn.Sequential(nn.ConvTranspose2d(in_width, out_channels, 4, 2, 1), nn.Tanh()))
                continue
            width = widths[n - 2 - j]
            layers: list[nn.Module] = [
                nn.ConvTranspose2d(in_width, width, 4, 2, 1, bias=norm == "none"),
                feature_norm(norm, width),
            ]
            if j < dropout_layers and dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.ReLU(True))
            self.decoder.append(nn.Sequential(*layers))
        self.apply(pix2pix_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2**self.downsamplings or x.shape[-2] % 2**self.downsamplings:
            raise ValueError(f"height and width must be multiples of {2**self.downsamplings}, got {tuple(x.shape)}")
        skips = []
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        x = self.decoder[0](skips[-1])
        for layer, skip in zip(self.decoder[1:], reversed(skips[:-1])):
            x = layer(torch.cat([x, skip], dim=1))
        return x


def receptive_field(layers: int) -> int:
    """Receptive field in pixels of one PatchGAN logit: 9 * 2**layers - 2 (16, 34, 70, 142 for 1-4)."""
    field = 1
    for stride in reversed([2] * layers + [1, 1]):  # from the logit back to the input; every kernel is 4
        field = (field - 1) * stride + 4
    return field


def patch_grid(image_size: int, layers: int) -> int:
    """Side of the PatchGAN's logit map: image_size / 2**layers - 2 (14 at 64 px with 2 layers)."""
    return image_size // 2**layers - 2


class PatchDiscriminator(nn.Module):
    def __init__(
        self, in_channels: int = 7, ndf: int = 64, layers: int = 2, image_size: int = 64, norm: str = "instance"
    ) -> None:
        super().__init__()
        if layers < 1 or image_size % 2**layers or patch_grid(image_size, layers) < 1:
            raise ValueError(f"{layers} stride-2 layers leave no patch map at {image_size} px")
        self.layers = layers
        self.receptive_field = receptive_field(layers)
        net: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            new = _width(ndf, i)
            net += [
                nn.Conv2d(width, new, 4, stride, 1, bias=norm == "none"),
                feature_norm(norm, new),
                nn.LeakyReLU(0.2, True),
            ]
            width = new
        net.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*net)
        self.apply(pix2pix_init)

    def forward(self, condition: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 4, H, W) generator input and (B, 3, H, W) image, or both already concatenated -> (B, 1, h, w)."""
        x = condition if image is None else torch.cat([condition, image.to(condition.dtype)], dim=1)
        return self.net(x)

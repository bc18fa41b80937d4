"""CycleGAN (Zhu et al. 2017) networks: a ResNet generator; the discriminators are PatchGANs.

Conventions. Images are in [-1, 1], (B, 3, H, W) in and out. A CycleGAN has two generators (A -> B
and B -> A) and two discriminators, one per domain; each discriminator sees one image, so it is
``gendist.models.pix2pix.PatchDiscriminator(in_channels=3)``, called with that image alone (its
``layers=2`` default, a 34 px receptive field, is the 64 px counterpart of the paper's 70 px at 256 px;
note its instance norm is ``feature_norm``'s, with a learnt scale and shift).

ResNet generator (``ResnetGenerator``), after Johnson et al. 2016 as the paper and the reference code
(junyanz/pytorch-CycleGAN-and-pix2pix, ``resnet_6blocks``): c7s1-ngf (reflection pad 3, conv 7x7,
norm, ReLU); ``downsamplings`` convs 3x3 stride 2, each doubling the width (ngf -> 2ngf -> 4ngf),
norm, ReLU; ``blocks`` residual blocks at that width (``ResnetBlock``: pad 1, conv 3x3, norm, ReLU,
[dropout], pad 1, conv 3x3, norm; output x + f(x)); ``downsamplings`` transposed convs 3x3 stride 2
(output padding 1, so exactly 2x), each halving the width, norm, ReLU; c7s1-3 (reflection pad 3,
conv 7x7) and tanh. ``padding`` (reflect | replicate | zero) is the residual blocks' padding, as the
reference's ``padding_type``; the two 7x7 convs always pad by reflection, as there. No dropout by
default: the paper uses none (the reference's ``--no_dropout`` default for CycleGAN).

Depth at 64 px. The paper uses 6 blocks at 128 px and 9 at 256 px and above, always 2
downsamplings. The default here is the paper's 128 px network unchanged: 2 downsamplings (a 16x16x256
bottleneck at 64 px) and 6 blocks. One bottleneck unit sees ``resnet_receptive_field(6, 2)`` = 109 px,
more than the whole 64 px face (at 128 px the same network sees 85% of the image, at 256 px the 9
block one 61%), so fewer blocks would still see the whole image - 3 blocks see 61 px - but the blocks
are also the translation's capacity, and keeping the paper's network makes results comparable with
the reference's ``resnet_6blocks``. A 3rd downsampling (8x8 bottleneck) is possible but not what the
paper does at any size.

Normalisation. ``norm="instance"`` is the reference's instance norm: ``nn.InstanceNorm2d(affine=False,
track_running_stats=False)`` - no learnt scale or shift, and statistics of the sample itself in
training and in eval() alike. The other kinds are ``feature_norm``'s (batch, layer, none); batch norm
is not the default because with small per-GPU batches each rank normalises over its own few samples.
Convolutions followed by a norm have no bias (a per-channel bias before instance norm is cancelled
by its mean subtraction; the reference keeps those dead biases), as ``gendist.models.pix2pix``; the
output conv has one. Parameters at ngf=64: 7,833,987 for 6 blocks (the reference's 7,837,699 less
its 3,712 dead biases), 11,372,931 for 9 blocks (reference 11,378,179).

Initialisation: ``pix2pix_init``, N(0, 0.02) convolution weights and zero biases, as the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from gendist.models.dcgan import feature_norm
from gendist.models.pix2pix import pix2pix_init

PADDINGS = ("reflect", "replicate", "zero")


def resnet_norm(kind: str, channels: int) -> nn.Module:
    """instance (the reference's: affine=False, no running statistics) | feature_norm's batch, layer, none."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return feature_norm(kind, channels)


def resnet_receptive_field(blocks: int, downsamplings: int = 2) -> int:
    """Receptive field in pixels of one bottleneck unit (after the residual blocks): 109 for 6 blocks and
    2 downsamplings, 157 for 9. A 7x7 conv, 3x3 stride-2 convs, then two 3x3 convs per block."""
    jump = 2**downsamplings
    return 7 + 2 * (jump - 1) + blocks * 2 * 2 * jump


def _padded_conv3x3(channels: int, padding: str, bias: bool) -> list[nn.Module]:
    if padding == "zero":
        return [nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)]
    pad = nn.ReflectionPad2d(1) if padding == "reflect" else nn.ReplicationPad2d(1)
    return [pad, nn.Conv2d(channels, channels, 3, 1, 0, bias=bias)]


class ResnetBlock(nn.Module):
    """x + f(x), f = pad, conv 3x3, norm, ReLU, [dropout], pad, conv 3x3, norm; same shape in and out."""

    def __init__(self, channels: int, norm: str = "instance", padding: str = "reflect", dropout: float = 0.0) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; use {', '.join(PADDINGS)}")
        bias = norm == "none"
        body: list[nn.Module] = [*_padded_conv3x3(channels, padding, bias), resnet_norm(norm, channels), nn.ReLU(True)]
        if dropout > 0:
            body.append(nn.Dropout(dropout))
        body += [*_padded_conv3x3(channels, padding, bias), resnet_norm(norm, channels)]
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ngf: int = 64,
        blocks: int = 6,
        downsamplings: int = 2,
        norm: str = "instance",
        padding: str = "reflect",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if blocks < 0 or downsamplings < 0:
            raise ValueError(f"blocks and downsamplings must be >= 0, got {blocks} and {downsamplings}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.blocks = blocks
        self.downsamplings = downsamplings
        bias = norm == "none"
        net: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, 1, 0, bias=bias),
            resnet_norm(norm, ngf),
            nn.ReLU(True),
        ]
        width = ngf
        for _ in range(downsamplings):
            net += [nn.Conv2d(width, 2 * width, 3, 2, 1, bias=bias), resnet_norm(norm, 2 * width), nn.ReLU(True)]
            width *= 2
        net += [ResnetBlock(width, norm, padding, dropout) for _ in range(blocks)]
        for _ in range(downsamplings):
            net += [
                nn.ConvTranspose2d(width, width // 2, 3, 2, 1, output_padding=1, bias=bias),
                resnet_norm(norm, width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        net += [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7, 1, 0), nn.Tanh()]
        self.net = nn.Sequential(*net)
        self.apply(pix2pix_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = 2**self.downsamplings
        if x.shape[-1] % step or x.shape[-2] % step:
            raise ValueError(f"height and width must be multiples of {step}, got {tuple(x.shape)}")
        return self.net(x)

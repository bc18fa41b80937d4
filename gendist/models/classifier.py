"""A small ResNet that predicts face attributes: one logit per attribute.

Layout (``AttributeClassifier``), a ResNet-18 shrunk to 64 px faces: a stem conv 3x3 stride 2
(3 -> width channels, norm, ReLU; 64 px -> 32 px), then four stages of ``blocks`` basic residual
blocks (He et al. 2016: conv 3x3, norm, ReLU, conv 3x3, norm, added to the input - through a 1x1
stride-2 conv and norm where the shape changes - then ReLU) at widths width, 2 width, 4 width and
8 width, the first block of stages 2-4 halving the resolution (64 px: 32, 16, 8, 4 px; 32 px: 16,
8, 4, 2 px); then global average pooling to the feature vector (8 width values) and a linear head to
one logit per attribute. width=64 with blocks=2 are ResNet-18's widths and depth (11.19M parameters
for 40 attributes) without its 7x7 stem and max pool, which would leave a 64 px face 2x2 at the end.

Layers for later uses. ``features(x)`` is the pooled vector (B, 8 width) the head reads: the
embedding for a Frechet distance in attribute space. ``feature_maps(x)`` returns the stem's and each
stage's output maps, in order; ``self.stem`` and ``self.stages`` (an nn.ModuleList, stage i at
resolution size / 2^(i+1)) are the named layers a hook can pick (Deep Dream on ``stages[2]``).

Normalisation (``norm``). "batch" (the default) is the usual choice for a classifier: statistics
across the batch, so an image keeps its own global brightness, colour and contrast - what attributes
such as Pale_Skin, Blond_Hair, Gray_Hair or Blurry are. Under several ranks each normalises over its
own per-rank batch (data.batch_size, 128 in the CelebA preset: plenty for stable statistics, as
ImageNet ResNets train at 32 per GPU), so a 2-rank step is not exactly a 1-rank step of twice the
batch; the running statistics are averaged across ranks before every grid, evaluation and checkpoint
(gendist.distributed.average_buffers). SyncBatchNorm would add a collective per layer for little at
these batch sizes. "group" normalises each image over groups of 16 channels (at most 32 groups):
independent of the batch and the number of ranks, at the cost of removing each image's mean and
scale within a group. Instance norm is not offered: per image and channel it erases exactly the
global contrasts several attributes consist of.

Initialisation: convolutions Kaiming-normal (fan_out, ReLU gain), as torchvision's ResNets; norm
scales 1 and shifts 0; the linear head keeps torch's default (uniform, bound 1/sqrt(fan_in)).
Convolutions followed by a norm have no bias. A plain nn.Module: no distributed or precision code.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "group"]
GROUP_CHANNELS, MAX_GROUPS = 16, 32


def classifier_norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, min(MAX_GROUPS, max(1, channels // GROUP_CHANNELS))), channels)
    raise ValueError(f"classifier norm must be batch or group, got {kind!r}")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """conv 3x3 (stride), norm, ReLU, conv 3x3, norm; + the input (1x1 conv and norm where the shape
    changes); ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: Norm) -> None:
        super().__init__()
        self.conv1, self.norm1 = conv3x3(in_channels, out_channels, stride), classifier_norm(norm, out_channels)
        self.conv2, self.norm2 = conv3x3(out_channels, out_channels), classifier_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), classifier_norm(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class AttributeClassifier(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> logits (B, num_attributes); see the module docstring."""

    def __init__(
        self, num_attributes: int, width: int = 64, image_size: int = 64, blocks: int = 2, norm: Norm = "batch"
    ) -> None:
        super().__init__()
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"image_size must be a power of two >= 16, got {image_size}")
        if num_attributes < 1 or width < 1 or blocks < 1:
            raise ValueError("num_attributes, width and blocks must be >= 1")
        self.stem = nn.Sequential(conv3x3(3, width, stride=2), classifier_norm(norm, width), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        channels = width
        for i in range(4):
            out = width * 2**i
            stage = [BasicBlock(channels, out, 1 if i == 0 else 2, norm)]
            stage += [BasicBlock(out, out, 1, norm) for _ in range(blocks - 1)]
            self.stages.append(nn.Sequential(*stage))
            channels = out
        self.feature_dim = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_attributes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's output, then each stage's, in order (at size/2, size/2, size/4, size/8, size/16)."""
        maps = [self.stem(x)]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        return maps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector (B, 8 width) the head reads."""
        out = self.stem(x)
        for stage in self.stages:
            out = stage(out)
        return self.pool(out).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

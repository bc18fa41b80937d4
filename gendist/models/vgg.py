"""VGG19 features for SRGAN's content loss (Ledig et al. 2017), from torchvision's weights file.

The paper's VGG54 is the feature map after the 4th convolution's ReLU before the 5th max-pool
(relu5_4 here), VGG22 the one before the 2nd (relu2_2). Training clusters are often offline, so the
file is never downloaded: it is looked for where torch.hub keeps it, or at an explicit path, and its
size and sha256 prefix are checked before loading. The features are returned as computed, NOT
rescaled: the paper's 1/12.75 rescaling is left to the content loss weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs

from gendist import weights_file

RANDOM = "random"
WEIGHTS_URL = torchvision.models.VGG19_Weights.IMAGENET1K_V1.url
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]  # vgg19-dcbb9e9d.pth
SHA256_PREFIX = weights_file.hub_sha256_prefix(WEIGHTS_FILE)
SETTING_KEY = "srgan.vgg_weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsError(FileNotFoundError):
    """The VGG19 weights are missing or are not torchvision's file."""


def _layer_names() -> tuple[str, ...]:
    """torchvision's vgg19.features in order, named conv<block>_<n> / relu<block>_<n> / pool<block>."""
    names, block, conv = [], 1, 0
    for entry in cfgs["E"]:
        if entry == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
    return tuple(names)


def _tensor_bytes() -> int:
    """The bytes of the full vgg19 state dict's tensors (574,668,960), counted on a storage-free copy."""
    with torch.device("meta"):
        state = torchvision.models.vgg19(weights=None).state_dict()
    return sum(tensor.nbytes for tensor in state.values())


LAYERS = _layer_names()
TENSOR_BYTES = _tensor_bytes()


def layer_index(layer: str) -> int:
    """The index of `layer` (e.g. relu5_4 -> 35) in torchvision's vgg19.features."""
    if layer not in LAYERS:
        raise ValueError(f"unknown VGG19 layer {layer!r}; valid: {', '.join(LAYERS)}")
    return LAYERS.index(layer)


def default_weights_path() -> Path:
    return weights_file.hub_checkpoint_path(WEIGHTS_FILE)


def resolve_weights(setting: str) -> Path:
    """The checked weights file for srgan.vgg_weights ('' = torch.hub's place); never downloads."""
    path = Path(setting).expanduser() if setting else default_weights_path()
    if not path.is_file():
        reason = f"{SETTING_KEY}={setting} does not exist" if setting else f"{path} does not exist (never downloaded)"
        raise VGGWeightsError(weights_file.missing_message("VGG19 weights", WEIGHTS_URL, path, reason, SETTING_KEY))
    expected = f"torchvision's {WEIGHTS_FILE}"
    weights_file.check_size(path, TENSOR_BYTES, expected, VGGWeightsError)
    weights_file.check_sha256_prefix(path, SHA256_PREFIX, expected, VGGWeightsError)
    return path


def init_like_torchvision(features: nn.Sequential) -> None:
    """torchvision's VGG init of the convolutions (as in VGG.__init__), seeded, leaving the global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)


class VGG19Features(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> the frozen VGG19 feature map at `layer` (relu5_4: VGG54),
    ImageNet-normalised inside as torchvision's weights expect. `setting` as srgan.vgg_weights:
    "" (torch.hub's place), a path, or "random" (seeded random init; tests and smoke runs only)."""

    def __init__(self, setting: str, layer: str = "relu5_4") -> None:
        super().__init__()
        last = layer_index(layer)
        with torch.device("meta"):  # the architecture without the 120M-parameter classifier's init
            features = torchvision.models.vgg19(weights=None).features[: last + 1]
        self.features = features.to_empty(device="cpu")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if setting == RANDOM:
            init_like_torchvision(self.features)
        else:
            path = resolve_weights(setting)
            load_features_state(self, torch.load(path, map_location="cpu", weights_only=True), source=str(path))
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(((images + 1) / 2 - self.mean) / self.std)


def load_features_state(
    net: VGG19Features, state_dict: Mapping[str, torch.Tensor], source: str = "the state dict"
) -> None:
    """Copy the `features.N.*` tensors that `net` keeps from a torchvision vgg19 state dict (the rest,
    classifier.* and deeper layers, is ignored); missing keys or wrong shapes raise VGGWeightsError."""
    needed = net.state_dict()
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise VGGWeightsError(f"{source} lacks {', '.join(missing)}: not torchvision's vgg19 state dict")
    wrong = [
        f"{key} {tuple(state_dict[key].shape)} (expected {tuple(tensor.shape)})"
        for key, tensor in needed.items()
        if state_dict[key].shape != tensor.shape
    ]
    if wrong:
        raise VGGWeightsError(f"{source} has wrong shapes: {', '.join(wrong)}; not torchvision's vgg19 state dict")
    net.load_state_dict({key: state_dict[key] for key in needed})

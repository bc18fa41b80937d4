"""pytorch-fid's Inception (pool3, 2048 features) with checked weights that can live anywhere.

pytorch-fid builds its network and fetches the weights in one call (`fid_inception_v3` calls
`load_state_dict_from_url`). gendist keeps that exact architecture and only decides where the
state dict comes from: pytorch-fid's file in $TORCH_HOME (downloaded there when missing and
online), an explicit path (offline clusters), or, for tests, a seeded random initialisation.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.error import URLError

import torch
from pytorch_fid import inception as fid_inception
from torch import nn

from gendist import weights_file

RANDOM = "random"
WEIGHTS_URL = fid_inception.FID_WEIGHTS_URL
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]  # pt_inception-2015-12-05-6726825d.pth
SHA256_PREFIX = weights_file.hub_sha256_prefix(WEIGHTS_FILE)
# The state dict's tensors take 95,542,320 bytes; the file adds the zip/pickle framing.
TENSOR_BYTES = 95_542_320
SETTING_KEY = "eval.inception_weights"


class InceptionWeightsError(FileNotFoundError):
    """The FID weights are missing or are not pytorch-fid's file."""


def default_weights_path() -> Path:
    return weights_file.hub_checkpoint_path(WEIGHTS_FILE)


def weights_id(setting: str) -> str:
    """What identifies the weights in a protocol and a cache key."""
    return "random-init-seed0 (NOT comparable FID)" if setting == RANDOM else f"pytorch-fid {WEIGHTS_FILE}"


def _missing_message(path: Path, reason: str) -> str:
    return weights_file.missing_message("FID Inception weights", WEIGHTS_URL, path, reason, SETTING_KEY)


def verify_weights(path: Path) -> None:
    expected = f"pytorch-fid's {WEIGHTS_FILE}"
    weights_file.check_size(path, TENSOR_BYTES, expected, InceptionWeightsError)
    weights_file.check_sha256_prefix(
        path, SHA256_PREFIX, f"{expected}, and its FID would not be comparable", InceptionWeightsError
    )


def resolve_weights(setting: str, download_timeout_s: float = 60.0) -> Path:
    """The checked weights file for eval.inception_weights ('' = pytorch-fid's default place)."""
    if setting:
        path = Path(setting).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(_missing_message(path, f"eval.inception_weights={setting} does not exist"))
    else:
        path = default_weights_path()
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(download_timeout_s)  # a blocked network fails instead of hanging
            try:
                torch.hub.download_url_to_file(WEIGHTS_URL, str(path), hash_prefix=SHA256_PREFIX, progress=False)
            except (URLError, OSError, RuntimeError) as err:
                raise InceptionWeightsError(_missing_message(path, f"the download failed ({err})")) from err
            finally:
                socket.setdefaulttimeout(previous)
    verify_weights(path)
    return path


@contextmanager
def _state_dict_source(weights: Path | None):
    """Make pytorch-fid's loader return the given weights, or the fresh network's own (random) ones."""
    built: dict[str, nn.Module] = {}
    build = fid_inception._inception_v3

    def keep(*args, **kwargs) -> nn.Module:
        built["net"] = build(*args, **kwargs)
        return built["net"]

    def load(url: str, progress: bool = True) -> dict:
        if weights is not None:
            return torch.load(weights, map_location="cpu", weights_only=True)
        return built["net"].state_dict()

    original_build, original_load = fid_inception._inception_v3, fid_inception.load_state_dict_from_url
    fid_inception._inception_v3, fid_inception.load_state_dict_from_url = keep, load
    try:
        yield
    finally:
        fid_inception._inception_v3, fid_inception.load_state_dict_from_url = original_build, original_load


def fid_inception_network(setting: str) -> nn.Module:
    """pytorch-fid's InceptionV3 up to pool3, in eval mode: images in [0, 1] -> [pool3 (B, 2048, 1, 1)],
    resized to 299x299 inside. `setting` as eval.inception_weights ("random": seeded He init)."""
    weights = None if setting == RANDOM else resolve_weights(setting)
    with _state_dict_source(weights), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        if weights is None:
            # PyTorch's default init shrinks activations ~3x per layer (features ~1e-8 at the
            # end); He init keeps them O(1) so a random network still separates inputs.
            for module in net.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.eval()


class FidInception(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> pool3 features (B, 2048), as pytorch-fid computes them:
    bilinear resize to 299x299, scale to [-1, 1], Inception up to the final average pool."""

    def __init__(self, setting: str) -> None:
        super().__init__()
        self.net = fid_inception_network(setting)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(memory_format=torch.channels_last))[0].flatten(1)


class DreamInception(nn.Module):
    """The FID Inception as Deep Dream sees a network: images in [-1, 1] -> pool3 features (B, 2048),
    with gradients; its four blocks (up to pool1, pool2, Mixed_6e, pool3) are `stages`."""

    def __init__(self, setting: str) -> None:
        super().__init__()
        self.net = fid_inception_network(setting)
        self.stages = self.net.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images + 1) / 2)[0].flatten(1)

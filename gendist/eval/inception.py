"""pytorch-fid's Inception (pool3, 2048 features) with checked weights that can live anywhere.

pytorch-fid builds its network and fetches the weights in one call (`fid_inception_v3` calls
`load_state_dict_from_url`). gendist keeps that exact architecture and only decides where the
state dict comes from: pytorch-fid's file in $TORCH_HOME (downloaded there when missing and
online), an explicit path (offline clusters), or, for tests, a seeded random initialisation.
"""

from __future__ import annotations

import hashlib
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.error import URLError

import torch
from pytorch_fid import inception as fid_inception
from torch import nn

RANDOM = "random"
WEIGHTS_URL = fid_inception.FID_WEIGHTS_URL
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]  # pt_inception-2015-12-05-6726825d.pth
SHA256_PREFIX = WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]  # torch.hub's convention: the name ends in it
# The state dict's tensors take 95,542,320 bytes; the file adds the zip/pickle framing. The exact
# byte count is not published, so a size outside this window marks a truncated or foreign file
# before the (definitive) sha256 check.
TENSOR_BYTES = 95_542_320
SIZE_WINDOW = (TENSOR_BYTES, TENSOR_BYTES + 4 * 2**20)


class InceptionWeightsError(FileNotFoundError):
    """The FID weights are missing or are not pytorch-fid's file."""


def default_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def weights_id(setting: str) -> str:
    """What identifies the weights in a protocol and a cache key."""
    return "random-init-seed0 (NOT comparable FID)" if setting == RANDOM else f"pytorch-fid {WEIGHTS_FILE}"


def _missing_message(path: Path, reason: str) -> str:
    return (
        f"FID Inception weights not found: {reason}.\n"
        f"  On a machine with internet, download {WEIGHTS_URL}\n"
        f"  and place it at {path}\n"
        f"  (that is $TORCH_HOME/hub/checkpoints/{WEIGHTS_FILE}; TORCH_HOME defaults to ~/.cache/torch),\n"
        f"  or put it anywhere and set eval.inception_weights=/path/to/{WEIGHTS_FILE}."
    )


def verify_weights(path: Path) -> None:
    size = path.stat().st_size
    if not SIZE_WINDOW[0] <= size <= SIZE_WINDOW[1]:
        raise InceptionWeightsError(
            f"{path} has {size:,} bytes; pytorch-fid's {WEIGHTS_FILE} has about "
            f"{TENSOR_BYTES:,}: truncated download or a different file"
        )
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(SHA256_PREFIX):
        raise InceptionWeightsError(
            f"{path}: sha256 {digest.hexdigest()[:16]}... does not start with {SHA256_PREFIX}; "
            f"it is not pytorch-fid's {WEIGHTS_FILE}, and its FID would not be comparable"
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


class FidInception(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> pool3 features (B, 2048), as pytorch-fid computes them:
    bilinear resize to 299x299, scale to [-1, 1], Inception up to the final average pool."""

    def __init__(self, setting: str) -> None:
        super().__init__()
        weights = None if setting == RANDOM else resolve_weights(setting)
        with _state_dict_source(weights), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
            if weights is None:
                # PyTorch's default init shrinks activations ~3x per layer (features ~1e-8 at the
                # end); He init keeps them O(1) so a random network still separates inputs.
                for module in self.net.modules():
                    if isinstance(module, nn.Conv2d):
                        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(memory_format=torch.channels_last))[0].flatten(1)

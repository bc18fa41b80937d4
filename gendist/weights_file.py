"""Checks for a pretrained weights file that a user fetched by hand (offline clusters).

torch.hub names a file `<name>-<sha256 prefix>.<ext>`; a file whose size is outside the window of its
tensors plus some framing is truncated or foreign before the (definitive) sha256 check reads it all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

FRAMING_BYTES = 4 * 2**20  # zip/pickle framing above the tensors' own bytes; exact sizes are not published


def hub_checkpoint_path(file_name: str) -> Path:
    """Where torch.hub keeps `file_name`: $TORCH_HOME/hub/checkpoints (TORCH_HOME defaults to ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def hub_sha256_prefix(file_name: str) -> str:
    """torch.hub's convention: vgg19-dcbb9e9d.pth -> dcbb9e9d."""
    return file_name.rsplit("-", 1)[1].split(".")[0]


def missing_message(what: str, url: str, path: Path, reason: str, setting: str) -> str:
    """How to get the file onto an offline machine; `setting` is the config key that points elsewhere."""
    file_name = url.rsplit("/", 1)[1]
    return (
        f"{what} not found: {reason}.\n"
        f"  On a machine with internet, download {url}\n"
        f"  and place it at {path}\n"
        f"  (that is $TORCH_HOME/hub/checkpoints/{file_name}; TORCH_HOME defaults to ~/.cache/torch),\n"
        f"  or put it anywhere and set {setting}=/path/to/{file_name}."
    )


def check_size(path: Path, tensor_bytes: int, expected: str, error: type[Exception]) -> None:
    """Raise `error` unless the file holds tensor_bytes plus at most FRAMING_BYTES; `expected` names the file."""
    size = path.stat().st_size
    if not tensor_bytes <= size <= tensor_bytes + FRAMING_BYTES:
        raise error(
            f"{path} has {size:,} bytes; {expected} has about {tensor_bytes:,}: truncated download or a different file"
        )


def sha256_hex(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256_prefix(path: Path, prefix: str, expected: str, error: type[Exception]) -> None:
    """Raise `error` unless the file's sha256 starts with `prefix`; `expected` names the file."""
    digest = sha256_hex(path)
    if not digest.startswith(prefix):
        raise error(f"{path}: sha256 {digest[:16]}... does not start with {prefix}; it is not {expected}")

"""The cached real statistics an FID is measured against, keyed by what determines them.

The key hashes the split's shard list (names, counts, sha256) and preprocessing from the shard
manifest, the split, the number of reference images and the Inception weights: a re-converted
dataset, another crop or another split gets new statistics, never stale ones. One `.npz` holds
mean, covariance and its square root (float64, for FID), the features (float32, for KID) and the
attributes of the reference images (the label distribution of conditional models).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gendist.data.shards import read_manifest

FORMAT = "gendist-fid-stats/1"


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    sqrt_sigma: np.ndarray
    features: np.ndarray
    attrs: np.ndarray
    key: str
    path: Path
    description: dict

    @property
    def count(self) -> int:
        return len(self.attrs)


def describe(shard_dir: str, split: str, num_real: int, inception: str) -> tuple[str, dict]:
    """(key, description) of the reference statistics for these settings."""
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ValueError(
            f"{shard_dir} has no '{split}' split for the FID reference; it has {', '.join(manifest['splits'])}"
        )
    entry = manifest["splits"][split]
    described = {
        "format": FORMAT,
        "split": split,
        "images": min(num_real, entry["count"]) if num_real else entry["count"],
        "shards": [[s["name"], s["count"], s["sha256"]] for s in entry["shards"]],
        "preprocessing": manifest["preprocessing"],
        "inception": inception,
    }
    key = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return key, described


def cache_path(stats_dir: str | Path, shard_dir: str, split: str, images: int, key: str) -> Path:
    return Path(stats_dir).expanduser() / f"{Path(shard_dir).name}-{split}-{images}-{key[:16]}.npz"


def save(reference: Reference) -> None:
    """Write atomically: a reader never sees a half-written file."""
    reference.path.parent.mkdir(parents=True, exist_ok=True)
    partial = reference.path.with_name(f".{reference.path.name}.{os.getpid()}.partial")
    with partial.open("wb") as sink:
        np.savez(
            sink,
            mu=reference.mu,
            sigma=reference.sigma,
            sqrt_sigma=reference.sqrt_sigma,
            features=reference.features,
            attrs=reference.attrs,
            description=np.array(json.dumps(reference.description)),
        )
    os.replace(partial, reference.path)


def load(path: Path, key: str) -> Reference:
    with np.load(path, allow_pickle=False) as stored:
        description = json.loads(str(stored["description"]))
        reference = Reference(
            stored["mu"],
            stored["sigma"],
            stored["sqrt_sigma"],
            stored["features"],
            stored["attrs"],
            key,
            path,
            description,
        )
    stored_key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    if stored_key != key:
        raise ValueError(
            f"{path} holds statistics for other settings (key {stored_key[:16]}, wanted {key[:16]}); delete it"
        )
    return reference

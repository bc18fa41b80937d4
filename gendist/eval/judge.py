"""gendist's own face judge: a trained attribute classifier run (model.name=classifier) named by
`eval.classifier=RUN_DIR`, loaded to score what other families make.

What it gives: per image, the logits over the classifier's attributes and its pooled feature vector
(gendist.models.classifier: the vector its head reads). From those the evaluator measures a Fréchet
distance in face-feature space (FD_face: measurable where the Inception weights are not, trained on
faces, and NOT comparable with FID or any published number), precision/recall in that space, whether
a conditional GAN's samples have the attributes they were generated with, and how often a CycleGAN
translation lands in the target domain.

Refused on load: a run of another family, a checkpoint-less run, and a classifier trained on images
of another size or crop than the data being judged (the crop and resize are read from the run's
data.json, which every training run writes beside its config.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from gendist import distributed
from gendist.config import ConfigError, load_config
from gendist.trained import find_checkpoint, load_network
from gendist.training.config_record import DATA_RECORD, read_data_record

# the preprocessing fields that must match between the judge's training data and the judged data
MATCHED = ("size", "crop_fraction", "crop", "resize")


@dataclass
class Judge:
    network: nn.Module  # the classifier (its EMA copy where the run has one), eval mode, on the device
    attributes: list[str]  # what its logits predict, column by column
    source: dict  # run, checkpoint, step, network, preprocessing: recorded with every score it gives

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] -> (logits (B, A), features (B, F)), float32."""
        features = self.network.features(images * 2 - 1).float()
        return self.network.head(features).float(), features

    def columns(self, names: list[str]) -> tuple[list[int], list[int]]:
        """For the judged attributes among `names`: their indices in `names` and in the judge's logits."""
        shared = [name for name in names if name in self.attributes]
        return [names.index(name) for name in shared], [self.attributes.index(name) for name in shared]


def load_judge(run_dir: str | Path, device: torch.device, preprocessing: dict, key: str = "eval.classifier") -> Judge:
    """The classifier of `run_dir` (latest complete checkpoint) for data converted with `preprocessing`;
    `key` is the setting that named it (errors quote it)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{key}={run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.model.name != "classifier":
        raise ConfigError(f"{key}={run_dir} is a {cfg.model.name} run; it must be a classifier run")
    trained_on = read_data_record(run_dir)
    if trained_on is None:
        raise ConfigError(
            f"{key}={run_dir} has no {DATA_RECORD} (what it was trained on, written at each launch "
            f"since gendist records it): relaunch it once, `gendist train --config {run_dir / 'config.yaml'}`; "
            "a finished run resumes, writes it and ends"
        )
    theirs, ours = trained_on["preprocessing"], preprocessing
    differing = [key for key in MATCHED if theirs.get(key) != ours.get(key)]
    if differing:
        raise ConfigError(
            f"{key}={run_dir} was trained on images preprocessed otherwise than these "
            + "; ".join(f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} here" for key in differing)
        )
    checkpoint = find_checkpoint(run_dir, None)
    trained = load_network(run_dir, checkpoint, "classifier", [])
    attributes = list(cfg.classifier.attributes) or list(trained_on["attribute_names"])
    source = {
        "run": str(run_dir),
        "checkpoint": str(checkpoint),
        "step": trained.step,
        "network": trained.label,
        "attributes": len(attributes),
        "feature_dim": trained.module.feature_dim,
        "preprocessing": theirs,
    }
    return Judge(trained.module.to(device), attributes, source)


@dataclass
class Judged:
    """The judge's outputs for a set of images, gathered in image order."""

    logits: np.ndarray  # (N, A) over judge.attributes
    features: np.ndarray  # (N, F)


class JudgedSets:
    """The judge's outputs of named image sets made batch by batch over each rank's share of the
    images: add(name, batch) as the batches come, gathered(total) once every batch is in (collective)."""

    def __init__(self, judge: Judge, accelerator: Accelerator) -> None:
        self.judge, self.accelerator = judge, accelerator
        self._outputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, name: str, images: torch.Tensor) -> None:
        self._outputs.setdefault(name, []).append(self.judge(images))

    def gathered(self, names: list[str], total: int) -> dict[str, Judged]:
        """Every rank's outputs of each of `names` (rows of all ranks, `total` per set), on every rank."""
        device, width = self.accelerator.device, (len(self.judge.attributes), self.judge.network.feature_dim)
        result = {}
        for name in names:
            parts = self._outputs.pop(name, [])
            local = [
                torch.cat([part[j] for part in parts]) if parts else torch.zeros(0, width[j], device=device)
                for j in range(2)
            ]
            logits, features = (distributed.gather_rows(self.accelerator, rows, total).numpy() for rows in local)
            result[name] = Judged(logits, features)
        return result

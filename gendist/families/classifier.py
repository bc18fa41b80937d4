"""The attribute classifier (model.name=classifier): a ResNet (gendist.models.classifier) trained to
predict the data's attributes, one logit each, by binary cross-entropy with logits - one network,
one phase.

Attributes: classifier.attributes, or every attribute of the data ([]), in the data's order unless
listed; targets are (attrs + 1) / 2 of the +-1 labels, optionally smoothed to eps/2 and 1 - eps/2
(classifier.label_smoothing). The rate is optim.lr_g, as the VAE's (a one-network family's rate is
lr_g), on the cosine schedule classifier.schedule (a function of the step: a resume restores it).
With train.ema_decay > 0 the classifier has an EMA copy, and grids and evaluation use it, as the
GANs' generators do. Train stats: loss and accuracy (the fraction of attribute predictions, logit
> 0, that are right on the batch, before the update).

Evaluation (Sampling.classify): the held-out images' attribute accuracy and balanced accuracy, next
to always predicting each attribute's majority value in data.split (gendist.eval.evaluator).
Grids: samples/step_*.png is a fixed batch of real training images (8 a row) and step_*.json beside
it lists, per image, the attributes predicted present with their probabilities, the true ones, and
the ones predicted wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

from gendist.config import ConfigError, RunConfig
from gendist.data.loader import ShardStream
from gendist.families.base import Family, FamilyInputs, Network, Phase, Sampling, Stats, StepContext, in_memory_format
from gendist.models.classifier import AttributeClassifier

GRID_IMAGES = 32


def predicted_attributes(cfg: RunConfig, available: list[str]) -> list[str]:
    """The attribute names the classifier predicts: classifier.attributes, or all of the data's.
    `available` may be empty where the data is not at hand (gendist compare counting parameters)."""
    wanted = list(cfg.classifier.attributes) or list(available)
    if not wanted:
        raise ConfigError("the classifier needs attributes to predict: this data has none")
    missing = [name for name in wanted if available and name not in available]
    if missing:
        raise ConfigError(f"classifier.attributes {missing} are not in this dataset; it has: {', '.join(available)}")
    return wanted


def build_classifier(cfg: RunConfig, num_attributes: int) -> AttributeClassifier:
    settings = cfg.classifier
    return in_memory_format(
        AttributeClassifier(num_attributes, cfg.model.ndf, cfg.model.image_size, settings.blocks, settings.norm), cfg
    )


def cosine(steps: int):
    """Step (from 1) -> 0.5 (1 + cos(pi (step - 1) / steps)): 1 at the first step, near 0 at the last."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))


def declare(inputs: FamilyInputs) -> Family:
    cfg = inputs.cfg
    names = predicted_attributes(cfg, inputs.attribute_names)
    columns = [inputs.attribute_names.index(name) for name in names] if inputs.attribute_names else []
    net = build_classifier(cfg, len(names))
    smoothing = cfg.classifier.label_smoothing
    ema = cfg.train.ema_decay > 0

    def cross_entropy(ctx: StepContext) -> tuple[torch.Tensor, Stats]:
        batch = ctx.next_batch()
        logits = ctx.nets["classifier"](batch["images"]).float()
        present = batch["attrs"][:, columns] > 0
        targets = present.float() * (1.0 - smoothing) + 0.5 * smoothing
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        accuracy = ((logits.detach() > 0) == present).float().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy}

    grid: list[torch.Tensor] = []  # the fixed real batch and its labels, read at the first grid

    def sampling(bare: dict[str, nn.Module]) -> Sampling:
        model = bare.get("classifier_ema", bare["classifier"])
        device = next(model.parameters()).device

        def classify(images: torch.Tensor) -> torch.Tensor:
            return model(images).float()

        def write_grids(folder: Path, step: int) -> None:
            if not grid:
                count = min(GRID_IMAGES, cfg.train.num_samples)
                spec = dataclasses.replace(inputs.spec, rank=0, world_size=1, batch_size=count)
                batch = next(iter(ShardStream(spec)))  # the first images of epoch 0: the same for every run
                grid.extend([batch["images"].float().div(127.5).sub(1.0).to(device), batch["attrs"][:, columns] > 0])
            images, present = grid
            with torch.no_grad():
                probabilities = torch.sigmoid(classify(images)).cpu()
            save_image(images, folder / f"step_{step:07d}.png", nrow=8, normalize=True, value_range=(-1, 1))
            rows = []
            for i, (p, truth) in enumerate(zip(probabilities.tolist(), present.tolist())):
                order = sorted(range(len(names)), key=lambda a: -p[a])
                rows.append(
                    {
                        "image": i,
                        "row": i // 8,
                        "column": i % 8,
                        "predicted": {names[a]: round(p[a], 3) for a in order if p[a] > 0.5},
                        "true": [names[a] for a in range(len(names)) if truth[a]],
                        "wrong": [names[a] for a in range(len(names)) if (p[a] > 0.5) != truth[a]],
                    }
                )
            wrong = sum(len(row["wrong"]) for row in rows)
            summary = {"step": step, "accuracy": 1 - wrong / (len(rows) * len(names)), "images": rows}
            (folder / f"step_{step:07d}.json").write_text(json.dumps(summary, indent=1) + "\n")

        label = "classifier EMA" if "classifier_ema" in bare else "classifier"
        return Sampling(None, label, write_grids, classify=classify, classify_attributes=names)

    schedule = cosine(cfg.train.steps) if cfg.classifier.schedule == "cosine" else None
    notes = [f"classifier: {len(names)} attributes, {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters"]
    return Family(
        networks=[Network("classifier", net, "opt_classifier", cfg.optim.lr_g, ema=ema, lr_factor=schedule)],
        phases=[Phase("cross_entropy", "classifier", cross_entropy)],
        sampling=sampling,
        notes=notes,
    )

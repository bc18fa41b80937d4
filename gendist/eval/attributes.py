"""Attribute agreement scores, one definition for every use: a classifier against held-out labels,
and the face judge against the labels a conditional GAN was asked for.

Per attribute, accuracy and balanced accuracy (TPR + TNR) / 2; the latter is undefined (None) where
the truth holds one class only, and left out of its mean. Means are unweighted over attributes.
"""

from __future__ import annotations

import numpy as np


def hits(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of boolean (N, A) arrays: the true positives and true negatives."""
    return (predicted & truth).sum(axis=0).astype(np.float64), (~predicted & ~truth).sum(axis=0).astype(np.float64)


def agreement_scores(
    true_positives: np.ndarray,
    true_negatives: np.ndarray,
    positives: np.ndarray,
    count: int,
    names: list[str],
    prefix: str = "attr",
    suffix: str = "",
) -> dict:
    """{prefix}_mean_accuracy{suffix}, {prefix}_mean_balanced_accuracy{suffix}, and per attribute
    {prefix}_accuracy{suffix} and {prefix}_balanced_accuracy{suffix}, of `count` images of which
    `positives` per attribute are truly present."""
    negatives = count - positives
    defined = (positives > 0) & (negatives > 0)
    accuracy = (true_positives + true_negatives) / count
    with np.errstate(invalid="ignore", divide="ignore"):
        balanced = (true_positives / positives + true_negatives / negatives) / 2
    return {
        f"{prefix}_mean_accuracy{suffix}": float(accuracy.mean()),
        f"{prefix}_mean_balanced_accuracy{suffix}": float(balanced[defined].mean()) if defined.any() else None,
        f"{prefix}_accuracy{suffix}": dict(zip(names, map(float, accuracy))),
        f"{prefix}_balanced_accuracy{suffix}": dict(
            zip(names, (float(value) if ok else None for ok, value in zip(defined, balanced)))
        ),
    }


def undefined_balanced(positives: np.ndarray, count: int, names: list[str]) -> list[str]:
    """The attributes whose balanced accuracy is undefined: all present or all absent."""
    return [name for name, p in zip(names, positives) if p == 0 or p == count]

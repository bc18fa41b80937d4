"""Improved precision and recall of a generated set (Kynkäänniemi et al. 2019), from the same
features as the set's FID.

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
nearest neighbour within its own set (k = 3 in the paper). Precision: the fraction of generated
points inside the real manifold (how many samples look real). Recall: the fraction of real points
inside the generated manifold (how much of the data the samples cover). Distances are Euclidean, in
float64 on the evaluation device.

Across ranks: every rank holds both gathered feature sets (as the evaluator leaves them); each
computes the radii and the membership of its contiguous share of the rows, the radii are gathered and
the counts summed, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator

from gendist import distributed

PROTOCOL = (
    "improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls (radius: the distance to the "
    "k-th nearest neighbour within the same set), Euclidean distances between the FID features; "
    "precision = share of generated images inside the real manifold, recall = share of real images "
    "inside the generated manifold"
)
ROWS_PER_BLOCK = 1024  # distance rows computed at once: 1024 x 10,000 float64 is 80 MB


def _share(accelerator: Accelerator, total: int) -> tuple[int, int]:
    return distributed.chunk_bounds(total, accelerator.process_index, accelerator.num_processes)


def _blocks(start: int, end: int):
    for i in range(start, end, ROWS_PER_BLOCK):
        yield i, min(i + ROWS_PER_BLOCK, end)


def knn_radii(accelerator: Accelerator, points: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point of the same set, gathered on every rank."""
    if len(points) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set, got {len(points)}")
    start, end = _share(accelerator, len(points))
    # the k+1-th smallest distance of a row: the point itself is its own nearest, at 0
    local = [torch.cdist(points[i:stop], points).kthvalue(k + 1, dim=1).values for i, stop in _blocks(start, end)]
    mine = torch.cat(local) if local else points.new_zeros(0)
    return distributed.gather_rows(accelerator, mine, len(points)).to(points.device)


def _inside(accelerator: Accelerator, queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> int:
    """How many of `queries` lie within some centre's ball, summed over the ranks' shares."""
    start, end = _share(accelerator, len(queries))
    count = torch.zeros((), dtype=torch.float64, device=queries.device)
    for i, stop in _blocks(start, end):
        count += (torch.cdist(queries[i:stop], centres) <= radii[None, :]).any(dim=1).sum()
    return int(distributed.sum_across_ranks(accelerator, count).item())


def precision_recall(accelerator: Accelerator, real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
    """{"precision", "recall"} of `fake` against `real` (both gathered, N x D, on every rank). Collective."""
    device = accelerator.device
    real_t = torch.from_numpy(np.asarray(real, np.float64)).to(device)
    fake_t = torch.from_numpy(np.asarray(fake, np.float64)).to(device)
    real_radii, fake_radii = knn_radii(accelerator, real_t, k), knn_radii(accelerator, fake_t, k)
    return {
        "precision": _inside(accelerator, fake_t, real_t, real_radii) / len(fake_t),
        "recall": _inside(accelerator, real_t, fake_t, fake_radii) / len(real_t),
    }

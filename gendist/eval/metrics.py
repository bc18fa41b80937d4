"""Distances between feature sets: Fréchet (FID) and unbiased polynomial-kernel MMD (KID).

FID needs only tr(sqrt(S1 S2)). S1 S2 is similar to the symmetric PSD matrix R S2 R with
R = sqrt(S1), so the trace is the sum of square roots of its eigenvalues: two symmetric
eigendecompositions (one if R is cached with the reference statistics) instead of scipy's
general Schur-based sqrtm, exact up to floating point and much faster at 2048 dimensions.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance in float64, as pytorch-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance (negative round-off eigenvalues count as 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, sqrt_sigma1: np.ndarray | None = None
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)); pass sqrt_sigma1 = psd_sqrt(sigma1) to reuse it."""
    root = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    middle = root @ sigma2 @ root
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over
    random subsets of both sets; returns (mean, std over subsets). Kernels run in float32 on the
    CPU with float64 sums (kernel values are O(1))."""
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real)} real and {len(fake)} generated")
    rng = np.random.default_rng(seed)
    real_t, fake_t = torch.from_numpy(np.asarray(real, np.float32)), torch.from_numpy(np.asarray(fake, np.float32))
    dims = real_t.shape[1]
    estimates = np.empty(subsets)
    for i in range(subsets):
        x = real_t[torch.from_numpy(rng.choice(len(real_t), m, replace=False))]
        y = fake_t[torch.from_numpy(rng.choice(len(fake_t), m, replace=False))]
        k_xx = (x @ x.T / dims + 1).pow(3).double()
        k_yy = (y @ y.T / dims + 1).pow(3).double()
        k_xy = (x @ y.T / dims + 1).pow(3).double()
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        estimates[i] = float(within - 2 * k_xy.mean())
    return float(estimates.mean()), float(estimates.std())

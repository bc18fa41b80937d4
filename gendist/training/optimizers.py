"""The optimizers of a family's networks, and the config's hyperparameters over a resumed state."""

from __future__ import annotations

import torch

from gendist.config import OptimConfig


def build_optimizer(params, lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, foreach=True)
    # fused: one kernel for all parameters on GPUs (CPUs too); the same update as the default loop
    return torch.optim.Adam(params, lr=lr, betas=cfg.betas, fused=True)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, cfg: OptimConfig) -> None:
    """The config's learning rate (and Adam betas) over what a resumed optimizer state holds: a
    checkpoint carries state, the config decides hyperparameters (PBT changes them mid-run)."""
    set_lr(optimizer, lr)
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = tuple(cfg.betas)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

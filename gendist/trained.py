"""A finished run's trained networks: its checkpoint found and its networks loaded, for scoring
(gendist eval), translating, dreaming and judging other runs (eval.classifier)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from gendist import families
from gendist.checkpoint import latest_checkpoint, load_checkpoint
from gendist.config import ConfigError, RunConfig, load_config
from gendist.data.shards import read_manifest
from gendist.families.base import FamilyInputs, Sampling, averaged, sampling_from_checkpoint
from gendist.training.config_record import read_data_record


def find_checkpoint(run_dir: Path, checkpoint: str | None) -> Path:
    """`checkpoint` if given, else the run's latest; refused unless complete."""
    found = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if found is None or not (found / "state.pt").is_file():
        raise FileNotFoundError(
            f"no complete checkpoint in {run_dir / 'checkpoints'}"
            if found is None
            else f"{found} is not a complete checkpoint (no state.pt)"
        )
    return found


def load_sampling(
    cfg: RunConfig, checkpoint: Path, accelerator: Accelerator, attribute_names: list[str], ema: bool = True
) -> tuple[Sampling, dict]:
    """The family's sampling with the checkpoint's networks on this rank's device (their EMA copies
    where it keeps them, unless `ema` is off), and the train state."""
    shared, _ = load_checkpoint(checkpoint, accelerator.process_index)
    if not ema:
        shared = {name: value for name, value in shared.items() if not name.endswith("_ema")}
    family = families.declare(FamilyInputs(cfg, attribute_names))
    return sampling_from_checkpoint(family, shared, accelerator.device), shared["train_state"]


def trained_attribute_names(run_dir: Path, cfg: RunConfig) -> list[str]:
    """The attribute names of the data a run trained on: from its data.json, else the shards' manifest
    where they are on this machine, else the config's (a cGAN's model.attributes)."""
    recorded = read_data_record(run_dir)
    if recorded is not None:
        return list(recorded["attribute_names"])
    try:
        return read_manifest(cfg.data.shards)["attribute_names"]
    except (FileNotFoundError, ValueError):
        return list(cfg.model.attributes)


@dataclass
class TrainedNetwork:
    module: nn.Module  # in eval mode, on the CPU
    cfg: RunConfig  # the run's config
    label: str  # e.g. "classifier EMA"
    step: int  # the checkpoint's


def load_network(run_dir: Path, checkpoint: Path, name: str | None, overrides: list[str]) -> TrainedNetwork:
    """One of a run's trained networks (default: its classifier, else its discriminator), the EMA
    copy where the checkpoint holds one."""
    cfg = load_config(run_dir / "config.yaml", overrides)
    shared, _ = load_checkpoint(checkpoint, 0)
    attribute_names = trained_attribute_names(run_dir, cfg)
    declared = {network.name: network for network in families.declare(FamilyInputs(cfg, attribute_names)).networks}
    name = name or next((n for n in ("classifier", "discriminator") if n in declared), None)
    if name not in declared:
        raise ConfigError(f"{run_dir} ({cfg.model.name}) has no network {name!r}; it has {', '.join(declared)}")
    module = declared[name].module
    module.load_state_dict(shared[name])
    label = name
    if f"{name}_ema" in shared:
        ema = averaged(module)
        ema.load_state_dict(shared[f"{name}_ema"])
        module, label = ema.module, f"{name} EMA"
    return TrainedNetwork(module.eval(), cfg, label, shared["train_state"]["step"])

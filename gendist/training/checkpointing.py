"""What a run's checkpoints hold and how a run resumes from them: the registered networks,
optimizers, engines and EMA copies (the same on every rank), each rank's own state (RNG, image
pools), the train state, and the layout an exact resume depends on. The file format, atomic writes
and safe loading are gendist.checkpoint's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

import gendist
from gendist import distributed, engines
from gendist.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from gendist.config import ConfigError, RunConfig, to_yaml
from gendist.training.stream import TrainState
from gendist.training.window import all_finite, diverged_weights

PLAIN = "accelerate"  # the backend of DDP runs, as checkpoints name it
DEEPSPEED_FOLDER = "deepspeed"  # in a checkpoint: one DeepSpeed checkpoint per engine (tag = network name)


class Checkpointed:
    """The objects a checkpoint holds, registered by name, and their save and resume."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator, engine_config: dict | None, state: TrainState) -> None:
        self.cfg, self.accelerator, self.engine_config, self.state = cfg, accelerator, engine_config, state
        self.run_dir = Path(cfg.train.run_dir)
        self.shared: dict[str, Any] = {}
        self.per_rank: dict[str, Any] = {}
        self.modules: list[nn.Module] = []

    def register(self, name: str, obj: Any) -> None:
        """An object with state_dict / load_state_dict, the same on every rank (saved by rank 0)."""
        self.shared[name] = obj
        if isinstance(obj, nn.Module):
            self.modules.append(obj)

    def register_per_rank(self, name: str, obj: Any) -> None:
        """State that differs between ranks (an image pool of this rank's fakes): each rank saves and
        loads its own, in its rank<R>.pt."""
        self.per_rank[name] = obj

    @property
    def engines(self) -> dict[str, Any]:
        """The DeepSpeed engines among the checkpointed objects, by name."""
        return {name: obj for name, obj in self.shared.items() if engines.is_engine(obj)}

    @property
    def backend(self) -> str:
        return f"deepspeed-zero{self.engine_config['zero_optimization']['stage']}" if self.engine_config else PLAIN

    @property
    def layout(self) -> dict[str, Any]:
        """What an exact resume depends on besides the checkpointed state."""
        # 0 and 1 loader workers read the same single stream
        return {
            "world_size": self.accelerator.num_processes,
            "num_workers": max(1, self.cfg.data.num_workers),
            "batch_size": self.cfg.data.batch_size,
            "seed": self.cfg.train.seed,
            "gendist": gendist.__version__,
        }

    # -- resume ------------------------------------------------------------------------------
    def resume(self) -> Path | None:
        """Load the latest checkpoint of the run folder that every rank can read, if any."""
        checkpoint, shared, mine = self._latest_readable()
        if checkpoint is None:
            return None
        self._check_backend(checkpoint, shared)
        sharded = self.engines
        if sharded:
            engines.load_engines(sharded, checkpoint / DEEPSPEED_FOLDER)
        for name, obj in self.shared.items():
            if name in sharded:
                continue
            target = self.accelerator.unwrap_model(obj, keep_torch_compile=False) if isinstance(obj, nn.Module) else obj
            target.load_state_dict(shared[name])
        if self.accelerator.scaler is not None and "scaler" in shared:
            self.accelerator.scaler.load_state_dict(shared["scaler"])
        self.state.load_state_dict(shared["train_state"])
        self._check_layout(checkpoint, shared)
        if mine is not None:
            set_rng_state(mine["rng"])
            for name, obj in self.per_rank.items():
                obj.load_state_dict(mine["state"][name])
        elif shared["world_size"] >= self.accelerator.num_processes:
            print(
                f"[rank {self.accelerator.process_index}] warning: {checkpoint} has no state of this rank (RNG, "
                "per-rank objects): the resume is not bit-identical",
                flush=True,
            )
        return checkpoint

    def _latest_readable(self) -> tuple[Path | None, dict | None, dict | None]:
        """The newest checkpoint every rank could load, falling back past unreadable ones (said)."""
        found = distributed.broadcast_from_main(self.accelerator, list_checkpoints(self.run_dir))  # one list: one loop
        for checkpoint in reversed(found):
            problem = None
            try:
                shared, mine = load_checkpoint(checkpoint, self.accelerator.process_index)
            except CheckpointError as err:
                problem = str(err)
                print(f"[rank {self.accelerator.process_index}] warning: {problem}", flush=True)
            if not distributed.any_rank(self.accelerator, problem is not None):
                return checkpoint, shared, mine
            if self.accelerator.is_main_process:
                set_aside(checkpoint)  # kept for a look, out of pruning, eval and compare
            distributed.rank_print(
                self.accelerator,
                f"warning: cannot resume from {checkpoint} (set aside as "
                f".{checkpoint.name}.unreadable); trying the checkpoint before it",
            )
        if found:
            raise CheckpointError(
                f"none of the {len(found)} checkpoints in {found[0].parent} can be loaded (see the "
                "warnings above); move them away to start this run afresh"
            )
        return None, None, None

    def _check_layout(self, checkpoint: Path, shared: dict) -> None:
        """Resuming under another rank count, loader workers, per-rank batch, seed or gendist version
        works but is not bit-identical to an uninterrupted run: say so, and carry each stream's
        position in its epoch over as images read."""
        saved = shared.get("layout", {"world_size": shared["world_size"]})  # older checkpoints
        changed = {key: (value, self.layout.get(key)) for key, value in saved.items() if self.layout.get(key) != value}
        if not changed:
            return
        old_batch = saved["world_size"] * saved.get("batch_size", self.cfg.data.batch_size)
        new_batch = self.accelerator.num_processes * self.cfg.data.batch_size
        for position in self.state.positions.values():
            position.batch_in_epoch = position.batch_in_epoch * old_batch // new_batch
        described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        distributed.rank_print(
            self.accelerator,
            f"warning: resuming {checkpoint} with another layout ({described}): training "
            "continues, but not bit-identically to an uninterrupted run (the data order and the noise of "
            "each rank depend on these); the position in the epoch is carried over as images read",
        )

    def _check_backend(self, checkpoint: Path, shared: dict) -> None:
        """A checkpoint resumes under the backend that wrote it (its optimizer states' format), and a
        DeepSpeed one with its number of ranks (one optimizer shard each)."""
        backend = shared.get("backend", PLAIN)
        if backend != self.backend:
            launch = (
                "a DDP launch (launch/multi_gpu.yaml, torchrun, ...)"
                if backend == PLAIN
                else f"launch/ds_{backend.removeprefix('deepspeed-')}.yaml"
            )
            raise ConfigError(
                f"{checkpoint} was written by the {backend} backend and cannot resume under {self.backend} "
                f"(its optimizer state is in that backend's format): resume it with {launch}; "
                "gendist eval and compare read it as it is"
            )
        if self.engines and shared["world_size"] != self.accelerator.num_processes:
            raise ConfigError(
                f"{checkpoint} holds ZeRO optimizer shards of {shared['world_size']} ranks; resume it with "
                f"{shared['world_size']} processes (this launch has {self.accelerator.num_processes})"
            )

    # -- save --------------------------------------------------------------------------------
    def save(self) -> None:
        """Collective: a checkpoint of the current step, refused (Diverged) if a weight is not finite."""
        for module in self.modules:
            distributed.average_buffers(self.accelerator, module)
        unfinite = [
            name for name, obj in self.shared.items() if isinstance(obj, nn.Module) and not all_finite(obj.parameters())
        ]
        if distributed.any_rank(self.accelerator, bool(unfinite)):
            raise diverged_weights(unfinite, self.state.step, self.run_dir)
        shared: dict[str, Any] = {
            # the eager module's keys, whatever compiled it (train.compile, or the launcher's dynamo setting)
            name: (
                self.accelerator.unwrap_model(obj, keep_torch_compile=False) if isinstance(obj, nn.Module) else obj
            ).state_dict()
            for name, obj in self.shared.items()
        }
        shared["train_state"] = self.state.state_dict()
        shared["world_size"] = self.accelerator.num_processes
        shared["layout"] = self.layout
        shared["config"] = to_yaml(self.cfg)
        shared["backend"] = self.backend
        if self.accelerator.scaler is not None:
            shared["scaler"] = self.accelerator.scaler.state_dict()
        sharded = self.engines
        write_sharded = (lambda folder: engines.save_engines(sharded, folder / DEEPSPEED_FOLDER)) if sharded else None
        per_rank = {name: obj.state_dict() for name, obj in self.per_rank.items()}
        # the first checkpoint's size, for the space check (later ones are compared with the last one):
        # the tensors, every rank's own state, and per engine its weights with Adam's fp32 master and moments
        estimate = (
            tensor_bytes(shared)
            + self.accelerator.num_processes * tensor_bytes(per_rank)
            + sum(16 * sum(p.numel() for p in engine.module.parameters()) for engine in sharded.values())
        )
        save_checkpoint(
            self.accelerator,
            self.run_dir,
            self.state.step,
            shared,
            self.cfg.train.keep_checkpoints,
            write_sharded,
            per_rank,
            estimate,
        )


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0

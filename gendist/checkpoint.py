"""Atomic, complete checkpoints: run_dir/checkpoints/step_NNNNNNN/{state.pt, rank<R>.pt}.

Every rank writes its RNG state into a hidden partial folder; rank 0 writes the shared state and
then renames the folder into place, so a folder with a final name is always complete (a killed
run leaves only a partial folder, which is ignored and later replaced). Loading uses
torch.load(weights_only=True): no pickled code runs from a checkpoint.
"""
from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

STEP_DIR = re.compile(r"^step_(\d{7})$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (step_NNNNNNN)."""
    return int(STEP_DIR.match(path.name).group(1))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, shared: dict[str, Any], keep: int,
                    write_sharded: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank must call it. `shared` is written by rank 0; RNG by every rank, and
    `write_sharded(folder)` (collective too) by every rank into the same unfinished folder."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:07d}"
    partial = root / f".step_{step:07d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), partial / f"rank{accelerator.process_index}.pt")
    if write_sharded is not None:
        write_sharded(partial)
    if accelerator.is_main_process:
        torch.save(shared, partial / "state.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # same step saved before (e.g. a rerun): replace it whole
            shutil.rmtree(final)
        partial.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The shared state and this rank's RNG state (None if the run had fewer ranks)."""
    shared = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rank_file = path / f"rank{rank}.pt"
    rng = torch.load(rank_file, map_location="cpu", weights_only=True) if rank_file.is_file() else None
    return shared, rng

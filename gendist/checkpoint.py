"""Atomic, durable, complete checkpoints: run_dir/checkpoints/step_NNNNNNN/{state.pt, rank<R>.pt}.

Every rank writes its RNG state into a hidden partial folder and rank 0 the shared state; every
rank fsyncs the files, rank 0 the folders, then renames the folder into place (and fsyncs its parent), so a
folder with a final name is always complete, also after a power loss (a killed run leaves only a
partial folder, which the next start or save removes). Old checkpoints are pruned by renaming them out of
the way first, so no half-deleted folder keeps a final name. Loading uses
torch.load(weights_only=True): no pickled code runs from a checkpoint.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from gendist import disk, distributed

COMPILE_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to a module's state-dict keys
STEP_DIR = re.compile(r"^step_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or is refused, named with the reason."""


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


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: str | Path,
    step: int,
    shared: dict[str, Any],
    keep: int,
    write_sharded: Callable[[Path], None] | None = None,
    rank_state: dict[str, Any] | None = None,
    estimate: int = 0,
) -> Path:
    """Collective: every rank must call it. `shared` is written by rank 0; every rank writes its RNG
    state and its own `rank_state` (state dicts of per-rank objects) to rank<R>.pt, and
    `write_sharded(folder)` (collective too) into the same unfinished folder.

    Space: before writing, rank 0 compares the free space with the size of the last checkpoint (or
    `estimate`, the bytes of the state, for the first) and stops the run with OutOfSpace when it
    will not fit. A write that fails anyway, on any rank, removes the partial folder and raises
    OutOfSpace (a full disk) or CheckpointError (another failure) on every rank. Older checkpoints
    are pruned only once the new one is in place, so the disk holds at most the `keep` checkpoints
    plus the one being written."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:07d}"
    partial = root / f".step_{step:07d}.partial"
    refusal: tuple[str, str] | None = None
    if accelerator.is_main_process:
        remove_leftovers(root)
        latest = latest_checkpoint(run_dir)
        needed = disk.folder_size(latest) if latest is not None else estimate
        try:
            disk.check_room(root, needed, f"checkpoint {final.name}", _space_remedy(latest))
            with disk.writing(partial):
                partial.mkdir(parents=True)
        except disk.OutOfSpace as err:
            refusal = ("space", str(err))
        except OSError as err:  # said on every rank, not raised on rank 0 alone
            refusal = ("other", f"cannot start checkpoint {final.name} in {root}: {err}")
    refusal = distributed.broadcast_from_main(accelerator, refusal)
    if refusal:
        raise (disk.OutOfSpace if refusal[0] == "space" else CheckpointError)(refusal[1])

    def write_own() -> None:
        torch.save({"rng": rng_state(), "state": rank_state or {}}, partial / f"rank{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            torch.save(shared, partial / "state.pt")

    def write_engines() -> None:  # collective: after write_own succeeded on every rank, all ranks enter it
        if write_sharded is not None:
            write_sharded(partial)

    def flush() -> None:
        # Once all is written, every rank flushes the files (one client's fsync does not flush another
        # client's writes on a shared file system; where they are clean already, it costs little).
        for path in partial.rglob("*"):
            if path.is_file():
                fsync(path)

    for stage in (write_own, write_engines, flush):  # each followed by a collective: all ranks did it, or none goes on
        _write_together(accelerator, stage, partial, final)
    if accelerator.is_main_process:
        for folder in sorted((p for p in partial.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            fsync(folder)
        fsync(partial)
        replaced = final.with_name(f".{final.name}.deleting")
        if final.exists():  # same step saved before (e.g. a rerun): moved aside, deleted once replaced
            final.rename(replaced)
        partial.rename(final)
        fsync(root)
        if replaced.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        for old in list_checkpoints(run_dir)[:-keep]:
            discard(old)
    accelerator.wait_for_everyone()
    return final


def _write_together(accelerator: Accelerator, stage: Callable[[], None], partial: Path, final: Path) -> None:
    """Run this rank's part of a checkpoint write; when any rank's part failed, rank 0 removes the
    partial folder and every rank raises, saying in plain words what happened."""
    failure: BaseException | None = None
    try:
        stage()
    except (OSError, RuntimeError) as err:  # torch's zip writer raises RuntimeError on a full disk
        failure = err
    # judged before the collective: once rank 0 removes the partial folder, the space is free again
    full = failure is not None and disk.looks_full(failure, partial.parent)
    where = disk.filesystem_of(partial.parent) if full else None
    if not distributed.any_rank(accelerator, failure is not None):
        return
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    removed = f"the unfinished {partial} was removed and the checkpoints before {final.name} are kept"
    if failure is None:
        raise CheckpointError(f"another rank could not write its part of {final.name} (its error is above); {removed}")
    if full:
        raise disk.OutOfSpace(
            f"writing checkpoint {final.name} failed because the disk is full: {where} "
            f"({type(failure).__name__}: {failure}); {removed}. {_space_remedy(latest_checkpoint(final.parents[1]))}"
        ) from failure
    raise CheckpointError(f"writing checkpoint {final.name} failed ({type(failure).__name__}: {failure}); {removed}")


def _space_remedy(latest: Path | None) -> str:
    resumes = f"resumes from {latest.name}" if latest is not None else "starts again"
    return (
        "Free space there (other files, or fewer kept checkpoints: train.keep_checkpoints) or move the run "
        f"(train.run_dir), then rerun the same command: it {resumes}."
    )


def fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to the disk. Folders on file systems that cannot
    fsync them (some FUSE and CIFS mounts say EINVAL) are left as they are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not path.is_dir() or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def discard(checkpoint: Path) -> None:
    """Remove a checkpoint folder: first renamed to a hidden name (atomic), then deleted; what cannot
    be deleted now (an NFS file still open elsewhere) is left to the next save's remove_leftovers."""
    doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    checkpoint.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def set_aside(checkpoint: Path) -> None:
    """Rename an unreadable checkpoint to .step_N.unreadable: kept for a look, no longer listed."""
    aside = checkpoint.with_name(f".{checkpoint.name}.unreadable")
    shutil.rmtree(aside, ignore_errors=True)
    checkpoint.rename(aside)


def remove_leftovers(root: Path) -> list[Path]:
    """Remove what killed saves and prunes left: partial and half-deleted folders, and step folders
    emptied by a deletion that a kill interrupted before this module renamed folders first. Returns
    what it removed. Only the run folder's owner may call it (gendist.training.ownership): another
    job's save in progress looks the same."""
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        hidden = path.name.startswith(".step_") and path.name.endswith((".partial", ".deleting"))
        emptied = STEP_DIR.match(path.name) and path.is_dir() and not (path / "state.pt").is_file()
        if hidden or emptied:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The shared state and this rank's own, {"rng": ..., "state": {name: state dict}} (None if the
    run had fewer ranks)."""
    shared = without_compile_prefix(safe_load(path / "state.pt"))
    rank_file = path / f"rank{rank}.pt"
    if not rank_file.is_file():
        return shared, None
    mine = safe_load(rank_file)
    return shared, mine if "rng" in mine else {"rng": mine, "state": {}}  # checkpoints before per-rank state


def without_compile_prefix(shared: dict[str, Any]) -> dict[str, Any]:
    """The networks' state dicts with the `_orig_mod.` of a torch.compile wrapper taken out of their
    keys: checkpoints that a launcher-compiled run wrote (accelerate launch --dynamo_backend)
    before gendist saved the eager module's keys load compiled or not."""
    return {
        name: {key.replace(COMPILE_PREFIX, ""): item for key, item in value.items()}
        if isinstance(value, dict) and any(isinstance(key, str) and COMPILE_PREFIX in key for key in value)
        else value
        for name, value in shared.items()
    }


def safe_load(path: Path) -> Any:
    """torch.load of tensors and plain containers only; a CheckpointError names the file and why."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, i.e. running the file's code: name the culprit only
        culprit = next(
            (line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "global" in line),
            "an unsupported object",
        )
        raise CheckpointError(
            f"{path} is refused: it holds pickled objects other than tensors and plain "
            f"containers, which could run code when loaded ({culprit}); gendist loads only "
            "checkpoints of its own format"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} cannot be read (truncated or damaged?): {first}") from None

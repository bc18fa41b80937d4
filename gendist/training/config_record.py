"""The run folder's records of how it was launched: config.yaml, written at each launch, with what
changed since the last one said and the previous file kept (a change of the networks once
checkpoints exist is refused); and data.json, what the run trains on."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from gendist import disk
from gendist.checkpoint import checkpoint_step, latest_checkpoint
from gendist.config import ConfigError, RunConfig, differences, load_into, to_dict, to_yaml


def record_config(cfg: RunConfig, run_dir: Path) -> str | None:
    """Write the run's config.yaml (rank 0). A relaunch with other settings says what changed and keeps
    the previous file beside it; a change of the networks (model.*) once checkpoints exist is refused
    (the returned message), since they could not load into the new networks."""
    (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    path, text = run_dir / "config.yaml", to_yaml(cfg)
    if path.is_file() and path.read_text() != text:
        try:  # with today's defaults filled in, so a key added since is no change
            previous = to_dict(load_into(RunConfig(), path))
        except ConfigError:  # a key removed since: compare as written
            previous = yaml.safe_load(path.read_text())
        changed = differences(previous, to_dict(cfg))
        latest = latest_checkpoint(run_dir)
        networks = [key for key in changed if key.startswith("model.")]
        if latest is not None and networks:
            return (
                f"{run_dir} holds checkpoints of other networks ({'; '.join(_changes(changed, networks))}): "
                f"they cannot resume with this config; use a new train.run_dir, or the run's own {path}"
            )
        if changed:  # otherwise the file differs only by keys added to gendist since, at their defaults
            kept = path.with_name(f"config.until_step_{checkpoint_step(latest) if latest else 0:07d}.yaml")
            if not kept.exists():
                path.rename(kept)
            print(
                f"config changed since this run's last launch: {'; '.join(_changes(changed, list(changed)))} "
                f"(the previous config is kept as {kept.name})",
                flush=True,
            )
    with disk.writing(path):
        path.write_text(text)
    return None


def _changes(changed: dict[str, tuple[Any, Any]], keys: list[str]) -> list[str]:
    return [f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in keys]


DATA_RECORD = "data.json"


def record_data(manifest: dict, shard_dir: str, run_dir: Path) -> None:
    """Write what the run trains on beside its config (rank 0): the shard set, its preprocessing and
    attribute names. A classifier run read as a judge (eval.classifier) refuses data prepared otherwise."""
    record = {
        "shards": str(shard_dir),
        "format": manifest["format"],
        "dataset": manifest.get("dataset"),
        "preprocessing": manifest["preprocessing"],
        "attribute_names": manifest["attribute_names"],
    }
    path = run_dir / DATA_RECORD
    partial = path.with_name(path.name + ".partial")
    with disk.writing(partial):
        partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


def read_data_record(run_dir: Path) -> dict | None:
    """A run's data.json, or None for runs written before it existed."""
    path = Path(run_dir) / DATA_RECORD
    return json.loads(path.read_text()) if path.is_file() else None

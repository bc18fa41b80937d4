"""Rank-0 progress and metrics: a rich live display on a terminal, plain lines otherwise, JSONL always.

Callers pass values already reduced across ranks; non-main ranks get a reporter that does nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gendist import disk


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """One row of strict JSON: a non-finite number is written as null (JSON has no NaN)."""
    with disk.writing(path), path.open("a") as sink:
        sink.write(json.dumps(_finite_or_null(row), allow_nan=False) + "\n")


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file gendist wrote, skipping a line a killed writer left torn; none if the
    file does not exist."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def drop_rows_after(path: Path, step: int, applies: Callable[[dict[str, Any]], bool] = lambda row: True) -> None:
    """Remove the rows of steps after `step` (those `applies` to), which a resumed run logs again, and
    lines a killed writer left torn (they would stop a strict reader)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [row for row in read_jsonl(path) if not (row.get("step", 0) > step and applies(row))]
    if len(kept) != len(lines):
        partial = path.with_name(path.name + ".partial")
        partial.unlink(missing_ok=True)
        for row in kept:
            append_jsonl(partial, row)
        partial.touch()
        os.replace(partial, path)


class Reporter:
    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total_steps, self.start_step = total_steps, start_step
        self.console = Console()
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.started = time.perf_counter()
        self.progress: Progress | None = None
        if enabled and self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, summary="")
            self.progress.start()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record one row of metrics (rank 0) and show it."""
        if not self.enabled:
            return
        append_jsonl(self.metrics_path, {"step": step, "time": round(time.time(), 3), **metrics})
        summary = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k not in ("epoch", "images_seen"))
        if self.progress is not None:
            self.progress.update(self.task, completed=step, summary=summary)
        else:
            self.console.print(
                f"step {step}/{self.total_steps}  {summary}  eta {self._eta(step)}", highlight=False, soft_wrap=True
            )

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        seconds = (self.total_steps - step) * (time.perf_counter() - self.started) / max(done, 1)
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)

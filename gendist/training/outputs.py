"""What a run shows of its networks while it trains: the family's sample grids and the evaluation
rows of eval.jsonl, both with the networks in eval mode."""

from __future__ import annotations

import contextlib
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from gendist import disk
from gendist.eval.evaluator import Evaluator, append_row, shown_keys
from gendist.families.base import Sampling


@contextlib.contextmanager
def in_eval_mode(modules: list[nn.Module]):
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


class Outputs:
    """Grids (rank 0) and evaluation (collective) of the family's `sampling`."""

    def __init__(self, accelerator: Accelerator, evaluator: Evaluator, run_dir: Path, modules: list[nn.Module]) -> None:
        self.accelerator, self.evaluator, self.run_dir, self.modules = accelerator, evaluator, run_dir, modules
        self.sampling: Sampling | None = None  # attached once the family's networks are built

    def write_grids(self, step: int) -> None:
        if self.accelerator.is_main_process:
            with in_eval_mode(self.modules), disk.writing(self.run_dir / "samples"):
                self.sampling.write_grids(self.run_dir / "samples", step)

    def evaluate(self, step: int, images_seen: int) -> tuple[dict, str]:
        """Collective: the evaluation row of `step` (appended to eval.jsonl) and its summary line."""
        with in_eval_mode(self.modules):
            row = self.evaluator.evaluate_sampling(self.sampling, step)
        row["images_seen"] = images_seen
        row["source"] = "training"
        if self.accelerator.is_main_process:
            append_row(self.run_dir, row)
        shown = "  ".join(f"{k} {row[k]:.4g}" for k in shown_keys(row))
        protocol, seconds = row["protocol"], sum(row["seconds"].values())
        summary = (
            f"eval step {step}: {shown}  ({seconds:.1f}s, {protocol['generated']} samples vs "
            f"{protocol['reference_images']} '{protocol['reference_split']}' images, "
            f"Inception: {protocol['inception']})"
        )
        return row, summary

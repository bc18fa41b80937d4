"""The values of the steps since the last log, kept on the device until the log reads them, and the
divergence check over them: one flag per window, the same on every rank."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from gendist import distributed
from gendist.checkpoint import checkpoint_step, latest_checkpoint


class Diverged(RuntimeError):
    """A loss or a weight stopped being finite: the run ends without checkpointing it."""


def stack_values(values: dict[str, torch.Tensor | float], names: list[str], device: torch.device) -> torch.Tensor:
    """One float vector on `device` of a step's values in the order of `names`, 0 where a name has no
    value this step (device or CPU tensors, Python numbers). A number becomes a fill on the device,
    not a host-to-device copy, which would wait for the stream."""
    return torch.stack(
        [
            values[name].detach().float().reshape(()).to(device)
            if isinstance(values.get(name), torch.Tensor)
            else torch.full((), float(values.get(name, 0.0)), device=device)
            for name in names
        ]
    )


def all_finite(params) -> bool:
    flags = [p.detach().isfinite().all() for p in params]
    return bool(torch.stack(flags).all().item()) if flags else True


def diverged_weights(names: list[str], step: int, run_dir: Path) -> Diverged:
    return Diverged(
        f"training diverged: the weights of {', '.join(names) or 'a network on another rank'} are "
        f"not finite after step {step}; no checkpoint of them was written (the latest "
        f"is {latest_checkpoint(run_dir)}). Lower the learning rates (optim.lr_g, optim.lr_d) and resume"
    )


class MetricWindow:
    """Per step, the loop's values stacked in the order of `names` (a name is added when a step first
    gives it: SRGAN's adversarial stage adds its losses), with which of them the step gave. A value's
    mean is over the steps that gave it."""

    def __init__(self, accelerator: Accelerator, run_dir: Path) -> None:
        self.accelerator, self.run_dir = accelerator, run_dir
        self.names: list[str] = []
        self._rows: list[torch.Tensor] = []  # per step, its values on the device (0 where not given)
        self._given: list[list[bool]] = []  # per step, on the host: which of the names it gave
        self._last_step = 0

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, step: int, values: dict[str, torch.Tensor | float]) -> None:
        self.names += sorted(set(values) - set(self.names))
        self._rows.append(stack_values(values, self.names, self.accelerator.device))
        self._given.append([name in values for name in self.names])
        self._last_step = step

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's (values, given), steps x names, a name added after a step not given there; the
        given mask goes to the device once per window, not once per step."""
        width = len(self.names)
        values = torch.stack([torch.nn.functional.pad(row, (0, width - len(row))) for row in self._rows])
        given = [row + [False] * (width - len(row)) for row in self._given]
        return values, torch.tensor(given, dtype=torch.float32, device=values.device)

    def check(self) -> None:
        """Collective: raise Diverged if any rank added a non-finite value to this window."""
        if self._rows:
            flag = self._not_finite(self._stacked()[0])
            if self.accelerator.reduce(flag, reduction="sum").item() > 0:
                raise self.diverged()

    def close(self) -> tuple[dict[str, float], bool]:
        """Collective: the window's means over its steps and the ranks, and whether any rank's window
        held a non-finite value (one all-reduce carries both). The window is emptied unless it did:
        then `diverged` says where."""
        window, given = self._stacked()
        steps = given.sum(dim=0)
        sums = (window * given).sum(dim=0)
        reduced = self.accelerator.reduce(torch.cat([sums, steps, self._not_finite(window)[None]]), "sum")
        width = len(self.names)
        counted = reduced[width : 2 * width]
        means = {
            name: total / count
            for name, total, count in zip(self.names, reduced[:width].tolist(), counted.tolist())
            if count
        }
        bad = reduced[-1].item() > 0
        if not bad:
            self._rows, self._given = [], []
        return means, bad

    @staticmethod
    def _not_finite(window: torch.Tensor) -> torch.Tensor:
        return (~window.isfinite()).any().float()

    def diverged(self) -> Diverged:
        """Collective: name the first non-finite value over the ranks, then stop without a checkpoint."""
        window = self._stacked()[0]
        device = window.device
        steps = torch.arange(self._last_step - len(window) + 1, self._last_step + 1, device=device)
        never = self._last_step + 1
        first = torch.where(~window.isfinite(), steps[:, None], never).amin(dim=0)  # per value: its first bad step
        first = distributed.min_across_ranks(self.accelerator, first)
        at = int(first.min().item())
        names = [name for name, step in zip(self.names, first.tolist()) if step == at]
        latest = latest_checkpoint(self.run_dir)
        kept = (
            f"the last checkpoint, {latest} (step {checkpoint_step(latest)}), was written before it"
            if latest is not None
            else "no checkpoint was written"
        )
        return Diverged(
            f"training diverged: {', '.join(names)} not finite at step {at}; stopped without checkpointing "
            f"it ({kept}). Lower the learning rates (optim.lr_g, optim.lr_d) and resume, or start a new "
            "train.run_dir"
        )

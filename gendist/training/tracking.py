"""The run's experiment trackers (train.trackers), through Accelerate's tracker API (`log_with`):
TensorBoard by default, W&B, MLflow or any other Accelerate tracker that is installed.

What they get: every logged window's scalars at its step, the sample grids as images, each evaluation's
numbers under eval/, and, when the run reaches its last step, the hyperparameters (the config,
flattened) with the final metrics (TensorBoard's hparams view). Rank 0 writes; TensorBoard's files
are in <run_dir>/tensorboard. A resumed run starts its writer with purge_step = the resumed step + 1,
so TensorBoard drops what the interrupted run logged after its checkpoint and the curves continue
without a step twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from PIL import Image

from gendist.config import ConfigError, RunConfig, to_dict

TENSORBOARD_DIR = "tensorboard"


def checked_trackers(names: list[str]) -> list[str]:
    """train.trackers, each one Accelerate knows and that is installed here (refused otherwise: a
    tracker Accelerate would drop with a warning is a run nobody sees)."""
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"train.trackers names {name!r}; Accelerate's trackers are {', '.join(LOGGER_TYPE_TO_CLASS)}"
            )
        if name not in available:
            raise ConfigError(
                f"train.trackers names {name!r}, which is not installed here (pip install {name}); "
                f"installed: {', '.join(sorted(available)) or 'none'}; or leave it out of train.trackers"
            )
    return names


def flat_hyperparameters(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The config as dotted keys with the scalar values trackers take (lists and tuples as text)."""
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


def numbers(row: dict, prefix: str = "") -> dict[str, float]:
    """The finite top-level numbers of a row (bools and nested parts left out), keys prefixed."""
    return {
        f"{prefix}{key}": float(value)
        for key, value in row.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    }


class Trackers:
    """The run's trackers; every method is a no-op without any (train.trackers=[])."""

    def __init__(self, accelerator: Accelerator, cfg: RunConfig, resumed_step: int) -> None:
        self.accelerator, self.cfg = accelerator, cfg
        self.names = list(cfg.train.trackers)
        if not self.names:
            return
        init_kwargs = {"tensorboard": {"purge_step": resumed_step + 1}} if resumed_step else {}
        accelerator.init_trackers(TENSORBOARD_DIR, init_kwargs=init_kwargs)
        for tracker in accelerator.trackers:  # TensorBoard gets the hyperparameters with the final metrics
            if tracker.name != "tensorboard":
                tracker.store_init_configuration(flat_hyperparameters(cfg))

    def scalars(self, step: int, values: dict) -> None:
        if self.names:
            self.accelerator.log(numbers(values), step=step)

    def evaluation(self, step: int, row: dict) -> None:
        if self.names:
            self.accelerator.log(numbers(row, "eval/"), step=step)

    def grids(self, folder: Path, step: int) -> None:
        """The grids the family wrote for `step` (samples/<kind>step_NNNNNNN.png) as images, tag samples/<kind>grid."""
        if not (self.names and self.accelerator.is_main_process):
            return
        for path in sorted(folder.glob(f"*step_{step:07d}.png")):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))[None]
            tag = "samples/" + path.name.removesuffix(f"step_{step:07d}.png") + "grid"
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({tag: pixels}, step=step, dataformats="NHWC")
                elif hasattr(tracker, "log_images"):
                    tracker.log_images({tag: pixels}, step=step)

    def finish(self, final: dict) -> None:
        """The run reached its last step: TensorBoard's hparams view gets the config and `final`."""
        if not (self.names and self.accelerator.is_main_process):
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                metrics = {f"final/{key}": value for key, value in numbers(final).items()}
                tracker.writer.add_hparams(flat_hyperparameters(self.cfg), metrics, run_name=".")

    def close(self) -> None:
        """Flush and close the writers (not Accelerator.end_training, which also ends the process group)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

"""What every family's loop shares: the run folder, the dataset, the data position, the train state."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from gendist.config import RunConfig, to_yaml
from gendist.data.loader import StreamSpec, make_loader
from gendist.data.shards import MANIFEST, Preprocess, write_shards
from gendist.data.synthetic import VERSION, SyntheticFacesSource


@dataclass
class TrainState:
    """Counters that, with the weights, optimizers and RNG, make a resume exact."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    images_seen: int = 0  # over all ranks
    train_seconds: float = 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def prepare_run_dir(cfg: RunConfig, accelerator: Accelerator) -> Path:
    run_dir = Path(cfg.train.run_dir)
    if accelerator.is_main_process:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    accelerator.wait_for_everyone()
    return run_dir


def resolve_shards(cfg: RunConfig, accelerator: Accelerator) -> str:
    """The shard folder to read; builds the embedded synthetic set on first use (once per node)."""
    if cfg.data.shards != "synthetic":
        return cfg.data.shards
    size = cfg.model.image_size
    folder = Path(cfg.data.cache_dir).expanduser() / f"synthetic-faces-v{VERSION}-n{cfg.data.synthetic_count}-{size}px"
    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process and not (folder / MANIFEST).exists():
            accelerator.print(f"building the embedded synthetic face set in {folder} (once)")
            write_shards(SyntheticFacesSource(cfg.data.synthetic_count), folder, Preprocess(size),
                         shard_size=1024, show_progress=True)
    return str(folder)


def stream_spec(cfg: RunConfig, shard_dir: str, accelerator: Accelerator) -> StreamSpec:
    return StreamSpec(
        shard_dir=shard_dir, split=cfg.data.split, batch_size=cfg.data.batch_size, image_size=cfg.model.image_size,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.train.seed,
        shuffle_pool=cfg.data.shuffle_pool, hflip=cfg.data.hflip,
    )


def batches_from(spec: StreamSpec, num_workers: int, state: TrainState, device: torch.device) -> Iterator[dict]:
    """Endless batches from the state's data position, advancing it; images as floats in [-1, 1]."""
    while True:
        loader = make_loader(spec, num_workers, state.epoch, state.batch_in_epoch)
        for batch in loader:
            state.batch_in_epoch += 1
            images = batch["images"].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
            yield {**batch, "images": images, "attrs": batch["attrs"].to(device, non_blocking=True)}
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0

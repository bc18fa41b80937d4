"""A rank's stream of training batches: epoch after epoch from the run's data position, as device
floats, with the damage the loader reports counted per log window and per epoch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from gendist.data.loader import StreamSpec, make_loader
from gendist.stopping import LoaderWorkerSignals


@dataclass
class TrainState:
    """Counters that, with the weights, optimizers and RNG, make a resume exact."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    images_seen: int = 0  # real images, over all ranks
    train_seconds: float = 0.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass(frozen=True)
class EpochRead:
    """What one rank read of a finished epoch: batches [first, last) and the damage reported."""

    epoch: int
    first: int
    last: int
    errors: int
    short: int


class BatchStream:
    """Batches of this rank from `state`'s data position on, advancing it. The loader's workers end
    on every exit path: in the stream on an error (a traceback would keep the loader alive until
    exit) and at `close`."""

    def __init__(self, spec: StreamSpec, num_workers: int, state: TrainState, device: torch.device) -> None:
        self.spec, self.num_workers, self.state, self.device = spec, num_workers, state, device
        self.worker_signals = LoaderWorkerSignals()
        self.window_damage = [0, 0]  # unreadable samples, images short of the manifest, since the last log
        self.epochs_read: list[EpochRead] = []  # finished since the last log
        self._batches = self._stream()

    def next(self) -> dict:
        """The next batch: images as floats in [-1, 1] on the device, attrs as +-1."""
        return next(self._batches)

    def close(self) -> None:
        self.worker_signals.release()
        self._batches.close()

    def _stream(self) -> Iterator[dict]:
        state, spec = self.state, self.spec
        while True:
            loader = make_loader(spec, self.num_workers, state.epoch, state.batch_in_epoch, self.worker_signals)
            first_batch, damage = state.batch_in_epoch, [0, 0]  # this epoch's, beside the window's
            batches = iter(loader)
            try:
                for batch in batches:
                    state.batch_in_epoch += 1
                    state.images_seen += spec.batch_size * spec.world_size
                    for counts in (self.window_damage, damage):
                        counts[0] += batch["errors"]
                        counts[1] += batch["short"]
                    images = batch["images"].to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)
                    yield {**batch, "images": images, "attrs": batch["attrs"].to(self.device, non_blocking=True)}
            except BaseException:  # an error, or the stream closed: the workers may end on SIGTERM now
                self.worker_signals.release()
                raise
            finally:
                shutdown = getattr(batches, "_shutdown_workers", None)  # none without worker processes
                if shutdown is not None:
                    shutdown()
            self.epochs_read.append(EpochRead(state.epoch, first_batch, state.batch_in_epoch, *damage))
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

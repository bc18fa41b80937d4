"""A rank's training data: the family's named streams (one split each: a GAN's `train`, CycleGAN's
two domains), each read epoch after epoch from its own position in the train state, as device
floats, with the damage the loader reports counted per log window and per epoch."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from gendist.config import ConfigError, RunConfig
from gendist.data.domains import write_domains
from gendist.data.loader import ShardStream, StreamSpec, make_loader
from gendist.data.shards import MANIFEST, Preprocess, read_manifest, write_shards
from gendist.data.synthetic import VERSION, SyntheticFacesSource
from gendist.stopping import LoaderWorkerSignals

DEFAULT_STREAM = "train"  # a family with one stream reads data.split under this name
SYNTHETIC_DOMAINS = ("Eyeglasses", "Male")  # the CycleGAN presets' domains, on the embedded set too


def resolve_shards(cfg: RunConfig, accelerator: Accelerator) -> str:
    """The shard folder to read; builds the embedded synthetic set on first use (once per node)."""
    if cfg.data.shards != "synthetic":
        return cfg.data.shards
    size = cfg.model.image_size
    folder = Path(cfg.data.cache_dir).expanduser() / f"synthetic-faces-v{VERSION}-n{cfg.data.synthetic_count}-{size}px"
    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process and not (folder / MANIFEST).exists():
            accelerator.print(f"building the embedded synthetic face set in {folder} (once)")
            write_shards(
                SyntheticFacesSource(cfg.data.synthetic_count),
                folder,
                Preprocess(size),
                shard_size=1024,
                show_progress=True,
            )
        if accelerator.is_local_main_process:
            for attribute in SYNTHETIC_DOMAINS:
                if attribute not in read_manifest(folder).get("domains", {}):
                    write_domains(folder, attribute)
    return str(folder)


def checked_stream(spec: StreamSpec, name: str = DEFAULT_STREAM) -> ShardStream:
    """The stream of `spec`; its split, image size and batch against the split's size are checked
    now and said as config errors."""
    try:
        return ShardStream(spec)
    except ValueError as err:
        message = str(err) if name == DEFAULT_STREAM else f"stream '{name}': {err}"
        if "." in spec.split:  # a domain split "S.D"
            message += f"; domain splits are written by `gendist shards domains {spec.shard_dir} --attribute ATTR`"
        raise ConfigError(message) from None


@dataclass
class StreamPosition:
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed


@dataclass
class TrainState:
    """Counters that, with the weights, optimizers and RNG, make a resume exact."""

    step: int = 0
    images_seen: int = 0  # real images, over all ranks and streams
    train_seconds: float = 0.0
    positions: dict[str, StreamPosition] = field(default_factory=dict)  # per named stream

    def position(self, stream: str = DEFAULT_STREAM) -> StreamPosition:
        return self.positions.setdefault(stream, StreamPosition())

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "epoch" in state:  # written before named streams: the one stream's position
            position = {"epoch": state.pop("epoch"), "batch_in_epoch": state.pop("batch_in_epoch")}
            state["positions"] = {DEFAULT_STREAM: position}
        for name, position in state.pop("positions").items():  # in place: the streams hold their positions
            vars(self.position(name)).update(position)
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


class DeviceCopier:
    """Host-to-device copies of a batch's tensors (uint8 images: a quarter of the bytes of floats,
    normalised on the device). On CUDA the copy of a staged batch runs on a side stream from pinned
    memory, so it overlaps the kernels of the step before; `ready` makes the compute stream wait
    for it. Elsewhere staging does nothing and `ready` copies."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def stage(self, batch: dict) -> dict:
        if self.side is None:
            return batch
        with torch.cuda.stream(self.side):
            return {key: self._copy(value) for key, value in batch.items()}

    def ready(self, staged: dict) -> dict:
        if self.side is None:
            return {key: self._copy(value) for key, value in staged.items()}
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.side)
        for value in staged.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(compute)  # allocated on the side stream, used on the compute one
        return staged

    def _copy(self, value: object) -> object:
        return value.to(self.device, non_blocking=True) if isinstance(value, torch.Tensor) else value


class BatchStream:
    """Batches of this rank from `position` on, advancing it (and `state.images_seen`). The loader's
    workers end on every exit path: in the stream on an error (a traceback would keep the loader
    alive until exit) and at `close`."""

    def __init__(
        self, spec: StreamSpec, num_workers: int, position: StreamPosition, state: TrainState, device: torch.device
    ) -> None:
        self.spec, self.num_workers, self.position, self.state, self.device = spec, num_workers, position, state, device
        self.worker_signals = LoaderWorkerSignals()
        self.window_damage = [0, 0]  # unreadable samples, images short of the manifest, since the last log
        self.epochs_read: list[EpochRead] = []  # finished since the last log
        self.copier = DeviceCopier(device)
        self._batches = self._stream()

    def next(self) -> dict:
        """The next batch: images as floats in [-1, 1] on the device, attrs as +-1."""
        return next(self._batches)

    def close(self) -> None:
        self.worker_signals.release()
        self._batches.close()

    def _stream(self) -> Iterator[dict]:
        position, spec = self.position, self.spec
        while True:
            loader = make_loader(spec, self.num_workers, position.epoch, position.batch_in_epoch, self.worker_signals)
            first_batch, damage = position.batch_in_epoch, [0, 0]  # this epoch's, beside the window's
            batches = iter(loader)
            try:
                # One batch ahead: its copy to the device overlaps the step on the current one. The
                # position and the damage count a batch when it is handed out, so a checkpoint never
                # skips the batch in flight.
                ahead = None
                for batch in batches:
                    staged = self.copier.stage(batch)
                    if ahead is not None:
                        yield self._hand_out(ahead, damage)
                    ahead = staged
                if ahead is not None:
                    yield self._hand_out(ahead, damage)
            except BaseException:  # an error, or the stream closed: the workers may end on SIGTERM now
                self.worker_signals.release()
                raise
            finally:
                shutdown = getattr(batches, "_shutdown_workers", None)  # none without worker processes
                if shutdown is not None:
                    shutdown()
            self.epochs_read.append(EpochRead(position.epoch, first_batch, position.batch_in_epoch, *damage))
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0

    def _hand_out(self, staged: dict, epoch_damage: list[int]) -> dict:
        self.position.batch_in_epoch += 1
        self.state.images_seen += self.spec.batch_size * self.spec.world_size
        for counts in (self.window_damage, epoch_damage):
            counts[0] += staged["errors"]
            counts[1] += staged["short"]
        batch = self.copier.ready(staged)
        return {**batch, "images": batch["images"].float().div_(127.5).sub_(1.0)}


class Streams:
    """The family's named streams of this rank: `splits` maps a stream's name to the split it reads
    (with `base`'s batch, size and seed); each keeps its own position in `state`."""

    def __init__(
        self, base: StreamSpec, splits: dict[str, str], num_workers: int, state: TrainState, device: torch.device
    ) -> None:
        self.specs = {name: dataclasses.replace(base, split=split) for name, split in splits.items()}
        self.sizes = {name: checked_stream(spec, name).num_images for name, spec in self.specs.items()}
        self._streams = {
            name: BatchStream(spec, num_workers, state.position(name), state, device)
            for name, spec in self.specs.items()
        }

    def next(self, name: str = DEFAULT_STREAM) -> dict:
        """The next batch of stream `name`: images as floats in [-1, 1] on the device, attrs as +-1."""
        return self._streams[name].next()

    def take_window_damage(self) -> list[int]:
        """Unreadable samples and images short of the manifest over all streams since the last call."""
        damage = [0, 0]
        for stream in self._streams.values():
            damage = [total + count for total, count in zip(damage, stream.window_damage)]
            stream.window_damage = [0, 0]
        return damage

    def take_epochs_read(self) -> list[tuple[str, EpochRead]]:
        """The epochs each stream finished since the last call, by stream name."""
        finished = [(name, read) for name, stream in self._streams.items() for read in stream.epochs_read]
        for stream in self._streams.values():
            stream.epochs_read = []
        return finished

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()

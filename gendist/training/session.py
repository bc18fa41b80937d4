"""One training run's plumbing, which the loop drives: the accelerator and the networks' wrapping,
the data streams, the checkpointed objects, the metric window and the cadence of logs, grids,
evaluations and checkpoints, and the stop signals. Each concern has its module beside this one
(stream, checkpointing, window, outputs, config_record); the Session composes them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gendist import distributed, engines
from gendist.checkpoint import checkpoint_root, remove_leftovers
from gendist.config import ConfigError, RunConfig
from gendist.data.loader import StreamSpec, batches_per_epoch, domain_split
from gendist.data.shards import read_manifest
from gendist.eval.evaluator import EVAL_LOG, Evaluator
from gendist.families.base import Sampling
from gendist.progress import Reporter, drop_rows_after
from gendist.stopping import StopRequests
from gendist.training import ownership
from gendist.training.checkpointing import Checkpointed
from gendist.training.config_record import record_config, record_data
from gendist.training.outputs import Outputs
from gendist.training.stream import DEFAULT_STREAM, Streams, TrainState, checked_stream, resolve_shards
from gendist.training.tracking import Trackers, checked_trackers
from gendist.training.window import MetricWindow


class Session:
    """One training run's plumbing; the loop owns only the order of the family's phases."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        deepspeed = engines.launch_settings()
        # Under DeepSpeed the engines own mixed precision; the Accelerator only runs the process group.
        self.accelerator = accelerator = distributed.build_accelerator(
            "no" if deepspeed else cfg.train.mixed_precision, checked_trackers(cfg.train.trackers), cfg.train.run_dir
        )
        engine_config = engines.engine_config(deepspeed, cfg, accelerator.num_processes) if deepspeed else None
        self.engine_config = engine_config
        self.device = accelerator.device
        self.run_dir = Path(cfg.train.run_dir)
        shard_dir = resolve_shards(cfg, accelerator)
        self.spec = StreamSpec(
            shard_dir=shard_dir,
            split=cfg.data.split,
            batch_size=cfg.data.batch_size,
            image_size=cfg.model.image_size,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            seed=cfg.train.seed,
            shuffle_pool=cfg.data.shuffle_pool,
            hflip=cfg.data.hflip,
        )
        self.attribute_names: list[str] = checked_stream(self.spec).attribute_names
        self.state = TrainState()
        self.checkpointed = Checkpointed(cfg, accelerator, engine_config, self.state)
        self.streams: Streams | None = None  # the family's, opened by open_streams
        self.window = MetricWindow(accelerator, self.run_dir)
        self._window_start, self._window_images_start = time.perf_counter(), 0
        self.reporter: Reporter | None = None
        self.trackers: Trackers | None = None  # started at resume, when the step to continue from is known
        self._final: dict = {}  # the latest window's values and evaluation: the run's final metrics at its end
        self.outputs = Outputs(
            accelerator, Evaluator(cfg, accelerator, shard_dir), self.run_dir, self.checkpointed.modules
        )
        self.stop_requests = StopRequests()  # installed for the training loop only (__enter__)
        self.stopped_early = False

    # -- set-up ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def owned_run_dir(self) -> Iterator[None]:
        """The run folder is this job's inside: rank 0 holds its lock (gendist.training.ownership), a
        refusal reaches every rank at once, and what an earlier attempt left half-written is removed."""
        with contextlib.ExitStack() as held:
            refusal = None
            if self.accelerator.is_main_process:
                try:
                    warning = held.enter_context(ownership.owned(self.run_dir))
                except ownership.RunFolderBusy as err:
                    refusal = str(err)
                except OSError as err:  # said on every rank, not raised on rank 0 alone
                    refusal = f"cannot take the lock of {self.run_dir}: {err}"
                else:
                    if warning:
                        print(warning, flush=True)
            refusal = distributed.broadcast_from_main(self.accelerator, refusal)
            if refusal:
                raise ownership.RunFolderBusy(refusal)
            if self.accelerator.is_main_process:
                for path in remove_leftovers(checkpoint_root(self.run_dir)):
                    print(f"removed {path}, left unfinished by an earlier attempt", flush=True)
            yield

    def open_streams(self, splits: dict[str, str] | None) -> None:
        """The family's named streams (name -> split; None: one stream of data.split), each checked now."""
        splits = splits or {DEFAULT_STREAM: self.cfg.data.split}
        self.streams = Streams(self.spec, splits, self.cfg.data.num_workers, self.state, self.device)

    def prepare(
        self, name: str, model: nn.Module, optimizer_name: str, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, engines.Update]:
        """A network and its optimizer made distributed (DDP, or a DeepSpeed engine of their own) and
        checkpointed under these names; returns the model to call and the update that steps it."""
        if self.engine_config is not None:
            # DeepSpeed flattens the parameters into one buffer (and cannot broadcast NHWC weights)
            model = model.to(memory_format=torch.contiguous_format)
            engine = engines.build_engine(model, optimizer, self.engine_config)
            self.register(name, engine)  # whole weights in state.pt, optimizer shards in deepspeed/<name>
            return engine, engines.EngineUpdate(engine)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.register(name, model)  # the eager module: checkpoints hold its plain keys, compiled or not
        self.register(optimizer_name, optimizer)
        return engines.compiled(model, self.cfg.train.compile), engines.AcceleratorUpdate(self.accelerator, optimizer)

    def begin_step(self) -> None:
        """Under CUDA graphs (train.compile=reduce-overhead on a GPU), the outputs of the last step's
        graphs may be overwritten from here on."""
        if self.device.type == "cuda" and self.cfg.train.compile in engines.CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()

    def no_sync(self, model: nn.Module):
        """For a backward that gives `model` no gradients (its parameters frozen)."""
        return engines.no_sync(self.accelerator, model)

    def register(self, name: str, obj: Any) -> None:
        self.checkpointed.register(name, obj)

    def register_per_rank(self, name: str, obj: Any) -> None:
        self.checkpointed.register_per_rank(name, obj)

    def attach(self, sampling: Sampling) -> None:
        """The family's outputs: sample grids, and what evaluation scores. With evaluation on, missing
        FID weights fail now, not hours into the run, and the real statistics it scores against are
        built before the collective timeout shortens."""
        self.outputs.sampling = sampling
        if not self.cfg.eval.every:
            return
        evaluator, ev = self.outputs.evaluator, self.cfg.eval
        if ev.classifier:  # a judge that cannot be loaded fails now
            assert evaluator.judge is not None
        if sampling.generate is not None or sampling.complete is not None:
            evaluator.reference()
        elif sampling.translate:  # a translation family scores against its target domains
            for _, target in sampling.translate:
                evaluator.reference(split=domain_split(ev.split, target))

    def resume(self) -> None:
        """Record the config, load the latest readable checkpoint, if any, and start reporting. Rows
        that a killed run logged after that checkpoint are dropped: they are replayed."""
        refusal = record_config(self.cfg, self.run_dir) if self.accelerator.is_main_process else None
        refusal = distributed.broadcast_from_main(self.accelerator, refusal)
        if refusal:
            raise ConfigError(refusal)
        if self.accelerator.is_main_process:
            record_data(read_manifest(self.spec.shard_dir), self.spec.shard_dir, self.run_dir)
        checkpoint = self.checkpointed.resume()
        if checkpoint is not None:
            distributed.rank_print(self.accelerator, f"resumed from {checkpoint} at step {self.state.step}")
        if self.accelerator.is_main_process:
            drop_rows_after(self.run_dir / "metrics.jsonl", self.state.step)
            drop_rows_after(self.run_dir / EVAL_LOG, self.state.step, lambda row: row.get("source") == "training")
        self.reporter = Reporter(self.run_dir, self.cfg.train.steps, self.state.step, self.accelerator.is_main_process)
        self.trackers = Trackers(self.accelerator, self.cfg, self.state.step)
        self._window_start, self._window_images_start = time.perf_counter(), self.state.images_seen

    # -- data --------------------------------------------------------------------------------
    def next_batch(self, stream: str = DEFAULT_STREAM) -> dict:
        """The next batch of this rank from `stream`: images as floats in [-1, 1] on the device, attrs as +-1."""
        return self.streams.next(stream)

    # -- cadence -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state.step < self.cfg.train.steps and not self.stopped_early

    def step_done(self, values: dict[str, torch.Tensor | float]) -> None:
        """Count a step, keep its values, and log / sample / evaluate / checkpoint on their cadence.
        Values may be device tensors or Python numbers; nothing here waits for the device."""
        train = self.cfg.train
        self.state.step += 1
        self.window.add(self.state.step, values)
        last = self.state.step == train.steps
        logged = self.state.step % train.log_every == 0 or last
        if logged:
            self._log()
        else:
            self.reporter.advance(self.state.step)
        sample = self.state.step % train.sample_every == 0 or last
        evaluate = self.cfg.eval.every > 0 and (self.state.step % self.cfg.eval.every == 0 or last)
        saved = self.state.step % train.checkpoint_every == 0 or last
        if (sample or evaluate or saved) and not logged:
            self.window.check()
        if sample or evaluate:
            for module in self.checkpointed.modules:
                distributed.average_buffers(self.accelerator, module)
        if sample:
            self.outputs.write_grids(self.state.step)
            self.trackers.grids(self.run_dir / "samples", self.state.step)
        if evaluate:
            self.evaluate()
        if saved:
            self.checkpointed.save()
        if not last and distributed.any_rank(self.accelerator, self.stop_requests.requested):
            self._stop_early(saved)

    def _stop_early(self, saved: bool) -> None:
        """A stop signal reached some rank during this step: log the partial window, checkpoint, end."""
        self.stopped_early = True
        if len(self.window):
            self._log()
        if not saved:
            self.checkpointed.save()
        self.reporter.message(
            f"stopping at step {self.state.step} on {self.stop_requests.describe()}: checkpoint "
            f"written; the same command with train.run_dir={self.run_dir} resumes"
        )

    def evaluate(self) -> dict:
        """Score the current models (collective); its time is kept out of the images/s window."""
        started = time.perf_counter()
        row, summary = self.outputs.evaluate(self.state.step, self.state.images_seen)
        self.reporter.message(summary)
        self.trackers.evaluation(self.state.step, row)
        self._final.update({f"eval/{key}": value for key, value in row.items()})
        self._window_start += time.perf_counter() - started
        return row

    def _log(self) -> None:
        means, diverged = self.window.close()
        damage = self.streams.take_window_damage()
        errors, short = distributed.sum_across_ranks(self.accelerator, torch.tensor(damage)).long().tolist()
        seconds = time.perf_counter() - self._window_start
        self.state.train_seconds += seconds
        images = self.state.images_seen - self._window_images_start
        epochs = {
            "epoch" if name == DEFAULT_STREAM else f"epoch_{name}": position.epoch
            for name, position in self.state.positions.items()
        }
        logged = {
            **means,
            "images_per_s": images / seconds,
            "data_errors": errors,
            "data_short": short,
            **epochs,
            "images_seen": self.state.images_seen,
        }
        self.reporter.log(self.state.step, logged)
        self.trackers.scalars(self.state.step, logged)
        self._final.update(logged)
        if short:
            self.reporter.message(
                f"warning: the shards delivered {short} images fewer than the manifest lists in this "
                f"window (damaged shards? `gendist shards verify {self.spec.shard_dir}`)"
            )
        self._report_epochs()
        if diverged:  # logged (as null) first, for the curves
            raise self.window.diverged()
        self._window_start, self._window_images_start = time.perf_counter(), self.state.images_seen

    def _report_epochs(self) -> None:
        """Collective: one line per epoch finished since the last log, its images read against the manifest."""
        world, batch = self.accelerator.num_processes, self.spec.batch_size
        for name, read in self.streams.take_epochs_read():
            counts = torch.tensor([read.errors, read.short])
            errors, short = distributed.sum_across_ranks(self.accelerator, counts).long().tolist()
            total = self.streams.sizes[name]
            stream = "" if name == DEFAULT_STREAM else f"stream '{name}' "
            resumed = (
                f" (resumed at batch {read.first}: batches {read.first}-{read.last} counted)" if read.first else ""
            )
            self.reporter.message(
                f"{stream}epoch {read.epoch}: read {(read.last - read.first) * batch * world - short} of the "
                f"{total} images the manifest lists{resumed}; {short} short of the manifest, {errors} "
                f"unreadable samples skipped, {total - read.last * batch * world} left over (the "
                "remainder, which rotates between epochs)"
            )

    def __enter__(self) -> Session:
        batch, world = self.cfg.data.batch_size, self.accelerator.num_processes
        for name, spec in self.streams.specs.items():
            size = self.streams.sizes[name]
            stream = "" if name == DEFAULT_STREAM else f"stream '{name}': "
            distributed.rank_print(
                self.accelerator,
                f"{stream}global batch: {batch} images per rank x {world} rank(s) = {batch * world}; "
                f"{batches_per_epoch(size, world, batch)} batches per epoch of the {size} '{spec.split}' images",
            )
        distributed.set_collective_timeout(self.cfg.train.collective_timeout_s)
        self.stop_requests.install()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # Stop the loader workers now (on an error the stream has stopped them already): left to the
        # garbage collector, the stream dies inside a reference cycle whose queues may be finalised
        # first, and each worker then takes its 5 s shutdown timeout.
        self.streams.close()
        self.stop_requests.restore()
        if self.reporter is not None:
            self.reporter.close()
        if self.trackers is not None:
            if exc_type is None and self.state.step == self.cfg.train.steps:
                self.trackers.finish(self._final)
            self.trackers.close()
        if exc_type is None and self.state.train_seconds > 0:
            distributed.rank_print(
                self.accelerator,
                f"done: step {self.state.step}, {self.state.images_seen} real images seen, "
                f"{self.state.images_seen / self.state.train_seconds:.1f} images/s over the logged training time",
            )

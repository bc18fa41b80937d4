"""What every family's loop shares: the Session (accelerator, run folder, data position, train
state, checkpointed objects, metric windows and the log/sample/checkpoint cadence)."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from torch import nn

import gendist
from gendist import distributed, engines
from gendist.checkpoint import (
    CheckpointError,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from gendist.config import ConfigError, OptimConfig, RunConfig, differences, load_into, to_dict, to_yaml
from gendist.data.loader import ShardStream, StreamSpec, batches_per_epoch
from gendist.data.shards import MANIFEST, Preprocess, write_shards
from gendist.data.synthetic import VERSION, SyntheticFacesSource
from gendist.eval.evaluator import EVAL_LOG, SHOWN, Evaluator, append_row
from gendist.families.base import Sampling
from gendist.progress import Reporter, drop_rows_after
from gendist.stopping import StopRequests
from gendist.training.stream import BatchStream, TrainState

PLAIN = "accelerate"  # the backend of DDP runs, as checkpoints name it
DEEPSPEED_FOLDER = "deepspeed"  # in a checkpoint: one DeepSpeed checkpoint per engine (tag = network name)


class Diverged(RuntimeError):
    """A loss or a weight stopped being finite: the run ends without checkpointing it."""


def build_optimizer(params, lr: float, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, foreach=True)
    # fused: one kernel for all parameters on GPUs (CPUs too); the same update as the default loop
    return torch.optim.Adam(params, lr=lr, betas=cfg.betas, fused=True)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, cfg: OptimConfig) -> None:
    """The config's learning rate (and Adam betas) over what a resumed optimizer state holds: a
    checkpoint carries state, the config decides hyperparameters (PBT changes them mid-run)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "betas" in group:
            group["betas"] = tuple(cfg.betas)


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
    return str(folder)


def stack_values(values: dict[str, torch.Tensor | float], names: list[str], device: torch.device) -> torch.Tensor:
    """One float vector on `device` of a step's values (device or CPU tensors, Python numbers). A
    number becomes a fill on the device, not a host-to-device copy, which would wait for the stream."""
    return torch.stack(
        [
            values[name].detach().float().reshape(()).to(device)
            if isinstance(values[name], torch.Tensor)
            else torch.full((), float(values[name]), device=device)
            for name in names
        ]
    )


def all_finite(params) -> bool:
    flags = [p.detach().isfinite().all() for p in params]
    return bool(torch.stack(flags).all().item()) if flags else True


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
        kept = path.with_name(f"config.until_step_{checkpoint_step(latest) if latest else 0:07d}.yaml")
        if not kept.exists():
            path.rename(kept)
        print(
            f"config changed since this run's last launch: {'; '.join(_changes(changed, list(changed)))} "
            f"(the previous config is kept as {kept.name})",
            flush=True,
        )
    path.write_text(text)
    return None


def _changes(changed: dict[str, tuple[Any, Any]], keys: list[str]) -> list[str]:
    return [f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in keys]


class Session:
    """One training run's plumbing; the loops own only their maths."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        deepspeed = engines.launch_settings()
        # Under DeepSpeed the engines own mixed precision; the Accelerator only runs the process group.
        self.accelerator = accelerator = distributed.build_accelerator("no" if deepspeed else cfg.train.mixed_precision)
        self.engine_config = engines.engine_config(deepspeed, cfg, accelerator.num_processes) if deepspeed else None
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
        try:  # the split, the image size and the batch against the split's size: said now, as config errors
            stream = ShardStream(self.spec)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.attribute_names: list[str] = stream.attribute_names
        self._split_images = stream.num_images
        refusal = record_config(cfg, self.run_dir) if accelerator.is_main_process else None
        refusal = distributed.broadcast_from_main(accelerator, refusal)
        if refusal:
            raise ConfigError(refusal)
        self.state = TrainState()
        self.checkpointed: dict[str, Any] = {}
        self.per_rank: dict[str, Any] = {}
        self.modules: list[nn.Module] = []
        self.stream = BatchStream(self.spec, cfg.data.num_workers, self.state, self.device)
        self._window: list[torch.Tensor] = []  # per step: the loop's values, stacked in the order of _names
        self._names: list[str] = []
        self._window_start, self._window_images_start = time.perf_counter(), 0
        self.reporter: Reporter | None = None
        self.evaluator = Evaluator(cfg, accelerator, shard_dir)
        if cfg.eval.every:  # missing FID weights fail now, not hours into the run, and the real
            self.evaluator.reference()  # statistics are built before the collective timeout shortens
        self._sampling: Sampling | None = None
        self.stop_requests = StopRequests()  # installed for the training loop only (__enter__)
        self.stopped_early = False

    # -- set-up ------------------------------------------------------------------------------
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
        self.register(name, model)
        self.register(optimizer_name, optimizer)
        return model, engines.AcceleratorUpdate(self.accelerator, optimizer)

    def no_sync(self, model: nn.Module):
        """For a backward that gives `model` no gradients (its parameters frozen)."""
        return engines.no_sync(self.accelerator, model)

    @property
    def engines(self) -> dict[str, Any]:
        """The DeepSpeed engines among the checkpointed objects, by name."""
        return {name: obj for name, obj in self.checkpointed.items() if engines.is_engine(obj)}

    def register(self, name: str, obj: Any) -> None:
        self.checkpointed[name] = obj
        if isinstance(obj, nn.Module):
            self.modules.append(obj)

    def register_per_rank(self, name: str, obj: Any) -> None:
        """State that differs between ranks (an image pool of this rank's fakes): each rank saves and
        loads its own, in its rank<R>.pt."""
        self.per_rank[name] = obj

    def attach(self, sampling: Sampling) -> None:
        """The family's outputs: sample grids, and what evaluation scores."""
        self._sampling = sampling

    def resume(self) -> None:
        """Load the latest checkpoint of the run folder that every rank can read, if any, and start
        reporting. Rows that a killed run logged after that checkpoint are dropped: they are replayed."""
        checkpoint, shared, mine = self._latest_readable()
        if checkpoint is not None:
            self._check_backend(checkpoint, shared)
            sharded = self.engines
            if sharded:
                engines.load_engines(sharded, checkpoint / DEEPSPEED_FOLDER)
            for name, obj in self.checkpointed.items():
                if name in sharded:
                    continue
                target = self.accelerator.unwrap_model(obj) if isinstance(obj, nn.Module) else obj
                target.load_state_dict(shared[name])
            if self.accelerator.scaler is not None and "scaler" in shared:
                self.accelerator.scaler.load_state_dict(shared["scaler"])
            self.state.load_state_dict(shared["train_state"])
            self._check_layout(checkpoint, shared)
            if mine is not None:
                set_rng_state(mine["rng"])
                for name, obj in self.per_rank.items():
                    obj.load_state_dict(mine["state"][name])
            elif shared["world_size"] >= self.accelerator.num_processes:
                print(
                    f"[rank {self.accelerator.process_index}] warning: {checkpoint} has no state of this rank (RNG, "
                    "per-rank objects): the resume is not bit-identical",
                    flush=True,
                )
            distributed.rank_print(self.accelerator, f"resumed from {checkpoint} at step {self.state.step}")
        if self.accelerator.is_main_process:
            drop_rows_after(self.run_dir / "metrics.jsonl", self.state.step)
            drop_rows_after(self.run_dir / EVAL_LOG, self.state.step, lambda row: row.get("source") == "training")
        self.reporter = Reporter(self.run_dir, self.cfg.train.steps, self.state.step, self.accelerator.is_main_process)
        self._window_start, self._window_images_start = time.perf_counter(), self.state.images_seen

    def _latest_readable(self) -> tuple[Path | None, dict | None, dict | None]:
        """The newest checkpoint every rank could load, falling back past unreadable ones (said)."""
        found = distributed.broadcast_from_main(self.accelerator, list_checkpoints(self.run_dir))  # one list: one loop
        for checkpoint in reversed(found):
            problem = None
            try:
                shared, mine = load_checkpoint(checkpoint, self.accelerator.process_index)
            except CheckpointError as err:
                problem = str(err)
                print(f"[rank {self.accelerator.process_index}] warning: {problem}", flush=True)
            if not distributed.any_rank(self.accelerator, problem is not None):
                return checkpoint, shared, mine
            if self.accelerator.is_main_process:
                set_aside(checkpoint)  # kept for a look, out of pruning, eval and compare
            distributed.rank_print(
                self.accelerator,
                f"warning: cannot resume from {checkpoint} (set aside as "
                f".{checkpoint.name}.unreadable); trying the checkpoint before it",
            )
        if found:
            raise CheckpointError(
                f"none of the {len(found)} checkpoints in {found[0].parent} can be loaded (see the "
                "warnings above); move them away to start this run afresh"
            )
        return None, None, None

    def _check_layout(self, checkpoint: Path, shared: dict) -> None:
        """Resuming under another rank count, loader workers, per-rank batch, seed or gendist version
        works but is not bit-identical to an uninterrupted run: say so, and carry the position in
        the epoch over as images read."""
        saved = shared.get("layout", {"world_size": shared["world_size"]})  # older checkpoints
        changed = {key: (value, self.layout.get(key)) for key, value in saved.items() if self.layout.get(key) != value}
        if not changed:
            return
        old_batch = saved["world_size"] * saved.get("batch_size", self.cfg.data.batch_size)
        new_batch = self.accelerator.num_processes * self.cfg.data.batch_size
        self.state.batch_in_epoch = self.state.batch_in_epoch * old_batch // new_batch
        described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        distributed.rank_print(
            self.accelerator,
            f"warning: resuming {checkpoint} with another layout ({described}): training "
            "continues, but not bit-identically to an uninterrupted run (the data order and the noise of "
            "each rank depend on these); the position in the epoch is carried over as images read",
        )

    def _check_backend(self, checkpoint: Path, shared: dict) -> None:
        """A checkpoint resumes under the backend that wrote it (its optimizer states' format), and a
        DeepSpeed one with its number of ranks (one optimizer shard each)."""
        backend = shared.get("backend", PLAIN)
        if backend != self.backend:
            launch = (
                "a DDP launch (launch/multi_gpu.yaml, torchrun, ...)"
                if backend == PLAIN
                else f"launch/ds_{backend.removeprefix('deepspeed-')}.yaml"
            )
            raise ConfigError(
                f"{checkpoint} was written by the {backend} backend and cannot resume under {self.backend} "
                f"(its optimizer state is in that backend's format): resume it with {launch}; "
                "gendist eval and compare read it as it is"
            )
        if self.engines and shared["world_size"] != self.accelerator.num_processes:
            raise ConfigError(
                f"{checkpoint} holds ZeRO optimizer shards of {shared['world_size']} ranks; resume it with "
                f"{shared['world_size']} processes (this launch has {self.accelerator.num_processes})"
            )

    @property
    def backend(self) -> str:
        return f"deepspeed-zero{self.engine_config['zero_optimization']['stage']}" if self.engine_config else PLAIN

    # -- data --------------------------------------------------------------------------------
    def next_batch(self) -> dict:
        """The next batch of this rank: images as floats in [-1, 1] on the device, attrs as +-1."""
        return self.stream.next()

    # -- cadence -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state.step < self.cfg.train.steps and not self.stopped_early

    def step_done(self, values: dict[str, torch.Tensor | float]) -> None:
        """Count a step, keep its values, and log / sample / evaluate / checkpoint on their cadence.
        Values may be device tensors or Python numbers; nothing here waits for the device."""
        train = self.cfg.train
        self.state.step += 1
        if not self._names:
            self._names = sorted(values)
        self._window.append(stack_values(values, self._names, self.device))
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
            self._check_window()
        if sample or evaluate:
            for module in self.modules:
                distributed.average_buffers(self.accelerator, module)
        if sample and self.accelerator.is_main_process:
            with self._modules_in_eval_mode():
                self._sampling.write_grids(self.run_dir / "samples", self.state.step)
        if evaluate:
            self.evaluate()
        if saved:
            self.save()
        if not last and distributed.any_rank(self.accelerator, self.stop_requests.requested):
            self._stop_early(saved)

    def _stop_early(self, saved: bool) -> None:
        """A stop signal reached some rank during this step: log the partial window, checkpoint, end."""
        self.stopped_early = True
        if self._window:
            self._log()
        if not saved:
            self.save()
        self.reporter.message(
            f"stopping at step {self.state.step} on {self.stop_requests.describe()}: checkpoint "
            f"written; the same command with train.run_dir={self.run_dir} resumes"
        )

    def _check_window(self) -> None:
        """Collective: raise Diverged if any rank logged a non-finite value since the last log."""
        if self._window:
            flag = (~torch.stack(self._window).isfinite()).any().float()
            if self.accelerator.reduce(flag, reduction="sum").item() > 0:
                self._diverged()

    def _diverged(self) -> None:
        """Collective: name the first non-finite value over the ranks, then stop without a checkpoint."""
        window = torch.stack(self._window)
        steps = torch.arange(self.state.step - len(window) + 1, self.state.step + 1, device=self.device)
        never = self.state.step + 1
        bad = ~window.isfinite()
        first = torch.where(bad, steps[:, None], never).amin(dim=0)  # per value: its first bad step here
        first = distributed.min_across_ranks(self.accelerator, first)
        at = int(first.min().item())
        names = [name for name, step in zip(self._names, first.tolist()) if step == at]
        latest = latest_checkpoint(self.run_dir)
        kept = (
            f"the last checkpoint, {latest} (step {checkpoint_step(latest)}), was written before it"
            if latest is not None
            else "no checkpoint was written"
        )
        raise Diverged(
            f"training diverged: {', '.join(names)} not finite at step {at}; stopped without checkpointing "
            f"it ({kept}). Lower the learning rates (optim.lr_g, optim.lr_d) and resume, or start a new "
            "train.run_dir"
        )

    @contextlib.contextmanager
    def _modules_in_eval_mode(self):
        modes = [module.training for module in self.modules]
        for module in self.modules:
            module.eval()
        try:
            yield
        finally:
            for module, mode in zip(self.modules, modes):
                module.train(mode)

    def evaluate(self) -> dict:
        """Score the current models (collective); its time is kept out of the images/s window."""
        started = time.perf_counter()
        sampling = self._sampling
        with self._modules_in_eval_mode():
            row = self.evaluator.evaluate(
                sampling.generate, self.state.step, sampling.label, sampling.reconstruct, sampling.complete
            )
        row["images_seen"] = self.state.images_seen
        row["source"] = "training"
        if self.accelerator.is_main_process:
            append_row(self.run_dir, row)
        shown = "  ".join(f"{k} {row[k]:.4g}" for k in SHOWN if k in row)
        self.reporter.message(
            f"eval step {self.state.step}: {shown}  ({sum(row['seconds'].values()):.1f}s, "
            f"{row['protocol']['generated']} samples vs {row['protocol']['reference_images']} "
            f"'{row['protocol']['reference_split']}' images, Inception: {row['protocol']['inception']})"
        )
        self._window_start += time.perf_counter() - started
        return row

    def _log(self) -> None:
        window = torch.stack(self._window)
        means = distributed.mean_across_ranks(self.accelerator, dict(zip(self._names, window.mean(dim=0))))
        damage, self.stream.window_damage = self.stream.window_damage, [0, 0]
        errors, short = distributed.sum_across_ranks(self.accelerator, torch.tensor(damage)).long().tolist()
        seconds = time.perf_counter() - self._window_start
        self.state.train_seconds += seconds
        images = self.state.images_seen - self._window_images_start
        self.reporter.log(
            self.state.step,
            {
                **means,
                "images_per_s": images / seconds,
                "data_errors": errors,
                "data_short": short,
                "epoch": self.state.epoch,
                "images_seen": self.state.images_seen,
            },
        )
        if short:
            self.reporter.message(
                f"warning: the shards delivered {short} images fewer than the manifest lists in this "
                f"window (damaged shards? `gendist shards verify {self.spec.shard_dir}`)"
            )
        self._report_epochs()
        if not all(math.isfinite(value) for value in means.values()):  # the same on every rank
            self._diverged()
        self._window = []
        self._window_start, self._window_images_start = time.perf_counter(), self.state.images_seen

    def _report_epochs(self) -> None:
        """Collective: one line per epoch finished since the last log, its images read against the manifest."""
        for read in self.stream.epochs_read:
            errors, short = (
                distributed.sum_across_ranks(self.accelerator, torch.tensor([read.errors, read.short])).long().tolist()
            )
            world, batch = self.accelerator.num_processes, self.spec.batch_size
            resumed = (
                f" (resumed at batch {read.first}: batches {read.first}-{read.last} counted)" if read.first else ""
            )
            self.reporter.message(
                f"epoch {read.epoch}: read {(read.last - read.first) * batch * world - short} of the "
                f"{self._split_images} images the manifest lists{resumed}; {short} short of the manifest, {errors} "
                f"unreadable samples skipped, {self._split_images - read.last * batch * world} left over (the "
                "remainder, which rotates between epochs)"
            )
        self.stream.epochs_read = []

    def save(self) -> None:
        for module in self.modules:
            distributed.average_buffers(self.accelerator, module)
        unfinite = [
            name
            for name, obj in self.checkpointed.items()
            if isinstance(obj, nn.Module) and not all_finite(obj.parameters())
        ]
        if distributed.any_rank(self.accelerator, bool(unfinite)):
            latest = latest_checkpoint(self.run_dir)
            raise Diverged(
                f"training diverged: the weights of {', '.join(unfinite) or 'a network on another rank'} are "
                f"not finite after step {self.state.step}; no checkpoint of them was written (the latest "
                f"is {latest}). Lower the learning rates (optim.lr_g, optim.lr_d) and resume"
            )
        shared: dict[str, Any] = {
            name: (self.accelerator.unwrap_model(obj) if isinstance(obj, nn.Module) else obj).state_dict()
            for name, obj in self.checkpointed.items()
        }
        shared["train_state"] = self.state.state_dict()
        shared["world_size"] = self.accelerator.num_processes
        shared["layout"] = self.layout
        shared["config"] = to_yaml(self.cfg)
        shared["backend"] = self.backend
        if self.accelerator.scaler is not None:
            shared["scaler"] = self.accelerator.scaler.state_dict()
        sharded = self.engines
        write_sharded = (lambda folder: engines.save_engines(sharded, folder / DEEPSPEED_FOLDER)) if sharded else None
        save_checkpoint(
            self.accelerator,
            self.run_dir,
            self.state.step,
            shared,
            self.cfg.train.keep_checkpoints,
            write_sharded,
            {name: obj.state_dict() for name, obj in self.per_rank.items()},
        )

    @property
    def layout(self) -> dict[str, Any]:
        """What an exact resume depends on besides the checkpointed state."""
        # 0 and 1 loader workers read the same single stream
        return {
            "world_size": self.accelerator.num_processes,
            "num_workers": max(1, self.cfg.data.num_workers),
            "batch_size": self.cfg.data.batch_size,
            "seed": self.cfg.train.seed,
            "gendist": gendist.__version__,
        }

    def __enter__(self) -> Session:
        batch, world = self.cfg.data.batch_size, self.accelerator.num_processes
        distributed.rank_print(
            self.accelerator,
            f"global batch: {batch} images per rank x {world} rank(s) = {batch * world}; "
            f"{batches_per_epoch(self._split_images, world, batch)} batches per epoch "
            f"of the {self._split_images} '{self.cfg.data.split}' images",
        )
        distributed.set_collective_timeout(self.cfg.train.collective_timeout_s)
        self.stop_requests.install()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # Stop the loader workers now (on an error the stream has stopped them already): left to the
        # garbage collector, the stream dies inside a reference cycle whose queues may be finalised
        # first, and each worker then takes its 5 s shutdown timeout.
        self.stream.close()
        self.stop_requests.restore()
        if self.reporter is not None:
            self.reporter.close()
        if exc_type is None and self.state.train_seconds > 0:
            distributed.rank_print(
                self.accelerator,
                f"done: step {self.state.step}, {self.state.images_seen} real images seen, "
                f"{self.state.images_seen / self.state.train_seconds:.1f} images/s over the logged training time",
            )

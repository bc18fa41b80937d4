"""Every distributed concern in one place: the Accelerator, per-rank seeding, cross-rank
reductions, buffer averaging, rank-aware printing and shutdown. Models, losses and data stay
free of torch.distributed."""

from __future__ import annotations

import datetime
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from gendist import disk, launcher
from gendist.engines import accelerate_without_deepspeed


def join_restartable_group() -> None:
    """Join the launcher's process group under a store prefix per restart attempt. torch elastic
    (torchrun / accelerate launch --max_restarts) keeps one store across attempts, and a restarted
    worker may read the dead attempt's peer addresses and fail to connect (seen with torch 2.14
    and gloo in 2 of 4 restarts). Accelerate then uses this group as it is."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or int(os.environ.get("WORLD_SIZE", "1")) == 1 or torch_dist.is_initialized():
        return
    store, rank, world_size = next(torch_dist.rendezvous("env://"))
    torch_dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        rank=rank,
        world_size=world_size,
        store=torch_dist.PrefixStore(f"gendist/attempt_{attempt}", store),
    )


def build_accelerator(
    mixed_precision: str, trackers: list[str] | None = None, run_dir: str | None = None
) -> Accelerator:
    """The process group and device of every gendist command; a training run's also carries its
    experiment trackers (Accelerate's log_with, writing under run_dir). Launcher settings no command
    honours are refused here (gendist.launcher)."""
    launcher.refuse_unsupported()
    # broadcast_buffers=False: the discriminator runs several forwards (real, fake) before one
    # backward, and a buffer broadcast at each forward would rewrite batch-norm state between
    # them. Buffers are averaged explicitly instead (average_buffers) before they are used.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    join_restartable_group()
    # Without cpu=True, a multi-process launch on a machine without CUDA silently starts
    # independent single-process runs; with it, the ranks join one gloo group.
    with accelerate_without_deepspeed():
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            # gendist compiles (train.compile, which gendist.launcher maps the launcher's dynamo
            # settings onto); Accelerate must not compile again inside prepare
            dynamo_backend="no",
            kwargs_handlers=[ddp],
            cpu=not torch.cuda.is_available(),
            log_with=trackers or None,
            project_dir=run_dir,
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes but only {accelerator.num_processes} joined the "
            "process group; check the accelerate config (distributed_type) and the devices"
        )
    if mixed_precision == "bf16" and accelerator.device.type == "cpu":
        rank_print(accelerator, "note: bf16 on CPU is emulated and slow; use it on GPUs")
    return accelerator


def build_fp32_accelerator() -> Accelerator:
    """The accelerator of a command that does not train (evaluation, translation, ...), which computes
    in fp32 and eagerly as pytorch-fid's protocol does; a launcher's precision or dynamo backend is
    said to be unused, not dropped in silence."""
    accelerator = build_accelerator("no")
    for note in launcher.unused_by_fp32_command():
        rank_print(accelerator, note)
    return accelerator


def seed_everything(seed: int, accelerator: Accelerator | None = None) -> None:
    """Same seed on every rank, or a distinct stream per rank when an accelerator is given."""
    set_seed(seed if accelerator is None else rank_seed(seed, accelerator.process_index))


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s seed of a run seeded `seed`: a child of numpy's SeedSequence, so run seed 0 rank 1
    and run seed 1 rank 0 draw unrelated streams (`seed + rank` would make them one)."""
    return int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1)[0])


@torch.no_grad()
def average_buffers(accelerator: Accelerator, model: nn.Module) -> None:
    """Make floating-point buffers (batch-norm running stats) identical on every rank."""
    if accelerator.num_processes == 1:
        return
    for buffer in accelerator.unwrap_model(model).buffers():
        if buffer.is_floating_point():
            torch_dist.all_reduce(buffer, op=torch_dist.ReduceOp.SUM)
            buffer /= accelerator.num_processes


def mean_across_ranks(accelerator: Accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One collective for a dict of scalars: the mean over ranks, as Python floats."""
    names = sorted(values)
    stacked = torch.stack(
        [torch.as_tensor(values[n], device=accelerator.device).detach().float().reshape(()) for n in names]
    )
    reduced = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(names, reduced.tolist()))


def min_across_ranks(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum over ranks (collective)."""
    values = values.clone()
    if accelerator.num_processes > 1:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MIN)
    return values


def chunk_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share [start, end) of `total` items; the shares concatenate in order."""
    per_rank = -(-total // world_size)
    return min(total, rank * per_rank), min(total, (rank + 1) * per_rank)


def gather_rows(accelerator: Accelerator, rows: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's `chunk_bounds` share of rows (on the CPU), in rank order."""
    if accelerator.num_processes == 1:
        return rows.cpu()
    per_rank = chunk_bounds(total, 0, accelerator.num_processes)[1]  # rank 0's share is the largest
    padded = torch.zeros(per_rank, *rows.shape[1:], dtype=rows.dtype, device=accelerator.device)
    padded[: len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(accelerator.num_processes)]
    torch_dist.all_gather(parts, padded)
    return torch.cat(parts)[:total].cpu()


def sum_across_ranks(accelerator: Accelerator, values: torch.Tensor) -> torch.Tensor:
    """Float64 sum over ranks (exact enough for sums of many squared errors)."""
    values = values.to(accelerator.device, torch.float64)
    if accelerator.num_processes > 1:
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
    return values


def broadcast_rows(accelerator: Accelerator, rows: np.ndarray | None) -> np.ndarray:
    """Rank 0's float32 array (None elsewhere) on every rank, as a tensor broadcast: no pickling."""
    if accelerator.num_processes == 1:
        return rows
    shape = broadcast_from_main(accelerator, None if rows is None else rows.shape)
    if accelerator.is_main_process:
        tensor = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(accelerator.device)
    else:
        tensor = torch.empty(shape, dtype=torch.float32, device=accelerator.device)
    torch_dist.broadcast(tensor, src=0)
    return tensor.cpu().numpy()


def broadcast_from_main(accelerator: Accelerator, obj: Any) -> Any:
    """Rank 0's picklable `obj` on every rank."""
    if accelerator.num_processes == 1:
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=0)
    return holder[0]


@functools.cache
def _cpu_group() -> torch_dist.ProcessGroup | None:
    """A gloo group beside NCCL, for control flags; None means the default group is gloo already."""
    if torch_dist.get_backend() == "gloo":
        return None
    return torch_dist.new_group(backend="gloo")


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (collective). It runs on the CPU, so a
    GPU run calling it every step does not wait for its queued kernels."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([int(flag)])
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX, group=_cpu_group())
    return bool(value.item())


def rank_print(accelerator: Accelerator, message: str) -> None:
    """Print on the main process only, tagged with the world size when distributed."""
    if accelerator.is_main_process:
        tag = f"[rank 0/{accelerator.num_processes}] " if accelerator.num_processes > 1 else ""
        print(f"{tag}{message}", flush=True)


def launched_rank() -> int:
    """This process's global rank as the launcher numbered it (also before the process group exists)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """The number of processes the launcher started (also before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def set_collective_timeout(seconds: float) -> None:
    """Shorten the process group's timeout once set-up is over: a rank stuck in a collective (a peer
    that died on NCCL, a hung device) then fails after `seconds` instead of the launch default
    (30 min gloo, 10 min NCCL), which set-up keeps for rank 0's one-off work (shard and FID caches)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.set_timeout(datetime.timedelta(seconds=seconds))
        if _cpu_group() is not None:
            torch_dist.set_timeout(datetime.timedelta(seconds=seconds), _cpu_group())


def run_on_every_rank(command: Callable[[], int], user_errors: tuple[type[Exception], ...]) -> int:
    """Run an entry point's `command` and return its exit code, closing the process group only on
    success. A user mistake (`user_errors`) is said in one line with exit code 2; any other error
    prints its traceback tagged with the rank. With several processes a failing rank then exits at
    once: a barrier or a destructor on the error path would wait for peers that sit in another
    collective until the group's timeout, and the launcher tears the healthy ranks down only once
    this one has exited. One process raises as usual. Running out of disk space, wherever it happens,
    is said in one line (gendist.disk) with exit code 2."""
    try:
        code = command()
    except user_errors as err:
        return _fail(2, f"gendist: error: {err}", err)
    except BaseException as err:
        if disk.is_out_of_space(err):  # any write of any command: said in plain words, not a traceback
            return _fail(2, f"gendist: error: {disk.out_of_space_message(err)}", err)
        if launched_world_size() == 1:
            raise
        return _fail(1, traceback.format_exc(), err)
    shutdown()
    return code


def _fail(code: int, text: str, err: BaseException) -> int:
    world = launched_world_size()
    if world > 1:
        tag = f"[rank {os.environ.get('RANK', '?')}/{world}] "
        text = "".join(tag + line for line in text.rstrip("\n").splitlines(keepends=True))
    print(text, file=sys.stderr, flush=True)
    if world == 1:
        return code
    ErrorHandler().record_exception(err)  # the launcher's failure summary names this rank and error
    sys.stdout.flush()
    os._exit(code)


def shutdown() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
        _cpu_group.cache_clear()

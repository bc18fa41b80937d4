"""Graceful stop on SIGUSR1 (SLURM's time-limit warning), SIGTERM (preemption, scancel, a
launcher shutting down) and SIGINT (Ctrl-C): the handler only records the request; the training
loop finishes its step, the ranks agree to stop (distributed.any_rank), and the run checkpoints and
returns. Relaunching with the same run folder resumes from that checkpoint."""

from __future__ import annotations

import multiprocessing
import os
import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# Ctrl-C in a terminal reaches a worker twice (from the terminal and from its launcher), so
# only a third SIGINT means "stop now, without a checkpoint".
FORCE_AFTER_SIGINTS = 3


class StopRequests:
    """Records stop signals while installed; `install` and `restore` run in the main thread."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self._previous: dict[int, object] = {}
        self._owner_pid = 0  # the process that installed the handlers

    def install(self) -> None:
        self._owner_pid = os.getpid()
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._record)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def describe(self) -> str:
        return ", ".join(dict.fromkeys(self.received)) or "another rank"

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner_pid:  # a child forked before it installed its own handlers
            return
        name = signal.Signals(signum).name
        self.received.append(name)
        if self.received.count("SIGINT") >= FORCE_AFTER_SIGINTS:
            raise KeyboardInterrupt


class LoaderWorkerSignals:
    """worker_init_fn of data-loader workers. SLURM and Ctrl-C signal every process of a job step or
    terminal, and a worker killed then would fail the step before its checkpoint (PyTorch's workers
    die on SIGTERM by default), so workers ignore stop signals while the trainer runs. Once the
    trainer has closed its loader (`release`, on every exit path), SIGTERM ends them again: the
    DataLoader's shutdown and multiprocessing's exit handler stop workers with SIGTERM and wait for
    them, and a worker still ignoring it would keep the process from ever exiting."""

    def __init__(self) -> None:
        self._released = multiprocessing.Event()

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def release(self) -> None:
        self._released.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGTERM and self._released.is_set():
            os._exit(0)

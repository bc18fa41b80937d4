"""A run folder has one owner at a time: the job whose rank 0 holds an exclusive flock on
`<run_dir>/run.lock` for the whole run. The file also says who holds it (host, process id, start
time, SLURM job id), for the refusal a second job gets.

The operating system releases the lock when the holder's process ends in any way (exit, crash,
SIGKILL, preemption), so no stale lock is ever left to clean up; the file itself stays, holding the
last owner's details. Forked children (loader workers) close their copy of the descriptor, so the
lock lives exactly as long as rank 0. (A launcher killed alone leaves its ranks running, in sessions
of their own under torchrun and accelerate: those still own the folder, rightly, until a scheduler or
the user ends them.) On network filesystems the lock is only as strong as the mount's locking:

- NFS (v3 with lockd, v4): Linux carries flock over NFS byte-range locks, so a job on another node
  is refused too. A mount with `nolock` or `local_lock=all` keeps locks on the node: two jobs on
  different nodes both get it.
- Lustre needs the `flock` mount option for cluster-wide locks (`localflock`: per node only).
  Without either, flock fails; gendist then warns that the folder is unprotected and goes on.
- A node that dies holding the lock keeps it until the server notices (an NFSv4 lease, ~90 s).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = "run.lock"
_HELD: set[int] = set()  # this process's lock descriptors, which forked children (loader workers) close


def _close_inherited_locks() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)
# errors that say the filesystem does not do flock, as opposed to "someone holds it"
NO_LOCKING = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class RunFolderBusy(RuntimeError):
    """Another job owns the run folder."""


def owner_record() -> dict[str, str | int]:
    """Who this process is, as a second job's refusal names it."""
    record: dict[str, str | int] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if os.environ.get("SLURM_JOB_ID"):
        record["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return record


def describe(record: dict) -> str:
    if not record:
        return "a job that is still starting (no owner recorded yet)"
    slurm = f", SLURM job {record['slurm_job_id']}" if "slurm_job_id" in record else ""
    return f"process {record.get('pid')} on {record.get('host')}{slurm}, started {record.get('started')}"


@contextlib.contextmanager
def owned(run_dir: Path) -> Iterator[str | None]:
    """Hold the run folder for the block, or raise RunFolderBusy naming its owner. Yields a warning
    when the filesystem cannot lock (the block then runs unprotected), else None."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncated before the lock: it names the owner
    try:
        unlockable = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderBusy(
                    f"{run_dir} is in use by another job: {describe(_read_record(path))} holds {path}. Two jobs "
                    "writing one run folder would mix their checkpoints and metrics; wait for that job to end "
                    "(or stop it), or give this run another train.run_dir"
                ) from None
            if err.errno not in NO_LOCKING:
                raise
            unlockable = os.strerror(err.errno)
        if unlockable is not None:
            yield (
                f"warning: the filesystem of {run_dir} cannot lock files ({unlockable}), so nothing stops a "
                "second job from writing into this run folder at the same time (on Lustre, mount with -o flock)"
            )
            return
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(owner_record()) + "\n").encode())
        os.fsync(fd)
        _HELD.add(fd)
        yield None
    finally:
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}

"""Disk space, said in plain words: the filesystem a path lives on, what is free there, and writes
that do not fit turned into one message naming the path, the filesystem and the sizes.

A full disk surfaces in many shapes: OSError ENOSPC (or EDQUOT, a quota) from open/write/close, and
from torch.save a RuntimeError of its zip writer ("unexpected pos ...", "basic_ios::clear") that
names no cause at all. Free space is statvfs's f_bavail (what this user may still write), so a
reserved-for-root margin counts as full; a quota (EDQUOT) is said when the write fails, since
statvfs does not see quotas.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# after a failed write, a filesystem with less than this free is taken to be what failed it
NEARLY_FULL_BYTES = 1 << 20


class OutOfSpace(RuntimeError):
    """A write that did not fit (or would not), named with the filesystem and the sizes."""


@dataclass(frozen=True)
class Filesystem:
    mount_point: str
    kind: str  # the type /proc/mounts gives (ext4, nfs4, lustre, tmpfs, ...)
    free: int  # bytes this user may still write

    def __str__(self) -> str:
        return f"the {self.kind} filesystem mounted at {self.mount_point} ({human(self.free)} free)"


def filesystem_of(path: str | Path) -> Filesystem:
    """The filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    path = path.resolve()  # a symlinked folder lives on its target's filesystem
    mount = path
    while not os.path.ismount(mount):
        mount = mount.parent
    return Filesystem(str(mount), _mount_types().get(str(mount), "unknown"), shutil.disk_usage(path).free)


def _mount_types() -> dict[str, str]:
    """Mount point -> filesystem type, the last mount of a point winning (as it hides the earlier)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return {}
    return {
        fields[1].replace("\\040", " "): fields[2] for fields in (line.split() for line in lines) if len(fields) > 2
    }


def folder_size(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_room(path: Path, needed: int, what: str, remedy: str) -> None:
    """OutOfSpace, before anything is written, when `needed` bytes do not fit beside `path`."""
    filesystem = filesystem_of(path)
    if filesystem.free < needed:
        raise OutOfSpace(
            f"not enough space for {what} in {path}: it needs about {human(needed)}, and {filesystem} "
            f"(short by {human(needed - filesystem.free)}); nothing was written. {remedy}"
        )


def is_out_of_space(err: BaseException) -> bool:
    return isinstance(err, OutOfSpace) or (isinstance(err, OSError) and err.errno in OUT_OF_SPACE_ERRNOS)


def looks_full(err: BaseException, path: Path) -> bool:
    """Whether a failed write into `path` was the disk filling: said so by the error, or (torch's zip
    writer says nothing useful) by the little space left where it was writing."""
    return is_out_of_space(err) or filesystem_of(path).free < NEARLY_FULL_BYTES


def out_of_space_message(err: BaseException, path: Path | None = None) -> str:
    """One plain line for a write that ran out of space."""
    if isinstance(err, OutOfSpace):
        return str(err)
    where = Path(err.filename) if isinstance(err, OSError) and err.filename else path
    cause = "a disk quota is exceeded" if getattr(err, "errno", None) == errno.EDQUOT else "the disk is full"
    if where is None:
        return f"a write failed because {cause} ({err}); free some space, then rerun the same command"
    return (
        f"writing {where} failed because {cause} ({err}), on {filesystem_of(where)}; free some space, "
        "then rerun the same command"
    )


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Around a write into `path`: running out of space there becomes an OutOfSpace naming it."""
    try:
        yield
    except OSError as err:
        if not is_out_of_space(err):
            raise
        raise OutOfSpace(out_of_space_message(err, path)) from err

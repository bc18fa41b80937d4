"""A run folder has one owner at a time (gendist/training/ownership.py), and a full disk is named,
cleaned up and survivable (gendist/disk.py, gendist/checkpoint.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, REPO, assert_same_run, free_port, launch

from gendist import disk
from gendist import train as train_command
from gendist.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from gendist.config import load_config
from gendist.training import checkpointing
from gendist.training.loop import train
from gendist.training.ownership import LOCK_FILE, RunFolderBusy, owned

CHECKPOINTED = ["train.checkpoint_every=2", "train.keep_checkpoints=10", "train.log_every=1"]


def start(cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A training job in the background, in a process group of its own (killed whole)."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests"), **env}
    with log.open("w") as sink:
        return subprocess.Popen(
            cmd, cwd=REPO, env=environ, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def one_process(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "gendist.train", *overrides]


def two_processes(overrides: list[str]) -> list[str]:
    config = str(REPO / "launch" / "cpu_2proc.yaml")
    launcher = [str(BIN / "accelerate"), "launch", "--config_file", config, "--main_process_port", str(free_port())]
    return [*launcher, "-m", "gendist.train", *overrides]


def wait_for_checkpoint(job: subprocess.Popen, run: Path, log: Path, timeout: float = 240) -> None:
    """Until the job holds the folder and has written a checkpoint."""
    deadline = time.monotonic() + timeout
    while not list_checkpoints(run) or not (run / LOCK_FILE).read_text(errors="replace").strip():
        assert job.poll() is None, f"the job ended early ({job.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def kill(job: subprocess.Popen) -> None:
    """SIGKILL the job's every process, as a scheduler ends a job (the launcher's ranks run in
    sessions of their own, so its process group alone is not the job)."""
    processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=60)
    job.wait(timeout=60)


def refused(proc: subprocess.CompletedProcess, run: Path, owner: dict) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    expected = f"{run} is in use by another job: process {owner['pid']} on {socket.gethostname()}"
    assert expected in proc.stderr and f"started {owner['started']}" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_second_job_on_a_run_folder_is_refused_and_a_killed_owner_leaves_no_stale_lock(tiny_overrides, tmp_path):
    """A 2-process job owns the folder: a 1-process job is refused at once, naming it (its SLURM job
    too); after the owner is SIGKILLed a new job resumes. Then a 1-process owner refuses a 2-process job."""
    run = tmp_path / "run"
    forever = [*tiny_overrides, *CHECKPOINTED, "train.steps=100000"]
    owner_log = tmp_path / "owner.log"
    owner = start(two_processes(forever), owner_log, SLURM_JOB_ID="4242")
    try:
        wait_for_checkpoint(owner, run, owner_log)
        record = json.loads((run / LOCK_FILE).read_text())
        assert record["slurm_job_id"] == "4242"
        started = time.monotonic()
        second = subprocess.run(one_process(forever), cwd=REPO, capture_output=True, text=True, timeout=120)
        refused(second, run, record)
        assert "SLURM job 4242" in second.stderr
        assert second.returncode == 2 and time.monotonic() - started < 60
        assert owner.poll() is None  # the owner goes on
    finally:
        kill(owner)

    step = max(int(row["step"]) for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()))
    latest = list_checkpoints(run)[-1]
    resumed = subprocess.run(
        one_process([*tiny_overrides, *CHECKPOINTED, f"train.steps={step + 3}"]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest}" in resumed.stdout

    owner_log = tmp_path / "owner2.log"
    owner = start(one_process(forever), owner_log)
    try:
        while json.loads((run / LOCK_FILE).read_text() or "{}").get("pid") != owner.pid:
            assert owner.poll() is None, owner_log.read_text()[-3000:]
            time.sleep(0.2)
        record = json.loads((run / LOCK_FILE).read_text())
        second = launch("accelerate", tmp_path, forever, ["-m", "gendist.train"], timeout=180)
        refused(second, run, record)
        assert "[rank 0/2] gendist: error:" in second.stderr and "[rank 1/2] gendist: error:" in second.stderr
    finally:
        kill(owner)


def test_the_lock_is_held_inside_and_released_after(tmp_path):
    with owned(tmp_path) as warning:
        assert warning is None
        probe = [
            sys.executable,
            "-c",
            "import pathlib, sys\nfrom gendist.training.ownership import owned\n"
            "with owned(pathlib.Path(sys.argv[1])): pass",
            str(tmp_path),
        ]
        proc = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and f"process {os.getpid()} on {socket.gethostname()}" in proc.stderr
    with owned(tmp_path):  # released: another holder may take it
        pass
    with pytest.raises(RunFolderBusy, match="is in use by another job"), owned(tmp_path), owned(tmp_path):
        pass  # two open file descriptions conflict even within one process


def test_start_up_removes_what_an_earlier_attempt_left_unfinished(tiny_overrides, tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    (root / ".step_0000002.partial").mkdir(parents=True)
    train(load_config(None, [*tiny_overrides, "train.steps=1"]))
    assert not (root / ".step_0000002.partial").exists()
    assert f"removed {root / '.step_0000002.partial'}, left unfinished by an earlier attempt" in capsys.readouterr().out


class ShrinkingDisk:
    """disk.filesystem_of with the real answer until `after` checkpoints exist, then `free` bytes."""

    def __init__(self, run: Path, after: int, free: int) -> None:
        self.run, self.after, self.free = run, after, free
        self.real = disk.filesystem_of

    def __call__(self, path):
        found = self.real(path)
        if len(list_checkpoints(self.run)) < self.after:
            return found
        return disk.Filesystem(found.mount_point, found.kind, self.free)


def straight_run(overrides: list[str], tmp_path: Path, steps: int):
    return train(load_config(None, [*overrides, f"train.steps={steps}", f"train.run_dir={tmp_path / 'straight'}"]))


def test_a_checkpoint_that_will_not_fit_stops_the_run_before_writing_and_resumes_once_space_is_freed(
    tiny_overrides, tmp_path, monkeypatch
):
    overrides = [*tiny_overrides, *CHECKPOINTED]
    run = tmp_path / "run"
    monkeypatch.setattr(disk, "filesystem_of", ShrinkingDisk(run, after=1, free=1000))
    with pytest.raises(disk.OutOfSpace) as stopped:
        train(load_config(None, [*overrides, "train.steps=6"]))
    message = str(stopped.value)
    first = run / "checkpoints" / "step_0000002"
    size = disk.folder_size(first)
    assert f"not enough space for checkpoint step_0000004 in {run / 'checkpoints'}" in message
    assert f"it needs about {disk.human(size)}" in message and "(1000 B free)" in message
    assert "filesystem mounted at" in message and "it resumes from step_0000002" in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]  # nothing partial
    load_checkpoint(first, rank=0)

    monkeypatch.undo()  # space freed: the same command resumes, exactly
    resumed = train(load_config(None, [*overrides, "train.steps=6"]))
    straight = straight_run(overrides, tmp_path, 6)
    for network in ("generator", "discriminator"):
        assert_same_run(straight[network].state_dict(), resumed[network].state_dict())


def test_a_failed_checkpoint_write_removes_its_partial_folder_and_says_why(tiny_overrides, tmp_path, monkeypatch):
    """torch's zip writer on a full disk says `unexpected pos`; gendist says the disk is full. Another
    failure is named as it is. Either way the partial folder goes and the earlier checkpoints stay."""
    overrides = [*tiny_overrides, *CHECKPOINTED]
    run = tmp_path / "run"
    real_save = checkpointing.save_checkpoint.__globals__["torch"].save

    def failing_save(obj, path, *args, **kwargs):
        if "step_0000004" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 29282816 vs 29282768")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr("gendist.checkpoint.torch.save", failing_save)
    monkeypatch.setattr(disk, "filesystem_of", ShrinkingDisk(run, after=2, free=0))  # full once it is written
    with pytest.raises(CheckpointError, match=r"writing checkpoint step_0000004 failed \(RuntimeError: \[enforce"):
        train(load_config(None, [*overrides, "train.steps=6"]))  # the disk had room: not a space problem
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]

    monkeypatch.setattr(disk, "filesystem_of", ShrinkingDisk(run, after=1, free=0))
    monkeypatch.setattr(disk, "check_room", lambda *args: None)  # the estimate said it fits; it did not
    with pytest.raises(disk.OutOfSpace) as stopped:
        train(load_config(None, [*overrides, "train.steps=6"]))
    message = str(stopped.value)
    assert "writing checkpoint step_0000004 failed because the disk is full" in message
    assert f"the unfinished {run / 'checkpoints' / '.step_0000004.partial'} was removed" in message
    assert "unexpected pos" in message and "it resumes from step_0000002" in message
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]

    monkeypatch.undo()
    resumed = train(load_config(None, [*overrides, "train.steps=6"]))
    straight = straight_run(overrides, tmp_path, 6)
    for network in ("generator", "discriminator"):
        assert_same_run(straight[network].state_dict(), resumed[network].state_dict())


def test_other_writes_that_find_the_disk_full_say_so_in_one_line(tiny_overrides, tmp_path, capsys):
    """/dev/full answers every write with ENOSPC: a metrics file pointed at it is a full disk."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")
    assert train_command.main([*tiny_overrides, "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert f"gendist: error: writing {run / 'metrics.jsonl'} failed because the disk is full" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_rank_whose_checkpoint_write_fails_stops_every_rank_and_leaves_no_partial_folder(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    proc = launch(
        "accelerate",
        tmp_path,
        [*tiny_overrides, *CHECKPOINTED, "train.steps=50"],
        ["tests/fault_worker.py", "disk", "1", "4"],
        timeout=180,
    )
    assert proc.returncode != 0
    assert "[rank 1/2] gendist: error: writing checkpoint step_0000004 failed because the disk is full" in proc.stderr
    assert "[rank 0/2] gendist: error: another rank could not write its part of step_0000004" in proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (the injected-failure tests run)")
def test_on_a_small_real_filesystem_the_run_stops_cleans_up_and_resumes(tiny_overrides, tmp_path, capsys, monkeypatch):
    """A real 8 MiB tmpfs: the pre-write check stops the run with the space message (exit 2), and a
    checkpoint whose estimate was wrong fails for real and is removed; after freeing space the
    same command resumes exactly."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        run = mount / "run"
        command = [*tiny_overrides, *CHECKPOINTED, "train.steps=6", f"train.run_dir={run}"]
        filler = mount / "filler"
        assert train_command.main([*command[:-2], "train.steps=2", command[-1]]) == 0
        size = disk.folder_size(list_checkpoints(run)[-1])
        filler.write_bytes(b"\0" * (disk.filesystem_of(mount).free - size // 2))
        capsys.readouterr()
        assert train_command.main(command) == 2
        err = capsys.readouterr().err
        assert f"gendist: error: not enough space for checkpoint step_0000004 in {run / 'checkpoints'}" in err
        assert f"the tmpfs filesystem mounted at {mount}" in err
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
        load_checkpoint(run / "checkpoints" / "step_0000002", rank=0)

        with monkeypatch.context() as wrong:  # an estimate that said it fits: the write fails for real
            wrong.setattr(disk, "check_room", lambda *args: None)
            assert train_command.main(command) == 2
        err = capsys.readouterr().err
        assert "gendist: error: writing checkpoint step_0000004 failed because the disk is full" in err
        assert f"the unfinished {run / 'checkpoints' / '.step_0000004.partial'} was removed" in err
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]

        filler.unlink()
        assert train_command.main(command) == 0
        straight = straight_run([*tiny_overrides, *CHECKPOINTED], tmp_path, 6)
        resumed, _ = load_checkpoint(run / "checkpoints" / "step_0000006", rank=0)
        for network in ("generator", "discriminator"):
            assert_same_run(straight[network].state_dict(), resumed[network])
    finally:
        subprocess.run(["umount", "-l", str(mount)])

"""Graceful stops for real: SIGUSR1 / SIGTERM / SIGINT sent to running training processes (one
process, and two under torchrun), a worker SIGKILLed under torchrun --max-restarts; each run must
end with the same weights as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import BIN, REPO, TINY, assert_same_run, assert_same_weights, free_port

from gendist.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from gendist.config import ConfigError, load_config
from gendist.training.loop import train

STEPS = 60
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}


def overrides(shards: Path, run_dir: Path) -> list[str]:
    return [
        *TINY,
        f"data.shards={shards}",
        "data.num_workers=2",
        "train.checkpoint_every=5",
        f"train.steps={STEPS}",
        f"train.run_dir={run_dir}",
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # its own session, so that a signal to the process group reaches it and its loader workers
    # (what SLURM and Ctrl-C do) and nothing of pytest's
    return subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / f"step_{step:07d}" / "state.pt").is_file():
        assert proc.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def finish(proc: subprocess.Popen, log: Path) -> str:
    proc.wait(timeout=240)
    return log.read_text()


def weights(run_dir: Path) -> dict:
    shared, _ = load_checkpoint(latest_checkpoint(run_dir), rank=0)
    assert shared["train_state"]["step"] == STEPS
    return {**shared["generator"], **{f"d.{k}": v for k, v in shared["discriminator"].items()}}


def stop_step(run_dir: Path) -> int:
    """The interrupted run's last checkpoint: complete, every rank's RNG state in it, mid-run."""
    checkpoint = latest_checkpoint(run_dir)
    shared, _ = load_checkpoint(checkpoint, rank=0)
    assert 5 <= shared["train_state"]["step"] < STEPS, "the signal should have stopped the run mid-way"
    assert {p.name for p in checkpoint.iterdir()} >= {"state.pt", *(f"rank{r}.pt" for r in range(shared["world_size"]))}
    assert not list((run_dir / "checkpoints").glob(".*partial"))
    return shared["train_state"]["step"]


def train_once(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def single(run_dir: Path, shards: Path) -> list[str]:
    return [sys.executable, "-m", "gendist.train", *overrides(shards, run_dir)]


def torchrun(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        *extra,
        "-m",
        "gendist.train",
        *overrides(shards, run_dir),
    ]


# The references run in subprocesses too: like every launched run here they use one thread, and
# results are bit-identical only at the same thread count.
@pytest.fixture(scope="module")
def one_rank_weights(synthetic_shards, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("straight1") / "run"
    train_once(single(run_dir, synthetic_shards))
    return weights(run_dir)


@pytest.fixture(scope="module")
def two_rank_weights(synthetic_shards, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("straight2") / "run"
    train_once(torchrun(run_dir, synthetic_shards))
    return weights(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, to_group",
    [(signal.SIGUSR1, False), (signal.SIGTERM, True), (signal.SIGINT, True)],
    ids=["SIGUSR1", "SIGTERM-to-group", "SIGINT-to-group"],
)
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_resume_matches(
    signum, to_group, one_rank_weights, synthetic_shards, tmp_path
):
    """SIGUSR1 to the trainer (SLURM's warning); SIGTERM and Ctrl-C's SIGINT to its whole process
    group, loader workers included, as SLURM and a terminal send them."""
    run_dir, log = tmp_path / "stopped", tmp_path / "stopped.log"
    proc = start(single(run_dir, synthetic_shards), log)
    wait_for_checkpoint(run_dir, 5, proc, log)
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
    step = stop_step(run_dir)
    assert f"stopping at step {step} on {signum.name}" in out and "Traceback" not in out
    resumed = train_once(single(run_dir, synthetic_shards))
    assert f"resumed from {run_dir}/checkpoints/step_{step:07d}" in resumed.stdout
    assert_same_weights(one_rank_weights, weights(run_dir))


def worker_of_rank(launcher_pid: int, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher_pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under {launcher_pid}")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher-SIGTERM", "rank1-SIGUSR1"])
def test_two_ranks_stop_at_the_same_step_and_resume_matches(target, two_rank_weights, synthetic_shards, tmp_path):
    """SIGTERM to torchrun, which passes it to both workers; or SIGUSR1 to rank 1 alone, which
    the ranks then agree on."""
    run_dir, log = tmp_path / "run", tmp_path / "stopped.log"
    proc = start(torchrun(run_dir, synthetic_shards), log)
    wait_for_checkpoint(run_dir, 5, proc, log)
    if target == "launcher-SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        worker_of_rank(proc.pid, 1).send_signal(signal.SIGUSR1)
    out = finish(proc, log)
    step = stop_step(run_dir)
    received = "SIGTERM" if target == "launcher-SIGTERM" else "another rank"  # rank 0 prints
    assert f"stopping at step {step} on {received}" in out, out[-3000:]
    # torchrun itself exits 1 after passing on a SIGTERM; with SIGUSR1 to a worker all is clean
    assert proc.returncode == (1 if target == "launcher-SIGTERM" else 0), out[-3000:]
    resumed = train_once(torchrun(run_dir, synthetic_shards))
    assert f"resumed from {run_dir}/checkpoints/step_{step:07d}" in resumed.stdout
    assert_same_run(two_rank_weights, weights(run_dir))


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resumes(two_rank_weights, synthetic_shards, tmp_path):
    """launch/node.sh under torchrun --max-restarts: rank 1 is SIGKILLed, both ranks restart from
    the latest checkpoint and the run ends as if nothing had happened."""
    run_dir, log = tmp_path / "run", tmp_path / "restarted.log"
    env = {
        **ENV,
        "PATH": f"{BIN}:{ENV['PATH']}",
        "LAUNCHER": "torchrun",
        "PROCS_PER_NODE": "2",
        "MAIN_PORT": str(free_port()),
        "MAX_RESTARTS": "1",
    }
    proc = subprocess.Popen(
        [str(REPO / "launch" / "node.sh"), "-m", "gendist.train", *overrides(synthetic_shards, run_dir)],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for_checkpoint(run_dir, 10, proc, log)
    worker_of_rank(proc.pid, 1).kill()
    out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
    resumed_at = [int(line.split("step_")[1][:7]) for line in out.splitlines() if "resumed from" in line]
    assert len(resumed_at) == 1 and 10 <= resumed_at[0] < STEPS, out[-3000:]
    assert_same_weights(two_rank_weights, weights(run_dir))  # resumed from a cadence checkpoint: exact
    assert [p.name for p in list_checkpoints(run_dir)][-1] == f"step_{STEPS:07d}"
    assert torch.load(latest_checkpoint(run_dir) / "state.pt", weights_only=True)["world_size"] == 2


def test_a_run_that_fails_before_its_loop_leaves_the_signal_handlers_as_they_were(tiny_overrides, tmp_path):
    """Handlers are installed for the training loop only: a run refused at set-up (here, resuming a
    checkpoint of another backend) must not leave later children of this process (a
    multiprocessing pool's workers, say) unable to die on SIGTERM."""
    run_dir = tmp_path / "run"
    train(load_config(None, [*tiny_overrides, "train.steps=2"]))
    state_file = latest_checkpoint(run_dir) / "state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "backend": "deepspeed-zero2"}, state_file)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with pytest.raises(ConfigError, match="deepspeed-zero2 backend"):
        train(load_config(None, [*tiny_overrides, "train.steps=4"]))
    assert {signum: signal.getsignal(signum) for signum in before} == before

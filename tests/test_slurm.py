"""The cluster scripts: they parse and pass shellcheck; launch/node.sh joins two "nodes" from
SLURM's variables; and, on a real single-node SLURM (slurmctld + slurmd + munge started here),
train.sbatch trains and survives a requeue, eval.sbatch reports and sweep.sbatch sweeps."""

import concurrent.futures
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import BIN, REPO, TINY, assert_same_run, free_port
from test_sweep import write_sweep

from gendist.checkpoint import latest_checkpoint

SCRIPTS = sorted([*REPO.glob("slurm/*.sbatch"), *REPO.glob("slurm/*.sh"), *REPO.glob("launch/*.sh")])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
STEPS = 40


def test_scripts_parse_and_pass_shellcheck():
    assert {p.name for p in SCRIPTS} >= {
        "train.sbatch",
        "sweep.sbatch",
        "eval.sbatch",
        "common.sh",
        "node.sh",
        "local_cluster.sh",
    }
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    # -x: also check what the batch scripts source (slurm/common.sh), by its path from the root
    checked = subprocess.run(
        [str(BIN / "shellcheck"), "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def final_state(run_dir: Path) -> dict:
    return torch.load(latest_checkpoint(run_dir) / "state.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("launcher, backend", [("torchrun", "accelerate"), ("accelerate", "deepspeed-zero2")])
def test_node_script_joins_two_nodes_from_slurm_variables(launcher, backend, synthetic_shards, tmp_path):
    """What each node's srun task runs in train.sbatch, with the variables SLURM gives it: two
    'nodes' (1 CPU process each) on this machine form one world of 2, with DDP under torchrun or
    ZeRO-2 under accelerate (accelerate with DDP: the real-SLURM tests below)."""
    run_dir, port = tmp_path / "run", free_port()
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "MAIN_ADDR": "127.0.0.1",
        "MAIN_PORT": str(port),
        "PROCS_PER_NODE": "1",
        "LAUNCHER": launcher,
        "MAX_RESTARTS": "0",
    }
    if backend == "deepspeed-zero2":
        slurm["ZERO_STAGE"] = "2"
    cmd = [
        str(REPO / "launch" / "node.sh"),
        "-m",
        "gendist.train",
        *TINY,
        f"data.shards={synthetic_shards}",
        "train.steps=4",
        f"train.run_dir={run_dir}",
    ]
    nodes = []
    for node_id in range(2):
        log = tmp_path / f"node{node_id}.log"
        nodes.append(
            (
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env={**ENV, **slurm, "SLURM_NODEID": str(node_id)},
                    stdout=log.open("w"),
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
        deadline = time.time() + 60
        while node_id == 0 and not listening(port) and time.time() < deadline:  # node 0 hosts the rendezvous
            time.sleep(0.1)
    for proc, log in nodes:
        proc.wait(timeout=300)
        assert proc.returncode == 0, log.read_text()[-3000:]
    assert (
        f"node 0/2 on {socket.gethostname()}: 1 processes (0 GPUs), rendezvous 127.0.0.1:{port}"
        in nodes[0][1].read_text()
    )
    assert "[rank 0/2] done: step 4" in nodes[0][1].read_text()
    assert final_state(run_dir)["world_size"] == 2 and (latest_checkpoint(run_dir) / "rank1.pt").is_file()
    assert final_state(run_dir)["backend"] == backend


# -- a real SLURM ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict:
    """A single-node SLURM on this machine for these tests; skipped, with the reason, where none can run."""
    if shutil.which("slurmctld", path=f"{os.environ['PATH']}:/usr/sbin") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(
                "SLURM is not installed and cannot be installed here (needs root and apt-get for slurm-wlm and munge)"
            )
        installed = subprocess.run(
            [str(REPO / "slurm" / "local_cluster.sh"), "install"], capture_output=True, text=True
        )
        if installed.returncode != 0:
            pytest.skip(f"installing slurm-wlm and munge failed: {installed.stderr[-500:]}")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs, and these tests do not run as root")
    state = tmp_path_factory.mktemp("slurm")
    env = {**ENV, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    started = subprocess.run(
        [str(REPO / "slurm" / "local_cluster.sh"), "start", str(state)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if started.returncode != 0:
        logs = "".join(p.read_text()[-1000:] for p in (state / "log").glob("*.log"))
        pytest.skip(f"a local slurmctld + slurmd could not start: {started.stdout}{started.stderr}{logs}")
    yield {**ENV, "SLURM_CONF": str(state / "slurm.conf")}
    subprocess.run(
        ["scancel", "--full", "--user", os.environ.get("USER", "root")],
        env={**ENV, "SLURM_CONF": str(state / "slurm.conf")},
    )
    subprocess.run([str(REPO / "slurm" / "local_cluster.sh"), "stop", str(state)])


def sbatch(env: dict, script: str, *args: str, wait: bool = False, **options: str) -> tuple[int, int]:
    """Submit a script with CPU-sized resources; returns (job id, sbatch's exit code)."""
    resources = {"nodes": "1", "cpus_per_task": "2", "gpus_per_node": "0", "mem": "2G", "time": "15", **options}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in resources.items()]
    proc = subprocess.run(
        ["sbatch", "--parsable", *(["--wait"] if wait else []), *flags, f"slurm/{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return int(proc.stdout.split(";")[0].split()[0]), proc.returncode


def job_field(env: dict, job: int, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", str(job)], env=env, capture_output=True, text=True).stdout
    return next(word.split("=", 1)[1] for word in shown.split() if word.startswith(f"{field}="))


def train_args(shards: Path) -> list[str]:
    return [*TINY, f"data.shards={shards}", "data.num_workers=2", "train.checkpoint_every=5", f"train.steps={STEPS}"]


@pytest.fixture(scope="module")
def trained(slurm, synthetic_shards, tmp_path_factory) -> Path:
    """`sbatch --wait slurm/train.sbatch` on 2 CPU processes, uninterrupted."""
    out = tmp_path_factory.mktemp("slurm_train")
    env = {**slurm, "CONFIG": "configs/dcgan_default.yaml", "RUN_DIR": str(out / "run"), "PROCS_PER_NODE": "2"}
    job, code = sbatch(env, "train.sbatch", *train_args(synthetic_shards), wait=True, output=str(out / "job.out"))
    log = (out / "job.out").read_text()
    assert code == 0 and job_field(slurm, job, "JobState") == "COMPLETED", log[-3000:]
    assert f"job {job} attempt 1: 1 nodes" in log and f"[rank 0/2] done: step {STEPS}" in log
    return out / "run"


@pytest.mark.slow
def test_train_sbatch_trains_on_a_real_slurm(trained):
    state = final_state(trained)
    assert state["train_state"]["step"] == STEPS and state["world_size"] == 2
    assert (trained / "metrics.jsonl").is_file() and (trained / "samples").is_dir()


@pytest.mark.slow
def test_train_sbatch_checkpoints_requeues_and_resumes_on_the_time_limit_signal(
    slurm, trained, synthetic_shards, tmp_path
):
    """SIGUSR1 to the batch shell, as --signal=B:USR1@300 sends it: the processes checkpoint, the job
    requeues itself, the second attempt resumes and ends with the uninterrupted run's weights."""
    run_dir, log_path = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm, "CONFIG": "configs/dcgan_default.yaml", "RUN_DIR": str(run_dir), "PROCS_PER_NODE": "2"}
    job, code = sbatch(env, "train.sbatch", *train_args(synthetic_shards), output=str(log_path))
    assert code == 0
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_0000005" / "state.pt").is_file():
        assert time.time() < deadline and job_field(slurm, job, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=slurm, check=True)
    while job_field(slurm, job, "JobState") != "COMPLETED":
        assert time.time() < deadline and job_field(slurm, job, "JobState") not in ("FAILED", "CANCELLED"), (
            log_path.read_text()[-3000:]
        )
        time.sleep(1)
    log = log_path.read_text()
    assert job_field(slurm, job, "Restarts") == "1"
    assert "time limit near (SIGUSR1)" in log and "requeued" in log and f"job {job} attempt 2" in log, log[-3000:]
    stopped_at = int(log.split("stopping at step ")[1].split()[0])
    assert 5 <= stopped_at < STEPS and f"resumed from {run_dir}/checkpoints/step_{stopped_at:07d}" in log
    resumed, reference = final_state(run_dir), final_state(trained)
    assert resumed["train_state"]["step"] == STEPS
    for network in ("generator", "discriminator"):
        assert_same_run(reference[network], resumed[network])


@pytest.mark.slow
def test_eval_sbatch_scores_runs_and_writes_the_report(slurm, trained, tmp_path):
    eval_args = (
        "--num-samples 24 eval.inception_weights=random eval.num_real=24 eval.batch_size=8 "
        f"eval.kid_subsets=5 eval.kid_subset_size=12 eval.stats_dir={tmp_path / 'stats'}"
    )
    env = {**slurm, "EVAL_ARGS": eval_args, "REPORT": str(tmp_path / "report"), "PROCS_PER_NODE": "2"}
    job, code = sbatch(env, "eval.sbatch", str(trained), wait=True, output=str(tmp_path / "job.out"))
    log = (tmp_path / "job.out").read_text()
    assert code == 0, log[-3000:]
    row = json.loads((trained / "eval.jsonl").read_text().splitlines()[-1])
    assert row["step"] == STEPS and row["fid"] > 0 and row["protocol"]["generated"] == 24
    assert "| " in (tmp_path / "report" / "report.md").read_text() and (tmp_path / "report" / "losses.png").is_file()


def assert_dashboard_answers_the_token_only(port: int, token: str) -> None:
    nodes_api = f"http://127.0.0.1:{port}/api/v0/nodes"
    request = urllib.request.Request(nodes_api, headers={"Authorization": f"Bearer {token}"})
    for _ in range(60):  # the dashboard may come up a little after the node
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert json.loads(answer.read())["result"]
            break
        except urllib.error.HTTPError:
            raise
        except urllib.error.URLError:
            time.sleep(1)
    else:
        raise AssertionError(f"the dashboard never answered on 127.0.0.1:{port}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(nodes_api, timeout=30)
    assert refused.value.code == 401


CLIENT = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print("task ran:", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


@pytest.mark.slow
def test_sweep_sbatch_runs_a_sweep_on_an_authenticated_ray_cluster_in_the_job(slurm, synthetic_shards, tmp_path):
    """The job's Ray asks for the job's own token (a 0600 file): `gendist sweep --address` without it,
    or with another token, is refused in one line, a client with it runs a task; the dashboard
    answers an authorised request on the head's 127.0.0.1; the job log names the tunnel and where
    the token is; the sweep runs."""
    path = write_sweep(
        tmp_path, synthetic_shards, {"optim.lr_g": {"grid": [1e-4, 4e-4]}}, num_samples=1, scheduler="fifo"
    )
    env = {**slurm, "SWEEP": str(path)}
    address_file = Path("/tmp/ray/ray_current_cluster")  # what `ray start --head` leaves until `ray stop`
    had_cluster = address_file.exists()
    log_file = tmp_path / "job.out"
    job, code = sbatch(
        env, "sweep.sbatch", "sweep.dashboard=true", "overrides=[train.steps=400,eval.every=200]", output=str(log_file)
    )
    assert code == 0
    deadline = time.time() + 300
    while "Ray dashboard: http://127.0.0.1:" not in (log_file.read_text() if log_file.exists() else ""):
        assert time.time() < deadline and job_field(env, job, "JobState") in ("PENDING", "RUNNING"), (
            log_file.read_text()[-3000:] if log_file.exists() else "no job log"
        )
        time.sleep(1)
    log = log_file.read_text()
    address = re.search(r"Ray head on \S+ \((\S+)\)", log).group(1)
    port = re.search(r"Ray dashboard: http://127\.0\.0\.1:(\d+) on (\S+)", log).group(1)
    head = socket.gethostname().split(".")[0]
    assert f"ssh -N -L {port}:127.0.0.1:{port} {head}" in log
    token_file = Path(re.search(r"token file (\S+) \(mode 0600", log).group(1))
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.read_text() not in log

    no_token = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}
    sweep = [str(BIN / "gendist"), "sweep", "--config", str(path), "--address", address]
    clients = {  # run at once, while the job's cluster is up: each Ray client takes seconds to give up
        "no token": (sweep, no_token),
        "another token": (sweep, {**no_token, "RAY_AUTH_TOKEN": "b" * 64}),
        "the token": (
            [str(BIN / "python"), "-c", CLIENT, address],
            {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)},
        ),
    }
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        running = {
            name: pool.submit(subprocess.run, cmd, cwd=REPO, env=variables, capture_output=True, text=True, timeout=180)
            for name, (cmd, variables) in clients.items()
        }
        assert_dashboard_answers_the_token_only(int(port), token_file.read_text())
        done = {name: future.result() for name, future in running.items()}
    for name, expected in (
        ("no token", "asks for an authentication token and none was found"),
        ("another token", "refused the authentication token from $RAY_AUTH_TOKEN"),
    ):
        assert done[name].returncode == 2, done[name].stderr[-2000:]
        assert f"gendist: error: the Ray cluster at {address} {expected}" in done[name].stderr, done[name].stderr
    assert "task ran: 42" in done["the token"].stdout, done["the token"].stderr[-2000:]

    while job_field(env, job, "JobState") in ("PENDING", "RUNNING", "COMPLETING"):
        assert time.time() < deadline + 600, log_file.read_text()[-3000:]
        time.sleep(2)
    log = log_file.read_text()
    assert job_field(env, job, "JobState") == "COMPLETED", log[-4000:]
    assert "Ray cluster up: 1 nodes" in log and "2 trials, 0 failed" in log, log[-4000:]
    assert (tmp_path / "results" / "s" / "best_config.yaml").is_file()
    assert had_cluster or not address_file.exists(), "the job's Ray cluster was not stopped"
    assert not token_file.exists(), "the job's token outlived its cluster"

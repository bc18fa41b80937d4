"""Ray Tune sweeps for real, on a local Ray: a 4-trial sweep, interruption and resume, a failing
trial, and a data-parallel trial of 2 ranks. Tiny models, random-init Inception, 4 steps each."""

import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import REPO

from gendist import ray_cluster
from gendist.config import ConfigError, load_config
from gendist.sweep import load_sweep


def write_sweep(tmp_path: Path, shards: Path, space: dict, **settings) -> Path:
    base = {
        "data": {"shards": str(shards), "batch_size": 8, "num_workers": 1, "shuffle_pool": 64},
        "model": {"name": "dcgan", "image_size": 32, "ngf": 8, "ndf": 8, "d_norm": "layer"},
        "train": {"steps": 4, "log_every": 2, "sample_every": 1000, "checkpoint_every": 1000, "num_samples": 16},
        "eval": {
            "every": 2,
            "inception_weights": "random",
            "num_samples": 16,
            "num_real": 16,
            "batch_size": 8,
            "kid_subsets": 2,
            "kid_subset_size": 8,
            "stats_dir": str(tmp_path / "stats"),
        },
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {
        "base": "base.yaml",
        "space": space,
        "sweep": {"name": "s", "storage_path": str(tmp_path / "results"), "dashboard": False, **settings},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def gendist_sweep(path: Path, *extra: str) -> subprocess.Popen:
    """`gendist sweep` on a local Ray, with its token in the test's folder rather than ~/.ray."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "RAY_AUTH_TOKEN_PATH": str(path.parent / "ray_token")}
    return subprocess.Popen(
        [sys.executable, "-m", "gendist.sweep", "--config", str(path), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def trials(tmp_path: Path) -> list[dict]:
    with (tmp_path / "results" / "s" / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


def trial_dirs(tmp_path: Path) -> list[Path]:
    experiment = tmp_path / "results" / "s"
    return sorted(p for p in experiment.glob("run_trial*") if p.is_dir())


def test_sweep_file_errors_name_the_problem(tmp_path, synthetic_shards):
    path = write_sweep(tmp_path, synthetic_shards, {"optim.lr_gg": {"loguniform": [1e-4, 1e-3]}})
    with pytest.raises(ConfigError, match="did you mean 'optim.lr_g'"):
        load_sweep(path)
    path = write_sweep(tmp_path, synthetic_shards, {"optim.lr_g": {"lognormal": [1e-4, 1e-3]}})
    with pytest.raises(ConfigError, match="give exactly one of loguniform, uniform, randint, choice, grid"):
        load_sweep(path)
    path = write_sweep(tmp_path, synthetic_shards, {"optim.lr_g": {"choice": [1e-4]}})
    with pytest.raises(ConfigError, match="trials are scored by FID"):
        load_sweep(path, ["overrides=[eval.every=0]"])
    with pytest.raises(ConfigError, match="pix2pix is scored by its inpainting metrics"):
        load_sweep(path, ["overrides=[model.name=pix2pix,eval.every=2]"])
    with pytest.raises(ConfigError, match="valid keys in the top level: base, overrides, space, sweep"):
        load_sweep(path, ["sweeps.num_samples=3"])


@pytest.mark.slow
def test_four_trial_sweep_reports_and_writes_the_best_config(tmp_path, synthetic_shards):
    path = write_sweep(
        tmp_path,
        synthetic_shards,
        {"optim.lr_g": {"loguniform": [1e-4, 1e-3]}, "optim.betas": {"choice": [[0.5, 0.999], [0.0, 0.9]]}},
        num_samples=4,
        scheduler="asha",
        grace_period=2,
    )
    out = finish(gendist_sweep(path))
    assert "4 trials, 0 failed" in out
    rows = trials(tmp_path)
    assert len(rows) == 4 and all(float(row["fid"]) > 0 and row["step"] == "4" for row in rows)
    best = min(rows, key=lambda row: float(row["fid"]))
    best_yaml = tmp_path / "results" / "s" / "best_config.yaml"
    cfg = load_config(best_yaml)  # ready to run: a plain experiment config
    assert cfg.optim.lr_g == pytest.approx(float(best["optim.lr_g"])) and list(cfg.optim.betas) == json.loads(
        best["optim.betas"]
    )
    assert best_yaml.read_text().startswith(f"# Best of sweep s: fid {float(best['fid']):.4f}")
    for trial in trial_dirs(tmp_path):
        assert list(trial.glob("events.out.tfevents.*")), "TensorBoard logs"
        reported = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert [r["step"] for r in reported] == [2, 4] and reported[-1]["fid_samples"] == 16
        assert (trial / "run" / "checkpoints" / "step_0000004" / "state.pt").is_file()
    assert_tensorboard_shows_every_trial(tmp_path / "results" / "s", rows)


def assert_tensorboard_shows_every_trial(experiment: Path, rows: list[dict]) -> None:
    """What `tensorboard --logdir EXPERIMENT` shows, read as TensorBoard's server reads it (its plugin
    event multiplexer): per trial, Tune's results and the trial's training curves, grid and hparams
    with its sampled values."""
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    multiplexer = EventMultiplexer(tensor_size_guidance={"scalars": 0, "images": 0})
    multiplexer.AddRunsFromDirectory(str(experiment))
    multiplexer.Reload()
    scalars, images = multiplexer.PluginRunToTagToContent("scalars"), multiplexer.PluginRunToTagToContent("images")
    hparams = multiplexer.PluginRunToTagToContent("hparams")
    for row in rows:
        trial, training = row["trial"], f"{row['trial']}/run/tensorboard"
        assert {"loss_d", "loss_g", "eval/fid"} <= set(scalars[training]), (trial, sorted(multiplexer.Runs()))
        assert "samples/grid" in images[training]
        assert multiplexer.Tensors(training, "samples/grid")[-1].step == 4
        start = plugin_data_pb2.HParamsPluginData.FromString(hparams[training]["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["optim.lr_g"].number_value == pytest.approx(float(row["optim.lr_g"]))
        assert "ray/tune/fid" in scalars[trial]  # Tune's own results of the trial


def dashboard_url(proc: subprocess.Popen) -> tuple[str, list[str]]:
    """The dashboard address a sweep prints at start-up, and the lines read up to it."""
    lines = []
    while not any(line.startswith("Ray dashboard:") for line in lines):
        line = proc.stdout.readline()
        assert line, "".join(lines)[-3000:]
        lines.append(line)
    return re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+) on ", lines[-1]).group(1), lines


def assert_dashboard_lists_trials_to_the_token_only(url: str, token_file: Path, proc: subprocess.Popen) -> None:
    """The dashboard's API lists Tune's trial actors to a request with the token, and refuses one without."""
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    actors_api = f"{url}/api/v0/actors?limit=100"
    request = urllib.request.Request(actors_api, headers={"Authorization": f"Bearer {token}"})
    deadline, trial_actors = time.time() + 120, []
    while not trial_actors:
        assert time.time() < deadline and proc.poll() is None, "no trial actor was listed"
        with urllib.request.urlopen(request, timeout=30) as answer:
            actors = json.loads(answer.read())["data"]["result"]["result"]
        trial_actors = [actor for actor in actors if actor["class_name"] == "ImplicitFunc"]  # Tune's trial actor
        time.sleep(0.5)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(actors_api, timeout=30)
    assert refused.value.code == 401


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, synthetic_shards):
    path = write_sweep(
        tmp_path,
        synthetic_shards,
        {"optim.lr_g": {"grid": [1e-4, 2e-4, 4e-4]}},
        num_samples=1,
        scheduler="fifo",
        max_concurrent_trials=1,
    )
    proc = gendist_sweep(path)
    deadline = time.time() + 300
    started: list[Path] = []
    # one trial at a time: once a second has started, Tune has recorded the first as finished
    while len(started) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        started = [t for t in trial_dirs(tmp_path) if (t / "launches.log").is_file()]
    assert len(started) == 2 and proc.poll() is None, "the sweep should still be running"
    started.sort(key=lambda t: json.loads((t / "launches.log").read_text().splitlines()[0])["time"])
    finished = started[0]
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does: Tune saves the experiment state and stops
    proc.communicate(timeout=120)
    out = finish(gendist_sweep(path, "--resume"))
    assert "3 trials, 0 failed" in out
    rows = trials(tmp_path)
    assert sorted(float(row["optim.lr_g"]) for row in rows) == [1e-4, 2e-4, 4e-4]
    assert all(row["step"] == "4" for row in rows)
    launches = (finished / "launches.log").read_text().splitlines()
    assert len(launches) == 1, f"{finished.name} finished before the interruption but ran again"
    assert len(trial_dirs(tmp_path)) == 3


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_sweep_completes(tmp_path, synthetic_shards):
    # WGAN-GP refuses batch norm in its critic: that trial raises on every attempt
    path = write_sweep(
        tmp_path,
        synthetic_shards,
        {"model.d_norm": {"grid": ["layer", "batch"]}},
        num_samples=1,
        scheduler="fifo",
        max_failures=1,
    )
    out = finish(gendist_sweep(path, "overrides=[model.name=wgan_gp]"))
    assert "2 trials, 1 failed" in out
    rows = {row["model.d_norm"]: row for row in trials(tmp_path)}
    assert float(rows["layer"]["fid"]) > 0 and not rows["layer"]["error"]
    assert "batch norm" in rows["batch"]["error"] or "batch norm" in out
    assert rows["batch"]["fid"] == ""


@pytest.mark.slow
def test_a_trial_with_two_workers_trains_data_parallel(tmp_path, synthetic_shards):
    path = write_sweep(
        tmp_path,
        synthetic_shards,
        {"optim.lr_g": {"choice": [2e-4]}},
        num_samples=1,
        workers_per_trial=2,
        cpus_per_worker=1,
    )
    finish(gendist_sweep(path))
    (trial,) = trial_dirs(tmp_path)
    checkpoint = trial / "run" / "checkpoints" / "step_0000004"
    assert torch.load(checkpoint / "state.pt", weights_only=True)["world_size"] == 2
    assert (checkpoint / "rank0.pt").is_file() and (checkpoint / "rank1.pt").is_file()
    assert "[rank 0/2]" in (trial / "train.log").read_text()
    assert float(trials(tmp_path)[0]["fid"]) > 0


def training_process(tmp_path: Path) -> tuple[psutil.Process, Path] | None:
    """The trial's training process and its run folder: the trial works in Ray's session folder
    (synced to storage_path later), which only its command line names."""
    for candidate in psutil.process_iter(["cmdline"]):
        cmdline = candidate.info["cmdline"] or []
        try:
            if (
                "gendist.train" in cmdline
                and str(tmp_path) in " ".join(cmdline)
                and "gendist.train" not in candidate.parent().cmdline()
            ):  # not its data-loader worker
                return candidate, Path(next(a.split("=", 1)[1] for a in cmdline if a.startswith("train.run_dir=")))
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_a_trainer_stopped_by_a_signal_is_retried_from_its_last_report(tmp_path, synthetic_shards):
    """SLURM's SIGTERM can reach a trial's training process itself: it checkpoints and exits 0
    mid-run. The trial must not count as finished; Tune retries it from its last reported checkpoint.
    While the trial runs, the sweep's dashboard (on 127.0.0.1) lists it to a request with the token
    only, and the sweep says how to reach it and where the token is."""
    path = write_sweep(
        tmp_path,
        synthetic_shards,
        {"optim.lr_g": {"choice": [2e-4]}},
        num_samples=1,
        scheduler="fifo",
        max_failures=1,
        cpus_per_worker=2,
    )  # both cores: 2 threads
    proc = gendist_sweep(path, "sweep.dashboard=true", "overrides=[train.steps=400,eval.every=200]")
    url, lines = dashboard_url(proc)
    assert_dashboard_lists_trials_to_the_token_only(url, tmp_path / "ray_token", proc)
    deadline = time.time() + 300
    found = None
    while found is None or not (found[1] / "checkpoints" / "step_0000200" / "state.pt").is_file():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint at the first evaluation"
        time.sleep(0.1)
        found = found or training_process(tmp_path)
    trainer = found[0]
    trainer.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.stdout.read()  # not communicate(): it would skip what readline buffered
    assert proc.wait(timeout=600) == 0, out[-4000:]
    assert "1 trials, 0 failed" in out and trials(tmp_path)[0]["step"] == "400"
    port = url.rsplit(":", 1)[1]
    assert f"ssh -N -L {port}:127.0.0.1:{port} " in out  # how to reach it, and where the token is, never the token
    assert f"RAY_AUTH_TOKEN_PATH={tmp_path / 'ray_token'} ray get-auth-token" in out
    assert (tmp_path / "ray_token").read_text() not in out
    (trial,) = trial_dirs(tmp_path)
    launches = [json.loads(line)["from_step"] for line in (trial / "launches.log").read_text().splitlines()]
    assert launches == [0, 200]
    assert "stopping at step" in (trial / "train.log").read_text()


def test_a_cluster_gendist_starts_has_a_private_token_and_token_mode_on(tmp_path):
    token_file = tmp_path / "ray" / "auth_token"
    environ = {"RAY_AUTH_TOKEN_PATH": str(token_file), "RAY_AUTH_MODE": "disabled"}
    notes = ray_cluster.private_token(environ)
    assert environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_MODE=disabled is not used" in notes[0]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and len(token_file.read_text()) == 64
    token = token_file.read_text()
    token_file.chmod(0o644)  # as `ray get-auth-token --generate` or a local ray.init() leave it
    assert ray_cluster.private_token(environ) == [
        f"made {token_file} readable by you only (0600): it is the key to your Ray clusters"
    ]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600 and token_file.read_text() == token
    assert ray_cluster.private_token({"RAY_AUTH_TOKEN": "abc"}) == []  # a token in the environment: no file
    assert token not in " ".join(ray_cluster.dashboard_lines("127.0.0.1:8265", "node7"))

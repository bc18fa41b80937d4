"""Faults a real cluster meets: an error on one rank, a failing loader worker, a diverging run,
damaged or refused checkpoints, resumes under another layout, and relaunches that replay steps."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, assert_same_run, launch

from gendist.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from gendist.config import ConfigError, load_config
from gendist.training.loop import train
from gendist.training.window import Diverged, stack_values


def strict_rows(path):
    """JSONL rows parsed as strict JSON: a bare NaN or Infinity fails."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_an_error_on_one_rank_ends_the_job_at_once_with_that_ranks_traceback(tiny_overrides, tmp_path):
    # Without the fix both ranks wait out the 30-minute gloo timeout: the timeout fails the test instead.
    proc = launch(
        "accelerate",
        tmp_path,
        [*tiny_overrides, "train.steps=50"],
        ["tests/fault_worker.py", "step", "1", "3"],
        timeout=150,
    )
    assert proc.returncode != 0
    assert "[rank 1/2] RuntimeError: injected fault at step 3" in proc.stderr, proc.stderr[-3000:]
    assert "[rank 1/2] Traceback" in proc.stderr


@pytest.mark.slow
def test_a_loader_worker_error_ends_a_one_process_run_promptly(tiny_overrides, tmp_path):
    # Loader workers ignore stop signals; without closing them on the error path, the process waits
    # for them forever at exit.
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run(
        [sys.executable, "tests/fault_worker.py", "loader", "0", "2", *tiny_overrides, "train.steps=50"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode != 0
    assert "injected loader fault after 2 batches" in proc.stderr


def test_divergence_stops_with_the_step_and_loss_and_keeps_the_finite_checkpoint(tiny_overrides, tmp_path):
    wgan_gp = [
        *tiny_overrides,
        "model.name=wgan_gp",
        "model.d_norm=layer",
        "train.log_every=3",
        "train.keep_checkpoints=1",
    ]
    train(load_config(None, [*wgan_gp, "train.steps=4", "train.checkpoint_every=2"]))
    run = tmp_path / "run"
    # a relaunch at a huge learning rate (what a bad sweep value does), checkpointing every step
    with pytest.raises(Diverged, match=r"not finite at step \d+; stopped without checkpointing it") as err:
        train(
            load_config(
                None, [*wgan_gp, "train.steps=40", "train.checkpoint_every=1", "optim.lr_g=1e6", "optim.lr_d=1e6"]
            )
        )
    assert any(name in str(err.value) for name in ("loss_d", "loss_g", "wasserstein", "gradient_penalty", "weights"))
    kept = list_checkpoints(run)
    assert kept and kept[0].name >= "step_0000004"  # keep_checkpoints=1: a non-finite save would prune the last good
    for checkpoint in kept:
        shared, _ = load_checkpoint(checkpoint, 0)
        for network in ("generator", "discriminator"):
            assert all(torch.isfinite(t).all() for t in shared[network].values())
    rows = strict_rows(run / "metrics.jsonl")
    assert any(value is None for row in rows for value in row.values())  # the diverged window, as null


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tiny_overrides, tmp_path, capsys):
    common = [*tiny_overrides, "train.checkpoint_every=2", "train.keep_checkpoints=5"]
    straight = train(load_config(None, [*common, "train.steps=6", f"train.run_dir={tmp_path / 'straight'}"]))
    train(load_config(None, [*common, "train.steps=4"]))
    latest = list_checkpoints(tmp_path / "run")[-1]
    (latest / "state.pt").write_bytes((latest / "state.pt").read_bytes()[:1000])  # a torn write on a bad disk
    resumed = train(load_config(None, [*common, "train.steps=6"]))
    out = capsys.readouterr().out
    assert f"{latest / 'state.pt'} cannot be read" in out and "trying the checkpoint before it" in out
    assert "at step 2" in out
    assert_same_run(straight["generator"].state_dict(), resumed["generator"].state_dict())
    # set aside, out of pruning, evaluation and comparison
    assert (latest.parent / ".step_0000004.unreadable" / "state.pt").is_file()
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_0000002", "step_0000004", "step_0000006"]


def test_a_checkpoint_with_foreign_pickles_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "step_0000001"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    torch.save({"train_state": Payload()}, folder / "state.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, 0)
    message = str(err.value)
    assert str(folder / "state.pt") in message and "refused" in message and "weights_only" not in message


def test_saves_remove_partial_and_emptied_checkpoint_folders(tiny_overrides, tmp_path):
    root = tmp_path / "run" / "checkpoints"
    (root / ".step_0000009.partial").mkdir(parents=True)  # a save killed midway
    (root / "step_0000003").mkdir()  # a folder emptied by an interrupted deletion
    (root / ".step_0000001.deleting").mkdir()
    train(load_config(None, [*tiny_overrides, "train.steps=2"]))
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002"]


def test_resuming_under_another_layout_is_said_and_continues(tiny_overrides, tmp_path, capsys):
    train(load_config(None, [*tiny_overrides, "train.steps=4", "train.checkpoint_every=2"]))
    capsys.readouterr()
    result = train(load_config(None, [*tiny_overrides, "train.steps=6", "data.num_workers=2", "data.batch_size=4"]))
    out = capsys.readouterr().out
    assert "warning: resuming" in out and "num_workers 1 -> 2" in out and "batch_size 8 -> 4" in out
    assert "not bit-identically" in out
    assert result.state.step == 6
    # 4 batches of 8 were read in epoch 0; carried over as 8 batches of 4, then 2 more
    assert result.state.position().batch_in_epoch == 10


def test_a_relaunch_with_other_settings_keeps_the_old_config_and_refuses_other_networks(
    tiny_overrides, tmp_path, capsys
):
    run = tmp_path / "run"
    train(load_config(None, [*tiny_overrides, "train.steps=2"]))
    train(load_config(None, [*tiny_overrides, "train.steps=3", "optim.lr_g=1e-4"]))
    out = capsys.readouterr().out
    assert "config changed since this run's last launch: optim.lr_g 0.0002 -> 0.0001" in out
    assert "train.steps 2 -> 3" in out
    assert load_config(run / "config.until_step_0000002.yaml").optim.lr_g == 2e-4
    assert load_config(run / "config.yaml").optim.lr_g == 1e-4
    with pytest.raises(ConfigError, match=r"model.ngf 8 -> 16.*use a new train.run_dir"):
        train(load_config(None, [*tiny_overrides, "train.steps=4", "model.ngf=16"]))
    assert load_config(run / "config.yaml").model.ngf == 8
    # a config.yaml written before gendist had a key (here: eval.pr_k) is no change of settings
    written = yaml.safe_load((run / "config.yaml").read_text())
    del written["eval"]["pr_k"]
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    kept = sorted(run.glob("config.until_step_*.yaml"))
    capsys.readouterr()
    train(load_config(None, [*tiny_overrides, "train.steps=3", "optim.lr_g=1e-4"]))
    assert "config changed" not in capsys.readouterr().out and sorted(run.glob("config.until_step_*.yaml")) == kept
    assert "pr_k: 3" in (run / "config.yaml").read_text()


def test_a_resumed_run_logs_each_step_once(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    common = [*tiny_overrides, "train.log_every=1", "train.checkpoint_every=2"]
    train(load_config(None, [*common, "train.steps=3"]))
    (run / "eval.jsonl").write_text(
        json.dumps({"step": 3, "source": "training"}) + "\n" + json.dumps({"step": 3, "source": "gendist eval"}) + "\n"
    )
    # the run was killed after logging step 3: its checkpoints are steps 2 and 3; drop step 3's
    checkpoints = list_checkpoints(run)
    assert [c.name for c in checkpoints] == ["step_0000002", "step_0000003"]
    for path in checkpoints[-1].iterdir():
        path.unlink()
    checkpoints[-1].rmdir()
    train(load_config(None, [*common, "train.steps=5"]))
    assert [row["step"] for row in strict_rows(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert [row["source"] for row in strict_rows(run / "eval.jsonl")] == ["gendist eval"]


def test_step_values_from_any_device_land_on_the_sessions_device():
    # A loop that hands the session a CPU tensor or a Python number (the VAE's KL weight did) must
    # not break a GPU run; the meta device stands in for a GPU here, and mixing devices fails on it.
    values = {"loss": torch.zeros((), device="meta"), "kl_weight": 0.5, "cpu": torch.tensor(1.0)}
    stacked = stack_values(values, sorted(values), torch.device("meta"))
    assert stacked.device.type == "meta" and stacked.shape == (3,)
    with pytest.raises(RuntimeError):
        torch.stack([values["loss"], values["cpu"]])


def test_each_epoch_reports_images_read_against_the_manifest_and_damage_is_warned(
    tiny_overrides, synthetic_shards, tmp_path, capsys
):
    train(load_config(None, [*tiny_overrides, "train.steps=30"]))
    out = capsys.readouterr().out
    # 231 train images, 28 batches of 8 per epoch: 224 read once, 7 left over
    assert (
        "epoch 0: read 224 of the 231 images the manifest lists; 0 short of the manifest, 0 unreadable "
        "samples skipped, 7 left over"
    ) in out
    damaged = tmp_path / "damaged"
    shutil.copytree(synthetic_shards, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    victim = damaged / manifest["splits"]["train"]["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # a copy cut short
    train(
        load_config(
            None,
            [*tiny_overrides, "train.steps=30", f"data.shards={damaged}", f"train.run_dir={tmp_path / 'damaged_run'}"],
        )
    )
    out = capsys.readouterr().out
    assert "warning: the shards delivered" in out and "gendist shards verify" in out
    rows = strict_rows(tmp_path / "damaged_run" / "metrics.jsonl")
    assert sum(row["data_short"] for row in rows) > 0


def test_a_batch_larger_than_the_split_is_a_config_error_naming_the_key(tiny_overrides, capsys):
    from gendist.train import main as train_main

    assert train_main([*tiny_overrides, "data.batch_size=512", "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "gendist: error: data.batch_size=512 on 1 rank needs at least 512 images per epoch" in err
    assert "Traceback" not in err


def test_rank_seeds_of_neighbouring_run_seeds_do_not_coincide():
    from gendist.distributed import rank_seed, seed_everything

    seeds = {(seed, rank): rank_seed(seed, rank) for seed in range(4) for rank in range(8)}
    assert len(set(seeds.values())) == len(seeds)  # seed + rank made (0, 1) and (1, 0) one stream

    class Rank2:
        process_index = 2

    seed_everything(3, Rank2())
    assert torch.initial_seed() == rank_seed(3, 2)
    seed_everything(3)  # the same on every rank
    assert torch.initial_seed() == 3


def test_torn_metric_lines_do_not_stop_a_resume(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, [*tiny_overrides, "train.steps=2", "train.log_every=1"]))
    with (run / "metrics.jsonl").open("a") as sink:
        sink.write('{"step": 3, "los')  # a write cut by a kill or a power loss
    train(load_config(None, [*tiny_overrides, "train.steps=3", "train.log_every=1"]))
    assert [row["step"] for row in strict_rows(run / "metrics.jsonl")] == [1, 2, 3]


def test_every_checkpoint_file_and_folder_is_fsynced_before_it_is_published(tiny_overrides, tmp_path, monkeypatch):
    from gendist import checkpoint

    flushed = []
    real_fsync = checkpoint.fsync
    monkeypatch.setattr(checkpoint, "fsync", lambda path: (flushed.append(path), real_fsync(path)))
    train(load_config(None, [*tiny_overrides, "train.steps=2"]))
    partial = tmp_path / "run" / "checkpoints" / ".step_0000002.partial"
    assert {partial / "state.pt", partial / "rank0.pt", partial, partial.parent} <= set(flushed)
    assert flushed.index(partial) < flushed.index(partial.parent)  # the folder before the rename is flushed

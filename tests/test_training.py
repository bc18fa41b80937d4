"""DCGAN (and the original GAN) training: exact resume, checkpoints, outputs; 2 real processes
under accelerate and torchrun."""

import dataclasses
import json
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, assert_same_weights, launch

from gendist import families
from gendist.checkpoint import list_checkpoints, load_checkpoint
from gendist.config import load_config
from gendist.data.loader import batches_per_epoch
from gendist.data.shards import read_manifest
from gendist.distributed import seed_everything
from gendist.models.dcgan import Generator
from gendist.progress import read_jsonl
from gendist.training.loop import train


def test_named_streams_keep_their_own_positions_and_resume_exactly(
    tiny_overrides, synthetic_shards, tmp_path, monkeypatch
):
    """A family whose critic phase also reads a second stream ('extra': the small val split) advances
    each stream through its own epochs; 8 steps straight equal 4 + resume + 4, both positions included."""
    declare = families.DECLARATIONS["dcgan"]

    def with_two_streams(inputs):
        family = declare(inputs)
        family.streams = {"train": inputs.cfg.data.split, "extra": "val"}
        critic = family.phases[0]

        def loss_reading_both(ctx):
            loss, stats = critic.loss(ctx)
            extra = ctx.next_batch("extra")["images"]
            return loss + 1e-3 * extra.mean(), {**stats, "extra_mean": extra.mean()}

        family.phases[0] = dataclasses.replace(critic, loss=loss_reading_both)
        return family

    monkeypatch.setitem(families.DECLARATIONS, "dcgan", with_two_streams)
    common = [*tiny_overrides, "train.checkpoint_every=4", "train.log_every=1"]
    straight = train(load_config(None, [*common, "train.steps=8", f"train.run_dir={tmp_path / 'a'}"]))
    per_epoch = batches_per_epoch(read_manifest(synthetic_shards)["splits"]["val"]["count"], 1, 8)
    assert per_epoch < 8  # the extra stream wraps around its epochs within the run
    extra, main = straight.state.position("extra"), straight.state.position()
    assert (main.epoch, main.batch_in_epoch) == (0, 8)
    assert (extra.epoch, extra.batch_in_epoch) == divmod(8, per_epoch)
    assert straight.state.images_seen == 2 * 8 * 8
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert rows[-1]["epoch_extra"] == extra.epoch and rows[-1]["epoch"] == 0

    train(load_config(None, [*common, "train.steps=4", f"train.run_dir={tmp_path / 'b'}"]))
    resumed = train(load_config(None, [*common, "train.steps=8", f"train.run_dir={tmp_path / 'b'}"]))
    assert dataclasses.replace(straight.state, train_seconds=0.0) == dataclasses.replace(
        resumed.state, train_seconds=0.0
    )
    for network in ("generator", "discriminator"):
        assert_same_weights(straight[network].state_dict(), resumed[network].state_dict())


@pytest.mark.parametrize("family", ["dcgan", "gan", "pix2pix"])
def test_resume_matches_an_uninterrupted_run(tiny_overrides, tmp_path, family):
    """10 steps straight vs 5, stop, resume for 5: bit-identical weights. Two loader workers and
    an epoch of 7 batches, so the resume skips into a worker's stream and crosses an epoch."""
    common = [
        *tiny_overrides,
        f"model.name={family}",
        "data.batch_size=32",
        "data.num_workers=2",
        "train.checkpoint_every=5",
    ]
    straight = train(load_config(None, [*common, "train.steps=10", f"train.run_dir={tmp_path / 'a'}"]))
    first = train(load_config(None, [*common, "train.steps=5", f"train.run_dir={tmp_path / 'b'}"]))
    assert first.state.step == 5 and first.state.position().epoch == 0
    resumed = train(load_config(None, [*common, "train.steps=10", f"train.run_dir={tmp_path / 'b'}"]))
    assert resumed.state.step == 10 and resumed.state.position().epoch == 1
    assert dataclasses.replace(straight.state, train_seconds=0.0) == dataclasses.replace(
        resumed.state, train_seconds=0.0
    )
    assert_same_weights(straight["generator"].state_dict(), resumed["generator"].state_dict())
    assert_same_weights(straight["discriminator"].state_dict(), resumed["discriminator"].state_dict())


def test_run_folder_outputs_and_checkpoint_contents(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    train(
        load_config(
            None,
            [
                *tiny_overrides,
                "train.steps=6",
                "train.checkpoint_every=2",
                "train.sample_every=3",
                "train.keep_checkpoints=2",
            ],
        )
    )
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004", "step_0000006"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(r["images_per_s"] > 0 and r["data_errors"] == 0 and r["loss_d"] > 0 for r in rows)
    assert load_config(run / "config.yaml").train.steps == 6
    shared, mine = load_checkpoint(run / "checkpoints" / "step_0000006", rank=0)
    assert {"generator", "discriminator", "opt_g", "opt_d", "train_state"} <= shared.keys()
    assert shared["train_state"]["step"] == 6 and shared["opt_g"]["state"]
    assert {"python", "torch"} <= mine["rng"].keys()


def test_partial_checkpoint_is_ignored(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, [*tiny_overrides, "train.steps=2", "train.checkpoint_every=2"]))
    (run / "checkpoints" / ".step_0000004.partial").mkdir()  # a save killed half-way
    (run / "checkpoints" / ".step_0000004.partial" / "rank0.pt").write_bytes(b"truncated")
    result = train(load_config(None, [*tiny_overrides, "train.steps=4", "train.checkpoint_every=2"]))
    assert result.state.step == 4
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]


@pytest.mark.parametrize("family", ["dcgan", "gan"])
def test_bf16_autocast_path_trains(tiny_overrides, family):
    result = train(
        load_config(None, [*tiny_overrides, f"model.name={family}", "train.steps=2", "train.mixed_precision=bf16"])
    )
    assert all(torch.isfinite(p).all() for p in result["generator"].parameters())


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_end_with_identical_weights(launcher, tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "train.steps=4"]
    proc = launch(launcher, tmp_path, overrides, [str(REPO / "tests" / "dist_train_worker.py"), str(tmp_path)])
    # Judge by the saved results: a rare abort at interpreter exit must not hide a good run.
    ranks = [tmp_path / f"rank{r}.pt" for r in range(2)]
    assert all(p.exists() for p in ranks), proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = [torch.load(p, weights_only=True) for p in ranks]
    assert [s["world_size"] for s in saved] == [2, 2]
    assert [s["step"] for s in saved] == [4, 4]
    assert_same_weights(saved[0]["generator"], saved[1]["generator"])
    assert_same_weights(saved[0]["discriminator"], saved[1]["discriminator"])
    seed_everything(0)  # the initial weights, as train makes them
    initial = Generator(z_dim=100, ngf=8, image_size=32).state_dict()
    assert not torch.equal(saved[0]["generator"]["net.0.weight"], initial["net.0.weight"])


@pytest.mark.slow
def test_entry_point_two_processes_then_resume(tiny_overrides, tmp_path):
    """The real `accelerate launch -m gendist.train` twice: 4 steps, then resumed to 6."""
    run = tmp_path / "run"
    for steps in (4, 6):
        proc = launch(
            "accelerate",
            tmp_path,
            [*tiny_overrides, f"train.steps={steps}", "train.checkpoint_every=2"],
            ["-m", "gendist.train"],
        )
        assert latest_step(run) == steps, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "accelerate.log").read_text()
    assert "resumed from" in log and "step_0000004 at step 4" in log
    assert "[rank 0/2]" in log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert rows[-1]["images_seen"] == 6 * 8 * 2


def latest_step(run: Path) -> int | None:
    found = list_checkpoints(run)
    return int(found[-1].name.split("_")[1]) if found else None


def test_loader_workers_are_gone_when_training_returns(tiny_overrides):
    """The stream is closed at the end: workers left to the garbage collector each wait out a 5 s
    shutdown timeout at some later, random point."""
    train(load_config(None, [*tiny_overrides, "train.steps=2", "data.num_workers=2"]))
    assert psutil.Process().children(recursive=True) == []


def test_resume_applies_the_configs_learning_rate_and_betas(tiny_overrides, tmp_path):
    """A checkpoint carries optimizer state; the config decides hyperparameters (PBT changes them)."""
    common = [*tiny_overrides, "train.checkpoint_every=2"]
    train(load_config(None, [*common, "train.steps=2"]))
    train(load_config(None, [*common, "train.steps=3", "optim.lr_g=1e-3", "optim.lr_d=5e-4", "optim.betas=[0.0,0.9]"]))
    shared, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000003", rank=0)
    assert [g["lr"] for g in shared["opt_g"]["param_groups"]] == [1e-3]
    assert [g["lr"] for g in shared["opt_d"]["param_groups"]] == [5e-4]
    assert tuple(shared["opt_g"]["param_groups"][0]["betas"]) == (0.0, 0.9)


class CriticUpdates:
    """A per-rank object for the test below: counts this rank's critic updates."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def test_per_rank_state_of_a_family_survives_a_resume(tiny_overrides, tmp_path, monkeypatch):
    from gendist import families

    counters = []

    def counting(inputs):
        family = families.gan.declare(inputs)
        counter = CriticUpdates()
        counters.append(counter)
        critic = family.phases[0]
        critic.after_update = lambda: setattr(counter, "count", counter.count + 1)
        family.per_rank["critic_updates"] = counter
        return family

    monkeypatch.setitem(families.DECLARATIONS, "dcgan", counting)
    common = [*tiny_overrides, "loss.n_critic=2", "train.checkpoint_every=3"]
    train(load_config(None, [*common, "train.steps=3"]))
    train(load_config(None, [*common, "train.steps=6"]))
    assert [c.count for c in counters] == [6, 12]  # the resumed run went on from its own 6
    _, mine = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000006", rank=0)
    assert mine["state"] == {"critic_updates": {"count": 12}}

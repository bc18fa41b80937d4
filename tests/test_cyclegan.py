"""CycleGAN on the one loop: two domain streams, four networks, per-rank image pools, the learning-rate
decay, exact resume after a stop, its grids and its refusals."""

import pytest
import torch
from conftest import assert_same_weights, stop_requested_at
from PIL import Image

from gendist import families
from gendist.config import ConfigError, load_config
from gendist.distributed import seed_everything
from gendist.engines import engine_config
from gendist.families.base import FamilyInputs
from gendist.families.cyclegan import linear_decay
from gendist.progress import read_jsonl
from gendist.training.loop import train

NETWORKS = ("generator_ab", "generator_ba", "discriminator_a", "discriminator_b")
CYCLEGAN = ["model.name=cyclegan", "cyclegan.domains=[not_Male,Male]", "cyclegan.blocks=2", "cyclegan.pool_size=4"]


def test_learning_rates_stay_then_decay_linearly_to_the_last_step():
    factor = linear_decay(10, 0.5)
    assert [factor(step) for step in range(1, 7)] == [1.0] * 6
    assert [round(factor(step), 6) for step in (7, 8, 9, 10)] == [0.8, 0.6, 0.4, 0.2]
    assert linear_decay(10, 1.0)(10) == 1.0


def test_stopped_and_resumed_equals_straight_with_pools_and_schedule(tiny_overrides, tmp_path):
    """6 steps straight vs stopped at 3 (a stop request, as SIGTERM gives) and resumed: bit-identical
    networks. The pools (4 images, batches of 8) are full after the first step, so later steps draw
    from them; the learning rates decay from step 3 on."""
    common = [*tiny_overrides, *CYCLEGAN, "train.steps=6", "train.log_every=1", "train.sample_every=6"]
    straight = train(load_config(None, [*common, f"train.run_dir={tmp_path / 'a'}"]))

    with stop_requested_at(3):
        stopped = train(load_config(None, [*common, f"train.run_dir={tmp_path / 'b'}"]))
    assert stopped.state.step == 3
    resumed = train(load_config(None, [*common, f"train.run_dir={tmp_path / 'b'}"]))
    assert resumed.state.step == 6 and resumed.state.positions.keys() == {"a", "b"}
    assert resumed.state.positions == straight.state.positions
    for name in NETWORKS:
        assert_same_weights(straight[name].state_dict(), resumed[name].state_dict())

    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert {"loss_g", "cycle_l1", "identity_l1", "loss_d_a", "loss_d_b", "epoch_a", "epoch_b"} <= rows[-1].keys()
    timing = {"time", "images_per_s"}
    logged = [{k: v for k, v in row.items() if k not in timing} for row in rows]
    assert logged == [
        {k: v for k, v in row.items() if k not in timing} for row in read_jsonl(tmp_path / "b" / "metrics.jsonl")
    ]
    grid = Image.open(tmp_path / "a" / "samples" / "step_0000006.png")
    assert grid.size[1] > 5 * 32  # six rows: A, G(A), F(G(A)), B, F(B), G(F(B))


def test_a_missing_domain_split_names_the_stream_and_the_command(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "model.name=cyclegan", "cyclegan.domains=[not_Eyeglasses,Eyeglasses]"])
    with pytest.raises(ConfigError, match=r"stream 'a'.*train\.not_Eyeglasses.*gendist shards domains"):
        train(cfg)


@pytest.mark.parametrize(
    "overrides, refusal",
    [
        (["cyclegan.domains=[Male,Male]"], "two different domains"),
        (["train.mixed_precision=fp16"], "bf16"),
        (["cyclegan.decay_from=1.5"], "decay_from"),
    ],
)
def test_settings_that_cannot_train_are_refused(overrides, refusal):
    with pytest.raises(ConfigError, match=refusal):
        load_config(None, ["model.name=cyclegan", *overrides])


def test_deepspeed_refuses_cyclegan_with_the_reason():
    cfg = load_config(None, ["model.name=cyclegan", "data.batch_size=4"])
    with pytest.raises(ConfigError, match="one backward"):
        engine_config({"zero_optimization": {"stage": 2}}, cfg, 2)


def test_generators_are_stepped_together_and_discriminators_on_their_own(tiny_overrides, tmp_path):
    """After one step every parameter of the four networks moved (the generators from their one
    joint backward, each discriminator from its own phase)."""
    cfg = load_config(None, [*tiny_overrides, *CYCLEGAN, "train.steps=1"])
    result = train(cfg)
    seed_everything(cfg.train.seed)
    initial = families.declare(FamilyInputs(cfg, []))
    for network in initial.networks:
        before, after = network.module.state_dict(), result[network.name].state_dict()
        moved = [
            name for name in before if before[name].is_floating_point() and not torch.equal(before[name], after[name])
        ]
        assert len(moved) == len([n for n in before if before[n].is_floating_point()]), network.name


def test_bf16_trains_with_finite_losses(tiny_overrides):
    result = train(load_config(None, [*tiny_overrides, *CYCLEGAN, "train.steps=2", "train.mixed_precision=bf16"]))
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 2
    assert all(isinstance(rows[-1][k], float) for k in ("loss_g", "cycle_l1", "loss_d_a", "loss_d_b"))

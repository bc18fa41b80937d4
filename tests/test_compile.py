"""train.compile: torch.compile (inductor, which runs on CPU too) of the trained networks.

Compiled kernels fuse and reorder float arithmetic, so a compiled run is not bit-identical to an
eager one; the stated tolerance (README, `train.compile`) is what these tests hold it to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_ranks_agree, assert_same_weights, launch

from gendist.checkpoint import load_checkpoint
from gendist.config import ConfigError, load_config
from gendist.engines import engine_config
from gendist.trained import load_network
from gendist.training.loop import train

# Per-step losses of a compiled run against the eager run's, and the weights after a resume.
LOSS_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}
WEIGHT_TOLERANCE = {"rtol": 1e-3, "atol": 1e-5}


def losses(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in ("loss_d", "loss_g", "gradient_penalty", "wasserstein")} for row in rows]


@pytest.mark.slow
def test_compiled_wgan_gp_matches_eager_and_resumes_eagerly(tiny_overrides, tmp_path):
    """WGAN-GP compiled (its penalty's double backward through the eager critic) gives the eager
    run's losses step by step; its checkpoint holds the plain networks' keys, and an eager resume
    of it ends where the straight eager run ends."""
    common = [
        *tiny_overrides,
        "model.name=wgan_gp",
        "model.d_norm=layer",
        "loss.n_critic=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
    ]
    eager = train(load_config(None, [*common, "train.steps=4", f"train.run_dir={tmp_path / 'eager'}"]))
    compiled_run = tmp_path / "compiled"
    train(load_config(None, [*common, "train.steps=2", "train.compile=default", f"train.run_dir={compiled_run}"]))

    eager_losses, compiled_losses = losses(tmp_path / "eager"), losses(compiled_run)
    assert len(compiled_losses) == 2
    for reference, found in zip(eager_losses, compiled_losses):
        for name, value in reference.items():
            torch.testing.assert_close(found[name], value, **LOSS_TOLERANCE, msg=name)
    shared, _ = load_checkpoint(compiled_run / "checkpoints" / "step_0000002", rank=0)
    for network in ("generator", "discriminator"):
        assert shared[network].keys() == eager[network].state_dict().keys(), network
    assert not [key for key in shared["generator_ema"] if "_orig_mod" in key]  # an AveragedModel's own keys

    resumed = train(load_config(None, [*common, "train.steps=4", f"train.run_dir={compiled_run}"]))
    assert resumed.state.step == 4
    for network in ("generator", "discriminator"):
        expected, found = eager[network].state_dict(), resumed[network].state_dict()
        for key in expected:
            torch.testing.assert_close(found[key], expected[key], **WEIGHT_TOLERANCE, msg=f"{network}.{key}")


def test_compile_under_deepspeed_is_refused_with_the_reason():
    cfg = load_config(None, ["train.compile=default"])
    with pytest.raises(ConfigError, match="train.compile=default under DeepSpeed is refused"):
        engine_config({"zero_optimization": {"stage": 2}}, cfg, 2)


@pytest.mark.slow
def test_compiled_families_train_on_2_processes_with_identical_weights(tiny_overrides, tmp_path):
    """Compiled DDP (Dynamo splits the graph at the gradient buckets) on 2 gloo ranks: WGAN-GP's
    eager penalty beside the compiled critic, and CycleGAN's joint update of two generators."""
    proc = launch(
        "accelerate",
        tmp_path,
        [*tiny_overrides, "train.steps=2", "train.compile=default"],
        [str(REPO / "tests" / "family_worker.py"), str(tmp_path), "wgan_gp,cyclegan"],
    )
    assert_ranks_agree(tmp_path, ["wgan_gp", "cyclegan"], proc, samples_at=2)


def test_checkpoints_with_compiled_keys_resume_and_load(tiny_overrides, tmp_path):
    """A checkpoint whose networks carry torch.compile's `_orig_mod.` (as runs compiled by the
    launcher wrote them) resumes exactly and loads for evaluation."""
    common = [*tiny_overrides, "train.checkpoint_every=2"]
    straight = train(load_config(None, [*common, "train.steps=4", f"train.run_dir={tmp_path / 'a'}"]))
    run = tmp_path / "b"
    train(load_config(None, [*common, "train.steps=2", f"train.run_dir={run}"]))
    state_file = run / "checkpoints" / "step_0000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    for network in ("generator", "discriminator"):
        state[network] = {f"_orig_mod.{key}": value for key, value in state[network].items()}
    torch.save(state, state_file)

    loaded = load_network(run, run / "checkpoints" / "step_0000002", "discriminator", [])
    assert loaded.module.state_dict().keys() == straight["discriminator"].state_dict().keys()
    resumed = train(load_config(None, [*common, "train.steps=4", f"train.run_dir={run}"]))
    for network in ("generator", "discriminator"):
        assert_same_weights(straight[network].state_dict(), resumed[network].state_dict())

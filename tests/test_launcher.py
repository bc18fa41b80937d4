"""Launcher settings meet the experiment config by one rule (gendist/launcher.py): the config's value
where it sets one, else the launcher's, else the default; a contradiction is refused naming both.
The fast tests give the resolver the environment `accelerate launch` exports; the slow ones start
the real launcher."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml
from conftest import BIN, RANDOM_EVAL, REPO
from test_compile import WEIGHT_TOLERANCE

from gendist.checkpoint import load_checkpoint
from gendist.cli import main as cli_main
from gendist.config import ConfigError, load_config
from gendist.engines import engine_config
from gendist.eval.evaluator import read_rows
from gendist.launcher import training_config, unused_by_fp32_command
from gendist.training.loop import train

# what `accelerate launch --cpu --num_processes 1` exports when no flag is given
QUIET_LAUNCHER = {
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "ACCELERATE_DYNAMO_MODE": "default",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False",
    "ACCELERATE_DYNAMO_USE_DYNAMIC": "False",
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "False",
}


def resolved(overrides: list[str], **launcher: str):
    return training_config(None, overrides, {**QUIET_LAUNCHER, **launcher})


def test_the_launchers_precision_is_used_when_the_config_sets_none():
    cfg, lines = resolved([], ACCELERATE_MIXED_PRECISION="bf16")
    assert cfg.train.mixed_precision == "bf16"
    assert "train.mixed_precision=bf16 (the launcher: accelerate launch --mixed_precision" in lines[0]
    cfg, lines = resolved([])
    assert cfg.train.mixed_precision == "no" and lines[0] == "train.mixed_precision=no (gendist's default)"


def test_the_configs_precision_wins_when_the_launcher_agrees_or_says_nothing():
    cfg, lines = resolved(["train.mixed_precision=bf16"])
    assert cfg.train.mixed_precision == "bf16" and lines[0] == "train.mixed_precision=bf16 (the experiment config)"
    cfg, _ = resolved(["train.mixed_precision=bf16"], ACCELERATE_MIXED_PRECISION="bf16")
    assert cfg.train.mixed_precision == "bf16"


def test_a_contradiction_is_refused_naming_both_values_and_their_sources(tmp_path):
    with pytest.raises(
        ConfigError, match=r"train.mixed_precision=no in the experiment config conflicts with bf16 from"
    ):
        resolved(["train.mixed_precision=no"], ACCELERATE_MIXED_PRECISION="bf16")
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  mixed_precision: bf16\n")
    with pytest.raises(ConfigError, match=r"bf16 in the experiment config conflicts with fp16 from the launcher"):
        training_config(preset, [], {**QUIET_LAUNCHER, "ACCELERATE_MIXED_PRECISION": "fp16"})


def test_fp16_from_the_launcher_meets_the_same_refusals_as_from_the_config():
    with pytest.raises(ConfigError, match=r"wgan_gp with fp16 is refused.*settings: train.mixed_precision=fp16 \(the"):
        resolved(["model.name=wgan_gp", "model.d_norm=layer"], ACCELERATE_MIXED_PRECISION="fp16")
    with pytest.raises(ConfigError, match="fp8 is refused"):
        resolved([], ACCELERATE_MIXED_PRECISION="fp8")


def test_a_deepspeed_config_files_precision_block_is_a_launcher_setting(tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_file)}
    cfg, lines = resolved([], **deepspeed)
    assert cfg.train.mixed_precision == "bf16" and f"the DeepSpeed config file {ds_file} (bf16.enabled)" in lines[0]
    with pytest.raises(ConfigError, match="the launcher gives two mixed precisions: fp16 from .* and bf16 from"):
        resolved([], ACCELERATE_MIXED_PRECISION="fp16", **deepspeed)
    ds_file.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="wgan_gp with fp16 is refused"):
        resolved(["model.name=wgan_gp", "model.d_norm=layer"], **deepspeed)


def test_the_launchers_dynamo_settings_map_onto_train_compile_or_are_refused():
    cfg, lines = resolved([], ACCELERATE_DYNAMO_BACKEND="INDUCTOR", ACCELERATE_DYNAMO_MODE="reduce-overhead")
    assert (
        cfg.train.compile == "reduce-overhead" and "--dynamo_backend inductor --dynamo_mode reduce-overhead" in lines[1]
    )
    with pytest.raises(ConfigError, match="train.compile=no in the experiment config conflicts with default"):
        resolved(["train.compile=no"], ACCELERATE_DYNAMO_BACKEND="INDUCTOR")
    with pytest.raises(ConfigError, match="dynamo backend aot_eager .* is refused: gendist compiles its networks"):
        resolved([], ACCELERATE_DYNAMO_BACKEND="AOT_EAGER")
    with pytest.raises(ConfigError, match="--dynamo_use_fullgraph: train.compile lets Dynamo break the graph"):
        resolved([], ACCELERATE_DYNAMO_BACKEND="INDUCTOR", ACCELERATE_DYNAMO_USE_FULLGRAPH="True")
    cfg, _ = resolved([], ACCELERATE_DYNAMO_BACKEND="INDUCTOR")
    with pytest.raises(ConfigError, match="train.compile=default under DeepSpeed"):
        engine_config({"zero_optimization": {"stage": 2}}, cfg, 2)


def test_launcher_settings_no_family_honours_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="--gradient_accumulation_steps 4 .* a GAN's critic schedule"):
        resolved([], ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4")
    resolved([], ACCELERATE_GRADIENT_ACCUMULATION_STEPS="1")
    with pytest.raises(ConfigError, match="asks for FSDP .* which gendist does not drive"):
        resolved([], ACCELERATE_USE_FSDP="true")


def test_commands_that_do_not_train_say_the_launchers_precision_and_compile_go_unused():
    notes = unused_by_fp32_command({**QUIET_LAUNCHER, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert notes == [
        "note: the launcher's mixed precision bf16 (ACCELERATE_MIXED_PRECISION) is not used: this "
        "command computes in fp32"
    ]
    assert unused_by_fp32_command(QUIET_LAUNCHER) == []


def accelerate_launch(flags: list[str], overrides: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --cpu --num_processes 1 FLAGS -m gendist.train OVERRIDES`, as a user types it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", *flags, "-m", "gendist.train"]
    return subprocess.run([*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_accelerate_launch_precision_is_used_recorded_and_refused_where_it_contradicts(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    proc = accelerate_launch(["--mixed_precision", "bf16"], [*tiny_overrides, "train.steps=1"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "settings: train.mixed_precision=bf16 (the launcher: accelerate launch --mixed_precision" in proc.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"

    proc = accelerate_launch(["--mixed_precision", "bf16"], [*tiny_overrides, "train.mixed_precision=no"])
    assert proc.returncode != 0  # accelerate launch exits 1 for its process's 2
    assert "train.mixed_precision=no in the experiment config conflicts with bf16 from the launcher" in proc.stderr
    proc = accelerate_launch(
        ["--mixed_precision", "fp16"], [*tiny_overrides, "model.name=wgan_gp", "model.d_norm=layer"]
    )
    assert proc.returncode != 0 and "wgan_gp with fp16 is refused" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_a_launcher_compiled_run_resumes_eagerly_and_an_eager_one_compiled(tiny_overrides, tmp_path):
    """Runs compiled by `accelerate launch --dynamo_backend inductor` and by train.compile switch to
    the other mode at a checkpoint and end within the compile tolerance of a straight eager run;
    `gendist eval` reads checkpoints written either way."""
    common = [
        *tiny_overrides,
        *RANDOM_EVAL,
        "model.name=wgan_gp",
        "model.d_norm=layer",
        "loss.n_critic=2",
        "train.checkpoint_every=2",
        f"eval.stats_dir={tmp_path / 'stats'}",
    ]
    straight = train(load_config(None, [*common, "train.steps=4", f"train.run_dir={tmp_path / 'eager'}"]))

    launched = tmp_path / "launched"
    proc = accelerate_launch(["--dynamo_backend", "inductor"], [*common, "train.steps=2", f"train.run_dir={launched}"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "train.compile=default (the launcher: accelerate launch --dynamo_backend inductor" in proc.stdout
    shared, _ = load_checkpoint(launched / "checkpoints" / "step_0000002", rank=0)
    assert not [key for key in shared["generator"] if "_orig_mod" in key]
    eager_resume = train(load_config(None, [*common, "train.steps=4", f"train.run_dir={launched}"]))

    switched = tmp_path / "switched"
    train(load_config(None, [*common, "train.steps=2", f"train.run_dir={switched}"]))
    compiled_resume = train(
        load_config(None, [*common, "train.steps=4", "train.compile=default", f"train.run_dir={switched}"])
    )
    for resumed in (eager_resume, compiled_resume):
        assert resumed.state.step == 4
        for network in ("generator", "discriminator"):
            expected, found = straight[network].state_dict(), resumed[network].state_dict()
            for key in expected:
                torch.testing.assert_close(found[key], expected[key], **WEIGHT_TOLERANCE, msg=f"{network}.{key}")

    for run, checkpoint in ((launched, "step_0000002"), (switched, "step_0000004")):
        assert cli_main(["eval", str(run), "--checkpoint", str(run / "checkpoints" / checkpoint)]) == 0
        row = read_rows(run)[-1]
        assert row["source"] == "gendist eval" and row["fid"] > 0

"""The DeepSpeed backend on 2 real CPU processes (gloo): one ZeRO-2 engine per network, identical
weights on every rank, exact resume from sharded checkpoints, plain-format weights for evaluation,
and the combinations it refuses. (The gradient penalty under ZeRO-2: test_families.py.)"""

import shutil

import pytest
import torch
from conftest import RANDOM_EVAL, REPO, assert_ranks_agree, assert_same_run, assert_same_weights, launch

from gendist.checkpoint import list_checkpoints, load_checkpoint
from gendist.cli import main as cli_main
from gendist.config import ConfigError, load_config
from gendist.engines import engine_config
from gendist.eval.evaluator import read_rows
from gendist.training.loop import train

pytest.importorskip("deepspeed")
WORKER = str(REPO / "tests" / "family_worker.py")


@pytest.mark.slow
def test_zero2_families_train_identically_on_2_ranks_and_resume_exactly(tiny_overrides, tmp_path):
    """bf16 (DeepSpeed's torch autocast) for eight families in one ZeRO-2 launch (Pix2Pix's U-Net forward
    in the discriminator phase feeds the generator phase's backward); then DCGAN and VAE resume from
    the step-2 checkpoint of that launch and must end bit-identical to it."""
    common = [
        *tiny_overrides,
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.sample_every=4",
        "train.mixed_precision=bf16",
    ]
    straight = tmp_path / "straight"
    straight.mkdir()
    families = ["gan", "dcgan", "wgan_gp", "cgan", "vae", "pix2pix", "classifier", "srgan"]
    proc = launch("deepspeed", straight, common, [WORKER, str(straight), ",".join(families)])
    assert_ranks_agree(straight, families, proc, samples_at=4)
    checkpoint = list_checkpoints(straight / "dcgan")[-1]
    shards = sorted(p.name for p in (checkpoint / "deepspeed" / "discriminator").iterdir())
    assert shards == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert '"gradient_penalty"' in (straight / "wgan_gp" / "metrics.jsonl").read_text()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for family in ("dcgan", "vae"):
        shutil.copytree(straight / family, resumed / family)
        shutil.rmtree(resumed / family / "checkpoints" / "step_0000004")
    proc = launch("deepspeed", resumed, common, [WORKER, str(resumed), "dcgan,vae"])
    assert "resumed from" in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    for family in ("dcgan", "vae"):
        path = resumed / f"{family}-rank0.pt"
        assert path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
        after, reference = (
            torch.load(path, weights_only=True),
            torch.load(straight / f"{family}-rank0.pt", weights_only=True),
        )
        for part in reference.keys() - {"world_size"}:
            assert_same_run(reference[part], after[part])


@pytest.mark.slow
def test_a_zero2_checkpoint_is_plain_for_evaluation_and_refused_by_the_plain_backend(tiny_overrides, tmp_path):
    """FID during ZeRO-2 training equals `gendist eval` of its checkpoint in one plain process."""
    evaluation = [*RANDOM_EVAL, "eval.every=2", f"eval.stats_dir={tmp_path / 'stats'}"]
    proc = launch(
        "deepspeed", tmp_path, [*tiny_overrides, *evaluation, "train.steps=2"], [WORKER, str(tmp_path), "dcgan"]
    )
    run = tmp_path / "dcgan"
    assert list_checkpoints(run), proc.stdout[-3000:] + proc.stderr[-3000:]
    shared, _ = load_checkpoint(list_checkpoints(run)[-1], rank=0)
    assert shared["backend"] == "deepspeed-zero2" and shared["world_size"] == 2
    trained = torch.load(tmp_path / "dcgan-rank0.pt", weights_only=True)
    assert_same_weights(shared["generator"], trained["generator"])  # whole fp32 weights, as eval reads them
    assert cli_main(["eval", str(run)]) == 0
    during_training, plain = read_rows(run)
    assert during_training["source"] == "training" and plain["source"] == "gendist eval"
    assert plain["step"] == during_training["step"] == 2
    assert plain["fid"] == pytest.approx(during_training["fid"], rel=1e-5)
    with pytest.raises(ConfigError, match="deepspeed-zero2 backend"):
        train(load_config(None, [*tiny_overrides, "train.steps=4", f"train.run_dir={run}"]))


ZERO2 = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1}


@pytest.mark.parametrize(
    "settings, overrides, refusal",
    [
        ({"zero_optimization": {"stage": 3}}, [], "stage 3 is not supported"),
        (ZERO2, ["model.name=wgan"], "clipping"),
        (ZERO2, ["train.mixed_precision=fp16"], "fp16 under DeepSpeed is refused"),
        ({**ZERO2, "gradient_accumulation_steps": 4}, [], "one optimizer step per batch"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, [], "offload is not supported"),
    ],
)
def test_combinations_that_cannot_be_correct_are_refused(settings, overrides, refusal):
    with pytest.raises(ConfigError, match=refusal):
        engine_config(settings, load_config(None, overrides), world_size=2)


def test_engine_config_takes_batch_and_precision_from_the_run_config():
    config = engine_config(
        {**ZERO2, "gradient_clipping": "auto"},
        load_config(None, ["data.batch_size=16", "train.mixed_precision=bf16"]),
        world_size=4,
    )
    assert config["train_micro_batch_size_per_gpu"] == 16 and config["train_batch_size"] == 64
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in config
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's own default would clip to norm 1.0
    assert engine_config(ZERO2, load_config(None, []), world_size=2)["gradient_clipping"] == 0.0
    kept = engine_config({**ZERO2, "gradient_clipping": 5.0}, load_config(None, []), world_size=2)
    assert kept["gradient_clipping"] == 5.0  # a number the launch config sets is the user's

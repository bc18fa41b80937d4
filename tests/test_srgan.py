"""SRGAN: the networks, the two stages of one run (resumed exactly on either side of the boundary), the
content networks, and the evaluation against bicubic."""

import dataclasses

import pytest
import torch
from conftest import RANDOM_EVAL, assert_same_weights, stop_requested_at

from gendist.comparison import write_report
from gendist.config import ConfigError, load_config
from gendist.data.resolution import bicubic_upsample
from gendist.distributed import build_accelerator
from gendist.eval.evaluator import Evaluator, read_rows
from gendist.models.srgan import SRDiscriminator, SRResNet
from gendist.progress import read_jsonl
from gendist.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
SRGAN = ["model.name=srgan", "srgan.blocks=1", "srgan.pretrain_steps=2", "srgan.content=none", "train.log_every=1"]
VGG_CONTENT = ["srgan.content=vgg19", "srgan.vgg_weights=random", "srgan.vgg_layer=relu2_2"]


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_the_networks_shapes_and_the_papers_sizes(scale):
    generator = SRResNet(scale, ngf=64, blocks=16)
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    output = generator(low)
    assert output.shape == (2, 3, 8 * scale, 8 * scale) and output.abs().max() <= 1
    if scale == 4:
        assert parameters(generator) == 1_548_547  # SRResNet x4 at the paper's widths
        critic = SRDiscriminator(64, ndf=64)
        assert critic(output.repeat(1, 1, 2, 2)).shape == (2,)
        assert parameters(critic) == 13_077_889
    with pytest.raises(ValueError, match="power of two"):
        SRResNet(3)
    with pytest.raises(ValueError, match="divisible by 16"):
        SRDiscriminator(24)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["srgan.scale=3"], "srgan.scale must be 2, 4 or 8"),
        (["srgan.scale=8", "model.image_size=32"], "at least 8 px"),
        (["srgan.content=classifier"], "srgan.classifier=RUN_DIR"),
        (["srgan.adversarial_weight=-1"], "srgan.adversarial_weight must be"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.name=srgan", *overrides])


def test_two_stages_resume_exactly_on_either_side_of_the_boundary(tiny_overrides, tmp_path):
    """Steps 1-2 train SRResNet alone (the discriminator is untouched), 3-5 the adversarial stage with
    a VGG content loss; stopped at step 2 (the boundary) and at 3 (inside the GAN stage), each resumed
    run ends bit-identical to the uninterrupted one."""
    common = [*tiny_overrides, *SRGAN, *VGG_CONTENT, "train.steps=5"]
    straight = train(load_config(None, [*common, f"train.run_dir={tmp_path / 'a'}"]))
    for stop in (2, 3):
        run = f"train.run_dir={tmp_path / f'stopped_{stop}'}"
        with stop_requested_at(stop):
            assert train(load_config(None, [*common, run])).state.step == stop
        resumed = train(load_config(None, [*common, run]))
        assert dataclasses.replace(resumed.state, train_seconds=0.0) == dataclasses.replace(
            straight.state, train_seconds=0.0
        )
        for name in straight.networks:
            assert_same_weights(straight[name].state_dict(), resumed[name].state_dict())

    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [sorted(k for k in row if k.startswith(("loss", "d_"))) for row in rows[:2]] == [["loss_pixel"]] * 2
    adversarial = {"loss_pixel", "loss_content", "loss_g_adv", "loss_g", "loss_d", "d_real", "d_fake"}
    assert all(adversarial <= row.keys() for row in rows[2:])
    one_step, two_steps = (
        train(load_config(None, [*common, f"train.steps={n}", f"train.run_dir={tmp_path / f'pretrain_{n}'}"]))
        for n in (1, 2)
    )  # the pixel stage never steps the discriminator: as built after 1 step and after 2
    assert_same_weights(one_step["discriminator"].state_dict(), two_steps["discriminator"].state_dict())
    assert not torch.equal(*(run["generator"].head[0].weight for run in (one_step, two_steps)))
    assert (tmp_path / "a" / "samples" / "step_0000005.png").is_file()


def test_the_classifier_content_loss_and_bf16(tiny_overrides, tmp_path):
    """The content network is a trained face classifier's stage (loaded with the judge's checks);
    the run trains under bf16 with finite losses."""
    classifier = tmp_path / "classifier"
    bf16 = "train.mixed_precision=bf16"  # one precision per process (accelerate's state)
    train(
        load_config(
            None, [*tiny_overrides, "model.name=classifier", "train.steps=1", bf16, f"train.run_dir={classifier}"]
        )
    )
    overrides = [
        *tiny_overrides,
        *SRGAN,
        "srgan.pretrain_steps=1",
        "train.steps=2",
        "srgan.content=classifier",
        f"srgan.classifier={classifier}",
        "srgan.classifier_layer=stages.1",
        bf16,
    ]
    result = train(load_config(None, overrides))
    row = read_jsonl(result.run_dir / "metrics.jsonl")[-1]
    assert row["loss_content"] > 0 and all(torch.isfinite(p).all() for p in result["generator"].parameters())
    with pytest.raises(FileNotFoundError, match="srgan.classifier=.*nowhere is not a run folder"):
        train(load_config(None, [*overrides, f"srgan.classifier={tmp_path / 'nowhere'}"]))
    with pytest.raises(ValueError, match="is not one of stem, stages.0"):
        train(load_config(None, [*overrides, "srgan.classifier_layer=head", f"train.run_dir={tmp_path / 'b'}"]))


def test_bicubic_as_the_model_scores_as_the_bicubic_baseline(tiny_overrides, tmp_path):
    """The model's and the baseline's numbers come from one code path: a 'model' that upsamples
    bicubically gets the baseline's PSNR, SSIM and FID to the last digit, on a stated protocol."""
    cfg = load_config(None, [*tiny_overrides, *SRGAN, *RANDOM_EVAL, f"eval.stats_dir={tmp_path / 'stats'}"])
    evaluator = Evaluator(cfg, build_accelerator("no"), cfg.data.shards)
    row = evaluator.evaluate(None, 1, "bicubic", super_resolve=lambda low: bicubic_upsample(low, 4))
    for metric in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
        assert row[f"{metric}_model"] == row[f"{metric}_bicubic"], metric
    assert row["sr_model_fid"] == row["sr_bicubic_fid"] and row["sr_model_kid"] == row["sr_bicubic_kid"]
    assert 15 < row["psnr_y_bicubic"] < 40 and 0 < row["ssim_y_bicubic"] < 1
    assert row["sr_images"] == 16 and row["sr_stage"] == "SRResNet (pixel loss)" and "BT.601" in row["sr_protocol"]
    blurred = evaluator.evaluate(None, 1, "blur", super_resolve=lambda low: bicubic_upsample(low, 4) * 0.8)
    assert blurred["psnr_y_model"] < row["psnr_y_model"] and blurred["psnr_y_bicubic"] == row["psnr_y_bicubic"]


@pytest.mark.slow
def test_a_run_evaluates_against_bicubic(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *SRGAN, *RANDOM_EVAL, "train.steps=3", "eval.every=3"]
    run = train(load_config(None, [*overrides, f"eval.stats_dir={tmp_path / 'stats'}"])).run_dir
    (row,) = read_rows(run)
    assert row["step"] == 3 and row["sr_stage"] == "SRGAN (adversarial)"
    assert {"psnr_y_model", "psnr_y_bicubic", "sr_model_fid", "sr_bicubic_fid"} <= row.keys()
    report = write_report([run], tmp_path / "report").read_text()
    shown = "| run | super-resolution PSNR Y (bicubic) | super-resolution SSIM Y (bicubic) | super-resolution FID"
    assert shown in report and f"{row['psnr_y_model']:.3f} ({row['psnr_y_bicubic']:.3f})" in report

"""Every model family on 2 real processes, and WGAN-GP's critic step (DDP and ZeRO-2): 2 ranks x B ==
1 rank x 2B."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_ranks_agree, launch
from critic_step_worker import critic_for
from family_step_worker import family as declared_family


def run_on_1_and_2(worker: str, family: str, launcher: str, tmp_path) -> tuple[dict, dict]:
    """A step worker's results as one plain process and as 2 launched ranks (their world sizes checked)."""
    path = str(REPO / "tests" / worker)
    single = subprocess.run(
        [sys.executable, path, str(tmp_path / "one.pt"), family], cwd=REPO, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    proc = launch(launcher, tmp_path, [], [path, str(tmp_path / "two.pt"), family])
    assert (tmp_path / "two.pt").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, family",
    [
        ("accelerate", "wgan_gp"),
        pytest.param("deepspeed", "wgan_gp", id="deepspeed-zero2-wgan_gp"),
        ("accelerate", "gan"),
    ],
)
def test_critic_step_is_the_same_on_2_ranks_and_on_1(launcher, family, tmp_path):
    """WGAN-GP's gradient penalty (two forwards and one backward under DDP, or through a ZeRO-2
    engine), and the original GAN's maxout discriminator: averaging (reduce-scattering) the two
    ranks' gradients must equal the gradient of the whole batch. Tolerance: 1e-6 absolute (float32
    sums in a different order; Adam's first step is about lr * sign(grad), lr = 1e-3)."""
    one, two = run_on_1_and_2("critic_step_worker.py", family, launcher, tmp_path)
    torch.manual_seed(0)  # as the worker builds it
    initial = critic_for(family).state_dict()
    for name, value in one["critic"].items():
        torch.testing.assert_close(two["critic"][name], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(one["critic"][n], initial[n]) for n in initial), "the step changed nothing"


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher, family",
    [
        ("accelerate", "pix2pix"),
        pytest.param("deepspeed", "pix2pix", id="deepspeed-zero2-pix2pix"),
        ("accelerate", "cyclegan"),
    ],
)
def test_a_full_step_is_the_same_on_2_ranks_and_on_1(launcher, family, tmp_path):
    """One full step, the family's own phases, on 2 ranks x B equals 1 rank x 2B. CycleGAN: the two
    generators stepped from one backward (up to three forwards each, both discriminators frozen),
    then each discriminator on its own domain's batch, pools off; instance norm and the mean losses
    are per-sample. Pix2Pix: the PatchGAN on real and completed pairs, then the U-Net with the
    PatchGAN frozen and unsynced, its adversarial + L1 loss through the graph of
    the first phase's forward), on 2 ranks x B (DDP, or one ZeRO-2 engine per network) equals 1 rank
    x 2B: the masks follow the global sample index, instance norm and the mean losses are
    per-sample, and dropout is off. Tolerance: 1e-7 absolute (measured: 4e-9). Adam's first step,
    lr * g / (|g| + eps), hides a rescaled gradient almost wholly: DeepSpeed's default clipping to norm
    1 (the U-Net's is ~5) moved it by only 7e-7, and the masks of the old per-rank keys by 4e-4."""
    one, two = run_on_1_and_2("family_step_worker.py", family, launcher, tmp_path)
    declared = declared_family(family)
    assert one["phases"] == two["phases"] == [phase.name for phase in declared.phases]
    initial = {network.name: network.module.state_dict() for network in declared.networks}
    for network, weights in initial.items():
        assert one[network].keys() == two[network].keys() == weights.keys()
        for name, value in one[network].items():
            torch.testing.assert_close(two[network][name], value, rtol=0, atol=1e-7, msg=f"{network}.{name}")
        changed = [n for n in weights if not torch.equal(one[network][n], weights[n])]
        assert len(changed) == len(weights), f"{network}: the step left {set(weights) - set(changed)} unchanged"


@pytest.mark.slow
def test_every_family_trains_on_2_processes_with_identical_weights(tiny_overrides, tmp_path):
    proc = launch(
        "accelerate",
        tmp_path,
        [*tiny_overrides, "train.steps=3", "train.sample_every=3"],
        [str(REPO / "tests" / "family_worker.py"), str(tmp_path), "all"],
    )
    assert_ranks_agree(
        tmp_path,
        ["gan", "dcgan", "wgan", "wgan_gp", "cgan", "vae", "pix2pix", "cyclegan", "classifier", "srgan"],
        proc,
        samples_at=3,
    )
    clipped = torch.load(tmp_path / "wgan-rank0.pt", weights_only=True)["discriminator"]
    assert all(v.abs().max() <= 0.01 for k, v in clipped.items() if v.is_floating_point() and "running" not in k)
    assert (tmp_path / "vae" / "samples" / "recon_step_0000003.png").exists()
    metrics = (tmp_path / "wgan_gp" / "metrics.jsonl").read_text()
    assert '"gradient_penalty"' in metrics and '"wasserstein"' in metrics

"""Every model family on 2 real processes, and WGAN-GP's critic step: 2 ranks x B == 1 rank x 2B."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO, assert_same_weights, launch
from gendist.models.dcgan import Discriminator


@pytest.mark.slow
def test_wgan_gp_critic_step_is_the_same_on_2_ranks_and_on_1(tmp_path):
    """Gradient penalty, two forwards and one backward under DDP: averaging the two ranks'
    gradients must equal the gradient of the whole batch. Tolerance: 1e-6 absolute (float32
    sums in a different order; Adam's first step is about lr * sign(grad), lr = 1e-3)."""
    worker = str(REPO / "tests" / "critic_step_worker.py")
    single = subprocess.run([sys.executable, worker, str(tmp_path / "one.pt")], cwd=REPO, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    proc = launch("accelerate", tmp_path, [], [worker, str(tmp_path / "two.pt")])
    assert (tmp_path / "two.pt").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    torch.manual_seed(0)  # as the worker builds it
    initial = Discriminator(ndf=4, image_size=16, norm="layer").state_dict()
    for name, value in one["critic"].items():
        torch.testing.assert_close(two["critic"][name], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(one["critic"][n], initial[n]) for n in initial), "the step changed nothing"


@pytest.mark.slow
def test_every_family_trains_on_2_processes_with_identical_weights(tiny_overrides, tmp_path):
    proc = launch("accelerate", tmp_path, [*tiny_overrides, "train.steps=3", "train.sample_every=3"],
                  [str(REPO / "tests" / "family_worker.py"), str(tmp_path)])
    for family in ("dcgan", "wgan", "wgan_gp", "cgan", "vae"):
        paths = [tmp_path / f"{family}-rank{r}.pt" for r in range(2)]
        assert all(p.exists() for p in paths), f"{family}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
        ranks = [torch.load(p, weights_only=True) for p in paths]
        assert [r["world_size"] for r in ranks] == [2, 2]
        for part in ranks[0].keys() - {"world_size"}:
            assert_same_weights(ranks[0][part], ranks[1][part])
        assert (tmp_path / family / "samples" / "step_0000003.png").exists()
    clipped = torch.load(tmp_path / "wgan-rank0.pt", weights_only=True)["discriminator"]
    assert all(v.abs().max() <= 0.01 for k, v in clipped.items() if v.is_floating_point() and "running" not in k)
    assert (tmp_path / "vae" / "samples" / "recon_step_0000003.png").exists()
    metrics = (tmp_path / "wgan_gp" / "metrics.jsonl").read_text()
    assert '"gradient_penalty"' in metrics and '"wasserstein"' in metrics

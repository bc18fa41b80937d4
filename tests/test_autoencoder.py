"""The plain autoencoder (model.name=ae), the VAE's contrast: the same network, no KL term, a
deterministic code; scored like the VAE, with samples of its ex-post Gaussian beside N(0, I)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import RANDOM_EVAL, REPO, assert_ranks_agree, assert_same_run, launch

from gendist import families
from gendist.config import load_config
from gendist.data.loader import read_in_order
from gendist.distributed import build_accelerator
from gendist.eval.evaluator import Evaluator, Timer, read_rows
from gendist.families.base import FamilyInputs, StepContext
from gendist.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def phase_loss(cfg, weights: dict, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The family's one phase on `batch`, with `weights` loaded."""
    family = families.declare(FamilyInputs(cfg, []))
    (network,) = family.networks
    network.module.load_state_dict(weights)
    nets = {network.name: network.module}
    ctx = StepContext(nets, nets, lambda stream="train": {"images": batch}, torch.device("cpu"))
    ctx.step = 1
    (phase,) = family.phases
    return phase.loss(ctx)


def test_the_autoencoders_objective_is_the_vaes_with_no_kl_and_no_sampling(monkeypatch):
    common = ["model.image_size=32", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "vae.likelihood=gaussian"]
    ae, vae = (load_config(None, [*common, f"model.name={name}", "vae.beta=0"]) for name in ("ae", "vae"))
    weights = families.declare(FamilyInputs(vae, [])).networks[0].module.state_dict()
    batch = torch.rand(4, 3, 32, 32) * 2 - 1
    ae_loss, ae_stats = phase_loss(ae, weights, batch)
    assert set(ae_stats) == {"recon", "loss"}  # no KL term, no KL weight
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # the VAE's z = mu + 0 * sigma
    vae_loss, vae_stats = phase_loss(vae, weights, batch)
    assert vae_stats["kl"] > 0 and vae_stats["kl_weight"] == 0
    torch.testing.assert_close(ae_loss, vae_loss, rtol=0, atol=0)


def test_the_fitted_gaussian_is_the_codes_mean_and_covariance(tiny_overrides, synthetic_shards):
    cfg = load_config(None, [*tiny_overrides, *RANDOM_EVAL, "model.name=ae", "model.z_dim=8", "eval.num_real=40"])
    evaluator = Evaluator(cfg, build_accelerator("no"), str(synthetic_shards))
    projection = torch.randn(3 * 32 * 32, 8, generator=torch.Generator().manual_seed(1))

    def encode(images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ projection.to(images.dtype)

    mean, factor, count = evaluator._fitted_gaussian(encode, Timer(torch.device("cpu")))
    images, _, _ = read_in_order(synthetic_shards, "train", 32, 40)
    codes = encode(torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255 * 2 - 1).numpy()
    assert count == 40
    np.testing.assert_allclose(mean.numpy(), codes.mean(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose((factor @ factor.T).numpy(), np.cov(codes.T, bias=True), rtol=1e-4, atol=1e-3)


def test_an_autoencoder_run_scores_both_priors_and_its_reconstructions(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, *RANDOM_EVAL, "model.name=ae", "train.steps=2", "eval.every=2"]
    run = train(load_config(None, [*overrides, f"eval.stats_dir={tmp_path / 'stats'}"])).run_dir
    (row,) = read_rows(run)
    assert row["fid"] > 0 and row["fid_fitted"] > 0 and row["kid_fitted"] == pytest.approx(row["kid_fitted"])
    assert row["fitted_prior"]["codes"] == 24 and "ex-post density" in row["fitted_prior"]["text"]
    assert row["recon_mse"] > 0 and row["protocol"]["generator"].startswith("autoencoder decoder on N(0, I) codes")
    metrics = (run / "metrics.jsonl").read_text()
    assert '"recon"' in metrics and '"kl"' not in metrics


def test_an_autoencoder_resumes_exactly(tiny_overrides, tmp_path):
    overrides = [*tiny_overrides, "model.name=ae", "train.checkpoint_every=2"]
    straight = train(load_config(None, [*overrides, "train.steps=4", f"train.run_dir={tmp_path / 'straight'}"]))
    train(load_config(None, [*overrides, "train.steps=2"]))
    resumed = train(load_config(None, [*overrides, "train.steps=4"]))
    assert_same_run(straight["vae"].state_dict(), resumed["vae"].state_dict())


@pytest.mark.slow
def test_an_autoencoder_trains_on_2_processes_with_identical_weights(tiny_overrides, tmp_path):
    proc = launch(
        "accelerate",
        tmp_path,
        [*tiny_overrides, "train.steps=3", "train.sample_every=3"],
        [str(REPO / "tests" / "family_worker.py"), str(tmp_path), "ae"],
    )
    assert_ranks_agree(tmp_path, ["ae"], proc, samples_at=3)

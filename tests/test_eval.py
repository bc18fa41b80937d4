"""FID/KID maths, the Inception weights path, the reference cache, rank independence, eval and compare."""

import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from conftest import RANDOM_EVAL, TINY, launch
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance

from gendist.cli import main as cli_main
from gendist.config import load_config
from gendist.data.loader import read_in_order
from gendist.data.shards import Preprocess, write_shards
from gendist.data.synthetic import SyntheticFacesSource
from gendist.distributed import build_accelerator
from gendist.eval import inception as fid_inception
from gendist.eval.evaluator import Evaluator, quantised, read_rows, shown_keys
from gendist.eval.inception import FidInception, InceptionWeightsError
from gendist.eval.metrics import feature_statistics, frechet_distance, kernel_inception_distance
from gendist.training.loop import train


def random_spd(rng: np.random.Generator, dims: int) -> np.ndarray:
    a = rng.normal(size=(dims, dims))
    return a @ a.T / dims + 0.1 * np.eye(dims)


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    # commuting (diagonal) covariances: tr(sqrt(S1 S2)) = sum sqrt(v1 v2)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed, rel=1e-10)
    # N(0, I) vs N(0, 4I) in d dimensions: d (1 + 4 - 2*2) = d
    assert frechet_distance(np.zeros(8), np.eye(8), np.zeros(8), 4 * np.eye(8)) == pytest.approx(8.0, rel=1e-12)
    # general, non-commuting covariances: the same as pytorch-fid's scipy sqrtm path
    s1, s2 = random_spd(rng, 64), random_spd(rng, 64)
    expected = calculate_frechet_distance(mu1[:1].repeat(64), s1, mu2[:1].repeat(64), s2)
    assert frechet_distance(mu1[:1].repeat(64), s1, mu2[:1].repeat(64), s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(var1), mu1, np.diag(var1)) == pytest.approx(0.0, abs=1e-9)


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 8)), rng.normal(loc=0.5, size=(40, 8))
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
    m = 30  # one "subset" of all of x and 30 of y: recompute with the same draw
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=m, seed=3)
    draw = np.random.default_rng(3)
    xs, ys = x[draw.choice(30, m, replace=False)], y[draw.choice(40, m, replace=False)]
    kxx, kyy, kxy = k(xs, xs), k(ys, ys), k(xs, ys)
    expected = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    assert mean == pytest.approx(expected, rel=1e-5) and std == 0.0
    x, other = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, _ = kernel_inception_distance(x, other, subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(x, other + 0.5, subsets=20, subset_size=200)
    assert abs(same) < shifted / 10


def test_random_inception_fid_is_zero_on_itself_and_grows_with_a_shift(synthetic_shards):
    images, _, _ = read_in_order(str(synthetic_shards), "train", 32, limit=16)
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    net = FidInception("random")
    assert (
        FidInception("random")
        .net.state_dict()["blocks.0.0.conv.weight"]
        .equal(net.net.state_dict()["blocks.0.0.conv.weight"])
    )
    base = feature_statistics(net(batch).numpy())
    assert base[0].shape == (2048,)
    fids = [
        frechet_distance(*base, *feature_statistics(net((batch + shift).clamp(0, 1)).numpy()))
        for shift in (0.0, 0.1, 0.3)
    ]
    assert abs(fids[0]) < 1e-4 * fids[1]  # 16 samples: rank-deficient covariances, round-off only
    assert 0 < fids[1] < fids[2]


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(InceptionWeightsError) as err:
        FidInception("")
    text = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth") in text
    assert fid_inception.WEIGHTS_URL in text and "eval.inception_weights=" in text and "network unreachable" in text
    with pytest.raises(InceptionWeightsError, match="does not exist"):
        FidInception(str(tmp_path / "nowhere.pth"))
    small = tmp_path / "small.pth"
    small.write_bytes(b"x" * 1000)
    with pytest.raises(InceptionWeightsError, match="1,000 bytes.*truncated"):
        FidInception(str(small))
    foreign = tmp_path / "foreign.pth"
    with foreign.open("wb") as sink:
        sink.truncate(fid_inception.TENSOR_BYTES + 1000)  # right size, wrong bytes
    with pytest.raises(InceptionWeightsError, match="does not start with 6726825d"):
        FidInception(str(foreign))


def test_missing_weights_stop_training_at_start_with_exit_2(tiny_overrides, tmp_path, capsys):
    code = cli_main(["train", *tiny_overrides, "eval.every=1", f"eval.inception_weights={tmp_path / 'absent.pth'}"])
    assert code == 2
    assert "FID Inception weights not found" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def reference_of(shards: Path, stats: Path, *extra: str):
    cfg = load_config(None, [*TINY, f"data.shards={shards}", *RANDOM_EVAL, f"eval.stats_dir={stats}", *extra])
    evaluator = Evaluator(cfg, build_accelerator("no"), str(shards))
    return evaluator, evaluator.reference()


def test_reference_statistics_are_cached_and_invalidated_by_the_manifest(tmp_path):
    shards, stats = tmp_path / "shards", tmp_path / "stats"
    write_shards(
        SyntheticFacesSource(64), shards, Preprocess(32), images_per_sample=8, shard_size=40, show_progress=False
    )
    # built ahead with the command, then found by the evaluator
    assert cli_main(["fid-stats", *TINY, f"data.shards={shards}", *RANDOM_EVAL, f"eval.stats_dir={stats}"]) == 0
    first_eval, first = reference_of(shards, stats)
    assert first.path.is_file() and first.count == 24 and first_eval._inception is None
    hit_eval, hit = reference_of(shards, stats)
    assert hit_eval._inception is None, "a cache hit must not run Inception"
    assert hit.path == first.path and np.array_equal(hit.sigma, first.sigma) and np.array_equal(hit.attrs, first.attrs)
    # another split, another count: other statistics
    assert reference_of(shards, stats, "eval.split=val")[1].path != first.path
    assert reference_of(shards, stats, "eval.num_real=20")[1].count == 20
    # the same folder re-converted with another crop: the manifest changed, so must the statistics
    shutil.rmtree(shards)
    write_shards(
        SyntheticFacesSource(64),
        shards,
        Preprocess(32, crop_fraction=1.0),
        images_per_sample=8,
        shard_size=40,
        show_progress=False,
    )
    changed_eval, changed = reference_of(shards, stats)
    assert changed.path != first.path and changed_eval._inception is not None
    assert not np.allclose(changed.mu, first.mu)
    assert len(list(stats.glob("*.npz"))) == 4


def test_eval_command_names_what_is_missing(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path / "no-run")]) == 2
    assert f"config file not found: {tmp_path / 'no-run' / 'config.yaml'}" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model:\n  name: dcgan\n")
    assert cli_main(["eval", str(tmp_path / "run")]) == 2
    assert f"no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}" in capsys.readouterr().err


def eval_rows_of(run: Path) -> list[dict]:
    return [row for row in read_rows(run) if row["source"] == "gendist eval"]


@pytest.mark.slow
def test_fid_on_2_processes_equals_fid_in_1_and_the_training_eval(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    train(
        load_config(
            None,
            [
                *tiny_overrides,
                *RANDOM_EVAL,
                "train.steps=3",
                "eval.every=3",
                f"eval.stats_dir={tmp_path / 'stats-train'}",
            ],
        )
    )
    during_training = read_rows(run)[-1]
    assert cli_main(["eval", str(run), f"eval.stats_dir={tmp_path / 'stats-1'}"]) == 0
    # 2 ranks, each embedding its half of the reference and of the samples, with their own cache
    proc = launch(
        "accelerate", tmp_path, [str(run), f"eval.stats_dir={tmp_path / 'stats-2'}"], ["-m", "gendist.evaluate"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = eval_rows_of(run)
    assert two["protocol"] == one["protocol"] and two["step"] == one["step"] == 3
    for key in ("fid", "kid"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
        assert during_training[key] == pytest.approx(one[key], rel=1e-5), key
    assert one["fid"] > 0
    assert np.allclose(
        *(np.load(next((tmp_path / f"stats-{n}").glob("*.npz")))["mu"] for n in (1, 2)), rtol=1e-5, atol=1e-7
    )


def test_vae_eval_reports_held_out_reconstruction_error(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    train(
        load_config(
            None,
            [
                *tiny_overrides,
                *RANDOM_EVAL,
                "model.name=vae",
                "train.steps=2",
                "eval.every=2",
                f"eval.stats_dir={tmp_path / 'stats'}",
            ],
        )
    )
    row = read_rows(run)[-1]
    assert row["recon_split"] == "val" and row["recon_images"] == 16
    assert 0 < row["recon_mse"] < 1 and row["fid"] > 0
    assert row["protocol"]["generator"].startswith("VAE prior samples")


@pytest.mark.slow
def test_compare_reports_table_and_figures_for_real_runs(tiny_overrides, tmp_path):
    runs = {}
    for name, extra in {"dcgan": [], "cgan": ["model.attributes=[Male,Smiling]"], "vae": []}.items():
        runs[name] = tmp_path / name
        train(
            load_config(
                None,
                [
                    *tiny_overrides,
                    *RANDOM_EVAL,
                    f"model.name={name}",
                    *extra,
                    "train.steps=4",
                    "eval.every=2",
                    "train.sample_every=2",
                    "train.checkpoint_every=4",
                    f"eval.stats_dir={tmp_path / 'stats'}",
                    f"train.run_dir={runs[name]}",
                ],
            )
        )
    out = tmp_path / "report"
    assert cli_main(["compare", *map(str, runs.values()), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "(step 4)" in line]
    assert [row.split(" | ")[1] for row in rows] == ["dcgan", "cgan", "vae"]
    for name in runs:
        fid = read_rows(runs[name])[-1]["fid"]
        assert f"{fid:.2f} (step 4)" in report
    assert "random-init-seed0 (NOT comparable FID)" in report and "not comparable:**" not in report
    for figure in ("losses.png", "fid.png", "samples.png", "grids/dcgan.png", "grids/vae.png"):
        with Image.open(out / figure) as image:
            assert min(image.size) > 60, figure
        assert f"]({figure})" in report
    # a run evaluated under another protocol is flagged, not ranked with the others
    assert (
        cli_main(
            [
                "eval",
                str(runs["dcgan"]),
                "--num-samples",
                "20",
                f"eval.stats_dir={tmp_path / 'stats'}",
                *RANDOM_EVAL[:1],
            ]
        )
        == 0
    )
    cli_main(["compare", *map(str, runs.values()), "--out", str(out)])
    assert "not comparable:**" in (out / "report.md").read_text()


def test_pix2pix_is_scored_against_telea_and_mean_fill_on_fixed_held_out_masks(tiny_overrides, tmp_path):
    """Held-out images with fixed seeded masks: the model, Telea and the mean fill scored alike (PSNR,
    SSIM, L1 in the hole), FID/KID of the completions; the same numbers in training and gendist eval."""
    run, stats = tmp_path / "run", f"eval.stats_dir={tmp_path / 'stats'}"
    common = [*tiny_overrides, *RANDOM_EVAL, "model.name=pix2pix", stats]
    train(load_config(None, [*common, "train.steps=2", "eval.every=2"]))
    assert cli_main(["eval", str(run), stats]) == 0
    during, after = read_rows(run)
    for row in (during, after):
        assert row["inpainting_images"] == 16 and row["inpainting_split"] == "val" and "fid" not in row
        for method in ("model", "telea", "mean_fill"):
            assert 0 < row[f"psnr_{method}"] < 100 and -1 <= row[f"ssim_{method}"] <= 1
            assert 0 <= row[f"l1_hole_{method}"] <= 1
        assert np.isfinite(row["completed_fid"]) and row["protocol"]["generated"] == 0
    for key in ("psnr_telea", "ssim_telea", "l1_hole_telea", "psnr_mean_fill", "l1_hole_mean_fill"):
        assert during[key] == after[key]  # the same images and masks, whatever the process
    assert during["psnr_model"] == pytest.approx(after["psnr_model"], rel=1e-6)
    assert during["psnr_telea"] > during["psnr_mean_fill"]  # Telea propagates the surroundings inward


A, B = "not_Male", "Male"  # the domains of synthetic_shards (gendist shards domains ... --attribute Male)
IDENTITY = {(A, B): lambda x: x, (B, A): lambda x: x}
# not an identity either way, and not each other's inverse: negation there, darkening back
CHANGED = {(A, B): lambda x: -x, (B, A): lambda x: x * 0.5 - 0.5}


@pytest.fixture(scope="module")
def translation_stats(tmp_path_factory) -> Path:
    """One reference cache for the translation tests: the target domains' statistics are built once."""
    return tmp_path_factory.mktemp("translation") / "stats"


def translation_evaluator(shards: Path, stats: Path, *extra: str) -> Evaluator:
    cfg = load_config(None, [*TINY, f"data.shards={shards}", *RANDOM_EVAL, f"eval.stats_dir={stats}", *extra])
    return Evaluator(cfg, build_accelerator("no"), str(shards))


def test_translation_is_scored_against_the_target_domain_next_to_the_untranslated_sources(
    synthetic_shards, translation_stats
):
    evaluator = translation_evaluator(synthetic_shards, translation_stats)
    same = evaluator.evaluate(None, 3, "identity", translate=IDENTITY)
    held_out = {
        domain: read_in_order(str(synthetic_shards), f"val.{domain}", 32, limit=16)[0] / 255 for domain in (A, B)
    }
    assert same["translation_images"] == {f"{A}_to_{B}": len(held_out[A]), f"{B}_to_{A}": len(held_out[B])}
    assert same["translation_splits"] == {
        f"{A}_to_{B}": {"source": f"val.{A}", "reference": f"train.{B}"},
        f"{B}_to_{A}": {"source": f"val.{B}", "reference": f"train.{A}"},
    }
    assert "translation_skipped" not in same and "fid" not in same and same["step"] == 3
    for src, dst in IDENTITY:
        name = f"{src}_to_{dst}"
        # a translator that changes nothing scores its baseline exactly, and comes back unchanged
        for metric in ("fid", "kid", "kid_std"):
            assert same[f"{metric}_{name}"] == same[f"{metric}_{name}_identity"], metric
        assert same[f"fid_{name}"] > 0 and same[f"cycle_l1_{src}"] == 0
    # the target domains' statistics only: eval.split's (train) is not built for a translation family
    built = sorted(path.name.split("-")[1] for path in translation_stats.glob("*.npz"))
    assert built == [f"train.{B}", f"train.{A}"]
    protocol = same["protocol"]
    assert protocol["reference_split"] == f"train.{B}+train.{A}" and protocol["reference_images"] == 48
    assert protocol["generated"] == len(held_out[A]) + len(held_out[B]) and protocol["generator"] == "identity"
    assert protocol["kid"]["subset_size"] == min(12, len(held_out[A]), len(held_out[B]))

    changed = evaluator.evaluate(None, 3, "changed", translate=CHANGED)
    for src, dst in CHANGED:
        name = f"{src}_to_{dst}"
        assert changed[f"fid_{name}_identity"] == same[f"fid_{name}_identity"]  # the same baseline
        assert changed[f"fid_{name}"] > changed[f"fid_{name}_identity"]
        x = torch.from_numpy(held_out[src]).permute(0, 3, 1, 2).float()
        there = quantised(CHANGED[(src, dst)](x * 2 - 1))
        back = quantised(CHANGED[(dst, src)](there * 2 - 1))
        assert changed[f"cycle_l1_{src}"] == pytest.approx((back - x).abs().mean().item(), rel=1e-6)
        assert changed[f"cycle_l1_{src}"] > 0.1
    shown = [(f"fid_{src}_to_{dst}", f"fid_{src}_to_{dst}_identity", f"cycle_l1_{src}") for src, dst in CHANGED]
    assert shown_keys(changed) == [key for keys in shown for key in keys]


def test_translation_without_held_out_domains_says_why_in_the_row(synthetic_shards, translation_stats):
    evaluator = translation_evaluator(synthetic_shards, translation_stats, "eval.recon_split=test")
    row = evaluator.evaluate(None, 1, "identity", translate=IDENTITY)
    assert set(row["translation_skipped"]) == {f"{A}_to_{B}", f"{B}_to_{A}"}
    assert f"has no 'test.{A}' shards" in row["translation_skipped"][f"{A}_to_{B}"]
    assert row["translation_images"] == {} and not shown_keys(row) and row["protocol"]["generated"] == 0
    with pytest.raises(ValueError, match="no 'train.Smiling' split for the FID reference"):
        evaluator.evaluate(None, 1, "identity", translate={(A, "Smiling"): lambda x: x})


@pytest.mark.slow
def test_cyclegan_eval_in_training_on_1_and_on_2_processes_agree(synthetic_shards, tmp_path, capsys):
    run, stats = tmp_path / "run", f"eval.stats_dir={tmp_path / 'stats'}"
    train(
        load_config(
            None,
            [
                *TINY,
                f"data.shards={synthetic_shards}",
                f"train.run_dir={run}",
                *RANDOM_EVAL,
                stats,
                "model.name=cyclegan",
                f"cyclegan.domains=[{A},{B}]",
                "cyclegan.blocks=1",
                "train.steps=2",
                "eval.every=2",
            ],
        )
    )
    assert f"eval step 2: fid_{A}_to_{B} " in capsys.readouterr().out
    assert cli_main(["eval", str(run), stats]) == 0
    proc = launch("accelerate", tmp_path, [str(run), stats], ["-m", "gendist.evaluate"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    during, (one, two) = read_rows(run)[0], eval_rows_of(run)
    assert during["source"] == "training" and during["protocol"] == one["protocol"] == two["protocol"]
    scores = [key for key in one if key.startswith(("fid_", "kid_", "cycle_l1_"))]
    assert len(scores) == 2 * 6 + 2
    for key in scores:
        assert during[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key
    assert 0 < one[f"cycle_l1_{A}"] < 1 and one[f"fid_{A}_to_{B}"] != one[f"fid_{A}_to_{B}_identity"]

"""The face judge (eval.classifier): a trained classifier run loaded with its preprocessing checked,
precision/recall, the Fréchet distance in its features, and what it says of conditional samples and
translations, each checked against a case whose answer is known."""

import json

import numpy as np
import pytest
import torch
from conftest import RANDOM_EVAL, TINY, launch

from gendist.cli import main as cli_main
from gendist.config import ConfigError, load_config
from gendist.data.loader import read_in_order
from gendist.data.shards import read_manifest
from gendist.distributed import build_accelerator
from gendist.eval.evaluator import Evaluator, read_rows, shown_keys
from gendist.eval.judge import load_judge
from gendist.eval.precision_recall import precision_recall
from gendist.training.loop import train

A, B = "not_Male", "Male"


@pytest.fixture(scope="module")
def judge_run(synthetic_shards, tmp_path_factory):
    """A classifier trained for 3 steps on the synthetic faces: a real run folder, barely trained."""
    run = tmp_path_factory.mktemp("judge") / "classifier"
    train(
        load_config(
            None,
            [
                *TINY,
                "model.name=classifier",
                f"data.shards={synthetic_shards}",
                f"train.run_dir={run}",
                "train.steps=3",
            ],
        )
    )
    return run


def judged_evaluator(shards, judge_run, tmp_path, *extra: str) -> Evaluator:
    cfg = load_config(
        None,
        [
            *TINY,
            *RANDOM_EVAL,
            f"data.shards={shards}",
            f"eval.classifier={judge_run}",
            f"eval.stats_dir={tmp_path}",
            *extra,
        ],
    )
    return Evaluator(cfg, build_accelerator("no"), str(shards))


def reference_images_by_noise(evaluator: Evaluator, strength: float = 0.0):
    """A 'generator' that answers sample i (found by its noise row, drawn as the evaluator draws it) with
    reference image i, the one whose labels sample i is asked to have, plus Gaussian noise."""
    ev, z_dim = evaluator.cfg.eval, evaluator.cfg.model.z_dim
    images, _, _ = read_in_order(evaluator.shard_dir, ev.split, 32, ev.num_real)
    noise = torch.randn(ev.num_samples, z_dim, generator=torch.Generator().manual_seed(ev.seed))
    index = {row.numpy().tobytes(): i % len(images) for i, row in enumerate(noise)}
    real = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    def generate(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        chosen = real[[index[row.numpy().tobytes()] for row in z.cpu()]]
        return chosen + strength * torch.randn(chosen.shape, generator=torch.Generator().manual_seed(1))

    return generate


def test_precision_and_recall_of_known_sets():
    accelerator = build_accelerator("no")
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    assert precision_recall(accelerator, real, real.copy()) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(accelerator, real, real + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    # mode collapse: samples around one real point are all realistic and cover almost nothing
    collapsed = precision_recall(accelerator, real, real[:1] + rng.normal(scale=1e-3, size=(200, 8)))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] <= 0.05
    with pytest.raises(ValueError, match="more than 3 images"):
        precision_recall(accelerator, real[:3], real[:3])


def test_the_judge_loads_a_classifier_run_and_refuses_other_data(judge_run, synthetic_shards, tmp_path):
    preprocessing = read_manifest(synthetic_shards)["preprocessing"]
    judge = load_judge(judge_run, torch.device("cpu"), preprocessing)
    recorded = json.loads((judge_run / "data.json").read_text())
    assert recorded["preprocessing"] == preprocessing and judge.attributes == recorded["attribute_names"]
    assert judge.source["step"] == 3 and judge.source["network"] == "classifier EMA"
    logits, features = judge(torch.rand(5, 3, 32, 32))
    assert logits.shape == (5, len(judge.attributes)) and features.shape == (5, judge.network.feature_dim)
    with pytest.raises(ConfigError, match=r"crop_fraction: .* there, 0\.5 here"):
        load_judge(judge_run, torch.device("cpu"), {**preprocessing, "crop_fraction": 0.5})
    (judge_run / "data.json").rename(tmp_path / "data.json")
    try:
        with pytest.raises(ConfigError, match="has no data.json"):
            load_judge(judge_run, torch.device("cpu"), preprocessing)
    finally:
        (tmp_path / "data.json").rename(judge_run / "data.json")
    other = tmp_path / "dcgan"
    train(load_config(None, [*TINY, f"data.shards={synthetic_shards}", f"train.run_dir={other}", "train.steps=1"]))
    with pytest.raises(ConfigError, match="is a dcgan run; it must be a classifier run"):
        load_judge(other, torch.device("cpu"), preprocessing)


def test_frechet_distance_in_face_features_is_0_for_the_same_images_and_grows_with_noise(
    judge_run, synthetic_shards, tmp_path
):
    """The 'generator' hands back the reference images: FD_face 0 and precision = recall = 1; Gaussian
    noise of growing strength moves it away."""
    evaluator = judged_evaluator(synthetic_shards, judge_run, tmp_path)
    rows = [
        evaluator.evaluate(reference_images_by_noise(evaluator, s), 1, f"real + {s} noise") for s in (0.0, 0.2, 0.6)
    ]
    assert rows[0]["fd_face"] == pytest.approx(0.0, abs=1e-6) and rows[0]["fid"] == pytest.approx(0.0, abs=1e-3)
    assert rows[0]["precision_face"] == rows[0]["recall_face"] == rows[0]["precision"] == rows[0]["recall"] == 1.0
    assert 1e-3 < rows[1]["fd_face"] < rows[2]["fd_face"]
    assert rows[0]["judge"]["run"] == str(judge_run) and "NOT comparable with FID" in rows[0]["judge_protocol"]
    assert "fd_face" in shown_keys(rows[0]) and "precision" in shown_keys(rows[0])
    assert rows[0]["precision_recall_protocol"]["k"] == 3


def test_conditional_samples_are_judged_against_the_labels_they_were_made_with(judge_run, synthetic_shards, tmp_path):
    """A generator that answers each label row with the real image of those labels scores what the judge
    scores on the real images; one that ignores its labels scores exactly its shuffled baseline."""
    evaluator = judged_evaluator(synthetic_shards, judge_run, tmp_path)
    images, _, _ = read_in_order(str(synthetic_shards), "train", 32, 1)
    faithful = reference_images_by_noise(evaluator)
    conditioned = ["Male", "Eyeglasses", "Smiling", "Not_In_The_List"]

    def ignoring(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(images[:1]).permute(0, 3, 1, 2).float().expand(len(z), -1, -1, -1) / 127.5 - 1

    good = evaluator.evaluate(faithful, 1, "faithful", conditioned_on=conditioned)
    assert good["cond_attr_unjudged"] == ["Not_In_The_List"]
    assert set(good["cond_attr_accuracy"]) == {"Male", "Eyeglasses", "Smiling"}
    assert good["cond_attr_mean_accuracy"] == pytest.approx(good["cond_attr_mean_accuracy_real"], abs=1e-12)
    bad = evaluator.evaluate(ignoring, 1, "ignoring", conditioned_on=conditioned)
    assert bad["cond_attr_mean_accuracy"] == pytest.approx(bad["cond_attr_mean_accuracy_shuffled"], abs=1e-12)
    assert "cond_attr_mean_accuracy" not in evaluator.evaluate(faithful, 1, "unconditional")


def test_translations_are_judged_by_flip_rate_and_kept_attributes(judge_run, synthetic_shards, tmp_path):
    """Identity 'translates' exactly as its baseline and keeps every attribute; a translator that
    answers with real target-domain images flips as often as the judge calls those images the target."""
    evaluator = judged_evaluator(synthetic_shards, judge_run, tmp_path)
    identity = {(A, B): lambda x: x, (B, A): lambda x: x}
    row = evaluator.evaluate(None, 1, "identity", translate=identity)
    for src, dst in ((A, B), (B, A)):
        assert row[f"flip_rate_{src}_to_{dst}"] == row[f"flip_rate_{src}_to_{dst}_identity"]
        assert row[f"kept_{src}_to_{dst}"] == 1.0
    assert f"flip_rate_{A}_to_{B}" in shown_keys(row) and row["judge"]["run"] == str(judge_run)
    held_out = {d: read_in_order(str(synthetic_shards), f"val.{d}", 32, 16)[0] for d in (A, B)}

    def into(src: str, dst: str):
        """Source image j (found by its pixels) -> image j (cycled) of the held-out target domain."""
        index = {image.tobytes(): j for j, image in enumerate(held_out[src])}
        pool = torch.from_numpy(held_out[dst]).permute(0, 3, 1, 2).float() / 127.5 - 1

        def translate(x: torch.Tensor) -> torch.Tensor:
            pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            return pool[[index[p.tobytes()] % len(pool) for p in pixels]]

        return translate

    swapped = evaluator.evaluate(None, 1, "swap", translate={(A, B): into(A, B), (B, A): into(B, A)})
    chosen = (
        torch.from_numpy(held_out[B]).permute(0, 3, 1, 2).float()[torch.arange(len(held_out[A])) % len(held_out[B])]
    )
    logits, _ = evaluator.judge(chosen / 255)
    male = evaluator.judge.attributes.index("Male")
    assert swapped[f"flip_rate_{A}_to_{B}"] == pytest.approx(float((logits[:, male] > 0).float().mean()), abs=1e-6)


@pytest.mark.slow
def test_judged_scores_on_2_processes_equal_those_on_1(judge_run, synthetic_shards, tmp_path):
    """A conditional GAN scored by `gendist eval` with the judge on 1 and on 2 real processes."""
    run, stats = tmp_path / "cgan", f"eval.stats_dir={tmp_path / 'stats'}"
    overrides = [*TINY, *RANDOM_EVAL, "model.name=cgan", "model.attributes=[Male,Smiling]", "train.steps=2"]
    train(load_config(None, [*overrides, f"data.shards={synthetic_shards}", f"train.run_dir={run}"]))
    judged = [stats, f"eval.classifier={judge_run}"]
    assert cli_main(["eval", str(run), *judged]) == 0
    proc = launch("accelerate", tmp_path, [str(run), *judged], ["-m", "gendist.evaluate"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (row for row in read_rows(run) if row["source"] == "gendist eval")
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for key in ("fid", "precision", "recall", "fd_face", "precision_face", "recall_face", "cond_attr_mean_accuracy"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key
    assert one["cond_attr_accuracy"].keys() == {"Male", "Smiling"}
    # gendist compare shows the judged scores beside FID, with their baselines and the judge named
    out = tmp_path / "report"
    assert cli_main(["compare", str(run), str(judge_run), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Beside FID" in report and f"`{judge_run}` (classifier EMA, step 3)" in report
    latest = read_rows(run)[-1]
    cells = f"{latest['precision']:.3f} / {latest['recall']:.3f} | {latest['fd_face']:.4g} |"
    assert cells in report and f"{latest['cond_attr_mean_accuracy_real']:.3f}" in report
    assert "classifier 0.18M" in report  # its parameters: the data's 11 attributes, from its data.json

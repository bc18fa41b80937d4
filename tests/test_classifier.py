"""The attribute classifier family: its ResNet, exact resume, its grids, its held-out scores beside the
majority baseline (counted by hand here), a perfect and an inverted classifier, learning the synthetic
faces' drawn attributes, its refusals; 2 ranks agree with 1 on the scores."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import RANDOM_EVAL, REPO, TINY, assert_same_weights, launch, stop_requested_at

from gendist.cli import main as cli_main
from gendist.config import ConfigError, load_config
from gendist.data.loader import read_in_order
from gendist.data.synthetic import ATTRIBUTES
from gendist.distributed import build_accelerator
from gendist.eval.evaluator import Evaluator, read_rows, shown_keys
from gendist.families.classifier import cosine
from gendist.models.classifier import AttributeClassifier
from gendist.progress import read_jsonl
from gendist.sweep import load_sweep
from gendist.training.loop import train

CLASSIFIER = ["model.name=classifier"]
MEANS = [
    "attr_mean_accuracy",
    "attr_mean_accuracy_majority",
    "attr_mean_balanced_accuracy",
    "attr_mean_balanced_accuracy_majority",
]


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    """One FID reference cache for the module (training with eval.every builds one at start)."""
    return tmp_path_factory.mktemp("classifier") / "stats"


def test_the_resnet_keeps_its_layers_named_and_its_sizes():
    net = AttributeClassifier(40)  # ResNet-18's widths and depth
    assert sum(p.numel() for p in net.parameters()) == 11_189_352
    x = torch.randn(2, 3, 64, 64)
    maps = net.feature_maps(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert net(x).shape == (2, 40) and net.features(x).shape == (2, 512) == (2, net.feature_dim)
    assert len(net.stages) == 4
    small = AttributeClassifier(11, width=8, image_size=32, blocks=1, norm="group").train()
    images = torch.randn(3, 3, 32, 32)
    # group norm: an image's logits do not depend on the rest of its batch, even in training mode
    torch.testing.assert_close(small(images)[:1], small(images[:1]))
    with pytest.raises(ValueError, match="power of two"):
        AttributeClassifier(4, image_size=48)


def test_the_cosine_schedule_starts_at_the_rate_and_ends_near_zero():
    factor = cosine(10)
    assert factor(1) == 1.0 and factor(6) == pytest.approx(0.5) and 0 < factor(10) < 0.03


def test_stopped_and_resumed_equals_straight_with_grids(tiny_overrides, tmp_path):
    """8 steps straight vs stopped at 4 (a stop request, as SIGTERM gives: the cosine rate depends on
    train.steps, so the run is not shortened) and resumed: bit-identical classifier and EMA, the same
    train state (an epoch of 7 batches: the resume crosses it, two loader workers); loss and accuracy
    logged; the grid image and its predictions beside it."""
    common = [
        *tiny_overrides,
        *CLASSIFIER,
        "data.batch_size=32",
        "data.num_workers=2",
        "train.steps=8",
        "train.sample_every=8",
        "train.log_every=1",
    ]
    straight = train(load_config(None, [*common, f"train.run_dir={tmp_path / 'a'}"]))
    with stop_requested_at(4):
        assert train(load_config(None, [*common, f"train.run_dir={tmp_path / 'b'}"])).state.step == 4
    resumed = train(load_config(None, [*common, f"train.run_dir={tmp_path / 'b'}"]))
    assert resumed.state.step == 8 and resumed.state.position().epoch == 1
    assert dataclasses.replace(straight.state, train_seconds=0.0) == dataclasses.replace(
        resumed.state, train_seconds=0.0
    )
    assert straight.networks.keys() == {"classifier", "classifier_ema"}
    for name in straight.networks:
        assert_same_weights(straight[name].state_dict(), resumed[name].state_dict())

    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert all(row["loss"] > 0 and 0 <= row["accuracy"] <= 1 for row in rows)
    samples = tmp_path / "a" / "samples"
    assert (samples / "step_0000008.png").is_file()
    grid = json.loads((samples / "step_0000008.json").read_text())
    assert len(grid["images"]) == 16 and 0 <= grid["accuracy"] <= 1  # train.num_samples=16
    first_image = grid["images"][0]
    assert set(first_image) == {"image", "row", "column", "predicted", "true", "wrong"}
    assert set(first_image["true"]) <= set(ATTRIBUTES)


def classifier_evaluator(shards, *extra: str) -> Evaluator:
    cfg = load_config(None, [*TINY, *RANDOM_EVAL, *CLASSIFIER, f"data.shards={shards}", *extra])
    return Evaluator(cfg, build_accelerator("no"), str(shards))


def labels_as_logits(shards, split: str):
    """A fake classifier that looks each image up among the split's and answers its true labels (+-1)."""
    images, attrs, _ = read_in_order(str(shards), split, 32)
    known = {image.tobytes(): row for image, row in zip(images, attrs)}

    def classify(x: torch.Tensor) -> torch.Tensor:
        pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return torch.tensor(np.stack([known[p.tobytes()] for p in pixels]), dtype=torch.float32)

    return classify


def test_scores_against_labels_and_the_majority_baseline_by_hand(synthetic_shards, tmp_path):
    evaluator = classifier_evaluator(synthetic_shards, f"eval.stats_dir={tmp_path / 'stats'}")
    labels = labels_as_logits(synthetic_shards, "val")
    perfect = evaluator.evaluate(None, 5, "labels", classify=labels, classify_attributes=ATTRIBUTES)
    assert perfect["attr_images"] == 16 and perfect["attr_split"] == "val" and perfect["step"] == 5
    assert perfect["attr_mean_accuracy"] == 1.0 and set(perfect["attr_accuracy"].values()) == {1.0}
    assert perfect["attr_mean_balanced_accuracy"] == 1.0

    # the majority baseline, counted here from the train split's labels and the first 16 val images
    train_present = read_in_order(str(synthetic_shards), "train", 32)[1] > 0
    majority = train_present.mean(axis=0) > 0.5
    truth = read_in_order(str(synthetic_shards), "val", 32, limit=16)[1] > 0
    by_hand = (truth == majority).mean(axis=0)
    assert perfect["attr_accuracy_majority"] == pytest.approx(dict(zip(ATTRIBUTES, by_hand)))
    assert perfect["attr_mean_accuracy_majority"] == pytest.approx(by_hand.mean())
    assert perfect["attr_train_positive_rate"] == pytest.approx(dict(zip(ATTRIBUTES, train_present.mean(axis=0))))
    assert perfect["attr_majority_images"] == len(train_present) and perfect["attr_majority_split"] == "train"
    # balanced accuracy needs both classes among the held-out images; a constant scores 0.5 where defined
    one_class = [name for name, column in zip(ATTRIBUTES, truth.T) if column.all() or not column.any()]
    assert one_class and perfect.get("attr_balanced_undefined") == one_class  # Eyeglasses: none in 16
    assert all(perfect["attr_balanced_accuracy"][name] is None for name in one_class)
    assert perfect["attr_mean_balanced_accuracy_majority"] == 0.5
    assert shown_keys(perfect) == MEANS
    protocol = perfect["protocol"]
    assert protocol["generated"] == 0 and protocol["inception"] == "not used" and protocol["reference_images"] == 16
    assert evaluator._inception is None and not (tmp_path / "stats").exists()  # no Inception, no FID reference

    inverted = evaluator.evaluate(None, 5, "inverted", classify=lambda x: -labels(x), classify_attributes=ATTRIBUTES)
    assert inverted["attr_mean_accuracy"] == 0.0 and inverted["attr_mean_balanced_accuracy"] == 0.0
    assert inverted["attr_accuracy_majority"] == perfect["attr_accuracy_majority"]

    # a subset of the attributes, in another order: columns follow the names given
    names = ["Eyeglasses", "Male"]
    subset = evaluator.evaluate(None, 5, "subset", classify=lambda x: labels(x)[:, [2, 0]], classify_attributes=names)
    assert subset["attr_accuracy"] == {"Eyeglasses": 1.0, "Male": 1.0}
    assert subset["attr_accuracy_majority"] == {name: perfect["attr_accuracy_majority"][name] for name in names}
    with pytest.raises(ValueError, match=r"logits of \(8, 11\)"):
        evaluator.evaluate(None, 5, "wrong", classify=labels, classify_attributes=names)


def test_a_missing_held_out_split_says_why_in_the_row(synthetic_shards):
    evaluator = classifier_evaluator(synthetic_shards, "eval.recon_split=test")
    row = evaluator.evaluate(None, 1, "c", classify=lambda x: x[:, 0, 0, :1], classify_attributes=["Male"])
    assert "has no 'test' shards" in row["attr_skipped"] and not shown_keys(row)
    assert row["protocol"]["reference_images"] == 0


def test_training_beats_the_majority_baseline_on_the_drawn_attributes(tiny_overrides, tmp_path, stats_dir):
    """150 steps (20 epochs of the 231 train faces, ~5 s): hair colour, bangs and sex are drawn into the
    images, so the held-out (all 25 val faces) mean accuracy clears the majority's and the balanced
    accuracy clears 0.5 (measured over train.seed 0-3: 0.82-0.88 vs 0.73; 0.74-0.80). Per attribute it
    is noisier: glasses (37 of the 231 train faces) are not always learnt, so none is asserted."""
    run = tmp_path / "run"
    overrides = [
        *tiny_overrides,
        *RANDOM_EVAL,
        *CLASSIFIER,
        "data.batch_size=32",
        "optim.lr_g=3e-3",
        "optim.betas=[0.9,0.999]",
        "train.steps=150",
        "train.log_every=50",
        "eval.every=150",
        "eval.recon_images=0",
        f"eval.stats_dir={stats_dir}",
    ]
    train(load_config(None, overrides))
    assert cli_main(["eval", str(run), f"eval.stats_dir={stats_dir}"]) == 0
    during, after = read_rows(run)
    assert during["source"] == "training" and after["source"] == "gendist eval"
    assert during["protocol"]["generator"] == "classifier EMA" and during["attr_images"] == 25
    for key in ("attr_accuracy", "attr_accuracy_majority", "attr_balanced_accuracy", *MEANS):
        assert during[key] == after[key], key  # the checkpoint's EMA scores as the trained one did
    assert during["attr_mean_accuracy"] > during["attr_mean_accuracy_majority"] + 0.05
    assert during["attr_mean_balanced_accuracy"] > 0.65


@pytest.mark.parametrize(
    "overrides, refusal",
    [
        (["classifier.blocks=0"], "classifier.blocks"),
        (["classifier.label_smoothing=1.0"], "label_smoothing"),
        (["classifier.attributes=[Male,Smiling,Male]"], "names Male more than once"),
        (["classifier.norm=instance"], "must be one of batch, group"),
    ],
)
def test_settings_that_cannot_train_are_refused(overrides, refusal):
    with pytest.raises(ConfigError, match=refusal):
        load_config(None, [*CLASSIFIER, *overrides])


def test_attributes_the_data_lacks_are_refused_naming_the_ones_it_has(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, *CLASSIFIER, "classifier.attributes=[Male,Wearing_Hat]"])
    with pytest.raises(ConfigError, match=r"\['Wearing_Hat'\] are not in this dataset; it has: Male, Smiling"):
        train(cfg)


def test_sweeps_refuse_the_classifier_with_the_reason(tmp_path, synthetic_shards):
    base = {
        "data": {"shards": str(synthetic_shards)},
        "model": {"name": "classifier", "image_size": 32},
        "eval": {"every": 2},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": "base.yaml", "space": {"optim.lr_g": {"choice": [1e-3]}}, "sweep": {"name": "s"}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError, match="classifier is scored by its held-out attribute accuracy"):
        load_sweep(tmp_path / "sweep.yaml")


@pytest.mark.slow
def test_scores_on_2_processes_equal_gendist_eval_in_one(tiny_overrides, tmp_path):
    """The held-out images split over 2 ranks (16 = 8 + 8) and the counts summed: the training row of
    a 2-rank run equals `gendist eval` of its last checkpoint in one process."""
    stats = f"eval.stats_dir={tmp_path / 'stats'}"
    extra = [*RANDOM_EVAL, "train.steps=3", "eval.every=3", stats]
    worker = [str(REPO / "tests" / "family_worker.py"), str(tmp_path), "classifier"]
    proc = launch("accelerate", tmp_path, [*tiny_overrides, *extra], worker)
    run = tmp_path / "classifier"
    assert (tmp_path / "classifier-rank1.pt").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert cli_main(["eval", str(run), stats]) == 0
    during, after = read_rows(run)
    assert during["source"] == "training" and during["attr_images"] == 16
    for key in ("attr_accuracy", "attr_balanced_accuracy", "attr_accuracy_majority", *MEANS):
        assert during[key] == after[key], key

"""gendist augment: a cGAN's and a CycleGAN's faces exported as a split, read back by training, on 1 and 2 ranks."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, launch

from gendist.checkpoint import latest_checkpoint
from gendist.cli import main as cli_main
from gendist.config import load_config
from gendist.data.loader import ShardStream, StreamSpec, read_attributes, read_in_order
from gendist.data.shards import read_manifest, verify_shards
from gendist.distributed import build_accelerator
from gendist.eval.evaluator import Evaluator
from gendist.trained import load_sampling
from gendist.training.loop import train

A, B = "not_Male", "Male"  # the domains of synthetic_shards
CONDITIONED = ["Male", "Eyeglasses"]
pytestmark = pytest.mark.usefixtures("one_thread")


def trained(shards: Path, run: Path, *extra: str) -> Path:
    common = [*TINY, f"data.shards={shards}", f"train.run_dir={run}", "train.steps=2", "train.checkpoint_every=2"]
    train(load_config(None, [*common, *extra]))
    return run


@pytest.fixture(scope="module")
def cgan_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cgan") / "run"
    return trained(synthetic_shards, run, "model.name=cgan", f"model.attributes=[{','.join(CONDITIONED)}]")


@pytest.fixture(scope="module")
def cyclegan_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cyclegan") / "run"
    return trained(synthetic_shards, run, "model.name=cyclegan", f"cyclegan.domains=[{A},{B}]", "cyclegan.blocks=1")


@pytest.fixture
def own_shards(synthetic_shards, tmp_path) -> Path:
    """A copy of the run's shard set to add splits to (synthetic_shards is shared by the session)."""
    return Path(shutil.copytree(synthetic_shards, tmp_path / "shards"))


def augment(run: Path, out: Path, split: str, *options: str) -> int:
    return cli_main(["augment", str(run), "--out", str(out), "--split", split, *options])


def sampling_of(run: Path, names: list[str]):
    return load_sampling(load_config(run / "config.yaml"), latest_checkpoint(run), build_accelerator("no"), names)[0]


def levels(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC as a saved PNG holds it."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def expected_draws(rows: np.ndarray, seed: int, count: int, z_dim: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The documented draws: image i's label row, then its noise, from SeedSequence(seed, spawn_key=(i,))."""
    labels, noise = [], []
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        labels.append(rows[rng.integers(len(rows))])
        noise.append(rng.standard_normal(z_dim, dtype=np.float32))
    return np.stack(labels), np.stack(noise)


def test_cgan_export_is_the_generators_faces_and_training_reads_it(cgan_run, synthetic_shards, own_shards, tmp_path):
    options = ["--images", "40", "--batch-size", "16", "--shard-size", "32", "--seed", "3"]
    assert augment(cgan_run, own_shards, "generated", *options) == 0
    manifest = read_manifest(own_shards)
    assert manifest["splits"]["generated"]["count"] == 40 and len(manifest["splits"]["generated"]["shards"]) == 2
    record = manifest["generated"]["generated"]
    assert record["run"] == str(cgan_run.resolve()) and record["step"] == 2 and record["family"] == "cgan"
    assert record["source"] == "labels data (train)" and record["images"] == 40 and record["seed"] == 3
    assert record["checkpoint"].endswith("step_0000002") and record["conditioned_on"] == CONDITIONED
    assert verify_shards(own_shards).ok
    images, attrs, errors = read_in_order(str(own_shards), "generated", 32)
    assert errors == 0 and images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    # each face is the generator's at the documented draws, quantised as a PNG
    names = manifest["attribute_names"]
    labels, noise = expected_draws(read_attributes(str(synthetic_shards), "train"), 3, 40)
    assert np.array_equal(attrs, labels)
    with torch.no_grad():
        faces = sampling_of(cgan_run, names).generate(torch.from_numpy(noise), torch.from_numpy(labels).float())
    assert np.array_equal(images, levels(faces))
    # the union is one stream of both splits; `gendist train` reads it, and the new split alone
    stream = ShardStream(StreamSpec(str(own_shards), "train+generated", 8, 32, shuffle_pool=64))
    assert stream.num_images == manifest["splits"]["train"]["count"] + 40
    common = [*TINY, f"data.shards={own_shards}", "train.steps=2", "train.checkpoint_every=2"]
    classifier = tmp_path / "classifier"
    union = ["model.name=classifier", "data.split=train+generated", f"train.run_dir={classifier}"]
    assert cli_main(["train", *common, *union]) == 0
    assert latest_checkpoint(classifier).name == "step_0000002"
    # its majority baseline counts the labels of both splits
    union_rows = read_attributes(str(own_shards), "train+generated")
    assert len(union_rows) == stream.num_images
    evaluator = Evaluator(load_config(classifier / "config.yaml"), build_accelerator("no"), str(own_shards))
    positives, counted = evaluator.training_positives()
    assert counted == len(union_rows) and np.array_equal(positives, (union_rows > 0).sum(axis=0))
    dcgan = tmp_path / "dcgan"
    assert cli_main(["train", *common, "data.split=generated", f"train.run_dir={dcgan}"]) == 0
    assert latest_checkpoint(dcgan).name == "step_0000002"
    # a classifier run exports nothing
    assert augment(classifier, tmp_path / "out", "g", "--images", "4") == 2


def test_labels_are_the_data_rows_with_the_set_attributes(cgan_run, synthetic_shards, tmp_path):
    out = tmp_path / "out"
    assert augment(cgan_run, out, "glasses", "--images", "64", "--labels", "Eyeglasses=1,Male=-1") == 0
    assert augment(cgan_run, out, "val_rows", "--images", "64", "--labels-split", "val") == 0
    assert augment(cgan_run, out, "reseeded", "--images", "64", "--seed", "1") == 0
    manifest = read_manifest(out)
    names = manifest["attribute_names"]
    glasses, male = names.index("Eyeglasses"), names.index("Male")
    set_rows = read_attributes(str(out), "glasses")
    drawn, _ = expected_draws(read_attributes(str(synthetic_shards), "train"), 0, 64)
    assert (set_rows[:, glasses] == 1).all() and (set_rows[:, male] == -1).all()
    others = [c for c in range(len(names)) if c not in (glasses, male)]
    assert np.array_equal(set_rows[:, others], drawn[:, others])  # the rest as drawn
    assert (drawn[:, glasses] == -1).any()  # so setting it changed rows
    assert manifest["generated"]["glasses"]["source"] == "labels data (train), Eyeglasses=+1, Male=-1"
    val_rows = read_attributes(str(synthetic_shards), "val")
    assert np.array_equal(read_attributes(str(out), "val_rows"), expected_draws(val_rows, 0, 64)[0])
    reseeded, first = read_in_order(str(out), "reseeded", 32)[0], read_in_order(str(out), "val_rows", 32)[0]
    assert not np.array_equal(reseeded, first)
    # a new shard set takes the run's shards' preprocessing and layout
    source = read_manifest(synthetic_shards)
    for key in ("preprocessing", "attribute_names", "encoding", "images_per_sample", "format"):
        assert manifest[key] == source[key], key


def test_cyclegan_export_translates_and_stores_the_target_domain(cyclegan_run, synthetic_shards, tmp_path):
    out = tmp_path / "out"
    assert augment(cyclegan_run, out, "to_male", "--translate", A, "--labels-split", "val", "--images", "0") == 0
    assert augment(cyclegan_run, out, "to_female", "--translate", B, "--images", "5", "--batch-size", "2") == 0
    manifest = read_manifest(out)
    names = manifest["attribute_names"]
    male = names.index("Male")
    sources = read_in_order(str(synthetic_shards), f"val.{A}", 32)
    images, attrs, _ = read_in_order(str(out), "to_male", 32)
    assert len(images) == len(sources[0]) == 14 and (sources[1][:, male] == -1).all()
    assert (attrs[:, male] == 1).all()
    others = [c for c in range(len(names)) if c != male]
    assert np.array_equal(attrs[:, others], sources[1][:, others])
    sampling = sampling_of(cyclegan_run, names)
    with torch.no_grad():
        real = torch.from_numpy(sources[0]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        assert np.array_equal(images, levels(sampling.translate[(A, B)](real)))
    assert manifest["generated"]["to_male"]["source"] == f"translated val.{A} ({A} -> {B})"
    female = read_in_order(str(out), "to_female", 32)
    train_male = read_in_order(str(synthetic_shards), f"train.{B}", 32, limit=5)
    assert (female[1][:, male] == -1).all() and np.array_equal(female[1][:, others], train_male[1][:, others])
    with torch.no_grad():
        real = torch.from_numpy(train_male[0]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
        assert np.array_equal(female[0], levels(sampling.translate[(B, A)](real)))


def test_an_existing_split_is_replaced_only_when_asked_and_only_if_generated(cgan_run, own_shards, capsys):
    assert augment(cgan_run, own_shards, "generated", "--images", "8") == 0
    old = {shard["name"] for shard in read_manifest(own_shards)["splits"]["generated"]["shards"]}
    capsys.readouterr()
    assert augment(cgan_run, own_shards, "generated", "--images", "8") == 2
    assert "already exists (8 images from" in capsys.readouterr().err
    assert augment(cgan_run, own_shards, "train", "--images", "8", "--replace") == 2
    assert "split train of" in capsys.readouterr().err
    assert augment(cgan_run, own_shards, "generated", "--images", "12", "--replace", "--seed", "5") == 0
    manifest = read_manifest(own_shards)
    new = {shard["name"] for shard in manifest["splits"]["generated"]["shards"]}
    assert manifest["splits"]["generated"]["count"] == 12 and manifest["generated"]["generated"]["seed"] == 5
    assert not new & old and not any((own_shards / name).exists() for name in old)
    assert verify_shards(own_shards).ok and "train" in manifest["splits"]


def test_mistakes_are_one_line_errors_naming_the_choices(cgan_run, cyclegan_run, own_shards, tmp_path, capsys):
    out = tmp_path / "out"
    before = (own_shards / "manifest.json").read_text()
    cases = [
        ([tmp_path / "no-run", out, "g", "--images", "4"], "config file not found"),
        ([cgan_run, out, "g", "--images", "4", "--labels", "Glasses=1"], "unknown attribute Glasses; the data's"),
        ([cgan_run, out, "g", "--images", "4", "--labels", "Smiling=1"], "conditioned on Male, Eyeglasses"),
        ([cgan_run, out, "g", "--images", "4", "--labels", "Male=0"], "--labels expects data or ATTR=1"),
        ([cgan_run, out, "g", "--images", "0"], "--images must be >= 1"),
        ([cgan_run, out, "g", "--images", "4", "--translate", A], "--translate applies to translation runs"),
        ([cgan_run, out, "g", "--images", "4", "--labels-split", "test"], "no 'test' shards; splits with data"),
        ([cgan_run, out, "a+b", "--images", "4"], "no +, which joins splits"),
        ([cgan_run, tmp_path, "g", "--images", "4"], "is not a shard set"),
        ([cyclegan_run, out, "g", "--images", "4"], f"pass --translate with one of {A}, {B}"),
        ([cyclegan_run, out, "g", "--images", "4", "--translate", "Eyeglasses"], f"the run's domains are {A}, {B}"),
        ([cyclegan_run, out, "g", "--images", "999", "--translate", A], "holds 124 images (--images 0 takes all)"),
        ([cyclegan_run, own_shards, "train.Male", "--images", "4", "--translate", A], "was not written by gendist"),
    ]
    for (run, target, split, *options), message in cases:
        capsys.readouterr()
        assert augment(run, target, split, *options) == 2, options
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("gendist: error: "), err
    dcgan = trained(own_shards, tmp_path / "dcgan")
    assert augment(dcgan, out, "g", "--images", "4", "--labels", "Male=1") == 2
    assert "the dcgan generator is unconditional: only --labels data" in capsys.readouterr().err
    assert not out.exists() and (own_shards / "manifest.json").read_text() == before
    assert not list(own_shards.glob("*.partial")) and not list(tmp_path.glob("*.partial"))
    # an unconditional generator exports, its labels said to be the drawn rows
    assert augment(dcgan, out, "g", "--images", "4") == 0
    assert "ignores labels" in read_manifest(out)["generated"]["g"]["labels_note"]


@pytest.mark.slow
def test_two_processes_export_the_same_split_as_one(cgan_run, cyclegan_run, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    jobs = {
        "faces": [str(cgan_run), "--images", "45", "--batch-size", "8", "--shard-size", "10", "--seed", "2"],
        "male": [str(cyclegan_run), "--translate", A, "--images", "21", "--batch-size", "4"],
    }
    for split, arguments in jobs.items():
        assert cli_main(["augment", *arguments, "--out", str(one), "--split", split]) == 0
        proc = launch(
            "accelerate", tmp_path, [*arguments, "--out", str(two), "--split", split], ["-m", "gendist.augment"]
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        shares = re.search(r"\[rank 0/2\] exported \d+ images .* 2 ranks: (\d+) \+ (\d+)\) in .* images/s", proc.stdout)
        assert shares, proc.stdout[-2000:]
    assert [int(n) for n in shares.groups()] == [12, 9]  # whole batches of 4: 3 + 3 on rank 0
    manifests = [read_manifest(one), read_manifest(two)]
    assert {re.sub(r"-\w+-r(\d+)-\d+\.tar", r"-r\1", s["name"]) for s in manifests[1]["splits"]["faces"]["shards"]} == {
        "faces-r0000",
        "faces-r0001",
    }
    for split in jobs:
        first, second = (read_in_order(str(folder), split, 32) for folder in (one, two))
        assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1]), split
        assert manifests[0]["splits"][split]["count"] == manifests[1]["splits"][split]["count"]
    assert (
        verify_shards(two).ok and json.loads((two / "manifest.json").read_text())["generated"]["male"]["images"] == 21
    )


def test_the_augmentation_study_trains_on_real_and_on_real_plus_generated(cgan_run, own_shards, tmp_path, capsys):
    """benchmarks/augmentation_study.py end to end on the synthetic faces: 2 seeds x 2 training sets."""
    spec = importlib.util.spec_from_file_location("augmentation_study", REPO / "benchmarks" / "augmentation_study.py")
    augmentation_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(augmentation_study)
    assert augment(cgan_run, own_shards, "generated", "--images", "64") == 0
    out = tmp_path / "study"
    argv = ["--shards", str(own_shards), "--attribute", "Eyeglasses", "--attributes", ",".join(CONDITIONED)]
    argv += ["--seeds", "0", "1", "--steps", "3", "--out", str(out), *TINY, "model.image_size=32"]
    assert augmentation_study.main(argv) == 0
    results = json.loads((out / "study.json").read_text())
    assert list(results) == ["train", "train+generated"]
    for split, rows in results.items():
        assert [row["seed"] for row in rows] == [0, 1] and all(row["step"] == 3 for row in rows)
        assert all(row["attr_images"] == 25 and set(row["attr_accuracy"]) == set(CONDITIONED) for row in rows)
        assert load_config(Path(rows[0]["run"]) / "config.yaml").data.split == split
    table = (out / "study.md").read_text()
    assert (
        "| `train` | 231 |" in table and "| `train+generated` | 295 |" in table and "| majority of `train` |" in table
    )
    assert "Held out: all 25 images of `val`" in table and table.splitlines()[2] in capsys.readouterr().out
    # a study run that finished is read back, not trained again
    stamp = (Path(results["train"][0]["run"]) / "eval.jsonl").stat().st_mtime_ns
    assert augmentation_study.main(argv) == 0
    assert (Path(results["train"][0]["run"]) / "eval.jsonl").stat().st_mtime_ns == stamp

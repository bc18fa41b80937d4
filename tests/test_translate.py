"""gendist translate: a CycleGAN run applied to a folder of images and to a shard split, on 1 and 2 ranks."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, launch
from PIL import Image

from gendist.checkpoint import latest_checkpoint
from gendist.cli import main as cli_main
from gendist.config import load_config
from gendist.data.loader import read_in_order, read_samples
from gendist.data.shards import CELEBA_CROP_FRACTION, Preprocess
from gendist.distributed import build_accelerator
from gendist.trained import load_sampling
from gendist.training.loop import train

A, B = "not_Male", "Male"  # the domains of synthetic_shards


def trained(shards: Path, run: Path, *extra: str) -> Path:
    common = [*TINY, f"data.shards={shards}", f"train.run_dir={run}", "train.steps=2", "train.checkpoint_every=2"]
    train(load_config(None, [*common, *extra]))
    return run


@pytest.fixture(scope="module")
def cyclegan_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cyclegan") / "run"
    return trained(synthetic_shards, run, "model.name=cyclegan", f"cyclegan.domains=[{A},{B}]", "cyclegan.blocks=1")


def translated(run: Path, images: np.ndarray, direction: tuple[str, str]) -> np.ndarray:
    """What the run's checkpoint makes of uint8 images (N, H, W, 3), as uint8: the expected outputs."""
    cfg = load_config(run / "config.yaml")
    sampling, _ = load_sampling(cfg, latest_checkpoint(run), build_accelerator("no"), [])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        y = sampling.translate[direction](x * 2 - 1)
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (32, 32), path
        return np.asarray(image)


def outputs(out: Path) -> dict[str, np.ndarray]:
    return {str(path.relative_to(out)): pixels(path) for path in sorted(out.rglob("*")) if path.is_file()}


def test_a_folder_of_images_becomes_one_png_each_and_unreadable_ones_are_named(cyclegan_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    sources = {
        "face.jpg": rng.integers(0, 255, (218, 178, 3), dtype=np.uint8),  # CelebA's aligned size
        "sub/wide.png": rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),
        "sub/tiny.png": rng.integers(0, 255, (20, 20, 3), dtype=np.uint8),
    }
    for name, image in sources.items():
        Image.fromarray(image).save(pics / name, quality=95)
    (pics / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli_main(["translate", str(cyclegan_run), "--src", str(pics), "--out", str(out), "--batch-size", "2"]) == 0
    printed = capsys.readouterr()
    assert "skipped unreadable broken.jpg: cannot decode" in printed.err
    assert f"translated 3 of 4 images {A} -> {B} into {out} on 1 rank (3); 1 unreadable, skipped" in printed.out
    written = outputs(out)
    assert sorted(written) == ["face.png", "sub/tiny.png", "sub/wide.png"]
    # the converter's preprocessing (the run's shards' crop), then generator_ab, quantised like a saved image
    preprocess = Preprocess(32, CELEBA_CROP_FRACTION)
    inputs = np.stack([preprocess(Image.open(pics / name).convert("RGB")) for name in sorted(sources)])
    expected = translated(cyclegan_run, inputs, (A, B))
    for index, name in enumerate(sorted(sources)):
        assert np.array_equal(written[str(Path(name).with_suffix(".png"))], expected[index]), name
    back = tmp_path / "back"
    assert cli_main(["translate", str(cyclegan_run), "--src", str(pics), "--out", str(back), "--direction=b_to_a"]) == 0
    assert not np.array_equal(outputs(back)["face.png"], written["face.png"])  # the other generator


def test_a_shard_split_defaults_to_the_source_domains_held_out_images(cyclegan_run, synthetic_shards, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["translate", str(cyclegan_run), "--src", str(synthetic_shards), "--out", str(out)]) == 0
    samples = read_samples(str(synthetic_shards), f"val.{A}")
    keys = [key for sample in samples for key in sample["keys.txt"].decode().split()]
    written = outputs(out)
    assert sorted(written) == sorted(f"{key}.png" for key in keys) and len(keys) == 14
    expected = translated(cyclegan_run, read_in_order(str(synthetic_shards), f"val.{A}", 32)[0], (A, B))
    assert all(np.array_equal(written[f"{key}.png"], image) for key, image in zip(keys, expected))
    other = tmp_path / "other"
    options = ["--split", f"train.{B}", "--direction", "b_to_a", "--out", str(other)]
    assert cli_main(["translate", str(cyclegan_run), "--src", str(synthetic_shards), *options]) == 0
    assert len(outputs(other)) == 107


def test_runs_that_do_not_translate_and_wrong_inputs_are_refused(cyclegan_run, synthetic_shards, tmp_path, capsys):
    dcgan = trained(synthetic_shards, tmp_path / "dcgan")
    out = str(tmp_path / "out")
    cases = [
        ([str(dcgan), "--src", str(synthetic_shards)], "is a dcgan run, and the dcgan family translates no images"),
        ([str(cyclegan_run), "--src", str(tmp_path / "nowhere")], "image folder not found"),
        ([str(cyclegan_run), "--src", str(synthetic_shards), "--split", "val.Smiling"], "has no split 'val.Smiling'"),
        ([str(cyclegan_run), "--src", str(tmp_path), "--split", "val"], "--split applies to a shard folder"),
        ([str(tmp_path / "no-run"), "--src", str(synthetic_shards)], "config file not found"),
    ]
    for arguments, message in cases:
        capsys.readouterr()
        assert cli_main(["translate", *arguments, "--out", out]) == 2, arguments
        assert message in capsys.readouterr().err, arguments
    assert not Path(out).exists() or not any(Path(out).iterdir())


@pytest.mark.slow
def test_two_processes_write_the_same_files_as_one(cyclegan_run, synthetic_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    src = ["--src", str(synthetic_shards), "--batch-size", "4"]
    assert cli_main(["translate", str(cyclegan_run), *src, "--out", str(one)]) == 0
    proc = launch("accelerate", tmp_path, [str(cyclegan_run), *src, "--out", str(two)], ["-m", "gendist.translate"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = re.search(r"into \S+ on 2 ranks \((\d+) \+ (\d+)\)", proc.stdout)
    assert shares and [int(n) for n in shares.groups()] == [7, 7], proc.stdout[-2000:]
    first, second = outputs(one), outputs(two)
    assert sorted(first) == sorted(second) and len(first) == 14
    for name in first:
        assert np.array_equal(first[name], second[name]), name

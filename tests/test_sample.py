"""`gendist sample`: N images of a run's generator as PNG files, the same bytes on any rank count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import launch
from PIL import Image

from gendist.cli import main as cli_main
from gendist.config import load_config
from gendist.families import declare
from gendist.families.base import FamilyInputs, sampling_from_checkpoint
from gendist.training.loop import train


@pytest.fixture
def trained_run(tiny_overrides, tmp_path):
    return train(load_config(None, [*tiny_overrides, "train.steps=2"])).run_dir


def pngs(folder):
    return sorted(path.name for path in folder.glob("*.png"))


@pytest.mark.slow
def test_one_and_two_ranks_write_the_same_files_byte_for_byte(trained_run, tmp_path):
    assert (
        cli_main(["sample", str(trained_run), "--num", "21", "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    )
    proc = launch(
        "accelerate",
        tmp_path,
        [str(trained_run), "--num", "21", "--batch-size", "4", "--out", str(tmp_path / "two")],
        ["-m", "gendist.sample"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pngs(tmp_path / "one") == pngs(tmp_path / "two") == [f"{i:06d}.png" for i in range(21)]
    for name in pngs(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    record = json.loads((tmp_path / "two" / "samples.json").read_text())
    assert record["ranks"] == 2 and record["num"] == 21 and record["generator"] == "generator EMA"


def test_the_images_are_the_generators_on_the_seeded_noise(trained_run, tmp_path):
    """Image i is the EMA generator on row i of the --seed noise matrix, quantised as a PNG holds it."""
    out = tmp_path / "samples"
    assert cli_main(["sample", str(trained_run), "--num", "5", "--seed", "3", "--out", str(out)]) == 0
    state = torch.load(sorted((trained_run / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    cfg = load_config(trained_run / "config.yaml")
    sampling = sampling_from_checkpoint(declare(FamilyInputs(cfg, [])), state, torch.device("cpu"))
    noise = torch.randn(5, cfg.model.z_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ((sampling.generate(noise, torch.zeros(5, 40)).clamp(-1, 1) + 1) * 127.5).round().byte()
    for i in range(5):
        found = np.asarray(Image.open(out / f"{i:06d}.png"))
        np.testing.assert_array_equal(found, expected[i].permute(1, 2, 0).numpy())
    assert cli_main(["sample", str(trained_run), "--num", "5", "--out", str(out)]) == 2  # not empty: refused


def test_families_that_do_not_generate_are_refused(tiny_overrides, tmp_path, capsys):
    run = train(load_config(None, [*tiny_overrides, "model.name=classifier", "classifier.blocks=1", "train.steps=1"]))
    assert cli_main(["sample", str(run.run_dir), "--num", "2", "--out", str(tmp_path / "x")]) == 2
    assert "is a classifier run, which generates no images from noise" in capsys.readouterr().err

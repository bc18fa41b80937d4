"""Deep Dream: the chosen activation (layer, channel or logit) really grows, the network is left as
it was, and `gendist dream` writes each dream and the grid from a run's checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image

from gendist.cli import main as cli_main
from gendist.config import load_config
from gendist.dream import DreamSettings, dream, objective
from gendist.models.dcgan import Discriminator
from gendist.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
# jitter off: the critic's last 4x4 convolution is not translation invariant (a classifier's pooling is)
QUICK = DreamSettings(octaves=2, steps=6, step_size=0.05, jitter=0)


@pytest.fixture
def critic():
    torch.manual_seed(0)
    return Discriminator(ndf=8, image_size=32, norm="layer").eval()


@pytest.fixture
def faces():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8


@pytest.mark.parametrize("target, channel", [("net.1", None), ("net.4", 3), ("logit:0", None)])
def test_the_chosen_activation_grows_and_the_network_is_untouched(critic, faces, target, channel):
    weights = {k: v.clone() for k, v in critic.state_dict().items()}
    before = objective(critic, faces, target, 32, channel)
    dreamed = dream(critic, faces, target, QUICK, channel)
    after = objective(critic, dreamed, target, 32, channel)
    assert dreamed.shape == faces.shape and dreamed.abs().max() <= 1.0
    assert (after > before).all(), (before, after)
    if not target.startswith("logit"):
        assert (after / before).min() > 3  # measured: 9.7x (net.1), 17x (net.4, channel 3)
    assert all(torch.equal(weights[k], v) for k, v in critic.state_dict().items())
    assert all(p.requires_grad for p in critic.parameters())


def test_dream_is_seeded(critic, faces):
    assert torch.equal(dream(critic, faces, "net.1", QUICK), dream(critic, faces, "net.1", QUICK))


def test_gendist_dream_on_a_run(tiny_overrides, tmp_path, capsys):
    cfg = load_config(None, [*tiny_overrides, "model.d_norm=layer", "train.steps=2"])
    train(cfg)
    image = tmp_path / "face.png"
    Image.fromarray((np.random.default_rng(0).random((40, 36, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "dreams"
    args = ["dream", cfg.train.run_dir, "--image", str(image), "--out", str(out), "--layers", "net.1,net.4"]
    assert cli_main([*args, "--octaves", "2", "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "net.1: objective" in printed and "net.4: objective" in printed
    assert sorted(p.name for p in out.iterdir()) == ["face_net.1.png", "face_net.4.png", "grid.png"]
    assert Image.open(out / "grid.png").size[0] > 3 * 32  # original | net.1 | net.4
    assert cli_main(["dream", cfg.train.run_dir, "--image", str(image), "--out", str(out)]) == 2
    assert "has no stages: pick --layers among" in capsys.readouterr().err


def test_gendist_dream_on_shard_images_and_on_generated_samples(tiny_overrides, synthetic_shards, tmp_path, capsys):
    """The dreamer is a DCGAN's critic; the inputs are val images of the shards, then the run's own samples."""
    cfg = load_config(None, [*tiny_overrides, "model.d_norm=layer", "train.steps=2"])
    train(cfg)
    quick = ["--layers", "net.1", "--octaves", "2", "--steps", "2", "--count", "3"]
    out = tmp_path / "from_shards"
    assert cli_main(["dream", cfg.train.run_dir, "--shards", str(synthetic_shards), "--out", str(out), *quick]) == 0
    assert {p.name for p in out.iterdir()} == {*(f"val_{i:04d}_net.1.png" for i in range(3)), "grid.png"}
    out = tmp_path / "from_samples"
    assert cli_main(["dream", cfg.train.run_dir, "--generated", cfg.train.run_dir, "--out", str(out), *quick]) == 0
    assert {p.name for p in out.iterdir()} == {*(f"sample_{i:04d}_net.1.png" for i in range(3)), "grid.png"}
    assert "net.1: objective" in capsys.readouterr().out
    classifier = tmp_path / "classifier"
    train(load_config(None, [*tiny_overrides, "model.name=classifier", f"train.run_dir={classifier}", "train.steps=1"]))
    args = ["dream", cfg.train.run_dir, "--generated", str(classifier), "--out", str(out), *quick]
    assert cli_main(args) == 2
    assert "a classifier run generates no images from noise" in capsys.readouterr().err


def test_gendist_dream_with_the_fid_inception(tmp_path, capsys):
    """`inception` dreams with pytorch-fid's network (here random-init): its block's activation grows;
    a missing weights file is named with where to put it."""
    image = tmp_path / "face.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "dreams"
    args = ["dream", "inception", "--image", str(image), "--out", str(out), "--size", "64", "--layers", "stages.1"]
    assert (
        cli_main([*args, "--inception-weights", "random", "--octaves", "1", "--steps", "5", "--step-size", "0.05"]) == 0
    )
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("stages.1: objective"))
    before, after = (float(value) for value in line.split("objective ")[1].split(" (")[0].split(" -> "))
    assert after > 1.5 * before, line  # measured: 2.33x
    assert sorted(p.name for p in out.iterdir()) == ["face_stages.1.png", "grid.png"]
    assert cli_main([*args, "--inception-weights", str(tmp_path / "nowhere.pth")]) == 2
    assert "FID Inception weights not found" in capsys.readouterr().err

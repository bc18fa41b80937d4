"""`gendist export`: a run's sampling network as safetensors + JSON, loadable without gendist's
training code, reproducing `gendist sample`'s images; `gendist sample` reads an export too."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gendist.checkpoint import latest_checkpoint, load_checkpoint
from gendist.cli import main as cli_main
from gendist.config import load_config
from gendist.training.loop import train

# The documented snippet (gendist/export.py), run in a fresh interpreter that must not load gendist's
# training code; it prints the images' uint8 pixels of the seeded noise.
SNIPPET = """
import importlib, json, sys, torch
from safetensors.torch import load_file
folder, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = json.load(open(f"{folder}/generator.json"))
module, name = spec["module"].rsplit(".", 1)
net = getattr(importlib.import_module(module), name)(**spec["kwargs"]).eval()
net.load_state_dict(load_file(f"{folder}/generator.safetensors"))
z = torch.randn(count, spec["z_dim"], generator=torch.Generator().manual_seed(seed))
with torch.no_grad():
    out = getattr(net, spec["method"])(z)
images = out.sigmoid() * 2 - 1 if spec["output"] == "sigmoid" else out.clamp(-1, 1)
loaded = sorted(m for m in sys.modules if m.startswith("gendist.") and not m.startswith("gendist.models"))
print(json.dumps({"pixels": ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).tolist(), "gendist": loaded}))
"""


@pytest.mark.parametrize("family", ["dcgan", "ae"])
def test_an_export_loads_without_gendist_and_reproduces_gendist_sample(family, tiny_overrides, tmp_path):
    run = train(load_config(None, [*tiny_overrides, f"model.name={family}", "train.steps=2"])).run_dir
    exported = tmp_path / "export"
    assert cli_main(["export", str(run), "--format", "safetensors", "--out", str(exported)]) == 0
    spec = json.loads((exported / "generator.json").read_text())
    network = "generator" if family == "dcgan" else "vae"
    assert spec["weights"] == ("EMA" if family == "dcgan" else "trained") and spec["step"] == 2
    assert spec["preprocessing"]["size"] == 32
    shared, _ = load_checkpoint(latest_checkpoint(run), 0)
    expected = shared[f"{network}_ema"] if family == "dcgan" else shared[network]
    tensors = load_file(str(exported / "generator.safetensors"))  # safetensors alone
    assert tensors.keys() == {key.removeprefix("module.") for key in expected if key != "n_averaged"}
    for key, value in tensors.items():
        assert torch.equal(value, expected[key if family != "dcgan" else f"module.{key}"]), key

    assert cli_main(["sample", str(run), "--num", "6", "--seed", "5", "--out", str(tmp_path / "from_run")]) == 0
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPET, str(exported), "6", "5"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["gendist"] == [], "the snippet loaded gendist's training code"
    for i, pixels in enumerate(result["pixels"]):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "from_run" / f"{i:06d}.png")), pixels)

    assert cli_main(["sample", str(exported), "--num", "6", "--seed", "5", "--out", str(tmp_path / "from_export")]) == 0
    for i in range(6):
        name = f"{i:06d}.png"
        assert (tmp_path / "from_run" / name).read_bytes() == (tmp_path / "from_export" / name).read_bytes()


def test_families_without_a_sampler_are_refused(tiny_overrides, tmp_path, capsys):
    run = train(load_config(None, [*tiny_overrides, "model.name=classifier", "classifier.blocks=1", "train.steps=1"]))
    assert cli_main(["export", str(run.run_dir), "--out", str(tmp_path / "x")]) == 2
    assert "is a classifier run, which samples no images from codes" in capsys.readouterr().err


def test_an_export_naming_anything_but_a_gendist_network_is_refused_before_it_runs(tmp_path, capsys):
    """generator.json names what gets imported and called: a crafted one must not run code."""
    folder, witness = tmp_path / "crafted", tmp_path / "ran"
    folder.mkdir()
    spec = {"format": "gendist-export-1", "module": "subprocess.Popen", "kwargs": {"args": ["touch", str(witness)]}}
    (folder / "generator.json").write_text(json.dumps({**spec, "z_dim": 4, "labels": None}))
    assert cli_main(["sample", str(folder), "--num", "1", "--out", str(tmp_path / "out")]) == 2
    assert "names 'subprocess.Popen', which is not a network class of gendist.models." in capsys.readouterr().err
    assert not witness.exists()

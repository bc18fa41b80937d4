import json

import yaml

from gendist.cli import main as gendist_main
from gendist.progress import Reporter


def test_dry_run_prints_the_resolved_config(capsys):
    assert gendist_main(["train", "--dry-run", "optim.lr_g=1e-4", "train.steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr_g"] == 1e-4 and printed["train"]["steps"] == 7
    sections = {"data", "model", "loss", "vae", "pix2pix", "cyclegan", "classifier", "srgan", "optim", "train", "eval"}
    assert set(printed) == sections


def test_config_errors_exit_2_with_the_valid_keys(capsys, tmp_path):
    assert gendist_main(["train", "train.stepz=3"]) == 2
    assert "valid keys in 'train': run_dir, steps" in capsys.readouterr().err
    assert gendist_main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_plain_progress_lines_and_jsonl_when_not_a_terminal(tmp_path, capsys):
    reporter = Reporter(tmp_path, total_steps=10, start_step=0, enabled=True)
    reporter.log(5, {"loss_d": 0.5, "images_per_s": 100.0, "epoch": 0})
    reporter.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("step 5/10") and "loss_d 0.5" in line and "eta " in line
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 5 and row["loss_d"] == 0.5


def test_other_ranks_report_nothing(tmp_path, capsys):
    Reporter(tmp_path, 10, 0, enabled=False).log(5, {"loss_d": 0.5})
    assert capsys.readouterr().out == "" and not (tmp_path / "metrics.jsonl").exists()

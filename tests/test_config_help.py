"""`gendist config`: generated from the config dataclasses and their comments; plain lines when piped."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from gendist.cli import main as gendist_main
from gendist.config import RunConfig, to_dict
from gendist.config_help import describe_type, run_config_help, source_meanings

# Keys with no comment in gendist/config.py today. Document a key there and drop it from here; a key
# added without a comment fails test_every_key_has_a_meaning.


@dataclass
class Commented:
    """A section for the extractor: its docstring
    spans two lines."""

    trailing: int = 1  # said after the value
    # said above,
    # over two lines
    above: float = 0.5
    bare: str = ""
    spread: list[str] = field(
        default_factory=list,
    )  # after a statement of three lines


def printed_lines(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, str]:
    """`gendist config ARGV`'s output as key -> its line (and title lines under their own text)."""
    assert gendist_main(["config", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line for line in lines if line.strip()}


def test_the_extractor_reads_trailing_comments_comment_lines_above_and_the_docstring():
    summary, meanings = source_meanings(Commented)
    assert summary == "A section for the extractor: its docstring spans two lines."
    assert meanings == {
        "trailing": "said after the value",
        "above": "said above, over two lines",
        "bare": "",
        "spread": "after a statement of three lines",
    }


def test_types_read_as_written():
    assert describe_type(Literal["no", "bf16", "fp16"]) == "one of no|bf16|fp16"
    assert describe_type(list[str]) == "list[str]"
    assert describe_type(tuple[float, float]) == "tuple[float, float]"
    assert describe_type(int) == "int"
    assert describe_type(str | None) == "str | None"


def test_every_key_of_every_section_lists_with_its_default_and_meaning(capsys):
    lines = printed_lines(capsys)
    defaults = to_dict(RunConfig())
    for section in dataclasses.fields(RunConfig):
        for key, default in defaults[section.name].items():
            cells = re.split(" {2,}", lines[f"{section.name}.{key}"].strip())
            assert cells[2] == json.dumps(default), cells
    assert "fails the job (a dead or hung peer)" in lines["train.collective_timeout_s"]
    assert 'A folder holding a shard manifest.json, or "synthetic" for the embedded' in lines["data.shards"]
    assert lines["srgan.scale"].endswith("2, 4 or 8") and "one of no|bf16|fp16" in lines["train.mixed_precision"]
    assert lines["loss:"].startswith("loss: The GAN objective: dcgan and cgan are non-saturating")


def test_section_keeps_one_section_and_train_help_config_prints_the_listing(capsys):
    assert all(key.startswith("srgan") for key in printed_lines(capsys, "--section", "srgan") if key != "KEY")
    with pytest.raises(SystemExit) as exit_info:
        gendist_main(["train", "--help-config"])
    assert exit_info.value.code == 0 and "train.collective_timeout_s" in capsys.readouterr().out


def test_a_preset_shows_what_it_changes(capsys):
    lines = printed_lines(capsys, "srgan_16to64_celeba")
    assert lines["model.name"].split()[:3] == ["model.name", '"dcgan"', '"srgan"']
    assert lines["srgan.pretrain_steps"].split()[1:3] == ["1000", "100000"]
    assert "SRResNet steps before the adversarial stage" in lines["srgan.pretrain_steps"]
    assert "srgan.scale" not in lines  # the preset's 4 is the default


def test_a_family_shows_each_of_its_presets_and_a_yaml_file_its_changes(capsys, tmp_path):
    titles = [line for line in printed_lines(capsys, "srgan").values() if "of the defaults" in line]
    assert [title.split()[0] for title in titles] == ["srgan_16to128_celeba", "srgan_16to64_celeba"]
    preset = tmp_path / "short.yaml"
    preset.write_text("train:\n  steps: 7\n")
    lines = printed_lines(capsys, str(preset))
    assert lines["train.steps"].split()[:3] == ["train.steps", "2000", "7"]
    assert lines[f"{preset}:"] == f"{preset}: changes 1 of the defaults"


def test_an_unknown_preset_exits_2_naming_the_presets(capsys):
    assert gendist_main(["config", "srgan_16to32"]) == 2
    error = capsys.readouterr().err
    assert "no preset or family named 'srgan_16to32'" in error
    assert "srgan_16to64_celeba" in error and "dcgan_default" in error


def test_every_key_has_a_meaning():
    undocumented = {key.key for section in run_config_help() for key in section.keys if not key.meaning}
    assert not undocumented, f"comment these keys in gendist/config.py: {sorted(undocumented)}"

from pathlib import Path

import pytest

from gendist.config import ConfigError, RunConfig, load_config, to_yaml


def test_defaults_yaml_and_overrides_apply_in_order(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr_g: 1.0e-3\ntrain:\n  steps: 10\n")
    cfg = load_config(path, ["optim.lr_g=2e-4", "train.mixed_precision=bf16", "optim.betas=[0.0, 0.9]"])
    assert cfg.optim.lr_g == 2e-4  # "2e-4" is a string to PyYAML; the float field accepts it
    assert cfg.train.steps == 10
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.optim.betas == (0.0, 0.9)
    assert cfg.optim.lr_d == RunConfig().optim.lr_d


def test_bare_no_is_a_choice_not_a_boolean(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optim.lr=1e-3"])
    message = str(err.value)
    assert "unknown key 'optim.lr'" in message
    assert "lr_g, lr_d, betas" in message
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(None, ["trian.steps=3"])


def test_unknown_key_in_yaml_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batchsize: 32\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.batchsize' \(did you mean 'data.batch_size'\?\)"):
        load_config(path)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.steps=ten", "'train.steps' must be int, got str 'ten'"),
        ("train.steps=1.5", "'train.steps' must be int"),
        ("train.steps=true", "'train.steps' must be an int"),
        ("train.mixed_precision=fp8", "must be one of no, bf16, fp16"),
        ("optim.betas=[0.5]", "must have 2 items"),
        ("optim.lr_g=fast", "must be a float"),
        ("data=3", "'data' is a section"),
        ("model.image_size=48", "power of two"),
        ("steps", "not of the form section.key=value"),
        ("model.name=wgan_gp", "set model.d_norm=layer"),
        ("model.name=cgan", "cgan needs attributes"),
        ("loss.n_critic=0", "n_critic must be >= 1"),
        ("train.ema_decay=1.0", r"ema_decay must be in \[0, 1\)"),
    ],
)
def test_type_and_value_errors(override: str, pattern: str):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_wgan_gp_refuses_fp16_with_a_way_out():
    with pytest.raises(ConfigError, match="use train.mixed_precision=bf16"):
        load_config(None, ["model.name=wgan_gp", "model.d_norm=layer", "train.mixed_precision=fp16"])


def test_resolved_config_round_trips_through_yaml(tmp_path: Path):
    cfg = load_config(None, ["optim.betas=[0.0, 0.99]", "data.hflip=true"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_shipped_configs_load():
    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr_g=-1e-4", "optim.lr_g"),
        ("optim.lr_d=nan", "optim.lr_d"),
        ("optim.lr_g=inf", "optim.lr_g"),
        ("loss.gp_weight=-10", "loss.gp_weight"),
        ("model.ngf=0", "model.ngf"),
        ("model.z_dim=0", "model.z_dim"),
        ("model.ndf=0", "model.ndf"),
        ("optim.betas=[1.0, 0.9]", "optim.betas"),
        ("vae.beta=-1", "vae.beta"),
    ],
)
def test_impossible_numbers_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_an_unknown_family_lists_the_registered_ones():
    valid = "gan, dcgan, cgan, wgan, wgan_gp, vae, ae, pix2pix, cyclegan, classifier, srgan"
    with pytest.raises(ConfigError, match=rf"'model.name' must be one of {valid}; got 'stylegan'"):
        load_config(None, ["model.name=stylegan"])

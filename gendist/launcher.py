"""The settings a launcher hands gendist, and the one rule by which they meet the experiment config.

`accelerate launch` exports its flags and its config file's values as ACCELERATE_* variables (and
a DeepSpeed launch may name a DeepSpeed config file with a precision block of its own); torchrun
exports none of them. For each setting that both the launcher and the experiment config can hold
(train.mixed_precision, train.compile):

- the experiment config's value wins where it sets one (in its YAML or by a section.key=value
  override), else the launcher's, else gendist's default;
- a value the experiment config sets and the launcher contradicts is refused at start-up, naming
  both values and where each came from.

`accelerate launch` always exports a precision and a dynamo backend, `no` when nobody set them, so a
launcher's `no` cannot be told from its default and counts as unset. Launcher settings gendist
cannot honour (FSDP, Megatron-LM, gradient accumulation, dynamo options train.compile has no
counterpart for) are refused with the reason. Accelerate itself is built to compile nothing
(distributed.build_accelerator): what gets compiled is train.compile's decision.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_args, get_type_hints

from gendist.config import ConfigError, RunConfig, TrainConfig, load_config, set_keys

PRECISION = "ACCELERATE_MIXED_PRECISION"
DYNAMO_BACKEND = "ACCELERATE_DYNAMO_BACKEND"
DYNAMO_MODE = "ACCELERATE_DYNAMO_MODE"
ACCUMULATION = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
COMPILE_MODES = tuple(mode for mode in get_args(get_type_hints(TrainConfig)["compile"]) if mode != "no")
# dynamo options of `accelerate launch` that train.compile has no counterpart for, and why
UNSUPPORTED_DYNAMO = {
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": (
        "--dynamo_use_fullgraph: train.compile lets Dynamo break the graph (at DDP's gradient buckets, and "
        "around the gradient penalty's eager double backward), which fullgraph forbids"
    ),
    "ACCELERATE_DYNAMO_USE_DYNAMIC": (
        "--dynamo_use_dynamic: every training batch has the same shape (data.batch_size), which "
        "train.compile compiles once; there is no dynamic-shape setting"
    ),
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": (
        "--dynamo_use_regional_compilation: train.compile compiles each network whole; there is no regional setting"
    ),
}
# distributed types of `accelerate launch` that gendist does not drive, and why
UNSUPPORTED_BACKENDS = {
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


@dataclass(frozen=True)
class Offer:
    """A value the launcher gives for a setting, and where it came from."""

    value: str
    source: str


def training_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...], environ: Mapping[str, str] = os.environ
) -> tuple[RunConfig, list[str]]:
    """The training run's config: the experiment config with the launcher's settings resolved into
    it (the module's rule), validated after that, so that a refusal of a value (WGAN-GP with fp16,
    ...) applies whichever way it arrived; and one line per resolved setting naming its source."""
    cfg = load_config(path, overrides)
    refuse_unsupported(environ)
    explicit = set_keys(path, overrides)
    lines = [
        settle(cfg, "train.mixed_precision", "train.mixed_precision" in explicit, precision_offer(environ)),
        settle(cfg, "train.compile", "train.compile" in explicit, compile_offer(environ)),
    ]
    try:
        cfg.validate()
    except ConfigError as err:  # say where a refused value came from
        raise ConfigError(f"{err} (settings: {'; '.join(lines)})") from err
    return cfg, lines


def settle(cfg: RunConfig, key: str, in_config: bool, offer: Offer | None) -> str:
    """Apply the rule to one setting of `cfg` (changed in place); returns the line that says it."""
    section, name = key.split(".")
    value = cfg.get(key)
    if in_config:
        if offer is not None and offer.value != value:
            raise ConfigError(
                f"{key}={value} in the experiment config conflicts with {offer.value} from {offer.source}; "
                f"set it in one place, or the same value in both"
            )
        return f"{key}={value} (the experiment config)"
    if offer is not None:
        setattr(getattr(cfg, section), name, offer.value)
        return f"{key}={offer.value} ({offer.source})"
    return f"{key}={value} (gendist's default)"


def precision_offer(environ: Mapping[str, str]) -> Offer | None:
    """The launcher's mixed precision: `--mixed_precision` or its config file's `mixed_precision`,
    and under DeepSpeed the DeepSpeed config file's own bf16/fp16 block. Two that disagree are refused."""
    offers = []
    launched = environ.get(PRECISION, "no").lower()
    if launched == "fp8":
        raise ConfigError(
            "the launcher's mixed precision fp8 is refused: gendist trains in no, bf16 or fp16 "
            "(train.mixed_precision); fp8 needs Transformer Engine or torchao layers its networks do not use"
        )
    if launched != "no":
        source = f"the launcher: accelerate launch --mixed_precision or its config file ({PRECISION}={launched})"
        offers.append(Offer(launched, source))
    deepspeed_file = deepspeed_config_file(environ)
    if deepspeed_file is not None:
        offers += deepspeed_precision(deepspeed_file)
    if len({offer.value for offer in offers}) > 1:
        raise ConfigError(
            "the launcher gives two mixed precisions: "
            + " and ".join(f"{offer.value} from {offer.source}" for offer in offers)
            + "; set one"
        )
    return offers[0] if offers else None


def deepspeed_config_file(environ: Mapping[str, str]) -> str | None:
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    return None if path == "none" else path


def deepspeed_precision(path: str) -> list[Offer]:
    """The precision a DeepSpeed config file enables (`"enabled": true`; `"auto"` leaves it to
    Accelerate's, as there)."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    try:
        config = HfDeepSpeedConfig(path).config
    except ValueError as err:  # a missing or malformed file
        raise ConfigError(f"the launcher's DeepSpeed config file {path} cannot be read: {err}") from None
    return [
        Offer(value, f"the DeepSpeed config file {path} ({key}.enabled)")
        for key, value in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"))
        if isinstance(config.get(key), dict) and config[key].get("enabled") is True
    ]


def compile_offer(environ: Mapping[str, str]) -> Offer | None:
    """The launcher's dynamo settings as a train.compile mode, or a ConfigError for those that
    train.compile cannot honour."""
    backend = environ.get(DYNAMO_BACKEND, "no").lower()
    if backend == "no":
        return None
    if backend != "inductor":
        raise ConfigError(
            f"the launcher's dynamo backend {backend} ({DYNAMO_BACKEND}) is refused: gendist compiles its "
            "networks itself, with inductor (train.compile), so that the gradient penalty's double backward "
            "stays eager and checkpoints keep plain keys; use --dynamo_backend inductor, or train.compile"
        )
    for variable, why in UNSUPPORTED_DYNAMO.items():
        if _flag(environ.get(variable)):
            raise ConfigError(f"the launcher's {why}; launch without it")
    mode = environ.get(DYNAMO_MODE, "default")
    if mode not in COMPILE_MODES:
        raise ConfigError(
            f"the launcher's dynamo mode {mode} ({DYNAMO_MODE}) is refused: train.compile takes "
            f"{', '.join(COMPILE_MODES)}"
        )
    return Offer(mode, f"the launcher: accelerate launch --dynamo_backend inductor --dynamo_mode {mode}")


def refuse_unsupported(environ: Mapping[str, str] = os.environ) -> None:
    """Launcher settings no gendist command honours, refused with the reason."""
    for variable, name in UNSUPPORTED_BACKENDS.items():
        if _flag(environ.get(variable)):
            raise ConfigError(
                f"the launcher asks for {name} ({variable}), which gendist does not drive: its EMA, sample grids "
                "and evaluator read whole parameters on every rank; launch with DDP (launch/multi_gpu.yaml, "
                "torchrun) or DeepSpeed ZeRO-1/2 (launch/ds_zero2.yaml)"
            )
    steps = environ.get(ACCUMULATION)
    if steps is not None and steps.strip() != "1":
        raise ConfigError(
            f"the launcher's --gradient_accumulation_steps {steps} ({ACCUMULATION}) is refused: gendist takes one "
            "optimizer step per batch, and a GAN's critic schedule (loss.n_critic critic steps, each on a fresh "
            "batch, then one generator step) has no accumulated step; grow data.batch_size instead"
        )


def unused_by_fp32_command(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Notes for a command that computes in fp32 and eagerly whatever the launcher says (evaluation,
    translation, ...: pytorch-fid's protocol is fp32): the launcher's settings it does not use."""
    notes = []
    precision = environ.get(PRECISION, "no").lower()
    if precision != "no":
        notes.append(
            f"note: the launcher's mixed precision {precision} ({PRECISION}) is not used: this command computes in fp32"
        )
    backend = environ.get(DYNAMO_BACKEND, "no").lower()
    if backend != "no":
        notes.append(
            f"note: the launcher's dynamo backend {backend} ({DYNAMO_BACKEND}) is not used: this command runs eagerly"
        )
    return notes


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes", "y", "on")

"""Typed run configuration: dataclass defaults <- YAML file <- dotted command-line overrides.

Every section is a small dataclass owned by one component; `RunConfig` composes them. Unknown keys
and wrong types raise `ConfigError` naming the valid keys, so a typo never trains silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or an override."""


@dataclass
class DataConfig:
    # A folder holding a shard manifest.json, or "synthetic" for the embedded procedurally drawn
    # face set (built once into the cache folder below, with the same shard code as CelebA).
    shards: str = "synthetic"
    split: str = "train"  # the training split of data.shards; a union a+b reads both as one stream
    batch_size: int = 64  # per rank
    num_workers: int = 2  # loader processes per rank
    shuffle_pool: int = 2048  # images mixed together before batching
    hflip: bool = False  # random horizontal flips of the training images
    synthetic_count: int = 8192  # images of the embedded synthetic face set
    cache_dir: str = "~/.cache/gendist"  # the synthetic shards and the FID reference statistics


@dataclass
class ModelConfig:
    name: str = "dcgan"  # a family of gendist.families.DECLARATIONS (gan, dcgan, ..., vae, ae, cyclegan, srgan, ...)
    image_size: int = 64  # pixels of the (square) images trained on: a power of two >= 16
    z_dim: int = 100  # latent size (the VAE's and the autoencoder's code too)
    ngf: int = 64  # generator/decoder width: 8*ngf channels at 4x4
    ndf: int = 64  # discriminator/encoder width
    d_norm: Literal["batch", "layer", "instance", "none"] = "batch"  # discriminator normalisation
    attributes: list[str] = field(default_factory=list)  # cgan: CelebA attribute names to condition on
    label_dim: int = 50  # cgan: size of the generator's label embedding


@dataclass
class LossConfig:
    """The GAN objective: dcgan and cgan are non-saturating, wgan/wgan_gp Wasserstein."""

    n_critic: int = 1  # discriminator steps per generator step, each on a fresh real batch
    clip_value: float = 0.01  # wgan: critic weights are clipped to [-c, c]
    gp_weight: float = 10.0  # wgan_gp: lambda


@dataclass
class VaeConfig:
    """The VAE's objective; the plain autoencoder (model.name=ae) reads likelihood and gaussian_std."""

    likelihood: Literal["bernoulli", "gaussian", "gaussian_learned"] = "gaussian"  # the decoder p(x|z)
    gaussian_std: float = 0.1  # fixed decoder std for "gaussian" (images in [-1, 1])
    beta: float = 1.0  # weight of the KL term
    kl_warmup_steps: int = 0  # KL weight ramps linearly from 0 to beta over these steps


@dataclass
class Pix2PixConfig:
    """Pix2Pix face inpainting: which holes, the L1 weight (lambda), the PatchGAN's depth."""

    mask: Literal["centre", "rectangles", "strokes", "mixed"] = "mixed"  # the holes to fill
    l1_weight: float = 100.0  # lambda: the weight of L1 to the target beside the GAN loss
    patch_layers: int = 2  # 34 px receptive field: about half of a 64 px face
    # Training masks: a function of (mask_seed, step, global sample index), the index of sample i of
    # rank r being r * data.batch_size + i (gendist.data.masks.train_keys)
    mask_seed: int = 1
    dropout: float = 0.5  # the U-Net decoder's dropout (the paper's 0.5, its only noise); 0 turns it off


@dataclass
class CycleGANConfig:
    """CycleGAN between two attribute domains of the shards (`gendist shards domains`): domain D of
    split S is the split "S.D"; A -> B is generator_ab, B -> A generator_ba (Zhu et al. 2017)."""

    domains: tuple[str, str] = ("not_Eyeglasses", "Eyeglasses")  # A, B
    cycle_weight: float = 10.0  # lambda
    identity_weight: float = 0.5  # times lambda; 0 turns the identity loss off
    pool_size: int = 50  # past fakes per discriminator, per rank; 0: no pool
    blocks: int = 6  # residual blocks of each generator
    patch_layers: int = 2  # PatchGAN depth: 34 px receptive field, about half of a 64 px face
    decay_from: float = 0.5  # learning rates decay linearly to 0 from this fraction of train.steps on


@dataclass
class ClassifierConfig:
    """The attribute classifier (model.name=classifier): a ResNet (gendist.models.classifier) of base
    width model.ndf, trained by binary cross-entropy at optim.lr_g, one logit per attribute."""

    attributes: list[str] = field(default_factory=list)  # the data's names to predict; [] = all of them
    blocks: int = 2  # basic residual blocks per stage (2 with model.ndf=64: ResNet-18's depth and widths)
    norm: Literal["batch", "group"] = "batch"  # group: independent of the batch and the number of ranks
    label_smoothing: float = 0.0  # targets 0/1 move to eps/2 and 1 - eps/2
    schedule: Literal["constant", "cosine"] = "cosine"  # lr over train.steps: cosine decays it to 0


@dataclass
class SRGANConfig:
    """Face super-resolution (model.name=srgan, Ledig et al. 2017): the low-resolution input is the
    target (model.image_size) downsampled `scale` times (gendist.data.resolution.downsample). Steps up
    to pretrain_steps train SRResNet on the pixel loss alone; the steps after, the adversarial stage
    from those weights: pixel_weight x pixel + content_weight x content + adversarial_weight x GAN."""

    scale: int = 4  # 2, 4 or 8
    blocks: int = 16  # residual blocks of the generator (model.ngf wide; the discriminator model.ndf)
    pretrain_steps: int = 1000  # SRResNet steps before the adversarial stage; >= train.steps: SRResNet only
    pixel_loss: Literal["mse", "l1"] = "mse"  # the pixel loss of both stages
    pixel_weight: float = 1.0e-2  # in the adversarial stage (the SRResNet stage's loss is the pixel loss alone)
    content: Literal["classifier", "vgg19", "none"] = "classifier"  # the content loss's feature network
    content_weight: float = 1.0  # the content loss: MSE of the feature maps of output and target
    # content=classifier: a classifier run folder (gendist's own face network, trained on data of this
    # preprocessing) and its layer: stem, stages.0 ... stages.3
    classifier: str = ""
    classifier_layer: str = "stages.2"  # content=classifier: the layer whose feature map is compared
    # content=vgg19: torchvision's vgg19-dcbb9e9d.pth ("" = $TORCH_HOME/hub/checkpoints; "random" =
    # random-init, smoke runs only) and its layer (relu5_4: the paper's VGG54)
    vgg_weights: str = ""
    vgg_layer: str = "relu5_4"  # content=vgg19: the layer (relu5_4: VGG54; relu2_2: VGG22)
    adversarial_weight: float = 5.0e-3  # the non-saturating GAN loss in the adversarial stage


@dataclass
class OptimConfig:
    name: Literal["adam", "rmsprop"] = "adam"  # the optimizer of every network
    lr_g: float = 2e-4  # generator (or the whole VAE)
    lr_d: float = 2e-4  # discriminator / critic
    betas: tuple[float, float] = (0.5, 0.999)  # adam only


@dataclass
class TrainConfig:
    run_dir: str = "runs/dcgan"  # the run folder: config, metrics, grids, checkpoints; resumed if it holds one
    steps: int = 2000  # generator steps
    seed: int = 0  # initial weights (the same on every rank) and each rank's noise and data order
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast of the forwards (fp16 with a loss scaler)
    log_every: int = 25  # steps per metrics row (means over the window and the ranks)
    sample_every: int = 250  # steps between sample grids (and at the last step)
    checkpoint_every: int = 500  # steps between checkpoints (and at the last step, and on a stop signal)
    keep_checkpoints: int = 3  # the newest complete checkpoints kept; older ones are deleted
    num_samples: int = 64  # images in each sample grid
    ema_decay: float = 0.999  # GANs: EMA of the generator for samples and evaluation; 0 turns it off
    # Networks (and the loader's images) in NHWC memory: faster convolutions (about 1.1x for a
    # DCGAN-64 step on CPU, see BENCHMARKS.md; the layout tensor cores want under bf16).
    channels_last: bool = True
    # Once set-up is over (shard cache, FID reference and weights), a collective that waits longer
    # than this fails the job (a dead or hung peer) instead of waiting out the launch default (30
    # min gloo, 10 min NCCL). Rank 0's share of an evaluation (FID, KID) takes seconds.
    collective_timeout_s: float = 300.0
    # Accelerate's experiment trackers (log_with), rank 0: tensorboard (<run_dir>/tensorboard), wandb,
    # mlflow, ...; each must be installed; [] = none (metrics.jsonl and the grids are always written)
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # torch.compile (inductor) of every trained network's forward and backward, in this mode:
    # default; reduce-overhead (+ CUDA graphs on a GPU); max-autotune; "no" = eager. Input gradients
    # (WGAN-GP's penalty, a double backward compile cannot take) go through the eager network.
    compile: Literal["no", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "no"


@dataclass
class EvalConfig:
    """FID/KID protocol (pytorch-fid Inception pool3) and, for VAEs, held-out reconstruction error."""

    every: int = 0  # evaluate every N steps during training, and at the last step; 0 = off
    num_samples: int = 10000  # generated images per evaluation, over all ranks
    split: str = "train"  # real reference split of data.shards
    num_real: int = 10000  # first N images of the split, in shard order; 0 = the whole split
    batch_size: int = 50  # Inception batch per rank
    seed: int = 0  # noise of the generated set: the same images whatever the number of ranks
    # "" = pytorch-fid's file in $TORCH_HOME/hub/checkpoints (downloaded if missing and online);
    # a path = that file; "random" = a seeded random Inception: tests and smoke runs only, its
    # numbers are labelled and not comparable with any published FID.
    inception_weights: str = ""
    stats_dir: str = ""  # cache of real statistics; "" = <data.cache_dir>/fid_stats
    kid_subsets: int = 100  # KID: the mean (and std) over this many random subsets
    kid_subset_size: int = 1000  # KID: images per subset (at most the smaller set)
    recon_split: str = "val"  # VAE, pix2pix: held-out split for reconstruction / inpainting scores
    recon_images: int = 2000  # VAE, pix2pix: first N images of recon_split; 0 = all
    pr_k: int = 3  # precision/recall of generated images: k of the k-NN manifolds; 0 = off
    # a classifier run folder (model.name=classifier) that judges the faces: FD in its features,
    # cGAN attribute accuracy, CycleGAN flip rates (gendist.eval.judge); "" = none
    classifier: str = ""


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    pix2pix: Pix2PixConfig = field(default_factory=Pix2PixConfig)
    cyclegan: CycleGANConfig = field(default_factory=CycleGANConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    srgan: SRGANConfig = field(default_factory=SRGANConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".")
        return getattr(getattr(self, section), key)

    def _validate_cyclegan(self) -> None:
        settings = self.cyclegan
        if settings.domains[0] == settings.domains[1]:
            raise ConfigError(f"cyclegan.domains must be two different domains, got {list(settings.domains)}")
        for key in ("cyclegan.cycle_weight", "cyclegan.identity_weight"):
            if not (math.isfinite(self.get(key)) and self.get(key) >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {self.get(key)}")
        if settings.pool_size < 0 or settings.blocks < 0:
            raise ConfigError("cyclegan.pool_size and cyclegan.blocks must be >= 0")
        if not 0.0 <= settings.decay_from <= 1.0:
            raise ConfigError(f"cyclegan.decay_from must be in [0, 1], got {settings.decay_from}")
        if self.train.mixed_precision == "fp16":
            raise ConfigError(
                "cyclegan with fp16 is refused: one backward steps both generators' optimizers, which one "
                "loss scaler cannot unscale and update per optimizer; use train.mixed_precision=bf16"
            )

    def _validate_classifier(self) -> None:
        settings = self.classifier
        if settings.blocks < 1:
            raise ConfigError(f"classifier.blocks must be >= 1, got {settings.blocks}")
        if not 0.0 <= settings.label_smoothing < 1.0:
            raise ConfigError(f"classifier.label_smoothing must be in [0, 1), got {settings.label_smoothing}")
        repeated = sorted({name for name in settings.attributes if settings.attributes.count(name) > 1})
        if repeated:
            raise ConfigError(f"classifier.attributes names {', '.join(repeated)} more than once")

    def _validate_srgan(self) -> None:
        settings, size = self.srgan, self.model.image_size
        if settings.scale not in (2, 4, 8):
            raise ConfigError(f"srgan.scale must be 2, 4 or 8, got {settings.scale}")
        if size // settings.scale < 8:
            raise ConfigError(
                f"srgan: model.image_size={size} at srgan.scale={settings.scale} leaves "
                f"{size // settings.scale} px inputs; use inputs of at least 8 px"
            )
        if settings.blocks < 1 or settings.pretrain_steps < 0:
            raise ConfigError("srgan.blocks must be >= 1 and srgan.pretrain_steps >= 0")
        for key in ("srgan.pixel_weight", "srgan.content_weight", "srgan.adversarial_weight"):
            if not (math.isfinite(self.get(key)) and self.get(key) >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {self.get(key)}")
        if settings.content == "classifier" and not settings.classifier and settings.content_weight:
            raise ConfigError(
                "srgan.content=classifier needs srgan.classifier=RUN_DIR (a classifier run trained on these "
                "shards: gendist train --config configs/classifier_celeba64.yaml), or srgan.content=vgg19 "
                "(torchvision's VGG19 file in $TORCH_HOME) or srgan.content=none (pixel loss only)"
            )

    def validate(self) -> None:
        size = self.model.image_size
        if size < 16 or size & (size - 1):
            raise ConfigError(f"model.image_size={size}: use a power of two >= 16 (e.g. 64)")
        for name in ("steps", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.data.batch_size < 1 or self.data.num_workers < 0:
            raise ConfigError("data.batch_size must be >= 1 and data.num_workers >= 0")
        if self.loss.n_critic < 1:
            raise ConfigError("loss.n_critic must be >= 1")
        for key in ("optim.lr_g", "optim.lr_d", "loss.clip_value", "vae.gaussian_std", "train.collective_timeout_s"):
            value = self.get(key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a finite number > 0, got {value}")
        for key in ("loss.gp_weight", "vae.beta"):
            value = self.get(key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
        for key in ("model.z_dim", "model.ngf", "model.ndf", "model.label_dim", "train.num_samples"):
            if self.get(key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {self.get(key)}")
        if not all(0.0 <= beta < 1.0 for beta in self.optim.betas):
            raise ConfigError(f"optim.betas must be in [0, 1), got {list(self.optim.betas)}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.train.ema_decay}")
        ev = self.eval
        if ev.every < 0 or ev.num_real < 0 or ev.recon_images < 0:
            raise ConfigError("eval.every, eval.num_real and eval.recon_images must be >= 0")
        if ev.num_samples < 2 or ev.batch_size < 1 or ev.kid_subsets < 1 or ev.kid_subset_size < 2:
            raise ConfigError(
                "eval.num_samples and eval.kid_subset_size must be >= 2, eval.batch_size and eval.kid_subsets >= 1"
            )
        from gendist.families import DECLARATIONS  # the registry imports this module

        name = self.model.name
        if name not in DECLARATIONS:
            raise ConfigError(f"'model.name' must be one of {', '.join(DECLARATIONS)}; got {name!r}")
        if name == "wgan_gp" and self.model.d_norm == "batch":
            raise ConfigError(
                "wgan_gp: batch norm mixes samples, so the per-sample gradient penalty is wrong with it; "
                "set model.d_norm=layer (or instance, none)"
            )
        if name == "wgan_gp" and self.train.mixed_precision == "fp16":
            raise ConfigError(
                "wgan_gp with fp16 is refused: the penalty's double backward under a loss scaler is not "
                "supported here; use train.mixed_precision=bf16"
            )
        if name == "pix2pix" and self.pix2pix.l1_weight < 0:
            raise ConfigError(f"pix2pix.l1_weight must be >= 0, got {self.pix2pix.l1_weight}")
        if name == "pix2pix" and not 0.0 <= self.pix2pix.dropout < 1.0:
            raise ConfigError(f"pix2pix.dropout must be in [0, 1), got {self.pix2pix.dropout}")
        if name == "cyclegan":
            self._validate_cyclegan()
        if name == "classifier":
            self._validate_classifier()
        if name == "srgan":
            self._validate_srgan()
        if name == "cgan" and not self.model.attributes:
            raise ConfigError("cgan needs attributes to condition on, e.g. model.attributes=[Male,Smiling,Eyeglasses]")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two nested config dicts: key -> (old, new)."""
    found: dict[str, tuple[Any, Any]] = {}
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found.update(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            found[f"{prefix}{key}"] = (a, b)
    return found


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides, in that order."""
    cfg = load_into(RunConfig(), path, overrides)
    cfg.validate()
    return cfg


def load_into(target: Any, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Fill the dataclass `target` from a YAML file, then from dotted overrides; returns it."""
    for tree in config_trees(path, overrides):
        _merge(target, tree, prefix="")
    return target


def config_trees(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """What load_into merges, in its order: the YAML file's mapping, then one nested mapping per
    `section.key=value` override."""
    trees = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        trees.append(loaded)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.strip().split(".")
        tree: dict[str, Any] = {leaf: yaml.safe_load(raw) if raw.strip() else ""}
        for parent in reversed(parents):
            tree = {parent: tree}
        trees.append(tree)
    return trees


def set_keys(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The dotted keys that the YAML file or an override gives a value (any value, the default's
    included), as opposed to those left at their dataclass defaults."""

    def leaves(tree: dict[str, Any], prefix: str) -> list[str]:
        return [
            found
            for key, value in tree.items()
            for found in (leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
        ]

    return {key for tree in config_trees(path, overrides) for key in leaves(tree, "")}


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parse_args that also takes `section.key=value` items after options (argparse alone stops
    filling a positional list once an option has come between)."""
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _merge(target: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            section = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(f"unknown key '{where}'{hint}; valid keys in {section}: {', '.join(names)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"'{where}' is a section; give keys under it: "
                    f"{', '.join(f.name for f in dataclasses.fields(current))}"
                )
            _merge(current, value, prefix=f"{where}.")
        else:
            setattr(target, key, _coerce(value, hints[key], where))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) and ("no" if value is False else "yes") in choices:
            return "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` as False
        if value not in choices:
            raise ConfigError(f"'{where}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{where}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        return origin(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is Any:
        return value
    if annotation is float and not isinstance(value, bool):
        # PyYAML reads "2e-4" (no dot) as a string: accept any float literal Python accepts.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{where}' must be a float, got {value!r}") from None
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"'{where}' must be an int, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"'{where}' must be {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value

"""What a family declares, and nothing it runs: its networks (each with its optimizer and an
optional EMA copy), its phases (which network a phase updates, what it freezes, the loss it takes
from the step's batches and shared scratch, how many times it repeats per step), and its sampling
(what the grids show and what evaluation scores). gendist.training.loop runs every family the
same way; this module knows nothing of ranks, engines or checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from gendist.config import RunConfig
from gendist.data.loader import ShardStream, StreamSpec

# z (N, z_dim) and the real attributes (N, A, +-1) the sample should have -> images in [-1, 1]
Generate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# real images in [-1, 1] -> reconstructions in [-1, 1]
Reconstruct = Callable[[torch.Tensor], torch.Tensor]
# real images in [-1, 1] and hole masks (B, 1, H, W; 1 = hole) -> completions in [-1, 1], known pixels kept
Complete = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# images of one domain in [-1, 1] -> their translation into the other domain, in [-1, 1]
Translate = Callable[[torch.Tensor], torch.Tensor]
# real images in [-1, 1] -> logits (B, A) over the family's attributes; > 0 predicts present
Classify = Callable[[torch.Tensor], torch.Tensor]
# low-resolution images in [-1, 1] (gendist.data.resolution.downsample) -> super-resolved, in [-1, 1]
SuperResolve = Callable[[torch.Tensor], torch.Tensor]
# real images in [-1, 1] -> their codes (N, z_dim): an autoencoder's code, a VAE's posterior mean
Encode = Callable[[torch.Tensor], torch.Tensor]
Stats = dict[str, torch.Tensor | float]


@dataclass(frozen=True)
class FamilyInputs:
    """What a declaration may depend on besides the config: the data's attribute names, the
    stream's spec (for a fixed batch of real images in the grids), and the rank."""

    cfg: RunConfig
    attribute_names: list[str]
    spec: StreamSpec | None = None  # None when only sampling (gendist eval, compare)
    rank: int = 0  # seeds per-rank state (an image pool's draws)


@dataclass
class Network:
    """A trained network: checkpointed as `name`, its optimizer as `optimizer`, its EMA as `<name>_ema`."""

    name: str
    module: nn.Module
    optimizer: str
    lr: float
    ema: bool = False
    lr_factor: Callable[[int], float] | None = None  # step (from 1) -> multiplier of lr: a schedule


class StepContext:
    """What a phase's loss sees: the networks as the loop prepared them (DDP or an engine), their
    bare modules, `next_batch(stream="train")` giving this rank's next batch of a named stream, this
    rank's index (for per-sample seeds), the step
    (counted from 1), the repeat within the phase, and scratch shared by the phases of one step (a
    GAN's last fake batch)."""

    def __init__(
        self,
        nets: dict[str, nn.Module],
        bare: dict[str, nn.Module],
        next_batch: Callable[..., dict],
        device: torch.device,
        rank: int = 0,
    ) -> None:
        self.nets, self.bare, self.next_batch, self.device, self.rank = nets, bare, next_batch, device, rank
        self.step, self.repeat, self.repeats = 0, 0, 1
        self.scratch: dict[str, Any] = {}

    @property
    def last_repeat(self) -> bool:
        return self.repeat == self.repeats - 1


@dataclass
class Phase:
    """One kind of update: `loss(ctx)` -> (loss, stats) steps `network` (or several networks from
    one backward: CycleGAN's generators, coupled by the cycle loss); `frozen` networks are used but
    get no parameter gradients (and no gradient sync). Each of `repeats` repeats is its own update;
    `after_update` runs after each (WGAN's weight clipping). `when(step)` says at which steps the
    phase runs (None: every step; SRGAN's stages)."""

    name: str
    network: str | tuple[str, ...]
    loss: Callable[[StepContext], tuple[torch.Tensor, Stats]]
    repeats: int = 1
    frozen: tuple[str, ...] = ()
    after_update: Callable[[], None] | None = None
    when: Callable[[int], bool] | None = None

    @property
    def updated(self) -> tuple[str, ...]:
        return (self.network,) if isinstance(self.network, str) else self.network


@dataclass
class Sampling:
    """What evaluation scores (`generate`, and `reconstruct` for autoencoders) with the label its
    scores carry, and the sample grids written into a run's samples/ folder at a step."""

    generate: Generate | None  # None: the family is not scored as a noise-driven sampler
    label: str
    write_grids: Callable[[Path, int], None]
    reconstruct: Reconstruct | None = None
    complete: Complete | None = None  # inpainting families
    # translation families (CycleGAN): (source domain, target domain) -> the translator, both ways;
    # a domain D of split S is the shard split "S.D" (gendist shards domains)
    translate: dict[tuple[str, str], Translate] | None = None
    # attribute classifiers: the logits and the data's attribute names they predict, column by column
    classify: Classify | None = None
    classify_attributes: list[str] | None = None
    # conditional generators: the data's attribute names `generate` makes its samples have
    conditioned_on: list[str] | None = None
    # super-resolution families: srgan.scale times the input's size (the evaluator makes the inputs)
    super_resolve: SuperResolve | None = None
    # autoencoders: with `generate` (the decoder), evaluation also scores samples decoded from a
    # Gaussian fitted to the codes of training images (the ex-post density), beside the N(0, I) prior
    encode: Encode | None = None


@dataclass
class Export:
    """How a family's sampling network is rebuilt without gendist's training code (gendist export):
    the checkpointed network, its class (a plain module of gendist.models) and constructor
    arguments, the method that maps codes z (and a conditional generator's 0/1 labels) to its
    output, and what turns that output into images in [-1, 1]."""

    network: str
    module: type[nn.Module]
    kwargs: dict[str, Any]
    method: str = "forward"
    output: str = "images"  # "images": in [-1, 1] already; "sigmoid": logits; "clamp": Gaussian means
    labels: list[str] | None = None  # a conditional generator's label columns, by attribute name


def exported_images(output: torch.Tensor, kind: str) -> torch.Tensor:
    """A sampling network's output as images in [-1, 1] (Export.output): the same transform for the
    family's own sampling and for an export."""
    if kind == "sigmoid":
        return torch.sigmoid(output.float()) * 2 - 1
    return output.float().clamp(-1, 1)


@dataclass
class Family:
    networks: list[Network]
    phases: list[Phase]
    # the bare networks by name (EMA copies as "<name>_ema", their averaged module) -> Sampling
    sampling: Callable[[dict[str, nn.Module]], Sampling]
    notes: list[str] = field(default_factory=list)  # printed at start-up
    # state that differs between ranks and must survive a resume (CycleGAN's pools of past fakes):
    # objects with state_dict / load_state_dict, checkpointed per rank
    per_rank: dict[str, Any] = field(default_factory=dict)
    # the named data streams, name -> split, each with its own position (None: one stream, "train",
    # of data.split); a phase reads one with ctx.next_batch(name)
    streams: dict[str, str] | None = None
    export: Export | None = None  # noise-driven samplers: what gendist export writes


def fixed_real_batch(spec: StreamSpec, count: int) -> torch.Tensor:
    """The first `count` images of epoch 0 as one rank would read them: the same for every run."""
    spec = dataclasses.replace(spec, rank=0, world_size=1, batch_size=count)
    images = next(iter(ShardStream(spec)))["images"]
    return images.float().div_(127.5).sub_(1.0)


def in_memory_format(net: nn.Module, cfg: RunConfig) -> nn.Module:
    """`net` in the run's memory format (train.channels_last)."""
    return net.to(memory_format=torch.channels_last) if cfg.train.channels_last else net


def ema_with_warmup(decay: float):
    """EMA whose decay grows as (1 + n) / (10 + n) up to `decay`: early grids are not dominated by
    the random initial weights (at 0.999, step 250 would still weigh them 78%)."""

    def average(ema_param: torch.Tensor, param: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1.0 + num_averaged) / (10.0 + num_averaged), max=decay).to(ema_param.dtype)
        return d * ema_param + (1 - d) * param

    return average


def averaged(module: nn.Module, decay: float = 0.0) -> AveragedModel:
    """The EMA copy of a network, as trained and as checkpointed (`<name>_ema`)."""
    return AveragedModel(module, avg_fn=ema_with_warmup(decay) if decay else None, use_buffers=True)


def sampling_from_checkpoint(family: Family, shared: dict, device: torch.device) -> Sampling:
    """A checkpoint's networks (their EMA copies where it holds them), ready to sample."""
    bare: dict[str, nn.Module] = {}
    for network in family.networks:
        network.module.load_state_dict(shared[network.name])
        bare[network.name] = network.module.to(device).eval()
        if f"{network.name}_ema" in shared:
            ema = averaged(network.module)
            ema.load_state_dict(shared[f"{network.name}_ema"])
            bare[f"{network.name}_ema"] = ema.module.to(device).eval()
    return family.sampling(bare)

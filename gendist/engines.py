"""How each network and its optimizer take a step: through Accelerate (DDP), or through one DeepSpeed
engine per network when `accelerate launch` ran with a DeepSpeed config (launch/ds_zero*.yaml).

Accelerate's DeepSpeed integration drives one engine per Accelerator; a GAN needs two (G and D,
each with its own optimizer, stepping at different times), so gendist builds the engines itself
from the same launch config and keeps the Accelerator for everything else (process group, device,
reductions). ZeRO stages 1 and 2 only: parameters stay whole on every rank, which the generator
EMA, the sample grids, the evaluator and plain-format checkpoints rely on.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import nn

from gendist.config import ConfigError, RunConfig

USE_DEEPSPEED = "ACCELERATE_USE_DEEPSPEED"
# torch.compile modes that capture CUDA graphs on a GPU
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
MAX_BUCKET = 25 * 2**20 // 4  # elements per ZeRO reduce / all-gather bucket: DDP's 25 MiB of fp32


class Update(Protocol):
    """One optimizer step of one network from a loss; `optimizer` holds the hyperparameters."""

    optimizer: torch.optim.Optimizer

    def __call__(self, loss: torch.Tensor) -> None: ...


class AcceleratorUpdate:
    """DDP through Accelerate: zero_grad, backward (gradients all-reduced), step."""

    def __init__(self, accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> None:
        self.accelerator, self.optimizer = accelerator, optimizer

    def __call__(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.optimizer.step()


class EngineUpdate:
    """DeepSpeed: the engine scales, reduces (reduce-scatter under ZeRO-2), steps its sharded
    optimizer, re-gathers the parameters and zeroes the gradients."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.optimizer = engine, engine.optimizer

    def __call__(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()


class JointUpdate:
    """Several networks stepped from one backward (CycleGAN's generators, coupled by the cycle loss),
    each by its own optimizer: zero_grad all, one backward (each DDP network all-reduces its own
    gradients), step each. Adam per network equals one Adam over all their parameters."""

    def __init__(self, accelerator: Accelerator, updates: list[Update]) -> None:
        if not all(isinstance(update, AcceleratorUpdate) for update in updates):
            raise ConfigError(
                "a phase that steps several networks from one backward cannot run under DeepSpeed: each "
                "engine owns the backward of its loss (engine.backward); use a DDP launch"
            )
        self.accelerator, self.updates = accelerator, updates

    def __call__(self, loss: torch.Tensor) -> None:
        for update in self.updates:
            update.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        for update in self.updates:
            update.optimizer.step()


@functools.cache
def launch_settings() -> dict[str, Any] | None:
    """The DeepSpeed section of the launch config as a DeepSpeed config (values still "auto" where
    gendist decides them), or None when the launch was not a DeepSpeed one."""
    if os.environ.get(USE_DEEPSPEED, "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin().deepspeed_config  # reads the launcher's ACCELERATE_DEEPSPEED_* variables


@contextlib.contextmanager
def accelerate_without_deepspeed() -> Iterator[None]:
    """Build an Accelerator as a plain multi-process one under a DeepSpeed launch: gendist, not
    Accelerate, owns the engines (Accelerate would also want one model per Accelerator)."""
    launched = os.environ.pop(USE_DEEPSPEED, None)
    try:
        yield
    finally:
        if launched is not None:
            os.environ[USE_DEEPSPEED] = launched


def engine_config(settings: dict[str, Any], cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """A complete DeepSpeed config: the launch settings with gendist's batch size and precision filled
    in, or a ConfigError for combinations that cannot train correctly."""
    config = {
        key: value for key, value in settings.items() if key not in ("train_batch_size", "fp16", "bf16", "bfloat16")
    }
    zero = dict(config.get("zero_optimization", {}))
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2):
        raise ConfigError(
            f"DeepSpeed ZeRO stage {stage} is not supported: use stage 1 or 2 (launch/ds_zero1.yaml, "
            "launch/ds_zero2.yaml); stage 3 shards the parameters themselves, which the generator EMA, "
            "the sample grids and the evaluator read whole"
        )
    if cfg.model.name == "wgan":
        raise ConfigError(
            "wgan (weight clipping) under DeepSpeed is refused: ZeRO keeps the fp32 master weights in "
            "optimizer shards, so clipping the model's parameters would be undone at the next step; "
            "use wgan_gp, or the plain backend (launch/multi_gpu.yaml) for wgan"
        )
    if cfg.model.name == "cyclegan":
        raise ConfigError(
            "cyclegan under DeepSpeed is refused: its two generators are coupled by the cycle loss and "
            "step together from one backward, while each DeepSpeed engine owns the backward of its own "
            "loss (engine.backward); train it with DDP (launch/multi_gpu.yaml, torchrun)"
        )
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError(
            "train.mixed_precision=fp16 under DeepSpeed is refused: DeepSpeed's fp16 mode keeps fp16 "
            "weights (the generator EMA and the plain checkpoints need fp32), and its autocast mode has "
            "no loss scaler with ZeRO; use train.mixed_precision=bf16"
        )
    if cfg.train.compile != "no":
        raise ConfigError(
            f"train.compile={cfg.train.compile} under DeepSpeed is refused: an engine compiles through its "
            "own engine.compile, which gendist does not drive yet; use train.compile=no, or a DDP launch"
        )
    accumulation = config.get("gradient_accumulation_steps", 1)
    if accumulation not in (1, "auto"):
        raise ConfigError(
            f"gradient_accumulation_steps={accumulation} in the DeepSpeed config: gendist takes one "
            "optimizer step per batch (grow data.batch_size instead); set it to 1 or auto"
        )
    if zero.get("offload_optimizer", {}).get("device") not in (None, "none"):
        raise ConfigError(
            "ZeRO optimizer offload is not supported: gendist's optimizers are torch's (optim.name), "
            "and DeepSpeed offloads only its own CPU Adam; set offload_optimizer_device: none"
        )
    for unused in ("offload_optimizer", "offload_param", "stage3_gather_16bit_weights_on_model_save"):
        zero.pop(unused, None)  # Accelerate writes them empty; stages 1 and 2 have no use for them
    config.update(
        {
            "zero_optimization": zero,
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.data.batch_size * world_size,
            # torch's own optimizers (build_optimizer) are wrapped by ZeRO; RMSprop is not on its list
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
        }
    )
    if config.get("gradient_clipping", "auto") == "auto":
        # Unset, DeepSpeed clips every engine's gradients to a global norm of 1.0, which the plain
        # backend never does (Pix2Pix's U-Net alone has norms of ~5 from lambda x L1): off, as there.
        config["gradient_clipping"] = 0.0
    if cfg.train.mixed_precision == "bf16":
        # Weights and optimizer state stay fp32 and forwards run under torch.autocast: the same
        # numerics as the plain backend's bf16 (and an fp32 gradient penalty and EMA).
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """A DeepSpeed engine for one network and its optimizer, loading checkpoints safely."""
    import deepspeed

    config = {**config, "zero_optimization": dict(config["zero_optimization"])}
    # DeepSpeed's default buckets hold 5e8 elements (2 GB in fp32, twice with overlapped
    # communication) whatever the model, more than ZeRO-2 saves on a GAN; DDP's bucket size instead.
    numel = -(-sum(p.numel() for p in model.parameters()) // 64) * 64  # DeepSpeed wants aligned sizes
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if config["zero_optimization"].get(key, "auto") == "auto":
            config["zero_optimization"][key] = min(numel, MAX_BUCKET)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.checkpoint_engine = safe_checkpoint_engine(engine)
    return engine


def safe_checkpoint_engine(engine: Any) -> Any:
    """DeepSpeed's torch checkpoint engine with torch.load(weights_only=True): no pickled code runs
    when a run resumes, only tensors, containers and the few DeepSpeed types its files hold."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([ZeroStageEnum, fragment_address, LossScaler]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(engine._config)


def no_sync(accelerator: Accelerator, model: nn.Module) -> contextlib.AbstractContextManager:
    """Skip gradient synchronisation of `model` for a backward that gives it no gradients (its
    parameters are frozen). DDP needs to be told; a ZeRO engine only reduces what it receives."""
    return contextlib.nullcontext() if is_engine(model) else accelerator.no_sync(model)


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """`model` (DDP-wrapped or bare) under torch.compile in `mode`, or as it is for "no". Compiling
    the DDP wrapper lets Dynamo split the graph at DDP's gradient buckets, so the all-reduce still
    overlaps the backward."""
    return model if mode == "no" else torch.compile(model, mode=mode)


def for_input_gradients(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The network to take input gradients through (autograd.grad, as the gradient penalty does).
    A compiled network's eager original: compiled graphs cannot take the double backward of a loss
    on input gradients. A DeepSpeed engine treats every backward through its outputs as its training
    backward and would reduce and clear gradients at the end of the penalty's autograd.grad; its bare
    module under the engine's autocast computes the same function on the same parameters, whose
    gradients the engine then reduces in the one backward of the total loss. DDP modules are used
    as they are."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return model._orig_mod
    if not is_engine(model):
        return model
    from deepspeed.runtime.torch_autocast import autocast_if_enabled

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        with autocast_if_enabled(model):
            return model.module(*inputs)

    return forward


def is_engine(model: Any) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def save_engines(engines: dict[str, Any], folder: Path) -> None:
    """Collective: each engine's sharded optimizer state (every rank its own shard) into folder/<name>."""
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder), tag=name, save_latest=False)


def load_engines(engines: dict[str, Any], folder: Path) -> None:
    for name, engine in engines.items():
        loaded, _ = engine.load_checkpoint(
            str(folder), tag=name, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed state for '{name}' in {folder}")

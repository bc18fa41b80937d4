"""Deep Dream (Mordvintsev et al. 2015): gradient ascent on an input image to amplify what a chosen
layer (or one of its channels, or one attribute logit) of a trained network responds to.

Per octave, from the coarsest (the image scaled down by octave_scale^(octaves-1)) to the full size:
the image is the octave's base plus the detail dreamed so far, scaled up; `steps` times it is rolled
by a random jitter, fed to the network (resized to the network's input size, so fixed-size
discriminators work too), the objective's gradient is normalised by its mean absolute value, a step
of `step_size` is taken, the roll undone, and the image clamped to [-1, 1]. The objective is the mean
square of the layer's (or channel's) activations, or the attribute's logit. As in
pytorch-deepdream: octave scale 1.4, 10 steps per octave, jitter, normalised gradients.

    gendist dream RUN --image face.jpg --out DIR [--network classifier] [--layers stages.2,stages.3]
    gendist dream inception --image face.jpg --out DIR [--inception-weights FILE] [--size 299]

`inception` dreams with the FID network (pytorch-fid's InceptionV3, the weights checked as for FID:
$TORCH_HOME's file, a path, or `random`), on images of --size pixels; its stages are its 4 blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.utils import save_image

from gendist.config import ConfigError, load_config
from gendist.data.loader import read_attributes, read_in_order
from gendist.data.shards import Preprocess
from gendist.distributed import build_fp32_accelerator
from gendist.eval.inception import DreamInception
from gendist.trained import find_checkpoint, load_network, load_sampling, trained_attribute_names
from gendist.training.stream import resolve_shards


@dataclass(frozen=True)
class DreamSettings:
    octaves: int = 4
    octave_scale: float = 1.4
    steps: int = 10  # per octave
    step_size: float = 0.02  # in [-1, 1] image units, per normalised-gradient step
    jitter: int = 4  # pixels of random roll per step
    seed: int = 0


@contextlib.contextmanager
def recorded(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of `module` during the block, in call order."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def objective(network: nn.Module, images: torch.Tensor, target: str, size: int, channel: int | None = None):
    """Per image: the mean square of `target`'s activations (a module name; `channel` picks one), or
    the logit `target` = "logit:I" (index I of the network's output)."""
    inputs = images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bilinear")
    if target.startswith("logit:"):
        return network(inputs).reshape(len(inputs), -1)[:, int(target.removeprefix("logit:"))]
    with recorded(network.get_submodule(target)) as outputs:
        network(inputs)
    activation = outputs[0]
    if channel is not None:
        activation = activation[:, channel : channel + 1]
    return activation.float().pow(2).flatten(1).mean(dim=1)


def dream(
    network: nn.Module,
    images: torch.Tensor,
    target: str,
    settings: DreamSettings = DreamSettings(),
    channel: int | None = None,
) -> torch.Tensor:
    """`images` (B, 3, H, W) in [-1, 1] dreamed with `network` (in eval mode, weights untouched)."""
    size = images.shape[-1]
    generator = torch.Generator().manual_seed(settings.seed)
    shapes = [
        (max(8, round(images.shape[-2] / settings.octave_scale**k)), max(8, round(size / settings.octave_scale**k)))
        for k in reversed(range(settings.octaves))
    ]
    params = [p for p in network.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        detail = torch.zeros_like(F.interpolate(images, size=shapes[0], mode="bilinear", antialias=True))
        for shape in shapes:
            base = (
                F.interpolate(images, size=shape, mode="bilinear", antialias=True)
                if shape != images.shape[-2:]
                else images
            )
            image = (base + F.interpolate(detail, size=shape, mode="bilinear")).detach()
            for _ in range(settings.steps):
                dy, dx = (
                    int(v) for v in torch.randint(-settings.jitter, settings.jitter + 1, (2,), generator=generator)
                )
                image = torch.roll(image, (dy, dx), dims=(2, 3)).requires_grad_(True)
                (gradient,) = torch.autograd.grad(objective(network, image, target, size, channel).sum(), image)
                gradient = gradient / (gradient.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8)
                image = torch.roll((image + settings.step_size * gradient).detach(), (-dy, -dx), dims=(2, 3))
                image = image.clamp(-1, 1)
            detail = image - base
        return image
    finally:
        for p in params:
            p.requires_grad_(True)


def default_layers(network: nn.Module) -> list[str]:
    """The stages of a network that has them (the classifier's `stages`); otherwise --layers is needed."""
    stages = getattr(network, "stages", None)
    if isinstance(stages, nn.ModuleList):
        return [f"stages.{i}" for i in range(len(stages))]
    names = [name for name, module in network.named_modules() if name and not list(module.children())]
    raise ConfigError(f"{type(network).__name__} has no stages: pick --layers among {', '.join(names)}")


def read_images(paths: list[str], size: int) -> torch.Tensor:
    """Image files centre-cropped and resized as the converter does, in [-1, 1]."""
    preprocess = Preprocess(size)
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(preprocess(image.convert("RGB"))))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def shard_images(shard_dir: str, split: str, count: int, size: int) -> torch.Tensor:
    """The first `count` images of a split of a shard set, in [-1, 1]."""
    images, _, _ = read_in_order(shard_dir, split, size, count)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def generated_images(run_dir: Path, count: int, size: int, seed: int) -> torch.Tensor:
    """`count` samples of a generator run (seeded noise; a conditional one gets the first label rows
    of its training split), in [-1, 1] at `size`."""
    cfg = load_config(run_dir / "config.yaml")
    accelerator = build_fp32_accelerator()
    shard_dir = resolve_shards(cfg, accelerator)
    sampling, _ = load_sampling(cfg, find_checkpoint(run_dir, None), accelerator, trained_attribute_names(run_dir, cfg))
    if sampling.generate is None:
        raise ConfigError(f"--generated {run_dir}: a {cfg.model.name} run generates no images from noise")
    labels = torch.from_numpy(read_attributes(shard_dir, cfg.data.split, strict=False)[:count]).float()
    noise = torch.randn(count, cfg.model.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        images = sampling.generate(noise, labels).float().clamp(-1, 1)
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bilinear")


def dream_inputs(args: argparse.Namespace, size: int) -> tuple[torch.Tensor, list[str]]:
    """The images to dream on (--image files, --shards images, or --generated samples) and their names."""
    if args.image:
        return read_images(args.image, size), [Path(path).stem for path in args.image]
    if args.shards:
        images = shard_images(args.shards, args.split, args.count, size)
        return images, [f"{args.split}_{i:04d}" for i in range(len(images))]
    return generated_images(Path(args.generated), args.count, size, args.seed), [
        f"sample_{i:04d}" for i in range(args.count)
    ]


def add_dream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (config.yaml and checkpoints/), or `inception`")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", nargs="+", help="image files to dream on")
    inputs.add_argument("--shards", help="a shard folder: dream on the first --count images of its --split")
    inputs.add_argument("--generated", metavar="RUN", help="a generator run: dream on --count of its samples")
    parser.add_argument("--split", default="val", help="with --shards: the split (default val)")
    parser.add_argument("--count", type=int, default=8, help="with --shards or --generated: how many images")
    parser.add_argument("--out", required=True, help="output folder: one PNG per image and layer, and grid.png")
    parser.add_argument("--network", help="which of the run's networks (default: classifier, else discriminator)")
    parser.add_argument("--layers", help="comma-separated module names, or logit:I (default: the network's stages)")
    parser.add_argument("--channel", type=int, help="one channel of each layer instead of all")
    parser.add_argument("--checkpoint", help="a checkpoint folder instead of the run's latest")
    parser.add_argument(
        "--inception-weights",
        default="",
        help="with inception: pytorch-fid's weights file ('' = $TORCH_HOME's; random = a random-init network)",
    )
    parser.add_argument("--size", type=int, default=299, help="with inception: the images' size in pixels")
    for field, default in vars(DreamSettings()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)


def dreamer(args: argparse.Namespace) -> tuple[nn.Module, int]:
    """The network to dream with (a run's, or the FID Inception) and the image size it dreams at."""
    if args.run_dir == "inception":
        return DreamInception(args.inception_weights), args.size
    run_dir = Path(args.run_dir)
    trained = load_network(run_dir, find_checkpoint(run_dir, args.checkpoint), args.network, [])
    return trained.module, trained.cfg.model.image_size


def run(args: argparse.Namespace) -> int:
    """`gendist dream`: each image dreamed for each layer; prints each objective before and after."""
    try:
        network, size = dreamer(args)
        layers = args.layers.split(",") if args.layers else default_layers(network)
        settings = DreamSettings(**{field: getattr(args, field) for field in vars(DreamSettings())})
        images, names = dream_inputs(args, size)
    except (ConfigError, FileNotFoundError, OSError, ValueError) as err:
        print(f"gendist dream: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = [images]
    start = time.perf_counter()
    for layer in layers:
        dreamed = dream(network, images, layer, settings, args.channel)
        with torch.no_grad():
            before = objective(network, images, layer, size, args.channel)
            after = objective(network, dreamed, layer, size, args.channel)
        for name, image in zip(names, dreamed):
            save_image(image, out / f"{name}_{layer.replace(':', '_')}.png", normalize=True, value_range=(-1, 1))
        change = (  # a logit may start negative: its rise, not a ratio
            f"+{(after - before).mean():.3g} per image"
            if layer.startswith("logit:")
            else f"{(after / before).mean():.2f}x per image"
        )
        print(f"{layer}: objective {before.mean():.4g} -> {after.mean():.4g} ({change})")
        columns.append(dreamed)
    seconds = time.perf_counter() - start
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # per image: the original, then each layer's dream
    save_image(grid, out / "grid.png", nrow=len(columns), normalize=True, value_range=(-1, 1))
    print(
        f"wrote {len(names) * len(layers)} dreamed images and {out / 'grid.png'} (original | {' | '.join(layers)}); "
        f"dreaming took {seconds:.1f} s, {seconds / (len(names) * len(layers)):.2f} s per image and layer"
    )
    return 0

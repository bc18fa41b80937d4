"""`gendist export RUN --format safetensors --out DIR`: a run's sampling network (a GAN's generator, the
VAE or autoencoder) as `generator.safetensors` plus `generator.json` (its class in gendist.models, the
constructor arguments, how codes become images, the data's preprocessing), loadable without gendist's
training code:

    import importlib, json, torch
    from safetensors.torch import load_file
    spec = json.load(open("DIR/generator.json"))
    module, name = spec["module"].rsplit(".", 1)
    net = getattr(importlib.import_module(module), name)(**spec["kwargs"]).eval()
    net.load_state_dict(load_file("DIR/generator.safetensors"))
    out = getattr(net, spec["method"])(torch.randn(16, spec["z_dim"]))  # cgan: (z, 0/1 labels of spec["labels"])
    images = out.sigmoid() * 2 - 1 if spec["output"] == "sigmoid" else out.clamp(-1, 1)  # in [-1, 1]

`gendist sample DIR` samples an export of an unconditional generator as it samples a run. The weights
are the EMA copy where the run keeps one (--no-ema: the trained weights). Loading imports the class the
JSON names: gendist refuses anything but a network class of gendist.models, and so should a snippet
that reads exports it did not write.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gendist import families
from gendist.checkpoint import CheckpointError, load_checkpoint
from gendist.config import ConfigError, load_config
from gendist.families.base import FamilyInputs, Generate, exported_images
from gendist.trained import find_checkpoint, trained_attribute_names
from gendist.training.config_record import read_data_record

WEIGHTS, SPEC = "generator.safetensors", "generator.json"
MODELS = "gendist.models."  # the only modules an export may name
FORMAT = "gendist-export-1"


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder of a generator family (dcgan, wgan_gp, cgan, vae, ae, ...)")
    parser.add_argument("--out", required=True, help="folder for generator.safetensors and generator.json")
    parser.add_argument("--format", choices=["safetensors"], default="safetensors", help="(the one format)")
    parser.add_argument("--checkpoint", help="a checkpoint folder instead of the latest")
    parser.add_argument("--no-ema", action="store_true", help="the trained weights, not the EMA copy")


def export_run(args: argparse.Namespace) -> int:
    run_dir, out = Path(args.run_dir), Path(args.out)
    cfg = load_config(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir, args.checkpoint)
    declared = families.declare(FamilyInputs(cfg, trained_attribute_names(run_dir, cfg))).export
    if declared is None:
        raise ConfigError(
            f"{run_dir} is a {cfg.model.name} run, which samples no images from codes; gendist export takes the "
            "generator families (gan, dcgan, wgan, wgan_gp, cgan, vae, ae)"
        )
    shared, _ = load_checkpoint(checkpoint, 0)
    ema = f"{declared.network}_ema"
    use_ema = ema in shared and not args.no_ema
    if use_ema:  # an AveragedModel's state: module.<key>, and its counter
        weights = {key.removeprefix("module."): value for key, value in shared[ema].items() if key != "n_averaged"}
    else:
        weights = shared[declared.network]
    out.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in weights.items()}, str(out / WEIGHTS))
    record = read_data_record(run_dir) or {}
    spec = {
        "format": FORMAT,
        "module": f"{declared.module.__module__}.{declared.module.__qualname__}",
        "kwargs": declared.kwargs,
        "method": declared.method,
        "output": declared.output,
        "labels": declared.labels,
        "z_dim": cfg.model.z_dim,
        "image_size": cfg.model.image_size,
        "family": cfg.model.name,
        "weights": "EMA" if use_ema else "trained",
        "run": str(run_dir),
        "checkpoint": str(checkpoint),
        "step": shared["train_state"]["step"],
        "preprocessing": record.get("preprocessing"),
    }
    (out / SPEC).write_text(json.dumps(spec, indent=1) + "\n")
    described = f"{len(weights)} tensors, {spec['weights']} weights of step {spec['step']}"
    print(f"wrote {out / WEIGHTS} ({described}) and {out / SPEC}")
    return 0


def is_export(folder: Path) -> bool:
    return (Path(folder) / SPEC).is_file()


def load_export(folder: Path, device: torch.device) -> tuple[Generate, dict]:
    """An export's network as a sampler of z (and a conditional one's 0/1 labels), and its spec."""
    spec = json.loads((Path(folder) / SPEC).read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{folder / SPEC} is not a gendist export ({FORMAT})")
    module_name, class_name = spec["module"].rsplit(".", 1)
    # the JSON names what gets imported and called: only gendist's own network classes, never any callable
    network_class = (
        getattr(importlib.import_module(module_name), class_name, None) if module_name.startswith(MODELS) else None
    )
    if not (isinstance(network_class, type) and issubclass(network_class, nn.Module)):
        raise ValueError(f"{folder / SPEC} names {spec['module']!r}, which is not a network class of {MODELS}*")
    network: nn.Module = network_class(**spec["kwargs"])
    network.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    network = network.to(device).eval()
    method = getattr(network, spec["method"])

    def generate(z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return exported_images(method(z) if labels is None else method(z, labels), spec["output"])

    return generate, spec


def run(args: argparse.Namespace) -> int:
    try:
        return export_run(args)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"gendist: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gendist.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_export_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

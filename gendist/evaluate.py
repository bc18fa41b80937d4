"""Evaluation entry points, the same under every launcher:

    gendist eval RUN_DIR --num-samples 10000                  score a run's latest checkpoint
                                                              (a translation family: its held-out domains)
    accelerate launch -m gendist.evaluate RUN_DIR             the same, spread over the ranks
    gendist fid-stats --config configs/dcgan_celeba64.yaml    build the real statistics ahead

The run's own config.yaml defines model, data and protocol; `eval.*` overrides change the
protocol (e.g. eval.inception_weights=/models/pt_inception-2015-12-05-6726825d.pth).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gendist import distributed
from gendist.checkpoint import CheckpointError
from gendist.config import ConfigError, load_config, parse_args_with_overrides
from gendist.data.shards import read_manifest
from gendist.eval.evaluator import Evaluator, append_row, shown_keys
from gendist.eval.inception import InceptionWeightsError
from gendist.trained import find_checkpoint, load_sampling
from gendist.training.stream import resolve_shards


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", help="a checkpoint folder to score instead of the latest")
    parser.add_argument("--num-samples", type=int, help="generated images (eval.num_samples)")
    parser.add_argument(
        "overrides", nargs="*", metavar="eval.key=value", help="protocol overrides, e.g. eval.split=val"
    )


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML: its data.shards and eval.* define the reference")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. eval.num_real=50000")


def evaluate_run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    overrides = list(args.overrides) + ([f"eval.num_samples={args.num_samples}"] if args.num_samples else [])
    cfg = load_config(run_dir / "config.yaml", overrides)
    checkpoint = find_checkpoint(run_dir, args.checkpoint)
    accelerator = distributed.build_fp32_accelerator()
    shard_dir = resolve_shards(cfg, accelerator)
    sampling, state = load_sampling(cfg, checkpoint, accelerator, read_manifest(shard_dir)["attribute_names"])
    row = Evaluator(cfg, accelerator, shard_dir).evaluate_sampling(sampling, state["step"])
    row.update(images_seen=state["images_seen"], source="gendist eval", checkpoint=str(checkpoint))
    if accelerator.is_main_process:
        append_row(run_dir, row)
        shown = "  ".join(f"{k} {row[k]:.5g}" for k in shown_keys(row))
        print(f"{run_dir} step {row['step']}: {shown}\n  seconds: {row['seconds']}\n  protocol: {row['protocol']}")
    return 0


def build_reference(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    accelerator = distributed.build_fp32_accelerator()
    evaluator = Evaluator(cfg, accelerator, resolve_shards(cfg, accelerator))
    reference = evaluator.reference()
    distributed.rank_print(
        accelerator, f"FID reference of {reference.count} '{cfg.eval.split}' images: {reference.path}"
    )
    return 0


def run(command, args: argparse.Namespace) -> int:
    """Run `command` with user mistakes reported in one line (distributed.run_on_every_rank)."""
    return distributed.run_on_every_rank(
        lambda: command(args), (ConfigError, InceptionWeightsError, FileNotFoundError, ValueError, CheckpointError)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gendist.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_arguments(parser)
    return run(evaluate_run, parse_args_with_overrides(parser, argv))


if __name__ == "__main__":
    sys.exit(main())

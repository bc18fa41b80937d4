"""Training entry point, the same under every launcher:

accelerate launch -m gendist.train --config configs/dcgan_celeba64.yaml optim.lr_g=1e-4
torchrun --nproc_per_node 8 -m gendist.train --config configs/dcgan_celeba64.yaml
gendist train --config configs/dcgan_default.yaml          (one process)
"""

from __future__ import annotations

import argparse
import sys

from gendist import distributed
from gendist.checkpoint import CheckpointError
from gendist.config import ConfigError, parse_args_with_overrides, to_yaml
from gendist.eval.inception import InceptionWeightsError
from gendist.launcher import training_config
from gendist.training.loop import train as train_family
from gendist.training.ownership import RunFolderBusy
from gendist.training.window import Diverged


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (see configs/); defaults apply without one")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="e.g. optim.lr_g=1e-4 train.steps=500"
    )


def run(args: argparse.Namespace) -> int:
    try:  # the experiment config with the launcher's precision and compilation resolved into it
        cfg, settings = training_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    if distributed.launched_rank() == 0:
        print(f"settings: {'; '.join(settings)}", flush=True)

    def train() -> int:
        train_family(cfg)
        return 0

    # Said in one line: refusals at set-up (ConfigError), missing FID weights with eval.every > 0
    # (said at start-up), unreadable checkpoints, a run that diverged, and a run folder another job holds.
    return distributed.run_on_every_rank(
        train, (ConfigError, InceptionWeightsError, CheckpointError, Diverged, RunFolderBusy)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gendist.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_arguments(parser)
    return run(parse_args_with_overrides(parser, argv))


if __name__ == "__main__":
    sys.exit(main())

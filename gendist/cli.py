"""The `gendist` command: train, shards (dataset conversion), eval, fid-stats, sample, export, translate, augment,
dream, compare, sweep and config (every config key, or what a preset changes)."""

from __future__ import annotations

import argparse
import sys

from gendist import augment, config_help, dream, evaluate, export, sample, sweep, train, translate
from gendist.config import parse_args_with_overrides
from gendist.data.domains import write_domains
from gendist.data.shard_references import check_reference, load_reference, write_reference
from gendist.data.shards import CELEBA_CROP_FRACTION, Preprocess, verify_shards, write_shards
from gendist.data.sources import CelebASource, FolderSource, parse_carve
from gendist.data.synthetic import SyntheticFacesSource


def _shard_options(parser: argparse.ArgumentParser, crop_fraction: float) -> None:
    parser.add_argument("--out", required=True, help="output folder for the tar shards and manifest.json")
    parser.add_argument("--size", type=int, default=64, help="square output size in pixels (default 64)")
    parser.add_argument(
        "--crop-fraction",
        type=float,
        default=crop_fraction,
        help=f"side of the centre square crop as a fraction of the shorter side (default {crop_fraction:.4f})",
    )
    parser.add_argument(
        "--encoding",
        choices=["raw", "jpeg", "png"],
        default="raw",
        help="raw: blocks of uint8 arrays, fastest to read (default); jpeg/png: one image per sample, smaller",
    )
    parser.add_argument("--images-per-sample", type=int, default=64, help="images per raw block (default 64)")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard (default 4096)")
    parser.add_argument("--workers", type=int, default=None, help="conversion processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order within shards")
    parser.add_argument(
        "--carve",
        metavar="SPLIT=AMOUNT,...",
        default=None,
        help="take held-out val/test splits out of train when the source has none, e.g. val=0.05,test=500 "
        "(an image count or a fraction of the train images, chosen in sha256 order of the file names; recorded in "
        "manifest.json)",
    )


def _verify(shard_dir: str, reference_name: str | None) -> int:
    """One line per damaged shard, then a summary; with a reference (compared only with an intact
    set), notes, one line per field that differs from it, then its summary. Exit 1 when any shard is
    damaged or any field differs."""
    reference = load_reference(reference_name) if reference_name else None  # an unknown name fails first
    check = verify_shards(shard_dir, show_progress=True)
    for problem in check.problems:
        print(problem)
    print(check.summary())
    if reference is None or not check.ok:
        return 0 if check.ok else 1
    compared = check_reference(shard_dir, reference, show_progress=True)
    for note in compared.notes:
        print(f"note: {note}")
    for mismatch in compared.mismatches:
        print(mismatch)
    print(compared.summary())
    return 0 if compared.ok else 1


def _reference(args: argparse.Namespace) -> int:
    reference = write_reference(args.shard_dir, args.out, args.description, show_progress=True)
    counts = ", ".join(f"{split} {entry['count']}" for split, entry in reference["splits"].items())
    print(f"wrote {args.out}: reference {reference['name']} of {args.shard_dir} ({counts}) with its checksums")
    return 0


def _domains(args: argparse.Namespace) -> int:
    """Write the domain splits, then one line per source split with its counts."""
    splits = [split.strip() for split in args.splits.split(",") if split.strip()] if args.splits else None
    record = write_domains(args.shard_dir, args.attribute, splits, show_progress=True)
    for split in splits or record["splits"]:
        counts = record["splits"][split]
        domains = ", ".join(f"{split}.{domain} {count}" for domain, count in counts["domains"].items())
        print(f"{split}: {domains}, left out {counts['left_out']} of {counts['count']}")
    print(f"wrote domains of {','.join(record['attributes'])} in {args.shard_dir} ({record['rule']})")
    return 0


def _shards(args: argparse.Namespace) -> int:
    if args.source == "verify":
        return _verify(args.shard_dir, args.reference)
    if args.source == "reference":
        return _reference(args)
    if args.source == "domains":
        return _domains(args)
    carve = parse_carve(args.carve) if args.carve is not None else None
    if args.source == "celeba":
        source = CelebASource(args.src)
    elif args.source == "folder":
        source = FolderSource(args.src, args.val_fraction)
    else:
        source = SyntheticFacesSource(args.count, args.seed)
    write_shards(
        source,
        args.out,
        Preprocess(args.size, args.crop_fraction),
        args.encoding,
        args.images_per_sample,
        args.shard_size,
        args.workers,
        args.seed,
        carve=carve,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gendist", description="Train and compare GANs and VAEs on CelebA.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train in one process (use accelerate launch for more)")
    train.add_train_arguments(train_parser)
    train_parser.add_argument(
        "--help-config", action=config_help.HelpConfigAction, help="list every config key (as `gendist config`)"
    )

    shards = commands.add_parser(
        "shards", help="convert a dataset into WebDataset shards, verify a shard set, or split it into domains"
    )
    sources = shards.add_subparsers(dest="source", required=True)
    celeba = sources.add_parser("celeba", help="official CelebA layout: img_align_celeba/ or .zip plus the two lists")
    celeba.add_argument(
        "--src",
        required=True,
        help="folder holding img_align_celeba[.zip], list_attr_celeba.txt, list_eval_partition.txt",
    )
    _shard_options(celeba, CELEBA_CROP_FRACTION)
    folder = sources.add_parser("folder", help="any folder of images (recursive), no attributes")
    folder.add_argument("--src", required=True)
    folder.add_argument("--val-fraction", type=float, default=0.0, help="share of images put in a 'val' split")
    _shard_options(folder, 1.0)
    synthetic = sources.add_parser("synthetic", help="the embedded procedurally drawn faces")
    synthetic.add_argument("--count", type=int, default=8192)
    _shard_options(synthetic, CELEBA_CROP_FRACTION)
    verify = sources.add_parser("verify", help="check every shard against manifest.json (sha256, size, missing, extra)")
    verify.add_argument("shard_dir", metavar="DIR", help="a folder written by `gendist shards`")
    verify.add_argument(
        "--reference",
        metavar="NAME_OR_FILE",
        default=None,
        help="also compare counts per split, preprocessing, attributes, carve and checksums with a reference: "
        "a name in shards/reference/ (celeba64, celeba128, celeba-sample64) or a .json file",
    )
    reference = sources.add_parser(
        "reference", help="write the reference (counts, preprocessing, checksums) other sites verify against"
    )
    reference.add_argument("shard_dir", metavar="DIR", help="a folder written by `gendist shards`, intact")
    reference.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="the reference .json (its name is the file's stem); a reference already there is filled in, "
        "refused if the set does not match it",
    )
    reference.add_argument("--description", default=None, help="what the set is and how it was converted")
    domains = sources.add_parser(
        "domains", help="split each split of a shard set by an attribute into two domains (CycleGAN's A and B)"
    )
    domains.add_argument("shard_dir", metavar="DIR", help="a folder written by `gendist shards` (with attributes)")
    domains.add_argument(
        "--attribute",
        required=True,
        metavar="ATTR[,ATTR]",
        help="Eyeglasses: A = not_Eyeglasses, B = Eyeglasses; Blond_Hair,Black_Hair: A = the first without the "
        "second, B = the second without the first (both or neither: left out). Writes splits SPLIT.A and SPLIT.B; "
        "running it again replaces them",
    )
    domains.add_argument(
        "--splits",
        metavar="SPLIT,...",
        default=None,
        help="source splits (default: every split with images that is not itself a domain)",
    )

    evaluate.add_eval_arguments(
        commands.add_parser("eval", help="FID/KID (and VAE reconstruction error) of a run's checkpoint")
    )
    evaluate.add_stats_arguments(
        commands.add_parser("fid-stats", help="compute and cache the real FID statistics ahead")
    )
    translate.add_translate_arguments(
        commands.add_parser(
            "translate", help="apply a translation run (cyclegan) to a folder of images or a shard split"
        )
    )
    augment.add_augment_arguments(
        commands.add_parser(
            "augment", help="export a run's generated (cgan) or translated (cyclegan) faces as a split of a shard set"
        )
    )
    sample.add_sample_arguments(
        commands.add_parser("sample", help="N generated images of a run as PNG files (any number of ranks)")
    )
    export.add_export_arguments(
        commands.add_parser(
            "export",
            help="a run's generator (or decoder) as safetensors + JSON, for use without gendist",
        )
    )
    dream.add_dream_arguments(
        commands.add_parser("dream", help="Deep Dream: amplify what a layer of a trained network responds to")
    )
    sweep.add_sweep_arguments(
        commands.add_parser("sweep", help="a Ray Tune sweep scored by FID (local or on a Ray cluster)")
    )
    config_help.add_config_arguments(
        commands.add_parser(
            "config", help="every config key with its type, default and meaning, or what a preset changes"
        )
    )
    compare = commands.add_parser("compare", help="a Markdown report with table and figures over several runs")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", default="report", help="report folder (default: report/)")
    compare.add_argument("--title", default="gendist comparison")
    return parser


def _compare(args: argparse.Namespace) -> int:
    from gendist.comparison import write_report  # matplotlib loads only for this command

    print(f"wrote {write_report(args.run_dirs, args.out, args.title)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_overrides(build_parser(), argv)
    if args.command == "eval":
        return evaluate.run(evaluate.evaluate_run, args)
    if args.command == "fid-stats":
        return evaluate.run(evaluate.build_reference, args)
    if args.command == "translate":
        return translate.run(args)
    if args.command == "augment":
        return augment.run(args)
    if args.command == "dream":
        return dream.run(args)
    if args.command == "sample":
        return sample.run(args)
    if args.command == "export":
        return export.run(args)
    try:
        if args.command == "train":
            return train.run(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "sweep":
            return sweep.run_sweep(args)
        if args.command == "config":
            return config_help.run(args)
        return _shards(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"gendist: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The data-augmentation study: does adding generated faces to a small real training set help an
attribute classifier? Trains gendist's classifier on the real split alone and on the real split
plus a generated split (a union, data.split=REAL+GENERATED), for each seed, with the same steps,
batch and everything else, and scores both on the same held-out split; prints a Markdown table of
held-out accuracy and balanced accuracy (mean +- std over the seeds) for one chosen attribute and the
mean over the classifier's attributes, beside the majority baseline, and writes it with the raw rows
to OUT/study.md and OUT/study.json.

The generated split is made first by `gendist augment`, e.g. from a cGAN trained on the same small
real split (its model.attributes are the attributes the classifier should predict: the other label
columns of a generated face are drawn rows that need not describe it):

    gendist shards celeba --src ../shared/data/celeba-sample --out shards/small64 --size 64 \
        --carve val=500,test=8500            # train keeps 1,000 real images
    gendist train --config configs/cgan_celeba64.yaml data.shards=shards/small64 train.run_dir=runs/cgan_small
    gendist augment runs/cgan_small --out shards/small64 --split generated --images 4000
    python benchmarks/augmentation_study.py --shards shards/small64 --attribute Eyeglasses \
        --attributes Male,Smiling,Blond_Hair,Eyeglasses --seeds 0 1 2 --steps 1500

Equal steps means equal compute and more epochs of the smaller set; the table says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from gendist.data.shards import read_manifest
from gendist.eval.evaluator import read_rows

PRESET = Path(__file__).parents[1] / "configs" / "classifier_celeba64.yaml"


def run_one(args: argparse.Namespace, split: str, seed: int) -> dict:
    """Train one classifier on `split` and return its final held-out evaluation row."""
    name = f"{split.replace('+', '_plus_')}-seed{seed}"
    run_dir = Path(args.out) / name
    overrides = [
        f"data.shards={args.shards}",
        f"data.split={split}",
        f"classifier.attributes=[{args.attributes}]",
        f"train.seed={seed}",
        f"train.steps={args.steps}",
        f"train.run_dir={run_dir}",
        f"eval.every={args.steps}",
        f"eval.recon_split={args.held_out}",
        "eval.recon_images=0",
        "train.sample_every=1000000",
        f"train.checkpoint_every={args.steps}",
        *args.overrides,
    ]
    rows = read_rows(run_dir)
    if not any(row["step"] == args.steps for row in rows):  # a finished run is read, not retrained
        # a process per run, as a user would start it (and each with an Accelerator of its own)
        subprocess.run([sys.executable, "-m", "gendist", "train", "--config", str(PRESET), *overrides], check=True)
        rows = read_rows(run_dir)
    return {"run": str(run_dir), "split": split, "seed": seed, **max(rows, key=lambda row: row["step"])}


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(args: argparse.Namespace, results: dict[str, list[dict]]) -> list[str]:
    attribute = args.attribute
    lines = [
        f"| training data | images | {attribute} accuracy | {attribute} balanced | mean accuracy | mean balanced |",
        "|---|---|---|---|---|---|",
    ]
    manifest = read_manifest(args.shards)
    for split, rows in results.items():
        images = sum(manifest["splits"][part]["count"] for part in split.split("+"))
        cells = [
            spread([row["attr_accuracy"][attribute] for row in rows]),
            spread([row["attr_balanced_accuracy"][attribute] for row in rows]),
            spread([row["attr_mean_accuracy"] for row in rows]),
            spread([row["attr_mean_balanced_accuracy"] for row in rows]),
        ]
        lines.append(f"| `{split}` | {images:,} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))[0]
    majority = [
        f"{first['attr_accuracy_majority'][attribute]:.3f}",
        "0.500",
        f"{first['attr_mean_accuracy_majority']:.3f}",
        "0.500",
    ]
    lines.append(f"| majority of `{args.real}` | - | " + " | ".join(majority) + " |")
    lines += [
        "",
        f"Held out: all {first['attr_images']} images of `{args.held_out}` of `{args.shards}`; "
        f"{len(args.seeds)} seed(s) ({', '.join(map(str, args.seeds))}), mean ± std; {args.steps} steps of the "
        f"classifier preset ({PRESET.name}) on every training set, so equal compute and more epochs of the "
        f"smaller set; attributes: {args.attributes}.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="a shard set holding the real, generated and held-out splits")
    parser.add_argument("--real", default="train", help="the small real split")
    parser.add_argument("--generated", default="generated", help="the gendist augment split")
    parser.add_argument("--held-out", default="val")
    parser.add_argument("--attribute", default="Eyeglasses", help="the attribute reported on its own")
    parser.add_argument("--attributes", required=True, help="what the classifier predicts: the cGAN's, comma-separated")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default="runs/augmentation_study")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="more classifier overrides")
    args = parser.parse_args(argv)
    if args.attribute not in args.attributes.split(","):
        parser.error(f"--attribute {args.attribute} is not among --attributes {args.attributes}")
    splits = read_manifest(args.shards)["splits"]
    for split in (args.real, args.generated, args.held_out):
        if split not in splits:
            hint = " (make it with gendist augment)" if split == args.generated else ""
            parser.error(f"{args.shards} has no split {split!r}{hint}; it has {', '.join(splits)}")
    results = {
        split: [run_one(args, split, seed) for seed in args.seeds]
        for split in (args.real, f"{args.real}+{args.generated}")
    }
    lines = ["# Data augmentation with generated faces", "", *table(args, results)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "study.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

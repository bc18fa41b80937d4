"""Export a trained run's generated, labelled faces as a split of a shard set, the same under every launcher:

    gendist augment RUN_DIR --out SHARDS --split generated --images 10000           a cGAN's faces, labels as the data's
    gendist augment RUN_DIR --out SHARDS --split glasses --images 5000 --labels Eyeglasses=1
    gendist augment RUN_DIR --out SHARDS --split male_as_female --translate Male --images 0     a CycleGAN's
    accelerate launch -m gendist.augment RUN_DIR --out SHARDS --split generated --images 10000  over the ranks

The split is read like real data: `gendist train ... data.shards=SHARDS data.split=train+generated`.

Labels (GANs and VAEs): image i's label row is drawn, seeded by (--seed, i), from the real rows of
--labels-split of the run's shards, so the labels follow the data's joint attribute distribution;
`--labels Eyeglasses=1,Male=-1` then sets those attributes on every row. A cGAN is conditioned on
its model.attributes columns of the row (the only ones --labels may set: the others do not steer
the image, and are stored as drawn); an unconditional generator ignores the row, which is stored as
drawn and said so in the manifest. The noise of image i is drawn from the same (--seed, i) stream.

Translations (cyclegan): `--translate SRC` translates the first --images (0: all) images of the
split `<labels-split>.SRC` into the run's other domain; each keeps its source's attributes with the
domain attribute(s) set to the target domain's values (the shard set's "domains" rule).

Images are quantised to uint8 as a saved PNG would be. Batches of --batch-size are cut at multiples
of the global image index and the ranks take contiguous runs of whole batches, so the exported split
is the same on any number of ranks (given the device kind and threads per process). Each rank writes
its own shards (SPLIT-TOKEN-rRRRR-NNNNN.tar, TOKEN fresh per export); rank 0 then lists them in the
manifest, replaced atomically, with the provenance under "generated". --out may be an existing shard
set of the same image size and attribute names (the run's own, say), which gains the split, or a new
folder, which becomes a shard set with the source's preprocessing. An existing split is refused
unless --replace, and only splits gendist augment wrote can be replaced. On several nodes --out must
be a shared file system.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from gendist import distributed
from gendist.checkpoint import CheckpointError
from gendist.config import ConfigError, RunConfig, load_config
from gendist.data.domains import domain_signs
from gendist.data.loader import read_attributes, read_range, split_parts
from gendist.data.shards import FORMAT, MANIFEST, SplitWriter, encoded_image, image_sample, npy_bytes, read_manifest
from gendist.eval.evaluator import quantised, unit_range
from gendist.families.base import Generate, Sampling, Translate
from gendist.trained import find_checkpoint, load_sampling
from gendist.training.stream import resolve_shards

SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
Batch = tuple[np.ndarray, np.ndarray]  # images (n, H, W, 3) uint8, attributes (n, A) int8


def add_augment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", help="a run folder (holds config.yaml and checkpoints/): cgan, another GAN or cyclegan"
    )
    parser.add_argument(
        "--out", required=True, help="a shard set to add the split to, or a new folder to create one in"
    )
    parser.add_argument("--split", required=True, help="name of the new split (letters, digits, _ . -)")
    parser.add_argument(
        "--images", type=int, required=True, help="images to export (with --translate, 0: all of the source split)"
    )
    parser.add_argument(
        "--labels",
        default="data",
        metavar="data|ATTR=1,ATTR=-1",
        help="data: label rows drawn from --labels-split (default); ATTR=1,... also sets those attributes on every row",
    )
    parser.add_argument(
        "--labels-split",
        default="train",
        help="split of the run's shards the label rows are drawn from; with --translate the SRC domain's images "
        "are read from LABELS_SPLIT.SRC (default train)",
    )
    parser.add_argument("--translate", metavar="SRC", help="cyclegan: translate the images of domain SRC")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and label draws (default 0)")
    parser.add_argument("--checkpoint", help="a checkpoint folder to use instead of the run's latest")
    parser.add_argument("--batch-size", type=int, help="images per batch (default eval.batch_size)")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard (default 4096)")
    parser.add_argument("--replace", action="store_true", help="replace a split an earlier gendist augment wrote")


# -- what to export -----------------------------------------------------------------------------
def parse_labels(text: str, attribute_names: list[str], steering: list[str], family: str) -> dict[str, int]:
    """--labels as {attribute: +-1} to set on every row ({} for `data`). Only attributes the generator
    is conditioned on (`steering`) may be set: any other would label faces that need not show it."""
    fixed: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if item == "data":
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or value not in ("1", "+1", "-1"):
            raise ValueError(f"--labels expects data or ATTR=1,ATTR=-1,...; got {item!r}")
        if name not in attribute_names:
            raise ValueError(
                f"--labels: unknown attribute {name}; the data's attributes: {', '.join(attribute_names) or 'none'}"
            )
        if name not in steering:
            conditioned = (
                f"it is conditioned on {', '.join(steering)} (model.attributes)"
                if steering
                else f"the {family} generator is unconditional: only --labels data"
            )
            raise ValueError(
                f"--labels {name}: the generator does not take {name}, so no face would show it; {conditioned}"
            )
        if name in fixed:
            raise ValueError(f"--labels sets {name} twice")
        fixed[name] = int(value)
    return fixed


@dataclass
class Generated:
    """A generator's export: image i from the noise and label row drawn by the stream (seed, i)."""

    total: int
    batch_size: int
    source: str  # provenance: the label mode
    notes: dict
    generate: Generate
    rows: np.ndarray  # the real label rows drawn from
    fixed: dict[int, int]  # column -> the value set on every drawn row
    z_dim: int
    seed: int

    def batches(self, start: int, stop: int, device: torch.device) -> Iterator[Batch]:
        """Images start..stop-1 (start a multiple of batch_size) in batches cut at multiples of it."""
        for first in range(start, stop, self.batch_size):
            indices = range(first, min(first + self.batch_size, stop))
            noise, rows = np.empty((len(indices), self.z_dim), np.float32), []
            for k, index in enumerate(indices):  # one stream per global image index: the same on any ranks
                rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(index,)))
                rows.append(self.rows[rng.integers(len(self.rows))])
                noise[k] = rng.standard_normal(self.z_dim, dtype=np.float32)
            attrs = np.stack(rows).astype(np.int8)
            for column, value in self.fixed.items():
                attrs[:, column] = value
            with torch.no_grad():
                out = self.generate(torch.from_numpy(noise).to(device), torch.from_numpy(attrs).float().to(device))
            yield _levels(out), attrs


@dataclass
class Translated:
    """A translator's export: image i of the source split, translated, its labels set to the target domain's."""

    total: int
    batch_size: int
    source: str  # provenance: the translated split and direction
    notes: dict
    translate: Translate
    shard_dir: str
    split: str
    image_size: int
    flips: dict[int, int]  # column -> the target domain's value

    def batches(self, start: int, stop: int, device: torch.device) -> Iterator[Batch]:
        """Images start..stop-1 (start a multiple of batch_size) in batches cut at multiples of it."""
        if start >= stop:
            return
        held: list[Batch] = []
        count = 0
        for block in itertools.chain(read_range(self.shard_dir, self.split, self.image_size, start, stop), [None]):
            if block is not None:
                held.append(block)
                count += len(block[0])
            while count >= self.batch_size or (block is None and count):
                images, attrs = (np.concatenate(parts) for parts in zip(*held))
                take = min(self.batch_size, count)
                held, count = ([(images[take:], attrs[take:])] if count > take else []), count - take
                with torch.no_grad():
                    out = self.translate(unit_range(images[:take], device) * 2 - 1)
                labels = attrs[:take].astype(np.int8)
                for column, value in self.flips.items():
                    labels[:, column] = value
                yield _levels(out), labels


Export = Generated | Translated


def _levels(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> the uint8 NHWC pixels a saved PNG of it holds."""
    return (quantised(images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def plan_export(args: argparse.Namespace, cfg: RunConfig, sampling: Sampling, manifest: dict, shard_dir: str) -> Export:
    family, names = cfg.model.name, manifest["attribute_names"]
    batch_size = args.batch_size or cfg.eval.batch_size
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if sampling.translate:
        domains = [src for src, _ in sampling.translate]
        if not args.translate:
            raise ValueError(
                f"{args.run_dir} is a {family} run: it exports translations; pass --translate with one of "
                f"{', '.join(domains)}"
            )
        if args.translate not in domains:
            raise ValueError(f"--translate {args.translate}: the run's domains are {', '.join(domains)}")
        if args.labels != "data":
            raise ValueError("--labels applies to generators; a translation keeps its source image's labels")
        src = args.translate
        dst = next(d for s, d in sampling.translate if s == src)
        split = "+".join(f"{part}.{src}" for part in split_parts(args.labels_split))
        values = domain_signs(manifest, dst)
        available = len(read_attributes(shard_dir, split))
        if args.images < 0 or args.images > available:
            raise ValueError(f"--images {args.images}: '{split}' holds {available} images (--images 0 takes all)")
        return Translated(
            total=args.images or available,
            batch_size=batch_size,
            source=f"translated {split} ({src} -> {dst})",
            notes={"attributes_set": values},
            translate=sampling.translate[(src, dst)],
            shard_dir=shard_dir,
            split=split,
            image_size=cfg.model.image_size,
            flips={names.index(name): value for name, value in values.items()},
        )
    if sampling.generate is None:
        raise ValueError(
            f"{args.run_dir} is a {family} run, and the {family} family generates no images from noise; "
            "gendist augment exports from gan, dcgan, wgan, wgan_gp, cgan, vae (generators) and cyclegan runs"
        )
    if args.translate:
        raise ValueError(f"--translate applies to translation runs (cyclegan); {args.run_dir} is a {family} run")
    if args.images < 1:
        raise ValueError(f"--images must be >= 1 for a generator, got {args.images}")
    steering = list(cfg.model.attributes) if family == "cgan" else []
    fixed = parse_labels(args.labels, names, steering, family)
    try:
        rows = read_attributes(shard_dir, args.labels_split)
    except ValueError as err:
        raise ValueError(f"--labels-split {args.labels_split}: {err}") from None
    notes = {"conditioned_on": steering}
    if not steering:
        notes["labels_note"] = f"the {family} generator ignores labels: they are rows drawn from {args.labels_split}"
    elif len(steering) < len(names):
        notes["labels_note"] = (
            f"only {', '.join(steering)} steer the generator; the other attributes are the drawn rows' "
            f"(from {args.labels_split}) and need not describe the image"
        )
    set_text = "".join(f", {name}={value:+d}" for name, value in fixed.items())
    return Generated(
        total=args.images,
        batch_size=batch_size,
        source=f"labels data ({args.labels_split}){set_text}",
        notes={**notes, "labels_set": fixed},
        generate=sampling.generate,
        rows=rows,
        fixed={names.index(name): value for name, value in fixed.items()},
        z_dim=cfg.model.z_dim,
        seed=args.seed,
    )


# -- where it goes ------------------------------------------------------------------------------
def check_target(out: Path, source: dict, split: str, replace: bool) -> dict | None:
    """The manifest of the shard set `out` (None: a new one), checked to take split `split`."""
    if not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"--split {split!r}: a split name is letters, digits, _ . - (and no +, which joins splits)")
    if not (out / MANIFEST).is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(
                f"--out {out} exists and is not a shard set (no {MANIFEST}): name a shard set or a new folder"
            )
        return None
    target = read_manifest(out)
    size, wanted = target["preprocessing"]["size"], source["preprocessing"]["size"]
    if size != wanted:
        raise ValueError(f"--out {out} holds {size}px images, the run makes {wanted}px ones: name another shard set")
    if target["attribute_names"] != source["attribute_names"]:
        raise ValueError(
            f"--out {out} has attributes {', '.join(target['attribute_names']) or 'none'}, the run's data "
            f"{', '.join(source['attribute_names']) or 'none'}: name a shard set with the same attributes"
        )
    if split in target["splits"]:
        generated = target.get("generated", {})
        if split not in generated:
            raise ValueError(
                f"split {split} of {out} was not written by gendist augment (real or domain images), and is never "
                f"replaced; choose another --split"
            )
        if not replace:
            earlier = generated[split]
            raise ValueError(
                f"split {split} of {out} already exists ({earlier['images']} images from {earlier['run']}, "
                f"{earlier['created']}): pass --replace to overwrite it, or choose another --split"
            )
    return target


def new_manifest(source: dict, run_shards: str, seed: int) -> dict:
    """An empty shard set with the preprocessing, encoding and attributes of the run's shards."""
    return {
        "format": FORMAT,
        "dataset": f"gendist augment (from {source['dataset']})",
        "preprocessing": source["preprocessing"],
        "encoding": source["encoding"],
        "images_per_sample": source["images_per_sample"],
        "attribute_names": source["attribute_names"],
        "splits": {},
        "carved": {},
        "domains": {},
        "left_out": {},
        "corrupt_examples": [],
        "seed": seed,
        "source_shards": str(Path(run_shards).resolve()),
        "created": _now(),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_share(
    export: Export, start: int, stop: int, out: Path, prefix: str, split: str, layout: dict, device: torch.device
) -> list[dict]:
    """Images start..stop-1 into this rank's shards, as .partial files: their manifest entries."""
    raw, per_sample = layout["encoding"] == "raw", layout["images_per_sample"]
    writer = SplitWriter(out, prefix, raw, per_sample, layout["shard_size"])
    key_stem = split.replace(".", "_")
    try:
        index = start
        for images, attrs in export.batches(start, stop, device):
            keys = [f"{key_stem}-{i:08d}" for i in range(index, index + len(images))]
            index += len(images)
            if raw:
                writer.add_block(images, attrs, keys)
            else:
                for key, image, row in zip(keys, images, attrs):
                    stored = encoded_image(image, layout["encoding"])
                    writer.add_sample(image_sample(key, *stored, npy_bytes(row[None])))
        writer.close()
        if index != stop:
            raise RuntimeError(f"made {index - start} images of the {stop - start} of this rank's share")
    except BaseException:
        for partial in writer.partials:
            partial.unlink(missing_ok=True)
        raise
    return writer.shards


def commit(out: Path, split: str, shards: list[dict], fresh: dict, replace: bool, record: dict) -> dict:
    """Rank 0, once every rank has written: the shards into place, then the manifest (atomically,
    re-read and re-checked: another writer may have added splits meanwhile), then the replaced
    split's old shards."""
    try:
        manifest = read_manifest(out) if (out / MANIFEST).is_file() else fresh
        if (out / MANIFEST).is_file():
            check_target(out, manifest, split, replace)
    except BaseException:
        for shard in shards:
            (out / (shard["name"] + ".partial")).unlink(missing_ok=True)
        raise
    replaced = {shard["name"] for shard in manifest["splits"].get(split, {}).get("shards", [])}
    for shard in shards:
        os.replace(out / (shard["name"] + ".partial"), out / shard["name"])
    manifest["splits"][split] = {"count": sum(shard["count"] for shard in shards), "shards": shards}
    manifest.setdefault("generated", {})[split] = record
    partial = out / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1))
    os.replace(partial, out / MANIFEST)
    listed = {shard["name"] for entry in manifest["splits"].values() for shard in entry["shards"]}
    for name in replaced - listed:
        (out / name).unlink(missing_ok=True)
    return manifest


def _share(total: int, batch_size: int, accelerator: Accelerator) -> tuple[int, int]:
    """This rank's images: a contiguous run of whole batches (batch k = images k*B..), as on any world size."""
    first, last = distributed.chunk_bounds(
        -(-total // batch_size), accelerator.process_index, accelerator.num_processes
    )
    return min(total, first * batch_size), min(total, last * batch_size)


def augment_run(args: argparse.Namespace) -> int:
    run_dir, out = Path(args.run_dir), Path(args.out)
    cfg = load_config(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir, args.checkpoint)
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    accelerator = distributed.build_fp32_accelerator()
    shard_dir = resolve_shards(cfg, accelerator)
    source = read_manifest(shard_dir)
    target = check_target(out, source, args.split, args.replace)
    sampling, state = load_sampling(cfg, checkpoint, accelerator, source["attribute_names"])
    export = plan_export(args, cfg, sampling, source, shard_dir)
    layout = {**(target or source), "shard_size": args.shard_size}
    world, rank = accelerator.num_processes, accelerator.process_index
    distributed.rank_print(
        accelerator,
        f"exporting {export.total} images of the {cfg.model.name} run {run_dir} ({checkpoint.name}, step "
        f"{state['step']}; {export.source}) as split {args.split} of "
        f"{out if target else f'a new shard set {out}'}",
    )
    token = distributed.broadcast_from_main(accelerator, secrets.token_hex(3))
    accelerator.wait_for_everyone()  # every rank checked --out before any writes into it
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    start, stop = _share(export.total, export.batch_size, accelerator)
    prefix = f"{args.split}-{token}-r{rank:04d}"
    mine = write_share(export, start, stop, out, prefix, args.split, layout, accelerator.device)
    shares = gather_object([mine]) if world > 1 else [mine]
    if accelerator.is_main_process:
        record = {
            "run": str(run_dir.resolve()),
            "checkpoint": str(checkpoint.resolve()),
            "step": state["step"],
            "family": cfg.model.name,
            "generator": sampling.label,
            "source": export.source,
            "source_shards": str(Path(shard_dir).resolve()),
            "images": export.total,
            "seed": args.seed,
            "batch_size": export.batch_size,
            **export.notes,
            "created": _now(),
        }
        fresh = new_manifest(source, shard_dir, args.seed)
        shards = [shard for share in shares for shard in share]
        commit(out, args.split, shards, fresh, args.replace, record)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - started
    counts = " + ".join(str(sum(shard["count"] for shard in share)) for share in shares)
    written = sum(map(len, shares))
    distributed.rank_print(
        accelerator,
        f"exported {export.total} images into split {args.split} of {out} "
        f"({written} shard{'s' if written > 1 else ''}, "
        f"{world} rank{'s' if world > 1 else ''}: {counts}) in {seconds:.1f} s: "
        f"{export.total / seconds:.1f} images/s",
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the export with user mistakes said in one line (distributed.run_on_every_rank)."""
    return distributed.run_on_every_rank(
        lambda: augment_run(args), (ConfigError, FileNotFoundError, ValueError, CheckpointError)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gendist.augment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_augment_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

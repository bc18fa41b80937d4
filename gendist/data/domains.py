"""CycleGAN's unpaired domains A and B as splits of a shard set.

`gendist shards domains DIR --attribute Eyeglasses` splits each split S of a shard set into
`S.not_Eyeglasses` and `S.Eyeglasses`; `--attribute X,Y` into `S.X` (X, not Y) and `S.Y` (Y, not
X), leaving out images with both or neither. The new splits are shards like any other (the same
sample layout and writer, image bytes copied, not re-encoded), listed in the manifest with their
counts; its "domains" records the rule and the counts per source split. Running the same attribute
again replaces those domain splits.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from gendist.data.shards import MANIFEST, SplitWriter, read_manifest, shard_problem, stored_sample, write_json


def domain_names(attributes: Sequence[str]) -> tuple[str, str]:
    """Domains A and B of an attribute spec: (not_X, X) for one attribute, (X, Y) for two."""
    return (f"not_{attributes[0]}", attributes[0]) if len(attributes) == 1 else (attributes[0], attributes[1])


def domain_signs(manifest: dict, domain: str) -> dict[str, int]:
    """The attribute values (+-1) that put an image in `domain`, from the manifest's domain records:
    not_X: {X: -1}; X (one attribute): {X: +1}; X of the pair X,Y: {X: +1, Y: -1}."""
    for record in manifest.get("domains", {}).values():
        attributes, (a, b) = record["attributes"], record["domains"]
        if domain not in (a, b):
            continue
        if len(attributes) == 1:
            return {attributes[0]: -1 if domain == a else +1}
        x, y = attributes
        return {x: +1, y: -1} if domain == a else {y: +1, x: -1}
    known = [name for record in manifest.get("domains", {}).values() for name in record["domains"]]
    raise ValueError(f"no domain {domain!r} in the shards' manifest; it has: {', '.join(known) or 'none'}")


def _domain_attributes(attribute: str | Sequence[str], attribute_names: list[str], shard_dir: Path) -> list[str]:
    names = [name.strip() for name in attribute.split(",")] if isinstance(attribute, str) else list(attribute)
    if not 1 <= len(names) <= 2 or not all(names):
        raise ValueError(f"--attribute expects one attribute or two separated by a comma, got {attribute!r}")
    if len(names) == 2 and names[0] == names[1]:
        raise ValueError(f"--attribute names {names[0]} twice: two domains need two different attributes")
    if not attribute_names:
        raise ValueError(f"{shard_dir} has no attributes (its source has none): domains need one")
    unknown = [name for name in names if name not in attribute_names]
    if unknown:
        raise ValueError(
            f"unknown attribute {', '.join(unknown)} in {shard_dir}; valid ones: {', '.join(attribute_names)}"
        )
    return names


def _domain_rule(attributes: list[str]) -> str:
    a, b = domain_names(attributes)
    if len(attributes) == 1:
        return f"{a}: {attributes[0]} = -1; {b}: {attributes[0]} = +1"
    x, y = attributes
    return f"{a}: {x} = +1 and {y} = -1; {b}: {y} = +1 and {x} = -1; both or neither: left out"


def domain_owners(manifest: dict) -> dict[str, str]:
    """Domain split name -> the attribute spec that made it."""
    return {
        f"{split}.{domain}": spec
        for spec, record in manifest.get("domains", {}).items()
        for split in record["splits"]
        for domain in record["domains"]
    }


def _domain_sources(manifest: dict, shard_dir: Path, attributes: list[str], splits: Sequence[str] | None) -> list[str]:
    """The source splits to take domains from, checked: real splits with images whose domain
    split names are free or this spec's own."""
    spec, owners = ",".join(attributes), domain_owners(manifest)
    if splits is None:
        splits = [name for name, split in manifest["splits"].items() if split["count"] and name not in owners]
        if not splits:
            raise ValueError(f"{shard_dir} has no split with images to take domains from")
    splits = list(dict.fromkeys(splits))
    for split in splits:
        if split in owners:
            raise ValueError(
                f"split {split} of {shard_dir} is itself a domain (of {owners[split]}): name a source split"
            )
        if split not in manifest["splits"]:
            raise ValueError(f"{shard_dir} has no split {split!r}; its splits: {', '.join(manifest['splits'])}")
        if not manifest["splits"][split]["count"]:
            raise ValueError(f"split {split} of {shard_dir} holds no images")
        for domain in domain_names(attributes):
            name = f"{split}.{domain}"
            if name in manifest["splits"] and owners.get(name) != spec:
                made_by = f"the domains of {owners[name]}" if name in owners else "the conversion"
                raise ValueError(f"split {name} of {shard_dir} already exists ({made_by}); {spec} would overwrite it")
    return splits


def write_domains(
    shard_dir: str | Path,
    attribute: str | Sequence[str],
    splits: Sequence[str] | None = None,
    shard_size: int | None = None,
    show_progress: bool = False,
) -> dict:
    """Split splits of a shard set by an attribute into two domains (CycleGAN's unpaired A and B).

    One attribute X: A = `not_X` (X = -1), B = `X` (X = +1). Two, X,Y: A = `X` (X and not Y),
    B = `Y` (Y and not X); images with both or neither are left out and counted. Each source
    split S (default: every split with images that is not itself a domain) gains splits `S.A` and
    `S.B` in `shard_dir`: S's samples in their stored order, encoded bytes and attributes copied
    (raw blocks re-cut, their pixels unchanged), in shards of `shard_size` images (default: S's
    largest). The manifest lists them under "splits" and the spec under "domains", and is
    replaced atomically once every shard is in place. Running a spec again replaces its domain
    splits of those source splits (and deletes their old shards); a split name that another spec
    or the conversion already uses is refused, and so is a domain left empty. Returns the spec's
    "domains" record.
    """
    from gendist.data.loader import read_samples  # the loader imports this module

    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    attributes = _domain_attributes(attribute, manifest["attribute_names"], shard_dir)
    spec, rule = ",".join(attributes), _domain_rule(attributes)
    splits = _domain_sources(manifest, shard_dir, attributes, splits)
    indices = [manifest["attribute_names"].index(name) for name in attributes]
    domain_a, domain_b = domain_names(attributes)
    raw, per_sample = manifest["encoding"] == "raw", manifest["images_per_sample"]
    # The copies get checksums of their own: a source shard damaged now would pass verify for ever after.
    damaged = [p for split in splits for e in manifest["splits"][split]["shards"] if (p := shard_problem(shard_dir, e))]
    if damaged:
        raise ValueError(
            f"{len(damaged)} shard(s) of {', '.join(splits)} do not match {MANIFEST} ({damaged[0]}); "
            f"see `gendist shards verify {shard_dir}`"
        )

    writers: list[SplitWriter] = []
    counted = {}
    bar_columns = (TextColumn("[bold]domains[/] {task.description}"), BarColumn(), MofNCompleteColumn())
    try:
        with Progress(*bar_columns, console=Console(stderr=True), disable=not show_progress) as progress:
            for split in splits:
                source = manifest["splits"][split]
                size = shard_size or max(shard["count"] for shard in source["shards"])
                pair = [SplitWriter(shard_dir, f"{split}.{d}", raw, per_sample, size) for d in (domain_a, domain_b)]
                writers += pair
                bar = progress.add_task(f"{split} by {spec}", total=source["count"])
                seen = 0
                for sample in read_samples(str(shard_dir), split):
                    try:
                        attrs, images, keys = stored_sample(sample, raw)
                    except (KeyError, ValueError, OSError, EOFError) as err:
                        raise ValueError(
                            f"sample {sample.get('__key__')} of split {split} in {shard_dir} is damaged ({err}); "
                            f"check the shard set with `gendist shards verify {shard_dir}`"
                        ) from err
                    has = attrs[:, indices] > 0
                    masks = (
                        (~has[:, 0], has[:, 0])
                        if len(indices) == 1
                        else (has[:, 0] & ~has[:, 1], has[:, 1] & ~has[:, 0])
                    )
                    for writer, mask in zip(pair, masks):
                        if mask.any():
                            if raw:
                                writer.add_block(images[mask], attrs[mask], [k for k, m in zip(keys, mask) if m])
                            else:
                                writer.add_sample(sample)
                    seen += len(attrs)
                    progress.advance(bar, len(attrs))
                for writer in pair:
                    writer.close()
                if seen != source["count"]:
                    raise ValueError(
                        f"split {split} of {shard_dir} yielded {seen} images, its manifest lists {source['count']}; "
                        f"check the shard set with `gendist shards verify {shard_dir}`"
                    )
                counts = {domain_a: pair[0].count, domain_b: pair[1].count}
                for domain, other in ((domain_a, domain_b), (domain_b, domain_a)):
                    if not counts[domain]:
                        raise ValueError(
                            f"domain {domain} of split {split} in {shard_dir} is empty: 0 of its {seen} images "
                            f"({other} {counts[other]}, left out {seen - counts[other]})"
                        )
                counted[split] = {"count": seen, "domains": counts, "left_out": seen - sum(counts.values())}
    except BaseException:
        for writer in writers:
            for partial in writer.partials:
                partial.unlink(missing_ok=True)
        raise

    # Commit: the shards into place, then the manifest (atomically), then the old shards it no longer lists.
    replaced = {
        shard["name"] for writer in writers for shard in manifest["splits"].get(writer.split, {}).get("shards", [])
    }
    for writer in writers:
        for partial in writer.partials:
            os.replace(partial, partial.with_suffix(""))
        manifest["splits"][writer.split] = {"count": writer.count, "shards": writer.shards}
    earlier = manifest.setdefault("domains", {}).get(spec, {}).get("splits", {})
    manifest["domains"][spec] = {
        "attributes": attributes,
        "domains": [domain_a, domain_b],
        "rule": rule,
        "splits": {**earlier, **counted},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(shard_dir / MANIFEST, manifest)
    listed = {shard["name"] for split in manifest["splits"].values() for shard in split["shards"]}
    for name in replaced - listed:
        (shard_dir / name).unlink(missing_ok=True)
    return manifest["domains"][spec]

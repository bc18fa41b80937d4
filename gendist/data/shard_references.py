"""Reference manifests (shards/reference/NAME.json, see shards/README.md): what two sites
converting the same dataset must agree on, the counts per split, the preprocessing, the attributes
and the carve, and where known checksums: a content sha256 per split, which holds whatever the
shard size, seed or tar metadata, and the shards' own sha256 for a quick byte-for-byte match.
`gendist shards reference` writes one from a converted set; `gendist shards verify DIR --reference
NAME` compares a set with it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import webdataset as wds
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

import gendist
from gendist.data.domains import domain_owners
from gendist.data.shards import read_manifest, sample_stem, stored_sample, verify_shards, write_json

REFERENCE_FORMAT = "gendist-shards-reference/1"
# The shipped references sit beside the package in a checkout, not inside it.
REFERENCE_DIR = Path(gendist.__file__).parents[1] / "shards" / "reference"
# What a shard's bytes depend on besides the images: with the shard sizes, a reference's "layout".
LAYOUT_KEYS = ("encoding", "images_per_sample", "seed")


def converted_splits(manifest: dict) -> list[str]:
    """The splits the conversion wrote, without those added to the set later (domains, generated)."""
    derived = set(domain_owners(manifest)) | set(manifest.get("generated", {}))
    return [split for split in manifest["splits"] if split not in derived]


def split_content_sha256(shard_dir: str | Path, split: str, show_progress: bool = False) -> str:
    """sha256 of a split's images, whatever the shard sizes, blocks, order (seed) and tar metadata.

    Each image's digest covers its sample stem, attributes (int8) and pixels (uint8); the split's is
    the sha256 of those digests sorted. A raw and a png conversion of the same images agree; a jpeg
    one does not (JPEG is lossy), and neither do different Pillow resamplers.
    """
    from gendist.data.loader import decode_sample, read_samples  # the loader imports this module

    manifest = read_manifest(shard_dir)
    raw, size = manifest["encoding"] == "raw", manifest["preprocessing"]["size"]
    digests = []
    bar_columns = (TextColumn("[bold]content[/] {task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*bar_columns, console=Console(stderr=True), disable=not show_progress) as progress:
        bar = progress.add_task(f"{split} of {shard_dir}", total=manifest["splits"][split]["count"])
        for sample in read_samples(str(shard_dir), split):
            attrs, images, keys = stored_sample(sample, raw)
            if images is None:
                images, keys = decode_sample(sample, size)[0], [sample["__key__"]]
            for key, image, row in zip(keys, images, attrs):
                digest = hashlib.sha256(sample_stem(key).encode() + b"\0")
                digest.update(row.astype(np.int8).tobytes())
                digest.update(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
                digests.append(digest.digest())
            progress.advance(bar, len(attrs))
    return hashlib.sha256(b"".join(sorted(digests))).hexdigest()


def reference_names() -> list[str]:
    return sorted(path.stem for path in REFERENCE_DIR.glob("*.json"))


def load_reference(name_or_file: str | Path) -> dict:
    """A reference by name (REFERENCE_DIR/NAME.json) or by the path of its file."""
    path = Path(name_or_file)
    if not path.is_file():
        if path.suffix == ".json" or len(path.parts) > 1:
            raise FileNotFoundError(f"reference file {path} not found")
        path = REFERENCE_DIR / f"{name_or_file}.json"
        if not path.is_file():
            available = ", ".join(reference_names()) or "none"
            raise ValueError(
                f"unknown reference {str(name_or_file)!r}; {REFERENCE_DIR} has: {available} (or pass a .json file)"
            )
    reference = json.loads(path.read_text())
    if reference.get("reference") != REFERENCE_FORMAT:
        raise ValueError(f"{path}: reference format {reference.get('reference')!r} is not {REFERENCE_FORMAT!r}")
    return reference


def make_reference(shard_dir: str | Path, name: str, description: str = "", show_progress: bool = False) -> dict:
    """The reference of a shard set whose shards match its manifest: its converted splits' counts,
    shards and content sha256, its preprocessing, attributes, carve and layout."""
    shard_dir = Path(shard_dir)
    check = verify_shards(shard_dir, show_progress)
    if not check.ok:
        raise ValueError(f"{check.summary()}: a reference must come from an intact set (`gendist shards verify`)")
    manifest = read_manifest(shard_dir)
    splits = {}
    for split in converted_splits(manifest):
        entry = manifest["splits"][split]
        splits[split] = {
            "count": entry["count"],
            "shards": [{key: shard[key] for key in ("name", "count", "sha256")} for shard in entry["shards"]],
        }
        if entry["count"]:
            splits[split]["content_sha256"] = split_content_sha256(shard_dir, split, show_progress)
    return {
        "reference": REFERENCE_FORMAT,
        "name": name,
        "description": description,
        "format": manifest["format"],
        "dataset": manifest["dataset"],
        "preprocessing": manifest["preprocessing"],
        "attribute_names": manifest["attribute_names"],
        "carved": manifest["carved"],
        "splits": splits,
        "layout": {key: manifest[key] for key in LAYOUT_KEYS},
        "made_with": {"pillow": PIL.__version__, "numpy": np.__version__, "webdataset": wds.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_reference(
    shard_dir: str | Path, out: str | Path, description: str | None = None, show_progress: bool = False
) -> dict:
    """Write the reference of `shard_dir` to `out`, named after the file. A reference already there
    is filled in rather than overwritten: the set must match it (see check_reference), and its
    description stays unless a new one is given."""
    out = Path(out)
    earlier = load_reference(out) if out.is_file() else {}
    if earlier:
        check = check_reference(shard_dir, earlier, show_progress)
        if not check.ok:
            raise ValueError(
                f"{shard_dir} does not match the reference {out} it would replace: "
                + "; ".join(str(mismatch) for mismatch in check.mismatches)
            )
    reference = make_reference(shard_dir, out.stem, description or earlier.get("description", ""), show_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, reference)
    return reference


def _shown(value: object) -> str:
    if value is None:
        return "absent"
    text = json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


@dataclass(frozen=True)
class ReferenceMismatch:
    """A field (a dotted path into the reference: splits.val.count) whose value differs from it."""

    field: str
    reference: str  # the values as shown
    found: str

    def __str__(self) -> str:
        return f"{self.field}: reference {self.reference}, this set {self.found}"


@dataclass(frozen=True)
class ReferenceCheck:
    name: str
    mismatches: list[ReferenceMismatch]
    notes: list[str]
    compared: str  # what was compared, in words

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        if self.ok:
            return f"ok: matches reference {self.name} ({self.compared})"
        return f"DIFFERS from reference {self.name}: {len(self.mismatches)} field(s) ({self.compared})"


def _record_differences(expected: dict, found: dict, prefix: str) -> Iterator[ReferenceMismatch]:
    """Where two nested records differ, by dotted path: a key one side lacks is one difference."""
    for key in dict.fromkeys([*expected, *found]):
        reference_value, value = expected.get(key), found.get(key)
        if isinstance(reference_value, dict) and isinstance(value, dict):
            yield from _record_differences(reference_value, value, f"{prefix}.{key}")
        elif reference_value != value:
            yield ReferenceMismatch(f"{prefix}.{key}", _shown(reference_value), _shown(value))


def _names_difference(reference: list[str], found: list[str]) -> ReferenceMismatch:
    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

    missing = [name for name in reference if name not in found]
    extra = [name for name in found if name not in reference]
    if not missing and not extra:
        return ReferenceMismatch("attribute_names", f"{len(reference)} names", "the same names in another order")
    return ReferenceMismatch(
        "attribute_names",
        f"{len(reference)} names" + (f", {len(missing)} not in this set ({some(missing)})" if missing else ""),
        f"{len(found)} names" + (f", {len(extra)} not in the reference ({some(extra)})" if extra else ""),
    )


def _shard_bytes(split: dict) -> list[tuple[str, int, str]]:
    return [(shard["name"], shard["count"], shard["sha256"]) for shard in split.get("shards", [])]


def _why_bytes_differ(reference: dict, manifest: dict, split: str) -> str:
    """Why a split whose content matches has other shard files than the reference's."""
    layout = reference.get("layout", {})
    differences = [f"{key} {layout[key]} vs {manifest[key]}" for key in LAYOUT_KEYS if layout.get(key) != manifest[key]]
    sizes = [
        [shard["count"] for shard in entry.get("shards", [])]
        for entry in (reference["splits"][split], manifest["splits"][split])
    ]
    if sizes[0] != sizes[1]:
        differences.append(f"shard sizes {sizes[0]} vs {sizes[1]}")
    return (
        ", ".join(differences)
        or "same layout: tar metadata only, as in shards written before gendist fixed their mtime"
    )


def check_reference(shard_dir: str | Path, reference: dict, show_progress: bool = False) -> ReferenceCheck:
    """Compare a shard set with a reference, field by field.

    The format, dataset, preprocessing, attribute names, carve record and the count of every
    converted split (carved ones too) must equal the reference's. Where the reference holds a
    split's content_sha256, the content must match too: at once when the split's shards are the
    reference's byte for byte (the manifest's sha256; `verify_shards` checks the files against
    it), otherwise by hashing the split's images (split_content_sha256), which a set cut into other
    shard sizes or with another seed passes, with a note saying so.
    """
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    mismatches: list[ReferenceMismatch] = []

    def differ(field: str, expected: object, found: object) -> None:
        mismatches.append(ReferenceMismatch(field, _shown(expected), _shown(found)))

    for field in ("format", "dataset"):
        if reference.get(field) != manifest.get(field):
            differ(field, reference.get(field), manifest.get(field))
    for group in ("preprocessing", "carved"):
        mismatches += _record_differences(reference.get(group, {}), manifest.get(group, {}), group)
    if reference["attribute_names"] != manifest["attribute_names"]:
        mismatches.append(_names_difference(reference["attribute_names"], manifest["attribute_names"]))

    byte_equal, content_equal, notes = [], [], []
    for split in dict.fromkeys([*reference["splits"], *converted_splits(manifest)]):
        expected, found = reference["splits"].get(split, {}), manifest["splits"].get(split, {})
        if expected.get("count") != found.get("count"):
            differ(f"splits.{split}.count", expected.get("count"), found.get("count"))
            continue
        content = expected.get("content_sha256")
        if content is None:
            continue
        if _shard_bytes(expected) == _shard_bytes(found):
            byte_equal.append(split)
            continue
        hashed = split_content_sha256(shard_dir, split, show_progress)
        if hashed != content:
            differ(f"splits.{split}.content_sha256", content, hashed)
            continue
        content_equal.append(split)
        why = _why_bytes_differ(reference, manifest, split)
        notes.append(f"{split}: content matches the reference; its shard files differ ({why})")

    compared = f"counts of {len(reference['splits'])} splits, preprocessing, attributes, carve"
    if byte_equal:
        compared += f"; {', '.join(byte_equal)} byte for byte"
    if content_equal:
        compared += f"; {', '.join(content_equal)} by content"
    if not any("content_sha256" in entry for entry in reference["splits"].values()):
        compared += "; the reference holds no checksums yet"
    return ReferenceCheck(reference["name"], mismatches, notes, compared)

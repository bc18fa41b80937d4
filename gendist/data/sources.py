"""Image sources the shard writer reads: CelebA (folder or official zip), any image folder.

A source is a picklable description (paths, keys, attributes); each worker process opens files
itself, so conversion runs in parallel without sharing handles.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_SPLITS = {0: "train", 1: "val", 2: "test"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# What zipfile raises when one member is damaged: a bad CRC or local header, broken deflate data,
# data that ends early. The rest of the archive stays readable, so the member counts as corrupt.
DAMAGED_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


@dataclass
class SplitPlan:
    """What a source will contribute: keys per split and why any were left out."""

    splits: dict[str, list[str]]
    attribute_names: list[str]
    attributes: dict[str, np.ndarray]  # key -> int8 vector of +-1
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> count


CARVABLE_SPLITS = ("val", "test")  # carved in this order, each from what is left of train
CARVE_RULE = "sha256(key) order"


def parse_carve(text: str) -> dict[str, str]:
    """`val=0.05,test=500` -> {"val": "0.05", "test": "500"}; the values are checked by carve_splits."""
    requests: dict[str, str] = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise ValueError(f"--carve expects SPLIT=AMOUNT[,SPLIT=AMOUNT], e.g. val=0.05,test=500; got {text!r}")
        if name in requests:
            raise ValueError(f"--carve names split {name!r} twice: {text!r}")
        requests[name] = value
    return requests


def _carve_size(split: str, requested: str | float | int, available: int) -> int:
    """A count (an int, or digits) or a fraction in (0, 1) of the `available` train images."""
    text = str(requested).strip()
    if isinstance(requested, int) or text.isdigit():
        count = int(text)
        if count < 1:
            raise ValueError(f"--carve {split}={text}: a count must be at least 1")
        if count > available:
            raise ValueError(f"--carve {split}={text}: only {available} train images are available to carve from")
        return count
    try:
        fraction = float(text)
    except ValueError:
        raise ValueError(
            f"--carve {split}={text}: expected an image count or a fraction in (0, 1), e.g. {split}=0.05"
        ) from None
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--carve {split}={text}: a fraction must be in (0, 1); give a whole number for a count")
    count = int(fraction * available + 0.5)  # rounded half up
    if count < 1:
        raise ValueError(f"--carve {split}={text}: {fraction} of {available} train images is 0 images")
    return count


def carve_splits(
    plan: SplitPlan, requests: Mapping[str, str | float | int], origin: str = "the source"
) -> tuple[SplitPlan, dict[str, dict]]:
    """Move images from `train` into held-out splits the source leaves empty; returns the new plan
    and the manifest's record of it.

    Train keys are ordered by sha256(key) and each split takes the next ones (val first, then test),
    so the choice depends on neither the seed nor which other files are present. With a count, a
    smaller download carves the same images minus the missing ones, topped up by the next in the
    order: val keeps all its remaining images, a test image can move only into val. A fraction is
    of the train images present, rounded half up, so its count follows them; where it drops, the
    images last in the order go back to train. Sizes are resolved before anything moves:
    val=0.1,test=0.1 carves a tenth each.
    """
    unknown = sorted(set(requests) - set(CARVABLE_SPLITS))
    if unknown:
        raise ValueError(f"--carve can make only {' and '.join(CARVABLE_SPLITS)} splits, not {', '.join(unknown)}")
    train = plan.splits.get("train", [])
    available = len(train)
    sizes = {}
    for split in (s for s in CARVABLE_SPLITS if s in requests):
        present = len(plan.splits.get(split, []))
        if present:
            raise ValueError(
                f"cannot carve {split}: {present} {split} images already come from {origin}; "
                f"carve only a split it leaves empty (drop {split} from --carve to use them)"
            )
        sizes[split] = _carve_size(split, requests[split], available)
    if sizes and sum(sizes.values()) >= available:
        wanted = " + ".join(f"{n} {s}" for s, n in sizes.items())
        raise ValueError(f"--carve would leave train empty: it asks for {wanted} of the {available} train images")
    order = sorted(train, key=lambda key: (hashlib.sha256(key.encode()).digest(), key))
    splits = dict(plan.splits)
    carved: dict[str, dict] = {}
    start = 0
    for split, count in sizes.items():
        splits[split] = sorted(order[start : start + count])
        rule = CARVE_RULE if start == 0 else f"{CARVE_RULE}, after the {' and '.join(carved)} images"
        carved[split] = {
            "from": "train",
            "requested": str(requests[split]).strip(),
            "count": count,
            "available": available,
            "rule": rule,
        }
        start += count
    if not carved:
        return plan, {}
    taken = set(order[:start])
    splits["train"] = [key for key in train if key not in taken]
    return replace(plan, splits=splits), carved


class ImageSource:
    name: str
    split_origin = "the source"  # where its own splits come from, for carve_splits' refusal

    def plan(self) -> SplitPlan:
        raise NotImplementedError

    def open(self, key: str) -> Image.Image:
        """The RGB image for `key`; raises on a missing or corrupt file."""
        raise NotImplementedError


def find_celeba_file(root: Path, name: str) -> Path | None:
    """Official downloads keep files at the top or under Anno/, Eval/, Img/."""
    for folder in ("", "Anno", "Eval", "Img"):
        candidate = root / folder / name
        if candidate.exists():
            return candidate
    return None


def parse_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """list_attr_celeba.txt: a count line (of the FULL dataset), the names, then `file v1 v2 ...`."""
    lines = path.read_text().splitlines()  # handles the official CRLF endings
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header of attribute names")
    names = lines[1].split()
    rows: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise ValueError(f"{path}:{number}: expected a file name and {len(names)} values, got {len(parts)} fields")
        rows[parts[0]] = np.array([int(v) for v in parts[1:]], dtype=np.int8)
    return names, rows


def parse_partition(path: Path) -> dict[str, str]:
    """list_eval_partition.txt rows `000001.jpg 0` -> {file: split name}."""
    result = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or int(parts[1]) not in CELEBA_SPLITS:
            raise ValueError(f"{path}:{number}: expected `file split` with split 0, 1 or 2, got {line!r}")
        result[parts[0]] = CELEBA_SPLITS[int(parts[1])]
    return result


class CelebASource(ImageSource):
    """The official layout: `img_align_celeba/` or `img_align_celeba.zip`, plus the two lists."""

    name = "celeba"
    split_origin = "the official partition (list_eval_partition.txt)"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"CelebA folder not found: {self.root}")
        folder = find_celeba_file(self.root, "img_align_celeba")
        archive = find_celeba_file(self.root, "img_align_celeba.zip")
        if folder is not None and folder.is_dir():
            self.folder, self.archive = folder, None
        elif archive is not None:
            self.folder, self.archive = None, archive
        else:
            raise FileNotFoundError(
                f"no images under {self.root}: expected img_align_celeba/ (a folder of .jpg) or img_align_celeba.zip"
            )
        self.attr_file = self._require("list_attr_celeba.txt")
        self.partition_file = self._require("list_eval_partition.txt")
        self._zip: zipfile.ZipFile | None = None
        self._zip_names: dict[str, str] = {}

    def _require(self, name: str) -> Path:
        path = find_celeba_file(self.root, name)
        if path is None:
            raise FileNotFoundError(f"{name} not found in {self.root} (nor in its Anno/ or Eval/ folders)")
        return path

    def _present(self) -> set[str]:
        if self.folder is not None:
            return {p.name for p in self.folder.iterdir() if p.suffix.lower() == ".jpg"}
        return set(self._archive_names())

    def _archive_names(self) -> dict[str, str]:
        if not self._zip_names:
            try:
                with zipfile.ZipFile(self.archive) as archive:
                    names = archive.namelist()
            except zipfile.BadZipFile as err:  # e.g. a download cut short: the central directory is gone
                raise ValueError(f"{self.archive} is not a readable zip (truncated or damaged?): {err}") from err
            self._zip_names = {Path(n).name: n for n in names if n.lower().endswith(".jpg") and not n.endswith("/")}
        return self._zip_names

    def plan(self) -> SplitPlan:
        names, attributes = parse_attributes(self.attr_file)
        partition = parse_partition(self.partition_file)
        present = self._present()
        splits: dict[str, list[str]] = {name: [] for name in CELEBA_SPLITS.values()}
        left_out = {"listed_but_missing": 0, "present_but_unlisted": 0, "no_attributes": 0}
        for key, split in sorted(partition.items()):
            if key not in present:
                left_out["listed_but_missing"] += 1
            elif key not in attributes:
                left_out["no_attributes"] += 1
            else:
                splits[split].append(key)
        left_out["present_but_unlisted"] = len(present - partition.keys())
        return SplitPlan(splits, names, attributes, left_out)

    def open(self, key: str) -> Image.Image:
        if self.folder is not None:
            return _decode_rgb(self.folder / key, (self.folder / key).read_bytes())
        if self._zip is None:  # opened lazily so each worker process has its own handle
            self._zip = zipfile.ZipFile(self.archive)
        member = self._archive_names()[key]
        try:
            data = self._zip.read(member)
        except DAMAGED_MEMBER_ERRORS as err:
            raise ValueError(f"cannot read {self.archive}:{member}: {err}") from err
        return _decode_rgb(f"{self.archive}:{member}", data)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}


class FolderSource(ImageSource):
    """Any folder of images (searched recursively), without attributes.

    A stable hash of each file's path puts `val_fraction` of them in a `val` split, so the split
    does not change when files are added.
    """

    split_origin = "--val-fraction"

    def __init__(self, root: str | Path, val_fraction: float = 0.0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = val_fraction
        self.name = self.root.name

    def plan(self) -> SplitPlan:
        keys = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not keys:
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.root}")
        splits: dict[str, list[str]] = {"train": [], "val": []}
        for key in keys:
            bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
            splits["val" if bucket < self.val_fraction else "train"].append(key)
        return SplitPlan(splits, [], {})

    def open(self, key: str) -> Image.Image:
        path = self.root / key
        return _decode_rgb(path, path.read_bytes())


def _decode_rgb(where: object, data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises several types for truncated or foreign data
        raise ValueError(f"cannot decode {where}: {err}") from err
    return image.convert("RGB")

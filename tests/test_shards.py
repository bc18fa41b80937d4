import hashlib
import io
import json
import re
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ATTRS, make_fake_celeba
from PIL import Image

from gendist.cli import main as gendist_main
from gendist.data.domains import write_domains
from gendist.data.loader import ShardStream, StreamSpec, batches_per_epoch, read_in_order
from gendist.data.shard_references import REFERENCE_DIR, check_reference, load_reference, write_reference
from gendist.data.shards import (
    Preprocess,
    file_sha256,
    preprocessing_record,
    read_manifest,
    verify_shards,
    write_shards,
)
from gendist.data.sources import CelebASource, FolderSource, carve_splits, parse_attributes, parse_carve


def read_all(shard_dir: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (image, attrs) over every shard of a split, whatever the encoding."""
    manifest = read_manifest(shard_dir)
    found = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shard_dir / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        stems = sorted({name.split(".", 1)[0] for name in members})
        for stem in stems:
            attrs = np.load(io.BytesIO(members[f"{stem}.attrs.npy"]))
            if f"{stem}.images.npy" in members:
                images = np.load(io.BytesIO(members[f"{stem}.images.npy"]))
                keys = members[f"{stem}.keys.txt"].decode().split("\n")
            else:
                data = members.get(f"{stem}.jpg") or members[f"{stem}.png"]
                images, keys = np.asarray(Image.open(io.BytesIO(data)))[None], [stem + ".jpg"]
            for key, image, attr in zip(keys, images, attrs):
                found[key] = (image, attr)
    return found


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "official-zip"])
def test_celeba_conversion_counts_attributes_and_splits(tmp_path: Path, as_zip: bool):
    truth = make_fake_celeba(tmp_path / "celeba", present=30, listed=36, as_zip=as_zip, corrupt=(7,))
    out = tmp_path / "shards"
    manifest = write_shards(
        CelebASource(tmp_path / "celeba"),
        out,
        Preprocess(32),
        images_per_sample=4,
        shard_size=8,
        workers=2,
        show_progress=False,
    )
    good = [n for n in truth["present"] if n != "000007.jpg"]
    for split in ("train", "val", "test"):
        expected = sorted(n for n in good if truth["split_of"][n] == {"train": 0, "val": 1, "test": 2}[split])
        records = read_all(out, split)
        assert sorted(records) == expected
        assert manifest["splits"][split]["count"] == len(expected)
        assert sum(s["count"] for s in manifest["splits"][split]["shards"]) == len(expected)
        for key, (image, attrs) in records.items():
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            np.testing.assert_array_equal(attrs, truth["attrs"][key])
    assert manifest["left_out"] == {
        "listed_but_missing": 6,
        "present_but_unlisted": 0,
        "no_attributes": 0,
        "corrupt": 1,
    }
    assert manifest["corrupt_examples"][0].startswith("000007.jpg")
    assert len(manifest["attribute_names"]) == 40
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_zip_and_folder_give_identical_shard_content(tmp_path: Path):
    make_fake_celeba(tmp_path / "a", as_zip=False)
    make_fake_celeba(tmp_path / "b", as_zip=True)
    for name in ("a", "b"):
        write_shards(
            CelebASource(tmp_path / name), tmp_path / f"out-{name}", Preprocess(32), workers=1, show_progress=False
        )
    a, b = read_all(tmp_path / "out-a", "train"), read_all(tmp_path / "out-b", "train")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])


def test_crop_is_a_fraction_so_half_size_images_frame_alike():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, size=(109, 89, 3), dtype=np.uint8).repeat(2, 0).repeat(2, 1)  # 218x178
    full = Image.fromarray(small)
    half = full.resize((89, 109), Image.Resampling.BOX)
    a, b = Preprocess(32)(full).astype(float), Preprocess(32)(half).astype(float)
    assert np.abs(a - b).mean() < 6.0  # same framing: only resampling noise differs


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_single_image_encodings(tmp_path: Path, encoding: str):
    make_fake_celeba(tmp_path / "celeba", present=12, listed=12)
    out = tmp_path / "shards"
    manifest = write_shards(
        CelebASource(tmp_path / "celeba"), out, Preprocess(32), encoding=encoding, workers=1, show_progress=False
    )
    assert manifest["images_per_sample"] == 1
    assert len(read_all(out, "train")) == manifest["splits"]["train"]["count"] > 0


def test_missing_files_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="CelebA folder not found"):
        CelebASource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="img_align_celeba/ .* or img_align_celeba.zip"):
        CelebASource(tmp_path / "empty")
    make_fake_celeba(tmp_path / "c")
    (tmp_path / "c" / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt not found"):
        CelebASource(tmp_path / "c")


def test_refuses_to_overwrite_a_shard_set(tmp_path: Path):
    make_fake_celeba(tmp_path / "celeba", present=6, listed=6)
    write_shards(CelebASource(tmp_path / "celeba"), tmp_path / "out", Preprocess(16), workers=1, show_progress=False)
    with pytest.raises(FileExistsError, match="already holds a shard set"):
        write_shards(
            CelebASource(tmp_path / "celeba"), tmp_path / "out", Preprocess(16), workers=1, show_progress=False
        )


def test_generic_folder_converter_and_cli(tmp_path: Path):
    src = tmp_path / "cats" / "nested"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)).save(src / f"cat{i}.png")
    (src / "broken.jpg").write_bytes(b"not an image")
    code = gendist_main(
        [
            "shards",
            "folder",
            "--src",
            str(tmp_path / "cats"),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "16",
            "--val-fraction",
            "0.25",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 20
    assert manifest["splits"]["val"]["count"] > 0
    assert manifest["left_out"]["corrupt"] == 1
    assert manifest["attribute_names"] == []
    assert FolderSource(tmp_path / "cats", 0.25).plan().splits == FolderSource(tmp_path / "cats", 0.25).plan().splits


def test_cli_names_a_missing_source(tmp_path: Path, capsys):
    assert gendist_main(["shards", "celeba", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "CelebA folder not found" in capsys.readouterr().err


def convert_celeba(src: Path, out: Path, *options: str) -> int:
    return gendist_main(
        [
            "shards",
            "celeba",
            "--src",
            str(src),
            "--out",
            str(out),
            "--size",
            "16",
            "--shard-size",
            "4",
            "--images-per-sample",
            "2",
            "--workers",
            "1",
            *options,
        ]
    )


def test_all_corrupt_conversion_is_refused_and_leaves_no_shard_set(tmp_path: Path, capsys):
    make_fake_celeba(tmp_path / "celeba", present=6, listed=6, corrupt=(1, 2, 3, 4, 5, 6))
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "gendist: error: celeba: no image could be converted, all 6 were corrupt" in err
    assert "(e.g. 00000" in err and "cannot decode" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.tar*"))


def test_a_split_left_empty_by_corruption_is_named_and_refused_by_the_loader(tmp_path: Path, capsys):
    truth = make_fake_celeba(tmp_path / "celeba", present=12, listed=12, corrupt=(4, 10))  # val: 4 and 10
    assert [n for n in truth["present"] if truth["split_of"][n] == 1] == ["000004.jpg", "000010.jpg"]
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out") == 0
    assert "split val is EMPTY: all 2 of its images were corrupt" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["val"] == {"count": 0, "shards": []}
    assert manifest["splits"]["train"]["count"] == 8 and manifest["splits"]["test"]["count"] == 2
    assert manifest["left_out"]["corrupt"] == 2
    with pytest.raises(ValueError, match="no 'val' shards; splits with data: train, test"):
        ShardStream(StreamSpec(str(tmp_path / "out"), "val", batch_size=1, image_size=16))


def test_manifest_records_streamed_sha256_and_size(tmp_path: Path):
    make_fake_celeba(tmp_path / "celeba", present=6, listed=6)
    manifest = write_shards(
        CelebASource(tmp_path / "celeba"),
        tmp_path / "out",
        Preprocess(16),
        images_per_sample=2,
        shard_size=2,
        workers=1,
        show_progress=False,
    )
    for shard in (s for split in manifest["splits"].values() for s in split["shards"]):
        path = tmp_path / "out" / shard["name"]
        assert shard["bytes"] == path.stat().st_size
        assert shard["sha256"] == file_sha256(path, chunk_bytes=1000) == file_sha256(path)


@pytest.fixture
def shard_set(tmp_path: Path) -> Path:
    """12 fake CelebA images as 2-image shards: train 00000-00003, val 00000, test 00000."""
    make_fake_celeba(tmp_path / "celeba", present=12, listed=12)
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out", "--shard-size", "2") == 0
    return tmp_path / "out"


def test_verify_passes_on_a_fresh_shard_set(shard_set: Path, capsys):
    capsys.readouterr()
    assert gendist_main(["shards", "verify", str(shard_set)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"ok: all 6 shards in {shard_set} match manifest.json"


def test_verify_names_changed_missing_and_extra_shards(shard_set: Path, capsys):
    flipped = shard_set / "train-00000.tar"  # same size, one byte changed: only the sha256 tells
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    with open(shard_set / "train-00001.tar", "ab") as grown:
        grown.write(b"\0" * 512)
    (shard_set / "val-00000.tar").unlink()
    (shard_set / "stray.tar").write_bytes(b"")
    capsys.readouterr()
    assert gendist_main(["shards", "verify", str(shard_set)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    problems, summary = lines[:-1], lines[-1]
    assert len(problems) == 4
    assert any(line.startswith("changed: train-00000.tar: sha256 ") for line in problems)
    assert any(
        line.startswith("changed: train-00001.tar: ") and " bytes, manifest.json says " in line for line in problems
    )
    assert "missing: val-00000.tar: listed with 2 images, not found" in problems
    assert "extra: stray.tar: not listed in manifest.json" in problems
    assert summary == f"DAMAGED: {shard_set}: 1 missing, 2 changed, 1 extra (6 shards listed in manifest.json)"


def test_verify_reads_manifests_without_sizes(shard_set: Path):
    manifest = json.loads((shard_set / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["bytes"]
    (shard_set / "manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(shard_set).ok
    with open(shard_set / "test-00000.tar", "ab") as grown:
        grown.write(b"\0" * 512)
    [problem] = verify_shards(shard_set).problems
    assert (problem.kind, problem.name) == ("changed", "test-00000.tar")


def test_verify_without_a_manifest_exits_2(tmp_path: Path, capsys):
    assert gendist_main(["shards", "verify", str(tmp_path)]) == 2
    assert "no manifest.json in" in capsys.readouterr().err


def damage_zip_member(archive: Path, member: str) -> None:
    """Flip bytes in the middle of a stored member's data, leaving every header intact."""
    with zipfile.ZipFile(archive) as zipped:
        info = zipped.getinfo(member)
    data = bytearray(archive.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    middle = info.header_offset + 30 + name_length + extra_length + info.compress_size // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    archive.write_bytes(bytes(data))


def test_zip_member_with_a_bad_crc_is_counted_as_corrupt(tmp_path: Path):
    make_fake_celeba(tmp_path / "celeba", present=12, listed=12, as_zip=True)
    damage_zip_member(tmp_path / "celeba" / "img_align_celeba.zip", "img_align_celeba/000003.jpg")
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out") == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["left_out"]["corrupt"] == 1
    assert sum(split["count"] for split in manifest["splits"].values()) == 11
    [example] = manifest["corrupt_examples"]
    assert example.startswith("000003.jpg: cannot read ") and "Bad CRC-32" in example


def test_truncated_zip_is_named(tmp_path: Path, capsys):
    make_fake_celeba(tmp_path / "celeba", present=6, listed=6, as_zip=True)
    archive = tmp_path / "celeba" / "img_align_celeba.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "img_align_celeba.zip is not a readable zip (truncated or damaged?)" in err
    assert "Traceback" not in err


SAMPLE = Path(__file__).parents[2] / "shared" / "data" / "celeba-sample"


@pytest.mark.skipif(not (SAMPLE / "img_align_celeba.zip").exists(), reason=f"real CelebA sample not found at {SAMPLE}")
def test_real_celeba_sample_zip(tmp_path: Path):
    """The official zip layout, CRLF attribute file and the complete 202,599-row partition file."""
    manifest = write_shards(
        CelebASource(SAMPLE), tmp_path / "out", Preprocess(32), shard_size=2500, show_progress=False
    )
    assert manifest["splits"]["train"]["count"] == 10_000
    assert manifest["splits"]["val"]["count"] == manifest["splits"]["test"]["count"] == 0
    assert manifest["left_out"] == {
        "listed_but_missing": 192_599,
        "present_but_unlisted": 0,
        "no_attributes": 0,
        "corrupt": 0,
    }
    names, rows = parse_attributes(SAMPLE / "list_attr_celeba.txt")
    assert len(names) == 40 and manifest["attribute_names"] == names
    records = read_all(tmp_path / "out", "train")
    for key in ("000001.jpg", "005000.jpg", "010000.jpg"):
        np.testing.assert_array_equal(records[key][1], rows[key])


def make_train_only_celeba(root: Path, present: int = 30, listed: int = 36, as_zip: bool = False) -> dict:
    """A fake CelebA whose partition lists every image as train, like the real 10,000-image sample."""
    truth = make_fake_celeba(root, present=present, listed=listed, as_zip=as_zip)
    names = [f"{i:06d}.jpg" for i in range(1, listed + 1)]
    (root / "list_eval_partition.txt").write_bytes("".join(f"{n} 0\r\n" for n in names).encode())
    return truth


def sha256_first(keys: list[str], count: int) -> list[str]:
    return sorted(sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())[:count])


def test_carving_counts_are_exact_disjoint_and_follow_the_sha256_order(tmp_path: Path):
    truth = make_train_only_celeba(tmp_path / "celeba")
    plan = CelebASource(tmp_path / "celeba").plan()
    assert len(plan.splits["train"]) == 30 and plan.splits["val"] == plan.splits["test"] == []
    carved_plan, carved = carve_splits(plan, parse_carve("val=0.2, test=4"))
    val, test, train = (carved_plan.splits[s] for s in ("val", "test", "train"))
    assert (len(val), len(test), len(train)) == (6, 4, 20)  # 0.2 x 30 = 6 and exactly 4
    ranked = sorted(truth["present"], key=lambda k: hashlib.sha256(k.encode()).hexdigest())
    assert val == sorted(ranked[:6]) and test == sorted(ranked[6:10])
    assert set(val) | set(test) | set(train) == set(truth["present"])
    assert not (set(val) & set(test)) and not (set(val) | set(test)) & set(train)
    assert carved == {
        "val": {"from": "train", "requested": "0.2", "count": 6, "available": 30, "rule": "sha256(key) order"},
        "test": {
            "from": "train",
            "requested": "4",
            "count": 4,
            "available": 30,
            "rule": "sha256(key) order, after the val images",
        },
    }
    assert plan.splits["train"] == truth["present"]  # the source's plan is left as it was
    assert carve_splits(plan, {}) == (plan, {})  # nothing asked: the same plan object
    again_plan, again = carve_splits(plan, {"val": 0.2, "test": 4})  # numbers work like the CLI's text
    assert again_plan.splits == carved_plan.splits and again == carved


def test_carved_images_stay_carved_when_files_are_missing(tmp_path: Path):
    make_train_only_celeba(tmp_path / "celeba", present=30, listed=30)
    full = carve_splits(CelebASource(tmp_path / "celeba").plan(), {"val": "5"})[0]
    removed = [full.splits["val"][0], full.splits["train"][0], full.splits["train"][-1]]
    for name in removed:
        (tmp_path / "celeba" / "img_align_celeba" / name).unlink()
    partial = carve_splits(CelebASource(tmp_path / "celeba").plan(), {"val": "5"})[0]
    assert len(partial.splits["val"]) == 5 and len(partial.splits["train"]) == 22
    assert set(full.splits["val"]) - set(removed) < set(partial.splits["val"])  # the 4 left, plus 1
    [newcomer] = set(partial.splits["val"]) - set(full.splits["val"])
    assert newcomer in full.splits["train"]  # the next in sha256 order took the missing one's place
    # a fraction is of what is present: 0.2 x 27 rounds to 5 too, so the same images
    assert carve_splits(CelebASource(tmp_path / "celeba").plan(), {"val": "0.2"})[0].splits == partial.splits


def test_carve_through_the_cli_is_recorded_in_the_manifest_and_summary(tmp_path: Path, capsys):
    make_train_only_celeba(tmp_path / "celeba", as_zip=True)
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out", "--carve", "val=0.1,test=5", "--seed", "3") == 0
    out = capsys.readouterr().out
    assert "carved from train by sha256(key) order: val 3 (0.1), test 5;" in out
    manifest = read_manifest(tmp_path / "out")
    assert manifest["carved"]["val"] == {
        "from": "train",
        "requested": "0.1",
        "count": 3,
        "available": 30,
        "rule": "sha256(key) order",
    }
    assert manifest["carved"]["test"]["count"] == 5
    records = {split: read_all(tmp_path / "out", split) for split in ("train", "val", "test")}
    assert {split: len(r) for split, r in records.items()} == {"train": 22, "val": 3, "test": 5}
    assert {split: manifest["splits"][split]["count"] for split in records} == {"train": 22, "val": 3, "test": 5}
    assert not records["train"].keys() & (records["val"].keys() | records["test"].keys())
    expected = carve_splits(CelebASource(tmp_path / "celeba").plan(), {"val": "0.1", "test": "5"})[0]
    assert sorted(records["val"]) == expected.splits["val"] and sorted(records["test"]) == expected.splits["test"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["carved"] == manifest["carved"]


def test_conversion_without_carve_records_none(tmp_path: Path):
    make_fake_celeba(tmp_path / "celeba", present=6, listed=6)
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out") == 0
    assert read_manifest(tmp_path / "out")["carved"] == {}


@pytest.mark.parametrize(
    ("carve", "message"),
    [
        ("val=31", "--carve val=31: only 30 train images are available to carve from"),
        ("val=0", "--carve val=0: a count must be at least 1"),
        ("val=1.0", r"--carve val=1.0: a fraction must be in \(0, 1\)"),
        ("test=1.5", r"--carve test=1.5: a fraction must be in \(0, 1\)"),
        ("val=-0.1", r"--carve val=-0.1: a fraction must be in \(0, 1\)"),
        ("val=0.01", "--carve val=0.01: 0.01 of 30 train images is 0 images"),
        ("val=lots", "--carve val=lots: expected an image count or a fraction in"),
        ("train=5", "--carve can make only val and test splits, not train"),
        ("holdout=5,val=2", "--carve can make only val and test splits, not holdout"),
        ("val=20,test=10", "--carve would leave train empty: it asks for 20 val \\+ 10 test of the 30 train images"),
        ("val=0.5,test=0.5", "would leave train empty: it asks for 15 val \\+ 15 test of the 30"),
        ("val", "--carve expects SPLIT=AMOUNT"),
        ("val=2,val=3", "--carve names split 'val' twice"),
    ],
)
def test_bad_carves_are_refused_by_the_cli(tmp_path: Path, capsys, carve: str, message: str):
    make_train_only_celeba(tmp_path / "celeba", present=30, listed=30)
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out", "--carve", carve) == 2
    err = capsys.readouterr().err
    assert err.startswith("gendist: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_carve_is_refused_where_the_official_partition_has_that_split(tmp_path: Path, capsys):
    truth = make_fake_celeba(tmp_path / "celeba", present=30, listed=36)
    official_val = sum(1 for n in truth["present"] if truth["split_of"][n] == 1)
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out", "--carve", "val=3") == 2
    err = capsys.readouterr().err
    assert (
        f"gendist: error: cannot carve val: {official_val} val images already come from the official partition "
        "(list_eval_partition.txt)"
    ) in err
    # with only the official val images missing from the download, val is empty and may be carved
    for name in truth["present"]:
        if truth["split_of"][name] == 1:
            (tmp_path / "celeba" / "img_align_celeba" / name).unlink()
    plan = CelebASource(tmp_path / "celeba").plan()
    carved_plan, carved = carve_splits(plan, {"val": "3"})
    assert len(carved_plan.splits["val"]) == 3 and carved_plan.splits["test"] == plan.splits["test"] != []
    with pytest.raises(ValueError, match="cannot carve test: 5 test images already come from the source"):
        carve_splits(plan, {"test": "0.1"})


def make_image_folder(root: Path, count: int) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, size=(24, 20, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")


def convert_folder(src: Path, out: Path, *options: str) -> int:
    return gendist_main(
        ["shards", "folder", "--src", str(src), "--out", str(out), "--size", "8", "--workers", "1", *options]
    )


def test_folder_carve_and_val_fraction(tmp_path: Path, capsys):
    make_image_folder(tmp_path / "pics" / "sub", 20)
    assert convert_folder(tmp_path / "pics", tmp_path / "a", "--carve", "val=4,test=0.25") == 0
    manifest = read_manifest(tmp_path / "a")
    assert {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")} == {"train": 11, "val": 4, "test": 5}
    assert manifest["carved"]["test"]["requested"] == "0.25" and manifest["carved"]["test"]["count"] == 5
    val = sorted(read_all(tmp_path / "a", "val"))
    assert val == sha256_first([f"sub/img{i:02d}.png" for i in range(20)], 4)
    # --val-fraction still makes val itself; --carve may add test but not a second val
    assert convert_folder(tmp_path / "pics", tmp_path / "b", "--val-fraction", "0.25", "--carve", "test=3") == 0
    manifest = read_manifest(tmp_path / "b")
    by_fraction = FolderSource(tmp_path / "pics", 0.25).plan().splits["val"]
    assert manifest["splits"]["val"]["count"] == len(by_fraction) > 0
    assert manifest["splits"]["test"]["count"] == 3 and list(manifest["carved"]) == ["test"]
    capsys.readouterr()
    assert convert_folder(tmp_path / "pics", tmp_path / "c", "--val-fraction", "0.25", "--carve", "val=3") == 2
    assert (
        f"cannot carve val: {len(by_fraction)} val images already come from --val-fraction" in capsys.readouterr().err
    )


@pytest.mark.skipif(not (SAMPLE / "img_align_celeba.zip").exists(), reason=f"real CelebA sample not found at {SAMPLE}")
def test_real_celeba_sample_with_a_carved_val_split(tmp_path: Path, capsys):
    """The sample is all official train: carve 500 for held-out evaluation."""
    code = gendist_main(
        ["shards", "celeba", "--src", str(SAMPLE), "--out", str(tmp_path / "out"), "--size", "16"]
        + ["--shard-size", "2500", "--carve", "val=500"]
    )
    assert code == 0
    assert "carved from train by sha256(key) order: val 500;" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    assert {s: manifest["splits"][s]["count"] for s in ("train", "val", "test")} == {
        "train": 9500,
        "val": 500,
        "test": 0,
    }
    assert manifest["carved"] == {
        "val": {"from": "train", "requested": "500", "count": 500, "available": 10_000, "rule": "sha256(key) order"}
    }
    val = read_all(tmp_path / "out", "val")
    assert sorted(val) == sha256_first([f"{i:06d}.jpg" for i in range(1, 10_001)], 500)
    _, rows = parse_attributes(SAMPLE / "list_attr_celeba.txt")
    for key in sorted(val)[:3]:
        np.testing.assert_array_equal(val[key][1], rows[key])


EYEGLASSES, BLOND, BLACK = (ATTRS.index(name) for name in ("Eyeglasses", "Blond_Hair", "Black_Hair"))


def domain_set(root: Path, *options: str) -> tuple[Path, list[str], dict]:
    """36 fake CelebA images (train 24) as 4-image shards of 2-image blocks (or --encoding ...):
    the shard folder, the train keys and the true attributes."""
    truth = make_fake_celeba(root / "celeba", present=36, listed=36)
    assert convert_celeba(root / "celeba", root / "out", *options) == 0
    return root / "out", [n for n in truth["present"] if truth["split_of"][n] == 0], truth["attrs"]


def domains(shard_dir: Path, *options: str) -> int:
    return gendist_main(["shards", "domains", str(shard_dir), *options])


def members(shard_dir: Path, split: str) -> dict[str, bytes]:
    """Tar member name -> bytes over a split's shards."""
    found = {}
    for shard in read_manifest(shard_dir)["splits"][split]["shards"]:
        with tarfile.open(shard_dir / shard["name"]) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return found


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_domains_by_one_attribute_copy_the_images_and_count_them(tmp_path: Path, capsys, encoding: str):
    out, train, attrs = domain_set(tmp_path, "--encoding", encoding)
    before = read_manifest(out)
    capsys.readouterr()
    assert domains(out, "--attribute", "Eyeglasses", "--splits", "train") == 0
    with_glasses = sorted(k for k in train if attrs[k][EYEGLASSES] > 0)
    without = sorted(k for k in train if attrs[k][EYEGLASSES] < 0)
    assert 0 < len(with_glasses) < len(train) == 24
    assert f"train: train.not_Eyeglasses {len(without)}, train.Eyeglasses {len(with_glasses)}, left out 0 of 24" in (
        capsys.readouterr().out
    )
    manifest = read_manifest(out)
    record = manifest["domains"]["Eyeglasses"]
    assert {k: v for k, v in record.items() if k != "created"} == {
        "attributes": ["Eyeglasses"],
        "domains": ["not_Eyeglasses", "Eyeglasses"],
        "rule": "not_Eyeglasses: Eyeglasses = -1; Eyeglasses: Eyeglasses = +1",
        "splits": {
            "train": {
                "count": 24,
                "domains": {"not_Eyeglasses": len(without), "Eyeglasses": len(with_glasses)},
                "left_out": 0,
            }
        },
    }
    for split, keys in (("train.Eyeglasses", with_glasses), ("train.not_Eyeglasses", without)):
        entry = manifest["splits"][split]
        assert entry["count"] == sum(s["count"] for s in entry["shards"]) == len(keys)
        assert all(s["count"] <= 4 and s["name"].startswith(f"{split}-") for s in entry["shards"])
        assert sorted(read_all(out, split)) == keys
    assert {k: v for k, v in manifest["splits"].items() if "." not in k} == before["splits"]  # sources untouched
    # the same images in the same order as in train, pixels and attributes unchanged
    images, stored_attrs, _ = read_in_order(str(out), "train", 16)
    has = stored_attrs[:, EYEGLASSES] > 0
    for split, mask in (("train.Eyeglasses", has), ("train.not_Eyeglasses", ~has)):
        domain_images, domain_attrs, errors = read_in_order(str(out), split, 16)
        assert (
            errors == 0
            and np.array_equal(domain_images, images[mask])
            and np.array_equal(domain_attrs, stored_attrs[mask])
        )
    if encoding == "jpeg":  # the encoded bytes themselves, member by member
        source = members(out, "train")
        copied = members(out, "train.Eyeglasses") | members(out, "train.not_Eyeglasses")
        assert copied == source
    assert gendist_main(["shards", "verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("match manifest.json")
    assert not list(out.glob("*.partial"))


def test_domain_split_streams_equal_batches_to_two_ranks(tmp_path: Path):
    out, train, attrs = domain_set(tmp_path)
    assert domains(out, "--attribute", "Eyeglasses", "--splits", "train") == 0
    count = read_manifest(out)["splits"]["train.Eyeglasses"]["count"]
    streams = [
        ShardStream(
            StreamSpec(str(out), "train.Eyeglasses", batch_size=2, image_size=16, rank=r, world_size=2, shuffle_pool=4)
        )
        for r in range(2)
    ]
    batches = [list(stream) for stream in streams]
    assert len(streams[0]) == len(streams[1]) == batches_per_epoch(count, 2, 2) > 0
    assert [len(b) for b in batches] == [len(streams[0])] * 2
    assert all(batch["images"].shape == (2, 3, 16, 16) for b in batches for batch in b)
    assert all(bool((batch["attrs"][:, EYEGLASSES] > 0).all()) for b in batches for batch in b)
    seen = [tuple(image.flatten().tolist()) for b in batches for batch in b for image in batch["images"]]
    assert len(set(seen)) == len(seen) == 2 * 2 * len(streams[0])  # no image read twice across the ranks


def test_domains_by_two_attributes_leave_out_both_and_neither(tmp_path: Path, capsys):
    out, train, attrs = domain_set(tmp_path)
    assert domains(out, "--attribute", "Blond_Hair,Black_Hair", "--splits", "train") == 0
    blond = {k for k in train if attrs[k][BLOND] > 0 and attrs[k][BLACK] < 0}
    black = {k for k in train if attrs[k][BLACK] > 0 and attrs[k][BLOND] < 0}
    left_out = len(train) - len(blond) - len(black)
    assert blond and black and left_out == sum(1 for k in train if (attrs[k][BLOND] > 0) == (attrs[k][BLACK] > 0))
    manifest = read_manifest(out)
    record = manifest["domains"]["Blond_Hair,Black_Hair"]
    assert record["domains"] == ["Blond_Hair", "Black_Hair"]
    assert record["rule"] == (
        "Blond_Hair: Blond_Hair = +1 and Black_Hair = -1; Black_Hair: Black_Hair = +1 and Blond_Hair = -1; "
        "both or neither: left out"
    )
    assert record["splits"]["train"] == {
        "count": 24,
        "domains": {"Blond_Hair": len(blond), "Black_Hair": len(black)},
        "left_out": left_out,
    }
    a, b = read_all(out, "train.Blond_Hair"), read_all(out, "train.Black_Hair")
    assert set(a) == blond and set(b) == black
    assert len(a) + len(b) + left_out == manifest["splits"]["train"]["count"]
    source = read_all(out, "train")
    for key, (image, attr) in (a | b).items():
        assert np.array_equal(image, source[key][0]) and np.array_equal(attr, attrs[key])


def set_attribute(root: Path, name: str, value: int) -> None:
    """Give every image of a fake CelebA the same value of one attribute."""
    lines = (root / "list_attr_celeba.txt").read_bytes().decode().split("\r\n")
    column = 1 + ATTRS.index(name)
    rows = [line.split() for line in lines[2:] if line]
    for row in rows:
        row[column] = str(value)
    (root / "list_attr_celeba.txt").write_bytes(
        ("\r\n".join(lines[:2] + [" ".join(r) for r in rows]) + "\r\n").encode()
    )


def test_domains_are_refused_with_the_reason(tmp_path: Path, capsys):
    make_fake_celeba(tmp_path / "celeba", present=36, listed=36)
    set_attribute(tmp_path / "celeba", "Bald", -1)
    assert convert_celeba(tmp_path / "celeba", tmp_path / "out") == 0
    out = tmp_path / "out"
    assert domains(out, "--attribute", "Eyeglasses", "--splits", "train") == 0
    snapshot = (out / "manifest.json").read_bytes(), sorted(p.name for p in out.iterdir())
    cases = [
        (
            ["--attribute", "Eyeglases"],
            "unknown attribute Eyeglases in .*; valid ones: 5_o_Clock_Shadow, Arched_Eyebrows, .*, Young$",
        ),
        (["--attribute", "Male,Eyeglases"], "unknown attribute Eyeglases"),
        (["--attribute", "Male,Male"], "--attribute names Male twice"),
        (["--attribute", "Male,Smiling,Young"], "--attribute expects one attribute or two separated by a comma"),
        (
            ["--attribute", "Bald", "--splits", "train"],
            "domain Bald of split train in .* is empty: 0 of its 24 images \\(not_Bald 24, left out 0\\)",
        ),
        (
            ["--attribute", "Male", "--splits", "holdout"],
            "has no split 'holdout'; its splits: train, val, test, train.not_Eyeglasses",
        ),
        (
            ["--attribute", "Male", "--splits", "train.Eyeglasses"],
            "split train.Eyeglasses of .* is itself a domain \\(of Eyeglasses\\)",
        ),
        (
            ["--attribute", "Eyeglasses,Male", "--splits", "train"],
            "split train.Eyeglasses of .* already exists \\(the domains of Eyeglasses\\)",
        ),
    ]
    for options, message in cases:
        capsys.readouterr()
        assert domains(out, *options) == 2, options
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("gendist: error: ") and re.search(message, err), err
        assert ((out / "manifest.json").read_bytes(), sorted(p.name for p in out.iterdir())) == snapshot, options
    make_image_folder(tmp_path / "pics", 4)
    assert convert_folder(tmp_path / "pics", tmp_path / "plain") == 0
    capsys.readouterr()
    assert domains(tmp_path / "plain", "--attribute", "Male") == 2
    assert "has no attributes (its source has none)" in capsys.readouterr().err


def test_running_a_spec_again_replaces_its_domain_splits(tmp_path: Path, capsys):
    out, train, attrs = domain_set(tmp_path)
    write_domains(out, "Eyeglasses", ["train"], shard_size=1)  # one image per shard
    first = read_manifest(out)
    many = first["splits"]["train.Eyeglasses"]["shards"]
    assert len(many) == first["splits"]["train.Eyeglasses"]["count"] > 4
    assert domains(out, "--attribute", "Eyeglasses", "--splits", "train") == 0  # again, default shard size
    again = read_manifest(out)
    assert again["domains"]["Eyeglasses"]["splits"] == first["domains"]["Eyeglasses"]["splits"]
    assert [s["count"] for s in again["splits"]["train.Eyeglasses"]["shards"]] == [4] * (len(many) // 4) + (
        [len(many) % 4] if len(many) % 4 else []
    )
    assert sorted(read_all(out, "train.Eyeglasses")) == sorted(k for k in train if attrs[k][EYEGLASSES] > 0)
    listed = {s["name"] for split in again["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed  # the one-image shards are gone
    assert not list(out.glob("*.partial"))
    capsys.readouterr()
    assert gendist_main(["shards", "verify", str(out)]) == 0
    assert (
        capsys.readouterr().out.strip().splitlines()[-1] == f"ok: all {len(listed)} shards in {out} match manifest.json"
    )


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_domains_of_a_damaged_split_are_refused_and_nothing_is_written(tmp_path: Path, capsys, damage: str):
    """A flipped pixel byte reads fine, but the copies would get checksums of their own: refused."""
    out, _, _ = domain_set(tmp_path)
    shard = out / "train-00001.tar"
    data = bytearray(shard.read_bytes())
    if damage == "cut":
        del data[1500:]
    else:
        data[1024] ^= 0xFF  # inside the first block's images.npy
    shard.write_bytes(bytes(data))
    snapshot = (out / "manifest.json").read_bytes(), sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert domains(out, "--attribute", "Eyeglasses", "--splits", "train") == 2
    err = capsys.readouterr().err
    assert "gendist: error: 1 shard(s) of train do not match manifest.json (changed: train-00001.tar: " in err
    assert f"see `gendist shards verify {out}`" in err and "Traceback" not in err
    assert ((out / "manifest.json").read_bytes(), sorted(p.name for p in out.iterdir())) == snapshot


def test_domains_default_to_every_source_split_and_merge_reruns(tmp_path: Path, capsys):
    out, _, attrs = domain_set(tmp_path)
    assert domains(out, "--attribute", "Eyeglasses", "--splits", "train") == 0
    assert domains(out, "--attribute", "Male") == 0  # train, val and test; not the Eyeglasses domains
    manifest = read_manifest(out)
    record = manifest["domains"]["Male"]
    assert list(record["splits"]) == ["train", "val", "test"]
    for split in ("train", "val", "test"):
        keys = sorted(read_all(out, split))
        males = sorted(k for k in keys if attrs[k][ATTRS.index("Male")] > 0)
        assert record["splits"][split]["domains"] == {"not_Male": len(keys) - len(males), "Male": len(males)}
        assert sorted(read_all(out, f"{split}.Male")) == males
    assert not any(
        name.startswith("train.Eyeglasses.") or name.startswith("train.not_Eyeglasses.") for name in manifest["splits"]
    )
    assert domains(out, "--attribute", "Male", "--splits", "val") == 0  # the other source splits' records stay
    assert read_manifest(out)["domains"]["Male"]["splits"] == record["splits"]
    assert verify_shards(out).ok


def shard_sha256s(shard_dir: Path) -> dict[str, str]:
    return {s["name"]: s["sha256"] for split in read_manifest(shard_dir)["splits"].values() for s in split["shards"]}


def test_converting_the_same_images_twice_gives_the_same_bytes(tmp_path: Path):
    make_fake_celeba(tmp_path / "celeba", present=12, listed=12)
    assert convert_celeba(tmp_path / "celeba", tmp_path / "a") == 0
    assert convert_celeba(tmp_path / "celeba", tmp_path / "b", "--workers", "2") == 0
    assert len(shard_sha256s(tmp_path / "a")) == 4
    assert shard_sha256s(tmp_path / "a") == shard_sha256s(tmp_path / "b")


@pytest.fixture
def reference_file(shard_set: Path) -> Path:
    """The reference of `shard_set`, in its own folder."""
    path = shard_set.parent / "references" / "fake12.json"
    write_reference(shard_set, path, "12 fake CelebA images at 16 px")
    return path


def test_a_reference_written_from_a_set_verifies_it(shard_set: Path, reference_file: Path):
    reference = load_reference(reference_file)
    manifest = read_manifest(shard_set)
    assert reference["name"] == "fake12" and reference["description"] == "12 fake CelebA images at 16 px"
    assert reference["preprocessing"] == manifest["preprocessing"] == preprocessing_record(Preprocess(16))
    assert {split: entry["count"] for split, entry in reference["splits"].items()} == {"train": 8, "val": 2, "test": 2}
    assert all(len(entry["content_sha256"]) == 64 for entry in reference["splits"].values())
    assert reference["layout"] == {"encoding": "raw", "images_per_sample": 2, "seed": 0}
    check = check_reference(shard_set, reference)
    assert check.ok and not check.notes
    assert check.summary() == (
        "ok: matches reference fake12 (counts of 3 splits, preprocessing, attributes, carve; "
        "train, val, test byte for byte)"
    )


def test_another_layout_of_the_same_images_matches_by_content_and_jpeg_does_not(shard_set: Path, reference_file: Path):
    reference = load_reference(reference_file)
    source = shard_set.parent / "celeba"
    assert (
        convert_celeba(source, shard_set.parent / "png", "--encoding", "png", "--shard-size", "3", "--seed", "7") == 0
    )
    check = check_reference(shard_set.parent / "png", reference)
    assert check.ok, check.mismatches
    assert check.summary().endswith("carve; train, val, test by content)")
    assert check.notes[0] == (
        "train: content matches the reference; its shard files differ "
        "(encoding raw vs png, images_per_sample 2 vs 1, seed 0 vs 7, shard sizes [2, 2, 2, 2] vs [3, 3, 2])"
    )
    assert convert_celeba(source, shard_set.parent / "jpeg", "--encoding", "jpeg") == 0
    check = check_reference(shard_set.parent / "jpeg", reference)
    assert [m.field for m in check.mismatches] == [f"splits.{s}.content_sha256" for s in ("train", "val", "test")]


def changed_count(reference: dict) -> None:
    reference["splits"]["val"]["count"] = 3


def changed_size(reference: dict) -> None:
    reference["preprocessing"]["size"] = 64


def changed_checksums(reference: dict) -> None:
    reference["splits"]["train"]["content_sha256"] = "0" * 64
    reference["splits"]["train"]["shards"][0]["sha256"] = "1" * 64  # so the content is hashed


def carved_val(reference: dict) -> None:
    reference["carved"] = {"val": {"from": "train", "count": 2}}


def fewer_attributes(reference: dict) -> None:
    reference["attribute_names"] = reference["attribute_names"][:-1]


@pytest.mark.parametrize(
    "change, message",
    [
        (changed_count, "splits.val.count: reference 3, this set 2"),
        (changed_size, "preprocessing.size: reference 64, this set 16"),
        (changed_checksums, f'splits.train.content_sha256: reference "{"0" * 64}", this set "'),
        (carved_val, 'carved.val: reference {"from": "train", "count": 2}, this set absent'),
        (fewer_attributes, "attribute_names: reference 39 names, this set 40 names, 1 not in the reference (Young)"),
    ],
)
def test_a_set_that_differs_from_its_reference_names_the_field(
    shard_set: Path, reference_file: Path, change, message: str
):
    reference = load_reference(reference_file)
    change(reference)
    check = check_reference(shard_set, reference)
    assert [str(m) for m in check.mismatches if str(m).startswith(message)] == [str(m) for m in check.mismatches], (
        check.mismatches
    )
    assert len(check.mismatches) == 1
    assert check.summary().startswith("DIFFERS from reference fake12: 1 field(s)")


def test_splits_added_after_the_conversion_are_left_out_of_a_reference(shard_set: Path, reference_file: Path):
    write_domains(shard_set, "Eyeglasses", ["train"])
    assert "train.Eyeglasses" in read_manifest(shard_set)["splits"]
    assert check_reference(shard_set, load_reference(reference_file)).ok
    refilled = write_reference(shard_set, reference_file)
    assert list(refilled["splits"]) == ["train", "val", "test"]
    assert refilled["description"] == "12 fake CelebA images at 16 px"


def test_a_reference_is_filled_in_only_by_a_set_that_matches_it(shard_set: Path, reference_file: Path):
    counts_only = {**load_reference(reference_file), "splits": {"train": {"count": 9}, "val": {"count": 2}}}
    reference_file.write_text(json.dumps(counts_only))
    with pytest.raises(ValueError, match="splits.train.count: reference 9, this set 8; splits.test.count: reference"):
        write_reference(shard_set, reference_file)
    assert json.loads(reference_file.read_text()) == counts_only
    (shard_set / "train-00000.tar").write_bytes(b"damaged")
    with pytest.raises(ValueError, match="DAMAGED: .* a reference must come from an intact set"):
        write_reference(shard_set, shard_set.parent / "new.json")


def test_unknown_reference_names_list_the_shipped_ones():
    with pytest.raises(ValueError, match=r"unknown reference 'celeba32'; .* has: celeba-sample64, celeba128, celeba64"):
        load_reference("celeba32")
    with pytest.raises(FileNotFoundError, match="reference file missing.json not found"):
        load_reference("missing.json")


@pytest.mark.parametrize("size", [64, 128])
def test_shipped_full_celeba_references_hold_the_official_counts(size: int):
    reference = load_reference(f"celeba{size}")
    assert reference == load_reference(REFERENCE_DIR / f"celeba{size}.json")
    counts = {split: entry["count"] for split, entry in reference["splits"].items()}
    assert counts == {"train": 162_770, "val": 19_867, "test": 19_962} and sum(counts.values()) == 202_599
    assert reference["dataset"] == "celeba" and reference["carved"] == {}
    assert reference["attribute_names"] == ATTRS
    assert reference["preprocessing"] == preprocessing_record(Preprocess(size))
    assert not any("content_sha256" in entry for entry in reference["splits"].values())
    assert (
        f"gendist shards reference shards/celeba{size} --out shards/reference/celeba{size}.json"
        in (reference["pending"])
    )


def test_shipped_sample_reference_holds_the_carved_sample_at_64_px():
    reference = load_reference("celeba-sample64")
    assert {split: entry["count"] for split, entry in reference["splits"].items()} == {
        "train": 9500,
        "val": 500,
        "test": 0,
    }
    assert reference["carved"] == {
        "val": {"from": "train", "requested": "500", "count": 500, "available": 10_000, "rule": "sha256(key) order"}
    }
    assert reference["preprocessing"] == preprocessing_record(Preprocess(64))
    assert reference["attribute_names"] == ATTRS
    assert reference["layout"] == {"encoding": "raw", "images_per_sample": 64, "seed": 0}
    assert [[s["count"] for s in reference["splits"][split]["shards"]] for split in ("train", "val")] == [
        [4096, 4096, 1308],
        [500],
    ]
    assert all(len(reference["splits"][split]["content_sha256"]) == 64 for split in ("train", "val"))


def test_verify_against_a_reference_prints_each_difference_and_exits_1(shard_set: Path, reference_file: Path, capsys):
    capsys.readouterr()
    assert gendist_main(["shards", "verify", str(shard_set), "--reference", str(reference_file)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("ok: matches reference fake12 (")
    reference = load_reference(reference_file)
    changed_count(reference)
    changed_size(reference)
    reference_file.write_text(json.dumps(reference))
    assert gendist_main(["shards", "verify", str(shard_set), "--reference", str(reference_file)]) == 1
    assert capsys.readouterr().out.splitlines()[-3:] == [
        "preprocessing.size: reference 64, this set 16",
        "splits.val.count: reference 3, this set 2",
        "DIFFERS from reference fake12: 2 field(s) (counts of 3 splits, preprocessing, attributes, carve; "
        "train, test byte for byte)",
    ]
    assert gendist_main(["shards", "verify", str(shard_set), "--reference", "celeba32"]) == 2
    assert "unknown reference 'celeba32'; " in capsys.readouterr().err


def test_reference_command_writes_a_reference_the_set_verifies_against(shard_set: Path, capsys):
    out = shard_set.parent / "mine.json"
    assert gendist_main(["shards", "reference", str(shard_set), "--out", str(out), "--description", "mine"]) == 0
    assert f"wrote {out}: reference mine of {shard_set} (train 8, val 2, test 2)" in capsys.readouterr().out
    assert gendist_main(["shards", "verify", str(shard_set), "--reference", str(out)]) == 0

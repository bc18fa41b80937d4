import json
import shutil
import signal
import tarfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import gendist.data.loader as loader_module
from gendist.data.loader import (
    ShardStream,
    StreamSpec,
    batches_per_epoch,
    make_loader,
    read_attributes,
    read_in_order,
    read_range,
    read_samples,
)
from gendist.data.shards import Preprocess, read_manifest, write_shards
from gendist.data.sources import ImageSource, SplitPlan

BITS = 12  # attribute bits spelling an image's index
SIZE = 8


def spec_for(shards: Path, **kw) -> StreamSpec:
    return StreamSpec(
        **{"shard_dir": str(shards), "split": "train", "batch_size": 8, "image_size": 32, "shuffle_pool": 64, **kw}
    )


class IndexSource(ImageSource):
    """Train image i < 4096 is one flat colour spelling i in base 16 (a step's centre per channel, so no
    resampling can turn it into a neighbour); its attributes spell i in +-1 bits."""

    name = "index"

    def __init__(self, count: int) -> None:
        self.count = count

    def plan(self) -> SplitPlan:
        keys = [f"{i:05d}.png" for i in range(self.count)]
        attributes = {
            key: np.array([1 if i >> b & 1 else -1 for b in range(BITS)], np.int8) for i, key in enumerate(keys)
        }
        return SplitPlan({"train": keys}, [f"bit{b}" for b in range(BITS)], attributes)

    def open(self, key: str) -> Image.Image:
        i = int(key[:5])
        return Image.new("RGB", (10, 10), tuple(16 * (i >> shift & 15) + 8 for shift in (0, 4, 8)))


def indices(batch: dict) -> list[int]:
    """The image indices in a batch, checked against the ones its attributes spell."""
    centre = batch["images"][:, :, SIZE // 2, SIZE // 2].long() // 16  # (B, 3)
    from_pixels = (centre * torch.tensor([1, 16, 256])).sum(1)
    from_attrs = ((batch["attrs"].long() > 0) * (2 ** torch.arange(BITS))).sum(1)
    assert torch.equal(from_pixels, from_attrs)
    return from_pixels.tolist()


def index_shards(out: Path, count: int, **kw) -> Path:
    write_shards(IndexSource(count), out, Preprocess(SIZE, crop_fraction=1.0), workers=1, show_progress=False, **kw)
    return out


@pytest.fixture(scope="module")
def index_sets(tmp_path_factory) -> dict[str, Path]:
    """Fewer shards than slots (one; one big and one tiny) and more (14 of png, one image per sample)."""
    root = tmp_path_factory.mktemp("index")
    return {
        "one": index_shards(root / "one", 150, images_per_sample=4, shard_size=1000),
        "big+tiny": index_shards(root / "big+tiny", 107, images_per_sample=5, shard_size=100),
        "many": index_shards(root / "many", 150, encoding="png", shard_size=11),
    }


def index_spec(shards: Path, **kw) -> StreamSpec:
    return StreamSpec(
        **{
            "shard_dir": str(shards),
            "split": "train",
            "batch_size": 4,
            "image_size": SIZE,
            "shuffle_pool": 16,
            "seed": 5,
            **kw,
        }
    )


def as_workers(monkeypatch, stream: ShardStream, num_workers: int) -> list[list[dict]]:
    """Each loader worker's batches, run in this process as get_worker_info() would describe it."""
    runs = []
    for worker in range(num_workers):
        monkeypatch.setattr(
            loader_module, "get_worker_info", lambda worker=worker: SimpleNamespace(id=worker, num_workers=num_workers)
        )
        runs.append(list(stream))
    monkeypatch.undo()
    return runs


def round_robin(runs: list[list[dict]]) -> list[dict]:
    """The order a DataLoader hands out its workers' batches."""
    return [run[i] for i in range(max(map(len, runs))) for run in runs if i < len(run)]


@contextmanager
def deadline(seconds: int):
    """Fail instead of hanging."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_index_shards_are_uneven(index_sets):
    counts = {
        name: [s["count"] for s in read_manifest(path)["splits"]["train"]["shards"]]
        for name, path in index_sets.items()
    }
    assert counts == {"one": [150], "big+tiny": [100, 7], "many": [11] * 13 + [7]}


@pytest.mark.parametrize("name", ["one", "big+tiny", "many"])
def test_every_image_is_read_once_per_epoch(index_sets, monkeypatch, name):
    """1-3 ranks x 1-4 workers, 4 epochs: equal batch counts per rank, each image read once per
    epoch but for the N mod (world x batch) left over, which moves, so all are read over the epochs."""
    num_images = read_manifest(index_sets[name])["splits"]["train"]["count"]
    for world in (1, 2, 3):
        for num_workers in (1, 2, 3, 4):
            expected = batches_per_epoch(num_images, world, 4)
            left_over, ever = [], np.zeros(num_images, int)
            for epoch in range(4):
                reads = np.zeros(num_images, int)
                for rank in range(world):
                    stream = ShardStream(index_spec(index_sets[name], rank=rank, world_size=world), epoch)
                    batches = [b for run in as_workers(monkeypatch, stream, num_workers) for b in run]
                    assert len(batches) == len(stream) == expected, (world, num_workers, epoch, rank)
                    assert all(b["errors"] == b["short"] == 0 for b in batches)
                    np.add.at(reads, [i for b in batches for i in indices(b)], 1)
                assert reads.max() == 1 and (reads == 0).sum() == num_images % (world * 4), (world, num_workers, epoch)
                left_over.append(frozenset(np.flatnonzero(reads == 0)))
                ever += reads
            assert len(set(left_over)) > 1 or not left_over[0]
            assert ever.min() >= 1, (world, num_workers)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("name,world,num_workers", [("one", 2, 3), ("big+tiny", 3, 2), ("many", 1, 4), ("many", 2, 1)])
def test_loader_workers_deliver_what_the_slots_make(index_sets, monkeypatch, name, world, num_workers):
    """Through make_loader with real worker processes, as the trainer runs it: the slots' batches
    in round-robin order, bit for bit, and one pass over the split."""
    num_images = read_manifest(index_sets[name])["splits"]["train"]["count"]
    reads = np.zeros(num_images, int)
    for rank in range(world):
        spec = index_spec(index_sets[name], rank=rank, world_size=world, hflip=True)
        batches = list(make_loader(spec, num_workers, epoch=2))
        expected = round_robin(as_workers(monkeypatch, ShardStream(spec, 2), num_workers))
        assert len(batches) == len(expected) == batches_per_epoch(num_images, world, 4)
        assert all(
            torch.equal(a["images"], b["images"]) and torch.equal(a["attrs"], b["attrs"])
            for a, b in zip(batches, expected)
        )
        np.add.at(reads, [i for b in batches for i in indices(b)], 1)
    assert reads.max() == 1 and (reads == 0).sum() == num_images % (world * 4)


def test_skipping_continues_every_worker_layout(index_sets, monkeypatch):
    """Resuming after k batches: loader worker 0 plays logical worker k mod W, so the round-robin
    order goes on exactly, also where the workers' quotas differ (8 batches per rank)."""
    spec = index_spec(index_sets["big+tiny"], rank=1, world_size=3)
    for num_workers in (1, 2, 3, 4):
        full = round_robin(as_workers(monkeypatch, ShardStream(spec, 1), num_workers))
        for skip in (1, num_workers + 1, 7):
            resumed = round_robin(as_workers(monkeypatch, ShardStream(spec, 1, skip), num_workers))
            assert len(resumed) == len(full) - skip
            assert all(torch.equal(a["images"], b["images"]) for a, b in zip(full[skip:], resumed)), (num_workers, skip)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uneven_shards_give_every_rank_the_same_batch_count(synthetic_shards, num_workers):
    per_rank = []
    for rank in range(2):
        loader = make_loader(spec_for(synthetic_shards, rank=rank, world_size=2, batch_size=16), num_workers)
        batches = list(loader)
        assert all(b["images"].shape == (16, 3, 32, 32) and b["images"].dtype == torch.uint8 for b in batches)
        per_rank.append(len(batches))
    assert per_rank[0] == per_rank[1] == batches_per_epoch(231, 2, 16) == 7


def test_more_slots_than_shards_still_fills_every_slot(synthetic_shards):
    counts = [len(list(make_loader(spec_for(synthetic_shards, rank=r, world_size=4), num_workers=2))) for r in range(4)]
    assert counts == [batches_per_epoch(231, 4, 8)] * 4


def test_one_epoch_on_one_rank_reads_no_image_twice(synthetic_shards):
    batches = list(ShardStream(spec_for(synthetic_shards)))
    images = torch.cat([b["images"] for b in batches]).reshape(len(batches) * 8, -1).numpy()
    assert len(batches) == 231 // 8
    assert len({row.tobytes() for row in images}) == len(images)


def test_epochs_are_reproducible_and_differ(synthetic_shards):
    first = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=3)]
    again = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=3)]
    other = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("skip", [1, 4, 5, 13])
def test_skipping_resumes_the_exact_stream(synthetic_shards, skip):
    """13 skips past a shuffle pool's worth of batches in each worker."""
    full = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=1)]
    resumed = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=1, skip_batches=skip)]
    assert len(resumed) == len(full) - skip
    assert all(torch.equal(a, b) for a, b in zip(full[skip:], resumed))


def readable(shards: Path) -> set[int]:
    images, attrs, _ = read_in_order(str(shards), "train", SIZE)
    return set(indices({"images": torch.from_numpy(images).permute(0, 3, 1, 2), "attrs": torch.from_numpy(attrs)}))


def test_truncated_shard_is_reported_and_the_quota_met(index_sets, tmp_path, capfd):
    """Batches of one image, so every image is in some slot's range: all that is readable is read."""
    copy = tmp_path / "shards"
    shutil.copytree(index_sets["big+tiny"], copy)
    victim = copy / read_manifest(copy)["splits"]["train"]["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    left = readable(copy)
    assert 20 < len(left) < 100
    batches = list(make_loader(index_spec(copy, batch_size=1), num_workers=2))
    assert len(batches) == 107
    assert sum(b["short"] for b in batches) >= 107 - len(left)
    assert {i for b in batches for i in indices(b)} == left
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning" in line]
    assert warnings and all(victim.name in line and "images the manifest lists" in line for line in warnings)


@pytest.mark.parametrize("start", [0, 50])
def test_corrupt_header_loses_only_its_sample(index_sets, tmp_path, start):
    copy = tmp_path / "shards"
    shutil.copytree(index_sets["big+tiny"], copy)
    victim = copy / read_manifest(copy)["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(victim) as tar:
        members = {m.name: m for m in tar}
        lost = {
            int(key[:5])
            for key in tar.extractfile(members[f"train-00000-{start:06d}.keys.txt"]).read().decode().split()
        }
    header = members[f"train-00000-{start:06d}.attrs.npy"].offset_data - 512  # its first member; after its pax header
    data = bytearray(victim.read_bytes())
    data[header : header + 512] = b"X" * 512
    victim.write_bytes(bytes(data))
    assert readable(copy) == set(range(107)) - lost and len(lost) == 5
    batches = list(ShardStream(index_spec(copy, batch_size=1)))
    assert len(batches) == 107 and sum(b["errors"] for b in batches) >= 1 and sum(b["short"] for b in batches) >= 5
    assert {i for b in batches for i in indices(b)} == set(range(107)) - lost


@pytest.mark.parametrize("damage", ["garbage", "empty tar"])
def test_all_shards_unreadable_fails_fast(synthetic_shards, tmp_path, damage):
    """In this process: a DataLoader whose workers raise takes 5 s per worker to shut down."""
    copy = tmp_path / "shards"
    shutil.copytree(synthetic_shards, copy)
    for shard in copy.glob("train-*.tar"):
        if damage == "garbage":
            shard.write_bytes(b"not a tar file" * 10)
        else:
            tarfile.open(shard, "w").close()
    with deadline(30), pytest.raises(RuntimeError, match="no readable sample"):
        list(ShardStream(spec_for(copy)))


def test_wrong_size_and_split_are_explained(synthetic_shards, tmp_path):
    with pytest.raises(ValueError, match="holds 32px images but the model wants 64px"):
        ShardStream(spec_for(synthetic_shards, image_size=64))
    with pytest.raises(ValueError, match="no 'test' shards; splits with data: train, val"):
        ShardStream(spec_for(synthetic_shards, split="test"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardStream(spec_for(tmp_path))


def test_empty_split_and_too_large_a_batch_are_explained(index_sets, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(index_sets["big+tiny"], shards)
    manifest = read_manifest(shards)
    manifest["splits"]["val"] = {"count": 0, "shards": [{"name": "val-00000.tar", "count": 0, "sha256": ""}]}
    (shards / "manifest.json").write_text(json.dumps(manifest))  # as writers listed a shard of only corrupt images
    for reader in (
        loader_module._split_layout,
        read_in_order,
        lambda *args: ShardStream(index_spec(shards, split="val")),
    ):
        with pytest.raises(ValueError, match=f"the 'val' split of {shards} holds no images"):
            reader(str(shards), "val", SIZE)
    with pytest.raises(
        ValueError,
        match=f"data.batch_size=64 on 2 ranks needs at least 128 images per epoch; "
        f"the 'train' split of {shards} has 107",
    ):
        make_loader(index_spec(shards, batch_size=64, world_size=2), 0)
    assert len(ShardStream(index_spec(shards, batch_size=107))) == 1


def test_read_in_order_follows_the_manifest(index_sets):
    shards = index_sets["many"]
    images, attrs, errors = read_in_order(str(shards), "train", SIZE)
    order = indices({"images": torch.from_numpy(images).permute(0, 3, 1, 2), "attrs": torch.from_numpy(attrs)})
    assert sorted(order) == list(range(150)) and errors == 0
    first, _, _ = read_in_order(str(shards), "train", SIZE, limit=20)
    assert np.array_equal(first, images[:20])


def test_hflip_mirrors_some_images(synthetic_shards):
    plain = next(iter(ShardStream(spec_for(synthetic_shards))))["images"]
    flipped = next(iter(ShardStream(spec_for(synthetic_shards, hflip=True))))["images"]
    same = [torch.equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


@pytest.fixture(scope="module")
def two_splits(tmp_path_factory) -> Path:
    """130 index images: 100 train and 30 carved val, raw blocks of 4, shards of 25."""
    out = tmp_path_factory.mktemp("union") / "shards"
    return index_shards(out, 130, images_per_sample=4, shard_size=25, carve={"val": 30})


def test_a_union_of_splits_is_one_stream_over_both(two_splits, monkeypatch):
    """ "train+val": both splits' images, each once per epoch (but the remainder), on 1-3 ranks x 1-2 workers."""
    train_ids = set(indices_in_order(two_splits, "train"))
    val_ids = set(indices_in_order(two_splits, "val"))
    assert len(train_ids) == 100 and len(val_ids) == 30 and not train_ids & val_ids
    for world in (1, 2, 3):
        for num_workers in (1, 2):
            reads = np.zeros(130, int)
            for rank in range(world):
                stream = ShardStream(index_spec(two_splits, split="train+val", rank=rank, world_size=world), 1)
                assert stream.num_images == 130 and len(stream) == batches_per_epoch(130, world, 4)
                np.add.at(
                    reads,
                    [i for run in as_workers(monkeypatch, stream, num_workers) for b in run for i in indices(b)],
                    1,
                )
            assert reads.max() == 1 and (reads == 0).sum() == 130 % (world * 4), (world, num_workers)


def indices_in_order(shards: Path, split: str) -> list[int]:
    images, attrs, _ = read_in_order(str(shards), split, SIZE)
    return indices({"images": torch.from_numpy(images).permute(0, 3, 1, 2), "attrs": torch.from_numpy(attrs)})


def test_union_readers_give_the_first_split_then_the_second(two_splits):
    train, val = indices_in_order(two_splits, "train"), indices_in_order(two_splits, "val")
    assert indices_in_order(two_splits, "train+val") == train + val
    assert indices_in_order(two_splits, "val+train") == val + train
    samples = [sample["__key__"] for sample in read_samples(str(two_splits), "val+train")]
    assert samples == [s["__key__"] for split in ("val", "train") for s in read_samples(str(two_splits), split)]
    attrs = read_attributes(str(two_splits), "train+val")
    assert np.array_equal(attrs, read_in_order(str(two_splits), "train+val", SIZE)[1])
    # read_range: by manifest position, across the splits' boundary (train ends at 100)
    blocks = list(read_range(str(two_splits), "train+val", SIZE, 90, 110))
    images = np.concatenate([block[0] for block in blocks])
    assert np.array_equal(images, read_in_order(str(two_splits), "train+val", SIZE)[0][90:110])
    assert list(read_range(str(two_splits), "val", SIZE, 5, 5)) == []


def test_union_mistakes_name_the_part_and_the_splits(two_splits):
    with pytest.raises(
        ValueError, match=r"has no 'test' shards \(in the union 'train\+test'\); splits with data: train, val"
    ):
        ShardStream(index_spec(two_splits, split="train+test"))
    with pytest.raises(ValueError, match=r"has no 'a', 'b' shards \(in the union 'a\+train\+b'\)"):
        read_in_order(str(two_splits), "a+train+b", SIZE)
    with pytest.raises(ValueError, match="names train twice: a union reads each split once"):
        read_attributes(str(two_splits), "train+val+train")
    with pytest.raises(ValueError, match="has an empty part"):
        list(read_samples(str(two_splits), "train+"))


def test_read_range_and_read_attributes_refuse_a_damaged_shard(two_splits, tmp_path):
    shards = Path(shutil.copytree(two_splits, tmp_path / "shards"))
    first = read_manifest(shards)["splits"]["train"]["shards"][0]["name"]
    (shards / first).write_bytes((shards / first).read_bytes()[:3000])  # truncated: most samples lost
    with pytest.raises(ValueError, match="gendist shards verify"):
        list(read_range(str(shards), "train", SIZE, 0, 10))
    with pytest.raises(ValueError, match="attribute rows of the 25"):
        read_attributes(str(shards), "train")


def test_a_domain_of_a_union_is_the_union_of_its_parts_domains():
    """CycleGAN on data.split=train+generated reads train.Male then generated.Male (not 'generated.Male'
    glued to 'train')."""
    from gendist.config import load_config
    from gendist.data.loader import domain_split
    from gendist.families import declare
    from gendist.families.base import FamilyInputs

    assert domain_split("train", "Male") == "train.Male"
    assert domain_split("train+generated", "not_Male") == "train.not_Male+generated.not_Male"
    cfg = load_config(None, ["model.name=cyclegan", "data.split=train+generated", "cyclegan.domains=[not_Male,Male]"])
    assert declare(FamilyInputs(cfg, ["Male"])).streams == {
        "a": "train.not_Male+generated.not_Male",
        "b": "train.Male+generated.Male",
    }

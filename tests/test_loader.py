import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gendist.data.loader import ShardStream, StreamSpec, batches_per_epoch, make_loader
from gendist.data.shards import read_manifest


def spec_for(shards: Path, **kw) -> StreamSpec:
    return StreamSpec(**{"shard_dir": str(shards), "split": "train", "batch_size": 8, "image_size": 32, "shuffle_pool": 64, **kw})


def test_fixture_shards_are_uneven(synthetic_shards):
    counts = [s["count"] for s in read_manifest(synthetic_shards)["splits"]["train"]["shards"]]
    assert counts == [100, 100, 31]


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


def test_one_epoch_on_one_rank_is_a_pass_up_to_one_shuffle_pool(synthetic_shards):
    """The stream cycles, so the shuffle pool may mix the next pass in at an epoch's end; no more."""
    batches = list(ShardStream(spec_for(synthetic_shards)))
    images = torch.cat([b["images"] for b in batches]).reshape(len(batches) * 8, -1).numpy()
    assert len(batches) == 231 // 8
    assert len({row.tobytes() for row in images}) >= len(images) - 64


def test_epochs_are_reproducible_and_differ(synthetic_shards):
    first = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=3)]
    again = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=3)]
    other = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("skip", [1, 4, 5])
def test_skipping_resumes_the_exact_stream(synthetic_shards, skip):
    full = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=1)]
    resumed = [b["images"] for b in make_loader(spec_for(synthetic_shards), 2, epoch=1, skip_batches=skip)]
    assert len(resumed) == len(full) - skip
    assert all(torch.equal(a, b) for a, b in zip(full[skip:], resumed))


def test_corrupt_shard_is_counted_and_skipped(synthetic_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(synthetic_shards, copy)
    victim = copy / read_manifest(copy)["splits"]["train"]["shards"][0]["name"]
    data = victim.read_bytes()
    victim.write_bytes(data[:5000] + b"\x00garbage" * 100)
    batches = list(ShardStream(spec_for(copy)))
    assert len(batches) == 231 // 8  # the quota is still met, from the readable shards
    assert sum(b["errors"] for b in batches) >= 1


def test_all_shards_unreadable_fails_with_a_message(synthetic_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(synthetic_shards, copy)
    for shard in copy.glob("train-*.tar"):
        shard.write_bytes(b"not a tar file" * 10)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(ShardStream(spec_for(copy)))


def test_wrong_size_and_split_are_explained(synthetic_shards, tmp_path):
    with pytest.raises(ValueError, match="holds 32px images but the model wants 64px"):
        ShardStream(spec_for(synthetic_shards, image_size=64))
    with pytest.raises(ValueError, match="no 'test' shards; splits with data: train, val"):
        ShardStream(spec_for(synthetic_shards, split="test"))
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardStream(spec_for(tmp_path))


def test_hflip_mirrors_some_images(synthetic_shards):
    plain = next(iter(ShardStream(spec_for(synthetic_shards))))["images"]
    flipped = next(iter(ShardStream(spec_for(synthetic_shards, hflip=True))))["images"]
    same = [torch.equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)

"""Shared fixtures: a fake CelebA in the official layout (folder and zip), tiny shard sets, configs."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, PartialState
from PIL import Image

from gendist.data.domains import write_domains
from gendist.data.shards import Preprocess, write_shards
from gendist.data.synthetic import SyntheticFacesSource
from gendist.training.session import Session

ATTRS = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
TINY = [
    "model.image_size=32",
    "model.ngf=8",
    "model.ndf=8",
    "data.batch_size=8",
    "data.num_workers=1",
    "data.shuffle_pool=64",
    "train.log_every=2",
    "train.sample_every=1000",
    "train.checkpoint_every=1000",
    "train.num_samples=16",
]
# FID/KID with a seeded random Inception on a few dozen images: the protocol, not the number
RANDOM_EVAL = [
    "eval.inception_weights=random",
    "eval.num_samples=24",
    "eval.num_real=24",
    "eval.batch_size=8",
    "eval.kid_subsets=5",
    "eval.kid_subset_size=12",
    "eval.recon_images=16",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_fake_celeba(
    root: Path, present: int = 30, listed: int = 36, as_zip: bool = False, corrupt: tuple[int, ...] = ()
) -> dict:
    """Images 1..present exist (official names); the partition lists 1..listed; the attribute
    header claims the full dataset's 202599 rows. Files use CRLF like the official ones."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(1, listed + 1)]
    split_of = {name: (0 if i % 6 < 4 else 1 if i % 6 == 4 else 2) for i, name in enumerate(names, start=1)}
    attrs = {name: rng.choice([-1, 1], size=len(ATTRS)) for name in names[:present]}
    images = {}
    for i, name in enumerate(names[:present], start=1):
        if i in corrupt:
            images[name] = b"\xff\xd8\xff this is not a jpeg"
            continue
        pixels = rng.integers(0, 255, size=(218, 178, 3), dtype=np.uint8)
        path = root / "tmp.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        images[name] = path.read_bytes()
        path.unlink()
    if as_zip:
        with zipfile.ZipFile(root / "img_align_celeba.zip", "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("img_align_celeba/", b"")
            for name, data in images.items():
                archive.writestr(f"img_align_celeba/{name}", data)
    else:
        (root / "img_align_celeba").mkdir()
        for name, data in images.items():
            (root / "img_align_celeba" / name).write_bytes(data)
    lines = ["202599", " ".join(ATTRS)] + [f"{n} " + " ".join(f"{v:2d}" for v in attrs[n]) for n in names[:present]]
    (root / "list_attr_celeba.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    (root / "list_eval_partition.txt").write_bytes("".join(f"{n} {split_of[n]}\r\n" for n in names).encode())
    return {"attrs": attrs, "split_of": split_of, "present": names[:present]}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process training builds its own Accelerator."""
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: with two busy cores, intra-op threads cost ~30x more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """256 synthetic faces at 32 px in uneven shards (100, 100, 31 train images), with the Male and
    not_Male domains of each split (gendist shards domains) for CycleGAN."""
    out = tmp_path_factory.mktemp("synthetic") / "shards"
    write_shards(
        SyntheticFacesSource(256),
        out,
        Preprocess(32),
        images_per_sample=16,
        shard_size=100,
        workers=2,
        show_progress=False,
    )
    write_domains(out, "Male")
    return out


@pytest.fixture
def tiny_overrides(synthetic_shards, tmp_path) -> list[str]:
    return [*TINY, f"data.shards={synthetic_shards}", f"train.run_dir={tmp_path / 'run'}"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_run(reference: dict, resumed: dict) -> None:
    """Parameters bit-identical. Batch-norm running statistics stay rank-local between checkpoints
    and each checkpoint averages them across ranks: a stop's extra checkpoint averages them once
    more, which by linearity changes them only by float rounding (measured: 1e-7 relative)."""
    running = [name for name in reference if ".running_" in name]
    assert_same_weights(
        {k: v for k, v in reference.items() if k not in running}, {k: v for k, v in resumed.items() if k not in running}
    )
    for name in running:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-9)


def assert_ranks_agree(out: Path, families: list[str], proc: subprocess.CompletedProcess, samples_at: int) -> None:
    """family_worker.py's results: each family saved by both ranks, with identical weights, and its
    sample grid written at step `samples_at`."""
    for family in families:
        paths = [out / f"{family}-rank{r}.pt" for r in range(2)]
        assert all(p.exists() for p in paths), f"{family}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
        ranks = [torch.load(p, weights_only=True) for p in paths]
        assert [r["world_size"] for r in ranks] == [2, 2]
        for part in ranks[0].keys() - {"world_size"}:
            assert_same_weights(ranks[0][part], ranks[1][part])
        assert (out / family / "samples" / f"step_{samples_at:07d}.png").exists()


def launch(
    kind: str, out: Path, overrides: list[str], script: list[str], timeout: float = 600
) -> subprocess.CompletedProcess:
    """Start 2 real processes on CPU: accelerate (DDP), deepspeed (accelerate with the ZeRO-2 config)
    or torchrun; the log goes to out/<kind>.log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    port = str(free_port())
    if kind in ("accelerate", "deepspeed"):
        config = "cpu_2proc.yaml" if kind == "accelerate" else "ds_zero2.yaml"
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / "launch" / config),
            "--num_processes",
            "2",
            "--main_process_port",
            port,
            *script,
        ]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, *script]
    proc = subprocess.run([*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    (out / f"{kind}.log").write_text(proc.stdout + proc.stderr)
    return proc


@contextlib.contextmanager
def stop_requested_at(step: int):
    """Inside: a training run gets a stop request (as SIGTERM gives) during step `step`, so it
    checkpoints there and ends, with train.steps (and a schedule derived from it) unchanged."""
    step_done = Session.step_done

    def requesting(session, values):
        if session.state.step == step - 1:
            session.stop_requests.received.append("SIGTERM")
        step_done(session, values)

    Session.step_done = requesting
    try:
        yield
    finally:
        Session.step_done = step_done

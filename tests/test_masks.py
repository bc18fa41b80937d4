"""Seeded inpainting masks (gendist.data.masks): kinds, area bounds, keyed reproducibility, the helpers."""

import hashlib
import math

import numpy as np
import pytest
import torch

from gendist.data import masks as M

RANDOM_KINDS = {"rectangles": M.RECTANGLES_AREA, "strokes": M.STROKES_AREA}


def _fractions(mask: torch.Tensor) -> np.ndarray:
    return mask.flatten(1).mean(dim=1).numpy()


@pytest.mark.parametrize("kind", M.KINDS)
@pytest.mark.parametrize("size", [4, 17, 64])
def test_shape_dtype_and_binary_values(kind, size):
    mask = M.masks(kind, 5, size, seed=3)
    assert mask.shape == (5, 1, size, size) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.flatten(1).sum(dim=1) > 0).all()


@pytest.mark.parametrize("size", [4, 8, 32, 64, 128])
def test_centre_is_the_centred_quarter(size):
    mask = M.masks("centre", 2, size, seed=0)
    assert mask.sum(dim=(1, 2, 3)).tolist() == [size * size / 4] * 2
    rows = mask[0, 0].any(dim=1).nonzero().flatten()
    assert rows.tolist() == list(range(size // 4, size // 4 + size // 2))
    assert (
        torch.equal(mask, mask.flip(2)) and torch.equal(mask, mask.flip(3)) and torch.equal(mask, mask.transpose(2, 3))
    )


@pytest.mark.parametrize("kind", list(RANDOM_KINDS))
@pytest.mark.parametrize(("size", "count"), [(64, 400), (32, 800), (13, 300)])
def test_random_kinds_stay_within_their_area_bounds(kind, size, count):
    low, high = RANDOM_KINDS[kind]
    area = _fractions(M.masks(kind, count, size, seed=size))
    assert (area >= low - 1e-9).all() and (area <= high + 1e-9).all()
    assert area.std() > 0.03  # not one fixed shape


@pytest.mark.parametrize("size", [13, 60, 64])
def test_rectangles_are_one_to_three_with_sides_of_ten_to_fifty_percent(size):
    states = M._key_states(0, M.eval_keys(range(500)))
    y0, x0, height, width, drawn = M._rectangle_params(states, size, stream=1)
    assert set(drawn.sum(axis=1).tolist()) == {1, 2, 3} and drawn[:, 0].all()
    assert height.min() == width.min() == math.ceil(size / 10) and height.max() == width.max() == size // 2
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + height <= size).all() and (x0 + width <= size).all()
    raster = M._draw_rectangles(states, size, stream=1)
    for i in range(0, 500, 50):
        expected = np.zeros((size, size), dtype=bool)
        for k in np.nonzero(drawn[i])[0]:
            expected[y0[i, k] : y0[i, k] + height[i, k], x0[i, k] : x0[i, k] + width[i, k]] = True
        assert np.array_equal(raster[i], expected)


def test_strokes_are_not_boxes():
    boxy = 0
    for mask in M.masks("strokes", 50, 64, seed=2)[:, 0]:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        boxy += int(mask.sum() == box)
    assert boxy == 0


@pytest.mark.parametrize("size", [16, 64])
def test_strokes_geometry_and_raster(size):
    states = M._key_states(4, M.eval_keys(range(200)))
    row, ax, ay, bx, by, radius = M._stroke_segments(states, size, stream=1)
    per_mask = np.bincount(row, minlength=200)
    assert per_mask.min() >= 4 and per_mask.max() <= 33 and per_mask.max() > 22  # 1-3 strokes of 4-11
    assert radius.min() >= size * 6 / 256 and radius.max() <= size * 20 / 256
    assert min(ax.min(), ay.min(), bx.min(), by.min()) >= 0 and max(ax.max(), ay.max(), bx.max(), by.max()) <= size
    length = np.hypot(bx - ax, by - ay)
    assert length.max() <= 2 * size * math.sqrt(2) / 8 + 1e-9
    # The tiled raster against a brute-force capsule distance over the whole grid, in float64.
    raster = M._draw_strokes(states, size, stream=1)
    centres = np.arange(size) + 0.5
    px, py = centres[None, None, :], centres[None, :, None]
    for i in range(0, 200, 40):
        near = np.full((size, size), np.inf)
        for k in np.nonzero(row == i)[0]:
            sx, sy = bx[k] - ax[k], by[k] - ay[k]
            t = np.clip(((px - ax[k]) * sx + (py - ay[k]) * sy) / max(sx * sx + sy * sy, 1e-300), 0, 1)
            distance = np.hypot(px - ax[k] - t * sx, py - ay[k] - t * sy)[0] - radius[k]
            near = np.minimum(near, distance)
        assert raster[i][near < -1e-4].all() and not raster[i][near > 1e-4].any()


@pytest.mark.parametrize("size", range(4, 70, 3))
def test_the_fallback_meets_both_bounds(size):
    area = M._fallback(M._key_states(0, M.eval_keys(range(50))), size).reshape(50, -1).mean(axis=1)
    assert (area >= M.RECTANGLES_AREA[0]).all() and (area <= 0.25).all()
    assert (area >= M.STROKES_AREA[0]).all()


@pytest.mark.parametrize("kind", M.KINDS)
def test_same_seed_and_key_give_the_same_mask_and_different_keys_differ(kind):
    keys = [(7, 0, i) for i in range(40)]
    a, b = M.mask_batch(kind, 32, 11, keys), M.mask_batch(kind, 32, 11, keys)
    assert torch.equal(a, b)
    if kind == "centre":
        return
    distinct = {hashlib.sha256(m.numpy().tobytes()).hexdigest() for m in a}
    assert len(distinct) >= (40 if kind != "mixed" else 25)  # mixed repeats the centre square
    other_seed = M.mask_batch(kind, 32, 12, keys)
    assert sum(not torch.equal(x, y) for x, y in zip(a, other_seed)) >= 25


def test_keys_of_different_lengths_or_orders_do_not_collide():
    keys = [(1,), (1, 0), (1, 0, 0), (0, 1), (0, 0, 1), (2, 1, 0), (0, 1, 2)]
    drawn = M.mask_batch("strokes", 32, 5, keys)
    assert len({hashlib.sha256(m.numpy().tobytes()).hexdigest() for m in drawn}) == len(keys)


@pytest.mark.parametrize("kind", M.KINDS)
def test_a_keyed_mask_does_not_depend_on_its_batch(kind):
    rng = np.random.default_rng(0)
    keys = [(int(rng.integers(0, 10**6)),) for _ in range(64)]
    batch = M.mask_batch(kind, 48, 9, keys)
    for i in (0, 17, 63):
        assert torch.equal(M.mask_for(kind, 48, 9, keys[i]), batch[i])
    order = rng.permutation(64)
    shuffled = M.mask_batch(kind, 48, 9, [keys[i] for i in order])
    assert torch.equal(shuffled, batch[torch.from_numpy(order)])
    halves = torch.cat([M.mask_batch(kind, 48, 9, keys[:20]), M.mask_batch(kind, 48, 9, keys[20:])])
    assert torch.equal(halves, batch)


def test_masks_shortcut_and_generator_seeds():
    assert torch.equal(M.masks("rectangles", 6, 32, 4), M.mask_batch("rectangles", 32, 4, M.eval_keys(range(6))))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first = M.masks("strokes", 4, 32, g1)
    assert torch.equal(first, M.masks("strokes", 4, 32, g2))
    assert not torch.equal(first, M.masks("strokes", 4, 32, g1))  # the generator advanced


def test_global_rngs_are_untouched():
    torch.manual_seed(0)
    np.random.seed(0)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(0)
    np.random.seed(0)
    M.masks("mixed", 16, 32, 0)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_mixed_draws_each_kind_with_that_kinds_mask():
    keys = M.eval_keys(range(300))
    mixed = M.mask_batch("mixed", 32, 3, keys)
    per_kind = {kind: M.mask_batch(kind, 32, 3, keys) for kind in ("centre", "rectangles", "strokes")}
    counts = dict.fromkeys(per_kind, 0)
    for i, mask in enumerate(mixed):
        matches = [kind for kind, drawn in per_kind.items() if torch.equal(mask, drawn[i])]
        assert matches
        counts[matches[0]] += 1
    assert all(60 < n < 140 for n in counts.values()), counts


def test_train_and_eval_key_conventions():
    assert M.train_keys(5, 2, 3) == [(5, 6), (5, 7), (5, 8)]  # sample i of rank r: global sample r * 3 + i
    assert M.train_keys(5, 0, 4) == M.train_keys(5, 0, 2) + M.train_keys(5, 1, 2)  # 1 x 2B == 2 x B
    assert M.mask_batch("mixed", 16, 7, M.train_keys(3, 0, 6)).equal(
        torch.cat([M.mask_batch("mixed", 16, 7, M.train_keys(3, r, 2)) for r in range(3)])
    )
    assert M.eval_keys(np.array([4, 9])) == [(4,), (9,)]
    rank0 = M.mask_batch("strokes", 32, 0, M.train_keys(5, 0, 8))
    rank1 = M.mask_batch("strokes", 32, 0, M.train_keys(5, 1, 8))
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1))
    resumed = M.mask_batch("strokes", 32, 0, M.train_keys(5, 1, 8))
    assert torch.equal(rank1, resumed)


def test_masks_are_pinned():
    """The drawing is part of recorded runs: a change here means bumping masks.VERSION."""
    assert M.VERSION == 1
    expected = {
        "centre": [1024] * 8,
        "rectangles": [476, 686, 1133, 780, 780, 1161, 420, 783],
        "strokes": [568, 428, 916, 293, 542, 817, 458, 760],
        "mixed": [1024, 428, 916, 780, 542, 1024, 458, 1024],
    }
    digests = {
        "centre": "7ae047a4bc1ac38b",
        "rectangles": "c9c7196c8271a44f",
        "strokes": "e319f106d0812db0",
        "mixed": "8d4a4ec56cf3acb5",
    }
    for kind in M.KINDS:
        drawn = M.mask_batch(kind, 64, 0, M.eval_keys(range(8)))
        assert drawn.sum(dim=(1, 2, 3)).int().tolist() == expected[kind], kind
        assert hashlib.sha256(drawn.numpy().tobytes()).hexdigest()[:16] == digests[kind], kind


def test_sin_and_cos_polynomial_is_accurate():
    theta = np.linspace(4 * math.pi / 15, 8 * math.pi / 15, 2001)
    cos, sin = M._cos_sin_near_half_pi(theta)
    assert np.abs(cos - np.cos(theta)).max() < 1e-11 and np.abs(sin - np.sin(theta)).max() < 1e-11


def test_bad_arguments():
    with pytest.raises(ValueError, match="centre, rectangles, strokes, mixed"):
        M.masks("circles", 2, 32, 0)
    with pytest.raises(ValueError, match="at least"):
        M.masks("centre", 2, 2, 0)
    with pytest.raises(ValueError, match="seed"):
        M.mask_for("strokes", 32, -1, (0,))
    with pytest.raises(ValueError, match="key"):
        M.mask_for("strokes", 32, 0, (2**64,))
    with pytest.raises(TypeError, match="tuple"):
        M.mask_batch("strokes", 32, 0, [3])
    assert M.mask_batch("rectangles", 16, 0, []).shape == (0, 1, 16, 16)


def test_masked_input_zeros_the_hole_and_carries_the_mask():
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    mask = M.masks("strokes", 4, 32, 1)
    x = M.masked_input(images, mask)
    assert x.shape == (4, 4, 32, 32) and x.dtype == images.dtype
    assert torch.equal(x[:, 3:], mask)
    hole = mask.bool().expand(-1, 3, -1, -1)
    assert (x[:, :3][hole] == 0).all() and torch.equal(x[:, :3][~hole], images[~hole])
    assert torch.equal(M.masked_input(images, mask.bool()), x)
    with pytest.raises(ValueError, match="mask"):
        M.masked_input(images, mask[:, 0])


def test_composite_keeps_known_pixels_exactly():
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    output = torch.rand(4, 3, 32, 32) * 2 - 1
    mask = M.masks("mixed", 4, 32, 2)
    out = M.composite(output, images, mask)
    hole = mask.bool().expand(-1, 3, -1, -1)
    assert torch.equal(out[~hole], images[~hole]) and torch.equal(out[hole], output[hole])
    output.requires_grad_(True)
    M.composite(output, images, mask).sum().backward()
    assert torch.equal(output.grad, mask.expand(-1, 3, -1, -1))

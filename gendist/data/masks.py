"""Seeded hole masks for face inpainting (Pix2Pix used as an inpainting model), plain torch and numpy.

Conventions (as ``gendist.models.pix2pix``). A mask is float32 (B, 1, S, S): 1.0 in the hole, 0.0 on
known pixels; images are (B, 3, S, S) in [-1, 1]. ``masked_input`` is the generator's input (the image
with the hole set to 0, then the mask: 4 channels) and ``composite`` keeps the known pixels of the image.

Kinds (``KINDS``), sizes S >= 4:

- ``centre``: the centred square of side S // 2 (exactly a quarter of the area for even S); no randomness.
- ``rectangles``: 1 to 3 axis-aligned rectangles, each side ceil(S/10) to S // 2 pixels, uniformly placed
  inside the image; the hole (their union) covers RECTANGLES_AREA = 10% to 50% of the image.
- ``strokes``: DeepFill v2's free-form brush strokes (Yu et al. 2019, ``brush_stroke_mask`` in its code),
  scaled from 256 px to S: 1 to 3 strokes, each a zigzag of 4 to 11 thick segments (the vertex angles
  alternate around 2pi/5 and -2pi/5 with a per-stroke spread of up to 2pi/15; lengths from 0 to
  2 * S*sqrt(2)/8, triangular with mean S*sqrt(2)/8, where DeepFill draws a clipped normal; width
  12/256 to 40/256 of S) with round joints and caps, each stroke flipped and transposed at random
  (DeepFill flips the whole mask), vertices clipped to the image. The hole covers STROKES_AREA = 5% to
  50% of the image.
- ``mixed``: per mask one of the three, uniformly (picked by the key's stream 0); the mask is then exactly
  the one that kind draws for the same seed and key.

The area bounds are enforced by redrawing: a draw outside them is replaced by the next of TRIES draws
from the same key (about a quarter of the rectangle draws and a tenth of the stroke draws are
redrawn at 64 px), and a key whose TRIES draws all fail (about 2e-5 of keys for rectangles, ~1e-8 for
strokes) gets one rectangle with sides between ceil(S*sqrt(0.1)) and S // 2, which meets both bounds.

Keys. Every mask is a pure function of (kind, size, seed, key), where the key is a tuple of
non-negative ints (< 2**64): ``mask_batch(kind, size, seed, keys)`` draws one mask per key, and the mask
of a key never depends on the other keys of the batch, the batch size or the machine (the drawing uses
only integer hashing and IEEE +, -, *, / on floats, with sin and cos as fixed polynomials, so the bits
are the same whatever the SIMD path or libm). Keys of different lengths never collide (the length is
hashed). The conventions:

- training: ``train_keys(step, rank, count)`` = [(step, rank * count + i) for i < count]: sample i of
  rank r is global sample r * count + i, the place it holds in the global batch of the step split in
  rank order, so 1 rank x 2B and 2 ranks x B draw the same masks for the same samples, ranks draw
  different masks, and a resumed run draws the masks the interrupted one drew;
- evaluation: ``eval_keys(indices)`` = [(index,) ...] for held-out image indices, so each image gets the
  same mask whatever the batch split or the number of ranks. Use a different seed for the two.

``masks(kind, count, size, seed)`` is the unkeyed shortcut: keys (0,), (1,), ... (count-1,); a
torch.Generator as seed gives a seed drawn from it (advancing it), then the same.

Randomness: a SplitMix64-style hash of (seed, len(key), *key) gives the key's 64-bit state; the j-th
uniform of draw number ``stream`` is the hash of (state, stream, j), so draws are counter-based and
vectorised over the batch in numpy uint64. No global RNG (Python, numpy or torch) is touched.
Changing any of the drawing changes the masks: bump VERSION then, as masks of recorded runs change.

All drawing is numpy (single-threaded, so it does not contend with torch's intra-op threads in the
training process); only the result becomes a tensor. Speed for 128 masks of 64 px on one CPU core:
centre ~0.3 ms, rectangles ~1.5 ms, strokes ~13 ms, mixed ~6 ms.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

import numpy as np
import torch

VERSION = 1  # bump when the drawing changes: keyed masks of recorded runs change with it
KINDS = ("centre", "rectangles", "strokes", "mixed")
RECTANGLES_AREA = (0.10, 0.50)  # bounds on the hole's fraction of the image, inclusive
STROKES_AREA = (0.05, 0.50)
TRIES = 8  # draws per key before the fallback rectangle
MIN_SIZE = 4

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TAG = 0x6D61736B73  # "masks": keeps these streams apart from other users of the same seed

# Strokes, DeepFill v2's parameters at 256 px.
_MAX_STROKES = 3
_MIN_SEGMENTS, _MAX_SEGMENTS = 4, 11
_MEAN_ANGLE, _ANGLE_SPREAD = 2 * math.pi / 5, 2 * math.pi / 15
_MIN_WIDTH, _MAX_WIDTH = 12 / 256, 40 / 256  # of the image side
_MEAN_LENGTH = math.sqrt(2) / 8  # of the image side: DeepFill's average radius, sqrt(H^2 + W^2) / 8
_STROKE_PARAMS = 9  # uniforms per stroke before the per-segment ones (3 per segment)
_CHUNK = 256  # segments rasterised together
_FAR = 1e6  # pixel offset standing for "off the image"


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (a bijection; arrays wrap silently on overflow)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _absorb(state: np.ndarray, word: np.ndarray) -> np.ndarray:
    return _mix64(state ^ _mix64(word + _GOLDEN))


def _word(value: object, what: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None
    if not 0 <= value <= _MASK64:
        raise ValueError(f"{what} must be in [0, 2**64), got {value}")
    return value


def _key_states(seed: int, keys: Sequence[tuple[int, ...]]) -> np.ndarray:
    """The 64-bit state of each key: hash(TAG, seed, len(key), *key); keys grouped by length."""
    seed = _word(seed, "seed")
    words = []
    for key in keys:
        if not isinstance(key, tuple):
            raise TypeError(f"a key is a tuple of ints, got {type(key).__name__}")
        words.append([_word(k, "a key's entry") for k in key])
    states = np.empty(len(words), dtype=np.uint64)
    by_length: dict[int, list[int]] = {}
    for i, key in enumerate(words):
        by_length.setdefault(len(key), []).append(i)
    for length, rows in by_length.items():
        table = np.array([words[i] for i in rows], dtype=np.uint64).reshape(len(rows), length)
        state = _mix64(np.full(len(rows), _TAG, dtype=np.uint64) + _GOLDEN)
        state = _absorb(state, np.full(len(rows), seed, dtype=np.uint64))
        state = _absorb(state, np.full(len(rows), length, dtype=np.uint64))
        for column in range(length):
            state = _absorb(state, table[:, column])
        states[rows] = state
    return states


def _uniforms(states: np.ndarray, stream: int, count: int) -> np.ndarray:
    """(len(states), count) float64 in [0, 1): the first `count` uniforms of draw `stream` of each key."""
    base = _absorb(states, np.full(len(states), stream, dtype=np.uint64))
    counters = base[:, None] + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64)[None, :]
    return (_mix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _integers(u: np.ndarray, low: int, high: int) -> np.ndarray:
    """Uniform ints in [low, high] from uniforms in [0, 1)."""
    return low + np.minimum(np.floor(u * (high - low + 1)).astype(np.int64), high - low)


def _rectangles(y0, x0, height, width, active, size: int) -> np.ndarray:
    """(n, r) int arrays of rectangles (those with `active` False left out) -> (n, S, S) bool union."""
    span = np.arange(size)
    rows = (span >= y0[..., None]) & (span < (y0 + height)[..., None]) & active[..., None]
    cols = (span >= x0[..., None]) & (span < (x0 + width)[..., None])
    out = rows[:, 0, :, None] & cols[:, 0, None, :]
    for k in range(1, rows.shape[1]):
        out |= rows[:, k, :, None] & cols[:, k, None, :]
    return out


def _placed(u: np.ndarray, low: int, high: int, size: int) -> tuple[np.ndarray, ...]:
    """Rectangles from (..., 4) uniforms: sides in [low, high], placed uniformly inside the image."""
    height, width = _integers(u[..., 0], low, high), _integers(u[..., 1], low, high)
    return _integers(u[..., 2], 0, size - height), _integers(u[..., 3], 0, size - width), height, width


def _rectangle_params(states: np.ndarray, size: int, stream: int) -> tuple[np.ndarray, ...]:
    """(y0, x0, height, width, drawn), each (n, 3): 1 to 3 rectangles per key, sides ceil(S/10) to S // 2."""
    u = _uniforms(states, stream, 1 + 3 * 4)
    count = _integers(u[:, 0], 1, 3)
    y0, x0, height, width = _placed(u[:, 1:].reshape(len(states), 3, 4), -(-size // 10), size // 2, size)
    return y0, x0, height, width, np.arange(3)[None, :] < count[:, None]


def _draw_rectangles(states: np.ndarray, size: int, stream: int) -> np.ndarray:
    return _rectangles(*_rectangle_params(states, size, stream), size)


def _fallback(states: np.ndarray, size: int) -> np.ndarray:
    """One rectangle with both sides in [ceil(S*sqrt(0.1)), S // 2]: 10% to 25% of the image."""
    u = _uniforms(states, TRIES + 1, 4)[:, None, :]
    y0, x0, height, width = _placed(u, math.isqrt(-(-size * size // 10) - 1) + 1, size // 2, size)
    return _rectangles(y0, x0, height, width, np.ones((len(states), 1), dtype=bool), size)


def _cos_sin_near_half_pi(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for |theta - pi/2| <= 1 by Taylor series (error < 1e-11): basic arithmetic only, so
    bit-identical on every machine and for any array layout, unlike libm's or numpy's SIMD sin and cos."""
    d = theta - math.pi / 2
    d2 = d * d
    sin_d, cos_d = np.ones_like(d), np.ones_like(d)
    for n in range(15, 1, -2):  # sin d = d (1 - d2/(2*3) (1 - d2/(4*5) (...)))
        sin_d = 1 - d2 / (n * (n - 1)) * sin_d
    for n in range(16, 0, -2):  # cos d = 1 - d2/(1*2) (1 - d2/(3*4) (...))
        cos_d = 1 - d2 / (n * (n - 1)) * cos_d
    return -(d * sin_d), cos_d  # cos(pi/2 + d) = -sin d, sin(pi/2 + d) = cos d


def _stroke_segments(states: np.ndarray, size: int, stream: int) -> tuple[np.ndarray, ...]:
    """The drawn segments of each key's strokes: (mask row, ax, ay, bx, by, radius), one entry per segment."""
    n, segments = len(states), _MAX_SEGMENTS
    u = _uniforms(states, stream, 1 + _MAX_STROKES * (_STROKE_PARAMS + 3 * segments))
    strokes = _integers(u[:, 0], 1, _MAX_STROKES)
    u = u[:, 1:].reshape(n, _MAX_STROKES, _STROKE_PARAMS + 3 * segments)
    count = _integers(u[..., 0], _MIN_SEGMENTS, _MAX_SEGMENTS)
    angle_min = _MEAN_ANGLE - _ANGLE_SPREAD * u[..., 1]
    angle_max = _MEAN_ANGLE + _ANGLE_SPREAD * u[..., 2]
    x, y = u[..., 3] * size, u[..., 4] * size
    radius = size * (_MIN_WIDTH + (_MAX_WIDTH - _MIN_WIDTH) * u[..., 5]) / 2
    flip_x, flip_y, transpose = (u[..., i, None] < 0.5 for i in (6, 7, 8))
    per_segment = u[..., _STROKE_PARAMS:]
    theta = angle_min[..., None] + (angle_max - angle_min)[..., None] * per_segment[..., :segments]
    dx, dy = _cos_sin_near_half_pi(theta)
    dy = np.where(np.arange(segments) % 2 == 0, -dy, dy)  # even segments at 2pi - theta, as DeepFill
    dx, dy = np.where(transpose, dy, dx), np.where(transpose, dx, dy)
    dx, dy = np.where(flip_x, -dx, dx), np.where(flip_y, -dy, dy)
    length = _MEAN_LENGTH * size * (per_segment[..., segments : 2 * segments] + per_segment[..., 2 * segments :])
    xs, ys = [x], [y]
    for j in range(segments):
        xs.append(np.clip(xs[-1] + length[..., j] * dx[..., j], 0, size))
        ys.append(np.clip(ys[-1] + length[..., j] * dy[..., j], 0, size))
    xs, ys = np.stack(xs, axis=-1), np.stack(ys, axis=-1)  # (n, strokes, segments + 1)
    drawn = np.arange(_MAX_STROKES)[None, :, None] < strokes[:, None, None]
    drawn = drawn & (np.arange(segments)[None, None, :] < count[..., None])
    row, stroke, j = np.nonzero(drawn)
    return (
        row,
        xs[row, stroke, j],
        ys[row, stroke, j],
        xs[row, stroke, j + 1],
        ys[row, stroke, j + 1],
        radius[row, stroke],
    )


def _draw_strokes(states: np.ndarray, size: int, stream: int) -> np.ndarray:
    """Each segment is a capsule (the thick line with round ends: DeepFill's line plus vertex discs),
    rasterised on a tile around it (pixel centres at i + 0.5). Segments are sorted by extent and done
    in chunks, each with a tile just big enough for its largest segment; a pixel's value depends only
    on its coordinates and its segment, so neither the chunking nor the batch changes any mask."""
    row, ax, ay, bx, by, r = _stroke_segments(states, size, stream)
    out = np.zeros(len(states) * size * size, dtype=bool)
    if not row.size:
        return out.reshape(len(states), size, size)
    sx, sy = bx - ax, by - ay
    squared = sx * sx + sy * sy
    inverse = np.divide(1.0, squared, out=np.zeros_like(squared), where=squared > 0)
    ox = np.ceil(np.minimum(ax, bx) - r - 0.5).astype(np.int64)  # first pixel whose centre may be inside
    oy = np.ceil(np.minimum(ay, by) - r - 0.5).astype(np.int64)
    width = np.floor(np.maximum(ax, bx) + r - 0.5).astype(np.int64) - ox + 1
    height = np.floor(np.maximum(ay, by) + r - 0.5).astype(np.int64) - oy + 1
    order = np.argsort(np.maximum(width, height), kind="stable")
    for chunk in np.array_split(order, -(-len(order) // _CHUNK)):
        tile_w, tile_h = int(width[chunk].max()), int(height[chunk].max())
        cols, rows = ox[chunk, None] + np.arange(tile_w), oy[chunk, None] + np.arange(tile_h)
        # Pixel centre minus a; pixels off the image get a far coordinate, which is never inside.
        px = np.where((cols >= 0) & (cols < size), (cols + 0.5) - ax[chunk, None], _FAR).astype(np.float32)
        py = np.where((rows >= 0) & (rows < size), (rows + 0.5) - ay[chunk, None], _FAR).astype(np.float32)
        csx, csy, cinv = (a[chunk].astype(np.float32)[:, None] for a in (sx, sy, inverse))
        t = (px * (csx * cinv))[:, None, :] + (py * (csy * cinv))[:, :, None]  # along the segment, 0 at a
        np.clip(t, 0, 1, out=t)
        ex = px[:, None, :] - t * csx[:, :, None]
        t *= csy[:, :, None]
        np.subtract(py[:, :, None], t, out=t)  # t is now ey
        ex *= ex
        t *= t
        ex += t
        segment, i, k = np.nonzero(ex <= (r[chunk] * r[chunk]).astype(np.float32)[:, None, None])
        chunk_rows = row[chunk][segment]
        out[(chunk_rows * size + rows[segment, i]) * size + cols[segment, k]] = True
    return out.reshape(len(states), size, size)


def _bounded(draw, states: np.ndarray, size: int, area: tuple[float, float]) -> np.ndarray:
    """Draw after draw (streams 1..TRIES) until each key's hole area lies within `area`, then the fallback."""
    low, high = math.ceil(area[0] * size * size - 1e-9), math.floor(area[1] * size * size + 1e-9)
    out = np.empty((len(states), size, size), dtype=bool)
    todo = np.arange(len(states))
    for stream in range(1, TRIES + 1):
        if not todo.size:
            return out
        drawn = draw(states[todo], size, stream)
        pixels = np.count_nonzero(drawn.reshape(len(todo), -1), axis=1)
        ok = (pixels >= low) & (pixels <= high)
        out[todo[ok]] = drawn[ok]
        todo = todo[~ok]
    if todo.size:
        out[todo] = _fallback(states[todo], size)
    return out


def _centre(count: int, size: int) -> np.ndarray:
    side = size // 2
    start = (size - side) // 2
    out = np.zeros((count, size, size), dtype=bool)
    out[:, start : start + side, start : start + side] = True
    return out


def _draw(kind: str, states: np.ndarray, size: int) -> np.ndarray:
    if kind == "centre":
        return _centre(len(states), size)
    if kind == "rectangles":
        return _bounded(_draw_rectangles, states, size, RECTANGLES_AREA)
    if kind == "strokes":
        return _bounded(_draw_strokes, states, size, STROKES_AREA)
    choice = _integers(_uniforms(states, 0, 1)[:, 0], 0, 2)  # mixed: stream 0 picks the kind
    out = np.empty((len(states), size, size), dtype=bool)
    for index, name in enumerate(KINDS[:3]):
        rows = np.nonzero(choice == index)[0]
        if rows.size:
            out[rows] = _draw(name, states[rows], size)
    return out


def _check(kind: str, size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if operator.index(size) < MIN_SIZE:
        raise ValueError(f"mask size must be at least {MIN_SIZE}, got {size}")


def mask_batch(kind: str, size: int, seed: int, keys: Sequence[tuple[int, ...]]) -> torch.Tensor:
    """(len(keys), 1, size, size) float32 masks, mask i a function of (kind, size, seed, keys[i]) only."""
    _check(kind, size)
    keys = list(keys)
    drawn = _draw(kind, _key_states(seed, keys), size)
    return torch.from_numpy(drawn[:, None].astype(np.float32))


def mask_for(kind: str, size: int, seed: int, key: tuple[int, ...]) -> torch.Tensor:
    """The (1, size, size) mask of one key: ``mask_batch(kind, size, seed, [key])[0]``."""
    return mask_batch(kind, size, seed, [key])[0]


def masks(kind: str, count: int, size: int, seed: int | torch.Generator) -> torch.Tensor:
    """(count, 1, size, size) masks for keys (0,) .. (count-1,); a Generator seed is drawn from it first."""
    if isinstance(seed, torch.Generator):
        seed = int(torch.randint(0, 2**63 - 1, (), generator=seed))
    return mask_batch(kind, size, seed, eval_keys(range(operator.index(count))))


def train_keys(step: int, rank: int, count: int) -> list[tuple[int, int]]:
    """Keys of rank `rank`'s training batch of `count` samples (the same count on every rank): (step,
    rank * count + i) for i < count. Sample i of rank r is global sample r * count + i, as a global
    batch of N x count samples split in rank order places it, so the masks of a step do not depend on
    how its global batch is split (1 rank x 2B draws those of 2 ranks x B); reproducible on resume."""
    step, rank, count = (operator.index(v) for v in (step, rank, count))
    return [(step, rank * count + i) for i in range(count)]


def eval_keys(indices: Iterable[int]) -> list[tuple[int]]:
    """Keys of held-out images: (index,) - one fixed mask per image whatever the batching or world size."""
    return [(operator.index(index),) for index in indices]


def masked_input(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] and a (B, 1, H, W) mask -> (B, 4, H, W): hole set to 0, then the mask."""
    _check_pair(images, mask)
    mask = mask.to(images.dtype)
    return torch.cat([images * (1 - mask), mask], dim=1)


def composite(output: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """output * mask + images * (1 - mask): the output in the hole, elsewhere the images' known pixels (exactly,
    for a binary mask and a finite output); gradients reach the output through the hole only."""
    _check_pair(images, mask)
    mask = mask.to(output.dtype)
    return output * mask + images * (1 - mask)


def _check_pair(images: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != images.shape[0] or mask.shape[2:] != images.shape[2:]:
        raise ValueError(f"mask must be (B, 1, H, W) for images {tuple(images.shape)}, got {tuple(mask.shape)}")

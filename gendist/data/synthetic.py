"""The embedded default dataset: procedurally drawn faces with attributes, licence-free.

Faces are drawn at CelebA's aligned size (178x218) with the face where CelebA has it, so the same
preprocessing (centre crop by fraction, resize) and the same shard writer apply. Each image is a
pure function of (seed, index): the set is rebuilt identically anywhere, never downloaded.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gendist.data.sources import ImageSource, SplitPlan

VERSION = 2  # bump when the drawing changes: cached shard sets are keyed by it
WIDTH, HEIGHT = 178, 218
# Attribute names follow CelebA's spelling so conditional configs work on both datasets.
ATTRIBUTES = [
    "Male",
    "Smiling",
    "Eyeglasses",
    "Blond_Hair",
    "Black_Hair",
    "Brown_Hair",
    "Gray_Hair",
    "Bangs",
    "Mouth_Slightly_Open",
    "Pale_Skin",
    "No_Beard",
]
HAIR = {
    "Blond_Hair": (222, 190, 110),
    "Black_Hair": (30, 24, 22),
    "Brown_Hair": (105, 66, 40),
    "Gray_Hair": (165, 165, 168),
}
SKIN = [(241, 206, 180), (224, 172, 138), (198, 134, 100), (141, 85, 56), (96, 60, 42)]


def _sample_attributes(rng: random.Random) -> dict[str, bool]:
    attrs = {name: False for name in ATTRIBUTES}
    attrs["Male"] = rng.random() < 0.45
    attrs["Smiling"] = rng.random() < 0.5
    attrs["Eyeglasses"] = rng.random() < 0.15
    attrs[rng.choice(list(HAIR))] = True
    attrs["Bangs"] = rng.random() < 0.2
    attrs["Mouth_Slightly_Open"] = rng.random() < 0.4
    attrs["Pale_Skin"] = rng.random() < 0.1
    attrs["No_Beard"] = not (attrs["Male"] and rng.random() < 0.35)
    return attrs


def face_attributes(seed: int, index: int) -> np.ndarray:
    """The attribute vector (+1/-1 in ATTRIBUTES order) of face `index`, without drawing it."""
    attrs = _sample_attributes(random.Random(seed * 1_000_003 + index))
    return np.array([1 if attrs[name] else -1 for name in ATTRIBUTES], dtype=np.int8)


def draw_face(seed: int, index: int) -> Image.Image:
    """Face `index`; its attributes are the ones face_attributes(seed, index) returns."""
    rng = random.Random(seed * 1_000_003 + index)
    attrs = _sample_attributes(rng)
    hair = next(name for name in HAIR if attrs[name])

    def jitter(color: tuple[int, ...], amount: int = 18) -> tuple[int, ...]:
        return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)

    background = tuple(rng.randint(70, 200) for _ in range(3))
    image = Image.new("RGB", (WIDTH, HEIGHT), background)
    draw = ImageDraw.Draw(image)
    skin = jitter((250, 228, 214) if attrs["Pale_Skin"] else rng.choice(SKIN))
    hair_color = jitter(HAIR[hair])
    cx, cy = 89 + rng.randint(-4, 4), 122 + rng.randint(-4, 4)
    half_w, half_h = rng.randint(34, 42) + (3 if attrs["Male"] else 0), rng.randint(46, 54)

    # Shoulders, hair behind the head (long for most non-male faces), head, ears.
    draw.ellipse((cx - 80, cy + half_h - 6, cx + 80, cy + half_h + 120), fill=jitter(background, 60))
    if not attrs["Male"]:
        draw.rounded_rectangle(
            (cx - half_w - 10, cy - half_h - 8, cx + half_w + 10, cy + half_h + 30), 30, fill=hair_color
        )
    draw.ellipse((cx - half_w - 6, cy - 10, cx - half_w + 8, cy + 14), fill=skin)
    draw.ellipse((cx + half_w - 8, cy - 10, cx + half_w + 6, cy + 14), fill=skin)
    draw.ellipse((cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=skin)
    # Hair on top; bangs come lower over the forehead.
    top = cy - half_h - rng.randint(4, 10)
    draw.chord(
        (cx - half_w - 4, top, cx + half_w + 4, cy + (0 if attrs["Bangs"] else -half_h // 2)), 180, 360, fill=hair_color
    )
    if attrs["Bangs"]:
        draw.rectangle((cx - half_w + 4, cy - half_h // 2, cx + half_w - 4, cy - half_h // 4), fill=hair_color)
    if not attrs["No_Beard"]:
        draw.chord((cx - half_w + 2, cy + 4, cx + half_w - 2, cy + half_h + 2), 0, 180, fill=jitter(hair_color, 10))

    # Eyes, brows, glasses.
    eye_y, eye_dx = cy - 6, rng.randint(14, 18)
    iris = jitter((70, 90, 120), 40)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        draw.ellipse((ex - 7, eye_y - 4, ex + 7, eye_y + 4), fill=(245, 245, 245))
        draw.ellipse((ex - 3, eye_y - 3, ex + 3, eye_y + 3), fill=iris)
        draw.line((ex - 8, eye_y - 10, ex + 8, eye_y - 11 + rng.randint(-2, 2)), fill=hair_color, width=3)
        if attrs["Eyeglasses"]:
            draw.ellipse((ex - 12, eye_y - 9, ex + 12, eye_y + 9), outline=(20, 20, 20), width=3)
    if attrs["Eyeglasses"]:
        draw.line((cx - eye_dx + 12, eye_y, cx + eye_dx - 12, eye_y), fill=(20, 20, 20), width=3)

    # Nose and mouth.
    nose = tuple(int(c * 0.85) for c in skin)
    draw.line((cx, eye_y + 6, cx - 3, cy + 16, cx + 3, cy + 17), fill=nose, width=2)
    mouth_y, mouth_w = cy + 30, rng.randint(11, 15)
    lips = jitter((170, 70, 75), 20)
    if attrs["Mouth_Slightly_Open"]:
        draw.ellipse((cx - mouth_w // 2, mouth_y - 3, cx + mouth_w // 2, mouth_y + 6), fill=(60, 20, 25))
    if attrs["Smiling"]:
        draw.arc((cx - mouth_w, mouth_y - 12, cx + mouth_w, mouth_y + 6), 20, 160, fill=lips, width=4)
    else:
        draw.line((cx - mouth_w + 3, mouth_y, cx + mouth_w - 3, mouth_y), fill=lips, width=4)

    return _photographic(image.filter(ImageFilter.GaussianBlur(radius=1.5)), rng)


def _photographic(image: Image.Image, rng: random.Random) -> Image.Image:
    """Side lighting, vignette and sensor noise: flat cartoon colours would let a discriminator
    tell real from generated by texture alone, which stalls GAN training on this set."""
    noise = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.float32)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1.0 + 0.18 * ((xs - WIDTH / 2) * np.cos(angle) + (ys - HEIGHT / 2) * np.sin(angle)) / WIDTH
    vignette = 1.0 - 0.25 * (((xs - WIDTH / 2) / WIDTH) ** 2 + ((ys - HEIGHT / 2) / HEIGHT) ** 2)
    pixels = pixels * (light * vignette)[..., None] + noise.normal(0.0, 6.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class SyntheticFacesSource(ImageSource):
    """`count` drawn faces; the last tenth (at least one) is a `val` split."""

    name = "synthetic-faces"

    def __init__(self, count: int, seed: int = 0) -> None:
        if count < 2:
            raise ValueError(f"synthetic face count must be >= 2, got {count}")
        self.count, self.seed = count, seed

    def plan(self) -> SplitPlan:
        keys = [f"{i:06d}" for i in range(self.count)]
        num_val = max(1, self.count // 10)
        attributes = {key: face_attributes(self.seed, int(key)) for key in keys}
        return SplitPlan({"train": keys[:-num_val], "val": keys[-num_val:]}, list(ATTRIBUTES), attributes)

    def open(self, key: str) -> Image.Image:
        return draw_face(self.seed, int(key))

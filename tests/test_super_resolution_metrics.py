"""SRGAN's LR inputs (gendist.data.resolution) and its scores (gendist.eval.super_resolution)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gendist.data.resolution import bicubic_upsample, downsample
from gendist.eval.inpainting import psnr
from gendist.eval.super_resolution import SR_METRICS, crop_border, rgb_to_y, sr_metrics


def faces(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random textures in [-1, 1]: noise at 1/8 of the size, upsampled."""
    coarse = torch.rand(batch, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1).clamp(-1, 1)


def gradient(size: int = 64) -> torch.Tensor:
    """A smooth (1, 3, size, size) image in [-1, 1]: linear ramps across, down and diagonally."""
    ramp = torch.linspace(-0.9, 0.9, size)
    across, down = ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size)
    return torch.stack([across, down, (across + down) / 2]).unsqueeze(0)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return (images + 1) / 2


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_downsample_shape_range_and_8_bit_levels(scale):
    low = downsample(faces() * 1.5, scale)  # out-of-range input: the result is clamped all the same
    assert low.shape == (2, 3, 64 // scale, 64 // scale) and low.dtype == torch.float32
    assert low.min() >= -1 and low.max() <= 1
    levels = (low + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_downsample_is_deterministic_and_computed_in_float32():
    images = faces()
    assert torch.equal(downsample(images, 4), downsample(images.clone(), 4))
    half = images.bfloat16()
    low = downsample(half, 4)
    assert low.dtype == torch.float32
    assert torch.equal(low, downsample(half.float(), 4))


def test_a_constant_image_stays_constant():
    level = 2 * 100 / 255 - 1
    constant = torch.full((1, 3, 32, 32), level)
    low = downsample(constant, 4)
    assert torch.allclose(low, torch.full_like(low, level), atol=1e-6)
    high = bicubic_upsample(low, 4)
    assert high.shape == constant.shape
    assert torch.allclose(high, constant, atol=1e-6)


def test_bicubic_recovers_a_smooth_image_but_not_noise():
    smooth = gradient()
    assert psnr(to_unit(bicubic_upsample(downsample(smooth, 4), 4)), to_unit(smooth)) > 30
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert psnr(to_unit(bicubic_upsample(downsample(noise, 4), 4)), to_unit(noise)) < 15


def test_bicubic_upsample_is_clamped():
    checkerboard = (torch.arange(8).view(1, -1) + torch.arange(8).view(-1, 1)) % 2 * 2.0 - 1
    high = bicubic_upsample(checkerboard.expand(1, 3, 8, 8), 4)
    assert high.shape == (1, 3, 32, 32) and high.min() == -1 and high.max() == 1


def test_rgb_to_y_is_matlabs_rgb2ycbcr():
    colours = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]).view(5, 3, 1, 1)
    expected = torch.tensor([235, 16, 16 + 65.481, 16 + 128.553, 16 + 24.966]) / 255
    luma = rgb_to_y(colours.double())
    assert luma.shape == (5, 1, 1, 1)
    assert torch.allclose(luma.flatten(), expected.double(), atol=1e-12)
    with pytest.raises(ValueError, match="RGB"):
        rgb_to_y(torch.zeros(1, 1, 4, 4))


def test_crop_border():
    images = torch.arange(2 * 3 * 8 * 10.0).view(2, 3, 8, 10)
    assert torch.equal(crop_border(images, 2), images[:, :, 2:6, 2:8])
    assert torch.equal(crop_border(images, 0), images)
    for pixels in (-1, 4):
        with pytest.raises(ValueError, match="crop"):
            crop_border(images, pixels)


def test_identical_images_score_inf_psnr_and_ssim_1():
    images = to_unit(faces())
    scores = sr_metrics(images, images.clone(), 8)
    assert set(scores) == set(SR_METRICS)
    assert all(scores[name].shape == (2,) for name in SR_METRICS)
    assert all(math.isinf(value) for name in ("psnr_y", "psnr_rgb") for value in scores[name].tolist())
    for name in ("ssim_y", "ssim_rgb"):
        assert torch.allclose(scores[name], torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_a_sharper_image_scores_higher():
    target = faces(seed=3)
    sharper, blurrier = (bicubic_upsample(downsample(target, scale), scale) for scale in (2, 8))
    better = sr_metrics(to_unit(sharper), to_unit(target), 4)
    worse = sr_metrics(to_unit(blurrier), to_unit(target), 4)
    for name in SR_METRICS:
        assert (better[name] > worse[name]).all(), name


def test_bad_scales_and_sizes_are_refused():
    images = faces()
    for scale in (0, 1, 3, 6, 2.0):
        with pytest.raises(ValueError, match="power of two"):
            downsample(images, scale)
        with pytest.raises(ValueError, match="power of two"):
            bicubic_upsample(images, scale)
    with pytest.raises(ValueError, match="divisible"):
        downsample(images[..., :60], 8)
    with pytest.raises(ValueError, match="SSIM"):
        sr_metrics(to_unit(images[..., :16, :16]), to_unit(images[..., :16, :16]), 4)
    with pytest.raises(ValueError, match="shape"):
        sr_metrics(to_unit(images), to_unit(images[:1]), 4)

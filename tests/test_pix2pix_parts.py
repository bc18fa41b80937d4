"""Pix2Pix parts for inpainting: U-Net, PatchGAN, the metrics and the classical baselines."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from gendist.config import ConfigError, load_config
from gendist.eval.inpainting import (
    PROTOCOL,
    from_uint8_hwc,
    inpainting_metrics,
    l1_in_hole,
    mean_fill,
    psnr,
    quantize,
    ssim,
    telea_fill,
    to_uint8_hwc,
    to_unit,
)
from gendist.families.base import FamilyInputs
from gendist.families.pix2pix import declare
from gendist.models.pix2pix import (
    PatchDiscriminator,
    UNetGenerator,
    enable_dropout,
    patch_grid,
    receptive_field,
    unet_receptive_field,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def pattern(height=32, width=40):
    """A deterministic smooth RGB image in [0.1, 0.9] (no RNG, so reference values stay fixed)."""
    y = torch.arange(height, dtype=torch.float64).view(1, 1, height, 1)
    x = torch.arange(width, dtype=torch.float64).view(1, 1, 1, width)
    return torch.cat([0.5 + 0.4 * torch.sin(x / 3 + c) * torch.cos(y / 5 - c) for c in range(3)], dim=1)


def square_hole(batch, size, start, end):
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, start:end, start:end] = 1
    return mask


# --- U-Net generator ----------------------------------------------------------------------------


@pytest.mark.parametrize("size, downs", [(32, 4), (64, 5)])
def test_unet_shape_range_and_default_depth(size, downs):
    torch.manual_seed(0)
    net = UNetGenerator(ngf=8, image_size=size)
    assert net.downsamplings == downs  # log2(size) - 1: a 2x2 bottleneck
    assert unet_receptive_field(downs) >= size  # each bottleneck unit sees the whole image
    out = net(torch.randn(2, 4, size, size) * 3)
    assert out.shape == (2, 3, size, size)
    assert out.min() >= -1 and out.max() <= 1


def test_unet_depth_limits_and_widths():
    net = UNetGenerator(ngf=4, image_size=64, downsamplings=6)  # 1x1 bottleneck: the most at 64 px
    assert net(torch.randn(1, 4, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError):
        UNetGenerator(ngf=4, image_size=64, downsamplings=7)
    widths = [layer[0].out_channels for layer in net.encoder]
    assert widths == [4, 8, 16, 32, 32, 32]  # ngf, 2ngf, 4ngf, 8ngf, 8ngf, ...
    # skips: every decoder layer but the innermost sees its input concatenated with the encoder's
    decoder_in = [layer[0].in_channels for layer in net.decoder]
    assert decoder_in == [32, 64, 64, 32, 16, 8]
    assert isinstance(net.encoder[0][1], nn.Identity) and isinstance(net.encoder[-1][1], nn.Identity)
    assert isinstance(net.encoder[1][1], nn.InstanceNorm2d)


def test_unet_gradients_reach_every_parameter_and_input_pixel():
    torch.manual_seed(0)
    net = UNetGenerator(ngf=4, image_size=32, dropout=0.0)
    x = torch.randn(2, 4, 32, 32, requires_grad=True)
    net(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert (x.grad.abs().sum(dim=(0, 1)) > 0).all()


def test_unet_skip_carries_local_detail():
    """A pixel change reaches the output through the shallow skip even with the bottleneck path cut."""
    torch.manual_seed(0)
    net = UNetGenerator(ngf=4, image_size=32, dropout=0.0, norm="none").eval()
    net.decoder[0][0].weight.data.zero_()  # the innermost decoder layer now outputs zeros whatever it sees
    x = torch.randn(1, 4, 32, 32, requires_grad=True)
    net(x)[0, :, 16, 16].sum().backward()
    assert x.grad.abs().sum() > 0


def test_unet_dropout_default_and_modes():
    torch.manual_seed(0)
    net = UNetGenerator(ngf=4, image_size=32)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.5 for d in drops)  # the paper's first three decoder layers
    assert not any(isinstance(m, nn.Dropout) for m in net.decoder[-1].modules())
    x = torch.randn(1, 4, 32, 32)
    assert not torch.equal(net(x), net(x))  # training: stochastic
    net.eval()
    assert torch.equal(net(x), net(x))
    enable_dropout(net)
    assert not torch.equal(net(x), net(x))  # the paper's test-time dropout
    assert not any(isinstance(m, nn.Dropout) for m in UNetGenerator(ngf=4, image_size=32, dropout=0).modules())


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_the_family_generator_takes_pix2pix_dropout(dropout):
    overrides = ["model.name=pix2pix", "model.image_size=32", "model.ngf=4", "model.ndf=4"]
    cfg = load_config(None, [*overrides, f"pix2pix.dropout={dropout}"])
    generator = declare(FamilyInputs(cfg, [])).networks[0].module
    drops = [m.p for m in generator.modules() if isinstance(m, nn.Dropout)]
    assert drops == ([dropout] * 3 if dropout else [])  # the paper's first three decoder layers at 32 px
    assert load_config(None, overrides).pix2pix.dropout == 0.5  # the paper's


@pytest.mark.parametrize("dropout", [-0.1, 1.0, float("nan")])
def test_pix2pix_dropout_outside_0_1_is_refused(dropout):
    with pytest.raises(ConfigError, match=r"pix2pix.dropout must be in \[0, 1\)"):
        load_config(None, ["model.name=pix2pix", f"pix2pix.dropout={dropout}"])


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_unet_other_norms(norm):
    assert UNetGenerator(ngf=4, image_size=32, norm=norm)(torch.randn(2, 4, 32, 32)).shape == (2, 3, 32, 32)


def test_init_is_the_papers():
    torch.manual_seed(0)
    net = UNetGenerator(ngf=32, image_size=64)
    weights = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert weights.mean().abs() < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.02)


# --- PatchGAN -----------------------------------------------------------------------------------


def test_receptive_field():
    assert receptive_field(3) == 70  # the paper's 70x70 PatchGAN
    assert [receptive_field(n) for n in range(1, 5)] == [9 * 2**n - 2 for n in range(1, 5)] == [16, 34, 70, 142]
    assert 64 / 4 <= receptive_field(2) <= 64 * 0.55  # the default at 64 px: about half the image


@pytest.mark.parametrize("size, layers", [(64, 2), (64, 1), (32, 1), (64, 3)])
def test_patch_discriminator_shape(size, layers):
    d = PatchDiscriminator(ndf=8, layers=layers, image_size=size)
    side = patch_grid(size, layers)
    condition, image = torch.randn(3, 4, size, size), torch.randn(3, 3, size, size)
    assert d(condition, image).shape == (3, 1, side, side)
    assert torch.equal(d(condition, image), d(torch.cat([condition, image], dim=1)))
    assert d.receptive_field == receptive_field(layers)
    assert PatchDiscriminator(ndf=8).layers == 2 and patch_grid(64, 2) == 14


@pytest.mark.parametrize("layers", [1, 2])
def test_patch_receptive_field_matches_the_gradient_support(layers):
    """Without norm (instance norm couples all pixels) an interior logit depends on exactly RF x RF pixels."""
    torch.manual_seed(0)
    d = PatchDiscriminator(in_channels=7, ndf=4, layers=layers, image_size=64, norm="none")
    x = torch.randn(1, 7, 64, 64, requires_grad=True)
    out = d(x)
    centre = out.shape[-1] // 2
    out[0, 0, centre, centre].backward()
    support = x.grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    assert rows[0] > 0 and rows[-1] < 63  # not clipped by the border
    assert rows[-1] - rows[0] + 1 == receptive_field(layers) == cols[-1] - cols[0] + 1


# --- metrics ------------------------------------------------------------------------------------


def test_psnr_identical_is_inf_and_constant_error_is_known():
    a = torch.rand(2, 3, 16, 16)
    assert torch.isinf(psnr(a, a)).all()
    target = torch.full((2, 3, 16, 16), 0.5, dtype=torch.float64)
    values = psnr(target + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1), target)
    assert values.shape == (2,) and values.tolist() == pytest.approx([20.0, 40.0], abs=1e-6)
    assert "no border crop" in PROTOCOL and "sigma 1.5" in PROTOCOL


def test_ssim_identical_noise_and_closed_forms():
    torch.manual_seed(0)
    a = pattern(32, 32).repeat(4, 1, 1, 1)
    assert ssim(a, a).tolist() == pytest.approx([1.0] * 4, abs=1e-12)
    noisy = [ssim((a[:1] + s * torch.randn_like(a[:1])).clamp(0, 1), a[:1]).item() for s in (0.02, 0.05, 0.1, 0.2)]
    assert all(x > y for x, y in zip(noisy, noisy[1:])) and noisy[0] < 1
    # constant images have zero variance: SSIM is the luminance term (2xy + C1) / (x^2 + y^2 + C1)
    x, y, c1 = 0.5, 0.6, 0.01**2
    flat = ssim(torch.full((1, 3, 16, 16), x, dtype=torch.float64), torch.full((1, 3, 16, 16), y, dtype=torch.float64))
    assert flat.item() == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-12)
    # a reference value from pytorch-msssim 1.0.0 (ssim(..., data_range=1, size_average=False), float64)
    b = (pattern() + 0.1 * torch.sin(pattern() * 17)).clamp(0, 1) ** 1.3
    assert ssim(pattern(), b).item() == pytest.approx(0.7762128, abs=1e-6)
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_l1_in_hole_ignores_known_pixels():
    target, mask = torch.zeros(2, 3, 16, 16), square_hole(2, 16, 4, 8)
    output = target + 0.25 * mask  # error 0.25 in the hole
    output[:, :, 12:, 12:] = 1.0  # large errors outside the hole
    assert l1_in_hole(output, target, mask).tolist() == pytest.approx([0.25, 0.25])
    assert l1_in_hole(output, target, mask[:, 0].bool()).tolist() == pytest.approx([0.25, 0.25])
    assert math.isnan(l1_in_hole(output, target, torch.zeros_like(mask))[0].item())
    assert set(inpainting_metrics(output, target, mask)) == {"psnr", "ssim", "l1_hole"}


def test_conversions():
    images = torch.rand(2, 3, 8, 8)
    arr = to_uint8_hwc(images)
    assert arr.dtype == np.uint8 and arr.shape == (2, 8, 8, 3)
    assert torch.allclose(from_uint8_hwc(arr), quantize(images).float(), atol=1e-7)
    assert to_unit(torch.tensor([-1.5, -1.0, 0.0, 1.0])).tolist() == [0.0, 0.0, 0.5, 1.0]


# --- baselines ----------------------------------------------------------------------------------


def smooth_batch():
    image = pattern(32, 32).repeat(2, 1, 1, 1)
    image[1] = image[1].flip(-1)
    return image.float(), square_hole(2, 32, 10, 20)


def test_baselines_change_only_the_hole_ignore_its_contents_and_beat_zero_fill():
    image, mask = smooth_batch()
    hole = mask.expand(-1, 3, -1, -1) == 1
    spoiled = image.clone()
    spoiled[hole] = torch.rand(int(hole.sum()))  # what the hole held must not matter
    zero_error = l1_in_hole(image * (1 - mask), image, mask)

    telea = from_uint8_hwc(telea_fill(to_uint8_hwc(spoiled), mask[:, 0].numpy()))
    assert torch.equal(telea, from_uint8_hwc(telea_fill(to_uint8_hwc(image), mask[:, 0].numpy())))
    assert torch.equal(telea[~hole], quantize(image)[~hole].float())
    mean = mean_fill(spoiled, mask)
    assert torch.equal(mean, mean_fill(image, mask))
    assert torch.equal(mean[~hole], image[~hole])
    known_mean = image[0][:, mask[0, 0] == 0].mean(dim=1)
    assert torch.allclose(mean[0, :, 15, 15], known_mean, atol=1e-6)

    telea_error, mean_error = l1_in_hole(telea, image, mask), l1_in_hole(mean, image, mask)
    assert (telea_error < mean_error).all() and (mean_error < zero_error).all()
    assert (psnr(telea, image) > psnr(image * (1 - mask), image)).all()


def test_telea_single_image_and_uint8_check():
    image, mask = smooth_batch()
    batch = to_uint8_hwc(image)
    single = telea_fill(batch[0], mask[0, 0].numpy().astype(bool))
    assert single.shape == (32, 32, 3) and np.array_equal(single, telea_fill(batch, mask[:, 0].numpy())[0])
    with pytest.raises(ValueError):
        telea_fill(batch.astype(np.float32), mask[:, 0].numpy())
    assert mean_fill(torch.from_numpy(batch).permute(0, 3, 1, 2), mask).dtype == torch.uint8

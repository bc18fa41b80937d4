"""CycleGAN parts: the ResNet generator, the PatchGAN on one image, the pool of past fakes, LSGAN losses."""

import io
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gendist.families.image_pool import ImagePool
from gendist.losses.gan import d_least_squares, g_least_squares
from gendist.models.cyclegan import ResnetBlock, ResnetGenerator, resnet_receptive_field
from gendist.models.pix2pix import PatchDiscriminator, patch_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def parameters(module):
    return sum(p.numel() for p in module.parameters())


# --- ResNet generator ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_generator_shape_and_range(size):
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=8)
    out = net(torch.randn(2, 3, size, size) * 3)
    assert out.shape == (2, 3, size, size)
    assert out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError):
        net(torch.randn(1, 3, size + 2, size + 2))  # not a multiple of 2**downsamplings


def reference_parameters(ngf, blocks, channels=3):
    """The reference's ResnetGenerator (2 downsamplings, instance norm without affine, biases on every
    conv): c7s1-ngf, d2ngf, d4ngf, blocks x 2 conv3x3 at 4ngf, u2ngf, ungf, c7s1-3."""
    convs = [(channels, ngf, 7), (ngf, 2 * ngf, 3), (2 * ngf, 4 * ngf, 3)]
    convs += [(4 * ngf, 4 * ngf, 3)] * (2 * blocks)
    convs += [(4 * ngf, 2 * ngf, 3), (2 * ngf, ngf, 3), (ngf, channels, 7)]
    return sum(i * o * k * k + o for i, o, k in convs)


def test_default_generator_parameters_against_the_reference():
    """Ours = the reference less the biases of the convs followed by instance norm (cancelled by it)."""
    assert reference_parameters(64, 9) == 11_378_179  # the reference's resnet_9blocks, 11.378 M
    assert reference_parameters(64, 6) == 7_837_699  # its resnet_6blocks, the paper's <= 128 px net
    for blocks, expected in [(6, 7_833_987), (9, 11_372_931)]:
        dead_biases = 64 + 128 + 256 + 2 * blocks * 256 + 128 + 64
        assert expected == reference_parameters(64, blocks) - dead_biases
        net = ResnetGenerator() if blocks == 6 else ResnetGenerator(blocks=9)
        assert parameters(net) == expected
        if blocks == 6:
            assert net.blocks == 6 and net.downsamplings == 2  # the defaults


def test_generator_layout_norms_and_init():
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=8)
    blocks = [m for m in net.modules() if isinstance(m, ResnetBlock)]
    assert len(blocks) == 6 and all(b.body[1].in_channels == 32 for b in blocks)  # 4ngf: 16x16 at 64 px
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 2 + 1 + 2 * 6 + 2  # stem, 2 down, 2 per block, 2 up
    assert all(not n.affine and not n.track_running_stats for n in norms)  # the reference's
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in net.modules())
    assert isinstance(net.net[0], nn.ReflectionPad2d) and isinstance(net.net[-1], nn.Tanh)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [c.bias is not None for c in convs] == [False] * (len(convs) - 1) + [True]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert weights.mean().abs() < 2e-3 and weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert convs[-1].bias.abs().sum() == 0
    # eval() changes nothing: instance norm without running statistics, no dropout
    x = torch.randn(1, 3, 32, 32)
    trained = net(x)
    assert torch.equal(net.eval()(x), trained)


def test_generator_options():
    x = torch.randn(1, 3, 32, 32)
    for kwargs in [{"norm": "none"}, {"norm": "layer"}, {"padding": "zero"}, {"padding": "replicate"}]:
        assert ResnetGenerator(ngf=4, blocks=2, **kwargs)(x).shape == (1, 3, 32, 32)
    deep = ResnetGenerator(ngf=4, blocks=1, downsamplings=3)
    assert deep(x).shape == (1, 3, 32, 32)
    assert any(isinstance(m, nn.Dropout) for m in ResnetGenerator(ngf=4, blocks=1, dropout=0.5).modules())
    with pytest.raises(ValueError):
        ResnetBlock(8, padding="circular")


def test_residual_block_is_x_plus_a_shape_preserving_branch():
    torch.manual_seed(0)
    block = ResnetBlock(8)
    x = torch.randn(2, 8, 16, 16)
    assert block(x).shape == x.shape
    assert torch.allclose(block(x) - x, block.body(x), atol=1e-6)
    # with the branch's last conv zeroed the block is exactly the identity (instance norm of 0 is 0)
    nn.init.zeros_(block.body[-2].weight)
    assert torch.equal(block(x), x)
    # and so is the whole bottleneck stack: the generator's blocks pass their input through
    net = ResnetGenerator(ngf=4, blocks=3)
    stack = [m for m in net.net if isinstance(m, ResnetBlock)]
    for b in stack:
        nn.init.zeros_(b.body[-2].weight)
    h = torch.randn(1, 16, 8, 8)
    assert torch.equal(nn.Sequential(*stack)(h), h)


def test_bottleneck_receptive_field_matches_the_gradient_support():
    """Without norm and ReLU (so no path is switched off) a bottleneck unit sees 109 px with 6 blocks."""
    assert resnet_receptive_field(6, 2) == 109 > 64  # the whole 64 px face
    assert resnet_receptive_field(9, 2) == 157
    torch.manual_seed(0)
    net = ResnetGenerator(ngf=2, blocks=6, norm="none")
    layers = [nn.Identity() if isinstance(m, nn.ReLU) else m for m in net.net]
    for block in (m for m in layers if isinstance(m, ResnetBlock)):
        block.body = nn.Sequential(*[nn.Identity() if isinstance(m, nn.ReLU) else m for m in block.body])
    encoder = nn.Sequential(*layers[: 4 + 3 * 2 + 6])  # stem, 2 downsamplings, 6 blocks
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    h = encoder(x)
    assert h.shape == (1, 8, 32, 32)
    h[0, :, 16, 16].sum().backward()
    support = x.grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = support.any(1).nonzero().flatten(), support.any(0).nonzero().flatten()
    assert rows[0] > 0 and rows[-1] < 127  # not clipped by the border
    assert rows[-1] - rows[0] + 1 == resnet_receptive_field(6, 2) == cols[-1] - cols[0] + 1


# --- PatchGAN on one image ----------------------------------------------------------------------


@pytest.mark.parametrize("size, layers", [(64, 2), (32, 1)])
def test_patch_discriminator_on_one_image(size, layers):
    torch.manual_seed(0)
    d = PatchDiscriminator(in_channels=3, ndf=8, layers=layers, image_size=size)
    side = patch_grid(size, layers)
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, side, side)
    assert d.net[0].in_channels == 3
    assert PatchDiscriminator(ndf=8).net[0].in_channels == 7  # Pix2Pix's default untouched


# --- the pool of past fakes ---------------------------------------------------------------------


def tagged(first, count):
    """Images whose every pixel is their id: (count, 3, 4, 4) with ids first, first + 1, ..."""
    ids = torch.arange(first, first + count, dtype=torch.float32)
    return ids.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


def ids(images):
    return [int(v) for v in images[:, 0, 0, 0].tolist()]


def test_pool_returns_new_images_until_full():
    pool = ImagePool(size=5, seed=0)
    batch = tagged(0, 3)
    assert torch.equal(pool.query(batch), batch) and len(pool) == 3
    out = pool.query(tagged(3, 3))  # images 3 and 4 fill it; image 5 may be swapped for a past one
    assert ids(out)[:2] == [3, 4] and ids(out)[2] in [0, 1, 2, 3, 4, 5] and len(pool) == 5


def test_pool_once_full_mixes_past_and_new_and_conserves_images():
    pool = ImagePool(size=4, seed=1)
    pool.query(tagged(0, 4))
    returned_past, taken = 0, 0
    for step in range(50):
        before = Counter(ids(torch.stack(pool.images)))
        batch = tagged(100 + 4 * step, 4)
        out = pool.query(batch)
        after = Counter(ids(torch.stack(pool.images)))
        # each image either passes through or is swapped with a stored one: nothing is lost or made up
        assert before + Counter(ids(batch)) == after + Counter(ids(out))
        assert len(pool) == 4
        returned_past += sum(o != b for o, b in zip(ids(out), ids(batch)))
        taken += 4
    assert 0.35 < returned_past / taken < 0.65  # the coin is fair (200 images)


def test_pool_devices_dtypes_and_detach():
    pool = ImagePool(size=2, seed=0)
    x = torch.randn(3, 3, 4, 4, requires_grad=True)
    out = pool.query(x)
    assert not out.requires_grad and out.dtype == x.dtype and out.device == x.device
    assert all(not stored.requires_grad and stored._base is None for stored in pool.images)  # clones
    out = pool.query(torch.randn(4, 3, 4, 4, dtype=torch.float64))
    assert out.dtype == torch.float64
    empty = pool.query(torch.randn(0, 3, 4, 4))
    assert empty.shape == (0, 3, 4, 4)


def test_pool_of_size_zero_passes_through():
    pool = ImagePool(size=0)
    x = torch.randn(3, 3, 4, 4)
    assert pool.query(x) is x and len(pool) == 0
    with pytest.raises(ValueError):
        ImagePool(size=-1)


def test_pool_draws_come_from_its_own_seeded_generator():
    def run(seed):
        pool = ImagePool(size=3, seed=seed)
        return [ids(pool.query(tagged(4 * i, 4))) for i in range(10)]

    first = run(7)
    torch.manual_seed(123)  # the global RNG plays no part
    assert run(7) == first
    assert run(8) != first


@pytest.mark.parametrize("fill", [2, 6])  # half full, full
def test_pool_state_round_trip_gives_identical_draws(fill):
    pool = ImagePool(size=4, seed=3)
    for i in range(fill):
        pool.query(tagged(10 * i, 1) + torch.rand(1, 3, 4, 4))
    buffer = io.BytesIO()
    torch.save(pool.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["images"].device.type == "cpu" and state["images"].shape == (min(fill, 4), 3, 4, 4)
    assert isinstance(state["size"], int) and state["generator"].dtype == torch.uint8

    resumed = ImagePool(size=4, seed=999)  # the seed is overwritten by the loaded generator state
    resumed.load_state_dict(state)
    queries = [torch.rand(3, 3, 4, 4) for _ in range(8)]
    for q in queries:
        assert torch.equal(pool.query(q), resumed.query(q))
    assert all(torch.equal(a, b) for a, b in zip(pool.images, resumed.images))
    with pytest.raises(ValueError):
        ImagePool(size=5).load_state_dict(state)


def test_pool_state_of_an_empty_pool():
    state = ImagePool(size=4).state_dict()
    pool = ImagePool(size=4, seed=5)
    pool.load_state_dict(state)
    assert len(pool) == 0
    x = tagged(0, 2)
    assert torch.equal(pool.query(x), x)


# --- least-squares GAN losses -------------------------------------------------------------------


def test_lsgan_losses_on_known_values():
    ones, zeros = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    assert d_least_squares(ones, zeros).item() == 0.0  # D perfectly right
    assert d_least_squares(zeros, ones).item() == 1.0  # 0.5 * (1 + 1)
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([0.5, -0.5])
    assert d_least_squares(real, fake).item() == pytest.approx(0.5 * (1.0 + 0.25))
    assert g_least_squares(ones).item() == 0.0
    assert g_least_squares(torch.tensor([0.0, 3.0])).item() == pytest.approx((1.0 + 4.0) / 2)
    # the reference's convention: D halves the sum of its two MSE terms, G takes the plain MSE to 1
    r, f = torch.randn(4, 1, 5, 5), torch.randn(4, 1, 5, 5)
    expected_d = 0.5 * (F.mse_loss(r, torch.ones_like(r)) + F.mse_loss(f, torch.zeros_like(f)))
    assert d_least_squares(r, f).item() == pytest.approx(expected_d.item(), rel=1e-6)
    assert g_least_squares(f).item() == pytest.approx(F.mse_loss(f, torch.ones_like(f)).item(), rel=1e-6)


def test_lsgan_losses_are_fp32_and_have_the_expected_gradient():
    fake = torch.tensor([0.25, -1.0], dtype=torch.bfloat16, requires_grad=True)
    real = torch.tensor([1.5, 0.5], dtype=torch.bfloat16)
    loss = d_least_squares(real, fake)
    assert loss.dtype == torch.float32 and g_least_squares(fake).dtype == torch.float32
    loss.backward()
    assert torch.allclose(fake.grad.float(), 0.5 * 2 * fake.detach().float() / 2)  # d/df 0.5*mean(f^2)

import math

import pytest
import torch
from torch import nn

from gendist.losses.gan import gradient_penalty
from gendist.losses.vae import kl_standard_normal, reconstruction_nll
from gendist.models.conditional import ConditionalDiscriminator, ConditionalGenerator
from gendist.models.dcgan import Discriminator, Generator
from gendist.models.vae import ConvVAE


def test_gradient_penalty_of_a_linear_critic_is_analytic():
    """D(x) = w . x + b has grad_x D = w for every input: the penalty is (||w|| - 1)^2."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 1))
    real, fake, alpha = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.rand(5)
    expected = (critic[1].weight.norm() - 1) ** 2
    assert gradient_penalty(critic, real, fake, alpha).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_penalty_uses_one_alpha_per_sample_and_the_whole_sample_norm():
    """D(x) = ||x||^2 / 2 has grad_x D = x: the penalty is mean_i (||a_i r_i + (1-a_i) f_i|| - 1)^2."""
    real, fake = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])
    mixed = alpha.view(4, 1, 1, 1) * real + (1 - alpha.view(4, 1, 1, 1)) * fake
    expected = ((mixed.flatten(1).norm(dim=1) - 1) ** 2).mean()
    penalty = gradient_penalty(lambda x: 0.5 * (x**2).flatten(1).sum(1), real, fake, alpha)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    # alpha = 1 for sample 3 means it sits on the real image, whatever the fake
    only_last = gradient_penalty(lambda x: 0.5 * (x**2).flatten(1).sum(1), real[3:], fake[3:] * 7, alpha[3:])
    assert only_last.item() == pytest.approx(((real[3].norm() - 1) ** 2).item(), rel=1e-6)


def test_gradient_penalty_trains_the_critic_through_double_backward():
    critic = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 1))
    penalty = gradient_penalty(critic, torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2), torch.rand(3))
    penalty.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters() if p.dim() > 1)


def test_kl_matches_torch_distributions():
    mu, logvar = torch.randn(6, 10), torch.randn(6, 10)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(1).mean()
    assert kl_standard_normal(mu, logvar).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_gaussian_nll_is_the_normal_log_density():
    images, means = torch.rand(2, 3, 4, 4) * 2 - 1, torch.rand(2, 3, 4, 4) * 2 - 1
    expected = -torch.distributions.Normal(means, 0.1).log_prob(images).flatten(1).sum(1).mean()
    assert reconstruction_nll(means, images, "gaussian", 0.1).item() == pytest.approx(expected.item(), rel=1e-5)
    learned = reconstruction_nll(means, images, "gaussian_learned", 0.1, torch.tensor(math.log(0.1)))
    assert learned.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cgan_output_changes_with_the_label_and_only_with_it():
    torch.manual_seed(0)
    generator = ConditionalGenerator(num_labels=3, z_dim=16, label_dim=8, ngf=8, image_size=32).eval()
    critic = ConditionalDiscriminator(num_labels=3, ndf=8, image_size=32).eval()
    z = torch.randn(2, 16)
    smiling, plain = torch.tensor([[0.0, 1.0, 0.0]] * 2), torch.zeros(2, 3)
    with torch.no_grad():
        assert torch.equal(generator(z, smiling), generator(z, smiling))
        assert not torch.allclose(generator(z, smiling), generator(z, plain))
        images = generator(z, plain)
        assert torch.equal(critic(images, plain), critic(images, plain))
        assert not torch.allclose(critic(images, smiling), critic(images, plain))


@pytest.mark.parametrize("norm", ["batch", "layer", "instance", "none"])
def test_shapes_at_32_and_64(norm):
    for size in (32, 64):
        assert Generator(z_dim=10, ngf=4, image_size=size)(torch.randn(2, 10)).shape == (2, 3, size, size)
        critic = Discriminator(ndf=4, image_size=size, norm=norm)
        assert critic(torch.randn(2, 3, size, size)).shape == (2,)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules()) or norm == "batch"
    recon, mu, logvar = ConvVAE(z_dim=7, ngf=4, ndf=4, image_size=32)(torch.randn(2, 3, 32, 32))
    assert recon.shape == (2, 3, 32, 32) and mu.shape == logvar.shape == (2, 7)


def test_unknown_cgan_attribute_names_the_available_ones():
    from gendist.config import ConfigError
    from gendist.families.gan import attribute_columns

    assert attribute_columns(["Smiling", "Male"], ["Male", "Smiling", "Eyeglasses"]) == [1, 0]
    with pytest.raises(ConfigError, match="'Smilling'.*it has: Male, Smiling"):
        attribute_columns(["Smilling"], ["Male", "Smiling"])


@pytest.mark.parametrize("channels_last", [True, False])
def test_networks_are_built_in_the_configured_memory_format_with_fused_adam(channels_last):
    from gendist.config import load_config
    from gendist.families.gan import build_networks
    from gendist.families.vae import build_vae
    from gendist.training.optimizers import build_optimizer

    cfg = load_config(None, [f"train.channels_last={channels_last}"])
    vae_cfg = load_config(None, ["model.name=vae", f"train.channels_last={channels_last}"])
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for net in (*build_networks(cfg, 0), build_vae(vae_cfg)):
        convs = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        assert convs and all(w.is_contiguous(memory_format=layout) for w in convs)
    assert build_optimizer(nn.Linear(2, 2).parameters(), 1e-3, cfg.optim).defaults["fused"] is True

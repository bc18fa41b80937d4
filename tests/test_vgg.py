"""VGG19 features for SRGAN's content loss: layer names, loading torchvision's format, the file checks."""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from gendist import weights_file
from gendist.models import vgg
from gendist.models.vgg import VGG19Features, VGGWeightsError, layer_index, load_features_state

pytestmark = pytest.mark.usefixtures("one_thread")

RELU2_2 = 8


def torchvision_format_state(last: int) -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    """torchvision's own vgg19 features (default init, unlike VGG19Features' random one) and their state
    dict as the weights file names it, up to features[last], with a classifier key to be ignored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        reference = make_layers(cfgs["E"])[: last + 1]
    state = {f"features.{key}": tensor for key, tensor in reference.state_dict().items()}
    return reference, {**state, "classifier.0.weight": torch.zeros(1)}


def imagenet_normalised(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def test_layer_names_index_torchvisions_features():
    assert (layer_index("relu5_4"), layer_index("relu2_2"), layer_index("relu1_1")) == (35, RELU2_2, 1)
    with torch.device("meta"):
        features = torchvision.models.vgg19(weights=None).features
    assert len(vgg.LAYERS) == len(features) == 37
    kinds = {"conv": nn.Conv2d, "relu": nn.ReLU, "pool": nn.MaxPool2d}
    for name, module in zip(vgg.LAYERS, features):
        assert isinstance(module, kinds[name[:4]]), name


def test_unknown_layer_lists_the_valid_names():
    with pytest.raises(ValueError, match="relu6_1") as error:
        VGG19Features("random", "relu6_1")
    assert "conv1_1" in str(error.value) and "relu5_4" in str(error.value) and "pool5" in str(error.value)


@pytest.mark.parametrize(("layer", "shape"), [("relu2_2", (2, 128, 32, 32)), ("relu5_4", (2, 512, 4, 4))])
def test_output_shape_at_64px(layer, shape):
    assert VGG19Features("random", layer)(torch.rand(2, 3, 64, 64) * 2 - 1).shape == shape


def test_frozen_but_gradients_reach_the_input():
    net = VGG19Features("random", "relu2_2")
    images = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_()
    net(images).square().mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not net.training and not any(parameter.requires_grad for parameter in net.parameters())


def test_random_init_is_torchvisions_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected_draw = torch.rand(1)
    torch.manual_seed(5)
    first = VGG19Features("random", "relu1_2")
    assert torch.equal(torch.rand(1), expected_draw)
    second = VGG19Features("random", "relu1_2")
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[key]), key
    conv = first.features[2]  # torchvision: He normal over fan_out (64 x 3 x 3), zero bias
    assert torch.equal(conv.bias, torch.zeros(64))
    assert abs(conv.weight.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.05


def test_torchvision_state_dict_loads_and_computes_with_those_weights():
    reference, state = torchvision_format_state(RELU2_2)
    net = VGG19Features("random", "relu2_2")
    load_features_state(net, state)
    assert net.state_dict().keys() == {key for key in state if key.startswith("features.")}
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(images), reference(imagenet_normalised(images)))


def test_missing_and_misshapen_tensors_are_refused():
    _, state = torchvision_format_state(RELU2_2)
    net = VGG19Features("random", "relu2_2")
    with pytest.raises(VGGWeightsError, match=r"lacks features\.7\.weight"):
        load_features_state(net, {key: tensor for key, tensor in state.items() if key != "features.7.weight"})
    with pytest.raises(VGGWeightsError, match=r"features\.0\.weight \(64, 3, 5, 5\) \(expected \(64, 3, 3, 3\)\)"):
        load_features_state(net, {**state, "features.0.weight": torch.zeros(64, 3, 5, 5)})


def test_the_weights_file_is_torchvisions_and_its_size_is_computed():
    assert vgg.WEIGHTS_FILE == "vgg19-dcbb9e9d.pth" and vgg.SHA256_PREFIX == "dcbb9e9d"
    assert vgg.TENSOR_BYTES == 143_667_240 * 4  # torchvision's vgg19 parameters, float32, no buffers


def test_missing_file_says_where_to_get_it_and_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected_path = tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    with pytest.raises(VGGWeightsError) as error:
        VGG19Features("")
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message and str(expected_path) in message
    assert "srgan.vgg_weights=/path/to/vgg19-dcbb9e9d.pth" in message
    assert not (tmp_path / "hub").exists()
    with pytest.raises(VGGWeightsError, match="srgan.vgg_weights=.*elsewhere.pth does not exist"):
        VGG19Features(str(tmp_path / "elsewhere.pth"))


def test_wrong_size_file_is_refused(tmp_path):
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(VGGWeightsError, match="1,000 bytes.*truncated download or a different file"):
        VGG19Features(str(path))


def test_right_size_wrong_hash_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    path.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(vgg, "TENSOR_BYTES", 1000)
    with pytest.raises(VGGWeightsError, match="does not start with dcbb9e9d; it is not torchvision's"):
        VGG19Features(str(path))


def test_a_checked_file_loads(tmp_path, monkeypatch):
    """The whole path from a file, with the expected size and hash moved to a small stand-in's."""
    _, state = torchvision_format_state(RELU2_2)
    path = tmp_path / "vgg19-standin.pth"
    torch.save(state, path)
    monkeypatch.setattr(vgg, "TENSOR_BYTES", path.stat().st_size)
    monkeypatch.setattr(vgg, "SHA256_PREFIX", weights_file.sha256_hex(path)[:8])
    net = VGG19Features(str(path), "relu2_2")
    for key, tensor in net.state_dict().items():
        assert torch.equal(tensor, state[key]), key

"""Every registered model builds and runs on every dataset's image shape."""

from __future__ import annotations

import pytest
import torch

from trainkit.models import MODELS, build_model

# (channels, size) of mnist/fashion_mnist, cifar, synthetic defaults, and a 224 px imagefolder
SHAPES = {"mnist": (1, 28), "cifar": (3, 32), "small": (3, 16), "imagenet": (3, 224)}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_model_forward_backward(name, shape):
    channels, size = SHAPES[shape]
    if name == "lenet" and size < 16:
        pytest.skip("lenet needs 16 px")
    torch.manual_seed(0)
    model = build_model({"name": name, "num_classes": 7, "in_channels": channels, "input_size": size})
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_alexnet_has_two_forms():
    small = build_model({"name": "alexnet", "num_classes": 10, "in_channels": 3, "input_size": 32})
    classic = build_model({"name": "alexnet", "num_classes": 10, "in_channels": 3, "input_size": 224})
    assert type(small).__name__ == "SmallAlexNet" and type(classic).__name__ == "AlexNet"
    assert any(isinstance(m, torch.nn.Dropout) for m in classic.classifier)
    assert classic.features[0].kernel_size == (11, 11)


def test_lenet_is_the_tutorial_network_on_cifar():
    model = build_model({"name": "lenet", "num_classes": 10, "in_channels": 3, "input_size": 32})
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes[:4] == [(6, 3, 5, 5), (6,), (16, 6, 5, 5), (16,)]
    assert (120, 400) in shapes and (84, 120) in shapes and (10, 84) in shapes


@pytest.mark.parametrize(
    "name, channels", [("torchvision.resnet18", 1), ("torchvision.mobilenet_v3_small", 3)]
)
def test_torchvision_models(name, channels):
    model = build_model({"name": name, "num_classes": 5, "in_channels": channels, "input_size": 32})
    model.eval()
    assert model(torch.randn(2, channels, 32, 32)).shape == (2, 5)


def test_mlp_options():
    model = build_model(
        {
            "name": "mlp",
            "num_classes": 3,
            "in_channels": 1,
            "input_size": 8,
            "hidden_sizes": [16, 8],
            "activation": "gelu",
            "dropout": 0.1,
        }
    )
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 3
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 3)

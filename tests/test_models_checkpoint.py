import pytest
import torch

import correctnet as cn
from correctnet.models import VGG


@pytest.mark.parametrize("name, shape, n_layers", [
    ("lenet5", (1, 28, 28), 5), ("lenet5", (1, 8, 8), 5), ("lenet5", (3, 32, 32), 5),
    ("vgg11", (1, 28, 28), 11), ("vgg16", (3, 32, 32), 16), ("mlp", (1, 8, 8), 3),
])
def test_reference_models_shapes_and_weight_layers(name, shape, n_layers):
    kw = {"width": 0.125} if name.startswith("vgg") else {}
    m = cn.build_model(name, shape, 7, **kw)
    assert m(torch.randn(2, *shape)).shape == (2, 7)
    assert len(cn.analog_layers(cn.analogize(m, cn.LogNormal(0.1)))) == n_layers


def test_vgg_width_multiplier_scales_channels():
    assert VGG("vgg11", 3, 32, 10, width=0.5).features[0].out_channels == 32


def test_unknown_model_is_a_clear_error():
    with pytest.raises(cn.ConfigError, match="model.name"):
        cn.build_model("resnet999", (1, 28, 28), 10)
    with pytest.raises(cn.ConfigError, match="lenet5"):
        cn.build_model("lenet5", (1, 28, 28), 10, depth=3)

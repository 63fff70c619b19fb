import pytest
import torch

import correctnet as cn
from correctnet.checkpoint import CheckpointError
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


def _meta(shape=(1, 8, 8)):
    return {"model": {"name": "lenet5", "input_shape": list(shape), "num_classes": 10, "kwargs": {}},
            "variation": {"name": "lognormal", "sigma": 0.5}}


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5))
    path = cn.save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    loaded, meta = cn.load_checkpoint(path)
    assert meta["variation"]["sigma"] == 0.5
    x = torch.randn(6, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    with cn.chip(model, 42), cn.chip(loaded, 42):
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_is_not_overwritten_unless_asked(tmp_path):
    model = cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5))
    path = cn.save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    with pytest.raises(CheckpointError, match="exists"):
        cn.save_checkpoint(path, model, _meta())
    cn.save_checkpoint(path, model, _meta(), overwrite=True)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5))
    path = cn.save_checkpoint(tmp_path / "m.safetensors", model, _meta())
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        cn.load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        cn.load_checkpoint(tmp_path / "missing.safetensors")

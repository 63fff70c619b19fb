"""Per-layer device settings: analogize(..., per_layer=...) gives chosen layers their own variation model; each layer
then computes with exactly the chip weights a model analogized entirely with its settings has, and checkpoints
bring the settings back."""
import re

import pytest
import torch

import correctnet as cn
from correctnet.devices import RRAM


def _net():
    torch.manual_seed(0)
    return cn.build_model("lenet5", (1, 28, 28), 10)


FINE = RRAM(sigma=1.0, levels=16)
COARSE = RRAM(sigma=2.0, levels=4, dac_bits=6, adc_bits=6)


def _weights(model, seed):
    with cn.chip(model, seed), torch.no_grad():
        return {n: layer.weight.clone() for n, layer in cn.analog_layers(model).items()}


@pytest.mark.parametrize("per_layer", [{"fc*": COARSE}, lambda name, m: COARSE if name.startswith("fc") else None])
def test_each_layer_uses_the_chip_weights_of_its_own_settings(per_layer):
    mixed = cn.analogize(_net(), FINE, per_layer=per_layer)
    fine, coarse = cn.analogize(_net(), FINE), cn.analogize(_net(), COARSE)
    assert {n: l.variation for n, l in cn.analog_layers(mixed).items()} == {
        "conv1": FINE, "conv2": FINE, "fc1": COARSE, "fc2": COARSE, "fc3": COARSE}
    got, want_fine, want_coarse = _weights(mixed, 7), _weights(fine, 7), _weights(coarse, 7)
    for name, w in got.items():
        assert torch.equal(w, (want_coarse if name.startswith("fc") else want_fine)[name]), name
    assert not torch.equal(got["fc1"], want_fine["fc1"])  # the settings matter
    x = torch.randn(4, 1, 28, 28)
    with cn.chip(mixed, 7), torch.no_grad():
        y = mixed(x)
    with cn.chip(coarse, 7), torch.no_grad():  # the converters act per layer: only the fc layers' outputs differ
        assert not torch.equal(y, coarse(x))


def test_per_layer_settings_round_trip_through_a_checkpoint(tmp_path):
    mixed = cn.analogize(_net(), FINE, per_layer={"conv1": COARSE, "fc3": RRAM(sigma=0.5)})
    path = cn.save_checkpoint(tmp_path / "m.safetensors", mixed, {"variation": FINE.to_dict()})
    loaded, meta = cn.load_checkpoint(path)
    assert set(meta["analog"]["variations"]) == {"conv1", "fc3"}
    assert {n: l.variation for n, l in cn.analog_layers(loaded).items()} == {
        n: l.variation for n, l in cn.analog_layers(mixed).items()}
    x = torch.randn(3, 1, 28, 28)
    with cn.chip(mixed, 3), torch.no_grad():
        a = mixed(x)
    with cn.chip(loaded, 3), torch.no_grad():
        assert torch.equal(a, loaded(x))
    plain = cn.save_checkpoint(tmp_path / "p.safetensors", cn.analogize(_net(), FINE), {"variation": FINE.to_dict()})
    assert "variations" not in cn.load_checkpoint(plain)[1]["analog"]


@pytest.mark.parametrize("per_layer, needle", [({"fcx*": COARSE}, "per_layer pattern 'fcx*' matches no analog layer"),
                                               ({"fc1": "rram"}, "per_layer['fc1'] must be a VariationModel"),
                                               (lambda n, m: 3, "must return a VariationModel or None"),
                                               (5, "per_layer must map glob patterns")])
def test_bad_per_layer_settings_are_one_clear_error(per_layer, needle):
    with pytest.raises(cn.ConfigError, match=re.escape(needle)):
        cn.analogize(_net(), FINE, per_layer=per_layer)

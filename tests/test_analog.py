import pytest
import torch
from torch import nn
import torch.nn.functional as F

import correctnet as cn
from correctnet.evaluate import monte_carlo


class TinyResNet(nn.Module):
    """A model correctnet has never seen: residual blocks, BatchNorm, Conv1d-free 2D path, a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make(seed=0):
    torch.manual_seed(seed)
    m = TinyResNet()
    m.train()
    m(torch.randn(16, 1, 8, 8))  # non-trivial BatchNorm statistics
    return m.eval()


def test_injector_wraps_an_unseen_model_and_off_mode_is_exact():
    plain = make()
    model = cn.analogize(plain, cn.LogNormal(0.5))
    assert list(cn.analog_layers(model)) == ["stem", "block.0", "block.3", "head"]
    assert not cn.analog_layers(plain)  # default is a copy: the user's model is untouched
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), plain(x))


def test_include_exclude_by_name_and_type():
    m = cn.analogize(make(), cn.LogNormal(0.1), exclude=["head"])
    assert list(cn.analog_layers(m)) == ["stem", "block.0", "block.3"]
    m = cn.analogize(make(), cn.LogNormal(0.1), include=["block.*"])
    assert list(cn.analog_layers(m)) == ["block.0", "block.3"]
    m = cn.analogize(make(), cn.LogNormal(0.1), layer_types=[nn.Linear])
    assert list(cn.analog_layers(m)) == ["head"]
    m = cn.analogize(make(), cn.LogNormal(0.1), layer_types=["Conv2d"])
    assert list(cn.analog_layers(m)) == ["stem", "block.0", "block.3"]


def test_bad_selection_is_a_clear_error():
    with pytest.raises(cn.ConfigError, match="matches no"):
        cn.analogize(make(), cn.LogNormal(0.1), include=["blok.*"])
    with pytest.raises(cn.ConfigError, match="unsupported"):
        cn.analogize(make(), cn.LogNormal(0.1), layer_types=[nn.BatchNorm2d])
    with pytest.raises(cn.ConfigError, match="no analog layers"):
        cn.program_chip(make(), 0)


def test_same_seed_same_chip_different_seed_different_chip():
    model = cn.analogize(make(), cn.LogNormal(0.3))
    x = torch.randn(4, 1, 8, 8)
    with cn.chip(model, 11):
        a = model(x)
    with cn.chip(model, 11):
        b = model(x)
    with cn.chip(model, 12):
        c = model(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_chip_is_static_across_forwards_and_noisy_mode_is_not():
    model = cn.analogize(make(), cn.LogNormal(0.3))
    x = torch.randn(4, 1, 8, 8)
    cn.program_chip(model, 5)
    assert torch.equal(model(x), model(x))
    cn.set_noise_aware(model, 5)
    assert not torch.allclose(model(x), model(x))
    cn.set_nominal(model)
    assert torch.equal(model(x), make()(x))


def test_layer_draw_does_not_depend_on_other_layers():
    full = cn.analogize(make(), cn.LogNormal(0.3))
    part = cn.analogize(make(), cn.LogNormal(0.3), include=["head"])
    cn.program_chip(full, 9)
    cn.program_chip(part, 9)
    assert torch.equal(cn.analog_layers(full)["head"].analog_weight(), cn.analog_layers(part)["head"].analog_weight())


def test_nominal_weights_bit_identical_after_evaluation():
    model = cn.analogize(make(), cn.LogNormal(0.5))
    before = snapshot(model)
    data = (torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,)))
    monte_carlo(model, data, n_chips=5, seed=0, progress=False)
    assert same(before, snapshot(model))
    assert all(l.analog_mode == "off" for l in cn.analog_layers(model).values())


def test_nominal_weights_bit_identical_after_exception_mid_evaluation():
    model = cn.analogize(make(), cn.LogNormal(0.5))
    model.train()
    before = snapshot(model)
    calls = {"n": 0}

    def boom(module, inp, out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power failure")

    h = model.head.register_forward_hook(boom)
    data = (torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,)))
    with pytest.raises(RuntimeError, match="power failure"):
        monte_carlo(model, data, n_chips=5, seed=0, batch_size=16, progress=False)
    h.remove()
    assert same(before, snapshot(model))
    assert model.training  # train/eval flag restored
    assert all(l.analog_mode == "off" and l._chip_noise is None for l in cn.analog_layers(model).values())


def test_gradients_reach_nominal_weights_in_noise_aware_training():
    model = cn.analogize(make(), cn.LogNormal(0.5))
    cn.set_noise_aware(model, 0)
    model(torch.randn(4, 1, 8, 8)).square().sum().backward()
    for name, layer in cn.analog_layers(model).items():
        assert layer.nominal().grad is not None and layer.nominal().grad.abs().sum() > 0, name


def test_noise_aware_gradient_matches_chain_rule():
    lin = nn.Linear(3, 2)
    model = cn.analogize(nn.Sequential(lin), cn.LogNormal(0.4))
    layer = cn.analog_layers(model)["0"]
    cn.program_chip(model, 4)
    x = torch.randn(5, 3)
    model(x).sum().backward()
    factor = torch.exp(0.4 * layer._chip_noise)
    expected = torch.ones(5, 2).T @ x * factor  # d/dw sum(x @ (w*f)^T) = (1^T x) * f
    assert torch.allclose(layer.nominal().grad, expected, atol=1e-6)


def test_state_dict_round_trips_between_plain_and_analog():
    plain = make(1)
    model = cn.analogize(make(2), cn.LogNormal(0.5))
    cn.program_chip(model, 3)  # chip buffers must not leak into the state_dict
    assert set(model.state_dict()) == set(plain.state_dict())
    plain.load_state_dict(model.state_dict())
    assert same(plain.state_dict(), model.state_dict())
    other = cn.analogize(make(7), cn.LogNormal(0.5))
    other.load_state_dict(plain.state_dict())
    assert same(other.state_dict(), plain.state_dict())


def test_conv1d_and_digitize():
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 2))
    a = cn.analogize(m, cn.Gaussian(0.2))
    x = torch.randn(4, 2, 8)
    with cn.chip(a, 0):
        assert not torch.allclose(a(x), m(x))
    d = cn.digitize(a)
    assert type(d[0]) is nn.Conv1d and type(d[2]) is nn.Linear
    assert torch.equal(d(x), m(x))


def test_subclass_with_its_own_forward_computes_with_the_chip():
    """A Linear subclass with its own forward (timm's Linear idiom) reads the chip's weight: output and
    gradient equal an independent plain copy holding the chip's weight; the nominal weight is untouched."""
    class Weird(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight, self.bias) * 2

    torch.manual_seed(0)
    net = nn.Sequential(Weird(3, 2))
    nominal_w = net[0].weight.detach().clone()
    model = cn.analogize(net, cn.LogNormal(0.4))
    layer = cn.analog_layers(model)["0"]
    x = torch.randn(5, 3)
    cn.program_chip(model, 7)
    factor = torch.exp(0.4 * layer._chip_noise)
    plain = Weird(3, 2)
    with torch.no_grad():
        plain.weight.copy_(nominal_w * factor)
        plain.bias.copy_(layer.bias)
    out = model(x)
    assert torch.allclose(out, plain(x), atol=1e-6)
    out.sum().backward()
    plain(x).sum().backward()
    assert torch.allclose(layer.nominal().grad, plain.weight.grad * factor, atol=1e-6)  # chain rule
    cn.analog.set_nominal(model)
    assert torch.equal(layer.weight, nominal_w)



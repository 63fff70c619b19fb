import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.lipschitz import LipschitzRegularizer, error_profile, input_shapes, lipschitz_constants, operator_norm
from correctnet.training import TrainConfig, train


def conv_matrix(conv: nn.Conv2d, shape):
    """The explicit matrix of the conv operator (bias excluded) on inputs of ``shape``."""
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        out = conv._conv_forward(basis, conv.weight.double(), None)
    return out.reshape(n, -1).T


def test_linear_constant_is_the_matrix_2_norm():
    lin = nn.Linear(37, 23)
    assert operator_norm(lin) == pytest.approx(torch.linalg.matrix_norm(lin.weight.double(), 2).item(), rel=1e-12)


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1), (2, 0)])
def test_conv_constant_matches_the_explicit_operator(stride, padding):
    torch.manual_seed(stride * 10 + padding)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding)
    shape = (3, 7, 7)
    exact = torch.linalg.svdvals(conv_matrix(conv, shape))[0].item()
    assert operator_norm(conv, shape) == pytest.approx(exact, rel=1e-3)
    # the kernel-matrix norm is a different (wrong) quantity for conv: the operator norm is what we report
    assert operator_norm(conv, shape) != pytest.approx(torch.linalg.matrix_norm(conv.weight.reshape(4, -1).double(), 2).item(), rel=1e-3)


def test_constants_of_a_model_and_input_shapes():
    model = cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5))
    x = torch.randn(3, 1, 8, 8)
    assert input_shapes(model, x) == {"conv1": (1, 8, 8), "conv2": (6, 4, 4), "fc1": (64,), "fc2": (120,), "fc3": (84,)}
    consts = lipschitz_constants(model, x)
    assert list(consts) == ["conv1", "conv2", "fc1", "fc2", "fc3"] and all(c > 0 for c in consts.values())


@pytest.mark.parametrize("kind", ["relative", "orthogonal", "spectral"])
def test_regularizer_gradient_reaches_the_weights(kind):
    model = cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5))
    reg = LipschitzRegularizer(kind, strength=1.0, target=0.0 if kind == "relative" else 0.1,
                               input_shapes=input_shapes(model, torch.randn(1, 1, 8, 8)))
    reg.attach(model)
    model.train()
    model(torch.randn(4, 1, 8, 8))
    reg(model).backward()
    for name, layer in cn.analog_layers(model).items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name


def test_orthogonal_penalty_is_zero_for_orthogonal_rows():
    lin = nn.Linear(8, 4, bias=False)
    q, _ = torch.linalg.qr(torch.randn(8, 4))
    lin.weight.data = q.T.contiguous() * 2.0  # rows orthogonal, squared norm 4
    model = cn.analogize(nn.Sequential(lin), cn.LogNormal(0.1))
    assert LipschitzRegularizer("orthogonal", strength=1.0, target=4.0)(model).item() == pytest.approx(0, abs=1e-10)


def test_relative_penalty_matches_its_formula_on_a_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    model = cn.analogize(nn.Sequential(lin), cn.LogNormal(0.1))
    reg = LipschitzRegularizer("relative", strength=2.0, per_channel=False)
    reg.attach(model)
    x = torch.randn(4, 5)
    y = model.train()(x)
    got = reg(model).item()
    w = lin.weight.detach()
    expected = 2.0 * ((x.square() @ w.square().T).sum(1) / y.detach().square().sum(1)).mean().item()
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(RuntimeError, match="attach"):
        reg(model)  # terms are consumed: no forward, no penalty
    reg.detach()
    with torch.no_grad():
        model(x)
    assert not reg._terms


def test_relative_penalty_per_channel_matches_its_formula_on_a_conv_layer():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = cn.analogize(nn.Sequential(conv), cn.LogNormal(0.1))
    reg = LipschitzRegularizer("relative", strength=1.0, samples=4)  # per channel is the default
    reg.attach(model)
    x = torch.randn(6, 2, 5, 5)
    y = model.train()(x).detach()[:4]
    got = reg(model).item()
    spread = torch.nn.functional.conv2d(x[:4].square(), conv.weight.detach().square(), padding=1)
    num, den = spread.sum((0, 2, 3)), y.square().sum((0, 2, 3))
    assert got == pytest.approx((num / (den + 1e-2 * den.mean())).mean().item(), rel=1e-5)


def test_centered_relative_penalty_ignores_channel_means_that_batchnorm_removes():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = cn.analogize(nn.Sequential(conv), cn.LogNormal(0.1))
    x = torch.randn(6, 2, 5, 5)

    def penalty(centered: bool) -> float:
        reg = LipschitzRegularizer("relative", strength=1.0, samples=4, centered=centered)
        reg.attach(model)
        model.train()(x)
        value = reg(model).item()
        reg.detach()
        return value

    y = conv(x[:4]).detach()
    spread = torch.nn.functional.conv2d(x[:4].square(), conv.weight.detach().square(), padding=1)
    num, den = spread.sum((0, 2, 3)), (y - y.mean((0, 2, 3), keepdim=True)).square().sum((0, 2, 3))
    assert penalty(True) == pytest.approx((num / (den + 1e-2 * den.mean())).mean().item(), rel=1e-5)
    before = penalty(True), penalty(False)
    with torch.no_grad():
        model[0].bias.add_(5.0)  # a channel mean: the uncentered ratio falls, a following BatchNorm undoes it
    assert penalty(True) == pytest.approx(before[0], rel=1e-4)
    assert penalty(False) < 0.5 * before[1]
    with pytest.raises(cn.ConfigError, match="per_channel"):
        LipschitzRegularizer("relative", centered=True, per_channel=False)


def test_relative_penalty_predicts_the_injected_error():
    """r_l * Var(e^theta) is the expected squared relative error a layer injects (first layer: exact input)."""
    torch.manual_seed(0)
    lin = nn.Linear(50, 20, bias=False)
    model = cn.analogize(nn.Sequential(lin), cn.LogNormal(0.3))
    reg = LipschitzRegularizer("relative", strength=1.0, per_channel=False)
    reg.attach(model)
    x = torch.randn(1, 50)
    model(x)
    r = reg(model).item()
    var = (torch.exp(torch.tensor(0.3 ** 2)) - 1) * torch.exp(torch.tensor(0.3 ** 2))  # Var(e^theta)
    with torch.no_grad():
        y = model(x)
        errs = []
        for i in range(400):
            with cn.chip(model, i):
                errs.append(((model(x) - y).square().sum() / y.square().sum()).item())
    mean_dev = torch.exp(torch.tensor(0.3 ** 2 / 2)) - 1  # E[e^theta] - 1 adds a deterministic part
    expected = r * var.item() + mean_dev.item() ** 2
    assert sum(errs) / len(errs) == pytest.approx(expected, rel=0.15)


def test_relative_penalty_survives_in_place_activations():
    model = cn.analogize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)), cn.LogNormal(0.1))
    reg = LipschitzRegularizer("relative", strength=1.0)
    reg.attach(model)
    loss = model.train()(torch.randn(5, 4)).sum() + reg(model)
    loss.backward()
    assert model[0].weight.grad is not None


def test_bad_regularizer_settings():
    with pytest.raises(cn.ConfigError, match="kind"):
        LipschitzRegularizer("frobenius")
    with pytest.raises(cn.ConfigError, match="strength"):
        LipschitzRegularizer(strength=-1)


def _digits_run(reg_kind=None):
    from correctnet.data import load_dataset
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = cn.analogize(cn.build_model("lenet5", data.input_shape, 10), cn.LogNormal(0.5))
    reg = None
    if reg_kind:
        reg = LipschitzRegularizer(reg_kind, strength=0.5, target=0.25 if reg_kind == "orthogonal" else 1.0,
                                   input_shapes=input_shapes(model, data.train.tensors[0][:1]))
    train(model, data.train, None, TrainConfig(epochs=4, lr=3e-3), regularizer=reg, progress=False)
    return model, data


@pytest.mark.parametrize("kind", ["orthogonal", "spectral"])
def test_training_with_the_regularizer_lowers_the_measured_constants(kind):
    plain, data = _digits_run()
    reg, _ = _digits_run(kind)
    x = data.train.tensors[0][:1]
    a, b = lipschitz_constants(plain, x), lipschitz_constants(reg, x)
    assert max(b.values()) < max(a.values())
    assert sum(b.values()) < sum(a.values())


def test_error_profile_is_reproducible_and_grows_with_sigma():
    model = cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.2))
    x = torch.randn(32, 1, 8, 8)
    p1 = error_profile(model, x, n_chips=5, seed=1)
    assert list(p1) == ["conv1", "conv2", "fc1", "fc2", "fc3", "output"]
    assert p1 == error_profile(model, x, n_chips=5, seed=1)
    cn.set_variation(model, cn.LogNormal(0.6))
    p2 = error_profile(model, x, n_chips=5, seed=1)
    assert all(p2[k]["mean"] > p1[k]["mean"] for k in p1)


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.ConvTranspose2d(2, 3, 3), nn.Embedding(5, 4)])
def test_operator_norm_of_an_unsupported_layer_is_a_clear_error(layer):
    from correctnet.errors import ConfigError

    with pytest.raises(ConfigError, match="operator_norm supports Linear and Conv1d/2d/3d layers"):
        operator_norm(layer, (2, 5, 5))

"""Compensation modules: no-op when fresh, nominal weights untouched, held-out chips, calibration, overhead."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.calibration import (CalibrationConfig, ChipCalibrator, CompensationConfig, calibration_images,
                                    check_compensation, reestimate_batchnorm, train_compensation)
from correctnet.compensation import (attach_compensation, attach_from_spec, bypass, compensation_spec, compensators,
                                     detach_compensation, overhead, resolve_placement)
from correctnet.seeding import Stream, stream_of


class TinyNet(nn.Module):
    """Conv + BatchNorm + Linear on [N, 3, 4, 4]: every kind of layer the compensators must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _tiny(sigma: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():  # non-trivial BatchNorm state
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return cn.analogize(m, cn.LogNormal(sigma)).eval()


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g)


def _nominal_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".compensator." not in k}


@pytest.mark.parametrize("kind", ["input", "output"])
@pytest.mark.parametrize("affine", [True, False])
def test_fresh_compensator_changes_no_output(kind, affine):
    model = _tiny()
    x, _ = _data(32)
    with torch.no_grad():
        before_nominal = model(x)
        with cn.chip(model, 7):
            before_chip = model(x)
        attach_compensation(model, "all", kind=kind, rank=3, affine=affine)
        assert torch.equal(model(x), before_nominal)
        with cn.chip(model, 7):
            assert torch.equal(model(x), before_chip)


def test_compensator_is_trainable_and_bypass_and_detach_restore_the_network():
    model = _tiny()
    x, _ = _data(32)
    with torch.no_grad():
        ref = model(x)
    comps = attach_compensation(model, ["fc"], rank=2)
    with torch.no_grad():
        for p in comps["fc"].parameters():
            p.add_(0.1)
        assert not torch.equal(model(x), ref)
        with bypass(model):
            assert torch.equal(model(x), ref)
        assert not torch.equal(model(x), ref)  # bypass is restored on exit
        detach_compensation(model)
        assert torch.equal(model(x), ref)
    assert compensators(model) == {}


def test_placement_forms():
    model = _tiny()
    assert resolve_placement(model, "all", 3) == {"conv": 3, "fc": 3}
    assert resolve_placement(model, "none") == {}
    assert resolve_placement(model, ["f*"], 2) == {"fc": 2}
    assert resolve_placement(model, {"fc": 1, "conv": 5}) == {"conv": 5, "fc": 1}  # module order
    attach_compensation(model, {"conv": 2}, kind="input")
    spec = compensation_spec(model)
    assert spec == {"conv": {"kind": "input", "rank": 2, "affine": True}}
    other = _tiny()
    attach_from_spec(other, spec)
    assert compensation_spec(other) == spec
    assert compensation_spec(_tiny()) is None


def test_bad_compensation_input_is_refused_clearly():
    model = _tiny()
    with pytest.raises(cn.ConfigError, match="matches no analog layer"):
        attach_compensation(model, ["fc9"])
    with pytest.raises(cn.ConfigError, match="kind must be one of"):
        attach_compensation(model, "all", kind="sideways")
    with pytest.raises(cn.ConfigError, match="rank must be an integer >= 0"):
        attach_compensation(model, "all", rank=-1)
    with pytest.raises(cn.ConfigError, match="would do nothing"):
        attach_compensation(model, "all", rank=0, affine=False)
    attach_compensation(model, ["fc"])
    with pytest.raises(cn.ConfigError, match="already have a compensator"):
        attach_compensation(model, "all")
    with pytest.raises(cn.ConfigError, match="have no compensator"):
        detach_compensation(model, ["conv"])
    with pytest.raises(cn.ConfigError, match="detach them first"):
        cn.digitize(model)
    with pytest.raises(cn.ConfigError, match="no analog layers"):
        attach_compensation(TinyNet(), "all")
    with pytest.raises(cn.ConfigError, match="no compensation modules"):
        train_compensation(_tiny(), _data(), CompensationConfig())
    with pytest.raises(cn.ConfigError, match="compensation.lr must be a number > 0"):
        CompensationConfig(lr=0)
    with pytest.raises(cn.ConfigError, match="compensation.distill must be a number in"):
        CompensationConfig(distill=2)
    with pytest.raises(cn.ConfigError, match="calibration.steps must be an integer >= 0"):
        CalibrationConfig(steps=-1)
    with pytest.raises(cn.ConfigError, match="exceeds the 256 training images"):
        calibration_images(_data(), 1000, 0)
    plain = cn.analogize(nn.Sequential(nn.Linear(4, 4)), cn.LogNormal(0.5))
    with pytest.raises(cn.ConfigError, match="nothing to adjust"):
        ChipCalibrator(plain, torch.randn(8, 4), CalibrationConfig())


def test_overhead_matches_a_hand_count():
    model = _tiny()
    attach_compensation(model, {"conv": 2}, kind="input")
    attach_compensation(model, {"fc": 2}, kind="output")
    ov = overhead(model, torch.randn(1, 3, 4, 4))
    # network: conv 8*3*9 + 8 = 224, bn 16, fc 128*10 + 10 = 1290 parameters;
    # MACs: conv 16 pixels * 8 * 27 = 3456, fc 1280
    assert ov["network"] == {"params": 224 + 16 + 1290, "macs": 3456 + 1280}
    # input branch on conv: down 3x3 conv 3->2 (54), up 1x1 2->8 (16), gamma (8); beta joins conv's bias register;
    # MACs: down 16 * 2 * 27 = 864, up 16 * 8 * 2 = 256, scale 8 * 16 = 128
    assert ov["layers"]["conv"]["params"] == 54 + 16 + 8
    assert ov["layers"]["conv"]["macs"] == 864 + 256 + 128
    # output branch on fc: down 10->2 (20), up 2->10 (20), gamma (10); MACs 20 + 20 + 10
    assert ov["layers"]["fc"]["params"] == 50
    assert ov["layers"]["fc"]["macs"] == 50
    assert ov["total"]["params"] == 128 and ov["total"]["macs"] == 1298
    assert ov["total"]["params_pct"] == pytest.approx(100 * 128 / 1530)
    assert ov["total"]["macs_pct"] == pytest.approx(100 * 1298 / 4736)
    assert ov["layers"]["fc"]["params_pct"] == pytest.approx(100 * 50 / 1530)
    # a layer without a bias needs a register for the shift: beta counts
    nobias = cn.analogize(nn.Sequential(nn.Linear(4, 6, bias=False)), cn.LogNormal(0.5))
    attach_compensation(nobias, {"0": 0})
    assert overhead(nobias, torch.randn(1, 4))["layers"]["0"]["params"] == 12


def test_chip_agnostic_training_touches_only_the_compensators_and_uses_held_out_chips():
    model = _tiny()
    attach_compensation(model, "all", rank=2)
    before = _nominal_state(model)
    comp_before = {k: v.clone() for k, v in model.state_dict().items() if ".compensator." in k}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    res = train_compensation(model, _data(), CompensationConfig(steps=8, batch_size=64, seed=0), progress=False)
    after = model.state_dict()
    for k, v in before.items():  # nominal weights and BatchNorm statistics: bit-identical
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], v) for k, v in comp_before.items())  # the compensators did learn
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training
    # one fresh chip per batch, all from the COMPENSATION stream, none an evaluation chip of the same seed
    assert res.steps == len(res.chip_seeds) == 2 * 4 and len(set(res.chip_seeds)) == 8
    assert {stream_of(s) for s in res.chip_seeds} == {Stream.COMPENSATION}
    mc = cn.monte_carlo(model, _data(64, seed=1), n_chips=50, seed=0, progress=False)
    assert not set(res.chip_seeds) & set(mc.chip_seeds)
    assert all(layer.analog_mode == "off" for layer in cn.analog_layers(model).values())


def test_per_chip_calibration_leaves_the_model_as_it_was_and_reads_no_test_data():
    model = _tiny()
    attach_compensation(model, "all", rank=2)
    train_data = _data(256, seed=0)
    images = calibration_images(train_data, 64, seed=0)
    cal = ChipCalibrator(model, images, CalibrationConfig(steps=5, batch_size=32, n_images=64))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[dict[str, torch.Tensor]] = []

    def spy(m: nn.Module, seed: int) -> None:
        cal(m, seed)
        seen.append({k: v.clone() for k, v in m.state_dict().items()})

    cn.monte_carlo(model, _data(128, seed=1), n_chips=3, seed=0, progress=False, calibrate=spy)
    states_a = seen[:]
    seen.clear()
    cn.monte_carlo(model, _data(128, seed=2), n_chips=3, seed=0, progress=False, calibrate=spy)
    # other test data, same chips: calibration did exactly the same (it never sees the test data)
    for a, b in zip(states_a, seen):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # calibration changed the chip's compensators and BatchNorm statistics, not the nominal weights
    nominal_keys = [k for k in before if ".compensator." not in k and "bn." not in k]
    assert all(torch.equal(states_a[0][k], before[k]) for k in nominal_keys)
    assert not torch.equal(states_a[0]["bn.running_mean"], before["bn.running_mean"])
    assert not torch.equal(states_a[0]["fc.compensator.gamma"], before["fc.compensator.gamma"])
    assert not torch.equal(states_a[0]["fc.compensator.gamma"], states_a[1]["fc.compensator.gamma"])  # per chip
    # and the model is back to its state before the evaluation
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert cal.stats()["chips"] == 6 and cal.stats()["seconds_per_chip"] > 0


def test_batchnorm_reestimation_is_the_exact_average_under_the_chip():
    model = _tiny()
    x, _ = _data(96)
    with cn.chip(model, 3):
        reestimate_batchnorm(model, x, batch_size=96)
        with torch.no_grad():
            h = model.conv(x)
    assert torch.allclose(model.bn.running_mean, h.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(model.bn.running_var, h.var((0, 2, 3), unbiased=True), atol=1e-5)
    assert model.bn.momentum == 0.1 and not model.bn.training


@pytest.fixture(scope="module")
def digits_lenet():
    """LeNet-5 trained the plain way on digits (a few seconds)."""
    from correctnet.data import load_dataset
    from correctnet.training import TrainConfig, train

    data = load_dataset("digits", None, val_fraction=0.1, seed=0)
    torch.manual_seed(0)
    model = cn.analogize(cn.build_model("lenet5", data.input_shape, data.num_classes), cn.LogNormal(0.5))
    train(model, data.train, None, TrainConfig(epochs=15, seed=0), progress=False)
    return model, data


@pytest.mark.slow
def test_compensation_recovers_accuracy_on_held_out_chips(digits_lenet):
    base, data = digits_lenet
    none = cn.monte_carlo(base, data.test, n_chips=20, seed=0, progress=False)
    model = copy.deepcopy(base)
    attach_compensation(model, "all", rank=4)
    train_compensation(model, data.train, CompensationConfig(steps=500, lr=1e-2, batch_size=64), progress=False)
    agnostic = cn.monte_carlo(model, data.test, n_chips=20, seed=0, progress=False)
    cal = ChipCalibrator(model, calibration_images(data.train, 500, 0), CalibrationConfig(steps=40, lr=1e-2))
    calibrated = cn.monte_carlo(model, data.test, n_chips=20, seed=0, progress=False, calibrate=cal)
    # paired chips (same evaluation seeds): per-chip gains, and their standard error
    def gain(a, b):
        d = torch.tensor(a.accuracies) - torch.tensor(b.accuracies)
        return d.mean().item(), (d.std() / len(d) ** 0.5).item()

    g_agn, se_agn = gain(agnostic, none)
    g_cal, se_cal = gain(calibrated, none)
    assert g_agn > 0, (none.summary(), agnostic.summary())
    assert g_cal > 3 * se_cal and g_cal > 0.05, (none.summary(), calibrated.summary())
    assert calibrated.p5 > none.p5 + 0.05


def test_check_compensation_resets_compensators_that_hurt_on_validation_chips(digits_lenet):
    base, data = digits_lenet
    model = copy.deepcopy(base)
    attach_compensation(model, "all", rank=2)
    kept = check_compensation(model, data.val, chips=4)
    assert kept["kept"] and kept["with"] == kept["without"]  # a no-op is kept (it cannot hurt)
    with torch.no_grad():
        compensators(model)["fc3"].beta.copy_(torch.linspace(-20, 20, 10))  # a harmful correction
    rejected = check_compensation(model, data.val, chips=4)
    assert not rejected["kept"] and rejected["with"] < rejected["without"]
    assert rejected["images"] == len(data.val)
    x = data.test.tensors[0][:64]
    with torch.no_grad(), cn.chip(model, 3):
        with bypass(model):
            plain = model.eval()(x)
        assert torch.equal(model(x), plain)  # zeroed: an exact no-op again
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in _nominal_state(model).items())


@pytest.mark.parametrize("layer, x", [
    (nn.Conv1d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 9)),
    (nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), padding_mode="circular"), torch.randn(2, 3, 7, 6)),
    (nn.Conv2d(4, 4, 3, groups=4, dilation=2), torch.randn(2, 4, 9, 9)),
    (nn.Conv3d(2, 4, 3, padding=1), torch.randn(2, 2, 4, 4, 4)),
    (nn.Linear(5, 3), torch.randn(2, 7, 5)),  # extra leading dims
])
@pytest.mark.parametrize("kind", ["input", "output"])
def test_every_layer_geometry_gets_a_matching_branch(layer, x, kind):
    model = cn.analogize(nn.Sequential(layer), cn.LogNormal(0.3))
    with torch.no_grad():
        y = model(x)
        comp = attach_compensation(model, "all", kind=kind, rank=2)["0"]
        assert torch.equal(model(x), y)
        for p in comp.parameters():
            p.add_(0.05)
        z = model(x)
    assert z.shape == y.shape and not torch.equal(z, y)


def test_the_teacher_is_the_clean_network_with_clean_batchnorm_statistics():
    from correctnet.calibration import teacher_logits

    model = _tiny()  # running statistics that do not describe the nominal network (as after noise-aware training)
    attach_compensation(model, "all", rank=2)
    x, _ = _data(128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = teacher_logits(model, x, batch_size=128)
    ref = copy.deepcopy(model)
    detach_compensation(ref)
    with torch.no_grad():
        h = ref.conv(x)
        ref.bn.running_mean.copy_(h.mean((0, 2, 3)))
        ref.bn.running_var.copy_(h.var((0, 2, 3), unbiased=True))
        expected = ref(x)
    assert torch.allclose(t, expected, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the student is untouched


@pytest.mark.parametrize("layer, x", [
    (nn.Conv2d(3, 6, 3, padding=1), torch.randn(4, 3, 5, 5)),
    (nn.Conv1d(3, 5, 3), torch.randn(4, 3, 9)),
    (nn.Linear(7, 5), torch.randn(4, 7)),
])
@pytest.mark.parametrize("affine", [True, False])
def test_folded_output_compensator_is_the_same_function_and_training_uses_the_factors(layer, x, affine):
    model = cn.analogize(nn.Sequential(layer), cn.LogNormal(0.3))
    comp = attach_compensation(model, "all", kind="output", rank=2, affine=affine)["0"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in comp.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cn.program_chip(model, 5)
    out = model(x)  # gradients on: the factorized modules
    out.square().sum().backward()
    assert comp.down.weight.grad is not None and comp.up.weight.grad.abs().sum() > 0
    with torch.no_grad():
        folded = model(x)
    torch.testing.assert_close(folded, out.detach(), rtol=1e-5, atol=1e-6)
    assert overhead(model, x[:1])["layers"]["0"]["macs"] > 0  # counted on the factors, not the folded map


def test_calibration_start_state_zero_trained_or_the_better_of_the_two():
    model = _tiny()
    attach_compensation(model, "all", rank=2)
    with torch.no_grad():  # a deliberately harmful chip-agnostic state
        compensators(model)["fc"].beta.copy_(torch.linspace(-20, 20, 10))
    images = calibration_images(_data(256, seed=0), 64, seed=0)
    trained_state = {k: v.clone() for k, v in model.state_dict().items()}
    starts: dict[str, dict[str, torch.Tensor]] = {}
    for start in ("trained", "zero", "best"):
        cal = ChipCalibrator(model, images, CalibrationConfig(steps=1, lr=1e-12, n_images=64, start=start, teacher="self"))
        with cn.chip(model, 5):
            cal(model, 5)
        starts[start] = {k: v.clone() for k, v in model.state_dict().items()}
        assert cal.stats()["started_from_zero"] == (start != "trained")  # "best" rejects the harmful state
        model.load_state_dict(trained_state)
    betas = {s: st["fc.compensator.beta"] for s, st in starts.items()}
    assert torch.allclose(betas["trained"], torch.linspace(-20, 20, 10), atol=1e-6)
    assert torch.allclose(betas["zero"], torch.zeros(10), atol=1e-6)
    assert all(torch.equal(starts["zero"][k], starts["best"][k]) for k in starts["zero"])
    # a compensator zeroed this way is again an exact no-op
    with torch.no_grad():
        comp = compensators(model)["fc"]
        comp.zero_()
        y = torch.randn(4, 10)
        assert torch.equal(comp(torch.randn(4, 128), y), y)
    with pytest.raises(cn.ConfigError, match="start"):
        CalibrationConfig(start="random")

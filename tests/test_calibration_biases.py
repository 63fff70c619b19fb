"""Per-chip calibration of the analog layers' digital biases (``CalibrationConfig.biases``).

The references are independent: a plain copy of each chip (``chip_copy``: ordinary Linear/Conv layers holding the
chip's weights) with the biases calibration fitted for it, against the analog model calibrating K chips at once.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.calibration import (CalibrationConfig, ChipCalibrator, calibrate_chip, calibration_state,
                                    load_calibrated_chip, save_calibrated_chip)
from correctnet.compensation import attach_compensation
from correctnet.errors import ConfigError
from correctnet.seeding import Stream, chip_seed
from correctnet.tensors import eval_mode

SEEDS = [chip_seed(Stream.EVAL, 0, i) for i in range(3)]
BIASED = ["0.bias", "5.bias"]  # the layers without a compensator; "3" has one


def _model(compensated: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(),
                        nn.Linear(8, 5))
    model = cn.analogize(net, cn.LogNormal(0.5))
    if compensated:
        attach_compensation(model, ["3"], kind="output", rank=1)
    return model


def _calibrator(model: nn.Module, biases: bool = True, steps: int = 8) -> ChipCalibrator:
    images = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = CalibrationConfig(steps=steps, n_images=48, batch_size=16, teacher="self", start="trained", biases=biases)
    return ChipCalibrator(model, images, cfg)


def test_fits_only_the_biases_of_layers_without_a_compensator_and_alters_no_nominal_weight():
    model = _model()
    nominal = {k: v.clone() for k, v in model.state_dict().items()}
    state = calibrate_chip(model, SEEDS[0], _calibrator(model))
    assert set(BIASED) <= state.keys() and "3.bias" not in state
    for k in BIASED:
        assert not torch.allclose(state[k], nominal[k], atol=1e-4), k  # each chip gets its own biases
    for k, v in model.state_dict().items():
        assert torch.equal(v, nominal[k]), k  # the model is left as it was
    off = calibrate_chip(model, SEEDS[0], _calibrator(model, biases=False))
    assert not set(BIASED) & off.keys()
    assert calibration_state(model).keys() == off.keys()


def test_fitted_biases_bring_the_chip_closer_to_its_teacher():
    model = _model()
    cal_on, cal_off = _calibrator(model, steps=30), _calibrator(model, biases=False, steps=30)
    x = cal_on.images
    with torch.no_grad():
        teacher = cal_on.teacher

    def kd(state: dict[str, torch.Tensor]) -> float:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict({**saved, **state})
        with torch.no_grad(), eval_mode(model), cn.chip(model, SEEDS[1]):
            loss = torch.nn.functional.kl_div(model(x).log_softmax(1), teacher.log_softmax(1), log_target=True,
                                              reduction="batchmean").item()
        model.load_state_dict(saved)
        return loss

    on, off = kd(calibrate_chip(model, SEEDS[1], cal_on)), kd(calibrate_chip(model, SEEDS[1], cal_off))
    assert on < 0.9 * off, (on, off)


def test_k_chips_at_once_equal_plain_copies_holding_each_chips_weights_and_fitted_biases():
    model = _model(compensated=False)  # a plain copy holds no compensator: every layer's bias is fitted
    cal = _calibrator(model)
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    states = [calibrate_chip(model, s, cal) for s in SEEDS]  # one chip at a time
    nominal = {k: v.clone() for k, v in model.state_dict().items()}
    refs = []
    for s, st in zip(SEEDS, states):  # independent reference: a plain network per chip
        model.load_state_dict({**nominal, **st})
        plain = cn.chip_copy(model, s)
        assert not cn.analog_layers(plain)
        with torch.no_grad():
            refs.append(plain.eval()(x))
        model.load_state_dict(nominal)
    assert cal.bias_layers == 3 and all(f"{n}.bias" in states[0] for n in ("0", "3", "5"))
    with torch.no_grad(), eval_mode(model), cal.chips(model, SEEDS) as m:
        out = m(x.repeat(3, 1, 1, 1))
    for i in range(3):
        torch.testing.assert_close(out[i * 10:(i + 1) * 10], refs[i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(refs[0], refs[1], atol=1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, nominal[k]), k


def test_monte_carlo_chip_accuracies_do_not_depend_on_chips_per_pass():
    model = _model()
    cal = _calibrator(model)
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x).argmax(1)
    single = cn.monte_carlo(model, (x, y), n_chips=4, progress=False, calibrate=cal, chips_per_pass=1)
    batched = cn.monte_carlo(model, (x, y), n_chips=4, progress=False, calibrate=cal, chips_per_pass=4)
    assert batched.accuracies == single.accuracies
    assert cal.stats()["bias_layers"] == 2


def test_exported_chip_replays_its_fitted_biases(tmp_path):
    model = _model()
    cal = _calibrator(model)
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad(), eval_mode(model), cn.chip(model, SEEDS[2]):
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        cal(model, SEEDS[2])
        want = model(x)
        model.load_state_dict(snapshot)
    path = save_calibrated_chip(tmp_path / "chip.safetensors", model, SEEDS[2], cal)
    fresh = _model()
    assert load_calibrated_chip(fresh, path) == SEEDS[2]
    assert not torch.equal(fresh[5].bias, model[5].bias)
    with torch.no_grad(), eval_mode(fresh), cn.chip(fresh, SEEDS[2]):
        assert torch.equal(fresh(x), want)


def test_bad_or_empty_settings_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="calibration.biases"):
        CalibrationConfig(biases="yes")  # type: ignore[arg-type]
    plain = cn.analogize(nn.Sequential(nn.Linear(4, 3)), cn.LogNormal(0.5))
    images = torch.randn(8, 4)
    ChipCalibrator(plain, images, CalibrationConfig(steps=2, n_images=8, teacher="self", biases=True))
    with pytest.raises(ConfigError, match="nothing to adjust"):
        ChipCalibrator(plain, images, CalibrationConfig(steps=2, n_images=8, teacher="self"))


def test_chip_workers_fit_the_same_biases_and_report_them():
    model = _model()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = model(x).argmax(1)
    runs = []
    for workers in (1, 2):
        cal = _calibrator(model)
        r = cn.monte_carlo(model, (x, y), n_chips=4, progress=False, calibrate=cal, chips_per_pass=1, workers=workers)
        runs.append((r.accuracies, cal.stats()["bias_layers"]))
    assert runs[0] == runs[1] and runs[0][1] == 2


def test_evaluate_cli_accepts_every_calibration_setting():
    from correctnet.evaluate.cli import parse_args

    opts = parse_args(["checkpoint=x.safetensors", "calibration=per_chip", "calibration.biases=true"])
    assert opts["calibration.biases"] == "true"
    with pytest.raises(ConfigError, match="unknown key 'calibration.bias'"):
        parse_args(["checkpoint=x.safetensors", "calibration=per_chip", "calibration.bias=true"])

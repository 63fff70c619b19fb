"""Training on several chips per step: noise-aware forwards with K fresh chips, and compensation training
on K seeded chips, each chip computing its own share of the batch.

The reference for K chips in one forward is K one-chip forwards, one per group of the batch: every layer
draws from its own generator, chip by chip, so the two must give the same outputs and gradients.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.analog import analog_layers, chip, chips, noise_aware
from correctnet.calibration import CompensationConfig, train_compensation
from correctnet.compensation import attach_compensation, compensation_parameters
from correctnet.errors import ConfigError
from correctnet.seeding import Stream, chip_seed
from correctnet.training import TrainConfig, train

from test_batched_chips import MODELS, VARIATIONS, _analog

KINDS = ["linear", "conv1d", "conv2d", "conv3d", "mha", "mha_seq_first", "mha_kdim", "transformer", "lstm", "gru", "rnn"]
assert set(KINDS) == set(MODELS)  # every layer kind the batched evaluation covers


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _k_forward(model, x, k, seed=11):
    model.zero_grad()
    with noise_aware(model, seed, chips=k):
        out = model(x)
    out.square().sum().backward()
    return out.detach(), _grads(model)


def _one_chip_forwards(model, groups, seed=11):
    model.zero_grad()
    with noise_aware(model, seed):
        outs = [model(g) for g in groups]
    out = torch.cat(outs)
    out.square().sum().backward()
    return out.detach(), _grads(model)


@pytest.mark.parametrize("variation", ["lognormal", "rram_read"])
@pytest.mark.parametrize("kind", KINDS)
def test_k_chips_per_forward_equal_k_one_chip_forwards(kind, variation):
    model, x = _analog(kind, VARIATIONS[variation])
    nominal = {n: v.clone() for n, v in model.state_dict().items()}
    x = torch.cat([x, x[:1]])  # 7 samples, 3 chips: groups of 3, 2, 2 (nearly equal, in order)
    got, g_got = _k_forward(model, x, 3)
    ref, g_ref = _one_chip_forwards(model, x.tensor_split(3))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert g_got.keys() == g_ref.keys() and g_got
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], atol=1e-4, rtol=1e-4)
    first = model(x[:3]).detach()
    assert not torch.allclose(got[:3], first, atol=1e-3)  # the chips are not the nominal model
    for n, v in model.state_dict().items():
        assert torch.equal(v, nominal[n]), n
    assert all(l.analog_mode == "off" and l.noisy_chips == 1 for l in analog_layers(model).values())


def test_each_sample_on_its_own_chip():
    model, _ = _analog("linear", VARIATIONS["lognormal"])
    x = torch.randn(1, 12).repeat(5, 1)  # five copies of one sample
    with noise_aware(model, 3, chips=8), torch.no_grad():  # more chips than samples: one chip per sample
        out = model(x)
    assert len({tuple(o.tolist()) for o in out}) == 5  # five different chips
    with noise_aware(model, 3), torch.no_grad():
        one = model(x)
    assert torch.allclose(one, one[:1].expand_as(one))  # one chip per forward: the same output five times
    torch.testing.assert_close(out[0], one[0])  # chip 0 of the stream is the first one-chip draw


def test_one_chip_per_forward_draws_what_it_always_did():
    model, x = _analog("conv2d", VARIATIONS["rram_read"])
    with noise_aware(model, 5), torch.no_grad():
        a = model(x)
    with noise_aware(model, 5, chips=1), torch.no_grad():
        b = model(x)
    assert torch.equal(a, b)


def test_bad_chips_per_forward():
    model, _ = _analog("linear", VARIATIONS["lognormal"])
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="chips per noise-aware forward"):
            cn.set_noise_aware(model, 0, bad)
    with pytest.raises(ConfigError, match="chips_per_step"):
        TrainConfig(chips_per_step=0, noise_aware=True)
    with pytest.raises(ConfigError, match="compensation.chips_per_step"):
        CompensationConfig(chips_per_step=0)


def test_train_with_chips_per_step_uses_k_chips_each_step():
    torch.manual_seed(0)
    x, y = torch.randn(96, 12), torch.randint(0, 5, (96,))
    base, _ = _analog("linear", VARIATIONS["lognormal"])
    calls: list[int] = []
    for layer in analog_layers(base).values():
        orig = layer._noisy_draw
        layer._noisy_draw = lambda w, orig=orig: (calls.append(1), orig(w))[1]  # count fresh chips drawn
    cfg = TrainConfig(epochs=1, batch_size=32, noise_aware=True, chips_per_step=4, lr=1e-2)
    m1 = _analog("linear", VARIATIONS["lognormal"])[0]
    m1.load_state_dict(base.state_dict())
    train(base, (x, y), None, cfg, progress=False)
    assert len(calls) == 3 * 2 * 4  # 3 steps x 2 analog layers x 4 chips
    train(m1, (x, y), None, dataclasses.replace(cfg, chips_per_step=1), progress=False)
    assert not torch.equal(base[0].weight, m1[0].weight)  # another gradient: K chips, not one
    assert all(l.analog_mode == "off" for l in analog_layers(base).values())


def test_chips_per_step_keys_reach_the_pipeline():
    from test_training_options import compose_job

    job = compose_job("method=correctnet", "training.chips_per_step=8", "compensation.chips_per_step=4")
    assert job.tcfg.chips_per_step == 8 and job.tcfg.noise_aware
    assert job.comp_cfg.chips_per_step == 4
    assert compose_job("method=noise_aware").tcfg.chips_per_step == 8  # the preset's
    assert compose_job("method=vanilla").tcfg.chips_per_step == 1
    assert compose_job("method=correctnet", "training.noise_aware=false").tcfg.chips_per_step == 8  # then unused


def test_uneven_chips_give_each_group_its_chip():
    model, _ = _analog("conv2d", VARIATIONS["rram_read"])
    x = torch.randn(7, 3, 8, 8)
    seeds = [chip_seed(Stream.COMPENSATION, 0, i) for i in range(3)]
    with chips(model, seeds, uneven=True), torch.no_grad():
        got = model(x)
    ref = []
    for s, g in zip(seeds, x.tensor_split(3)):
        with chip(model, s), torch.no_grad():
            ref.append(model(g))
    torch.testing.assert_close(got, torch.cat(ref), atol=1e-5, rtol=1e-5)
    with chips(model, seeds), pytest.raises(ConfigError, match="K groups"):
        model(x)  # equal groups (evaluation) stay strict


def test_compensation_training_with_chips_per_step():
    model, _ = _analog("conv2d", VARIATIONS["lognormal"])
    attach_compensation(model, "all", kind="output", rank=2)
    torch.manual_seed(1)
    x, y = torch.randn(50, 3, 8, 8), torch.randint(0, 5, (50,))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = CompensationConfig(steps=4, batch_size=20, chips_per_step=3, check_chips=0)
    res = train_compensation(model, (x, y), cfg, progress=False)
    # steps 0, 1, 3 take 20 images on 3 chips; step 2 takes the pass's last 10 images, also on 3 chips
    assert res.steps == 4
    assert res.chip_seeds == [chip_seed(Stream.COMPENSATION, 0, i) for i in range(12)]
    comp = {id(p) for p in compensation_parameters(model)}
    for n, p in model.named_parameters():
        assert torch.equal(p, start[n]) == (id(p) not in comp), n  # only the compensators trained
    one = CompensationConfig(steps=4, batch_size=20, check_chips=0)
    model2, _ = _analog("conv2d", VARIATIONS["lognormal"])
    attach_compensation(model2, "all", kind="output", rank=2)
    assert len(train_compensation(model2, (x, y), one, progress=False).chip_seeds) == 4


# ----------------------------------------------------------------------------- per-chip calibration, K chips at once

def _calibration_setup(start="best", channels_last=False):
    from correctnet.calibration import CalibrationConfig, ChipCalibrator

    model, _ = _analog("conv2d", VARIATIONS["rram_read"])  # BatchNorm, grouped convs, read noise
    attach_compensation(model, ["body.0"], kind="output", rank=2)
    attach_compensation(model, ["body.4", "fc"], kind="input", rank=1)
    with torch.no_grad():  # a non-trivial chip-agnostic state: "best" must pick per chip
        for p in compensation_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images = torch.randn(48, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    if channels_last:  # as the datasets' images can be: the K copies must keep the layout (same BatchNorm sums)
        images = images.contiguous(memory_format=torch.channels_last)
    cfg = CalibrationConfig(steps=6, n_images=48, batch_size=16, teacher="self", start=start)
    return model, ChipCalibrator(model, images, cfg)


@pytest.mark.parametrize("start,channels_last", [("best", False), ("zero", False), ("best", True)])
def test_k_chips_calibrated_at_once_equal_one_by_one(start, channels_last):
    from correctnet.calibration import calibration_state
    from correctnet.tensors import eval_mode

    model, cal = _calibration_setup(start, channels_last)
    seeds = [chip_seed(Stream.EVAL, 0, i) for i in range(3)]
    nominal = {n: v.clone() for n, v in model.state_dict().items()}
    x = torch.randn(10, 3, 8, 8)
    ref, ref_out = [], []
    for s in seeds:  # one by one, as monte_carlo runs them: calibrate the programmed chip, then read it
        with eval_mode(model), chip(model, s):
            cal(model, s)
            ref.append(calibration_state(model))
            ref_out.append(model(x))
        model.load_state_dict(nominal)
    one_starts = list(cal.starts)
    with eval_mode(model), cal.chips(model, seeds) as m:
        out = m(x.repeat(3, 1, 1, 1))
        wrappers = {n: w for n, w in m.named_modules() if type(w).__name__ == "_PerChip"}
        got = [{f"{n}.{k}": v.clone() for n, w in wrappers.items() for k, v in w.copies[i].state_dict().items()}
               for i in range(3)]
    assert cal.starts[3:] == one_starts and len(cal.seconds) == 6
    assert {type(w.copies[0]).__name__ for w in wrappers.values()} == {"Compensator", "BatchNorm2d"}
    assert len(wrappers) == 4  # three compensators and the BatchNorm, each copied per chip
    for i, s in enumerate(seeds):  # each chip's copies hold exactly what calibrating it alone gives
        assert ref[i].keys() <= got[i].keys()
        for key, v in ref[i].items():
            assert torch.equal(got[i][key], v), f"chip {i}: {key}"  # the same computation, bit for bit
        assert torch.equal(out[i * 10:(i + 1) * 10], ref_out[i])
    assert not torch.allclose(ref_out[0], ref_out[1], atol=1e-3)  # the chips differ
    for n, v in model.state_dict().items():
        assert torch.equal(v, nominal[n]), n  # the model's own modules were never touched
    assert type(model.body[1]).__name__ == "BatchNorm2d"


def test_monte_carlo_calibrates_chips_in_batches():
    model, cal = _calibration_setup()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x).argmax(1)
    one = cn.monte_carlo(model, (x, y), n_chips=5, batch_size=16, progress=False, calibrate=cal, chips_per_pass=1)
    many = cn.monte_carlo(model, (x, y), n_chips=5, batch_size=16, progress=False, calibrate=cal, chips_per_pass=3)
    assert many.accuracies == one.accuracies and many.chip_seeds == one.chip_seeds
    assert cal.starts[:5] == cal.starts[5:] and len(cal.seconds) == 10


def test_evaluation_chips_per_pass_key():
    from correctnet.evaluate import resolve_chips_per_pass
    from test_training_options import compose_job

    assert compose_job().chips_per_pass is None  # auto: monte_carlo chooses from memory
    assert compose_job("evaluation.chips_per_pass=16").chips_per_pass == 16
    for bad in (0, -2, 1.5, True, "many"):
        with pytest.raises(ConfigError, match="evaluation.chips_per_pass"):
            resolve_chips_per_pass(bad)
    with pytest.raises(ConfigError, match="evaluation.chips_per_pass"):
        compose_job("evaluation.chips_per_pass=0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_k_chips_in_training_and_calibration():
    model, x = _analog("conv2d", VARIATIONS["rram_read"])
    model, x = model.cuda(), torch.cat([x, x[:1]]).cuda()
    got, g_got = _k_forward(model, x, 3)
    ref, g_ref = _one_chip_forwards(model, x.tensor_split(3))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], atol=1e-3, rtol=1e-3)
    model, cal = _calibration_setup()
    model.cuda()
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x.cuda()).argmax(1).cpu()
    one = cn.monte_carlo(model, (x, y), n_chips=4, batch_size=16, progress=False, calibrate=cal, chips_per_pass=1)
    many = cn.monte_carlo(model, (x, y), n_chips=4, batch_size=16, progress=False, calibrate=cal, chips_per_pass=4)
    assert many.accuracies == one.accuracies


def test_sequence_first_transformers_are_refused_in_per_chip_modes():
    from test_batched_chips import Head

    model = cn.analogize(Head(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0), 5 * 16), VARIATIONS["lognormal"])
    with pytest.raises(ConfigError, match="batch_first=False"):
        cn.set_noise_aware(model, 0, 4)
    with pytest.raises(ConfigError, match="batch_first=False"):
        cn.program_chips(model, [1, 2])
    cn.set_noise_aware(model, 0)  # one chip per forward: any layout
    cn.program_chips(model, [1])  # one chip per pass: any layout


def test_chips_per_step_without_noise_aware_training_changes_nothing():
    torch.manual_seed(0)
    x, y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    nets = []
    for k in (1, 4):
        net = _analog("linear", VARIATIONS["lognormal"])[0]
        train(net, (x, y), None, TrainConfig(epochs=1, batch_size=16, chips_per_step=k), progress=False)
        nets.append(net)
    for (n, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), n

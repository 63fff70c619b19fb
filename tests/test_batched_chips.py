"""Chips in batches: K chips in one pass give each chip exactly what it gives one by one.

For every analog layer kind, a small classifier is run (a) one chip at a time (``chip`` mode) and (b) as
K chips in one pass (``chips`` mode, input repeated K times); each chip's logits of every read (two
forwards, so read noise advances) must agree to 1e-5 and its predicted classes exactly, and
``monte_carlo`` must give the same per-chip accuracies with ``chips_per_pass=K`` as with 1.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.analog import analog_layers, chip, chips, program_chips
from correctnet.compensation import attach_compensation
from correctnet.errors import ConfigError
from correctnet.evaluate import repeat_batch, auto_chips_per_pass, to_channels_last
from correctnet.seeding import Stream, chip_seed

K = 3
E = 16
VARIATIONS = {
    "lognormal": cn.LogNormal(0.5),
    "rram_read": cn.make_variation("rram", 1.0, read_noise=0.02, stuck_fraction=0.01),
    "rram_conv": cn.make_variation("rram", 1.0, read_noise=0.01, dac_bits=6, adc_bits=6),
}


class Head(nn.Module):
    """body -> flatten (first output of tuples) -> Linear to 5 classes."""

    def __init__(self, body: nn.Module, features: int, pick=None):
        super().__init__()
        self.body, self.fc, self.pick = body, nn.Linear(features, 5), pick

    def forward(self, x):
        out = self.body(x)
        out = out[0] if isinstance(out, tuple) else out
        if self.pick is not None:
            out = self.pick(out)
        return self.fc(out.flatten(1))


class SelfAttn(nn.Module):
    def __init__(self, batch_first: bool = True, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(E, 4, batch_first=batch_first, **kw)

    def forward(self, x):  # x: [N, L, E]
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, w = self.attn(x, x, x, need_weights=True)
        out = out if self.batch_first else out.transpose(0, 1)
        return out + w.sum(-1, keepdim=True)  # per-sample use of the weights


class CrossAttn(nn.Module):  # kdim/vdim differ: separate q/k/v projection weights
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, kdim=6, vdim=10, batch_first=True)

    def forward(self, x):
        return self.attn(x, x[..., :6], x[..., :10], need_weights=False)[0]


def _models():
    conv2d = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                           nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU())
    return {
        "linear": (nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5)), (12,)),
        "conv1d": (Head(nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(), nn.Conv1d(6, 6, 3, groups=3)), 6 * 8), (3, 12)),
        "conv2d": (Head(conv2d, 8 * 2 * 2), (3, 8, 8)),
        "conv3d": (Head(nn.Sequential(nn.Conv3d(2, 4, 3), nn.ReLU(), nn.Conv3d(4, 4, 1, groups=4)), 4 * 8), (2, 4, 4, 4)),
        "mha": (Head(SelfAttn(), 5 * E), (5, E)),
        "mha_seq_first": (Head(SelfAttn(batch_first=False, bias=False, add_bias_kv=True), 5 * E), (5, E)),
        "mha_kdim": (Head(CrossAttn(), 5 * E), (5, E)),
        "transformer": (Head(nn.TransformerEncoderLayer(E, 4, 32, dropout=0.0, batch_first=True), 5 * E), (5, E)),
        "lstm": (Head(nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True, proj_size=4), 8, pick=lambda o: o[:, -1]),
                 (7, 6)),
        "gru": (Head(nn.GRU(6, 8), 8, pick=lambda o: o[-1]), (4, 6)),  # sequence-first: batch dim 1
        "rnn": (Head(nn.RNN(6, 8, batch_first=True), 8, pick=lambda o: o[:, -1]), (7, 6)),
    }


MODELS = _models()
SEEDS = [chip_seed(Stream.EVAL, 0, i) for i in range(K)]


def _analog(kind: str, variation, seed: int = 0):
    torch.manual_seed(seed)  # the weights and inputs depend on this seed only, not on what ran before
    body, shape = _models()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cn.analogize(body, variation).eval()
    x = torch.randn(6, *shape)
    if kind == "gru":  # sequence-first GRU: the model's batch is dim 1 of the recurrent input
        model.body = _SeqFirst(model.body)
    return model, x


class _SeqFirst(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):  # x: [N, L, F] -> the GRU gets [L, N, F]
        return self.rnn(x.transpose(0, 1))


def _one_by_one(model, x, reads=2):
    outs = []
    for s in SEEDS:
        with chip(model, s), torch.no_grad():
            outs.append([model(x) for _ in range(reads)])
    return [torch.cat([o[r] for o in outs]) for r in range(reads)]


def _batched(model, x, reads=2):
    with chips(model, SEEDS), torch.no_grad():
        return [model(repeat_batch(x, K)) for _ in range(reads)]


def _compare(model, x):
    nominal = {k: v.clone() for k, v in model.state_dict().items()}
    ref, got = _one_by_one(model, x), _batched(model, x)
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
        assert torch.equal(g.argmax(1), r.argmax(1))
    assert not torch.equal(ref[0][:len(x)], ref[0][len(x):2 * len(x)])  # the chips differ: a meaningful test
    for k, v in model.state_dict().items():
        assert torch.equal(v, nominal[k]), k  # nominal weights untouched
    assert all(l.analog_mode == "off" for l in analog_layers(model).values())


@pytest.mark.parametrize("variation", list(VARIATIONS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_batched_chips_equal_one_by_one(kind, variation):
    model, x = _analog(kind, VARIATIONS[variation])
    _compare(model, x)


def test_read_noise_reads_differ_and_match():
    model, x = _analog("linear", VARIATIONS["rram_read"])
    ref = _one_by_one(model, x)
    assert not torch.equal(ref[0], ref[1])  # read noise: two reads of a chip differ (and each matches)
    _compare(model, x)


@pytest.mark.parametrize("kind", ["input", "output"])
@pytest.mark.parametrize("arch", ["linear", "conv2d", "mha"])
def test_compensators(arch, kind):
    model, x = _analog(arch, VARIATIONS["rram_conv"])
    attach_compensation(model, "all", kind=kind, rank=2, seed=1)
    with torch.no_grad():  # non-trivial compensators
        for p in model.parameters():
            if p.requires_grad and p.dim() and p.abs().sum() == 0:
                p.normal_(0, 0.1)
    _compare(model, x)


def test_channels_last_conv_model():
    model, x = _analog("conv2d", VARIATIONS["lognormal"])
    _compare(model, to_channels_last(x))


@pytest.mark.parametrize("variation", ["lognormal", "rram_read", "rram_conv"])
def test_monte_carlo_accuracies_equal(variation):
    model, _ = _analog("conv2d", VARIATIONS[variation])
    attach_compensation(model, ["body.0"], kind="output", rank=2)
    x = torch.randn(200, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # enough images that chips differ
    with torch.no_grad():
        y = model(x).argmax(1)  # the nominal predictions: chips score differently
    nominal = {k: v.clone() for k, v in model.state_dict().items()}
    one = cn.monte_carlo(model, (x, y), n_chips=7, batch_size=64, progress=False, chips_per_pass=1)
    for k in (2, 3, 7, 50):
        many = cn.monte_carlo(model, (x, y), n_chips=7, batch_size=64, progress=False, chips_per_pass=k)
        assert many.accuracies == one.accuracies and many.chip_seeds == one.chip_seeds
    assert len(set(one.accuracies)) > 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, nominal[k]), k


def test_monte_carlo_attention_and_lstm():
    for kind in ("transformer", "lstm"):
        model, x = _analog(kind, VARIATIONS["rram_read"])
        x = torch.randn(20, *MODELS[kind][1])
        y = torch.randint(0, 5, (20,))
        one = cn.monte_carlo(model, (x, y), n_chips=5, batch_size=8, progress=False, chips_per_pass=1)
        many = cn.monte_carlo(model, (x, y), n_chips=5, batch_size=8, progress=False, chips_per_pass=4)
        assert many.accuracies == one.accuracies


def test_memory_bounded_by_chips_per_pass():
    model, _ = _analog("conv2d", VARIATIONS["rram_read"])
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    seen: list[int] = []
    layer = analog_layers(model)["body.0"]
    layer.register_forward_pre_hook(lambda m, a: seen.append(m.chip_noise().shape[0]) if m.analog_mode == "chips" else None)
    cn.monte_carlo(model, (x, y), n_chips=10, batch_size=16, progress=False, chips_per_pass=4)
    assert seen == [4, 4, 2]  # stacked draws hold K chips at most, whatever n_chips (4 draws per cell: faults)
    program_chips(model, SEEDS)
    w = layer.nominal()
    assert layer.chip_noise().shape == (K, 4, *w.shape) and layer.analog_weight().shape == (K, *w.shape)
    cn.analog.set_nominal(model)
    # the memory-based choice scales with the budget
    per_chip = cn.evaluate.chip_bytes(model, x)
    assert auto_chips_per_pass(model, x, 100, budget=3 * per_chip) == 3
    assert auto_chips_per_pass(model, x, 2, budget=30 * per_chip) == 2
    assert auto_chips_per_pass(model, x, 100, budget=1) == 1


def test_errors():
    model, x = _analog("linear", VARIATIONS["lognormal"])
    with chips(model, SEEDS), torch.no_grad(), pytest.raises(ConfigError, match="chips_per_pass=1"):
        model(x[:4])  # 4 samples cannot be 3 chip groups
    with pytest.raises(ConfigError, match="chips_per_pass"):
        cn.monte_carlo(model, (x, torch.zeros(6, dtype=torch.long)), n_chips=2, chips_per_pass=0, progress=False)
    lstm, x = _analog("lstm", VARIATIONS["lognormal"])
    packed = nn.utils.rnn.pack_padded_sequence(x, [7] * 6, batch_first=True)
    with chips(lstm, SEEDS), torch.no_grad(), pytest.raises(ConfigError, match="PackedSequence"):
        lstm.body(packed)


def test_calibration_keeps_one_by_one():
    model, _ = _analog("linear", VARIATIONS["lognormal"])
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    modes: list[str] = []
    cn.monte_carlo(model, (x, y), n_chips=3, progress=False, chips_per_pass=3,
                   calibrate=lambda m, s: modes.append(analog_layers(m)["0"].analog_mode))
    assert modes == ["chip"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_batched_equals_one_by_one_and_cpu():
    model, _ = _analog("conv2d", VARIATIONS["rram_conv"])
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 5, (64,))
    cpu = cn.monte_carlo(model, (x, y), n_chips=8, batch_size=32, progress=False, chips_per_pass=1)
    model.cuda()
    one = cn.monte_carlo(model, (x, y), n_chips=8, batch_size=32, progress=False, chips_per_pass=1)
    many = cn.monte_carlo(model, (x, y), n_chips=8, batch_size=32, progress=False, chips_per_pass=4)
    auto = cn.monte_carlo(model, (x, y), n_chips=8, batch_size=32, progress=False)
    assert many.accuracies == one.accuracies == auto.accuracies  # (CUDA generators: other chips than on CPU)
    assert len(cpu.accuracies) == len(one.accuracies)
    layer = analog_layers(model)["body.0"]
    program_chips(model, SEEDS)
    assert layer.chip_noise().device.type == "cuda" and layer._read_gens[0].device.type == "cuda"

"""RRAM device models (correctnet.devices): each effect's statistics against its formula, and the hooks."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import correctnet as cn
from correctnet.conf import DIR as CONF
from correctnet.devices import RRAM, quantize_signal
from correctnet.seeding import layer_generator

QUIET = dict(sigma=0.0, read_noise=0.0)  # every stochastic stage off


def wan_std(g_uS: float, g_max: float = 40.0) -> float:
    """Wan et al. 2022 programming std (µS), written out independently of the library."""
    x = g_uS / g_max
    return (0.348 + 16.030 * x - 43.853 * x ** 2 + 45.393 * x ** 3 - 16.815 * x ** 4) * g_max / 40.0


def draw(v, w, seed=0):
    return v.sample(w, layer_generator(seed, "layer"))


@pytest.mark.parametrize("mapping", ["layer", "channel"])
@pytest.mark.parametrize("g_min", [0.0, 4.0])
def test_mapping_then_unmapping_without_noise_is_exact(mapping, g_min):
    w = torch.randn(16, 3, 5, 5)
    v = RRAM(mapping=mapping, g_min=g_min, **QUIET)
    g = v.conductances(w, draw(v, w))
    assert g.shape == (2, *w.shape) and g.min() >= g_min and g.max() <= 40.0 + 1e-5
    assert torch.allclose(v.apply(w, draw(v, w)), w, rtol=1e-6, atol=1e-6 * w.abs().max().item())
    top = (g[0] - g[1]).abs().flatten(1).amax(1)  # max|W| maps to the full range g_max - g_min
    if mapping == "channel":
        assert torch.allclose(top, torch.full_like(top, 40.0 - g_min))
    else:
        assert top.max().item() == pytest.approx(40.0 - g_min)


@pytest.mark.parametrize("sigma,g_max", [(1.0, 40.0), (0.5, 40.0), (1.0, 20.0)])
def test_programming_error_mean_and_std_follow_the_wan2022_polynomial(sigma, g_max):
    xs = [0.2, 0.4, 0.6, 0.8, 1.0]  # relative targets; max|W| = 1 maps to g_max
    n = 100_000
    w = torch.tensor(xs).repeat_interleave(n).reshape(len(xs), n)
    v = RRAM(sigma=sigma, g_max=g_max, read_noise=0.0)
    err = (v.conductances(w, draw(v, w))[0] - w * g_max).double()  # G+ carries the weight
    for x, e in zip(xs, err):
        std = sigma * wan_std(x * g_max, g_max)
        assert abs(e.mean().item()) < 5 * std / math.sqrt(n)
        assert e.std().item() == pytest.approx(std, rel=5 * math.sqrt(0.5 / n))


def test_programmed_conductances_are_never_negative_and_sigma_scales_the_noise():
    w = torch.zeros(1000, 100)
    w[0, 0] = 1.0
    g = RRAM(read_noise=0.0).conductances(w, draw(RRAM(), w))
    assert g.min() >= 0 and (g == 0).float().mean() > 0.3  # targets at 0 µS: about half clamp
    w = torch.full((200, 1000), 0.8)  # 32 µS: far from the clamp even at sigma 3
    w[0, 0] = 1.0
    e1, e3 = (RRAM(sigma=s, read_noise=0.0).conductances(w, draw(RRAM(), w))[0] - 32.0 for s in (1.0, 3.0))
    assert torch.allclose(e3.flatten()[1:], 3 * e1.flatten()[1:], atol=1e-4)  # same chip draws: sigma is an exact scale factor


def test_lognormal_programming_on_conductances():
    w = torch.full((300, 1000), 0.5)
    w[0, 0] = 1.0
    v = RRAM(sigma=0.3, programming="lognormal", read_noise=0.0)
    r = torch.log(v.conductances(w, draw(v, w))[0][1:] / 20.0).double()
    assert r.std().item() == pytest.approx(0.3, rel=0.02) and abs(r.mean().item()) < 0.005


def test_stuck_cells_fraction_direction_and_fixed_per_chip():
    f, h, n = 0.05, 0.3, 400_000
    w = torch.rand(n) * 0.8 + 0.1  # interior targets: G+ in (4, 36) µS
    w[0] = 1.0
    v = RRAM(stuck_fraction=f, stuck_high=h, g_min=2.0, **QUIET)
    noise = draw(v, w)
    assert noise.shape == (4, n)
    gp = v.conductances(w, noise)[0][1:]
    high, low = (gp == 40.0).double().mean().item(), (gp == 2.0).double().mean().item()
    se = math.sqrt(f * (1 - f) / n)
    assert abs(high + low - f) < 5 * se and abs(high - f * h) < 5 * math.sqrt(f * h / n)
    assert torch.equal(v.apply(w, noise), v.apply(w, noise))  # static: the same chip gives the same weights
    assert torch.equal(noise, draw(v, w))  # and the same chip seed the same faults
    fewer = RRAM(stuck_fraction=0.02, stuck_high=h, g_min=2.0, **QUIET).conductances(w, noise)[0][1:]
    stuck = lambda g: (g == 40.0) | (g == 2.0)  # noqa: E731
    assert stuck(fewer).any() and not (stuck(fewer) & ~stuck(gp)).any()  # a chip's faulty set grows with f


@pytest.mark.parametrize("levels", [2, 8, 32])
def test_levels_give_that_many_distinct_conductances(levels):
    w = torch.linspace(-1, 1, 10_001)
    v = RRAM(levels=levels, g_min=1.0, **QUIET)
    g = v.conductances(w, draw(v, w))
    vals = torch.unique(g)
    assert len(vals) == levels
    step = 39.0 / (levels - 1)
    assert torch.allclose((vals - 1.0) / step, torch.arange(levels, dtype=g.dtype), atol=1e-4)
    assert (g - v.conductances(w, draw(v, w))).abs().max() == 0  # deterministic without noise


def analog_linear(v, seed=0):
    torch.manual_seed(seed)
    return cn.analogize(nn.Sequential(nn.Linear(64, 32)), v)


def test_read_noise_changes_at_every_forward_while_the_chip_stays():
    model, x = analog_linear(RRAM(sigma=1.0, read_noise=0.02)), torch.randn(8, 64)
    layer = model[0]
    cn.program_chip(model, 7)
    static = layer._chip_noise.clone()
    y1, y2 = model(x), model(x)
    assert not torch.equal(y1, y2)
    cn.program_chip(model, 7)  # re-programming the same chip replays the same reads
    assert torch.equal(model(x), y1)
    with cn.chip(model, 8):  # another chip in between does not disturb chip 7's read stream
        assert not torch.equal(model(x), y2)
    assert torch.equal(model(x), y2)
    w1, w2 = layer.analog_weight(), layer.analog_weight()
    assert torch.equal(layer._chip_noise, static)  # static deviations unchanged by reads
    # each read adds r * g_max on G+ and on G-: the difference of two reads has std 2 r max|W|
    s = layer.weight.abs().max().item()
    assert (w1 - w2).std().item() == pytest.approx(2 * 0.02 * s, rel=0.1)
    model_quiet = analog_linear(RRAM(sigma=1.0, read_noise=0.0))
    cn.program_chip(model_quiet, 7)
    assert torch.equal(model_quiet(x), model_quiet(x))


def test_read_noise_also_in_noise_aware_mode_and_gradients_flow():
    model, x = analog_linear(RRAM(sigma=0.0, read_noise=0.05, levels=16, dac_bits=6, adc_bits=6)), torch.randn(8, 64)
    with cn.noise_aware(model, 3):
        y1, y2 = model(x), model(x)
        assert not torch.equal(y1, y2)
        y1.square().sum().backward()
    g = model[0].weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_off_mode_is_exact_nominal_even_with_converters():
    v = RRAM(sigma=1.0, read_noise=0.05, stuck_fraction=0.1, levels=4, dac_bits=2, adc_bits=2)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 5))
    model, x = cn.analogize(plain, v), torch.randn(3, 2, 8, 8)
    assert torch.equal(model(x), plain(x))


def test_quantize_signal_grid_and_error():
    x = torch.randn(50, 300)
    for bits in (2, 4, 8):
        q = quantize_signal(x, bits, (-1,))
        n = 2 ** (bits - 1) - 1
        s = x.abs().amax(-1, keepdim=True)
        assert max(len(torch.unique(r)) for r in q) <= 2 * n + 1
        assert torch.allclose(q / s * n, torch.round(q / s * n), atol=1e-4)
        assert ((q - x).abs() <= s / (2 * n) + 1e-6).all()


@pytest.mark.parametrize("which", ["dac", "adc"])
def test_converters_quantize_layer_input_or_output(which):
    bits = 3
    v = RRAM(**QUIET, **{f"{which}_bits": bits})
    model, x = analog_linear(v), torch.randn(10, 64)
    layer = model[0]
    cn.program_chip(model, 0)
    w = layer.analog_weight()
    y = model(x)
    if which == "dac":
        assert torch.allclose(y, F.linear(quantize_signal(x, bits, (-1,)), w, layer.bias), atol=1e-5)
    else:
        core = y - layer.bias  # the digital bias comes after the ADC
        assert max(len(torch.unique(torch.round(r * 1e4))) for r in core) <= 2 ** bits - 1
        assert torch.allclose(core, quantize_signal(F.linear(x, w), bits, (-1,)), atol=1e-5)


def test_conv_converters_take_their_range_per_sample():
    torch.manual_seed(0)
    model = cn.analogize(nn.Sequential(nn.Conv2d(2, 3, 3)), RRAM(**QUIET, adc_bits=2))
    cn.program_chip(model, 0)
    x = torch.randn(4, 2, 6, 6)
    x[0] *= 100  # a loud sample must not coarsen the others
    core = model(x) - model[0].bias.view(-1, 1, 1)
    for sample in core:
        assert len(torch.unique(torch.round(sample * 1e4))) <= 3


@pytest.mark.parametrize("key,value,needle", [
    ("levels", 1, "variation.levels must be an integer >= 2 or null (off), got 1"),
    ("levels", 2.5, "variation.levels"),
    ("g_max", 0, "variation.g_max must be a number > 0"),
    ("g_min", 40.0, "variation.g_min"),
    ("stuck_fraction", 1.5, "variation.stuck_fraction must be a number in [0, 1]"),
    ("stuck_high", True, "variation.stuck_high"),
    ("read_noise", -0.01, "variation.read_noise"),
    ("mapping", "row", "variation.mapping must be one of ['layer', 'channel']"),
    ("programming", "pcm", "variation.programming"),
    ("dac_bits", 1, "variation.dac_bits"),
    ("adc_bits", 40, "variation.adc_bits"),
    ("sigma", -1.0, "variation.sigma"),
])
def test_bad_parameters_are_clear_config_errors(key, value, needle):
    with pytest.raises(cn.ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        cn.make_variation("rram", **{"sigma": 1.0, key: value})


def test_to_dict_round_trips_and_merges_like_evaluate():
    v = cn.make_variation("rram", sigma=1, g_max=25, levels=16, stuck_fraction=0.01, dac_bits=8)
    d = v.to_dict()
    assert d["name"] == "rram" and d["g_max"] == 25.0 and d["levels"] == 16
    assert cn.make_variation(**d) == v
    assert cn.make_variation(**{**d, "sigma": 0.3}).sigma == 0.3
    with pytest.raises(cn.ConfigError, match="rram"):
        cn.make_variation("rram", sigma=1.0, drift=3)


def compose(*overrides):
    from hydra import compose as hcompose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


def test_presets_and_command_line_composition():
    from correctnet.train import _variation
    assert _variation(compose()) == cn.LogNormal(0.5)  # the default is unchanged
    wan = _variation(compose("variation=rram_wan2022"))
    assert (wan.sigma, wan.read_noise, wan.stuck_fraction, wan.levels) == (1.0, 0.01, 0.0, None)
    faulty = _variation(compose("variation=rram_faulty"))
    assert faulty.stuck_fraction > 0 and faulty.levels == 32 and faulty.read_noise == wan.read_noise
    mixed = _variation(compose("variation=rram_wan2022", "variation.stuck_fraction=0.02", "variation.levels=16",
                               "variation.adc_bits=8", "variation.mapping=channel"))
    assert (mixed.stuck_fraction, mixed.levels, mixed.adc_bits, mixed.mapping) == (0.02, 16, 8, "channel")
    with pytest.raises(cn.ConfigError, match="variation.levels"):
        _variation(compose("variation=rram_faulty", "variation.levels=1"))


def test_pipeline_runs_under_rram_faulty_and_the_checkpoint_replays_it(tmp_path):
    from correctnet.data import load_dataset
    from correctnet.train import run
    cfg = compose("method=none", "variation=rram_faulty", "compensation=all", "training.epochs=1", "training.noise_aware=true",
                  "evaluation.n_chips=3", "evaluation.profile_chips=1", "evaluation.profile_samples=16",
                  "compensation.steps=2", "progress=false")
    m = run(cfg, tmp_path)
    assert m["variation"]["name"] == "rram" and set(m["stages"]) == {"noise_aware", "compensated"}
    model, _ = cn.load_checkpoint(tmp_path / "model.safetensors")
    test = load_dataset("digits", val_fraction=0.2, seed=0).test
    again = cn.monte_carlo(model, test, n_chips=3, progress=False)
    assert again.accuracies == m["stages"]["compensated"]["mc"]["accuracies"]  # read noise is reproducible too

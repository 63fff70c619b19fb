"""Aging (t_eval, drift compensation) and fixed-range converters with output noise (correctnet.devices)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import correctnet as cn
from correctnet.conf import DIR as CONF
from correctnet.devices import RRAM, WAN2022_FITS, clip_quantize, wan2022_coeffs
from correctnet.seeding import layer_generator

QUIET = dict(sigma=0.0, read_noise=0.0)

# aihwkit ReRamWan2022NoiseModel.coeff_dic (µS, powers x^0..x^4), copied independently of the library
FITS = {1.0: (0.348, 16.030, -43.853, 45.393, -16.815),
        86400.0: (0.701, 22.086, -50.773, 47.095, -16.458),
        172800.0: (0.782, 20.274, -43.507, 37.062, -11.934)}


def fit_std(x: float, t: float) -> float:
    return sum(c * x ** i for i, c in enumerate(FITS[t]))  # µS at g_max = 40 µS


def draw(v, w, seed=0, key="layer"):
    return v.sample(w, layer_generator(seed, key))


def linear_model(variation, n_in=64, n_out=64, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_out))
    return cn.analogize(model, variation)


# -- 1. t_eval -------------------------------------------------------------------------------------
def test_coefficients_are_aihwkits_and_interpolate_in_log_time():
    assert WAN2022_FITS == FITS
    for t, c in FITS.items():
        assert wan2022_coeffs(t) == c
    assert wan2022_coeffs(0.5) == FITS[1.0] and wan2022_coeffs(1e7) == FITS[172800.0]  # clamped outside
    a = math.log(3600) / math.log(86400)
    expect = [(1 - a) * c0 + a * c1 for c0, c1 in zip(FITS[1.0], FITS[86400.0])]
    assert wan2022_coeffs(3600) == pytest.approx(expect, rel=1e-12)
    a2 = (math.log(1.5 * 86400) - math.log(86400)) / (math.log(172800) - math.log(86400))
    expect2 = [(1 - a2) * c0 + a2 * c1 for c0, c1 in zip(FITS[86400.0], FITS[172800.0])]
    assert wan2022_coeffs(1.5 * 86400) == pytest.approx(expect2, rel=1e-12)


@pytest.mark.parametrize("t", sorted(FITS))
@pytest.mark.parametrize("x", [0.5, 0.75, 1.0])
def test_aged_conductances_have_the_fits_mean_and_std(t, x):
    n = 40000
    w = torch.full((n,), x)
    w[0] = 1.0  # max|W| = 1 maps to g_max: every other G+ is x * g_max
    v = RRAM(sigma=1.0, read_noise=0.0, t_eval=t)
    g = v.conductances(w, draw(v, w))[0, 1:].double()
    target, std = x * 40.0, fit_std(x, t)
    assert g.mean().item() == pytest.approx(target, abs=5 * std / math.sqrt(n))
    assert g.std().item() == pytest.approx(std, abs=5 * std / math.sqrt(2 * n))


@pytest.mark.parametrize("t", sorted(FITS))
def test_zero_target_cells_follow_the_clamped_fit(t):
    n = 40000
    w = torch.ones(n)  # every G- has target g_min = 0: max(0, c0 * eps), a half-normal with a spike at 0
    v = RRAM(sigma=1.0, read_noise=0.0, t_eval=t)
    g = v.conductances(w, draw(v, w))[1].double()
    c0 = FITS[t][0]
    mean, std = c0 / math.sqrt(2 * math.pi), c0 * math.sqrt(0.5 - 1 / (2 * math.pi))
    assert g.mean().item() == pytest.approx(mean, abs=5 * std / math.sqrt(n))
    assert g.std().item() == pytest.approx(std, abs=5 * std / math.sqrt(n))


def test_t_eval_1_is_the_one_second_model_bit_for_bit():
    w = torch.randn(32, 3, 3, 3)
    v = RRAM(read_noise=0.01, stuck_fraction=0.05, levels=32)
    aged = RRAM(read_noise=0.01, stuck_fraction=0.05, levels=32, t_eval=1.0)
    noise = draw(v, w)
    # the one-second formula, written out: G+ / G- mapped, on 32 levels, then noise, then faults
    s = w.abs().max()
    g = torch.stack((40.0 * torch.relu(w) / s, 40.0 * torch.relu(-w) / s))
    step = 40.0 / 31
    g = torch.round(g / step).clamp(0, 31) * step
    x = g / 40.0
    std = ((((-16.815 * x + 45.393) * x - 43.853) * x + 16.030) * x + 0.348)
    g = (g + std * noise[:2]).clamp_min(0.0)
    assert torch.allclose(v.conductances(w, noise)[noise[2:] >= 0.05], g[noise[2:] >= 0.05], atol=1e-4)
    for a, b in ((v.apply(w, noise), aged.apply(w, noise)),
                 (v.apply_read(w, noise, layer_generator(1, "r")), aged.apply_read(w, noise, layer_generator(1, "r")))):
        assert torch.equal(a, b)
    assert RRAM() == RRAM(t_eval=1, drift_compensation="none", dac_range="auto", adc_range="auto", output_noise=0)


def test_a_chip_ages_deterministically_and_its_deviations_grow_with_the_fit():
    w = torch.randn(64, 64)
    young, old = RRAM(read_noise=0.0), RRAM(read_noise=0.0, t_eval=86400)
    noise = draw(young, w, seed=7)
    assert torch.equal(old.apply(w, draw(old, w, seed=7)), old.apply(w, noise))  # (seed, layer, t) fix the chip
    assert not torch.equal(old.apply(w, draw(old, w, seed=8)), old.apply(w, noise))
    g0 = young.conductances(w, torch.zeros_like(noise))  # targets
    d1 = young.conductances(w, noise) - g0
    d2 = old.conductances(w, noise) - g0
    x = g0 / 40.0
    ratio = sum(c * x ** i for i, c in enumerate(FITS[86400.0])) / sum(c * x ** i for i, c in enumerate(FITS[1.0]))
    unclamped = (g0 + d1 > 0) & (g0 + d2 > 0)
    assert torch.allclose(d2[unclamped], (d1 * ratio)[unclamped], rtol=1e-4, atol=1e-4)
    assert d2.std() > 1.5 * d1.std()


def test_time_sweeps_compose_like_sigma_sweeps():
    from hydra import compose, initialize_config_dir
    from correctnet.train import _variation

    def variation(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return _variation(compose(config_name="config", overrides=list(overrides)))

    base = variation("variation=rram_wan2022")
    assert (base.t_eval, base.drift_compensation, base.dac_range, base.adc_range, base.output_noise) == \
        (1.0, "none", "auto", "auto", 0.0)
    for t in (1, 3600, 86400):
        assert variation("variation=rram_wan2022", f"variation.t_eval={t}").t_eval == float(t)
    aged = variation("variation=rram_wan2022_aged")
    assert aged.t_eval == 86400.0 and aged.drift_compensation == "global" and aged.read_noise == base.read_noise
    periphery = variation("variation=rram_periphery")
    assert (periphery.dac_bits, periphery.adc_bits, periphery.adc_range, periphery.output_noise) == (8, 8, 12.0, 0.005)
    assert periphery.dac_range == "auto" and periphery.converts
    assert variation("variation=rram_faulty").t_eval == 1.0


# -- drift compensation ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, lost, tol", [
    (dict(sigma=1.0, t_eval=172800), 0.98, 0.01),  # aged: the clamp at 0 S biases the g_min cells up
    (dict(sigma=0.25, t_eval=172800, stuck_fraction=0.2, stuck_high=0.0), 0.85, 0.03),  # plus cells stuck low
])
def test_global_drift_compensation_restores_the_mean_output_scale(kw, lost, tol):
    torch.manual_seed(0)
    w, x = torch.randn(128, 128), torch.randn(256, 128)
    kw = dict(read_noise=0.0, **kw)
    raw, comp = RRAM(**kw), RRAM(**kw, drift_compensation="global")
    noise = draw(raw, w)
    w_raw, w_comp = raw.apply(w, noise), comp.apply(w, noise)
    assert torch.allclose(w_comp, w_raw * (w.abs().sum() / w_raw.abs().sum()), rtol=1e-5)  # the rule
    readout = torch.eye(128)  # aihwkit's one-hot readout: its mean |output| is back at the nominal one
    assert (readout @ w_comp.T).abs().mean().item() == pytest.approx((readout @ w.T).abs().mean().item(), rel=1e-5)
    y = x @ w.T

    def gain(w_chip):  # least-squares output scale of the chip against the nominal layer
        return ((x @ w_chip.T) * y).sum().item() / (y * y).sum().item()
    assert gain(w_raw) < lost
    assert gain(w_comp) == pytest.approx(1.0, abs=tol)
    w.requires_grad_(True)
    comp.apply(w, noise).sum().backward()  # still differentiable in the nominal weight
    assert w.grad is not None and torch.isfinite(w.grad).all()


# -- 2. fixed-range converters ---------------------------------------------------------------------
@pytest.mark.parametrize("bits", [None, 4])
def test_fixed_range_adc_saturates_at_its_bounds_and_quantizes_inside(bits):
    v = RRAM(**QUIET, adc_range=3.0, adc_bits=bits)
    x = torch.tensor([[0.5, -1.0, 0.25]])                   # DAC auto: full scale max|x| = 1
    y = torch.linspace(-10, 10, 401).unsqueeze(0)          # what the "crossbar" returns
    out = v.convert(lambda _: y, x, (-1,), weight_scale=torch.tensor(2.0))
    full = 3.0 * 2.0 * 1.0                                  # adc_range * max|W| * DAC full scale
    assert torch.equal(out[y >= full], torch.full_like(out[y >= full], full))
    assert torch.equal(out[y <= -full], torch.full_like(out[y <= -full], -full))
    inside = y.abs() < full
    if bits is None:
        assert torch.equal(out[inside], y[inside])
    else:
        n = 2 ** (bits - 1) - 1
        assert torch.allclose(out[inside], torch.round(y[inside] / full * n) * full / n)
        assert len(torch.unique(out)) == 2 * n + 1


def test_fixed_range_adc_in_a_layer_uses_the_layers_mapping_scale():
    model = linear_model(RRAM(**QUIET, adc_range=0.5, adc_bits=6))
    layer = model[0]
    x = torch.randn(8, 64)
    with cn.chip(model, 0):
        out = model(x)
    full = 0.5 * layer.weight.detach().abs().max() * x.abs().amax(-1, keepdim=True)
    expect = clip_quantize(F.linear(x, layer.weight), full, 6) + layer.bias
    assert torch.allclose(out, expect, atol=1e-6)
    assert (F.linear(x, layer.weight).abs() > full).any()  # the range does clip here


def test_input_range_calibration_and_the_clipping_dac():
    model = linear_model(RRAM(**QUIET, dac_range=0.5))
    layer = model[0]
    batches = [torch.randn(16, 64) for _ in range(3)]
    with pytest.raises(cn.ConfigError, match="dac_range"):
        with cn.chip(model, 0):
            model(batches[0])
    ranges = cn.calibrate_input_ranges(model, batches)
    seen = torch.cat(batches).abs()
    assert ranges == {"0": pytest.approx(seen.max().item())} and layer.input_range == ranges["0"]
    assert layer.analog_mode == "off" and model.training
    p90 = cn.calibrate_input_ranges(model, [(b, None) for b in batches], percentile=90)["0"]
    per_vector = seen.amax(-1).sort().values
    assert p90 == per_vector[math.ceil(0.9 * 48) - 1].item()
    x = 3 * torch.randn(4, 64)
    with cn.chip(model, 0):
        out = model(x)
    bound = 0.5 * p90
    assert torch.allclose(out, F.linear(x.clamp(-bound, bound), layer.weight, layer.bias), atol=1e-6)
    with pytest.raises(cn.ConfigError, match="percentile"):
        cn.calibrate_input_ranges(model, batches, percentile=0)


def test_output_noise_has_its_std_and_replays_per_chip():
    n_out = 512
    model = linear_model(RRAM(**QUIET, adc_range=32.0, output_noise=0.01), n_in=32, n_out=n_out)  # no clipping
    layer = model[0]
    x = torch.randn(64, 32)
    clean = F.linear(x, layer.weight)
    full = 32.0 * layer.weight.abs().max() * x.abs().amax(-1, keepdim=True)
    with torch.no_grad(), cn.chip(model, 3):
        a1, a2 = model(x) - layer.bias, model(x) - layer.bias
    with torch.no_grad(), cn.chip(model, 3):
        b1 = model(x) - layer.bias
    with torch.no_grad(), cn.chip(model, 4):
        c1 = model(x) - layer.bias
    z = ((a1 - clean) / (0.01 * full)).double()
    n = z.numel()
    assert z.mean().item() == pytest.approx(0.0, abs=5 / math.sqrt(n))
    assert z.std().item() == pytest.approx(1.0, abs=5 / math.sqrt(2 * n))
    assert torch.equal(a1, b1)                                 # a chip's reads replay
    assert not torch.equal(a1, a2) and not torch.equal(a1, c1)  # a fresh draw per read and per chip
    with torch.no_grad(), cn.chips(model, [3, 4]):
        both = model(x.repeat(2, 1)) - layer.bias
    assert torch.equal(both[:64], a1) and torch.equal(both[64:], c1)  # chip batches = one by one


def test_output_noise_with_auto_range_is_relative_to_each_vectors_max():
    v = RRAM(**QUIET, output_noise=0.1)
    y = torch.randn(2000, 256) * torch.logspace(-2, 2, 2000).unsqueeze(1)
    out = v.convert(lambda _: y, torch.ones(2000, 4), (-1,), generator=layer_generator(0, "r"))
    z = (out - y) / (0.1 * y.abs().amax(-1, keepdim=True))
    assert z.std().item() == pytest.approx(1.0, abs=5 / math.sqrt(2 * z.numel()))


def test_default_converters_are_unchanged():
    v = RRAM(**QUIET, dac_bits=5, adc_bits=5)
    w, x = torch.randn(16, 8), torch.randn(4, 8)
    got = v.convert(lambda xx: xx @ w.T, x, (-1,), weight_scale=torch.tensor(9.0), generator=layer_generator(0, "r"))
    assert torch.equal(got, v.adc(v.dac(x, (-1,)) @ w.T, (-1,)))


@pytest.mark.parametrize("key, value", [
    ("t_eval", 0.5), ("t_eval", "1d"), ("t_eval", float("inf")), ("drift_compensation", "local"),
    ("dac_range", 0), ("dac_range", "fixed"), ("adc_range", -1.0), ("adc_range", True),
    ("output_noise", -0.1), ("output_noise", "0.1"),
])
def test_bad_values_are_config_errors_naming_the_key(key, value):
    with pytest.raises(cn.ConfigError, match=f"variation.{key}"):
        cn.make_variation("rram", sigma=1.0, **{key: value})


def test_t_eval_needs_the_time_dependent_fit():
    with pytest.raises(cn.ConfigError, match="variation.t_eval.*lognormal"):
        cn.make_variation("rram", sigma=0.5, programming="lognormal", t_eval=86400)
    assert cn.make_variation("rram", sigma=0.5, programming="lognormal").t_eval == 1.0


def test_new_keys_round_trip_and_the_cli_measures_the_ranges_of_a_fixed_range_dac():
    v = cn.make_variation("rram", sigma=1.0, t_eval=3600, drift_compensation="global", dac_range=0.8,
                          adc_range=12, output_noise=0.005)
    assert cn.make_variation(**v.to_dict()) == v and v.to_dict()["adc_range"] == 12.0
    from hydra import compose, initialize_config_dir
    from correctnet.train import validate
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=none", "variation=rram_periphery",
                                                       "variation.dac_range=1.0"])
    ranges = validate(cfg).ranges  # the pipeline measures each layer's input range (tests/test_train_cli.py)
    assert ranges == {"percentile": 100.0, "estimator": "max", "std_factor": 3.0, "momentum": 0.9, "images": 1024}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert validate(compose(config_name="config", overrides=["method=none"])).ranges is None  # dac_range auto


# -- 3. tiles ---------------------------------------------------------------------------------------
def test_each_tile_has_its_own_mapping_scale():
    torch.manual_seed(0)
    w = torch.randn(10, 7)
    v = RRAM(**QUIET, tile_rows=3, tile_cols=4)
    s = v.scale(w)
    for o in (slice(0, 4), slice(4, 8), slice(8, 10)):
        for i in (slice(0, 3), slice(3, 6), slice(6, 7)):
            assert torch.all(s[o, i] == w[o, i].abs().max())
    g = v.conductances(w, draw(v, w))
    assert (g[0] - g[1])[:4, :3].abs().max().item() == pytest.approx(40.0)  # every tile uses the full range
    assert torch.allclose(v.apply(w, draw(v, w)), w, atol=1e-6)
    assert torch.equal(RRAM(tile_rows=7, tile_cols=10).scale(w), RRAM().scale(w))  # one tile: unchanged
    sc = RRAM(**QUIET, tile_rows=3, mapping="channel").scale(w)
    assert torch.equal(sc[:, 3:6], w[:, 3:6].abs().amax(1, keepdim=True).expand(10, 3))


def test_tiled_linear_converts_per_tile_and_sums_digitally():
    model = linear_model(RRAM(**QUIET, tile_rows=3, tile_cols=4, dac_bits=4, adc_bits=4, adc_range=1.5),
                         n_in=7, n_out=10)
    layer = model[0]
    x = torch.randn(5, 7)
    with torch.no_grad(), cn.chip(model, 0):
        out = model(x)
    w = layer.weight.detach()
    expect = torch.zeros(5, 10)
    for o in (slice(0, 4), slice(4, 8), slice(8, 10)):
        for i in (slice(0, 3), slice(3, 6), slice(6, 7)):
            xs = x[:, i]
            xf = xs.abs().amax(-1, keepdim=True)
            xq = torch.round(xs / xf * 7) * xf / 7
            full = 1.5 * w[o, i].abs().max() * xf
            expect[:, o] += clip_quantize(xq @ w[o, i].T, full, 4)
    assert torch.allclose(out, expect + layer.bias, atol=1e-5)
    untiled = linear_model(RRAM(**QUIET, dac_bits=4, adc_bits=4, adc_range=1.5), n_in=7, n_out=10)
    with torch.no_grad(), cn.chip(untiled, 0):
        assert not torch.allclose(untiled(x), out, atol=1e-3)


def test_tiled_conv_and_chip_batches():
    torch.manual_seed(0)
    model = cn.analogize(nn.Sequential(nn.Conv2d(5, 6, 3)),
                         RRAM(sigma=1.0, read_noise=0.01, tile_rows=18, tile_cols=4, adc_range=2.0, adc_bits=6,
                              output_noise=0.01))
    conv = model[0]
    x = torch.randn(3, 5, 8, 8)
    with torch.no_grad(), cn.chip(model, 1):
        one = model(x)
    with torch.no_grad(), cn.chips(model, [1, 2]):
        both = model(x.repeat(2, 1, 1, 1))
    assert torch.equal(both[:3], one) and one.shape == (3, 6, 6, 6)
    quiet = cn.analogize(nn.Sequential(nn.Conv2d(5, 6, 3)), RRAM(**QUIET, tile_rows=18, tile_cols=4, adc_range=2.0))
    quiet.load_state_dict(model.state_dict())
    with torch.no_grad(), cn.chip(quiet, 1):
        out = quiet(x)
    w, expect = conv.weight.detach(), torch.zeros(3, 6, 6, 6)
    for o in (slice(0, 4), slice(4, 6)):
        for i in (slice(0, 2), slice(2, 4), slice(4, 5)):  # 18 rows = 2 channels of a 3x3 kernel
            full = 2.0 * w[o, i].abs().max() * x[:, i].abs().amax((1, 2, 3), keepdim=True)
            expect[:, o] += clip_quantize(F.conv2d(x[:, i], w[o, i]), full, None)
    assert torch.allclose(out, expect + conv.bias.view(-1, 1, 1), atol=1e-5)


def test_bad_tiles_are_config_errors():
    for value in (0, 2.5, True):
        with pytest.raises(cn.ConfigError, match="variation.tile_rows"):
            cn.make_variation("rram", sigma=1.0, tile_rows=value)
    model = cn.analogize(nn.Sequential(nn.Conv2d(5, 6, 3)), RRAM(**QUIET, tile_rows=8, adc_bits=8))
    with pytest.raises(cn.ConfigError, match="variation.tile_rows must be >= 9"), cn.chip(model, 0):
        model(torch.randn(1, 5, 8, 8))
    grouped = cn.analogize(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), RRAM(**QUIET, tile_cols=1, adc_bits=8))
    with pytest.raises(cn.ConfigError, match="tiles"), cn.chip(grouped, 0):
        grouped(torch.randn(1, 4, 8, 8))
    att = cn.analogize(nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)),
                       RRAM(**QUIET, tile_cols=4, adc_bits=8))
    q = torch.randn(2, 3, 8)
    with pytest.raises(cn.ConfigError, match="tiles"), cn.chip(att, 0):
        att[0](q, q, q)


def test_calibration_sees_attention_inputs_inside_a_transformer():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), 1)
    model = cn.analogize(enc, RRAM(**QUIET, dac_range=1.0, dac_bits=8))
    model.layers[0].norm1.eval()  # a mixed training state is restored as it was
    x = 3 * torch.randn(4, 5, 16)
    ranges = cn.calibrate_input_ranges(model, [x])
    assert ranges["layers.0.self_attn"] == pytest.approx(x.abs().max().item())  # query = key = value = x
    assert set(ranges) == set(cn.analog_layers(model)) and model.training and not model.layers[0].norm1.training
    with torch.no_grad(), cn.chip(model, 0):
        assert torch.isfinite(model(x)).all()


def test_evaluate_sweeps_time_like_sigma():
    from correctnet.evaluate.cli import parse_args, sweep_variations
    opts = parse_args(["checkpoint=m.safetensors", "variation.sigma=0.5,1", "variation.t_eval=1,86400"])
    sweep = sweep_variations(opts)
    assert sweep == [{"sigma": 0.5, "t_eval": 1.0}, {"sigma": 0.5, "t_eval": 86400.0},
                     {"sigma": 1.0, "t_eval": 1.0}, {"sigma": 1.0, "t_eval": 86400.0}]
    stored = cn.make_variation("rram", sigma=1.0, read_noise=0.01).to_dict()
    assert cn.make_variation(**{**stored, **sweep[1]}) == RRAM(sigma=0.5, read_noise=0.01, t_eval=86400)
    assert sweep_variations(parse_args(["checkpoint=m.safetensors"])) is None
    with pytest.raises(cn.ConfigError, match="variation.t_eval"):
        sweep_variations(parse_args(["checkpoint=m.safetensors", "variation.t_eval=1d"]))


def test_calibrated_input_ranges_travel_with_the_checkpoint(tmp_path):
    # a model calibrated for a fixed-range DAC must clip the same after export and load, not fail or re-derive
    from correctnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    var = RRAM(sigma=1.0, read_noise=0.0, dac_range=0.5)

    def net():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    model = cn.analogize(net(), var)
    ranges = cn.calibrate_input_ranges(model, [torch.randn(64, 16)])
    assert len(ranges) == 2
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"variation": var.to_dict()})
    loaded, meta = load_checkpoint(path, model=net())
    assert meta["analog"]["input_ranges"] == ranges
    assert {n: layer.input_range for n, layer in cn.analog_layers(loaded).items()} == ranges
    x = 3 * torch.randn(8, 16)
    with torch.no_grad(), cn.chip(model, 5):
        want = model(x)
    with torch.no_grad(), cn.chip(loaded, 5):
        assert torch.equal(loaded(x), want)
    uncalibrated = cn.analogize(nn.Sequential(nn.Linear(16, 4)), var)
    meta = load_checkpoint(save_checkpoint(tmp_path / "u.safetensors", uncalibrated, {"variation": var.to_dict()}),
                           model=nn.Sequential(nn.Linear(16, 4)))[1]
    assert meta["analog"]["input_ranges"] == {}
    import json
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        md = f.metadata()
    bad = json.loads(md["correctnet_meta"])
    bad["analog"]["input_ranges"] = {"nope": 1.0}
    safetensors.torch.save_file(tensors, str(tmp_path / "bad.safetensors"),
                                metadata={**md, "correctnet_meta": json.dumps(bad)})
    with pytest.raises(CheckpointError, match="input_ranges"):
        load_checkpoint(tmp_path / "bad.safetensors", model=net())

"""Training for the periphery: noise-aware training through fixed-range converters, output noise and levels,
weight clipping, learned input ranges and the input-range estimators (correctnet.periphery, correctnet.training,
correctnet.analog.calibrate_input_ranges)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import correctnet as cn
from correctnet.checkpoint import load_checkpoint, save_checkpoint
from correctnet.devices import RRAM
from correctnet.periphery import LearnedInputRanges, clip_weights
from correctnet.seeding import layer_generator
from correctnet.training import TrainConfig, train

# Wan et al. 2022 programming-noise fit at 1 s (µS, powers x^0..x^4), as in aihwkit, copied independently
WAN_1S = (0.348, 16.030, -43.853, 45.393, -16.815)
G_MAX, G_MIN, LEVELS, SIGMA = 40.0, 0.0, 16, 1.0
DAC_RANGE, ADC_RANGE, BITS = 1.0, 2.0, 8


def periphery(output_noise: float, **kw) -> RRAM:
    return RRAM(sigma=SIGMA, read_noise=0.0, g_max=G_MAX, g_min=G_MIN, levels=LEVELS, dac_bits=BITS, adc_bits=BITS,
                dac_range=DAC_RANGE, adc_range=ADC_RANGE, output_noise=output_noise, **kw)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


# -- an independent plain copy of one chip's forward --------------------------------------------------------
def plain_chip_weight(w: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """W' of one chip as plain torch ops, differentiable in ``w`` the way the device model is: the mapping's
    relu, straight-through levels, the clamp at 0 µS (the scale and the noise std are constants of the chip)."""
    s = w.detach().abs().max()
    k = (G_MAX - G_MIN) / s
    step = (G_MAX - G_MIN) / (LEVELS - 1)
    wd = w.detach()
    cells, alive = [], []
    for sign, e in ((1.0, eps[0]), (-1.0, eps[1])):
        g = G_MIN + k * torch.relu(sign * wd)
        g = G_MIN + torch.round((g - G_MIN) / step).clamp(0, LEVELS - 1) * step
        x = g / G_MAX
        std = torch.zeros_like(g)
        for c in reversed(WAN_1S):
            std = std * x + c
        pre = g + SIGMA * (std * (G_MAX / 40.0)) * e
        cells.append(pre.clamp_min(0.0))
        alive.append(pre > 0)
    value = (cells[0] - cells[1]) * (s / (G_MAX - G_MIN))
    slope = ((wd > 0) & alive[0]) | ((wd < 0) & alive[1])  # dW'/dW: 1 where the driven cell is not clamped
    return value + slope * (w - wd)


def plain_converter(x: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Clip to [-full, full] (no gradient beyond), round to the signed 8-bit grid (straight-through)."""
    c = torch.maximum(torch.minimum(x, full), -full)
    n = 2 ** (BITS - 1) - 1
    q = torch.round(c.detach() / full * n) * (full / n)
    return c + (q - c).detach()


def plain_forward(x, weights, biases, ranges, output_noise, eps_w, eps_out, record=None):
    """The tiny net on one chip: per analog layer DAC -> crossbar -> output noise -> ADC -> digital bias."""
    h = x
    for i, (w, b, r) in enumerate(zip(weights, biases, ranges)):
        if i == 1:
            h = torch.relu(h).flatten(1)
        wc = plain_chip_weight(w, eps_w[i])
        X = torch.tensor(DAC_RANGE * r)
        xq = plain_converter(h, X)
        y = F.conv2d(xq, wc) if w.dim() == 4 else F.linear(xq, wc)
        Y = ADC_RANGE * w.detach().abs().max() * X
        if output_noise > 0:
            y = y + (output_noise * Y) * eps_out[i](y.shape)
        if record is not None:
            record.append(((h.abs() > X).float().mean().item(), (y.abs() > Y).float().mean().item()))
        h = plain_converter(y, Y) + (b.view(-1, 1, 1) if w.dim() == 4 else b)
    return h


def draws(names, shapes, seed, training: bool):
    """The static draws and output-noise draws of each layer as the device model seeds them: a chip (seed) draws
    weights from (seed, layer) and reads from (seed, layer + ':read'); noise-aware training draws both from the
    one stream (seed, layer), weights first."""
    eps_w, eps_out = [], []
    for name, shape in zip(names, shapes):
        wg = layer_generator(seed, name)
        og = wg if training else layer_generator(seed, name + ":read")
        eps_w.append(torch.randn((2, *shape), generator=wg))
        eps_out.append(lambda sh, g=og: torch.randn(sh, generator=g))
    return eps_w, eps_out


@pytest.mark.parametrize("output_noise", [0.0, 0.02])
def test_training_forward_is_the_plain_periphery_and_the_evaluated_chip(output_noise):
    torch.manual_seed(1)
    model = cn.analogize(tiny_net(), periphery(output_noise))
    layers = list(cn.analog_layers(model).values())
    cn.calibrate_input_ranges(model, [torch.randn(32, 1, 8, 8)])
    ranges = [layer.input_range for layer in layers]
    x0 = 2 * torch.randn(16, 1, 8, 8)  # larger than the calibration data: the DAC clips
    g = torch.randn(16, 5)
    seed = 12345

    def run_model(mode):
        x = x0.clone().requires_grad_()
        model.zero_grad()
        ctx = cn.noise_aware(model, seed) if mode == "train" else cn.chip(model, seed)
        model.train(mode == "train")
        with ctx:
            out = model(x)
        (out * g).sum().backward()
        return out.detach(), x.grad, [l.nominal().grad.clone() for l in layers], [l.bias.grad.clone() for l in layers]

    def run_plain(training, record=None):
        x = x0.clone().requires_grad_()
        ws = [l.nominal().detach().clone().requires_grad_() for l in layers]
        bs = [l.bias.detach().clone().requires_grad_() for l in layers]
        eps_w, eps_out = draws([l.analog_name for l in layers], [w.shape for w in ws], seed, training)
        out = plain_forward(x, ws, bs, ranges, output_noise, eps_w, eps_out, record)
        (out * g).sum().backward()
        return out.detach(), x.grad, [w.grad for w in ws], [b.grad for b in bs]

    with cn.chip(model, seed):  # the chip's draws as the model holds them are the ones the test makes
        assert torch.equal(layers[0].chip_noise(), draws(["0"], [layers[0].weight.shape], seed, False)[0][0])
    saturated: list = []
    for mode in ("train", "eval"):
        got, want = run_model(mode), run_plain(mode == "train", saturated)
        assert torch.allclose(got[0], want[0], atol=1e-5, rtol=1e-5), mode
        assert torch.allclose(got[1], want[1], atol=1e-6, rtol=1e-5), mode                # d/d input
        for a, b in zip(got[2] + got[3], want[2] + want[3]):                              # d/d nominal weight, bias
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), mode
        if mode == "train":
            trained = got
    # the converters do clip here: every layer's DAC and the conv layer's ADC saturate on some values
    assert all(dac > 0 for dac, _ in saturated) and saturated[0][1] > 0, saturated
    dac_clipped = x0.abs() > DAC_RANGE * ranges[0]
    assert torch.all(trained[1][dac_clipped] == 0) and (trained[1][~dac_clipped] != 0).float().mean() > 0.5
    if output_noise == 0:  # the training forward of chip `seed` is the evaluation forward of that chip
        evaluated = run_model("eval")
        for a, b in zip([trained[0], trained[1], *trained[2], *trained[3]],
                        [evaluated[0], evaluated[1], *evaluated[2], *evaluated[3]]):
            assert torch.equal(a, b)


def test_saturated_adc_outputs_pass_no_gradient():
    torch.manual_seed(0)
    model = cn.analogize(nn.Sequential(nn.Linear(32, 16)), RRAM(sigma=0.0, read_noise=0.0, dac_range=1.0,
                                                                  dac_bits=8, adc_range=0.5, adc_bits=8))
    layer = model[0]
    cn.calibrate_input_ranges(model, [torch.randn(64, 32)])
    x = torch.randn(64, 32, requires_grad=True)
    with cn.noise_aware(model, 0):
        out = model(x)
    X = layer.input_range
    Y = 0.5 * layer.weight.detach().abs().max() * X
    pre = F.linear(x.detach().clamp(-X, X), layer.weight.detach())
    sat = pre.abs() > Y * 1.01
    assert sat.any() and (~sat).any()
    assert torch.allclose((out - layer.bias)[sat].abs(), Y.expand(int(sat.sum())), rtol=1e-6)
    (out * sat).sum().backward()  # only saturated outputs: nothing reaches the input or the weight
    assert torch.all(x.grad == 0) and torch.all(layer.weight.grad == 0)
    x.grad, layer.weight.grad = None, None
    with cn.noise_aware(model, 0):
        (model(x) * ~sat).sum().backward()
    assert x.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0


def test_training_output_noise_has_its_std_and_is_fresh_every_forward():
    torch.manual_seed(0)
    f, r = 0.02, 64.0  # no clipping at this adc_range
    model = cn.analogize(nn.Sequential(nn.Linear(32, 256)), RRAM(sigma=0.0, read_noise=0.0, dac_range=1.0,
                                                                   adc_range=r, output_noise=f))
    layer = model[0]
    cn.calibrate_input_ranges(model, [torch.randn(64, 32)])
    x = torch.randn(64, 32)
    clean = F.linear(x, layer.weight.detach())
    Y = r * layer.weight.detach().abs().max() * layer.input_range
    model.train()
    with torch.no_grad(), cn.noise_aware(model, 3):
        a, b = model(x) - layer.bias, model(x) - layer.bias
    z = ((a - clean) / (f * Y)).double()
    n = z.numel()
    assert z.mean().item() == pytest.approx(0.0, abs=5 / math.sqrt(n))
    assert z.std().item() == pytest.approx(1.0, abs=5 / math.sqrt(2 * n))
    assert not torch.equal(a, b)


def test_train_runs_the_converters_in_its_forward():
    torch.manual_seed(0)
    var = RRAM(sigma=1.0, read_noise=0.01, dac_range=1.0, dac_bits=6, adc_range=3.0, adc_bits=6, output_noise=0.01,
               levels=16)
    model = cn.analogize(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), var)
    data = (torch.randn(96, 16), torch.randint(0, 4, (96,)))
    cn.calibrate_input_ranges(model, [data[0]])
    seen, scale = [], {}

    def on_step(i):  # before the step's forward: the full scale of each ADC at this step's nominal weights
        for n, layer in cn.analog_layers(model).items():
            scale[n] = var.adc_range * layer.nominal().detach().abs().max() * var.dac_range * layer.input_range

    def hook(layer, inputs, out):
        if layer.analog_name in scale:
            Y = scale[layer.analog_name]
            k = (out.detach() - layer.bias.detach()) / (Y / 31)
            seen.append((layer.analog_mode, (k - k.round()).abs().max().item(), (k.abs() <= 31 + 1e-4).all().item()))

    for layer in cn.analog_layers(model).values():
        layer.register_forward_hook(hook)
    train(model, data, None, TrainConfig(epochs=1, batch_size=32, noise_aware=True), progress=False, on_step=on_step)
    training = [s for s in seen if s[0] == "noisy"]
    assert len(training) == 6  # 3 steps x 2 layers
    assert all(off < 1e-3 and inside for _, off, inside in training)  # on the ADC grid, within its range


# -- weight clipping ------------------------------------------------------------------------------------------
def mixed_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def clipped(w, c, per_channel):
    bound = c * (w.std(1, keepdim=True) if per_channel else w.std())
    return torch.maximum(torch.minimum(w, bound), -bound)


def test_clip_weights_clips_analog_weights_only():
    model = cn.analogize(mixed_net(), cn.make_variation("lognormal", sigma=0.1), exclude=["4"], digital=["4.weight"])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 3 * torch.rand_like(p))  # outliers everywhere
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert clip_weights(model, 1.5) == 2
    for layer_name in ("0", "2"):
        w0 = before[f"{layer_name}.weight"]
        bound = 1.5 * w0.std()
        assert torch.equal(model.state_dict()[f"{layer_name}.weight"], w0.clamp(-bound, bound))
    for k in ("0.bias", "2.bias", "4.weight", "4.bias"):  # digital parameters untouched
        assert torch.equal(model.state_dict()[k], before[k]), k
    model.load_state_dict(before)
    clip_weights(model, 1.5, per_channel=True)
    w0 = before["2.weight"]
    bound = 1.5 * w0.std(1, keepdim=True)
    assert torch.equal(model[2].nominal(), torch.maximum(torch.minimum(w0, bound), -bound))
    assert (model[2].nominal().abs().amax(1) < w0.abs().amax(1)).all()


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_clip_holds_after_every_step(per_channel):
    model = cn.analogize(mixed_net(), cn.make_variation("lognormal", sigma=0.3), exclude=["4"], digital=["4.weight"])
    analog = cn.analog_layers(model)
    data = (torch.randn(128, 16), torch.randint(0, 4, (128,)))
    c = 1.2
    stepped, checks = [], []

    def after_step(opt, args, kwargs):  # right after optimizer.step(), before the clip
        stepped.append({n: l.nominal().detach().clone() for n, l in analog.items()})

    def holds():  # the weights now are the last step's weights, clipped at c x their std
        return all(torch.equal(l.nominal().detach(), clipped(stepped[-1][n], c, per_channel)) for n, l in analog.items())

    def on_step(i):
        checks.append(i == len(stepped) and (i == 0 or holds()))

    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, noise_aware=True, weight_clip=c,
                      weight_clip_per_channel=per_channel)
    handle = register_optimizer_step_post_hook(after_step)
    try:
        train(model, data, None, cfg, progress=False, on_step=on_step)
    finally:
        handle.remove()
    assert len(checks) == 8 and all(checks) and len(stepped) == 8 and holds()
    assert all(not torch.equal(s["0"], clipped(s["0"], c, per_channel)) for s in stepped)  # it does clip
    assert model[4].weight.detach().abs().max() > c * model[4].weight.detach().std()  # digital: not clipped


def test_weight_clip_off_and_a_bound_never_reached_change_nothing():
    data = (torch.randn(128, 16), torch.randint(0, 4, (128,)))
    runs = []
    for clip in (None, 1e9):
        model = cn.analogize(mixed_net(), cn.make_variation("lognormal", sigma=0.3))
        train(model, data, None, TrainConfig(epochs=1, batch_size=32, noise_aware=True, weight_clip=clip),
              progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    with pytest.raises(cn.ConfigError, match="weight_clip needs a model with analog layers"):
        train(mixed_net(), data, None, TrainConfig(epochs=1, weight_clip=2.0), progress=False)


@pytest.mark.parametrize("kw, key", [
    (dict(weight_clip=0), "training.weight_clip"), (dict(weight_clip="2"), "training.weight_clip"),
    (dict(weight_clip=math.inf), "training.weight_clip"),
    (dict(weight_clip_per_channel=1), "training.weight_clip_per_channel"),
    (dict(learn_input_ranges=True), "training.learn_input_ranges"),
    (dict(noise_aware=True, learn_input_ranges="yes"), "training.learn_input_ranges"),
    (dict(noise_aware=True, learn_input_ranges=True, input_range_decay=-1), "training.input_range_decay"),
    (dict(input_range_decay=0.1), "training.input_range_decay"),
])
def test_bad_periphery_options_fail_in_one_line(kw, key):
    with pytest.raises(cn.ConfigError, match=key) as e:
        TrainConfig(**kw)
    assert "\n" not in str(e.value)


# -- learned input ranges ---------------------------------------------------------------------------------------
def range_net(var, seed=0):
    torch.manual_seed(seed)
    return cn.analogize(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), var)


RANGED = RRAM(sigma=0.5, read_noise=0.0, dac_range=0.5, dac_bits=8, adc_range=4.0, adc_bits=8, output_noise=0.01)


def test_the_learned_range_gets_the_pact_gradient():
    # auto ADC range and no output noise: the range reaches the loss only through the DAC clip
    var = RRAM(sigma=0.0, read_noise=0.0, dac_range=0.5, dac_bits=8)
    model = range_net(var)
    cn.calibrate_input_ranges(model, [torch.randn(64, 16)])
    learned = LearnedInputRanges(model)
    layer = model[0]
    x, g = torch.randn(32, 16), torch.randn(32, 32)
    with learned.installed(), cn.noise_aware(model, 0):
        assert isinstance(layer.input_range, torch.Tensor) and layer.input_range.requires_grad
        (model[0](x) * g).sum().backward()
    r = learned.ranges["0"]
    X = 0.5 * r.detach()
    clipped = x.abs() > X
    assert clipped.any()
    expect = 0.5 * (clipped * torch.sign(x) * (g @ layer.nominal().detach())).sum()  # d/dR = dac_range * d/dX
    assert r.grad is not None and r.grad != 0
    assert r.grad.item() == pytest.approx(expect.item(), rel=1e-5)
    assert type(layer.input_range) is float and layer.input_range == float(r.detach())  # written back


def test_learned_ranges_move_are_floats_and_travel_with_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = (torch.randn(256, 16), torch.randint(0, 4, (256,)))
    model = range_net(RANGED)
    cn.calibrate_input_ranges(model, [data[0][:64]])
    start = {n: l.input_range for n, l in cn.analog_layers(model).items()}
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.02, noise_aware=True, learn_input_ranges=True)
    train(model, data, None, cfg, progress=False)
    end = {n: l.input_range for n, l in cn.analog_layers(model).items()}
    assert all(type(v) is float for v in end.values())
    assert all(abs(end[n] - start[n]) > 1e-3 * start[n] for n in start), (start, end)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"variation": RANGED.to_dict()})
    loaded, meta = load_checkpoint(path, model=nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
    assert meta["analog"]["input_ranges"] == end
    assert {n: l.input_range for n, l in cn.analog_layers(loaded).items()} == end
    x = 3 * torch.randn(8, 16)
    with torch.no_grad(), cn.chip(model, 5):
        want = model(x)
    with torch.no_grad(), cn.chip(loaded, 5):
        assert torch.equal(loaded(x), want)
    # the decay term pulls the ranges down
    decayed = range_net(RANGED)
    cn.calibrate_input_ranges(decayed, [data[0][:64]])
    train(decayed, data, None, TrainConfig(epochs=2, batch_size=32, lr=0.02, noise_aware=True,
                                           learn_input_ranges=True, input_range_decay=1.0), progress=False)
    assert all(decayed[int(n)].input_range < end[n] for n in end)


def test_learned_ranges_need_calibrated_fixed_range_dacs():
    data = (torch.randn(64, 16), torch.randint(0, 4, (64,)))
    cfg = TrainConfig(epochs=1, batch_size=32, noise_aware=True, learn_input_ranges=True)
    with pytest.raises(cn.ConfigError, match=r"correctnet\.calibrate_input_ranges"):
        train(range_net(RANGED), data, None, cfg, progress=False)
    with pytest.raises(cn.ConfigError, match="numeric dac_range"):
        train(range_net(RRAM(sigma=0.5, dac_bits=8)), data, None, cfg, progress=False)


def test_learned_ranges_resume_bit_identically(tmp_path):
    from correctnet.resume import ResumeStore

    data = (torch.randn(128, 16), torch.randint(0, 4, (128,)))
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.02, noise_aware=True, learn_input_ranges=True,
                      input_range_decay=0.1)

    def fresh():
        m = range_net(RANGED)
        cn.calibrate_input_ranges(m, [data[0][:64]])
        return m

    whole = fresh()
    train(whole, data, None, cfg, progress=False)
    store = ResumeStore(tmp_path, interval_s=0.0)
    first = fresh()
    with pytest.raises(RuntimeError, match="stop"):
        def stop(i):
            if i == 5:
                raise RuntimeError("stop")
        train(first, data, None, cfg, progress=False, resume=store, on_step=stop)
    resumed = fresh()
    train(resumed, data, None, cfg, progress=False, resume=store)
    assert {n: l.input_range for n, l in cn.analog_layers(resumed).items()} == \
        {n: l.input_range for n, l in cn.analog_layers(whole).items()}
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items())


# -- input-range estimators ----------------------------------------------------------------------------------
def conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 6))


def seen_inputs(plain, batches):
    """Inputs of each crossbar layer of the plain network, per batch (forward pre-hooks)."""
    got = {"0": [], "3": []}
    hooks = [plain[int(n)].register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].detach()))
             for n in got]
    with torch.no_grad():
        for b in batches:
            plain(b)
    for h in hooks:
        h.remove()
    return got


def per_vector_max(x):
    return x.abs().flatten(1).amax(1)  # conv: one sample's whole input map; Linear [N, F]: each row


def nearest_rank(v, percentile):
    v = v.sort().values
    return v[max(0, math.ceil(percentile / 100 * v.numel()) - 1)].item()


BATCHES = [s * torch.randn(8, 2, 6, 6) for s in (1.0, 3.0, 0.5)]


@pytest.mark.parametrize("percentile", [100.0, 80.0])
def test_max_and_moving_max_estimators(percentile):
    plain = conv_net()
    model = cn.analogize(plain, RRAM(sigma=0.5, dac_range=1.0, dac_bits=8))
    got = seen_inputs(plain, BATCHES)
    ranges = cn.calibrate_input_ranges(model, BATCHES, percentile)
    assert ranges == {n: nearest_rank(torch.cat([per_vector_max(x) for x in xs]), percentile)
                      for n, xs in got.items()}
    moving = cn.calibrate_input_ranges(model, BATCHES, percentile, estimator="moving_max", momentum=0.75)
    for n, xs in got.items():
        r = None
        for x in xs:
            b = nearest_rank(per_vector_max(x), percentile)
            r = b if r is None else 0.75 * r + 0.25 * b
        assert moving[n] == pytest.approx(r, rel=1e-12)
        assert model[int(n)].input_range == moving[n]


def test_std_estimator():
    plain = conv_net()
    model = cn.analogize(plain, RRAM(sigma=0.5, dac_range=1.0, dac_bits=8))
    got = seen_inputs(plain, BATCHES)
    ranges = cn.calibrate_input_ranges(model, BATCHES, estimator="std", std_factor=2.5)
    for n, xs in got.items():
        want = 2.5 * torch.cat([x.flatten() for x in xs]).double().std().item()
        assert ranges[n] == pytest.approx(want, rel=1e-6)
    assert cn.calibrate_input_ranges(model, BATCHES, estimator="std")["0"] == pytest.approx(ranges["0"] * 3 / 2.5)


def test_batch_statistics_ranges_follow_a_training_steps_batchnorm_and_leave_its_statistics():
    """Before training, BatchNorm's running statistics (mean 0, var 1) describe no activation: with
    ``batch_statistics`` the Linear layer's range is what a training step feeds it (BatchNorm on the batch's own
    mean and biased variance, computed by hand on an independent copy), per batch; running statistics,
    ``num_batches_tracked`` and every module's mode are left as they were."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    with torch.no_grad():
        plain[0].bias.add_(5.0)  # conv outputs far from BatchNorm's initial running mean 0
    ref = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(1)
    batches = [scale * torch.randn(8, 2, 6, 6, generator=g) for scale in (1.0, 3.0, 0.5)]
    model = cn.analogize(plain, RRAM(sigma=0.5, dac_range=1.0, dac_bits=8))
    model.train()
    model[1].eval()  # a mixed state, to be restored
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    ranges = cn.calibrate_input_ranges(model, batches, batch_statistics=True)
    want = []
    with torch.no_grad():
        for x in batches:
            h = ref[0](x)
            mean, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
            h = (h - mean) / torch.sqrt(var + ref[1].eps) * ref[1].weight.view(1, -1, 1, 1) + ref[1].bias.view(1, -1, 1, 1)
            want.append(per_vector_max(torch.relu(h).flatten(1)))
    assert ranges["4"] == pytest.approx(torch.cat(want).max().item(), rel=1e-6)
    # running statistics: conv outputs ~5 unnormalized
    eval_mode = cn.calibrate_input_ranges(model, batches, batch_statistics=False)["4"]
    assert eval_mode > 3 * ranges["4"]
    # the default: this BatchNorm never saw a batch, so batch statistics
    assert cn.calibrate_input_ranges(model, batches)["4"] == ranges["4"]
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and model[0].training and not model[1].training
    for bad in ("yes", 1):
        with pytest.raises(cn.ConfigError, match="batch_statistics must be true, false or None") as e:
            cn.calibrate_input_ranges(model, batches, batch_statistics=bad)
        assert "\n" not in str(e.value)
    # once its statistics have been updated (one training step), the default uses them, as the chip deploys
    model.train()
    with torch.no_grad():
        model(batches[0])
    assert int(model[1].num_batches_tracked) == 1
    assert cn.calibrate_input_ranges(model, batches)["4"] == cn.calibrate_input_ranges(
        model, batches, batch_statistics=False)["4"] != cn.calibrate_input_ranges(model, batches, batch_statistics=True)["4"]


@pytest.mark.parametrize("kw, match", [
    (dict(estimator="median"), "estimator must be one of"), (dict(estimator="std", std_factor=0), "std_factor"),
    (dict(estimator="std", percentile=90), "percentile"), (dict(estimator="moving_max", momentum=1.0), "momentum"),
    (dict(estimator="moving_max", momentum=True), "momentum"),
])
def test_bad_estimator_options_fail_in_one_line(kw, match):
    model = cn.analogize(conv_net(), RRAM(sigma=0.5, dac_range=1.0))
    with pytest.raises(cn.ConfigError, match=match) as e:
        cn.calibrate_input_ranges(model, BATCHES, **kw)
    assert "\n" not in str(e.value)


# -- the device model's one-node gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(sigma=1.0, levels=16), dict(sigma=0.5, programming="lognormal", mapping="channel"),
    dict(sigma=1.0, stuck_fraction=0.2, stuck_high=0.3, levels=8),
    dict(sigma=1.0, t_eval=86400, drift_compensation="global", read_noise=0.02),
    dict(sigma=1.0, tile_rows=16, tile_cols=8, mapping="channel"),
])
def test_the_read_weight_has_autograds_gradient_through_every_stage(kw):
    # apply_read joins its no-graph value to the weight with one node: autograd's gradient through the stages
    v = RRAM(**kw)
    torch.manual_seed(0)
    w = torch.randn(12, 40, requires_grad=True)
    noise = v.sample(w, layer_generator(3, "w"))
    g = torch.randn(12, 40)
    fast = v.apply_read(w, noise, layer_generator(3, "r"))
    (fast * g).sum().backward()
    got, w.grad = w.grad.clone(), None
    s = v.scale(w)
    cells = v.conductances(w, noise, layer_generator(3, "r"))  # the stages with autograd, op by op
    ref = (cells[0] - cells[1]) * (s / (v.g_max - v.g_min))
    if v.drift_compensation == "global":
        static = v.conductances(w, noise).detach()
        ref = ref * v.drift_factor(w, (static[0] - static[1]) * (s / (v.g_max - v.g_min)))
    assert torch.equal(fast.detach(), ref.detach())
    (ref * g).sum().backward()
    assert torch.equal(got, w.grad)  # autograd's gradient bit for bit (same products in the same order)
    assert (got != 0).any()
    with torch.no_grad():
        assert torch.equal(v.apply_read(w, noise, layer_generator(3, "r")), fast.detach())


def test_clip_quantize_values_and_gradients_per_channel():
    from correctnet.devices import clip_quantize

    torch.manual_seed(0)
    x = (3 * torch.randn(16, 64)).requires_grad_()
    f = (0.5 + torch.rand(16, 1)).requires_grad_()
    out = clip_quantize(x, f, 6)
    n = 31
    c = torch.maximum(torch.minimum(x, f), -f)  # the straight-through form, op by op
    ref = c + (torch.round(c.detach() / f.detach() * n) * (f.detach() / n) - c).detach()
    assert torch.equal(out.detach(), ref.detach())
    g = torch.randn(16, 64)
    gx, gf = torch.autograd.grad((out * g).sum(), (x, f))
    xd, fd = x.detach(), f.detach()
    assert torch.equal(gx, g * (xd.abs() < fd))
    want = (g * ((xd >= fd).float() - (xd <= -fd).float())).sum(1, keepdim=True)  # PACT: sign(x) where clipped
    assert torch.allclose(gf, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(clip_quantize(x, f, 6), out.detach())

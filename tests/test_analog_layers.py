"""Every analog layer kind computes with exactly the chip's weights, in every mode PyTorch can run it in.

The chip's weights are re-derived here independently of the analog layers (``variation.sample`` from
``layer_generator(seed, weight_key(layer, parameter))``) and written into a plain deep copy of the model;
both must then give the same outputs, in train and eval mode, with and without gradients (the eval +
no_grad case is where PyTorch's fused Transformer/attention fast paths would read the nominal weights).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.analog import DigitalWeightsWarning
from correctnet.compensation import attach_compensation, compensators, overhead, resolve_placement
from correctnet.placement.evaluator import layer_info
from correctnet.seeding import layer_generator, weight_key

VAR = cn.LogNormal(0.5)
E = 16


class Net(nn.Module):
    """Wraps one layer kind; tuple outputs (attention, recurrent) give their first element."""

    def __init__(self, body: nn.Module, **call_kwargs):
        super().__init__()
        self.body = body
        self.call_kwargs = call_kwargs

    def forward(self, *args):
        out = self.body(*args, **self.call_kwargs)
        return out[0] if isinstance(out, tuple) else out


class SelfAttn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 4, batch_first=True, **kw)

    def forward(self, x, kpm):
        return self.attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]


class CrossAttn(nn.Module):  # kdim/vdim differ: separate q/k/v projection weights, sequence-first
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, 2, kdim=6, vdim=10)

    def forward(self, q, k, v):
        out, w = self.attn(q, k, v, need_weights=True)
        return out + w.sum()


def _padding(n=3, s=5):
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[0, 3:] = True
    kpm[2, 4:] = True
    return kpm


def _kinds():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    kpm = _padding()
    valid = (~kpm).unsqueeze(-1)  # the nested fast path zeroes padded positions: compare the others
    enc = lambda: nn.TransformerEncoderLayer(E, 4, 32, dropout=0.0, batch_first=True)  # noqa: E731
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    return {
        "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), (r(4, 6),), None),
        "conv1d_grouped": (lambda: nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Conv1d(6, 6, 3, groups=6)),
                           (r(2, 4, 9),), None),
        "conv2d_grouped_depthwise": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=4, padding=1), nn.ReLU(),
                                                           nn.Conv2d(8, 8, 3, groups=8, stride=2)),
                                     (r(2, 4, 6, 6),), None),
        "conv3d_grouped_depthwise": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3, groups=2, padding=1),
                                                           nn.Conv3d(4, 4, (1, 3, 3), groups=4)),
                                     (r(1, 2, 4, 5, 5),), None),
        "mha_self": (lambda: SelfAttn(), (r(3, 5, E), kpm), valid),
        "mha_cross_kdim_vdim": (lambda: CrossAttn(), (r(4, 2, E), r(7, 2, 6), r(7, 2, 10)), None),
        "encoder_layer": (lambda: Net(enc()), (r(3, 5, E), None, kpm), valid),
        "encoder_stack": (lambda: Net(nn.TransformerEncoder(enc(), 2, enable_nested_tensor=True)),
                          (r(3, 5, E), None, kpm), valid),
        "decoder_layer": (lambda: Net(nn.TransformerDecoderLayer(E, 4, 32, dropout=0.0, batch_first=True),
                                      tgt_mask=causal, tgt_is_causal=True),
                          (r(2, 4, E), r(2, 6, E)), None),
        "lstm_2layer_bidir_proj": (lambda: Net(nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)),
                                   (r(7, 2, 4),), None),
        "gru": (lambda: Net(nn.GRU(4, 5, num_layers=2, batch_first=True)), (r(2, 7, 4),), None),
        "rnn": (lambda: Net(nn.RNN(4, 5, nonlinearity="relu", bidirectional=True)), (r(7, 2, 4),), None),
    }


KINDS = _kinds()


def build(kind):
    make, inputs, valid = KINDS[kind]
    torch.manual_seed(0)
    plain = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these models leaves a weight digital
        model = cn.analogize(plain, VAR)
    return plain, model, inputs, valid


def expected_analog_params(module: nn.Module) -> list[str]:
    """What the docs say becomes analog, derived from the plain module (not from the analog layer)."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention):
        return ["in_proj_weight"] if module.in_proj_weight is not None else ["q_proj_weight", "k_proj_weight",
                                                                               "v_proj_weight"]
    if isinstance(module, nn.RNNBase):
        return [n for n, _ in module.named_parameters() if n.startswith("weight_")]
    return []


def chip_reference(plain: nn.Module, seed: int, variation=VAR) -> nn.Module:
    """A plain copy holding chip ``seed``'s weights, re-derived from the documented seeding."""
    ref = copy.deepcopy(plain)
    keys: dict[int, str] = {}
    with torch.no_grad():
        for name, m in ref.named_modules():
            for p in expected_analog_params(m):
                w = getattr(m, p)
                if id(w) in keys:  # a tied weight: already written
                    continue
                keys[id(w)] = weight_key(name, p)
                w.copy_(variation.apply(w, variation.sample(w, layer_generator(seed, keys[id(w)]))))
    return ref


def set_mode(model, train):
    model.train(train)
    return model


# ----------------------------------------------------------------------------- every kind


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_expected_weight_is_analog_and_tied_state_dict_unchanged(kind):
    plain, model, _, _ = build(kind)
    expected = {f"{n}.{p}" for n, m in plain.named_modules() for p in expected_analog_params(m)}
    got = {f"{n}.{p}" for n, l in cn.analog_layers(model).items() for p in l.analog_parameters}
    assert got == expected and expected
    assert list(model.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_chip_seed_same_output(kind):
    _, model, x, _ = build(kind)
    model.eval()
    with torch.no_grad():
        with cn.chip(model, 7):
            a = model(*x)
        with cn.chip(model, 7):
            b = model(*x)
        with cn.chip(model, 8):
            c = model(*x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_computes_with_the_chips_weights(kind, train, grad):
    plain, model, x, valid = build(kind)
    ref = set_mode(chip_reference(plain, 11), train)
    set_mode(model, train)
    with torch.set_grad_enabled(grad), cn.chip(model, 11):
        got, want = model(*x), ref(*x)
        nom = set_mode(plain, train)(*x)
    if valid is not None:
        got, want, nom = got * valid, want * valid, nom * valid
    assert not torch.allclose(want, nom, atol=1e-3)  # the chip does change the output
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_nominal_weights_bit_identical_after_chips_and_training_forwards(kind):
    _, model, x, _ = build(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with cn.chip(model, 3):
        model(*x).square().sum().backward()
    with cn.noise_aware(model, 4):
        model(*x).square().sum().backward()
    model.eval()
    with torch.no_grad(), cn.chip(model, 5):
        model(*x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is not None for n, p in model.named_parameters() if "weight" in n)  # gradients flow


@pytest.mark.parametrize("kind", list(KINDS))
def test_off_mode_equals_the_original_exactly(kind):
    plain, model, x, _ = build(kind)
    for train in (True, False):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                assert torch.equal(set_mode(model, train)(*x), set_mode(plain, train)(*x)), (train, grad)


@pytest.mark.parametrize("kind", ["encoder_stack", "mha_self", "lstm_2layer_bidir_proj"])
def test_chip_copy_and_monte_carlo_work_on_the_new_kinds(kind):
    plain, model, x, valid = build(kind)
    model.eval()
    plain_copy = cn.chip_copy(model, 21)
    assert [type(m) for m in plain_copy.modules()] == [type(m) for m in plain.modules()]
    with torch.no_grad(), cn.chip(model, 21):
        got, want = model(*x), plain_copy.eval()(*x)
    if valid is not None:
        got, want = got * valid, want * valid
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert cn.digitize(model).state_dict().keys() == plain.state_dict().keys()


def test_monte_carlo_on_a_small_transformer_classifier():
    torch.manual_seed(0)
    net = TinyTransformer()
    model = cn.analogize(net, VAR, digital=["embed.weight"])
    x, y = torch.randn(40, 6, 4), torch.randint(0, 3, (40,))
    res = cn.monte_carlo(model, (x, y), n_chips=3, progress=False)
    clean = cn.clean_accuracy(model, (x, y))
    assert res.n_chips == 3 and len(set(res.accuracies)) >= 1
    with torch.no_grad():
        with cn.chip(model, res.chip_seeds[0]):
            acc0 = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert acc0 == pytest.approx(res.accuracies[0]) and 0 <= clean <= 1


# ----------------------------------------------------------------------------- attention specifics

MHA_CASES = {
    "seq_first_weights": dict(batch_first=False, need_weights=True),
    "per_head_weights": dict(batch_first=True, need_weights=True, average=False),
    "bool_2d_mask": dict(batch_first=True, need_weights=False, mask="bool2d"),
    "float_3d_mask_weights": dict(batch_first=True, need_weights=True, mask="float3d"),
    "causal": dict(batch_first=True, need_weights=False, mask="causal"),
    "causal_with_padding": dict(batch_first=True, need_weights=False, mask="causal", kpm=True),
    "float_padding": dict(batch_first=True, need_weights=True, kpm="float"),
    "zero_attn_bias_kv": dict(batch_first=True, need_weights=True, add_zero_attn=True, add_bias_kv=True, kpm=True,
                              mask="bool2d"),
    "no_bias": dict(batch_first=False, need_weights=False, bias=False),
    "unbatched": dict(batch_first=True, need_weights=True, unbatched=True),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_analog_attention_matches_pytorch_attention_for_every_option(case):
    c = MHA_CASES[case]
    torch.manual_seed(0)
    plain = nn.Sequential(nn.MultiheadAttention(E, 4, batch_first=c["batch_first"], bias=c.get("bias", True),
                                                add_bias_kv=c.get("add_bias_kv", False),
                                                add_zero_attn=c.get("add_zero_attn", False)))
    model = cn.analogize(plain, VAR)
    n, l = 3, 5
    x = torch.randn(n, l, E) if c["batch_first"] else torch.randn(l, n, E)
    kw = dict(need_weights=c["need_weights"])
    if "average" in c:
        kw["average_attn_weights"] = c["average"]
    if c.get("mask") == "bool2d":
        kw["attn_mask"] = torch.rand(l, l) < 0.3
        kw["attn_mask"].fill_diagonal_(False)
    elif c.get("mask") == "float3d":
        kw["attn_mask"] = torch.randn(n * 4, l, l)
    elif c.get("mask") == "causal":
        kw["attn_mask"], kw["is_causal"] = nn.Transformer.generate_square_subsequent_mask(l), True
    if c.get("kpm"):
        kpm = _padding(n, l)
        kw["key_padding_mask"] = kpm if c["kpm"] is True else kpm.float() * -1e4
    if c.get("unbatched"):
        x = x[0]
    ref = chip_reference(plain, 5)
    for train in (True, False):
        with torch.no_grad(), cn.chip(model, 5):
            got = set_mode(model, train)[0](x, x, x, **kw)
            want = set_mode(ref, train)[0](x, x, x, **kw)
            nom = set_mode(plain, train)[0](x, x, x, **kw)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
        assert not torch.allclose(got[0], nom[0], atol=1e-3)
        if kw["need_weights"]:
            torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-4)
        else:
            assert got[1] is None
        with torch.no_grad():  # off mode: PyTorch's own forward
            off, orig = set_mode(model, train)[0](x, x, x, **kw), plain[0](x, x, x, **kw)
        assert torch.equal(off[0], orig[0])


def test_attention_converters_quantize_the_in_projections():
    plain = nn.Sequential(nn.MultiheadAttention(E, 4, batch_first=True))
    rram = cn.make_variation("rram", 0.0, dac_bits=3, adc_bits=3)
    model = cn.analogize(plain, rram)
    x = torch.randn(2, 5, E)
    with torch.no_grad(), cn.chip(model, 0):
        out = model[0](x, x, x)[0]
    assert not torch.allclose(out, plain[0](x, x, x)[0], atol=1e-4)  # sigma 0: only the converters act


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, E)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, 4, 32, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.enc(self.embed(x)).mean(1))


def test_compensators_only_where_they_run_and_out_proj_is_counted_and_acts():
    torch.manual_seed(0)
    model = cn.analogize(TinyTransformer(), VAR).eval()
    with pytest.raises(cn.ConfigError, match="cannot carry a compensator"):
        attach_compensation(model, ["enc.layers.0.self_attn"])
    assert "enc.layers.0.self_attn" not in resolve_placement(model, "all")
    assert "enc.layers.0.self_attn.out_proj" in resolve_placement(model, "all")
    comps = attach_compensation(model, ["*out_proj"], kind="output", rank=2)
    x = torch.randn(4, 6, 4)
    with torch.no_grad(), cn.chip(model, 1):
        before = model(x)
        comps["enc.layers.0.self_attn.out_proj"].gamma.fill_(0.5)
        after = model(x)
    assert not torch.allclose(before, after)  # the out_proj compensator really runs (under a chip, eval, no_grad)
    with torch.no_grad():
        off = model(x)
        comps["enc.layers.0.self_attn.out_proj"].gamma.zero_()
        assert not torch.allclose(off, model(x))  # and in off mode too
    ov = overhead(model, x[:1])
    lay = ov["layers"]["enc.layers.0.self_attn.out_proj"]
    comp = compensators(model)["enc.layers.0.self_attn.out_proj"]
    assert lay["params"] == sum(p.numel() for p in comp.parameters()) - E  # out_proj's bias register holds beta
    assert lay["macs"] == 6 * (E * 2 + 2 * E + E)  # down, up, affine per position
    # network MACs: embed, in-projection (3 E^2 per position), out_proj, linear1/2, head
    assert ov["network"]["macs"] == 6 * (4 * E + 3 * E * E + E * E + 2 * E * 32) + E * 3


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.spare = nn.Linear(4, 4)  # never called

    def forward(self, x):
        return self.fc(x)


def test_overhead_counts_only_compensators_that_run():
    model = cn.analogize(WithUnused(), VAR)
    attach_compensation(model, "all", rank=2)
    ov = overhead(model, torch.randn(1, 4))
    assert ov["layers"]["spare"] == {"params": 0, "macs": 0, "params_pct": 0.0, "macs_pct": 0.0}
    assert ov["layers"]["fc"]["params"] > 0


def test_layer_info_and_lipschitz_on_an_attention_model():
    torch.manual_seed(0)
    model = cn.analogize(TinyTransformer(), VAR)
    names = [n for n, l in cn.analog_layers(model).items() if l.can_compensate]
    info = layer_info(model, names, torch.randn(1, 6, 4))
    by = {i["name"]: i for i in info}
    assert by["enc.layers.0.self_attn.out_proj"]["macs_share"] > 0
    assert sum(i["macs_share"] for i in info) == pytest.approx(1.0)
    consts = cn.lipschitz_constants(model, torch.randn(1, 6, 4))
    assert set(consts) == set(names)
    prof = cn.error_profile(model, torch.randn(4, 6, 4), n_chips=2)
    assert "enc.layers.0.self_attn" in prof and prof["output"]["mean"] > 0


def test_layer_types_linear_only_keeps_a_digital_attentions_out_proj_digital():
    torch.manual_seed(0)
    plain = TinyTransformer()
    with pytest.warns(DigitalWeightsWarning, match=r"enc\.layers\.0\.self_attn\.out_proj\.weight \(the nn\.Multi"):
        model = cn.analogize(plain, VAR, layer_types=[nn.Linear])
    assert "enc.layers.0.self_attn.out_proj" not in cn.analog_layers(model)
    x = torch.randn(2, 6, 4)
    ref = chip_reference(plain, 2)
    with torch.no_grad():  # the analog linear1/linear2 are not skipped by the fast path either
        ref.enc.layers[0].self_attn.in_proj_weight.copy_(plain.enc.layers[0].self_attn.in_proj_weight)
        ref.enc.layers[0].self_attn.out_proj.weight.copy_(plain.enc.layers[0].self_attn.out_proj.weight)
        with cn.chip(model, 2):
            torch.testing.assert_close(model.eval()(x), ref.eval()(x), atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- tied weights


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_tied_weight_is_one_set_of_cells():
    torch.manual_seed(0)
    plain = Tied()
    model = cn.analogize(plain, VAR)
    la, lb = cn.analog_layers(model)["a"], cn.analog_layers(model)["b"]
    x = torch.randn(3, 5)
    with torch.no_grad(), cn.chip(model, 9):
        assert torch.equal(la.analog_weight(), lb.analog_weight())
        got = model(x)
    ref = chip_reference(plain, 9)  # one draw, key "a", seen by both uses
    assert ref.a.weight is ref.b.weight
    torch.testing.assert_close(got, ref(x), atol=1e-6, rtol=1e-5)
    # chip_copy keeps the tie holding the one draw
    c = cn.chip_copy(model, 9)
    assert c.a.weight is c.b.weight and torch.allclose(c(x), got, atol=1e-6)


class EmbedTied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.pos = nn.Parameter(torch.randn(1, 4, 6))
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(self.emb(idx) + self.pos)


# ----------------------------------------------------------------------------- digital weights are reported


def test_weights_left_digital_are_warned_once_by_name_and_strict_refuses():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = cn.analogize(EmbedTied(), VAR)
    digital = [w for w in rec if issubclass(w.category, DigitalWeightsWarning)]
    assert len(digital) == 1
    msg = str(digital[0].message)
    assert "emb.weight (nn.Embedding: a lookup table" in msg and "also the analog out.weight" in msg
    assert "pos (a parameter of EmbedTied used by its own forward" in msg
    assert "out.bias" not in msg and list(cn.analog_layers(model)) == ["out"]
    with pytest.raises(cn.ConfigError, match="strict=True") as err:
        cn.analogize(EmbedTied(), VAR, strict=True)
    assert "emb.weight (" in str(err.value) and "pos (" in str(err.value)
    with pytest.warns(DigitalWeightsWarning, match=r"fc\.weight \(excluded by exclude=\['fc'\]\)"):
        cn.analogize(WithUnused(), VAR, exclude=["fc"])


def test_declared_digital_parameters_are_not_warned():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cn.analogize(EmbedTied(), VAR, digital=["emb.*", "pos"], strict=True)

        class Declared(EmbedTied):
            digital_parameters = ("emb.weight", "pos")

        cn.analogize(nn.Sequential(Declared()), VAR, strict=True)  # patterns relative to the declaring module
    with pytest.raises(cn.ConfigError, match="digital pattern 'posx' matches no parameter"):
        cn.analogize(EmbedTied(), VAR, digital=["posx"])


def test_recurrent_layers_warn_that_converters_do_not_reach_them():
    rram = cn.make_variation("rram", 0.5, adc_bits=6)
    with pytest.warns(UserWarning, match=r"recurrent analog layers \['body'\].*converters"):
        cn.analogize(Net(nn.GRU(3, 4)), rram)


def test_digitize_restores_every_class():
    torch.manual_seed(0)
    plain = TinyTransformer()
    back = cn.digitize(cn.analogize(plain, VAR))
    assert [type(m) for m in back.modules()] == [type(m) for m in plain.modules()]


def test_placement_search_runs_on_a_small_transformer():
    from correctnet.calibration import CompensationConfig
    from correctnet.placement import PlacementEvaluator, SearchConfig, search

    torch.manual_seed(0)
    model = cn.analogize(TinyTransformer(), VAR)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    ev = PlacementEvaluator(model, (x, y), (x[:32], y[:32]),
                            SearchConfig(chips=2, val_images=32, shared_steps=3, batch_size=32),
                            comp_cfg=CompensationConfig(lr=0.01, batch_size=16))
    assert "enc.layers.0.self_attn.out_proj" in ev.names and "enc.layers.0.self_attn" not in ev.names
    assert all(i["macs_share"] > 0 for i in ev.layer_info)
    assert ev.layer_cost[ev.names.index("enc.layers.0.self_attn.out_proj")] > 0
    res = search(ev, "greedy")
    assert res.layers == ev.names and len(res.best.placement) == len(ev.names) and res.evaluations >= 2


def test_unsupported_torch_layers_are_named_as_such():
    with pytest.warns(DigitalWeightsWarning, match=r"cell\.weight_ih \(nn\.LSTMCell is not a layer kind"):
        cn.analogize(nn.ModuleDict({"cell": nn.LSTMCell(3, 4), "fc": nn.Linear(4, 2)}), VAR)


def test_attention_dropout_as_pytorch():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.MultiheadAttention(E, 4, dropout=0.3, batch_first=True))
    model = cn.analogize(plain, VAR).train()
    ref = chip_reference(plain, 3).train()
    x = torch.randn(2, 5, E)
    with cn.chip(model, 3):
        torch.manual_seed(1)
        got = model[0](x, x, x)
        torch.manual_seed(1)
        want = ref[0](x, x, x)
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-4)
    with cn.chip(model, 3):
        a, b = model[0](x, x, x, need_weights=False)[0], model[0](x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b)  # dropout is on in training

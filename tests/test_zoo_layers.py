"""The model zoos' layers under a chip: transformers models built from tiny configs (BERT, GPT-2 with Conv1D and a
tied lm_head, a Llama decoder) and hand-written modules with timm's idioms (a forward reading ``self.qkv.weight``
through ``F.linear``, a Linear subclass with its own forward, a same-padding Conv2d subclass, ``torch.addmm`` on a
layer's weight). Each is checked against an independent plain copy whose parameters hold the chip's weights,
computed here from the drawn noise (``w * exp(sigma * eps)``): outputs in eval + no_grad, outputs and gradients in
train mode (the nominal weight's gradient is the copy's times ``exp(sigma * eps)``, summed over tied uses), and the
nominal weights bit-identical afterwards. The read check finds what bypasses the analog path."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import correctnet as cn
from correctnet.compensation import attach_compensation
from correctnet.tensors import logits_of

SIGMA = 0.3


# ----------------------------------------------------------------------------- timm's idioms, reproduced

class QkvAttention(nn.Module):
    """timm's BEiT/EVA attention: the forward reads qkv.weight itself, with a bias assembled from parameters."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class TimmLinear(nn.Linear):
    """timm.layers.Linear: its own forward, casting the weight to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(dtype=x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(dtype=x.dtype), bias=bias)


class Conv2dSame(nn.Conv2d):
    """timm.layers.Conv2dSame: TensorFlow 'SAME' padding computed from the input, then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        pads = []
        for i, k, s, d in zip((iw, ih), self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            pad = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads += [pad // 2, pad - pad // 2]
        x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class AddmmHead(nn.Module):
    """A head computing ``bias + x W^T`` with torch.addmm on a Linear's parameters."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.fc.bias, x, self.fc.weight.t())


class TimmStyleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dSame(1, 8, 3, stride=2)
        self.attn = QkvAttention(8)
        self.pre = TimmLinear(8, 8)
        self.head = AddmmHead(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)  # [B, tokens, 8]
        t = t + self.attn(t)
        return self.head(torch.tanh(self.pre(t.mean(1))))


# ----------------------------------------------------------------------------- the check

def _factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified parameter name: exp(sigma * eps) in the parameter's stored layout} of the programmed chip."""
    out = {}
    for name, layer in cn.analog_layers(model).items():
        for p in layer.analog_parameters:
            f = torch.exp(SIGMA * layer.chip_noise(p))
            out[f"{name}.{p}" if name else p] = f.t() if layer.transposed else f
    return out


def _plain_copy(plain: nn.Module, factors: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of the plain model where every analog use holds its own Parameter with the chip's weight
    (tied uses untied: a digital user of a tied weight keeps the nominal one)."""
    ref = copy.deepcopy(plain)
    for qual, f in factors.items():
        mod_name, _, pname = qual.rpartition(".")
        mod = ref.get_submodule(mod_name)
        setattr(mod, pname, nn.Parameter(plain.get_parameter(qual).detach() * f))
    return ref


def _names_by_param(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(n)
    return out


def _check_against_plain_copy(plain: nn.Module, inputs: dict, **analogize_kw) -> nn.Module:
    plain.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = cn.analogize(plain, cn.LogNormal(SIGMA), **analogize_kw)
    digital_msgs = " ".join(str(w.message) for w in caught if issubclass(w.category, cn.DigitalWeightsWarning))
    nominal = {k: v.clone() for k, v in model.state_dict().items()}
    analog_ids = {id(l.nominal(p)) for l in cn.analog_layers(model).values() for p in l.analog_parameters}
    for n, p in model.named_parameters(remove_duplicate=False):  # every weight matrix: analog or named digital
        if p.dim() >= 2 and id(p) not in analog_ids:
            assert n in digital_msgs, f"{n} is neither analog nor named digital"

    with warnings.catch_warnings():
        warnings.simplefilter("error", cn.AnalogReadWarning)  # nothing bypasses the analog path
        report = cn.check_reads(model, **inputs)
    assert not report.nominal and not report.problems()

    cn.program_chip(model, 11)
    factors = _factors(model)
    ref = _plain_copy(plain, factors)
    model.eval()
    ref.eval()
    with torch.no_grad():
        out, expected = logits_of(model(**inputs)), logits_of(ref(**inputs))
    assert not torch.allclose(out, logits_of(plain(**inputs)), atol=1e-4)  # the chip changes the output
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)

    model.train()
    ref.train()
    out, expected = logits_of(model(**inputs)), logits_of(ref(**inputs))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    params = dict(model.named_parameters(remove_duplicate=False))  # the nominal Parameters
    for names in _names_by_param(model).values():
        p = params[names[0]]
        want = sum((ref_params[n].grad * factors[n] if n in factors else ref_params[n].grad)
                   for n in names if ref_params[n].grad is not None)
        if isinstance(want, int):  # no use of this parameter reached the output
            assert p.grad is None or not p.grad.any(), names
            continue
        torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-4, msg=f"gradient of {names}")
    cn.set_nominal(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, nominal[k]), f"nominal {k} changed"
    return model


# ----------------------------------------------------------------------------- tests

def test_timm_idioms_compute_with_the_chip():
    torch.manual_seed(0)
    model = _check_against_plain_copy(TimmStyleNet(), {"x": torch.randn(3, 1, 9, 9)})
    layers = cn.analog_layers(model)
    assert set(layers) == {"stem", "attn.qkv", "attn.proj", "pre", "head.fc"}
    assert layers["stem"].foreign_forward and layers["pre"].foreign_forward


def test_bert_classifier_computes_with_the_chip():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = _check_against_plain_copy(transformers.BertForSequenceClassification(cfg),
                                      {"input_ids": torch.randint(0, 60, (2, 7))})
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == len(cn.analog_layers(model)) == 2 * 6 + 2


def test_gpt2_conv1d_and_tied_lm_head_compute_with_the_chip():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    plain = transformers.GPT2LMHeadModel(cfg)
    assert plain.lm_head.weight is plain.transformer.wte.weight  # tied
    model = _check_against_plain_copy(plain, {"input_ids": torch.randint(0, 60, (2, 7))})
    layers = cn.analog_layers(model)
    assert sum(isinstance(l, Conv1D) for l in layers.values()) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj
    assert "lm_head" in layers and layers["transformer.h.0.attn.c_attn"].transposed


def test_llama_decoder_computes_with_the_chip():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = _check_against_plain_copy(transformers.LlamaForCausalLM(cfg), {"input_ids": torch.randint(0, 60, (2, 7))})
    assert len(cn.analog_layers(model)) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head


def test_a_nominal_parameter_held_elsewhere_is_found_and_strict_refuses_it():
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.__dict__["held"] = self.fc.weight  # a plain reference, kept before analogize

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + F.linear(x, self.__dict__["held"])

    model = cn.analogize(Leaky(), cn.LogNormal(SIGMA))
    with pytest.warns(cn.AnalogReadWarning, match=r"fc\.weight is used with its nominal value by \['linear'\]"):
        report = cn.check_reads(model, torch.randn(2, 6))
    assert report.nominal == {"fc.weight": {"linear"}}
    strict = cn.analogize(Leaky(), cn.LogNormal(SIGMA), strict=True)
    with pytest.raises(cn.ConfigError, match=r"fc\.weight is used with its nominal value.*strict=True"):
        cn.monte_carlo(strict, (torch.randn(8, 6), torch.randint(0, 6, (8,))), n_chips=2, progress=False)
    # the library's own nominal reads are not uses
    with cn.nominal_reads():
        assert cn.analog_layers(model)["fc"].weight is cn.analog_layers(model)["fc"].nominal()


def test_a_compensator_whose_layer_forward_never_runs_is_reported():
    torch.manual_seed(0)
    model = cn.analogize(TimmStyleNet(), cn.LogNormal(SIGMA))
    x = torch.randn(2, 1, 9, 9)
    report = cn.check_reads(model, x)
    assert report.outside == {"attn.qkv": {"weight"}, "head.fc": {"weight"}} and not report.problems()
    attach_compensation(model, ["attn.qkv"])
    with pytest.warns(cn.AnalogReadWarning, match=r"the compensator of attn\.qkv never runs: its weight is read "
                                                  r"by another module's forward"):
        cn.check_reads(model, x)
    # training runs the check once per model (and per set of compensators), on its first batch
    data = (torch.randn(8, 1, 9, 9), torch.randint(0, 5, (8,)))
    cfg = cn.training.TrainConfig(epochs=1, batch_size=4, noise_aware=True)
    with pytest.warns(cn.AnalogReadWarning, match="compensator of attn.qkv"):
        cn.training.train(model, data, None, cfg, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cn.AnalogReadWarning)
        cn.training.train(model, data, None, cfg, progress=False)


def test_converters_do_not_act_on_reads_outside_the_layer():
    torch.manual_seed(0)
    v = cn.make_variation("rram", SIGMA, dac_bits=6, adc_bits=6)
    with pytest.warns(UserWarning):  # the foreign forwards (Conv2dSame, TimmLinear) are named at analogize
        model = cn.analogize(TimmStyleNet(), v)
    with pytest.warns(cn.AnalogReadWarning, match=r"attn\.qkv\.weight is read by another module's forward.*"
                                                  r"converters \(DAC/ADC\)"):
        cn.check_reads(model, torch.randn(2, 1, 9, 9))


def test_the_check_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = cn.analogize(TimmStyleNet(), cn.LogNormal(SIGMA))
    model.train()
    cn.set_noise_aware(model, 5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 9, 9)
    rng = torch.get_rng_state()
    cn.check_reads(model, x)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(l.analog_mode == "noisy" for l in cn.analog_layers(model).values())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_per_chip_modes_serve_metadata_and_refuse_computation():
    """K chips in one pass: a forward that only asks a layer's weight for its dtype (transformers' ViT patch
    embedding) runs; one that computes with it is one clear error."""
    torch.manual_seed(0)

    class DtypeReader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.conv.weight
            assert w.shape == (4, 1, 3, 3) and w.device == x.device
            return self.conv(x.to(dtype=w.dtype)).mean((2, 3))

    model = cn.analogize(DtypeReader(), cn.LogNormal(SIGMA)).eval()
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad(), cn.chips(model, [1, 2]):
        both = model(x.repeat(2, 1, 1, 1))
    for k, s in enumerate([1, 2]):
        with torch.no_grad(), cn.chip(model, s):
            torch.testing.assert_close(both[4 * k:4 * (k + 1)], model(x))
    model = cn.analogize(TimmStyleNet(), cn.LogNormal(SIGMA)).eval()
    with torch.no_grad(), cn.chips(model, [1, 2]), pytest.raises(
            cn.ConfigError, match=r"attn\.qkv\.weight is computed with by code outside.*chips_per_pass=1"):
        model(torch.randn(4, 1, 9, 9))


class Dense(nn.Module):
    """A user's layer kind: kernel stored [in, out] (as GPT-2's Conv1D), computed with x @ kernel + offset."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(i, o) / i ** 0.5)
        self.offset = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel + self.offset


class Bilinear2(nn.Module):
    """A kind with two crossbar arrays and its own forward (registered without an MVM)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.b = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(F.linear(x, self.a)), self.b)


def test_registered_layer_kinds_compute_with_the_chip():
    cn.register_layer_kind(Dense, weights=("kernel",), bias="offset", transposed=True,
                           mvm=lambda layer, x, w, bias: F.linear(x, w, bias))
    cn.register_layer_kind(Bilinear2, weights=("a", "b"))
    torch.manual_seed(0)
    net = nn.Sequential(Dense(6, 8), nn.ReLU(), Bilinear2(8), Dense(8, 3))
    model = _check_against_plain_copy(net, {"input": torch.randn(5, 6)})
    layers = cn.analog_layers(model)
    assert set(layers) == {"0", "2", "3"} and layers["2"].analog_parameters == ("a", "b")
    assert layers["0"].chip_noise("kernel") is None and not layers["0"].foreign_forward
    with torch.no_grad(), cn.chip(model, 3):  # the crossbar holds kernel.T [out, in]
        assert layers["0"].analog_weight("kernel").shape == (8, 6)
    v = cn.make_variation("rram", SIGMA, dac_bits=4, adc_bits=4)  # converters act on a registered MVM
    conv = cn.analogize(nn.Sequential(Dense(6, 8)), v).eval()
    x = torch.randn(5, 6)
    with torch.no_grad(), cn.chip(conv, 3):
        coarse = conv(x)
    cn.set_variation(conv, cn.make_variation("rram", SIGMA))
    with torch.no_grad(), cn.chip(conv, 3):
        assert not torch.allclose(coarse, conv(x), atol=1e-3)


def test_register_layer_kind_refuses_bad_input():
    with pytest.raises(cn.ConfigError, match="needs an nn.Module class"):
        cn.register_layer_kind(int)
    with pytest.raises(cn.ConfigError, match="an mvm takes one weight"):
        cn.register_layer_kind(Bilinear2, weights=("a", "b"), mvm=lambda layer, x, w, b: x)
    with pytest.raises(cn.ConfigError, match="weights must be parameter names"):
        cn.register_layer_kind(Bilinear2, weights=())

"""Model outputs as the model zoos return them: a tuple, a dict, a transformers ``ModelOutput``, or any object with
``output=``. Evaluation, training, compensation training and calibration give exactly what the same model
returning plain logits gives; an output the library cannot read is one ConfigError naming its type."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import correctnet as cn
from correctnet.calibration import (CalibrationConfig, ChipCalibrator, CompensationConfig, check_compensation,
                                    train_compensation)
from correctnet.compensation import attach_compensation, compensators
from correctnet.errors import ConfigError
from correctnet.placement.evaluator import PlacementEvaluator, SearchConfig
from correctnet.tensors import logits_of
from correctnet.training import TrainConfig, train


@dataclass
class Scores:
    """A custom output type the library cannot know: the logits are under ``scores``."""

    scores: torch.Tensor
    hidden: torch.Tensor


def _wrap(kind: str, logits: torch.Tensor, hidden: torch.Tensor) -> Any:
    if kind == "tensor":
        return logits
    if kind == "tuple":
        return logits, hidden
    if kind == "list":
        return [logits, hidden]
    if kind == "dict":
        return {"hidden": hidden, "logits": logits}
    if kind == "hf":
        from transformers.modeling_outputs import SequenceClassifierOutput
        return SequenceClassifierOutput(logits=logits, hidden_states=(hidden,))
    if kind == "custom":
        return Scores(scores=logits, hidden=hidden)
    if kind == "string":
        return "logits"
    raise AssertionError(kind)


class Net(nn.Module):
    """Linear + BatchNorm + Linear on [N, 8] features, 3 classes; ``kind``: the form its output takes."""

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.bn(self.fc1(x)))
        return _wrap(self.kind, self.fc2(h), h)


KINDS = ["tuple", "dict", "hf", "custom"]
OUTPUT = {"custom": lambda out: out.scores}  # the forms that need output=


def _needs(kind: str) -> None:
    if kind == "hf":
        pytest.importorskip("transformers")


def _pair(kind: str, sigma: float = 0.5) -> tuple[nn.Module, nn.Module]:
    """(the plain-logits model, the same model returning ``kind``), analog, identical weights and BN state."""
    torch.manual_seed(0)
    base = Net()
    with torch.no_grad():
        base.bn.running_mean.uniform_(-0.3, 0.3)
        base.bn.running_var.uniform_(0.5, 2.0)
    other = copy.deepcopy(base)
    other.kind = kind
    var = cn.LogNormal(sigma)
    return cn.analogize(base, var).eval(), cn.analogize(other, var).eval()


def _data(n: int = 96, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- the helper

def test_logits_of_reads_every_accepted_form():
    logits, hidden = torch.randn(4, 3), torch.randn(4, 5)
    for kind in ["tensor", "tuple", "list", "dict"]:
        assert logits_of(_wrap(kind, logits, hidden)) is logits, kind
    assert logits_of(Scores(logits, hidden), lambda o: o.scores) is logits
    assert logits_of(logits, lambda t: t[:, :2]).shape == (4, 2)  # output= applies to any output


def test_logits_of_reads_a_transformers_model_output_by_its_logits():
    pytest.importorskip("transformers")
    from transformers.modeling_outputs import SequenceClassifierOutput
    logits = torch.randn(4, 3)
    out = SequenceClassifierOutput(loss=torch.tensor(1.0), logits=logits)
    assert logits_of(out) is logits  # not out[0], which is the loss here
    with pytest.raises(ConfigError, match=r"SequenceClassifierOutput with keys \['loss'\] and no tensor under"):
        logits_of(SequenceClassifierOutput(loss=torch.tensor(1.0)))


def test_logits_of_names_the_type_and_what_is_accepted():
    with pytest.raises(ConfigError) as e:
        logits_of(Scores(torch.zeros(2, 3), torch.zeros(2, 1)))
    msg = str(e.value)
    assert "Scores" in msg and "a tuple or list" in msg and "'logits' key" in msg and ".logits attribute" in msg
    assert "output=" in msg
    with pytest.raises(ConfigError, match=r"type str: accepted are .* pass output=fn"):
        logits_of("logits")
    with pytest.raises(ConfigError, match="tuple that is empty"):
        logits_of(())
    with pytest.raises(ConfigError, match="tuple whose first element is a dict"):
        logits_of(({"logits": torch.zeros(1)},))
    with pytest.raises(ConfigError, match=r"dict with keys \['scores', 'hidden'\] and no tensor under 'logits'.*"
                                          r"output=lambda out: out\['scores'\]"):
        logits_of({"scores": torch.zeros(2, 3), "hidden": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"output=.* returned a tuple for a model output of type .*Scores; "
                                          r"it must return the logits"):
        logits_of(Scores(torch.zeros(2, 3), torch.zeros(2, 1)), lambda o: (o.scores,))


# ----------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("kind", KINDS)
def test_monte_carlo_and_accuracy_are_identical_to_plain_logits(kind):
    _needs(kind)
    plain, model = _pair(kind)
    data = _data()
    out = OUTPUT.get(kind)
    assert cn.accuracy(model, data, output=out) == cn.accuracy(plain, data)
    assert cn.clean_accuracy(model, data, output=out) == cn.clean_accuracy(plain, data)
    ref = cn.monte_carlo(plain, data, n_chips=4, seed=3, progress=False, chips_per_pass=1).accuracies
    assert len(set(ref)) > 1  # the chips differ: a comparison that can fail
    for k in (1, 3):  # one by one, and chip batches (logits [K * N, C] viewed as [K, N])
        got = cn.monte_carlo(model, data, n_chips=4, seed=3, progress=False, chips_per_pass=k, batch_size=40,
                             output=out).accuracies
        assert got == cn.monte_carlo(plain, data, n_chips=4, seed=3, progress=False, chips_per_pass=k,
                                     batch_size=40).accuracies
    assert got == pytest.approx(ref)
    prof = cn.error_profile(model, data[0][:32], n_chips=2, output=out)
    assert prof == cn.error_profile(plain, data[0][:32], n_chips=2)


def test_monte_carlo_forked_workers_read_custom_outputs():
    plain, model = _pair("custom")
    data = _data()
    ref = cn.monte_carlo(plain, data, n_chips=3, progress=False, chips_per_pass=1).accuracies
    assert cn.monte_carlo(model, data, n_chips=3, progress=False, chips_per_pass=1, workers=2,
                          output=OUTPUT["custom"]).accuracies == ref


@pytest.mark.parametrize("k", [1, 2])
def test_an_unsupported_output_is_one_config_error_naming_its_type(k):
    _, model = _pair("string")
    with pytest.raises(ConfigError, match=r"cannot read logits from a model output of type str.*output="):
        cn.monte_carlo(model, _data(), n_chips=2, progress=False, chips_per_pass=k)
    _, model = _pair("custom")
    with pytest.raises(ConfigError, match=r"type test_model_outputs\.Scores: accepted are"):
        cn.accuracy(model, _data())
    with pytest.raises(ConfigError, match=r"test_model_outputs\.Scores"):
        train(model, _data(), None, TrainConfig(epochs=1, batch_size=32), progress=False)


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("kind", KINDS)
def test_training_is_identical_to_plain_logits(kind):
    _needs(kind)
    plain, model = _pair(kind)
    out = OUTPUT.get(kind)
    data, val = _data(), _data(48, seed=2)
    # distillation from a teacher of the same output form: its output is read like the model's
    t_plain, t_model = copy.deepcopy(plain), copy.deepcopy(model)
    cfg = TrainConfig(epochs=2, batch_size=32, noise_aware=True, chips_per_step=2, distill=0.5, seed=1)
    h_plain = train(plain, data, val, cfg, progress=False, teacher=lambda x: t_plain(x))
    h_model = train(model, data, val, cfg, progress=False, teacher=lambda x: t_model(x), output=out)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in h_plain]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in h_model] == strip
    _same_state(plain, model)
    assert not torch.equal(plain.state_dict()["fc1.weight"], t_plain.state_dict()["fc1.weight"])  # it trained


def test_a_teacher_returning_plain_logits_needs_no_output():
    plain, model = _pair("custom")
    teacher = copy.deepcopy(plain)
    cfg = TrainConfig(epochs=1, batch_size=32, distill=1.0)
    h_plain = train(plain, _data(), None, cfg, progress=False, teacher=teacher)
    h_model = train(model, _data(), None, cfg, progress=False, teacher=teacher, output=OUTPUT["custom"])
    assert h_model[0]["train_loss"] == h_plain[0]["train_loss"]
    _same_state(plain, model)


# ----------------------------------------------------------------------------- compensation and calibration

@pytest.mark.parametrize("kind", KINDS)
def test_compensation_training_is_identical_to_plain_logits(kind):
    _needs(kind)
    plain, model = _pair(kind)
    out = OUTPUT.get(kind)
    for m in (plain, model):
        attach_compensation(m, "all", rank=2)
    cfg = CompensationConfig(steps=6, batch_size=32, chips_per_step=2, distill=0.5, seed=2)
    r_plain = train_compensation(plain, _data(), cfg, progress=False)
    r_model = train_compensation(model, _data(), cfg, progress=False, output=out)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in r_model.history] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in r_plain.history]
    assert r_model.chip_seeds == r_plain.chip_seeds
    _same_state(plain, model)
    assert any(c.gamma.abs().sum() > 0 for c in compensators(model).values())  # it trained
    val = _data(48, seed=3)
    assert check_compensation(model, val, chips=2, output=out) == check_compensation(plain, val, chips=2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher", ["ensemble", "self", "reference"])
def test_calibration_is_identical_to_plain_logits(kind, teacher):
    _needs(kind)
    plain, model = _pair(kind)
    out = OUTPUT.get(kind)
    for m in (plain, model):
        attach_compensation(m, "all", rank=2)
    images = _data(64, seed=4)[0]
    cfg = CalibrationConfig(steps=3, n_images=64, batch_size=32, teacher=teacher, teacher_chips=2, start="best")
    refs = (copy.deepcopy(plain), copy.deepcopy(model)) if teacher == "reference" else (None, None)
    c_plain = ChipCalibrator(plain, images, cfg, teacher=refs[0])
    c_model = ChipCalibrator(model, images, cfg, teacher=refs[1], output=out)
    assert torch.equal(c_model.teacher, c_plain.teacher)
    data = _data()
    for k in (1, 2):  # one by one, and chips calibrated in one pass (per-chip copies, logits chunked by chip)
        ref = cn.monte_carlo(plain, data, n_chips=2, progress=False, calibrate=c_plain, chips_per_pass=k)
        got = cn.monte_carlo(model, data, n_chips=2, progress=False, calibrate=c_model, chips_per_pass=k,
                             output=out)
        assert got.accuracies == ref.accuracies
    assert c_model.starts == c_plain.starts


def test_placement_evaluator_reads_custom_outputs():
    plain, model = _pair("custom")
    cfg = SearchConfig(chips=2, val_images=48, shared_steps=3, batch_size=48)
    data, val = _data(), _data(48, seed=5)
    comp = CompensationConfig(batch_size=32)
    e_plain = PlacementEvaluator(plain, data, val, cfg, comp_cfg=comp)
    e_model = PlacementEvaluator(model, data, val, cfg, comp_cfg=comp, output=OUTPUT["custom"])
    assert (e_model.clean_accuracy, e_model.base_accuracy) == (e_plain.clean_accuracy, e_plain.base_accuracy)
    assert e_model.evaluate((True, True)) == e_plain.evaluate((True, True))


# ----------------------------------------------------------------------------- a real transformers classifier

def test_bert_classifier_under_monte_carlo():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3)
    bert = transformers.BertForSequenceClassification(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", cn.DigitalWeightsWarning)  # the embeddings are declared, nothing else
        model = cn.analogize(bert, cn.LogNormal(sigma=0.3), digital=["bert.embeddings.*"])
    assert "classifier" in cn.analog_layers(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (40, 6), generator=g)  # token ids [N, L]
    with torch.no_grad():
        y = bert(x).logits.argmax(1)  # the digital network's predictions: clean accuracy 1
    assert cn.clean_accuracy(model, (x, y)) == 1.0

    mc = cn.monte_carlo(model, (x, y), n_chips=3, seed=1, progress=False, chips_per_pass=1)
    ref = []  # each chip by hand, reading .logits
    with torch.no_grad():
        for s in mc.chip_seeds:
            with cn.chip(model, s):
                ref.append(int((model(x).logits.argmax(1) == y).sum()) / len(y))
    assert mc.accuracies == ref
    assert min(ref) < 1.0  # the chips' variations reach the output
    batched = cn.monte_carlo(model, (x, y), n_chips=3, seed=1, progress=False, chips_per_pass=3)
    assert batched.accuracies == pytest.approx(ref, abs=1 / len(y) + 1e-9)  # digital layers: float round-off only

"""Training options of the pipeline: ``training.distill`` mixes a KD loss to a clean teacher (the vanilla reference)
into the cross-entropy; ``training.noise_scale`` sets the noise-aware training sigma relative to the deployed one."""
from typing import Any

import pytest
import torch
from torch import nn
from hydra import compose, initialize_config_dir

import correctnet as cn
from correctnet.conf import DIR as CONF
from correctnet.data import load_dataset
from correctnet.train import validate
from correctnet.training import TrainConfig, train



@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_fraction=0.2, seed=0)


def fresh(digits, seed=0):
    torch.manual_seed(seed)
    model = cn.build_model("mlp", digits.input_shape, digits.num_classes)
    return cn.analogize(model, cn.make_variation("lognormal", sigma=0.5), inplace=True)


@pytest.fixture(scope="module")
def teacher(digits):
    net = fresh(digits, seed=1)
    train(net, digits.train, None, TrainConfig(epochs=6, batch_size=128, seed=1), progress=False)

    def logits(x):
        with cn.nominal(net):
            return net(x)
    return logits


def test_full_distillation_ignores_the_labels(digits, teacher):
    """distill=1: the loss is the KD term alone, so scrambled labels train exactly the same weights."""
    x, y = digits.train.tensors
    scrambled = torch.utils.data.TensorDataset(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    cfg = TrainConfig(epochs=2, batch_size=128, noise_aware=True, distill=1.0, seed=0)
    a, b = fresh(digits), fresh(digits)
    train(a, digits.train, None, cfg, teacher=teacher, progress=False)
    train(b, scrambled, None, cfg, teacher=teacher, progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_no_distillation_ignores_the_teacher(digits, teacher):
    cfg = TrainConfig(epochs=2, batch_size=128, noise_aware=True, seed=0)
    a, b = fresh(digits), fresh(digits)
    train(a, digits.train, None, cfg, teacher=teacher, progress=False)
    train(b, digits.train, None, cfg, progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_distillation_teaches_what_the_teacher_says(digits, teacher):
    """A teacher that names every class by its neighbour's label: distilled, the network learns the teacher's
    naming, not the labels' (it does learn from the teacher's logits)."""
    shifted = lambda x: teacher(x).roll(1, dims=1)  # noqa: E731  class c -> c + 1
    x, y = digits.val.tensors
    agree = {}
    for distill in (0.0, 0.9):
        m = fresh(digits)
        train(m, digits.train, None, TrainConfig(epochs=15, batch_size=128, noise_aware=True, distill=distill, seed=0),
              teacher=shifted, progress=False)
        with torch.no_grad(), cn.nominal(m):
            agree[distill] = (m(x).argmax(1) == shifted(x).argmax(1)).float().mean().item()
    assert agree[0.0] < 0.2 < 0.8 < agree[0.9], agree


@pytest.mark.parametrize("kw, key", [({"distill": 1.5}, "training.distill"), ({"distill": -0.1}, "training.distill"),
                                     ({"temperature": 0}, "training.temperature")])
def test_bad_distillation_settings_are_refused(kw, key):
    with pytest.raises(cn.ConfigError, match=key):
        TrainConfig(**kw)


def test_distillation_without_a_teacher_is_refused(digits):
    with pytest.raises(cn.ConfigError, match="needs a teacher"):
        train(fresh(digits), digits.train, None, TrainConfig(epochs=1, distill=0.5), progress=False)


def test_the_pipeline_needs_the_reference_to_distill():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=noise_aware", "training.distill=0.5"])
        ok = compose(config_name="config", overrides=["method=noise_aware", "training.distill=0.5", "reference=true"])
    with pytest.raises(cn.ConfigError, match="reference=true"):
        validate(cfg)
    assert validate(ok).trains_reference


def compose_job(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return validate(compose(config_name="config", overrides=list(overrides)))


def test_noise_scale_trains_at_a_fraction_of_the_deployed_sigma():
    job = compose_job("method=correctnet", "variation.sigma=0.5", "training.noise_scale=0.6")
    assert job.variation.sigma == 0.5 and job.train_variation.sigma == pytest.approx(0.3)
    assert job.train_variation.name == job.variation.name
    assert compose_job("method=correctnet", "variation.sigma=0.8").train_variation.sigma == 0.8


def test_an_explicit_noise_sigma_wins_over_the_presets_scale():
    assert compose_job("method=correctnet_calibrated", "training.noise_sigma=0.2").train_variation.sigma == 0.2
    assert compose_job("method=correctnet_calibrated").train_variation.sigma == pytest.approx(0.6 * 0.5)


def test_bad_noise_scale_is_refused():
    with pytest.raises(cn.ConfigError, match="training.noise_scale must be a number > 0"):
        compose_job("method=noise_aware", "training.noise_scale=0")


def _noise_aware(digits, sigma, cfg):
    torch.manual_seed(0)
    model = cn.build_model("mlp", digits.input_shape, digits.num_classes)
    model = cn.analogize(model, cn.LogNormal(sigma), inplace=True)
    train(model, digits.train, None, cfg, progress=False)
    return model


def test_train_config_noise_scale_draws_the_training_chips_at_the_scaled_sigma(digits):
    """TrainConfig(noise_scale=0.6) on a layer deployed at 0.5 trains exactly as a plain copy deployed at 0.3 does,
    and hands the model back at its deployed 0.5."""
    base = dict(epochs=1, batch_size=128, noise_aware=True, chips_per_step=2, seed=3)
    scaled = _noise_aware(digits, 0.5, TrainConfig(**base, noise_scale=0.6))
    plain = _noise_aware(digits, 0.3, TrainConfig(**base))
    other = _noise_aware(digits, 0.5, TrainConfig(**base))
    for (name, a), b, c in zip(scaled.state_dict().items(), plain.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(scaled.state_dict().values(), other.state_dict().values()))
    assert all(layer.variation == cn.LogNormal(0.5) for layer in cn.analog_layers(scaled).values())
    absolute = _noise_aware(digits, 0.5, TrainConfig(**base, noise_sigma=0.3, noise_scale=2.0))  # noise_sigma wins
    assert all(torch.equal(a, b) for a, b in zip(absolute.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("kw, key", [({"noise_scale": 0}, "training.noise_scale"),
                                     ({"noise_sigma": -1.0}, "training.noise_sigma"),
                                     ({"noise_sigma": float("nan")}, "training.noise_sigma")])
def test_bad_noise_knobs_in_train_config_are_refused(kw, key):
    with pytest.raises(cn.ConfigError, match=key):
        TrainConfig(**kw)


def _mvm_recorder(layer: nn.Module) -> tuple[Any, list[torch.Tensor], list[torch.dtype]]:
    """A stand-in for ``layer._mvm`` that records the weight each call multiplies with and its output dtype."""
    weights: list[torch.Tensor] = []
    dtypes: list[torch.dtype] = []
    mvm = layer._mvm

    def recording(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weights.append(weight.detach().clone())
        y = mvm(x, weight, bias)
        dtypes.append(y.dtype)
        return y

    return recording, weights, dtypes


def _recorded_steps(precision: str) -> tuple[list[torch.Tensor], list[torch.dtype], nn.Module]:
    """The weight the first analog layer multiplies with and the dtype of its output, at every training step."""
    torch.manual_seed(0)
    net = cn.analogize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                       cn.make_variation("lognormal", sigma=0.5))
    layer = net[0]
    recording, weights, dtypes = _mvm_recorder(layer)
    layer._mvm = recording
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    train(net, (x, y), None, TrainConfig(epochs=1, batch_size=32, noise_aware=True, precision=precision),
          progress=False)
    return weights[-3:], dtypes[-3:], net  # the 3 steps (before them, one check forward of check_reads_once)


def test_bfloat16_training_multiplies_in_bfloat16_with_the_float32_chip_draws_of_float32_training() -> None:
    w32, d32, _ = _recorded_steps("float32")
    w16, d16, net = _recorded_steps("bfloat16")
    assert d32 == [torch.float32] * 3 and d16 == [torch.bfloat16] * 3
    # the first step's chip is drawn from the same float32 parameters: the same weights bit for bit
    assert w16[0].dtype == torch.float32 and torch.equal(w16[0], w32[0])
    assert not torch.equal(w16[1], w32[1])  # later steps differ: the bf16 gradients moved the weights differently
    torch.testing.assert_close(w16[1], w32[1], atol=5e-3, rtol=0)  # ... by bf16 round-off
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_an_unknown_precision_is_refused_in_one_line() -> None:
    with pytest.raises(cn.ConfigError, match="training.precision.*float32"):
        TrainConfig(precision="fp8")


def _recorded_eval(precision: str, chips_per_pass: int) -> tuple[list[float], list[torch.Tensor], list[torch.dtype]]:
    """Per-chip accuracies, the weights the first analog layer multiplies with and its output dtypes over an
    evaluation of 3 chips."""
    torch.manual_seed(0)
    net = cn.analogize(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)),
                       cn.make_variation("rram", sigma=0.5, read_noise=0.01))  # a fresh read per batch too
    layer = net[0]
    recording, weights, dtypes = _mvm_recorder(layer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=g)
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the network gets right nominally: chips lose a few
    layer._mvm = recording
    r = cn.monte_carlo(net, (x, y), n_chips=3, batch_size=400, progress=False, chips_per_pass=chips_per_pass,
                       precision=precision)
    return r.accuracies, weights[1:], dtypes[1:]  # [0]: the one read check of check_reads_once (float32)


@pytest.mark.parametrize("chips_per_pass", [1, 3])
def test_bfloat16_evaluation_measures_the_float32_chips_in_bfloat16(chips_per_pass: int) -> None:
    a32, w32, d32 = _recorded_eval("float32", chips_per_pass)
    a16, w16, d16 = _recorded_eval("bfloat16", chips_per_pass)
    assert set(d32) == {torch.float32} and set(d16) == {torch.bfloat16}
    assert len(w16) == len(w32) > 0 and all(w.dtype == torch.float32 and torch.equal(w, v) for w, v in zip(w16, w32))
    assert a16 != [1.0] * 3 and max(abs(a - b) for a, b in zip(a16, a32)) <= 0.02  # bf16 round-off flips a few


def test_an_unknown_evaluation_precision_is_refused_in_one_line() -> None:
    net = cn.analogize(nn.Sequential(nn.Linear(4, 2)), cn.make_variation("lognormal", sigma=0.5))
    with pytest.raises(cn.ConfigError, match="precision must be one of"):
        cn.monte_carlo(net, (torch.randn(4, 4), torch.zeros(4, dtype=torch.long)), n_chips=2, precision="half")
    with pytest.raises(cn.ConfigError, match="evaluation.precision"):
        compose_job("evaluation.precision=fp8")
    assert compose_job("evaluation.precision=bfloat16").eval_precision == "bfloat16"

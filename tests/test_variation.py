import math

import pytest
import torch

from correctnet import ConfigError, Gaussian, LogNormal, make_variation
from correctnet.seeding import layer_generator


def test_lognormal_log_ratio_has_mean_zero_and_std_sigma():
    sigma = 0.5
    w = torch.randn(512, 512)  # 262,144 weights
    v = LogNormal(sigma)
    w2 = v.apply(w, v.sample(w, layer_generator(1, "fc")))
    r = torch.log(w2 / w).double()
    n = r.numel()
    # 5 standard errors: mean has se sigma/sqrt(n); std has se ~ sigma/sqrt(2n)
    assert abs(r.mean().item()) < 5 * sigma / math.sqrt(n)
    assert abs(r.std().item() - sigma) < 5 * sigma / math.sqrt(2 * n)
    assert torch.all(torch.sign(w2) == torch.sign(w))  # multiplicative: never flips a sign


def test_lognormal_is_biased_as_documented():
    v = LogNormal(0.5)
    w = torch.ones(400_000)
    ratio = v.apply(w, v.sample(w, layer_generator(3, "x"))).mean().item()
    assert ratio == pytest.approx(math.exp(0.5 ** 2 / 2), rel=5e-3)  # 1.133


def test_gaussian_is_relative_to_layer_max():
    sigma = 0.1
    w = torch.randn(400, 500) * 3
    v = Gaussian(sigma)
    d = (v.apply(w, v.sample(w, layer_generator(0, "a"))) - w).double()
    scale = w.abs().max().item()
    assert abs(d.mean().item()) < 5 * sigma * scale / math.sqrt(d.numel())
    assert d.std().item() == pytest.approx(sigma * scale, rel=0.02)


def test_sigma_zero_is_exact():
    w = torch.randn(30, 20)
    for v in (LogNormal(0.0), Gaussian(0.0)):
        assert torch.equal(v.apply(w, v.sample(w, layer_generator(0, "a"))), w)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.5", None, True])
def test_bad_sigma_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="variation.sigma"):
        make_variation("lognormal", sigma=bad)


def test_unknown_model_name_lists_accepted_names():
    with pytest.raises(ConfigError, match="lognormal"):
        make_variation("lognormal_typo", sigma=0.1)


def test_unknown_parameter_is_a_clear_error():
    with pytest.raises(ConfigError, match="gaussian"):
        make_variation("gaussian", sigma=0.1, mu=3)

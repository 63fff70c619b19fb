"""Honest bookkeeping of the pipeline: the overhead reported is what is deployed; the check sees fresh data."""
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import TensorDataset

import correctnet.train as ct
from correctnet.compensation import compensators
from correctnet.conf import DIR as CONF
from correctnet.errors import ConfigError
from correctnet.placement import SearchConfig

TINY = ["method=none", "training.epochs=2", "evaluation.n_chips=3", "evaluation.profile_chips=1",
        "evaluation.profile_samples=16", "progress=false", "resume=off", "compensation=all",
        "compensation.steps=5", "compensation.check_chips=2", "calibration=per_chip", "calibration.steps=2",
        "calibration.n_images=64"]


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def test_modules_reset_by_the_check_count_no_overhead_chip_agnostically(tmp_path, monkeypatch):
    real = ct.check_compensation

    def rejecting(model, val, **kw):  # the real check, then pretend the modules hurt
        out = real(model, val, **kw)
        for comp in compensators(model).values():
            comp.zero_()
        return {**out, "kept": False}

    monkeypatch.setattr(ct, "check_compensation", rejecting)
    m = ct.run(cfg(), tmp_path)
    comp, cal = m["stages"]["compensated"], m["stages"]["calibrated"]
    assert comp["check"]["kept"] is False and comp["check"]["chip_stream"] == "CHECK"
    assert comp["overhead"]["total"]["params"] == 0 and comp["overhead"]["total"]["params_pct"] == 0
    assert comp["overhead"]["reset_by_check"] and m["overhead"] == comp["overhead"]
    assert cal["overhead"]["total"]["params"] > 0  # calibration deploys the modules again, per chip


def test_kept_modules_report_their_overhead(tmp_path):
    m = ct.run(cfg("compensation.check_chips=0"), tmp_path)
    comp = m["stages"]["compensated"]
    assert comp["check"] is None and comp["overhead"]["total"]["params"] > 0
    assert "reset_by_check" not in comp["overhead"]


def test_the_check_uses_validation_images_the_search_did_not_score():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    rest = ct._unscored(TensorDataset(x, y), SearchConfig(val_images=6))
    assert rest.tensors[0].flatten().tolist() == [6.0, 7.0, 8.0, 9.0]
    assert ct._unscored(TensorDataset(x, y), None).tensors[0].shape[0] == 10
    with pytest.raises(ConfigError, match="placement.val_images"):
        ct._unscored(TensorDataset(x, y), SearchConfig(val_images=10))

"""One source of defaults: the library's dataclasses and signatures say what the CLI's YAML groups say.

A library user (``TrainConfig()``, ``CompensationConfig()``, ``attach_compensation(model, "all")``, ...) runs the
same experiment as ``correctnet train`` with the same groups selected."""
import dataclasses
import inspect

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from correctnet.calibration import CalibrationConfig, CompensationConfig
from correctnet.compensation import Compensator, attach_compensation
from correctnet.conf import DIR as CONFIG_DIR
from correctnet.lipschitz import LipschitzRegularizer
from correctnet.placement import PPOConfig, SearchConfig
from correctnet.training import TrainConfig


def groups(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["method=none", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def defaults_of(cls):
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "seed"}


def signature_defaults(fn, keys):
    params = inspect.signature(fn).parameters
    return {k: params[k].default for k in keys}


def normal(v):
    return list(v) if isinstance(v, tuple) else v


def same(library: dict, yaml: dict, where: str, extra: set = frozenset()):
    """Every library default equals the YAML value; the YAML has no key the library lacks (but ``extra``)."""
    diff = {k: (normal(v), yaml.get(k, "<missing>")) for k, v in library.items() if normal(v) != yaml.get(k, "<missing>")}
    assert not diff, f"{where}: library default != CLI default (library, yaml): {diff}"
    assert set(yaml) - set(library) - set(extra) - {"seed"} == set(), f"{where}: YAML-only keys"


@pytest.fixture(scope="module")
def cfg():
    return groups("compensation=all", "calibration=per_chip", "placement=ppo")


def test_training(cfg):
    same(defaults_of(TrainConfig), cfg["training"], "training", extra={"noise_sigma", "lipschitz"})


def test_lipschitz(cfg):
    keys = ("kind", "target", "samples", "per_channel", "centered")
    lip = cfg["training"]["lipschitz"]
    same(signature_defaults(LipschitzRegularizer.__init__, keys), lip, "training.lipschitz", extra={"strength"})
    assert lip["strength"] == 0.0  # off in training=default: the regularizer is not built
    on = groups("training=lipschitz")["training"]["lipschitz"]  # the strength the suppression presets use
    assert signature_defaults(LipschitzRegularizer.__init__, ["strength"])["strength"] == on["strength"]


def test_compensation(cfg):
    comp = cfg["compensation"]
    same(defaults_of(CompensationConfig), comp, "compensation", extra={"placement", "kind", "rank", "affine"})
    attach = signature_defaults(attach_compensation, ("kind", "rank", "affine"))
    assert attach == {k: comp[k] for k in attach}
    assert signature_defaults(Compensator.__init__, ("kind", "rank", "affine")) == attach


def test_calibration(cfg):
    same(defaults_of(CalibrationConfig), cfg["calibration"], "calibration", extra={"enabled"})


def test_placement(cfg):
    place = cfg["placement"]
    same(defaults_of(SearchConfig), place, "placement", extra={"strategy", "ppo"})
    assert place["seed"] == cfg["seed"] == SearchConfig.seed
    same(defaults_of(PPOConfig), place["ppo"], "placement.ppo")

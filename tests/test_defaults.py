"""One source of defaults: the CLI's config groups are built from the library's dataclasses and signatures.

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
from correctnet.conf import schema as schema_module
from correctnet.conf.schema import schemas
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
    same(defaults_of(TrainConfig), cfg["training"], "training", extra={"lipschitz"})


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


# (group, option, key) that deliberately state the schema's value: training=lipschitz turns the strength back on
# after training=default (which it extends) turned it off
RESTATED = {("training", "lipschitz", "lipschitz.strength")}
SELECTOR = {"compensation": "placement", "calibration": "enabled", "placement": "strategy"}  # what an option is


def _leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("group", ["training", "compensation", "calibration", "placement"])
def test_group_options_start_from_the_library_schema_and_restate_no_default(group):
    # a value copied into a YAML option would pin it there: the library's default could change under it unseen
    schema = OmegaConf.to_container(OmegaConf.structured(schemas()[group]))
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        defaults = raw.pop("defaults", [])
        # the schema first, or another option of the group (checked in turn)
        assert defaults and (defaults[0] == "schema" or (CONFIG_DIR / group / f"{defaults[0]}.yaml").is_file()), \
            f"{group}/{path.name} does not start from the schema: defaults {defaults}"
        for key, value in _leaves(raw):
            want = OmegaConf.select(OmegaConf.create(schema), key, default="<missing>")
            assert want != "<missing>", f"{group}/{path.name}: {key} is not a key of the library's config"
            if (group, path.stem, key) not in RESTATED and key != SELECTOR.get(group):
                assert value != want, f"{group}/{path.name}: {key}: {value!r} restates the library default"


def test_a_key_the_library_does_not_know_is_refused_when_composed():
    for override in ("training.epoch=3", "calibration.n_image=5", "placement.ppo.episode=2"):
        with pytest.raises(Exception, match="Could not override"):
            groups("compensation=all", "calibration=per_chip", "placement=ppo", override)


def test_the_schema_follows_the_library(monkeypatch):
    # built from the dataclasses when registered, not copied: a changed library default reaches the CLI
    import dataclasses as dc

    changed = dc.make_dataclass("TrainConfig", [(f.name, f.type, dc.field(default=32 if f.name == "batch_size"
                                                                           else f.default))
                                                for f in dc.fields(TrainConfig)])
    monkeypatch.setattr(schema_module, "TrainConfig", changed)
    assert OmegaConf.structured(schemas()["training"]).batch_size == 32

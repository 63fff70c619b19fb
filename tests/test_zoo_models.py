"""Factory-built and zoo models: factory functions and transformers models rebuilt from a checkpoint without an
instance (bit-identical), what a checkpoint may call, timm's / transformers' argument names filled from the
dataset, the fit check before training, model=timm / model=hf presets, and the command line end to end.

timm cannot be installed here: a fake ``timm`` package (``create_model`` with timm's argument names, ``**kwargs``
and ``pretrained``) stands in for it."""
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import correctnet as cn
from correctnet.checkpoint import CheckpointError, checkpoint_sha256, load_checkpoint, read_metadata, save_checkpoint
from correctnet.conf import DIR as CONFIG_DIR
from correctnet.errors import ConfigError
from correctnet.models import check_fits, hf_model, locate, model_from_config

ROOT = Path(__file__).resolve().parents[1]
VAR = {"name": "lognormal", "sigma": 0.5}

ZOO = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width, num_classes, in_chans):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        return self.fc(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


def make_net(width: int, num_classes: int, in_chans: int) -> nn.Module:
    return Net(width, num_classes, in_chans)


def make_unannotated(width=4, num_classes=10, in_chans=1):
    return Net(width, num_classes, in_chans)


def make_liar(width: int = 4) -> nn.Module:
    return 3
'''

FAKE_TIMM = '''
"""A stand-in for timm: create_model(model_name, pretrained, checkpoint_path, **kwargs), None kwargs pruned."""
import torch
from torch import nn

CALLS = []


class TinyNet(nn.Module):
    def __init__(self, num_classes=1000, in_chans=3, drop_rate=0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(6 * 16, num_classes)

    def forward(self, x):
        return self.fc(self.drop(nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)))


def create_model(model_name, pretrained=False, checkpoint_path="", **kwargs):
    CALLS.append({"model_name": model_name, "pretrained": pretrained, "checkpoint_path": checkpoint_path, **kwargs})
    if model_name != "tiny":
        raise RuntimeError("Unknown model (%s)" % model_name)
    if pretrained or checkpoint_path:
        raise RuntimeError("would download or read weights")
    return TinyNet(**{k: v for k, v in kwargs.items() if v is not None})
'''

TINY_VIT = dict(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=32, num_labels=10)


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """A module of factories and a fake ``timm`` package, importable from tmp_path/src; returns (module, dir)."""
    src = tmp_path / "src"
    (src / "timm").mkdir(parents=True)
    name = f"zoo_{abs(hash(str(tmp_path))) % 10**8}"
    (src / f"{name}.py").write_text(ZOO)
    (src / "timm" / "__init__.py").write_text(FAKE_TIMM)
    monkeypatch.syspath_prepend(str(src))
    yield importlib.import_module(name), src
    for m in (name, "timm"):
        sys.modules.pop(m, None)


def _bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _analog_eval(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)  # not the initial values: the load must bring them back
    return cn.analogize(model, cn.LogNormal(0.5), inplace=True).eval()


def _model_group(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.model, resolve=True)


# ----------------------------------------------------------------------------- factory functions

def test_factory_function_checkpoint_rebuilds_without_an_instance(zoo, tmp_path):
    mod, _ = zoo
    torch.manual_seed(0)
    model, spec = model_from_config({"_target_": f"{mod.__name__}.make_net", "width": 4}, (1, 8, 8), 10)
    assert spec["kwargs"] == {"num_classes": 10, "in_chans": 1, "width": 4}  # in_chans: timm's name, filled
    model = _analog_eval(model)
    path = save_checkpoint(tmp_path / "f.safetensors", model, {"variation": VAR, "model": spec})
    assert read_metadata(path)["model"]["class"] == f"{mod.__name__}:Net"
    loaded, meta = load_checkpoint(path)
    assert type(loaded) is mod.Net and _bits(loaded.state_dict(), model.state_dict())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), cn.chip(model, 5):
        ref = model(x)
    with torch.no_grad(), cn.chip(loaded, 5):
        assert torch.equal(loaded(x), ref)


def test_what_a_checkpoint_may_call_to_rebuild_a_model(zoo, tmp_path):
    mod, _ = zoo
    model = _analog_eval(mod.make_net(4, 10, 1))

    def saved(target, kwargs):
        return save_checkpoint(tmp_path / f"{target.replace(':', '.')}.safetensors", model,
                               {"variation": VAR, "model": {"target": target, "kwargs": kwargs}}, overwrite=True)

    # a function that does not say it returns a module is never called from a file: torch.load would unpickle
    # (called, it would fail on the missing file with another message)
    for target, why in (("torch.load", "does not declare that it returns an nn.Module"),
                        (f"{mod.__name__}.make_unannotated", "does not declare that it returns an nn.Module"),
                        ("os.remove", "not an nn.Module class or a Python function"),
                        ("collections.OrderedDict", "not an nn.Module subclass")):
        with pytest.raises(CheckpointError, match=f"not called when a model is rebuilt from a file.*{why}.*model="):
            load_checkpoint(saved(target, {"f": str(tmp_path / "evil.pt")} if "load" in target else {}))
    assert type(load_checkpoint(saved(f"{mod.__name__}.make_unannotated", {}), model=mod.Net(4, 10, 1))[0]) is mod.Net
    # a factory that says so but returns no module; and one that returns another class than the one saved
    with pytest.raises(CheckpointError, match="returned a int, not an nn.Module"):
        load_checkpoint(saved(f"{mod.__name__}.make_liar", {}))
    with pytest.raises(ConfigError, match="returned a int, not an nn.Module"):
        model_from_config({"_target_": f"{mod.__name__}.make_liar"}, (1, 8, 8), 10)
    path = save_checkpoint(tmp_path / "c.safetensors", model, {"variation": VAR, "model": {
        "target": f"{mod.__name__}.make_net", "kwargs": {"width": 4, "num_classes": 10, "in_chans": 1},
        "class": "torch.nn:Sequential"}})
    with pytest.raises(CheckpointError, match=f"built a {mod.__name__}:Net, but the checkpoint was saved from a "
                                              f"torch.nn:Sequential"):
        load_checkpoint(path)


def test_fake_timm_factory_gets_its_names_and_is_rebuilt_without_downloads(zoo, tmp_path):
    mod, _ = zoo
    timm = importlib.import_module("timm")
    # the preset: model=timm model.name=tiny (pretrained false, num_classes / in_chans null = the dataset's)
    params = _model_group("model=timm", "model.name=tiny")
    assert params == {"_target_": "timm.create_model", "name": "tiny", "model_name": "tiny", "pretrained": False,
                      "num_classes": None, "in_chans": None}
    model, spec = model_from_config(params, (1, 8, 8), 10)
    assert spec["kwargs"] == {"model_name": "tiny", "pretrained": False, "num_classes": 10, "in_chans": 1}
    assert spec["name"] == "tiny" and model.conv.in_channels == 1 and model.fc.out_features == 10
    # the bare factory (model=custom model._target_=timm.create_model): timm's names through **kwargs, too
    _, bare = model_from_config({"_target_": "timm.create_model", "model_name": "tiny"}, (1, 8, 8), 10)
    assert bare["kwargs"] == {"model_name": "tiny", "num_classes": 10, "in_chans": 1}
    # weights loaded at training (pretrained) are not loaded again when rebuilt: they come from the file
    model = _analog_eval(model)
    path = save_checkpoint(tmp_path / "t.safetensors", model, {"variation": VAR, "model": {
        **spec, "kwargs": {**spec["kwargs"], "pretrained": True, "checkpoint_path": "/nowhere/w.pth"}}})
    timm.CALLS.clear()
    loaded, meta = load_checkpoint(path)
    assert {c["pretrained"] for c in timm.CALLS} == {False} and {c["checkpoint_path"] for c in timm.CALLS} == {""}
    assert meta["model"]["kwargs"]["pretrained"] is True  # the record is what trained it
    assert type(loaded) is timm.TinyNet and _bits(loaded.state_dict(), model.state_dict())


def test_missing_extras_name_their_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"timm.create_model.*pip install 'correctnet\[timm\]'"):
        locate("timm.create_model")
    with pytest.raises(ConfigError, match=r"transformers is not installed.*pip install 'correctnet\[hf\]'"):
        model_from_config(_model_group("model=hf"), (1, 8, 8), 10)


def test_importing_correctnet_imports_no_zoo():
    code = ("import sys, correctnet, correctnet.train, correctnet.evaluate.cli, correctnet.checkpoint, correctnet.conf; "
            "print([m for m in ('timm', 'transformers') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


# ----------------------------------------------------------------------------- the fit check

def test_check_fits_names_the_key_to_set(zoo):
    mod, _ = zoo
    x = torch.randn(1, 1, 8, 8)
    model, spec = model_from_config({"_target_": f"{mod.__name__}.make_net", "width": 4, "in_chans": None},
                                    (1, 8, 8), 10)
    assert spec["kwargs"]["in_chans"] == 1  # null: filled from the dataset
    rng = torch.random.get_rng_state()
    model.train()
    check_fits(model, x, 10, spec["kwargs"])
    assert model.training and torch.equal(torch.random.get_rng_state(), rng)
    assert torch.count_nonzero(model.bn.running_mean) == 0  # no batch statistics were updated
    three, s3 = model_from_config({"_target_": f"{mod.__name__}.make_net", "width": 4, "in_chans": 3}, (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"does not run on the dataset's inputs \[1, 1, 8, 8\]: RuntimeError: .*"
                                          r"model.in_chans=3, but the images have 1 channels: set model.in_chans=1"):
        check_fits(three, x, 10, s3["kwargs"])
    five, s5 = model_from_config({"_target_": f"{mod.__name__}.make_net", "width": 4, "num_classes": 5}, (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"outputs \[1, 5\] for one input, but the dataset has 10 classes.*"
                                          r"model.num_classes=5, set it to 10"):
        check_fits(five, x, 10, s5["kwargs"])
    with pytest.raises(ConfigError, match=r"set the model's input channels, model.in_channels, in_chans \(timm\) or "
                                          r"num_channels \(transformers\)"):
        check_fits(mod.Net(4, 10, 3), x, 10, {})


def test_hf_model_gets_num_labels_num_channels_image_size_and_fits(tmp_path):
    pytest.importorskip("transformers")
    params = _model_group("model=hf", "model.hidden_size=16", "model.num_hidden_layers=1", "model.num_attention_heads=2",
                          "model.intermediate_size=32")
    assert params["_target_"] == "correctnet.models.hf_model" and params["name"] == "vit"
    assert params["task"] == "image-classification"  # hf_model's default, through hf_schema
    model, spec = model_from_config(params, (1, 8, 8), 10)
    assert {k: spec["kwargs"][k] for k in ("name", "num_labels", "num_channels", "image_size")} == \
        {"name": "vit", "num_labels": 10, "num_channels": 1, "image_size": 8}
    assert type(model).__name__ == "ViTForImageClassification" and model.config.num_labels == 10
    check_fits(model, torch.randn(1, 1, 8, 8), 10, spec["kwargs"])  # a ModelOutput: its .logits are checked
    wrong, sw = model_from_config({**params, "num_labels": 4}, (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"outputs \[1, 4\].*model.num_labels=4, set it to 10"):
        check_fits(wrong, torch.randn(1, 1, 8, 8), 10, sw["kwargs"])
    with pytest.raises(ConfigError, match="model.name='no_such_type' is not a transformers model type"):
        hf_model("no_such_type")
    with pytest.raises(ConfigError, match="model.task must be one of"):
        hf_model("vit", task="segmentation")


# ----------------------------------------------------------------------------- transformers models

LOAD_HF = textwrap.dedent('''
    import sys, torch, safetensors.torch, correctnet as cn
    torch.set_num_threads(1)
    model, meta = cn.load_checkpoint(sys.argv[1])
    x = safetensors.torch.load_file(sys.argv[2])["x"]
    with torch.no_grad(), cn.chip(model, 7):
        out = model(x).logits
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file({"out": out, **{"sd." + k: v for k, v in state.items()}}, sys.argv[3])
    print(type(model).__name__)
''')


def test_transformers_model_rebuilt_in_a_fresh_process(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    net = transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT))
    with pytest.warns(UserWarning, match="stay digital"):  # cls_token, position_embeddings
        model = cn.analogize(net, cn.LogNormal(0.5), inplace=True).eval()
    path = save_checkpoint(tmp_path / "vit.safetensors", model, {"variation": VAR})  # no model spec given
    spec = read_metadata(path)["model"]
    assert spec["target"] == "transformers.models.vit.modeling_vit:ViTForImageClassification" and "rebuild" not in spec
    assert spec["transformers"]["config_class"] == "transformers.models.vit.configuration_vit:ViTConfig"
    assert spec["transformers"]["config"]["hidden_size"] == 16
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad(), cn.chip(model, 7):
        ref = model(x).logits
    safetensors.torch.save_file({"x": x}, str(tmp_path / "x.safetensors"))
    (tmp_path / "load.py").write_text(LOAD_HF)
    r = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(path), str(tmp_path / "x.safetensors"),
                        str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "ViTForImageClassification"
    got = safetensors.torch.load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(got.pop("out"), ref)
    assert _bits({k[3:]: v for k, v in got.items()}, model.state_dict())


def _with_model_entry(path, **changes):
    """Rewrite the ``model`` entry of the checkpoint at ``path`` (tensors unchanged, the digest recomputed: a file
    written that way)."""
    with safetensors.safe_open(str(path), "pt") as f:
        stored = f.metadata()
    tensors = safetensors.torch.load_file(str(path))
    meta = json.loads(stored["correctnet_meta"])
    meta["model"].update(changes)
    text = json.dumps(meta)
    safetensors.torch.save_file(tensors, str(path), metadata={**stored, "correctnet_meta": text,
                                                              "correctnet_sha256": checkpoint_sha256(tensors, text)})


def test_corrupt_transformers_records_are_checkpoint_errors(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="stay digital"):
        model = cn.analogize(transformers.ViTForImageClassification(transformers.ViTConfig(**TINY_VIT)),
                             cn.LogNormal(0.5), inplace=True)
    path = save_checkpoint(tmp_path / "b.safetensors", model, {"variation": VAR})
    good = read_metadata(path)["model"]["transformers"]
    for bad, needle in (({**good, "class": "torch.nn:Linear"}, "is not a transformers PreTrainedModel class"),
                        ({**good, "config_class": "collections:OrderedDict"}, "is not a transformers config class"),
                        ({**good, "config": [1]}, "config must be a mapping"),
                        ([1], "model.transformers must be a mapping")):
        _with_model_entry(path, transformers=bad)
        with pytest.raises(CheckpointError, match=needle):
            load_checkpoint(path)
    _with_model_entry(path, transformers=good)
    assert type(load_checkpoint(path)[0]) is type(model)


# ----------------------------------------------------------------------------- the command line

def _run(*args, env, cwd=ROOT, module="correctnet.train"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def _env(src):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)]), "OMP_NUM_THREADS": "1"}


def test_cli_mismatched_model_is_one_error_line_before_training(zoo, tmp_path):
    mod, src = zoo
    r = _run("model=custom", f"model._target_={mod.__name__}.make_net", "+model.width=4", "+model.in_chans=3",
             "progress=false", f"hydra.run.dir={tmp_path / 'r'}", env=_env(src))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("correctnet: error: "), r.stderr
    assert "model.in_chans=3, but the images have 1 channels: set model.in_chans=1" in lines[0]
    assert not (tmp_path / "r").exists()  # nothing trained, no run directory left


def _printed_evaluate(stdout: str) -> list[str]:
    line = next(ln for ln in stdout.splitlines() if "re-evaluate:" in ln)
    import shlex
    cmd = shlex.split(line.split("re-evaluate:", 1)[1])
    assert cmd[1:3] == ["-m", "correctnet.evaluate"]
    return cmd[3:]


@pytest.mark.slow
def test_cli_timm_preset_trains_and_the_printed_evaluate_command_reproduces_it(zoo, tmp_path):
    _, src = zoo
    env, out = _env(src), tmp_path / "run"
    r = _run("model=timm", "model.name=tiny", "training.epochs=1", "evaluation.n_chips=3", "calibration.steps=5",
             "compensation.steps=20", "progress=false", f"hydra.run.dir={out}", env=env)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "tiny" and "calibrated" in metrics["stages"]
    spec = read_metadata(out / "model.safetensors")["model"]
    assert spec["target"] == "timm.create_model" and spec["class"] == "timm:TinyNet"
    assert spec["kwargs"] == {"model_name": "tiny", "pretrained": False, "num_classes": 10, "in_chans": 1}
    args = _printed_evaluate(r.stdout)  # it replays the run's final stage: the calibrated one
    assert "calibration=per_chip" in args
    plain = [a for a in args if a != "calibration=per_chip"]
    e = _run(*plain, "progress=false", env=env, module="correctnet.evaluate", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    assert "reproduces the exported metrics exactly" in e.stdout and "tiny on digits" in e.stdout
    c = _run(*args, "progress=false", env=env, module="correctnet.evaluate", cwd=tmp_path)
    assert c.returncode == 0, c.stderr
    assert "reproduces the exported metrics exactly" in c.stdout and "calibrated" in c.stdout


@pytest.mark.slow
def test_cli_hf_preset_trains_and_evaluate_reproduces_it(tmp_path):
    pytest.importorskip("transformers")
    env, out = _env(tmp_path), tmp_path / "run"
    r = _run("model=hf", "model.hidden_size=16", "model.num_hidden_layers=1", "model.num_attention_heads=2",
             "model.intermediate_size=32", "training.epochs=1", "evaluation.n_chips=3", "calibration.steps=5",
             "compensation.steps=20", "progress=false", f"hydra.run.dir={out}", env=env)  # the default recipe
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert "calibrated" in metrics["stages"]
    spec = read_metadata(out / "model.safetensors")["model"]
    assert spec["target"] == "correctnet.models.hf_model" and len(spec["transformers"]["config"]["id2label"]) == 10
    args = _printed_evaluate(r.stdout)  # the calibrated stage's replay
    assert "calibration=per_chip" in args
    plain = [a for a in args if a != "calibration=per_chip"]
    for replay in (plain, args):  # the chip-agnostic stage, then the calibrated one
        e = _run(*replay, "progress=false", env=env, module="correctnet.evaluate", cwd=tmp_path)
        assert e.returncode == 0, e.stderr
        assert "reproduces the exported metrics exactly" in e.stdout

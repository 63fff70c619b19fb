"""Your own model and data, end to end: _target_ models, data files, checkpoints of user classes (rebuilt in a
fresh process or loaded into an instance), tied weights, input normalization, reference ResNet-20 / ViT."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import correctnet as cn
from correctnet.checkpoint import CheckpointError, checkpoint_sha256, load_checkpoint, normalize, save_checkpoint
from correctnet.compensation import attach_compensation, compensators
from correctnet.conf import DIR as CONF
from correctnet.data import dataset_from_config, load_dataset, load_file_dataset
from correctnet.errors import ConfigError, DataFormatError, DataNotFoundError
from correctnet.models import ResNet, ViT, build_target, model_from_config

ROOT = Path(__file__).resolve().parents[1]
VAR = {"name": "lognormal", "sigma": 0.5}

MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small conv net for [C, 8, 8] inputs."""

    def __init__(self, in_channels, num_classes, hidden=16):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class Tied(nn.Module):
    """fc2 uses fc1's weight (tied in the constructor when tie=True)."""

    def __init__(self, features=6, num_classes=3, tie=True):
        super().__init__()
        self.fc1 = nn.Linear(features, features)
        self.fc2 = nn.Linear(features, features)
        self.head = nn.Linear(features, num_classes)
        if tie:
            self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class Small(nn.Module):
    def __init__(self, features=6, num_classes=3):
        super().__init__()
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.fc(x)


class NeedsArgs(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x)


class NotAModule:
    pass


def make_net(num_classes=10):
    return Net(1, num_classes)


def not_a_net():
    return 3
'''


@pytest.fixture
def usermod(tmp_path, monkeypatch):
    """A module ``usermod_<n>`` written into tmp_path and importable (sys.path); returns (module, its dir)."""
    name = f"usermod_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    mod = importlib.import_module(name)
    yield mod, tmp_path
    sys.modules.pop(name, None)


def _analog(model, seed=0):
    return cn.analogize(model, cn.LogNormal(0.5), inplace=True)


def _bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- _target_ models

def test_target_model_gets_dataset_arguments_its_signature_names(usermod):
    mod, _ = usermod
    model, spec = model_from_config({"_target_": f"{mod.__name__}.Net", "hidden": 8}, (1, 8, 8), 10)
    assert isinstance(model, mod.Net) and model.fc1.out_features == 8 and model.fc2.out_features == 10
    assert spec == {"name": "Net", "target": f"{mod.__name__}.Net", "input_shape": [1, 8, 8], "num_classes": 10,
                    "kwargs": {"in_channels": 1, "num_classes": 10, "hidden": 8}}
    # set by the user: not overridden; not named by the signature: not passed
    model, spec = model_from_config({"_target_": f"{mod.__name__}:Net", "num_classes": 4}, (1, 8, 8), 10)
    assert model.fc2.out_features == 4 and "image_size" not in spec["kwargs"]
    # a nested _target_ builds a sub-module; built-ins keep working
    m, _ = build_target("torch.nn.Sequential", {})
    assert isinstance(m, nn.Sequential)
    assert isinstance(model_from_config({"name": "lenet5"}, (1, 8, 8), 10)[0], cn.models.LeNet5)


@pytest.mark.parametrize("target, needles", [
    ("no_such_pkg_xyz.nets.Net", ["no_such_pkg_xyz", "PYTHONPATH"]),
    ("torch.nn.NoSuchNet", ["has no attribute", "NoSuchNet"]),
    ("collections.OrderedDict", ["not an nn.Module"]),
    ("math.pi", ["not an nn.Module class or a function"]),
    ("Net", ["names no module"]),
])
def test_bad_targets_are_clear_config_errors(target, needles):
    with pytest.raises(ConfigError) as e:
        model_from_config({"_target_": target}, (1, 8, 8), 10)
    for n in needles:
        assert n in str(e.value)
    assert "model._target_" in str(e.value)


def test_constructor_rejecting_arguments_and_non_module_results(usermod):
    mod, _ = usermod
    with pytest.raises(ConfigError, match=r"does not accept the arguments.*depth.*its parameters: in_channels, "
                                          r"num_classes, hidden"):
        model_from_config({"_target_": f"{mod.__name__}.Net", "depth": 3}, (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="not an nn.Module"):
        model_from_config({"_target_": f"{mod.__name__}.NotAModule"}, (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="returned a int"):
        model_from_config({"_target_": f"{mod.__name__}.not_a_net"}, (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="model.name='lenet5' is a built-in"):
        model_from_config({"name": "lenet5", "_target_": f"{mod.__name__}.Net"}, (1, 8, 8), 10)
    Path(mod.__file__).with_name("broken_mod_q.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="importing module 'broken_mod_q' raised RuntimeError: boom"):
        model_from_config({"_target_": "broken_mod_q.Net"}, (1, 8, 8), 10)
    sys.modules.pop("broken_mod_q", None)


# ----------------------------------------------------------------------------- reference models

@pytest.mark.parametrize("name, shape, kw, n_layers", [
    ("resnet20", (1, 28, 28), {}, 20), ("resnet20", (3, 32, 32), {"width": 0.5}, 20),
    ("resnet20", (1, 8, 8), {"shortcut": "B"}, 22), ("vit", (1, 28, 28), {}, None),
    ("vit", (1, 8, 8), {"patch_size": 2, "pool": "cls", "depth": 3}, None),
    ("vgg13", (3, 32, 32), {"width": 0.125}, 13), ("vgg19", (1, 28, 28), {"width": 0.125}, 19),
])
def test_reference_models_resnet20_vit_vgg(name, shape, kw, n_layers):
    torch.manual_seed(0)
    m = cn.build_model(name, shape, 7, **kw)
    assert m(torch.randn(2, *shape)).shape == (2, 7)
    if n_layers is not None:
        assert len(cn.analog_layers(cn.analogize(m, cn.LogNormal(0.1)))) == n_layers


def test_resnet20_structure_and_vit_digital_parameters():
    r = ResNet(3, 10)
    convs = [n for n, m in r.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and [r.layer1[0].conv1.out_channels, r.layer2[0].conv1.out_channels,
                                 r.layer3[0].conv1.out_channels] == [16, 32, 64]
    assert ResNet(3, 10, width=2.0).layer3[0].conv1.out_channels == 128
    v = ViT(1, 28, 10, pool="cls")
    assert ViT.digital_parameters == ("pos_embed", "cls_token")
    assert {n for n, _ in v.named_parameters()} >= {"pos_embed", "cls_token"}
    assert all(layer.self_attn.batch_first for layer in v.encoder.layers)
    with pytest.raises(ConfigError, match="patch_size=5 does not divide"):
        ViT(1, 28, 10, patch_size=5)
    with pytest.raises(ConfigError, match="needs image inputs"):
        cn.build_model("resnet20", (20,), 3)


def test_new_model_groups_exist():
    for name in ("custom", "resnet20", "vit", "vgg13", "vgg19"):
        assert (CONF / "model" / f"{name}.yaml").is_file()
    assert (CONF / "dataset" / "file.yaml").is_file()


# ----------------------------------------------------------------------------- data files

def _arrays(n=60, shape=(1, 8, 8), classes=3, dtype=np.uint8, seed=0, val=False):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 256, (n, *shape)) if dtype == np.uint8 else rng.normal(2.0, 3.0, (n, *shape))).astype(dtype)
    y = np.arange(n) % classes
    out = {"x_train": x[: n * 3 // 4], "y_train": y[: n * 3 // 4], "x_test": x[n * 3 // 4:], "y_test": y[n * 3 // 4:]}
    if val:
        out |= {"x_val": x[:5], "y_val": y[:5]}
    return out


def test_npz_images_normalized_with_train_statistics(tmp_path):
    a = _arrays(shape=(2, 6, 6))
    np.savez(tmp_path / "d.npz", **a)
    d = load_file_dataset(tmp_path / "d.npz", val_fraction=0.2, seed=1)
    assert d.name == "file" and d.input_shape == (2, 6, 6) and d.num_classes == 3 and d.scale == 255.0
    assert len(d.train) + len(d.val) == 45 and len(d.val) == 9 and len(d.test) == 15
    x = d.train.tensors[0]
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)
    # the stored statistics turn raw uint8 pixels into exactly what the model was trained on
    raw = torch.from_numpy(a["x_test"])
    assert torch.allclose(normalize(raw, {"normalization": d.normalization()}), d.test.tensors[0], atol=1e-6)
    assert d.test.tensors[1].dtype == torch.int64 and d.test.tensors[1].tolist() == a["y_test"].tolist()
    assert d.source == {"name": "file", "path": str(tmp_path / "d.npz"), "val_fraction": 0.2, "normalize": "channel",
                        "num_classes": None}
    # same seed, same split
    again = load_file_dataset(tmp_path / "d.npz", val_fraction=0.2, seed=1)
    assert torch.equal(again.val.tensors[0], d.val.tensors[0])


def test_pt_file_with_val_split_features_and_hw_images(tmp_path):
    a = _arrays(shape=(5,), dtype=np.float32, val=True, classes=4)
    torch.save({k: torch.from_numpy(v) for k, v in a.items()}, tmp_path / "d.pt")
    d = dataset_from_config({"name": "file", "path": str(tmp_path / "d.pt"), "val_fraction": 0.1}, seed=0)
    assert d.input_shape == (5,) and d.num_classes == 4 and len(d.val) == 5 and len(d.train) == 45
    assert d.scale == 1.0 and len(d.mean) == 5  # per feature
    assert torch.allclose(d.train.tensors[0].mean(0), torch.zeros(5), atol=1e-5)
    g = load_dataset("file", path=tmp_path / "d.pt", normalize="global")
    assert len(g.mean) == 1 and abs(g.train.tensors[0].mean().item()) < 1e-5
    n = load_dataset("file", path=tmp_path / "d.pt", normalize="none", num_classes=9)
    assert n.num_classes == 9 and torch.equal(n.test.tensors[0], torch.from_numpy(a["x_test"]))
    hw = _arrays(shape=(8, 8))
    np.savez(tmp_path / "hw.npz", **hw)  # [N, 8, 8]
    assert load_file_dataset(tmp_path / "hw.npz").input_shape == (1, 8, 8)
    # a file dataset trains a built-in MLP on features
    assert cn.build_model("mlp", d.input_shape, d.num_classes)(d.test.tensors[0]).shape == (15, 4)


@pytest.mark.parametrize("change, error, needle", [
    (lambda a: a.pop("y_test"), DataFormatError, "missing array(s) y_test"),
    (lambda a: a.pop("y_val"), DataFormatError, "missing array(s) y_val"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), DataFormatError, "y_train has dtype float32"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), DataFormatError, "y_train has shape [44]; expected [45]"),
    (lambda a: a.update(y_test=a["y_test"] - 5), DataFormatError, "negative labels"),
    (lambda a: a.update(x_test=a["x_test"][:, :, :4]), DataFormatError, "different shapes"),
    (lambda a: a.update(x_train=a["x_train"][:, 0, 0, 0]), DataFormatError, "x_train has shape [45]"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32) * np.nan), DataFormatError, "NaN"),
    (lambda a: a.update(y_train=np.zeros(45, np.int64), y_test=np.zeros(15, np.int64), y_val=np.zeros(5, np.int64)),
     DataFormatError, "single class"),
])
def test_bad_data_files_are_clear_errors(tmp_path, change, error, needle):
    a = _arrays(val=True)
    change(a)
    np.savez(tmp_path / "d.npz", **a)
    with pytest.raises(error) as e:
        load_file_dataset(tmp_path / "d.npz")
    assert needle in str(e.value) and str(tmp_path / "d.npz") in str(e.value)


def test_unreadable_or_unsafe_data_files(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"dataset.path=.*nope.npz: no such file"):
        dataset_from_config({"name": "file", "path": str(tmp_path / "nope.npz")}, seed=0)
    with pytest.raises(ConfigError, match="unsupported file type '.csv'"):
        load_file_dataset(tmp_path / "d.csv")
    with pytest.raises(ConfigError, match="needs dataset.path"):
        dataset_from_config({"name": "file", "path": None}, seed=0)
    with pytest.raises(ConfigError, match="dataset.normalize='pixel'"):
        load_file_dataset(tmp_path / "d.npz", normalize="pixel")
    with pytest.raises(ConfigError, match="dataset.path applies only to dataset=file"):
        dataset_from_config({"name": "digits", "path": "x.npz"}, seed=0)
    a = _arrays()
    np.savez(tmp_path / "obj.npz", **a, extra=np.array([{"a": 1}], dtype=object))  # needs a pickle
    with pytest.raises(DataFormatError, match="without unpickling"):
        load_file_dataset(tmp_path / "obj.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="not a readable .npz"):
        load_file_dataset(tmp_path / "bad.npz")
    torch.save({"x_train": torch.zeros(3, 2), "y_train": torch.zeros(3), "model": nn.Linear(2, 2)}, tmp_path / "m.pt")
    with pytest.raises(DataFormatError, match="weights_only=True"):  # a pickled module is refused, never run
        load_file_dataset(tmp_path / "m.pt")
    torch.save([torch.zeros(2)], tmp_path / "l.pt")
    with pytest.raises(DataFormatError, match="expected a dict of tensors"):
        load_file_dataset(tmp_path / "l.pt")


# ----------------------------------------------------------------------------- checkpoints of user models

def _net_and_meta(mod, hidden=16, seed=0):
    torch.manual_seed(seed)
    model, spec = model_from_config({"_target_": f"{mod.__name__}.Net", "hidden": hidden}, (1, 8, 8), 10)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
    return _analog(model).eval(), {"model": spec, "variation": VAR,
                            "normalization": {"mean": [0.3], "std": [0.4], "scale": 16.0, "axis": 1}}


LOAD_SCRIPT = textwrap.dedent('''
    import sys, torch, safetensors.torch, correctnet as cn
    torch.set_num_threads(int(sys.argv[4]))  # the caller's: results may differ in the last bit across thread counts
    model, meta = cn.load_checkpoint(sys.argv[1], trust=[sys.argv[5]])  # the user's module, on PYTHONPATH
    x = safetensors.torch.load_file(sys.argv[2])["x"]
    with torch.no_grad(), cn.chip(model, 7):
        out = model(x)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file({"out": out, **{"sd." + k: v for k, v in state.items()}}, sys.argv[3])
    print(type(model).__module__, type(model).__name__)
''')


def test_user_model_round_trips_in_a_fresh_process(usermod, tmp_path):
    mod, moddir = usermod
    model, meta = _net_and_meta(mod)
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad(), cn.chip(model, 7):
        ref = model(x)
    safetensors.torch.save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = tmp_path / "scripts" / "load.py"  # not next to the module: a script's directory is on sys.path
    script.parent.mkdir()
    script.write_text(LOAD_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(moddir), str(ROOT)])}
    r = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.safetensors"),
                        str(tmp_path / "out.safetensors"), str(torch.get_num_threads()), mod.__name__], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [mod.__name__, "Net"]
    got = safetensors.torch.load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(got.pop("out"), ref)
    assert _bits({k[3:]: v for k, v in got.items()}, model.state_dict())
    # without the module on PYTHONPATH: one clear error that says what to do
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "x.safetensors"),
                        str(tmp_path / "o2.safetensors"), "1", mod.__name__], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode != 0 and "CheckpointError" in r.stderr and "PYTHONPATH" in r.stderr and "model=" in r.stderr


def test_user_model_loads_in_process_and_into_an_instance(usermod, tmp_path):
    mod, _ = usermod
    model, meta = _net_and_meta(mod)
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), cn.chip(model, 3):
        ref = model(x)
    loaded, m = load_checkpoint(path)
    assert isinstance(loaded, mod.Net) and _bits(loaded.state_dict(), model.state_dict())
    assert m["model"]["target"] == f"{mod.__name__}.Net" and m["analog"]["layers"] == ["conv", "fc1", "fc2"]
    assert m["normalization"]["mean"] == [0.3]
    mine = mod.Net(1, 10, hidden=16)
    rng_before = torch.random.get_rng_state()
    same, _ = load_checkpoint(path, model=mine)
    assert same is mine and torch.equal(torch.random.get_rng_state(), rng_before)
    assert list(cn.analog_layers(mine)) == ["conv", "fc1", "fc2"] and _bits(mine.state_dict(), model.state_dict())
    for m_ in (loaded, mine):
        with torch.no_grad(), cn.chip(m_, 3):
            assert torch.equal(m_(x), ref)


def test_mismatched_or_analog_instance_is_a_clear_error(usermod, tmp_path):
    mod, _ = usermod
    model, meta = _net_and_meta(mod)
    path = save_checkpoint(tmp_path / "m.safetensors", model, meta)
    wrong = mod.Net(1, 10, hidden=12)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"do not fit the Net instance passed as model=; shape mismatch: "
                                              r"fc1.weight \[16, 64\] \(model: \[12, 64\]\)"):
        load_checkpoint(path, model=wrong)
    assert not cn.analog_layers(wrong) and _bits(wrong.state_dict(), before)  # untouched
    with pytest.raises(CheckpointError, match="missing: .*unexpected: "):
        load_checkpoint(path, model=mod.Tied(64, 10))
    with pytest.raises(CheckpointError, match="already has analog layers"):
        load_checkpoint(path, model=_analog(mod.Net(1, 10)))
    with pytest.raises(CheckpointError, match="must be an nn.Module"):
        load_checkpoint(path, model="Net")


def test_library_save_without_target_records_the_class(usermod, tmp_path):
    mod, _ = usermod
    torch.manual_seed(0)
    model = _analog(mod.Small())
    path = save_checkpoint(tmp_path / "s.safetensors", model, {"variation": VAR})
    loaded, meta = load_checkpoint(path)
    assert meta["model"]["target"] == f"{mod.__name__}:Small" and meta["model"]["kwargs"] is None
    assert "without arguments" in meta["model"]["rebuild"]
    assert _bits(loaded.state_dict(), model.state_dict())
    p1 = save_checkpoint(tmp_path / "t5.safetensors", _analog(mod.Tied(5, 3)), {"variation": VAR})
    with pytest.raises(CheckpointError, match=r"shape mismatch.*Tied\(\) was built without arguments.*model="):
        load_checkpoint(p1)
    # Tied() ties fc1/fc2 in its constructor; a file saved untied must not be loaded into it silently
    p0 = save_checkpoint(tmp_path / "t6.safetensors", _analog(mod.Tied(6, 3, tie=False)), {"variation": VAR})
    with pytest.raises(CheckpointError, match=r"ties fc2.weight = fc1.weight.*different values.*model="):
        load_checkpoint(p0)
    assert load_checkpoint(p0, model=mod.Tied(6, 3, tie=False))[0].fc2.weight is not None
    # a class whose constructor needs arguments: say so, and point at model=
    p2 = save_checkpoint(tmp_path / "n.safetensors", _analog(mod.NeedsArgs(3)), {"variation": VAR})
    with pytest.raises(CheckpointError, match=r"does not record its constructor arguments.*model="):
        load_checkpoint(p2)
    assert load_checkpoint(p2, model=mod.NeedsArgs(3))[0].fc.out_features == 3
    # meta["model"] = {"target", "kwargs"} from a library caller
    p3 = save_checkpoint(tmp_path / "k.safetensors", _analog(mod.NeedsArgs(3)),
                         {"variation": VAR, "model": {"target": f"{mod.__name__}.NeedsArgs", "kwargs": {"width": 3}}})
    assert load_checkpoint(p3)[0].fc.out_features == 3
    with pytest.raises(CheckpointError, match="cannot record how to rebuild.*no_such_mod_q"):
        save_checkpoint(tmp_path / "x.safetensors", _analog(mod.NeedsArgs(3)),
                        {"variation": VAR, "model": {"target": "no_such_mod_q.Net"}})


def test_local_class_saves_with_a_note_and_loads_into_an_instance(tmp_path):
    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    model = _analog(Local())
    with pytest.warns(UserWarning, match="inside a function"):
        path = save_checkpoint(tmp_path / "l.safetensors", model, {"variation": VAR})
    with pytest.raises(CheckpointError, match=r"cannot be rebuilt from the file.*model="):
        load_checkpoint(path)
    loaded, meta = load_checkpoint(path, model=Local())
    assert meta["model"]["target"] is None and _bits(loaded.state_dict(), model.state_dict())


def test_factories_without_a_module_return_annotation_are_not_called_from_a_checkpoint(usermod, tmp_path):
    # annotated factories are rebuilt: tests/test_zoo_models.py
    mod, _ = usermod
    model, spec = model_from_config({"_target_": f"{mod.__name__}.make_net"}, (1, 8, 8), 10)
    path = save_checkpoint(tmp_path / "f.safetensors", _analog(model), {"variation": VAR, "model": spec})
    with pytest.raises(CheckpointError, match="not called when a model is rebuilt from a file: the function make_net "
                                              "does not declare that it returns an nn.Module.*model="):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, model=mod.make_net())[0], mod.Net)


def test_compensators_are_attached_to_an_instance(usermod, tmp_path):
    mod, _ = usermod
    model, meta = _net_and_meta(mod)
    attach_compensation(model, {"fc1": 2}, kind="output")
    with torch.no_grad():
        for p in compensators(model)["fc1"].parameters():
            p.uniform_(-0.1, 0.1)
    path = save_checkpoint(tmp_path / "c.safetensors", model, meta)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad(), cn.chip(model, 1):
        ref = model(x)
    for loaded, _ in (load_checkpoint(path), load_checkpoint(path, model=mod.Net(1, 10))):
        assert list(compensators(loaded)) == ["fc1"]
        with torch.no_grad(), cn.chip(loaded, 1):
            assert torch.equal(loaded(x), ref)


# ----------------------------------------------------------------------------- tied weights

@pytest.mark.parametrize("tie_in_constructor", [True, False])
def test_tied_weights_are_stored_once_and_come_back_tied(usermod, tmp_path, tie_in_constructor):
    mod, _ = usermod
    torch.manual_seed(0)
    model = mod.Tied(6, 3, tie=tie_in_constructor)
    if not tie_in_constructor:  # tied after construction: only the file knows
        model.fc2.weight = model.fc1.weight
    model = _analog(model)
    meta = {"variation": VAR, "model": {"target": f"{mod.__name__}.Tied", "kwargs": {"tie": tie_in_constructor}}}
    path = save_checkpoint(tmp_path / "t.safetensors", model, meta)
    with safetensors.safe_open(str(path), "pt") as f:
        assert "fc2.weight" not in f.keys() and "fc1.weight" in f.keys()
        assert json.loads(f.metadata()["correctnet_meta"])["aliases"] == {"fc2.weight": "fc1.weight"}
    for loaded, _ in (load_checkpoint(path), load_checkpoint(path, model=mod.Tied(6, 3, tie=False))):
        assert loaded.fc2.weight is loaded.fc1.weight
        assert len(list(loaded.parameters())) == 5
        assert _bits(loaded.state_dict(), model.state_dict())


def test_bad_alias_metadata_is_refused(usermod, tmp_path):
    mod, _ = usermod
    model = _analog(mod.Tied(6, 3))
    path = save_checkpoint(tmp_path / "t.safetensors", model, {"variation": VAR})
    with safetensors.safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata()
    meta = json.loads(md["correctnet_meta"])
    meta["aliases"] = {"fc2.weight": "nothing.weight"}
    md["correctnet_meta"] = json.dumps(meta)
    md["correctnet_sha256"] = checkpoint_sha256(tensors, md["correctnet_meta"])  # a file written that way
    safetensors.torch.save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=md)
    with pytest.raises(CheckpointError, match="aliases.*fc2.weight -> nothing.weight"):
        load_checkpoint(tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------- normalization

def test_normalize_applies_the_stored_statistics():
    meta = {"normalization": {"mean": [0.5, 0.25], "std": [0.5, 0.25], "scale": 255.0, "axis": 1}}
    raw = torch.full((1, 2, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(raw, meta), torch.tensor([1.0, 3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2))
    assert torch.allclose(normalize(torch.ones(1, 2, 2, 2), meta)[0, :, 0, 0], torch.tensor([1.0, 3.0]))
    with pytest.raises(ConfigError, match="channels"):
        normalize(torch.ones(1, 3, 2, 2), meta)
    with pytest.raises(ConfigError, match="normalization"):
        normalize(raw, {"model": {}})
    assert cn.checkpoint.normalize is normalize


# ----------------------------------------------------------------------------- the command line, end to end

def _run(*args, cwd=ROOT, env=None, module="correctnet.train"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, hidden=24):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 16, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))
'''

CHECK = textwrap.dedent('''
    import json, sys, correctnet as cn
    from correctnet.data import dataset_from_config
    model, meta = cn.load_checkpoint(sys.argv[1], trust=["e2e_usernet"])  # a fresh process: the module is named
    ds = {**meta["config"]["dataset"], **(meta.get("dataset_source") or {})}
    data = dataset_from_config(ds, seed=meta["config"]["seed"])
    base = meta["metrics"]["stages"][meta["stage"]]
    mc = cn.monte_carlo(model, data.test, n_chips=base["mc"]["n_chips"], seed=base["mc"]["seed"], progress=False)
    print(json.dumps({"type": type(model).__name__, "same": cn.clean_accuracy(model, data.test) == base["clean_accuracy"]
                      and mc.accuracies == base["mc"]["accuracies"]}))
''')


def _user_env(moddir):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(moddir), str(ROOT)]), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def netdir(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "e2e_usernet.py").write_text(NET)
    (tmp_path / "check.py").write_text(CHECK)
    return d


@pytest.mark.slow
def test_cli_trains_a_user_model_and_evaluate_reproduces_it(netdir, tmp_path):
    env, out = _user_env(netdir), tmp_path / "run"
    r = _run("model=custom", "model._target_=e2e_usernet.Net", "+model.hidden=16", "training.epochs=2",
             "evaluation.n_chips=5", "progress=false", f"hydra.run.dir={out}", env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "Net" and m["dataset"] == "digits"
    ck = out / "model.safetensors"
    c = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(ck)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert c.returncode == 0, c.stderr
    assert json.loads(c.stdout.strip().splitlines()[-1]) == {"type": "Net", "same": True}
    bare = _run(f"checkpoint={ck}", "progress=false", env=env, module="correctnet.evaluate", cwd=tmp_path)
    assert bare.returncode == 2 and "trust=e2e_usernet" in bare.stderr  # the user's module is not imported unasked
    line = next(ln for ln in r.stdout.splitlines() if "re-evaluate:" in ln)
    cmd = shlex.split(line.split("re-evaluate:", 1)[1])  # the printed command names the trust it needs
    assert cmd[:3] == [sys.executable, "-m", "correctnet.evaluate"] and cmd[-1] == "trust=e2e_usernet"
    e = subprocess.run([*cmd, "progress=false"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert e.returncode == 0, e.stderr
    assert "reproduces the exported metrics exactly" in e.stdout and "Net on digits" in e.stdout
    with safetensors.safe_open(str(ck), "pt") as f:
        spec = json.loads(f.metadata()["correctnet_meta"])["model"]
    assert spec["target"] == "e2e_usernet.Net" and spec["kwargs"] == {"in_channels": 1, "num_classes": 10, "hidden": 16}


@pytest.mark.slow
def test_cli_trains_on_a_data_file_and_evaluate_reproduces_it_after_a_move(netdir, tmp_path):
    env, out = _user_env(netdir), tmp_path / "run"
    from sklearn.datasets import load_digits
    d = load_digits()
    x, y = d.images.astype(np.uint8) * 15, d.target.astype(np.int64)  # [N, 8, 8] uint8 images
    np.savez(tmp_path / "digits.npz", x_train=x[:1400], y_train=y[:1400], x_test=x[1400:], y_test=y[1400:])
    r = _run("dataset=file", f"dataset.path={tmp_path / 'digits.npz'}", "model=custom",
             "model._target_=e2e_usernet.Net", "training.epochs=2", "evaluation.n_chips=5", "progress=false",
             f"hydra.run.dir={out}", env=env)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "file" and len(m["stages"]["baseline"]["mc"]["accuracies"]) == 5
    ck = out / "model.safetensors"
    e = _run(f"checkpoint={ck}", "progress=false", "trust=e2e_usernet", env=env, module="correctnet.evaluate",
             cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    assert "reproduces the exported metrics exactly" in e.stdout
    moved = tmp_path / "elsewhere" / "d.npz"
    moved.parent.mkdir()
    shutil.move(tmp_path / "digits.npz", moved)
    e = _run(f"checkpoint={ck}", "progress=false", "trust=e2e_usernet", env=env, module="correctnet.evaluate",
             cwd=tmp_path)
    assert e.returncode == 2 and "digits.npz: no such file" in e.stderr and "Traceback" not in e.stderr
    e = _run(f"checkpoint={ck}", f"dataset.root={moved}", "progress=false", "trust=e2e_usernet", env=env,
             module="correctnet.evaluate", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    assert "reproduces the exported metrics exactly" in e.stdout


@pytest.mark.parametrize("args, needles", [
    pytest.param(["model=custom"], ["model._target_"], marks=pytest.mark.slow),
    (["model=custom", "model._target_=e2e_nowhere.Net"], ["e2e_nowhere", "PYTHONPATH"]),
    pytest.param(["model=custom", "model._target_=e2e_usernet.Net", "+model.depth=3"], ["depth", "does not accept"], marks=pytest.mark.slow),
    (["dataset=file"], ["dataset.path"]),
])
def test_cli_user_model_and_data_errors_are_one_clear_message(netdir, tmp_path, args, needles):
    r = _run(*args, "training.epochs=1", "evaluation.n_chips=2", "progress=false", f"hydra.run.dir={tmp_path / 'r'}",
             env=_user_env(netdir))
    assert r.returncode == 2
    assert all(n in r.stderr for n in needles), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3


@pytest.mark.slow
def test_cli_reference_models_resnet20_and_vit(tmp_path):
    for model, extra in (("resnet20", ["model.width=0.25"]), ("vit", ["model.patch_size=2", "model.dim=16"])):
        out = tmp_path / model
        r = _run(f"model={model}", *extra, "training.epochs=1", "evaluation.n_chips=2", "evaluation.profile_chips=2",
                 "evaluation.profile_samples=16", "progress=false", "placement.chips=2", "placement.val_images=64",
                 "placement.ppo.max_evaluations=8", "placement.calibration_steps=2", f"hydra.run.dir={out}")
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "metrics.json").read_text())["model"] == model
        loaded, meta = load_checkpoint(out / "model.safetensors")
        assert meta["model"]["name"] == model

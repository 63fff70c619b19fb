"""Checkpoint integrity (format 2: the digest covers the metadata too), refusal of non-finite weights, validation of
the recorded evaluation settings, the trust rule for modules a checkpoint names, and the printed commands."""
import json
import shlex
import sys
import warnings

import pytest
import safetensors.torch
import torch

import correctnet as cn
from correctnet import checkpoint as ckpt
from correctnet.checkpoint import CheckpointError, checkpoint_sha256, tensor_digest, trust_needed
from correctnet.evaluate import evaluate_command, evaluate_checkpoint
from correctnet.evaluate.cli import main as evaluate_main
from correctnet.models import is_trusted


def _meta(**extra):
    return {"model": {"name": "lenet5", "input_shape": [1, 8, 8], "num_classes": 10, "kwargs": {}},
            "variation": {"name": "lognormal", "sigma": 0.5}, **extra}


def _model():
    torch.manual_seed(0)
    return cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5))


def _rewrite(src, dst, edit):
    """Copy ``src`` to ``dst`` with its safetensors ``__metadata__`` changed by ``edit`` (in place), the tensor
    bytes kept as they are (what an editor of the header does)."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    dst.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    return dst


def _edit_meta(change):
    def edit(md):
        meta = json.loads(md["correctnet_meta"])
        change(meta)
        md["correctnet_meta"] = json.dumps(meta)
    return edit


def _write_raw(path, tensors, meta, fmt="2"):
    """A file written that way (a valid digest of its format)."""
    text = json.dumps(meta)
    digest = tensor_digest(tensors) if fmt == "1" else checkpoint_sha256(tensors, text, fmt)
    safetensors.torch.save_file(tensors, str(path), metadata={"correctnet_format": fmt, "correctnet_sha256": digest,
                                                               "correctnet_meta": text})
    return path


@pytest.fixture
def saved(tmp_path):
    meta = _meta(metrics={"stages": {"baseline": {"clean_accuracy": 0.9123, "mc": {"accuracies": [0.81, 0.79]}}}})
    return ckpt.save_checkpoint(tmp_path / "m.safetensors", _model(), meta)


# ----------------------------------------------------------------------------- the digest covers the metadata

def test_a_rewritten_header_with_the_same_metadata_still_loads(saved, tmp_path):
    """The control for the tests below: rewriting the header itself does not break a file."""
    same = _rewrite(saved, tmp_path / "same.safetensors", lambda md: None)
    assert ckpt.load_checkpoint(same)[1]["variation"]["sigma"] == 0.5


def test_edited_variation_sigma_is_refused(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "bad.safetensors", _edit_meta(lambda m: m["variation"].update(sigma=0.9)))
    assert ckpt.read_metadata(bad)["variation"]["sigma"] == 0.9  # the edit is in the file, the tensors untouched
    assert safetensors.torch.load_file(str(bad)).keys() == safetensors.torch.load_file(str(saved)).keys()
    with pytest.raises(CheckpointError, match=f"{bad}: the file was modified or damaged"):
        ckpt.load_checkpoint(bad)


def test_a_flipped_digit_in_the_stored_metrics_is_refused(saved, tmp_path):
    def flip(md):
        assert "0.9123" in md["correctnet_meta"]
        md["correctnet_meta"] = md["correctnet_meta"].replace("0.9123", "0.9128")
    bad = _rewrite(saved, tmp_path / "bad.safetensors", flip)
    with pytest.raises(CheckpointError, match="modified or damaged"):
        ckpt.load_checkpoint(bad)


def test_an_edited_format_string_is_refused(saved, tmp_path):
    """Format 2 read as format 1 would skip the metadata check: the format string is covered too (a format 1
    file's digest is over the tensors only, so the relabelled file fails that check)."""
    bad = _rewrite(saved, tmp_path / "bad.safetensors", lambda md: md.update(correctnet_format="1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="digest"):
            ckpt.load_checkpoint(bad)


def test_a_deleted_digest_is_refused_for_format_2(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "bad.safetensors", lambda md: md.pop("correctnet_sha256"))
    with pytest.raises(CheckpointError, match=f"{bad}: the file was modified or damaged.*no correctnet_sha256"):
        ckpt.load_checkpoint(bad)


def test_save_writes_format_2(saved):
    with safetensors.safe_open(str(saved), "pt") as f:
        md = f.metadata()
    assert md["correctnet_format"] == "2" and ckpt.read_metadata(saved)["versions"]["format"] == "2"
    tensors = safetensors.torch.load_file(str(saved))
    assert md["correctnet_sha256"] == checkpoint_sha256(tensors, md["correctnet_meta"], "2") == \
        ckpt.checkpoint_digest(saved)
    assert md["correctnet_sha256"] != tensor_digest(tensors)


def test_a_format_1_file_loads_with_a_warning(tmp_path):
    model = _model()
    path = _write_raw(tmp_path / "old.safetensors", model.state_dict(), _meta(), fmt="1")
    with pytest.warns(UserWarning, match="older format 1: its metadata .* is not covered by the digest"):
        loaded, meta = ckpt.load_checkpoint(path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x)) and meta["variation"]["sigma"] == 0.5
    # its tensor digest is still checked
    bad = _rewrite(path, tmp_path / "bad.safetensors", lambda md: md.update(correctnet_sha256="0" * 64))
    with pytest.warns(UserWarning, match="older format"), pytest.raises(CheckpointError, match="digest"):
        ckpt.load_checkpoint(bad)


def test_a_format_2_file_loads_without_a_warning(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.load_checkpoint(saved)


# ----------------------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_even_with_a_valid_digest(tmp_path, value):
    tensors = {k: v.clone() for k, v in _model().state_dict().items()}
    tensors["fc2.weight"][3, 1] = value
    path = _write_raw(tmp_path / "nan.safetensors", tensors, _meta())
    with pytest.raises(CheckpointError, match=f"{path}: tensor 'fc2.weight' holds NaN or infinite values"):
        ckpt.load_checkpoint(path)


# ----------------------------------------------------------------------------- recorded evaluation settings

@pytest.mark.parametrize("recorded, needle", [
    ({"evaluation": {"n_chips": 10**9}}, "evaluation.n_chips must be an integer in [1, 100000], got 1000000000"),
    ({"evaluation": {"n_chips": 1e9}}, "evaluation.n_chips must be an integer in [1, 100000], got 1000000000.0"),
    ({"evaluation": {"n_chips": 2.5}}, "evaluation.n_chips"),
    ({"evaluation": {"n_chips": 0}}, "evaluation.n_chips"),
    ({"evaluation": {"n_chips": -3}}, "evaluation.n_chips"),
    ({"evaluation": {"n_chips": "many"}}, "evaluation.n_chips"),
    ({"evaluation": {"seed": -1}}, "evaluation.seed"),
    ({"evaluation": {"seed": 2**64}}, "evaluation.seed"),
    ({"evaluation": {"batch_size": 0}}, "evaluation.batch_size"),
    ({"evaluation": {"batch_size": "huge"}}, "evaluation.batch_size"),
    ({"seed": -5, "evaluation": {}}, "seed (the split seed)"),
])
def test_absurd_recorded_evaluation_settings_are_one_clear_line(tmp_path, capsys, recorded, needle):
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", _model(), _meta(dataset="digits", config=recorded))
    assert evaluate_main([f"checkpoint={path}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("correctnet: error: "), err
    assert needle in err and f"recorded in {path}" in err and "to override it" in err


def test_a_recorded_setting_overridden_by_an_argument_is_not_blamed_on_the_file(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", _model(),
                                _meta(dataset="digits", config={"evaluation": {"n_chips": 10**9}}))
    with pytest.raises(cn.ConfigError, match=r"evaluation.n_chips must be an integer in \[1, 100000\], got 0$"):
        evaluate_checkpoint(path, n_chips=0)


def test_absurd_recorded_thread_count_is_refused(tmp_path, capsys):
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", _model(),
                                _meta(dataset="digits", metrics={"environment": {"torch_threads": 10**9}}))
    assert evaluate_main([f"checkpoint={path}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "threads must be an integer in [1, 1024]" in err and "threads=N" in err


# ----------------------------------------------------------------------------- trust

MODULE = "cn_untrusted_probe"
SOURCE = '''
import os, pathlib
pathlib.Path(os.environ["CN_PROBE_FILE"]).write_text("imported")  # the side effect of importing this module
from correctnet.models import MLP

class Net(MLP):
    pass
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A checkpoint whose target names an importable module that is not imported yet: ``(path, marker file)``."""
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{MODULE}.py").write_text(SOURCE)
    marker = tmp_path / "imported.txt"
    monkeypatch.setenv("CN_PROBE_FILE", str(marker))
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    torch.manual_seed(0)
    model = cn.analogize(cn.models.MLP(64, 10, hidden=(16,)), cn.LogNormal(0.5))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = ckpt.read_metadata(ckpt.save_checkpoint(tmp_path / "plain.safetensors", model, _meta(
        model={"target": "correctnet.models:MLP", "kwargs": {"in_features": 64, "num_classes": 10, "hidden": [16]}})))
    meta["model"]["target"] = f"{MODULE}:Net"  # written by a process that had the module
    yield _write_raw(tmp_path / "probe.safetensors", tensors, meta), marker
    sys.modules.pop(MODULE, None)


def test_an_untrusted_module_is_refused_without_being_imported(probe):
    path, marker = probe
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(path)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(path) in msg
    assert f"would import module '{MODULE}'" in msg and f"load_checkpoint(path, trust=['{MODULE}'])" in msg
    assert f"trust={MODULE}" in msg  # the command line's argument
    assert not marker.exists() and MODULE not in sys.modules  # nothing ran
    with pytest.raises(CheckpointError, match="not trusted"):
        ckpt.load_checkpoint(path, trust=["other", "cn_untrusted"])  # a prefix is a whole dotted name
    assert not marker.exists()


@pytest.mark.parametrize("trust", [[MODULE], MODULE, True])
def test_a_trusted_module_is_imported(probe, trust):
    path, marker = probe
    model, meta = ckpt.load_checkpoint(path, trust=trust)
    assert marker.exists() and type(model).__module__ == MODULE and type(model).__name__ == "Net"
    assert ckpt.load_checkpoint(path)[0] is not None  # now imported in this process: trusted


def test_a_nested_target_is_refused_too(probe, tmp_path):
    path, marker = probe
    meta = ckpt.read_metadata(path)
    meta["model"]["kwargs"]["hidden"] = {"_target_": f"{MODULE}.Net"}
    tensors = safetensors.torch.load_file(str(path))
    meta["model"]["target"] = "correctnet.models:MLP"
    nested = _write_raw(tmp_path / "nested.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=f"would import module '{MODULE}'.*trust="):
        ckpt.load_checkpoint(nested)
    assert not marker.exists() and trust_needed(meta) == [MODULE]


def test_the_evaluate_cli_refuses_and_allows_with_trust(probe, capsys):
    path, marker = probe
    assert evaluate_main([f"checkpoint={path}", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"trust={MODULE}" in err and not marker.exists()
    # with trust the model is rebuilt (and evaluation then asks for the dataset settings this file lacks)
    assert evaluate_main([f"checkpoint={path}", "progress=false", f"trust={MODULE}"]) == 2
    assert "dataset.name=..." in capsys.readouterr().err and marker.exists()


@pytest.mark.parametrize("value", ["", ",", "a b", "pkg:Net", "1abc"])
def test_bad_trust_argument_is_one_clear_line(saved, capsys, value):
    assert evaluate_main([f"checkpoint={saved}", f"trust={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trust must be true or comma-separated module names" in err


def test_bad_trust_value_for_the_library(saved):
    with pytest.raises(CheckpointError, match="trust must be True or a list of module names"):
        ckpt.load_checkpoint(saved, trust=[3])


def test_trust_rules():
    assert is_trusted("correctnet.models") and is_trusted("transformers.models.vit") and is_trusted("timm")
    assert is_trusted("json")  # already imported: importing it again runs nothing
    assert not is_trusted("cn_not_imported_pkg") and not is_trusted("timmy")
    assert is_trusted("cn_not_imported_pkg.nets", ["cn_not_imported_pkg"])  # a prefix
    assert is_trusted("cn_not_imported_pkg.nets", ["cn_not_imported_pkg.nets"])
    assert not is_trusted("cn_not_imported_pkg.other", ["cn_not_imported_pkg.nets"])
    assert is_trusted("anything_at_all", True)


# ----------------------------------------------------------------------------- printed commands

def test_the_evaluate_command_starts_with_this_interpreter_and_names_the_trust_it_needs(probe, saved):
    path, _ = probe
    parts = shlex.split(evaluate_command(path))
    assert parts[:3] == [sys.executable, "-m", "correctnet.evaluate"]
    assert parts[3:] == [f"checkpoint={path}", f"trust={MODULE}"]
    assert shlex.split(evaluate_command(saved)) == [sys.executable, "-m", "correctnet.evaluate", f"checkpoint={saved}"]
    assert shlex.split(evaluate_command(saved, trust=["a", "b.c"]))[-1] == "trust=a,b.c"

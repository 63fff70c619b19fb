"""Checkpoints: exact round trips, refusal of unsafe or broken files, atomic export, the evaluate CLI."""
import json
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import correctnet as cn
from correctnet import checkpoint as ckpt
from correctnet.checkpoint import CheckpointError, checkpoint_sha256, tensor_digest
from correctnet.errors import ConfigError
from correctnet.evaluate import check_chip_range, evaluate_checkpoint, evaluate_command, merge_shards
from correctnet.evaluate.cli import main as evaluate_main

ROOT = Path(__file__).resolve().parents[1]


def _meta(shape=(1, 8, 8), **extra):
    return {"model": {"name": "lenet5", "input_shape": list(shape), "num_classes": 10, "kwargs": {}},
            "variation": {"name": "lognormal", "sigma": 0.5}, **extra}


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5)).to(dtype)


@pytest.fixture
def saved(tmp_path):
    return ckpt.save_checkpoint(tmp_path / "m.safetensors", _model(), _meta())


def _write_raw(path, tensors, meta, fmt="2", digest=True):
    """A hand-made file in the checkpoint layout (for files save_checkpoint would never write), with a valid
    digest of its format (2: over the metadata and tensors; 1: the tensors only)."""
    md = {"correctnet_format": fmt, "correctnet_meta": meta if isinstance(meta, str) else json.dumps(meta)}
    if digest:
        md["correctnet_sha256"] = (tensor_digest(tensors) if fmt == "1" else
                                   checkpoint_sha256(tensors, md["correctnet_meta"], fmt))
    safetensors.torch.save_file(tensors, str(path), metadata=md)
    return path


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_export_load_gives_bit_identical_outputs_per_chip(tmp_path, dtype):
    model = _model(dtype)
    meta = _meta(stage="baseline")
    path = ckpt.save_checkpoint(tmp_path / "m.safetensors", model, meta)
    rng = torch.get_rng_state()
    loaded, got = ckpt.load_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading does not move the caller's random stream
    assert "versions" not in meta  # the caller's dict is not modified
    assert got["versions"]["format"] == "2" and got["versions"]["correctnet"] == cn.__version__
    assert got["versions"]["torch"] == torch.__version__
    assert got["analog"]["layers"] == list(cn.analog_layers(model)) and got["stage"] == "baseline"
    assert not loaded.training
    x = torch.randn(16, 1, 8, 8, dtype=dtype)
    assert torch.equal(loaded(x), model.eval()(x))
    for seed in (0, 42, 2**62 + 5):
        with cn.chip(model, seed), cn.chip(loaded, seed):
            assert torch.equal(loaded(x), model(x))


def test_existing_checkpoint_is_not_overwritten_unless_asked(tmp_path, saved):
    before = saved.read_bytes()
    other = cn.analogize(cn.build_model("lenet5", (1, 8, 8), 10), cn.LogNormal(0.5))
    with pytest.raises(CheckpointError, match="exists.*overwrite=True"):
        ckpt.save_checkpoint(saved, other, _meta())
    assert saved.read_bytes() == before
    ckpt.save_checkpoint(saved, other, _meta(), overwrite=True)
    assert saved.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temporary files left


def test_unsaveable_input_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no analog layers"):
        ckpt.save_checkpoint(tmp_path / "a", cn.build_model("lenet5", (1, 8, 8), 10), _meta())
    with pytest.raises(CheckpointError, match="JSON"):
        ckpt.save_checkpoint(tmp_path / "b", _model(), _meta(bad=object()))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- interrupted export

def _half_then_fail(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    Path(filename).write_bytes(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


def test_interrupted_export_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, saved, monkeypatch):
    before = saved.read_bytes()
    monkeypatch.setattr(ckpt, "save_file", _half_then_fail)
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.save_checkpoint(tmp_path / "new.safetensors", _model(), _meta())
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.save_checkpoint(saved, _model(), _meta(), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no partial file, no temporary
    assert saved.read_bytes() == before
    ckpt.load_checkpoint(saved)


def test_interrupted_export_by_keyboard_interrupt(tmp_path, monkeypatch):
    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(safetensors.torch.save(tensors, metadata=metadata)[:100])
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / "m.safetensors", _model(), _meta())
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- unsafe files

class _Payload:
    """Unpickling this object runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "model.safetensors"  # the name does not matter, the content decides
    payload = {"state_dict": {"w": torch.ones(2)}, "evil": _Payload(marker)}
    if writer == "torch_zip":
        torch.save(payload, path)
    elif writer == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="not a correctnet safetensors checkpoint.*never unpickles"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    # and from the command line: one line, exit 2, still nothing ran
    assert evaluate_main([f"checkpoint={path}", "progress=false"]) == 2
    assert not marker.exists()
    # control: the payload is live, unpickling the same object does run it
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.read_text() == "pwned"


# ----------------------------------------------------------------------------- broken files

def test_truncated_files_are_a_clear_error(tmp_path, saved):
    data = saved.read_bytes()
    for cut in (0, 5, 8, 40, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|only .* bytes long"):
            ckpt.load_checkpoint(p)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "missing.safetensors")


def test_absurd_header_length_is_refused_without_allocating(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="does not start with a safetensors header"):
        ckpt.load_checkpoint(p)
    p.write_bytes((90_000_000).to_bytes(8, "little") + b"{}")  # plausible length, but not in this file
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.load_checkpoint(p)


def test_corrupt_bytes_are_a_clear_error(tmp_path, saved):
    data = bytearray(saved.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = bytearray(data)
    header[8 + n // 2] = ord("\x01")  # inside the JSON header
    (tmp_path / "h.safetensors").write_bytes(header)
    with pytest.raises(CheckpointError, match="not a valid safetensors JSON header|corrupt"):
        ckpt.load_checkpoint(tmp_path / "h.safetensors")
    weights = bytearray(data)
    weights[-3] ^= 0x40  # a bit flip in the last weight
    (tmp_path / "w.safetensors").write_bytes(weights)
    with pytest.raises(CheckpointError, match="digest"):
        ckpt.load_checkpoint(tmp_path / "w.safetensors")
    (tmp_path / "t.safetensors").write_bytes(bytes(data) + b"junk")
    with pytest.raises(CheckpointError, match="unexpected bytes"):
        ckpt.load_checkpoint(tmp_path / "t.safetensors")


def test_wrong_format_version_and_bad_metadata(tmp_path):
    tensors = _model().state_dict()
    with pytest.raises(CheckpointError, match="format '99' is not supported.*reads formats '1', '2'"):
        ckpt.load_checkpoint(_write_raw(tmp_path / "v.safetensors", tensors, _meta(), fmt="99"))
    with pytest.raises(CheckpointError, match="metadata is missing or corrupt"):
        ckpt.load_checkpoint(_write_raw(tmp_path / "j.safetensors", tensors, '{"model": {"name": '))
    with pytest.raises(CheckpointError, match="metadata is missing or corrupt"):
        ckpt.load_checkpoint(_write_raw(tmp_path / "l.safetensors", tensors, "[1, 2]"))
    safetensors.torch.save_file(tensors, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a correctnet checkpoint"):
        ckpt.load_checkpoint(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("change, needle", [
    (lambda m, t: m["model"].update(name="resnet999"), "model.name"),
    (lambda m, t: m["model"].update(num_classes=7), r"shape mismatch: fc3.weight \[10, 84\] \(model: \[7, 84\]\)"),
    (lambda m, t: m["model"].update(input_shape=[1, 28, 28]), "shape mismatch"),
    (lambda m, t: t.pop("conv1.bias"), "missing: conv1.bias"),
    (lambda m, t: t.update(extra=torch.ones(1)), "unexpected: extra"),
    (lambda m, t: m.pop("variation"), "KeyError: 'variation'"),
    (lambda m, t: m["variation"].update(name="uniform"), "variation.name"),
    (lambda m, t: m.update(analog={"layers": ["conv9"]}), "conv9"),
    (lambda m, t: m.update(compensation={"layers": ["fc1"]}), "compensation spec"),
    (lambda m, t: m.update(compensation={"fc9": {"kind": "output", "rank": 2}}), "fc9"),
    (lambda m, t: m.update(compensation={"fc1": {"kind": "output", "rank": 2}}), r"missing: fc1\.compensator"),
])
def test_metadata_that_cannot_rebuild_the_model(tmp_path, change, needle):
    tensors, meta = dict(_model().state_dict()), _meta()
    change(meta, tensors)
    with pytest.raises(CheckpointError, match=needle):
        ckpt.load_checkpoint(_write_raw(tmp_path / "m.safetensors", tensors, meta))


def test_absurd_model_size_is_refused_before_allocation(tmp_path):
    tensors, meta = dict(_model().state_dict()), _meta()
    meta["model"] = {"name": "vgg16", "input_shape": [3, 32, 32], "num_classes": 10, "kwargs": {"width": 1000}}
    with pytest.raises(CheckpointError, match="do not fit"):  # ~10^13 weights: only ever built on the meta device
        ckpt.load_checkpoint(_write_raw(tmp_path / "m.safetensors", tensors, meta))


# ----------------------------------------------------------------------------- python -m correctnet.evaluate

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real run of the main job: 1 epoch of LeNet-5 on digits, 3 evaluation chips."""
    out = tmp_path_factory.mktemp("run")
    r = subprocess.run([sys.executable, "-m", "correctnet.train", "method=none", "training.epochs=1", "evaluation.n_chips=3",
                        "progress=false", f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out / "model.safetensors", json.loads((out / "metrics.json").read_text())


def test_evaluate_command_reproduces_the_exported_metrics(trained, tmp_path):
    path, metrics = trained
    out = tmp_path / "eval.json"
    cmd = f"{evaluate_command(path)} progress=false out={shlex.quote(str(out))}"
    r = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    stage = metrics["stages"]["baseline"]
    assert res["clean_accuracy"] == stage["clean_accuracy"]
    assert res["results"][0]["mc"]["accuracies"] == stage["mc"]["accuracies"]  # per chip, exactly
    assert res["results"][0]["mc"] == stage["mc"]
    assert "baseline" in r.stdout and "lognormal variation sigma=0.5" in r.stdout


def test_evaluate_reports_whether_embedded_metrics_are_reproduced(trained, tmp_path, capsys):
    path, metrics = trained
    model, meta = ckpt.load_checkpoint(path)
    p = ckpt.save_checkpoint(tmp_path / "m.safetensors", model, {**meta, "metrics": metrics})
    assert evaluate_main([f"checkpoint={p}", "progress=false"]) == 0
    assert "reproduces the exported metrics exactly" in capsys.readouterr().out
    # a tampered record is noticed
    bad = json.loads(json.dumps(metrics))
    bad["stages"]["baseline"]["mc"]["accuracies"][0] += 0.5
    p = ckpt.save_checkpoint(tmp_path / "bad.safetensors", model, {**meta, "metrics": bad})
    assert evaluate_main([f"checkpoint={p}", "progress=false"]) == 0
    assert "DIFFERS" in capsys.readouterr().out


def test_evaluate_sigma_sweep(trained, tmp_path, capsys):
    path, metrics = trained
    out = tmp_path / "sweep.json"
    assert evaluate_main(["-m", f"checkpoint={path}", "variation.sigma=0.0,0.5", "evaluation.n_chips=2",
                          "progress=false", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lognormal 0" in text and "lognormal 0.5" in text
    res = json.loads(out.read_text())
    assert [r["variation"] for r in res["results"]] == [{"name": "lognormal", "sigma": 0.0},
                                                         {"name": "lognormal", "sigma": 0.5}]
    r0, r5 = res["results"]
    assert r0["mc"]["accuracies"] == [res["clean_accuracy"]] * 2  # sigma 0 is the nominal model
    assert r5["mc"]["accuracies"] == metrics["stages"]["baseline"]["mc"]["accuracies"][:2]  # same chips
    assert evaluate_main([f"checkpoint={path}", f"out={out}"]) == 2  # existing results are kept
    assert "overwrite=true" in capsys.readouterr().err


def test_evaluate_under_another_variation_model_and_on_fewer_test_images(trained, tmp_path):
    path, _ = trained
    from correctnet.evaluate import evaluate_checkpoint
    res = evaluate_checkpoint(path, variations=[{"name": "rram", "read_noise": 0.01}], n_chips=2, test_samples=50)
    v = res["results"][0]["variation"]
    assert v["name"] == "rram" and v["sigma"] == 0.5 and v["read_noise"] == 0.01
    assert res["evaluation"]["test_samples"] == 50 and res["results"][0]["reproduces_export"] is None
    # a checkpoint stored with the rram model is evaluated under lognormal: rram's own keys are dropped
    model, meta = ckpt.load_checkpoint(path)
    meta["variation"] = cn.make_variation("rram", 1.0, read_noise=0.01).to_dict()
    p = ckpt.save_checkpoint(tmp_path / "rram.safetensors", model, meta)
    res = evaluate_checkpoint(p, variations=[{"name": "lognormal"}], n_chips=2)
    assert res["results"][0]["variation"] == {"name": "lognormal", "sigma": 1.0}
    with pytest.raises(cn.ConfigError, match="evaluation.test_samples"):
        evaluate_checkpoint(path, test_samples=10**6)


@pytest.mark.parametrize("args, needle", [
    (["checkpoint=/nonexistent/m.safetensors"], "no checkpoint at /nonexistent/m.safetensors"),
    (["variation.sigma=-0.5"], "variation.sigma"),
    (["variation.sigma=abc"], "variation.sigma"),
    (["variation.name=uniform"], "variation.name"),
    (["evaluation.n_chips=0"], "evaluation.n_chips"),
    (["dataset.root=/nonexistent/data", "dataset.name=mnist"], "/nonexistent/data"),
    (["device=tpu"], "device"),
    (["sigma=0.3"], "unknown key 'sigma'"),
    ([], "checkpoint=PATH is required"),
])
def test_evaluate_bad_input_is_one_clear_line(trained, capsys, args, needle):
    path, _ = trained
    if args and args[0].startswith("checkpoint=") or not args:
        argv = args
    else:
        argv = [f"checkpoint={path}", "progress=false", *args]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("correctnet: error: ") and needle in err and len(err.splitlines()) == 1


def test_evaluate_asks_for_dataset_settings_a_checkpoint_does_not_record(saved, capsys):
    # saved by the library, not by train.py: no config, so no split seed or val_fraction to reuse
    assert evaluate_main([f"checkpoint={saved}", "progress=false"]) == 2
    assert "dataset.name=... dataset.val_fraction=... seed=..." in capsys.readouterr().err
    argv = [f"checkpoint={saved}", "progress=false", "dataset.name=digits", "dataset.val_fraction=0.2", "seed=0",
            "evaluation.n_chips=2"]
    assert evaluate_main(argv) == 0
    assert "lenet5 on digits, lognormal variation sigma=0.5" in capsys.readouterr().out


def test_evaluate_cli_error_has_no_traceback(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1)}, bad)
    r = subprocess.run([sys.executable, "-m", "correctnet.evaluate", f"checkpoint={bad}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("correctnet: error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "not a correctnet safetensors checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_command_is_copy_pasteable():
    cmd = evaluate_command("dir with space/model.safetensors")
    parts = shlex.split(cmd)
    assert parts[1:3] == ["-m", "correctnet.evaluate"]
    assert parts[3] == f"checkpoint={os.path.abspath('dir with space/model.safetensors')}"


def test_the_run_records_its_evaluation_batch_and_other_batches_give_the_same_chips(trained, tmp_path, capsys):
    """batch_size=auto is recorded as the number used; log-normal chips have no per-read noise, so any batch size
    gives the same per-chip accuracies; a bad batch size is one clear error."""
    path, metrics = trained
    assert metrics["config"]["evaluation"]["batch_size"] == 250  # auto on CPU
    accs = metrics["stages"]["baseline"]["mc"]["accuracies"]
    for size in ("auto", "7"):
        out = tmp_path / f"eval_{size}.json"
        assert evaluate_main([f"checkpoint={path}", "progress=false", f"evaluation.batch_size={size}", f"out={out}"]) == 0
        assert json.loads(out.read_text())["results"][0]["mc"]["accuracies"] == accs
    assert evaluate_main([f"checkpoint={path}", "progress=false", "evaluation.batch_size=big"]) != 0
    assert "evaluation.batch_size" in capsys.readouterr().err


def test_three_chip_shards_merge_into_exactly_the_one_job_evaluation(trained, tmp_path):
    """evaluation.chips=A:B in three jobs, then merge=...: the per-chip accuracies, seeds and statistics of one
    job evaluating all chips (and of the export), bit for bit; a gap or a foreign shard is one clear error."""
    path, metrics = trained
    whole = evaluate_checkpoint(path)
    files = []
    for a, b in ((2, 3), (0, 1), (1, 2)):  # any order
        shard = evaluate_checkpoint(path, chips=(a, b))
        assert shard["results"][0]["chips"] == [a, b] and shard["results"][0]["mc"]["n_chips"] == 1
        assert shard["results"][0]["reproduces_export"] is True  # each shard matches the exported chips a:b
        assert shard["results"][0]["chip_seeds"] == whole["results"][0]["chip_seeds"][a:b]
        files.append(tmp_path / f"shard{a}.json")
        files[-1].write_text(json.dumps(shard))
    out = tmp_path / "all.json"
    r = subprocess.run([sys.executable, "-m", "correctnet.evaluate", "merge=" + ",".join(map(str, files)),
                        f"out={out}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    merged = json.loads(out.read_text())
    assert merged["results"][0]["mc"] == whole["results"][0]["mc"] == metrics["stages"]["baseline"]["mc"]
    assert merged["results"][0]["chip_seeds"] == whole["results"][0]["chip_seeds"]
    assert merged["clean_accuracy"] == whole["clean_accuracy"] and merged["results"][0]["reproduces_export"] is True
    assert "reproduces the exported metrics exactly" in r.stdout and "merged from 3 shards, chips 0:3" in r.stdout
    with pytest.raises(ConfigError, match="must tile one range of chips"):
        merge_shards([json.loads(files[0].read_text()), json.loads(files[1].read_text())], ["s2", "s0"])
    other = evaluate_checkpoint(path, chips=(1, 2), seed=7)
    with pytest.raises(ConfigError, match="not a shard of the same evaluation"):
        merge_shards([json.loads(files[1].read_text()), other], ["s0", "seed7"])
    for bad in ("3:1", "0:0", "a:b", "5", f"0:{10 ** 9}"):
        with pytest.raises(ConfigError, match="evaluation.chips must be A:B"):
            check_chip_range(bad)


def test_a_bfloat16_evaluation_of_a_checkpoint_is_marked_and_never_merged_with_float32_shards(trained):
    path, metrics = trained
    bf = evaluate_checkpoint(path, chips=(0, 1), precision="bfloat16")
    assert bf["evaluation"]["precision"] == "bfloat16" and bf["results"][0]["reproduces_export"] is None
    exported = metrics["stages"]["baseline"]["mc"]["accuracies"][0]
    assert abs(bf["results"][0]["mc"]["accuracies"][0] - exported) <= 0.02  # the same chip, bf16 round-off
    f32 = evaluate_checkpoint(path, chips=(1, 2))
    assert "precision" not in f32["evaluation"]
    with pytest.raises(ConfigError, match="not a shard of the same evaluation"):
        merge_shards([bf, f32], ["bf16", "f32"])
    with pytest.raises(ConfigError, match="evaluation.precision"):
        evaluate_checkpoint(path, precision="fp8")

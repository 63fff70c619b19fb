"""Sweeps: method presets, the joblib and submitit launchers, failed jobs, python -m correctnet.aggregate."""
import csv
import shutil
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from correctnet.aggregate import aggregate, main as aggregate_main
from correctnet.conf import DIR as CONF

ROOT = Path(__file__).resolve().parents[1]
TINY = ["method=none", "training.epochs=1", "evaluation.n_chips=2", "progress=false", "evaluation.profile_chips=1",
        "evaluation.profile_samples=16"]


def run_cli(*args, module="correctnet.train", timeout=300):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("method, training, compensation, calibrated", [
    ("none", dict(noise_aware=False, strength=0.0), None, False),
    ("vanilla", dict(noise_aware=False, strength=0.0), None, False),
    ("noise_aware", dict(noise_aware=True, strength=0.0), None, False),
    ("suppression", dict(noise_aware=False, strength=0.02), None, False),
    ("correctnet", dict(noise_aware=True, strength=0.0), "all", False),
    ("correctnet_calibrated", dict(noise_aware=True, strength=0.0), "all", True),
    ("correctnet_noise_aware", dict(noise_aware=True, strength=0.02), "all", False),
])
def test_method_presets_select_training_and_compensation(method, training, compensation, calibrated):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}"])
    assert cfg.method.name == method
    assert cfg.training.noise_aware == training["noise_aware"]
    assert cfg.training.lipschitz.strength == training["strength"]
    assert cfg.compensation.placement == compensation
    assert cfg.calibration.enabled is calibrated
    if method in ("correctnet", "correctnet_calibrated"):
        assert cfg.reference is True and cfg.compensation.joint is True and cfg.compensation.steps > 0  # joint, then fine-tuned


def test_the_default_is_correctnet_calibrated_and_groups_on_the_command_line_win():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = compose("config")
        plain = compose("config", overrides=["method=none"])
        mixed = compose("config", overrides=["method=correctnet", "training=lipschitz", "calibration=per_chip"])
    assert default.method.name == "correctnet_calibrated" and default.calibration.enabled and default.reference
    assert plain.training.lipschitz.strength == 0 and plain.compensation.placement is None and not plain.reference
    assert mixed.method.name == "correctnet" and mixed.compensation.placement == "all"
    assert not mixed.training.noise_aware and mixed.training.lipschitz.strength == 0.02 and mixed.calibration.enabled


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("joblib")
    # placement=fixed (every layer): the stages do not depend on what a search of a 2-epoch network chooses
    r = run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=correctnet", "placement=fixed",
                "variation.sigma=0.3,0.5", "compensation.steps=5", *TINY[1:], f"hydra.sweep.dir={out}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_joblib_sweep_runs_every_job_and_records_the_method(joblib_sweep):
    metrics = [json.loads((joblib_sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert sorted(m["variation"]["sigma"] for m in metrics) == [0.3, 0.5]
    for m in metrics:
        assert m["config"]["method"] == {"name": "correctnet"}
        assert list(m["stages"]) == ["baseline", "compensated"]
        assert m["original_accuracy"] == m["stages"]["baseline"]["clean_accuracy"]


@pytest.mark.slow
def test_aggregate_turns_a_sweep_into_table_csv_and_plot(joblib_sweep, tmp_path):
    out = tmp_path / "report"
    r = run_cli(str(joblib_sweep), f"out={out}", module="correctnet.aggregate", timeout=120)
    assert r.returncode == 0, r.stderr
    w, h = png_size(out / "accuracy_vs_sigma.png")
    assert w > 100 and h > 100
    rows = read_csv(out / "results.csv")
    assert [(x["method"], x["stage"], x["sigma"], x["final"]) for x in rows] == [
        ("correctnet", "baseline", "0.3", "False"), ("correctnet", "compensated", "0.3", "True"),
        ("correctnet", "baseline", "0.5", "False"), ("correctnet", "compensated", "0.5", "True")]
    for x in rows:
        assert x["status"] == "ok" and x["n_runs"] == "1" and 0 <= float(x["acc_mean"]) <= 1
        assert float(x["p5_mean"]) <= float(x["acc_mean"]) <= float(x["p95_mean"])
        assert (x["params_pct"] != "") == (x["stage"] == "compensated")
    md = (out / "results.md").read_text()
    final = md.split("## Final stage per method")[1].split("## All stages")[0]
    assert final.count("| correctnet | compensated |") == 2 and "baseline" not in final
    assert "](accuracy_vs_sigma.png)" in md and "layer_profile_compensated.png" in md


@pytest.mark.slow
def test_submitit_local_sweep_runs_every_job(tmp_path):
    r = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "variation.sigma=0.3,0.5",
                *TINY, f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    sigmas = sorted(json.loads(p.read_text())["variation"]["sigma"] for p in tmp_path.glob("*/metrics.json"))
    assert sigmas == [0.3, 0.5]


@pytest.mark.slow
def test_a_failed_job_keeps_the_finished_runs_and_is_reported(tmp_path):
    # the failed job is recorded (its error in its train.log), the sweep goes on, and exits non-zero at the end
    sweep = tmp_path / "sweep"
    r = run_cli("-m", "variation.sigma=0.5,-1,0.3", *TINY, f"hydra.sweep.dir={sweep}")
    assert r.returncode != 0 and "variation.sigma" in r.stderr
    assert (sweep / "0" / "metrics.json").is_file() and not (sweep / "1" / "metrics.json").exists()
    assert (sweep / "2" / "metrics.json").is_file()
    res = aggregate(sweep, tmp_path / "report")
    rows = read_csv(tmp_path / "report" / "results.csv")
    assert sorted((x["sigma"], x["status"]) for x in rows) == [("-1", "failed"), ("0.3", "ok"), ("0.5", "ok")]
    failed = next(x for x in rows if x["status"] == "failed")
    assert "variation.sigma=-1" in failed["overrides"] and "got -1" in failed["error"]
    assert sorted(r.status for r in res["runs"]) == ["failed", "ok", "ok"]
    md = (tmp_path / "report" / "results.md").read_text()
    assert "**failed**" in md and "`variation.sigma=-1 " in md
    assert png_size(tmp_path / "report" / "accuracy_vs_sigma.png")[0] > 0


@pytest.mark.slow
def test_an_interrupted_sweep_resumed_beside_it_has_no_gaps(tmp_path):
    first = tmp_path / "first"
    assert run_cli("-m", "variation.sigma=0.3,0.5", *TINY, f"hydra.sweep.dir={first}").returncode == 0

    shutil.rmtree(first / "1")  # as if the sweep had been stopped before its second job
    res = aggregate(tmp_path, tmp_path / "report")
    assert sorted(r.status for r in res["runs"]) == ["not run", "ok"]
    # the missing job re-run into a sibling directory (the same task overrides, in another order)
    r = run_cli("-m", *reversed(TINY), "variation.sigma=0.5", f"hydra.sweep.dir={tmp_path / 'rest'}")
    assert r.returncode == 0, r.stderr
    res = aggregate(tmp_path, tmp_path / "report")
    assert sorted((r.status, r.sigma) for r in res["runs"]) == [("ok", 0.3), ("ok", 0.5)]


@pytest.mark.parametrize("args, needle", [
    (["/nonexistent/sweep"], "does not exist"),
    ([], "sweep directory is required"),
    (["EMPTY"], "no runs found"),
    (["EMPTY", "stages=some"], "stages must be final or all"),
    (["EMPTY", "colour=red"], "unknown key 'colour'"),
])
def test_aggregate_errors_are_one_line(tmp_path, capsys, args, needle):
    args = [str(tmp_path) if a == "EMPTY" else a for a in args]
    assert aggregate_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("correctnet: error: ") and needle in err[0]

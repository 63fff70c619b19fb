"""The command line as a process: threads, progress bars, Ctrl-C, re-running an interrupted command, errors."""
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from correctnet.errors import ConfigError
from correctnet.runtime import auto_threads, resolve_progress, resolve_threads, resolve_workers
from correctnet.train import _interrupted_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["method=none", "training.epochs=8", "evaluation.n_chips=3", "evaluation.profile_chips=2", "progress=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_cli(*args, cwd=ROOT, env=ENV, timeout=300):
    return subprocess.run([sys.executable, "-m", "correctnet.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_threads_and_progress_settings(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert auto_threads() == 1 and resolve_threads("auto") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads("auto") == 3 and resolve_threads(2) == 2 and resolve_threads("4") == 4
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="threads must be auto or an integer >= 1"):
            resolve_threads(bad)
    assert resolve_progress("auto", stream=_Stream(False)) is False  # a redirected log: no bars
    assert resolve_progress("auto", stream=_Stream(True)) is True
    assert resolve_progress(True) is True and resolve_progress("false") is False
    with pytest.raises(ConfigError, match="progress must be auto, true or false"):
        resolve_progress("maybe")


def test_workers_setting(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert resolve_workers("auto", threads=1) == 4 and resolve_workers("auto", threads=2) == 2
    assert resolve_workers("auto", threads=8) == 1  # never below one process
    assert resolve_workers("3") == 3 and resolve_workers(1) == 1
    for bad in (0, -2, "some", 2.5, True):
        with pytest.raises(ConfigError, match="evaluation.workers must be auto or an integer >= 1"):
            resolve_workers(bad)


@pytest.mark.slow
def test_threads_are_recorded_and_evaluate_reuses_them_to_reproduce(tmp_path):
    out = tmp_path / "run"
    r = train_cli(*TINY, "training.epochs=2", "threads=2", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["environment"]["torch_threads"] == 2 and m["config"]["threads"] == 2
    ev = subprocess.run([sys.executable, "-m", "correctnet.evaluate", f"checkpoint={out / 'model.safetensors'}",
                         f"out={tmp_path / 'ev.json'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        env=ENV)  # OMP_NUM_THREADS=1 in the environment; the recorded 2 threads are used
    assert ev.returncode == 0, ev.stderr
    assert "reproduces the exported metrics exactly" in ev.stdout
    assert torch.get_num_threads() >= 1  # (this process is untouched)


def test_a_validation_error_prints_once_and_leaves_no_run_directory(tmp_path):
    out = tmp_path / "run"
    r = train_cli(*TINY, "seed=-1", f"hydra.run.dir={out}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (r.stdout + r.stderr).count("seed must be an integer") == 1, (r.stdout, r.stderr)
    assert not out.exists()


def _wait_for(path: Path, p: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.slow
def test_ctrl_c_says_what_was_saved_and_the_command_that_resumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "correctnet.train", *TINY, f"hydra.run.dir={out}"]
    # a terminal's Ctrl-C: the job starts with the default SIGINT even where this test runs with SIGINT ignored
    # (a background job of a non-interactive shell ignores it, and Python then never raises KeyboardInterrupt)
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(out / "resume" / "training.pt", p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("correctnet: interrupted")]
    assert len(line) == 1, err
    assert "training" in line[0] and str(out / "resume") in line[0]
    resume = line[0].split("continue with: ", 1)[1]
    # this interpreter: the command works where the virtual environment is not activated
    assert shlex.split(resume) == [sys.executable, "-m", "correctnet.train", *TINY, f"hydra.run.dir={out}"]
    r = train_cli(*shlex.split(resume)[3:])  # the printed command continues the run
    assert r.returncode == 0, r.stderr
    assert "resuming from" in (out / "train.log").read_text() and (out / "metrics.json").exists()


def _fake_run(root: Path, stamp: str, overrides: list[str], snapshot: bool = True, finished: bool = False) -> Path:
    d = root / "outputs" / "2026-01-01" / stamp
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if snapshot:
        (d / "resume").mkdir()
        (d / "resume" / "training.pt").write_bytes(b"x")
    if finished:
        (d / "metrics.json").write_text("{}")
    return d


def test_rerunning_an_interrupted_command_points_at_its_run_directory(tmp_path):
    args = ["method=none", "seed=-1"]  # fails validation right after the hint: fast
    interrupted = _fake_run(tmp_path, "10-00-00", args)
    _fake_run(tmp_path, "10-00-01", args, finished=True)        # finished: not offered
    _fake_run(tmp_path, "10-00-02", ["method=none"])             # another command: not offered
    _fake_run(tmp_path, "10-00-03", args, snapshot=False)        # nothing to continue from
    now = tmp_path / "outputs" / "2026-01-02" / "11-00-00"
    assert _interrupted_runs(now, args) == [interrupted]
    r = train_cli(*args, cwd=tmp_path)
    hint = [ln for ln in r.stderr.splitlines() if "an interrupted run of this command" in ln]
    assert len(hint) == 1, r.stderr
    assert f"hydra.run.dir={interrupted.resolve()}" in hint[0] or f"hydra.run.dir={interrupted}" in hint[0]
    assert "training" in hint[0]
    command = shlex.split(hint[0].split("To continue that one instead: ", 1)[1])
    assert command[:3] == [sys.executable, "-m", "correctnet.train"]  # this interpreter, as it is


# each case is a process start that fails while Hydra composes the config (about 2 s)
@pytest.mark.parametrize("args, needles", [
    (["foo=1"], ["foo", "no key 'foo'", "accepted: dataset"]),
    (["training.epoch=3"], ["training.epoch", "did you mean epochs?"]),
    (["model=resnet999"], ["model=resnet999", "available: custom", "lenet5"]),
    (["+foo=1"], ["unknown top-level key(s) ['foo']"]),
    (["+evaluation.foo=1"], ["unknown evaluation key(s) ['foo']"]),
    (["training=schema"], ["training=schema", "not an option", "available: default, lipschitz"]),
    (["training.epochs=${oops}"], ["training.epochs", "Interpolation key 'oops' not found"]),
    (["-m", "foo=1,2"], ["foo", "no key 'foo'"]),
    (["-m", "model=lenet5,resnet999"], ["model=resnet999", "available: custom"]),
])
def test_hydra_composition_errors_are_one_line_exit_2_and_leave_no_directory(tmp_path, args, needles):
    r = train_cli(*args, "progress=false", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("correctnet: error: "), r.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>, no outputs/<date>, no outputs/


def test_a_sweep_runs_its_valid_jobs_and_names_each_refused_one_in_one_line(tmp_path):
    r = train_cli(*TINY, "-m", "training.epochs=0,1,-1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("correctnet: error:")]
    assert len(errors) == 2 and " training.epochs=0 " in errors[0] and " training.epochs=-1 " in errors[1]
    assert all(e.startswith("correctnet: error: job ") for e in errors)
    assert all("training.epochs must be an integer >= 1" in e for e in errors)
    assert "Traceback" not in r.stderr
    assert (tmp_path / "sweep" / "1" / "metrics.json").is_file()  # the valid job ran


def test_help_lists_the_options_without_the_internal_schemas():
    r = train_cli("--help")
    assert r.returncode == 0, r.stderr
    groups = {line.split(": ")[0]: line.split(": ")[1].split(", ") for line in r.stdout.splitlines()
              if line.startswith(("training: ", "placement: ", "model: ", "calibration: ", "compensation: "))}
    assert set(groups) == {"training", "placement", "model", "calibration", "compensation"}, r.stdout
    assert all("schema" not in o for opts in groups.values() for o in opts), groups
    assert "noise_aware" in groups["training"] and "hf" in groups["model"] and "ppo" in groups["placement"]
    assert r.stdout.startswith("correctnet train:")


def test_hydra_error_message_for_open_and_nested_keys():
    from hydra.errors import ConfigCompositionException

    from correctnet.train import hydra_error_message

    e = ConfigCompositionException("Could not override 'model.widht'.\nTo append to your config use +model.widht=2")
    assert hydra_error_message(e) == "model.widht: in model there is no key 'widht'; add a constructor argument " \
                                     "with +model.widht=VALUE"
    e = ConfigCompositionException("Could not override 'placement.ppo.stepz'.\nTo append ...")
    assert "did you mean steps?" in hydra_error_message(e) or "accepted:" in hydra_error_message(e)


# ----------------------------------------------------------------------------- the run directory's lock

def _lock(run_dir: Path, pid: int) -> Path:
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".lock").write_text(f"{pid} {socket.gethostname()}\n")
    return run_dir / ".lock"


def test_a_second_run_in_a_locked_directory_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(["sleep", "60"])  # stands in for the first run: a live process holding the lock
    try:
        lock = _lock(out, first.pid)
        (out / ".hydra").mkdir()
        (out / ".hydra" / "config.yaml").write_text("the first run's record\n")
        (out / "train.log").write_text("the first run's log\n")
        r = train_cli(*TINY, f"hydra.run.dir={out}")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"PID {first.pid}" in lines[0] and lines[0].startswith("correctnet: error:"), lines
        assert lock.read_text().split()[0] == str(first.pid) and not (out / "metrics.json").exists()
        # refused before Hydra writes into the directory: the first run's records and log are untouched
        assert (out / ".hydra" / "config.yaml").read_text() == "the first run's record\n"
        assert (out / "train.log").read_text() == "the first run's log\n"
        assert sorted(p.name for p in out.iterdir()) == [".hydra", ".lock", "train.log"]
        assert sorted(p.name for p in (out / ".hydra").iterdir()) == ["config.yaml"]
        # while it holds the lock, its snapshots are a running run's, not an interrupted one's
        (out / "resume").mkdir()
        (out / "resume" / "training.pt").write_bytes(b"x")
        (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["a=1"]))
        runs = tmp_path / "outputs" / "2026-01-01"
        runs.mkdir(parents=True)
        out.rename(runs / "10-00-00")
        assert _interrupted_runs(runs / "10-00-01", ["a=1"]) == []
    finally:
        first.kill()
        first.wait()
    assert _interrupted_runs(runs / "10-00-01", ["a=1"]) == [runs / "10-00-00"]  # its process is gone: interrupted


def test_lock_is_exclusive_reentrant_and_a_stale_one_is_taken_over(tmp_path, capsys):
    from correctnet import runlock

    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = _lock(tmp_path, gone.pid)  # a killed run's lock
    runlock.acquire(tmp_path)
    assert "taking over" in capsys.readouterr().err and lock.read_text().split()[0] == str(os.getpid())
    runlock.acquire(tmp_path)  # the same process again (the CLI, then run()): re-entrant
    runlock.release(tmp_path)
    assert lock.exists() and runlock.holder(tmp_path) == os.getpid()
    runlock.release(tmp_path)
    assert not lock.exists()
    live = subprocess.Popen(["sleep", "60"])
    try:
        _lock(tmp_path, live.pid)
        with pytest.raises(runlock.RunLockedError, match=f"PID {live.pid}"):
            runlock.acquire(tmp_path)
    finally:
        live.kill()
        live.wait()


def test_a_long_job_says_how_long_it_will_take_from_its_first_steps(tmp_path):
    """training.epochs=5000 on the default data: an estimate on the console within seconds, not silence."""
    proc = subprocess.Popen([sys.executable, "-m", "correctnet.train", "method=noise_aware", "training.epochs=5000",
                             "progress=false", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line.rstrip())
            if " for 90000 steps " in line:
                break
    finally:
        proc.kill()
        proc.wait()
    estimate = [s for s in seen if " for 90000 steps " in s]  # 5000 epochs x 18 steps of 64 of the 1150 images
    assert estimate and estimate[0].startswith("noise_aware: about "), seen
    assert "measured on the first" in estimate[0]

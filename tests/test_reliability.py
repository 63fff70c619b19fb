"""Reliability: interrupted runs resume bit-identically, bad configurations are refused up front with the key
named, NaN stops a run naming the stage and step, the same seed gives the same metrics."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import correctnet as cn
from correctnet.calibration import CompensationConfig, train_compensation
from correctnet.compensation import attach_compensation, compensation_parameters
from correctnet.conf import DIR as CONF
from correctnet.data import load_dataset
from correctnet.resume import ResumeError, ResumeStore, load_state, open_store
from correctnet.train import run
from correctnet.training import TrainConfig, TrainingDivergedError, check_finite_parameters, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["method=none", "training.epochs=8", "evaluation.n_chips=3", "evaluation.profile_chips=2", "progress=false"]


class Interrupt(Exception):
    """Stands in for a kill in the in-process tests."""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_fraction=0.2, seed=0)


def analog_model(digits, name="mlp"):
    torch.manual_seed(0)
    model = cn.build_model(name, digits.input_shape, digits.num_classes)
    return cn.analogize(model, cn.make_variation("lognormal", sigma=0.3), inplace=True)


def without_timing(obj):
    """metrics/history without wall-clock fields and run-directory paths."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items()
                if "seconds" not in k and k not in ("checkpoint", "environment")}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- resume, in process

def test_training_resumes_mid_epoch_bit_identically(digits, tmp_path):
    """Noise-aware + spectral-regularized training interrupted in the middle of epoch 2 resumes exactly."""
    cfg = TrainConfig(epochs=3, batch_size=128, noise_aware=True, seed=1)

    def reg():
        return cn.LipschitzRegularizer("spectral", strength=1e-3, seed=1)

    ref = analog_model(digits)
    ref_hist = train(ref, digits.train, digits.val, cfg, regularizer=reg(), progress=False)

    store = ResumeStore(tmp_path / "resume", interval_s=0.0)  # a snapshot after every step
    inner, calls = reg(), [0]

    def interrupting(model):
        calls[0] += 1
        if calls[0] == 13:  # epoch 2 (9 steps per epoch), after 3 of its steps
            raise Interrupt
        return inner(model)

    interrupting._vectors = inner._vectors  # its power-iteration state is saved like the regularizer's own
    with pytest.raises(Interrupt):
        train(analog_model(digits), digits.train, digits.val, cfg, regularizer=interrupting, progress=False,
              resume=store)
    state = load_state(store.path("training"))["state"]
    assert (state["epoch"], state["step"]) == (1, 3)
    resumed = analog_model(digits)
    hist = train(resumed, digits.train, digits.val, cfg, regularizer=reg(), progress=False, resume=store)
    assert without_timing(hist) == without_timing(ref_hist)
    assert same_state(resumed, ref)
    # a finished snapshot skips the loop and gives the same result again
    again = analog_model(digits)
    assert without_timing(train(again, digits.train, digits.val, cfg, progress=False, resume=store)) == \
        without_timing(ref_hist)
    assert same_state(again, ref)
    # a snapshot of another schedule is refused
    with pytest.raises(ResumeError, match="epochs"):
        train(analog_model(digits), digits.train, None, TrainConfig(epochs=5, batch_size=128), progress=False,
              resume=store)


def test_compensation_training_resumes_mid_pass_bit_identically(digits, tmp_path):
    cfg = CompensationConfig(steps=14, batch_size=256, lr=3e-3, distill=0.5, seed=2)  # 5 steps per pass

    def model():
        m = analog_model(digits, "lenet5")
        attach_compensation(m, ["fc1", "fc2"], kind="output", rank=2, seed=0)
        return m

    ref = model()
    ref_result = train_compensation(ref, digits.train, cfg, progress=False)
    store = ResumeStore(tmp_path / "resume", interval_s=0.0)

    def stop(step):
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_compensation(model(), digits.train, cfg, progress=False, on_step=stop, resume=store)
    assert load_state(store.path("compensation"))["state"]["step"] == 7
    resumed = model()
    result = train_compensation(resumed, digits.train, cfg, progress=False, resume=store)
    assert without_timing(result.to_dict()) == without_timing(ref_result.to_dict())
    assert result.chip_seeds == ref_result.chip_seeds
    assert same_state(resumed, ref)


def test_resume_store_refuses_another_config_and_bad_files(tmp_path):
    d = tmp_path / "resume"
    assert open_store(d, "auto", {"config": {"seed": 0, "training": {"lr": 0.1}}}) is not None
    with pytest.raises(cn.ConfigError, match=r"training.lr: 0.1 -> 0.2.*resume=fresh"):
        open_store(d, "auto", {"config": {"seed": 0, "training": {"lr": 0.2}}})
    assert open_store(d, "fresh", {"config": {"seed": 1}}) is not None  # discards the other run's state
    with pytest.raises(cn.ConfigError, match="resume=require"):
        open_store(tmp_path / "empty", "require", {})
    with pytest.raises(cn.ConfigError, match="resume must be one of"):
        open_store(d, "sometimes", {})
    assert open_store(d, "off", {}) is None
    (d / "training.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ResumeError, match="training.pt"):
        ResumeStore(d).load("training")


# ----------------------------------------------------------------------------- NaN guards

def test_nan_in_training_names_stage_epoch_and_step(digits):
    def poisoned(model):
        poisoned.calls += 1
        return torch.tensor(float("nan")) if poisoned.calls == 4 else torch.zeros(())
    poisoned.calls = 0
    with pytest.raises(TrainingDivergedError, match=r"suppressed: training loss became nan at epoch 1, step 3"):
        train(analog_model(digits), digits.train, None, TrainConfig(epochs=1), regularizer=poisoned,
              progress=False, stage="suppressed")
    model = analog_model(digits)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"baseline: parameters became NaN or infinite after epoch 2"):
        check_finite_parameters(model, "baseline", "after epoch 2")


def test_nan_in_compensation_training_names_stage_and_step(digits):
    m = analog_model(digits, "lenet5")
    attach_compensation(m, ["fc1"], kind="output", rank=2)

    def poison(step):
        if step == 5:
            with torch.no_grad():
                compensation_parameters(m)[0].fill_(float("nan"))

    with pytest.raises(TrainingDivergedError, match=r"compensated: compensation training loss became nan at step 5"):
        train_compensation(m, digits.train, CompensationConfig(steps=10), progress=False, stage="compensated",
                           on_step=poison)


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_nan_injected_into_the_pipeline_stops_it_naming_the_stage(tmp_path, monkeypatch, digits):
    import correctnet.train as ct
    x = digits.train.tensors[0].clone()
    x[100] = float("nan")  # one poisoned training image: its batch gives a NaN loss
    poisoned = dataclasses.replace(digits, train=torch.utils.data.TensorDataset(x, digits.train.tensors[1]))
    monkeypatch.setattr(ct, "dataset_from_config", lambda *a, **k: poisoned)
    with pytest.raises(TrainingDivergedError, match=r"baseline: training loss became nan at epoch 1, step \d+"):
        run(compose_cfg(*TINY, "resume=off"), tmp_path)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model.safetensors").exists()


# ----------------------------------------------------------------------------- validation up front

@pytest.mark.parametrize("overrides, key", [
    (["variation.sigma=-0.5"], "variation.sigma"),
    (["compensation=all", "compensation.placement=[nope]"], "compensation.placement"),
    (["dataset=fashion_mnist", "dataset.root=/nonexistent/fmnist"], "dataset.root=/nonexistent/fmnist"),
    (["compensation=all", "placement=greedy", "placement.budget=-1"], "placement.budget"),
    (["training.epochs=0"], "training.epochs"),
    (["training.lr=fast"], "training.lr"),
    (["evaluation.n_chips=many"], "evaluation.n_chips"),
    (["seed=-1"], "seed must be"),
    (["progress=maybe"], "progress"),
    (["threads=0"], "threads"),
    (["threads=many"], "threads"),
    (["resume=sometimes"], "resume"),
    (["analog.include=[nope]"], "analog.include"),
])
def test_bad_configuration_is_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(cn.CorrectNetError) as e:  # the CLI prints it and exits with status 2
        run(compose_cfg(*TINY, *overrides), tmp_path)
    msg = str(e.value)
    assert key in msg, msg
    assert list(tmp_path.iterdir()) == []  # nothing written: no partial run directory


@pytest.mark.parametrize("overrides, key", [(["placement.budget=-1", "compensation=all", "placement=greedy"],
                                             "placement.budget"),
                                            (["training.lr=fast"], "training.lr")])
def test_cli_exits_2_naming_the_key(tmp_path, overrides, key):
    r = subprocess.run([sys.executable, "-m", "correctnet.train", *TINY, *overrides, f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "metrics.json").exists()


# ----------------------------------------------------------------------------- the command line: kill, resume, reproduce

def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "correctnet.train", *TINY, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> None:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err


@pytest.mark.slow
def test_sigkilled_run_resumes_and_same_seed_reproduces_metrics(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    pa, pb, pc = _start(a), _start(b), _start(c)  # two uninterrupted runs and one to be killed, side by side
    snapshot = c / "resume" / "training.pt"
    deadline = time.monotonic() + 240
    while not snapshot.exists() and pc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    pc.send_signal(signal.SIGKILL)  # a real kill: no cleanup, no atexit
    pc.wait()
    assert pc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_state(snapshot)["state"]
    assert 1 <= killed_at["epoch"] < 8, killed_at["epoch"]  # killed mid-training
    assert not (c / "metrics.json").exists()
    pc = _start(c)  # the same command in the same run directory continues
    for p in (pa, pb, pc):
        _finish(p)
    ma, mb, mc = (json.loads((d / "metrics.json").read_text()) for d in (a, b, c))
    assert without_timing(ma) == without_timing(mb)  # same command, same seed: same numbers
    assert without_timing(mc) == without_timing(ma)  # resumed == uninterrupted
    assert ma["command"] == "python -m correctnet.train " + " ".join(TINY)
    assert ma["config"]["seed"] == 0 and {"torch", "numpy", "correctnet", "python"} <= set(ma["versions"])
    assert "resuming from" in (c / "train.log").read_text()
    assert not (c / "resume").exists()  # snapshots are removed once the results are written

"""The command line: python -m correctnet.train, on the digits default (tiny settings to stay fast)."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import correctnet as cn
from correctnet.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
FAST = ["method=none", "training.epochs=2", "evaluation.n_chips=4", "progress=false"]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "correctnet.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_plain_job_writes_metrics_and_a_checkpoint_that_reloads(tmp_path):
    out = tmp_path / "run"
    r = run_cli(*FAST, f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "digits" and m["model"] == "lenet5"
    assert m["variation"] == {"name": "lognormal", "sigma": 0.5}
    base = m["stages"]["baseline"]
    mc = base["mc"]
    assert set(mc) >= {"n_chips", "mean", "std", "min", "p5", "accuracies", "seed"}
    assert mc["n_chips"] == 4 and len(mc["accuracies"]) == 4
    assert all(0 <= a <= 1 for a in mc["accuracies"]) and 0 <= base["clean_accuracy"] <= 1
    assert "vanilla" in r.stdout and "metrics.json" in r.stdout
    # the checkpoint reloads without Hydra and reproduces the recorded numbers exactly
    model, meta = cn.load_checkpoint(out / "model.safetensors")
    test = load_dataset("digits", val_fraction=0.2, seed=0).test
    assert cn.clean_accuracy(model, test) == base["clean_accuracy"]
    again = cn.monte_carlo(model, test, n_chips=4, seed=mc["seed"], progress=False)
    assert again.accuracies == mc["accuracies"]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-identical numbers across processes need equal threads
STORY = ["training.epochs=3", "evaluation.n_chips=4", "calibration.steps=5", "calibration.n_images=200", "progress=false"]


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """The default job (method=correctnet_calibrated), small: reference, CorrectNet, calibration."""
    out = tmp_path_factory.mktemp("story")
    r = subprocess.run([sys.executable, "-m", "correctnet.train", *STORY, f"hydra.run.dir={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return out, r.stdout, json.loads((out / "metrics.json").read_text())


def test_default_job_tells_the_story_in_one_table(story):
    out, stdout, m = story
    assert m["config"]["method"]["name"] == "correctnet_calibrated"
    assert list(m["stages"]) == ["baseline", "compensated", "calibrated"]
    assert m["original_accuracy"] == m["stages"]["baseline"]["clean_accuracy"]
    comp = m["stages"]["compensated"]
    assert comp["training"]["joint"] and comp["training"]["base"]["noise_aware"] and comp["check"] is None
    # the calibrated preset's network trains at 0.6 x the deployed sigma; evaluation batches: auto = 250 on CPU
    assert comp["training"]["base"]["noise_variation"]["sigma"] == pytest.approx(0.6 * m["variation"]["sigma"])
    assert m["config"]["evaluation"]["batch_size"] == 250
    # then the compensators alone took the preset's chip-agnostic steps, one fresh training chip per step
    t = comp["training"]
    assert t["steps"] > 0 and t["chips"] == t["steps"] and t["chip_stream"] == "COMPENSATION" and t["distill"] > 0
    assert comp["overhead"]["total"]["params"] > 0 and m["stages"]["calibrated"]["overhead"] == comp["overhead"]
    rows = [line for line in stdout.splitlines() if "%" in line]
    labels = ["original (vanilla, no variation)", "vanilla ", "CorrectNet chip-agnostic", "CorrectNet calibrated"]
    for label in labels:
        assert sum(label in line for line in rows) == 1, (label, stdout)
    assert "mean/orig" in stdout and "p5/orig" in stdout
    # the checkpoint holds the deployed CorrectNet network and reproduces its chip-agnostic stage
    model, meta = cn.load_checkpoint(out / "model.safetensors")
    assert meta["stage"] == "compensated" and meta["compensation"]
    # the calibration teacher was chosen on validation chips, and the choice is what the stage used
    cal = m["stages"]["calibrated"]["calibration"]
    choice = cal["teacher_choice"]
    assert set(choice["validation_accuracy"]) == {"ensemble", "reference"} and choice["chip_stream"] == "CHECK"
    assert cal["teacher"] == choice["chosen"] == max(choice["validation_accuracy"], key=choice["validation_accuracy"].get)
    # each chip also fitted the digital biases of the layers the search left without a compensator (LeNet-5: 5 layers)
    assert cal["biases"] is True and cal["bias_layers"] == 5 - len(meta["compensation"])
    # the vanilla reference is exported beside it, and reproduces the baseline stage
    ref, ref_meta = cn.load_checkpoint(out / meta["reference"]["file"])
    assert ref_meta["stage"] == "baseline" and not ref_meta["compensation"]
    test = load_dataset("digits", val_fraction=0.2, seed=0).test
    base = m["stages"]["baseline"]
    assert cn.clean_accuracy(ref, test) == base["clean_accuracy"]
    assert cn.monte_carlo(ref, test, n_chips=4, seed=0, progress=False).accuracies == base["mc"]["accuracies"]


@pytest.mark.slow
def test_calibration_replays_from_the_checkpoint_in_a_fresh_process(story, tmp_path):
    out, _, m = story
    chip_file = tmp_path / "chip2.safetensors"
    r = subprocess.run([sys.executable, "-m", "correctnet.evaluate", f"checkpoint={out / 'model.safetensors'}",
                        "calibration=per_chip", "export_chip=2", f"out_chip={chip_file}", "progress=false",
                        f"out={tmp_path / 'eval.json'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "reproduces the exported metrics exactly" in r.stdout, r.stdout
    res = json.loads((tmp_path / "eval.json").read_text())
    accs = m["stages"]["calibrated"]["mc"]["accuracies"]
    assert res["results"][0]["reproduces_export"] is True
    assert res["stage"] == "calibrated" and res["results"][0]["mc"]["accuracies"] == accs
    # the exported chip, loaded into the checkpoint's model, is that calibrated chip
    script = (f"import correctnet as cn, json\n"
              f"from correctnet.calibration import load_calibrated_chip\n"
              f"from correctnet.data import load_dataset\n"
              f"model, meta = cn.load_checkpoint({str(out / 'model.safetensors')!r})\n"
              f"seed = load_calibrated_chip(model, {str(chip_file)!r})\n"
              f"test = load_dataset('digits', val_fraction=0.2, seed=0).test\n"
              f"with cn.chip(model, seed):\n    print(json.dumps([seed, cn.accuracy(model, test)]))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    seed, acc = json.loads(r.stdout.strip().splitlines()[-1])
    assert seed == res["results"][0]["chip_seeds"][2]
    assert acc == accs[2]
    # and without calibration the chip is measurably another one: the replay is not trivially true
    plain = subprocess.run([sys.executable, "-m", "correctnet.evaluate", f"checkpoint={out / 'model.safetensors'}",
                            "calibration=per_chip", "calibration.steps=1", "progress=false"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert plain.returncode == 0 and "reproduces" not in plain.stdout and "DIFFERS" not in plain.stdout


@pytest.mark.slow
def test_noise_aware_training_reports_its_stage(tmp_path):
    r = run_cli(*FAST, "training=noise_aware", "training.noise_sigma=0.3", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    stage = json.loads((tmp_path / "metrics.json").read_text())["stages"]["noise_aware"]
    assert stage["training"]["noise_variation"] == {"name": "lognormal", "sigma": 0.3}


@pytest.mark.slow
def test_suppression_stage_reports_constants_profile_and_plot(tmp_path):
    r = run_cli(*FAST, "training=lipschitz_noise_aware", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    stage = json.loads((tmp_path / "metrics.json").read_text())["stages"]["suppressed"]
    assert stage["training"]["lipschitz"]["kind"] == "relative" and stage["training"]["noise_aware"]
    layers = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert list(stage["lipschitz"]) == layers and all(v > 0 for v in stage["lipschitz"].values())
    assert list(stage["error_profile"]["relative_error"]) == layers + ["output"]
    assert (tmp_path / stage["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compensation_and_calibration_stages(tmp_path):
    out = tmp_path / "run"
    r = run_cli(*FAST, "compensation=all", "compensation.placement=[fc1,fc2]", "compensation.rank=2",
                "compensation.steps=30", "calibration=per_chip", "calibration.steps=5", "calibration.n_images=200",
                f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["stages"]) == ["baseline", "compensated", "calibrated"]
    comp, cal = m["stages"]["compensated"], m["stages"]["calibrated"]
    assert comp["placement"] == {n: {"kind": "output", "rank": 2, "affine": True} for n in ("fc1", "fc2")}
    assert comp["training"]["steps"] == 30 and comp["training"]["chip_stream"] == "COMPENSATION"
    assert set(m["overhead"]["layers"]) == {"fc1", "fc2"} and 0 < m["overhead"]["total"]["params_pct"] < 100
    assert cal["calibration"]["steps"] == 5 and cal["calibration"]["chips"] == 4
    assert cal["mc"]["n_chips"] == 4 and "calibrated" in r.stdout and "MACs" in r.stdout
    # the checkpoint holds the compensated model and reproduces its stage exactly
    model, meta = cn.load_checkpoint(out / "model.safetensors")
    assert meta["stage"] == "compensated" and set(meta["compensation"]) == {"fc1", "fc2"}
    test = load_dataset("digits", val_fraction=0.2, seed=0).test
    again = cn.monte_carlo(model, test, n_chips=4, seed=0, progress=False)
    assert again.accuracies == comp["mc"]["accuracies"]


def test_more_calibration_images_than_the_training_split_calibrates_on_all_of_them(tmp_path):
    """The calibrated preset asks for 4,000 images; digits has fewer: the run says so, uses all, records the number."""
    r = run_cli(*FAST, "compensation=all", "compensation.placement=[fc1]", "compensation.rank=2", "compensation.steps=0",
                "calibration=per_chip", "calibration.steps=2", "calibration.n_images=5000", "evaluation.n_chips=2",
                f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    n_train = len(load_dataset("digits", val_fraction=0.2, seed=0).train)
    note = f"calibration.n_images=5000 is more than the {n_train} training images"
    assert note in (tmp_path / "train.log").read_text() and note not in r.stdout + r.stderr  # the log, not the console
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["calibration"]["n_images"] == m["stages"]["calibrated"]["calibration"]["n_images"] == n_train
    _, meta = cn.load_checkpoint(tmp_path / "model.safetensors")
    assert meta["config"]["calibration"]["n_images"] == n_train  # what a replay calibrates on


@pytest.mark.slow
def test_multirun_sweeps_sigma(tmp_path):
    r = run_cli("-m", "variation.sigma=0.1,0.5", "training.epochs=1", "evaluation.n_chips=2", "progress=false",
                f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    sigmas = sorted(json.loads(p.read_text())["variation"]["sigma"] for p in tmp_path.glob("*/metrics.json"))
    assert sigmas == [0.1, 0.5]


# each case is a process start (~5 s): a few in the default suite, the rest with -m slow
@pytest.mark.parametrize("args, needle", [
    (["variation.sigma=-1"], "variation.sigma"),
    pytest.param(["variation.sigma=abc"], "variation.sigma", marks=pytest.mark.slow),
    pytest.param(["variation.name=lognorm"], "variation.name", marks=pytest.mark.slow),
    (["model.name=resnet999"], "model.name"),
    pytest.param(["dataset.name=imagenet"], "imagenet", marks=pytest.mark.slow),
    pytest.param(["dataset=fashion_mnist", "dataset.root=/nonexistent/fmnist"], "/nonexistent/fmnist", marks=pytest.mark.slow),
    pytest.param(["training.epochs=0"], "training.epochs", marks=pytest.mark.slow),
    pytest.param(["evaluation.n_chips=0"], "evaluation.n_chips", marks=pytest.mark.slow),
    pytest.param(["training=lipschitz", "training.lipschitz.kind=frobenius"], "training.lipschitz.kind", marks=pytest.mark.slow),
    pytest.param(["training=lipschitz", "training.lipschitz.strength=-1"], "training.lipschitz.strength", marks=pytest.mark.slow),
    pytest.param(["compensation=all", "compensation.placement=[fc9]"], "fc9", marks=pytest.mark.slow),
    pytest.param(["compensation=all", "compensation.rank=-1"], "compensation.rank", marks=pytest.mark.slow),
    (["compensation=all", "compensation.kind=sideways"], "compensation.kind"),
    pytest.param(["compensation=all", "compensation.lr=0"], "compensation.lr", marks=pytest.mark.slow),
    pytest.param(["calibration=per_chip"], "needs compensation modules", marks=pytest.mark.slow),
])
def test_bad_input_is_one_clear_message(tmp_path, args, needle):
    r = run_cli(*FAST, *args, f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "metrics.json").exists()


def test_unknown_config_group_option_is_refused(tmp_path):
    r = run_cli(*FAST, "model=resnet999", f"hydra.run.dir={tmp_path}")
    assert r.returncode != 0 and "resnet999" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_reference_teacher_replays_from_the_checkpoint_and_its_reference(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "correctnet.train", *STORY, "calibration.teacher=reference",
                        f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["stages"]["calibrated"]["calibration"]["teacher"] == "reference"
    assert m["stages"]["calibrated"]["calibration"]["teacher_choice"] is None
    replay = subprocess.run([sys.executable, "-m", "correctnet.evaluate", f"checkpoint={out / 'model.safetensors'}",
                             "calibration=per_chip", "progress=false"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=ONE_THREAD)
    assert replay.returncode == 0 and "reproduces the exported metrics exactly" in replay.stdout, replay.stdout
    # the checkpoint copied without its reference: a clear error naming the missing file
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    bad = subprocess.run([sys.executable, "-m", "correctnet.evaluate", f"checkpoint={alone / 'model.safetensors'}",
                          "calibration=per_chip", "progress=false"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=ONE_THREAD)
    assert bad.returncode != 0 and "reference_model.safetensors" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_the_default_job_prints_a_short_console_and_a_replay_of_its_calibrated_stage(tmp_path):
    """The README's first command: a few lines on the console (no per-epoch lines: those are in train.log), and a
    re-evaluate command that replays the calibrated headline exactly."""
    r = run_cli("progress=false", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    console = (r.stdout + r.stderr).strip().splitlines()
    assert len(console) <= 25, "\n".join(console)
    assert not any(" epoch " in line for line in console) and "CorrectNet calibrated" in r.stdout
    log = (tmp_path / "train.log").read_text()
    assert "baseline epoch 15/15" in log and "calibration teacher" in log
    replay = [line for line in console if "re-evaluate: " in line][0].split("re-evaluate: ", 1)[1]
    assert "calibration=per_chip" in shlex.split(replay)
    again = subprocess.run([*shlex.split(replay), "progress=false"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "reproduces the exported metrics exactly" in again.stdout


def test_fixed_range_dacs_get_input_ranges_from_data_and_the_checkpoint_replays_them(tmp_path):
    """variation.dac_range=1 (8-bit fixed-range DAC/ADC): ranges measured before and after training, recorded in the
    checkpoint, the evaluation replayed exactly; learned ranges move and travel too."""
    from correctnet.checkpoint import read_metadata
    from correctnet.evaluate import evaluate_checkpoint

    base = ["method=noise_aware", "variation=rram_periphery", "variation.dac_range=1.0", "training.epochs=1",
            "evaluation.n_chips=2", "progress=false"]
    r = run_cli(*base, f"hydra.run.dir={tmp_path / 'fixed'}")
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "fixed" / "train.log").read_text()
    assert "input ranges before training (max on 1024" in log and "input ranges after training" in log
    assert "before training (max on 1024 training images, BatchNorm on batch statistics)" in log
    assert "after training (max on 1024 training images):" in log  # the trained network: running statistics
    ranges = read_metadata(tmp_path / "fixed" / "model.safetensors")["analog"]["input_ranges"]
    assert set(ranges) == {"conv1", "conv2", "fc1", "fc2", "fc3"} and all(v > 0 for v in ranges.values())
    assert evaluate_checkpoint(tmp_path / "fixed" / "model.safetensors")["results"][0]["reproduces_export"] is True
    r = run_cli(*base, "training.learn_input_ranges=true", f"hydra.run.dir={tmp_path / 'learned'}")
    assert r.returncode == 0, r.stderr
    learned = read_metadata(tmp_path / "learned" / "model.safetensors")["analog"]["input_ranges"]
    assert "input ranges after training" not in (tmp_path / "learned" / "train.log").read_text()
    assert learned != ranges and set(learned) == set(ranges)


@pytest.mark.parametrize("overrides, needle", [
    (["training.noise_aware=true", "training.learn_input_ranges=true"], "training.learn_input_ranges=true trains the ranges of fixed-range DACs"),
    (["variation=rram_periphery", "variation.dac_range=1", "analog.ranges.estimator=foo"], "analog.ranges: estimator"),
    (["variation=rram_periphery", "variation.dac_range=1", "analog.ranges.images=0"], "analog.ranges.images must be"),
])
def test_bad_input_range_settings_are_one_line(tmp_path, overrides, needle):
    r = run_cli(*FAST, *overrides, cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_noise_aware_network_calibrated_by_its_biases_alone_replays(tmp_path):
    """Per-chip calibration with no compensator at all: each chip fits only its digital biases (no overhead)."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "correctnet.train", "method=noise_aware", "calibration=per_chip",
                        "calibration.biases=true", "calibration.teacher=self", "calibration.steps=5",
                        "calibration.n_images=200", "training.epochs=2", "evaluation.n_chips=4", "progress=false",
                        f"hydra.run.dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    cal = m["stages"]["calibrated"]
    assert cal["calibration"]["bias_layers"] == 5 and not cal["calibration"]["compensators"]
    assert cal["mc"]["accuracies"] != m["stages"]["noise_aware"]["mc"]["accuracies"]  # the biases changed the chips
    e = subprocess.run([sys.executable, "-m", "correctnet.evaluate", f"checkpoint={out / 'model.safetensors'}",
                        "calibration=per_chip", "progress=false"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=ONE_THREAD)
    assert e.returncode == 0, e.stderr
    assert "reproduces the exported metrics exactly" in e.stdout, e.stdout

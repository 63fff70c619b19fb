"""The package as a researcher installs it: configs as package data, the console script, a wheel that runs."""
import importlib.resources
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import correctnet
from correctnet.cli import COMMANDS
from correctnet.conf import DIR, MODULE

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_configs_are_package_data():
    """The top-level conf/ is the package correctnet.configs (package-dir), and correctnet.conf points there."""
    conf = importlib.resources.files(MODULE)
    assert (conf / "config.yaml").is_file() and Path(str(conf)).resolve() == DIR == ROOT / "conf"
    groups = {p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert groups >= {"dataset", "model", "variation", "training", "compensation", "calibration", "placement",
                      "method", "hydra"}
    assert (conf / "method" / "correctnet_calibrated.yaml").is_file()
    assert (importlib.resources.files("correctnet") / "py.typed").is_file()
    assert not list((ROOT / "correctnet").rglob("*.yaml")), "the config groups live in conf/, not in the package"
    # every yaml file in conf/ is declared as package data, and the package list names every package
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {MODULE: "conf"}
    assert set(setup["package-data"][MODULE]) == {"*.yaml", "**/*.yaml"}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "correctnet").rglob("__init__.py")}
    assert sorted(setup["packages"]) == sorted(found | {MODULE})


def test_license_file_matches_pyproject():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()


def test_console_script_help_lists_the_commands(tmp_path):
    r = subprocess.run([sys.executable, "-m", "correctnet.cli", "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS)
    r = subprocess.run([sys.executable, "-m", "correctnet.cli", "nonsense"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "train" in r.stderr


@pytest.mark.slow
def test_a_built_wheel_runs_the_train_command_outside_the_checkout(tmp_path):
    """pip wheel, install it (not editable) into a directory, run ``correctnet train`` from elsewhere."""
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   cwd=tmp_path, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("correctnet-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.endswith(".yaml")}
    assert shipped == {f"correctnet/configs/{p.relative_to(DIR).as_posix()}" for p in DIR.rglob("*.yaml")}
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path,
                   timeout=300, capture_output=True)
    env = {**ENV, "PYTHONPATH": str(site)}  # before the editable checkout on sys.path
    where = subprocess.run([sys.executable, "-c", "import correctnet; print(correctnet.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = "import sys; from correctnet.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, "train", "training.epochs=1", "evaluation.n_chips=2",
                        "progress=false", "hydra.run.dir=run"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((work / "run" / "metrics.json").read_text())
    assert m["command"].startswith("correctnet train ")
    assert set(m["stages"]) == {"baseline", "compensated", "calibrated"}
    assert correctnet.__version__ == m["versions"]["correctnet"]

"""``python -m correctnet.aggregate DIR [out=DIR2]``: one table and one plot from a sweep's runs.

Walks ``DIR`` (a Hydra multirun directory, a parent of several, or a single run directory) for run
directories written by ``python -m correctnet.train``: each with ``metrics.json`` (a finished run) or only
``.hydra/overrides.yaml`` (a run that started and failed, or has not finished). Jobs that a sweep listed
in its ``multirun.yaml`` but never started (an interrupted sweep) are
reported as ``not run``, unless a run with the same overrides finished elsewhere under ``DIR`` (the
sweep was resumed: re-run the missing jobs into a sibling directory). Runs are grouped by (method, setting, stage, sigma) across seeds, where the
method is ``config.method.name`` (``method=`` presets) and the setting is every override that differs
between the runs other than ``method``, ``seed`` and ``variation.sigma``. Writes into ``out`` (default
``DIR``): ``results.md``, ``results.csv`` and ``accuracy_vs_sigma.png``. No Hydra app, nothing re-run;
errors print one ``correctnet: error: ...`` line and exit 2.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from .errors import ConfigError, run_command
from .stages import Stage, stage_label, stage_rank

USAGE = """\
usage: python -m correctnet.aggregate DIR [key=value ...]

Collects the runs of a sweep (python -m correctnet.train -m ...) into a table and a plot: mean over seeds
of each run's clean accuracy, Monte-Carlo chip-mean accuracy, p5 and min, with overheads and run times,
per method, stage and sigma. Failed and never-started jobs are listed with their overrides.

  DIR  (or dir=DIR)   a multirun directory (multirun/DATE/TIME), a parent of several, or one run directory
  out=DIR2            where results.md, results.csv and accuracy_vs_sigma.png go (default: DIR)
  stages=final|all    which stages the plot draws: each method's last stage (calibrated > compensated >
                      the training stage; default) or every stage. The tables always list every stage.
"""

KEYS = ("dir", "out", "stages")
METHOD_ORDER = ("none", "vanilla", "noise_aware", "suppression", "correctnet", "correctnet_calibrated",
                "correctnet_noise_aware")
REPLICATE_KEYS = ("seed",)            # runs that differ only in these are averaged
GROUP_KEYS = ("method", "variation.sigma")   # shown in their own columns, not in the setting
NO_METHOD = "-"
CSV_FIELDS = ("method", "setting", "stage", "final", "sigma", "status", "n_runs", "seeds", "clean_mean", "clean_std",
              "acc_mean", "acc_std", "p5_mean", "min_mean", "chip_std_mean", "p95_mean", "n_chips", "params_pct",
              "macs_pct", "mean_of_original", "mean_of_original_std", "p5_of_original", "seconds_mean", "failed",
              "overrides", "error", "run_dirs")


@dataclass
class Run:
    """One job of a sweep: its directory, overrides and (when it finished) its metrics."""

    path: Path
    status: str                       # "ok" | "failed" | "not run"
    overrides: list[str]
    metrics: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    method: str = NO_METHOD
    setting: str = ""
    sigma: Any = None
    seed: Any = None

    @property
    def stages(self) -> dict[str, Any]:
        return (self.metrics or {}).get("stages") or {}


@dataclass
class Group:
    """The runs of one (method, setting, stage, sigma): statistics over their seeds."""

    method: str
    setting: str
    stage: str
    sigma: Any
    runs: list[Run]
    final: bool = False
    failed: list[Run] = field(default_factory=list)
    originals: dict[tuple[str, Any], float] = field(default_factory=dict)  # (setting, seed) -> original accuracy

    def values(self, fn: Callable[[Run], Any]) -> list[float]:
        """``fn(run)`` for each run of the group, as floats, leaving out missing values."""
        out = []
        for r in self.runs:
            v = fn(r)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                out.append(float(v))
        return out

    def stats(self) -> dict[str, Any]:
        """Means (and stds over seeds, ddof=1) of the per-run numbers of this stage."""
        st = lambda r: r.stages[self.stage]  # noqa: E731
        mc = lambda r: st(r)["mc"]  # noqa: E731
        clean, acc = self.values(lambda r: st(r).get("clean_accuracy")), self.values(lambda r: mc(r).get("mean"))
        over = self.values(lambda r: _overhead(r, self.stage, "params_pct"))
        macs = self.values(lambda r: _overhead(r, self.stage, "macs_pct"))
        chips = sorted({int(mc(r)["n_chips"]) for r in self.runs if "n_chips" in mc(r)})

        def of_original(key: str) -> list[float]:
            return self.values(lambda r: mc(r).get(key) / self.originals[(r.setting, r.seed)]
                               if (r.setting, r.seed) in self.originals and mc(r).get(key) is not None else None)
        rel_mean, rel_p5 = of_original("mean"), of_original("p5")
        return {
            "n_runs": len(self.runs),
            "seeds": [r.seed for r in self.runs],
            "clean_mean": _mean(clean), "clean_std": _std(clean),
            "acc_mean": _mean(acc), "acc_std": _std(acc),
            "p5_mean": _mean(self.values(lambda r: mc(r).get("p5"))),
            "min_mean": _mean(self.values(lambda r: mc(r).get("min"))),
            "chip_std_mean": _mean(self.values(lambda r: mc(r).get("std"))),
            "band_lo": _mean(self.values(lambda r: _percentile(mc(r), 5))),
            "p95_mean": _mean(self.values(lambda r: _percentile(mc(r), 95))),
            "n_chips": "/".join(map(str, chips)),
            "params_pct": _mean(over), "macs_pct": _mean(macs),
            "mean_of_original": _mean(rel_mean), "mean_of_original_std": _std(rel_mean),
            "p5_of_original": _mean(rel_p5),
            "seconds_mean": _mean(self.values(lambda r: (r.metrics or {}).get("seconds"))),
        }


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


def _std(v: list[float]) -> float | None:
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def _percentile(mc: dict[str, Any], q: float) -> float | None:
    acc = mc.get("accuracies")
    return float(np.percentile(acc, q)) if acc else None


def _overhead(run: Run, stage: str, key: str) -> float | None:
    """Extra parameters / MACs (%) of the compensation modules; None for stages without them."""
    if stage_rank(stage, 0) == 0:
        return None
    cost = run.stages.get(stage, {}).get("overhead") or (run.metrics or {}).get("overhead")
    return (cost or {}).get("total", {}).get(key)


# ---------------------------------------------------------------------------------------------- discovery

def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _override_key(o: str) -> str:
    return o.partition("=")[0].lstrip("+~")


def _override_dict(overrides: list[str]) -> dict[str, str]:
    return {_override_key(o): o.partition("=")[2] for o in overrides}


def _select(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(cfg, dict):
            return None
        cfg = cfg.get(part)
    return cfg


def _scalar(value: Any) -> Any:
    """An override's value as a number where it is one (``0.5``), else the string."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


_ERROR_LINE = re.compile(r"correctnet: error: (.*)|\]\[ERROR\] - (.*)|^(\w*(?:Error|Exception)\b.*)")


def _error_from(text: str) -> str | None:
    """The last error message in a log: ``correctnet: error:``, a logged ERROR, or a traceback's last line."""
    found = None
    for line in text.splitlines():
        m = _ERROR_LINE.search(line.strip())
        if m:
            found = next(g for g in m.groups() if g is not None).strip()
    return found


def _first_error(logs: list[Path]) -> str | None:
    """The first error message found in ``logs`` (unreadable files skipped)."""
    for log in logs:
        try:
            err = _error_from(log.read_text(errors="replace"))
        except OSError:
            continue
        if err:
            return err
    return None


def _job_error(run_dir: Path, root: Path, hydra_cfg: Any) -> str | None:
    """The error a failed job left behind: its job log (``train.log``) or its submitit stderr/stdout."""
    err = _first_error(sorted(run_dir.glob("*.log")))
    if err:
        return err
    job_id = str(_select(hydra_cfg, "hydra.job.id") or "")
    if not job_id or not re.fullmatch(r"[\w.-]+", job_id):
        return None
    folders = [run_dir.parent / ".submitit" / job_id, root / ".submitit" / job_id]
    configured = _select(hydra_cfg, "hydra.launcher.submitit_folder")
    if isinstance(configured, str) and "${" not in configured:
        folders.insert(0, Path(configured.replace("%j", job_id)))
    for folder in folders:
        logs = sorted(folder.glob(f"{job_id}_*_log.err")) + sorted(folder.glob(f"{job_id}_*_log.out"))
        err = _first_error(logs)
        if err:
            return err
        if logs and not any(folder.glob(f"{job_id}_*_result.pkl")):
            return f"no metrics.json and no result yet: submitit job {job_id} is still running or was killed ({folder})"
    return None


def _load_run(run_dir: Path, root: Path) -> Run:
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
            if not isinstance(metrics, dict) or not isinstance(metrics.get("stages"), dict):
                raise ValueError("no 'stages'")
        except (OSError, ValueError) as e:
            return Run(run_dir, "failed", overrides, error=f"unreadable metrics.json: {e}",
                       config=_read_yaml(run_dir / ".hydra" / "config.yaml") or {})
        return Run(run_dir, "ok", overrides, metrics=metrics, config=metrics.get("config") or {})
    hydra_cfg = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    error = _job_error(run_dir, root, hydra_cfg) or ("no metrics.json: the job failed (its error went to the "
                                                      "sweep's stderr) or has not finished")
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    return Run(run_dir, "failed", overrides, config=config if isinstance(config, dict) else {}, error=error)


def _expected_jobs(multirun_yaml: Path) -> list[list[str]] | None:
    """The override lists of a basic-sweeper sweep, in job order (job ``i`` runs in ``SWEEP_DIR/i``)."""
    cfg = _read_yaml(multirun_yaml)
    hydra_cfg = (cfg or {}).get("hydra") or {}
    if not str(_select(hydra_cfg, "sweeper._target_") or "").endswith("BasicSweeper"):
        return None
    if str(_select(hydra_cfg, "sweep.subdir")) != "${hydra.job.num}":
        return None
    task = list(_select(hydra_cfg, "overrides.task") or [])
    params = _select(hydra_cfg, "sweeper.params") or {}
    try:  # Hydra's own expansion, so that the job numbers match
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - another Hydra version or an odd sweep: skip the check
        return None
    return [list(job) for batch in batches for job in batch]


def find_runs(root: str | Path) -> list[Run]:
    """Every run under ``root`` (finished, failed, or listed in a ``multirun.yaml`` but never started)."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{root} does not exist")
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    dirs: set[Path] = set()
    sweeps: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in (".submitit", ".hydra", "__pycache__"))
        if "metrics.json" in filenames or (here / ".hydra" / "overrides.yaml").is_file():
            dirs.add(here)
        if "multirun.yaml" in filenames:
            sweeps.append(here)
    runs = [_load_run(d, root) for d in sorted(dirs, key=_natural)]
    for sweep in sweeps:
        for i, overrides in enumerate(_expected_jobs(sweep / "multirun.yaml") or []):
            if (sweep / str(i)) not in dirs:
                cfg = _read_yaml(sweep / "multirun.yaml") or {}
                cfg.pop("hydra", None)
                runs.append(Run(sweep / str(i), "not run", overrides, config=cfg,
                                error="never started: the sweep stopped before this job (or is still running)"))
    # a sweep resumed under the same root: a failed or never-started job whose overrides also finished
    # in another run is superseded by it (overrides compared as sets; launcher options are not task overrides)
    done = {frozenset(r.overrides) for r in runs if r.status == "ok"}
    runs = [r for r in runs if r.status == "ok" or frozenset(r.overrides) not in done]
    _label(runs)
    return runs


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _label(runs: list[Run]) -> None:
    """Fill in each run's method, setting (the overrides that differ between runs), sigma and seed."""
    ods = [_override_dict(r.overrides) for r in runs]
    keys = sorted({k for od in ods for k in od})
    varying = [k for k in keys if k not in REPLICATE_KEYS + GROUP_KEYS and len({od.get(k) for od in ods}) > 1]
    for r, od in zip(runs, ods):
        name = _select(r.config, "method.name")
        if name is None and od.get("method"):
            name = od["method"]
        r.method = str(name) if name else NO_METHOD
        r.setting = " ".join(f"{k}={od[k]}" for k in varying if k in od)
        sigma = ((r.metrics or {}).get("variation") or {}).get("sigma")
        if sigma is None:
            sigma = _scalar(od["variation.sigma"]) if "variation.sigma" in od else _select(r.config, "variation.sigma")
        r.sigma = sigma
        seed = _select(r.config, "seed")
        r.seed = _scalar(od["seed"]) if "seed" in od else seed


def common_overrides(runs: list[Run]) -> list[str]:
    """Overrides every run shares (the sweep's fixed settings)."""
    if not runs:
        return []
    shared = set(runs[0].overrides)
    for r in runs[1:]:
        shared &= set(r.overrides)
    return [o for o in runs[0].overrides if o in shared]


# ---------------------------------------------------------------------------------------------- grouping

def _sigma_key(s: Any) -> tuple[int, float, str]:
    return (0, float(s), "") if isinstance(s, (int, float)) and not isinstance(s, bool) else (1, 0.0, str(s))


def _method_key(m: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(m), m) if m in METHOD_ORDER else (len(METHOD_ORDER), m)


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups of finished runs per (method, setting, stage, sigma), sorted; failed runs are attached."""
    cells: dict[tuple[str, str, Any], list[Run]] = {}
    for r in runs:
        cells.setdefault((r.method, r.setting, _sigma_key(r.sigma)), []).append(r)
    groups: list[Group] = []
    for (method, setting, _), members in cells.items():
        ok = [r for r in members if r.status == "ok"]
        failed = [r for r in members if r.status != "ok"]
        stages = sorted({s for r in ok for s in r.stages}, key=lambda s: (stage_rank(s), s))
        sigma = members[0].sigma
        for stage in stages:
            with_stage = [r for r in ok if stage in r.stages]
            groups.append(Group(method, setting, stage, sigma, with_stage, final=stage == stages[-1], failed=failed))
    originals = original_accuracies(runs)
    for g in groups:
        g.originals = originals
    groups.sort(key=lambda g: (_method_key(g.method), g.setting, _sigma_key(g.sigma), stage_rank(g.stage)))
    return groups


def original_accuracies(runs: list[Run]) -> dict[tuple[str, Any], float]:
    """The original accuracy (the vanilla network's clean accuracy) per (setting, seed): a run's own vanilla
    reference (``original_accuracy`` in metrics.json), else the clean accuracy of a ``vanilla`` run."""
    out: dict[tuple[str, Any], float] = {}
    for r in runs:
        if r.status != "ok":
            continue
        orig = (r.metrics or {}).get("original_accuracy")
        if orig is None and r.method == "vanilla" and Stage.BASELINE in r.stages:
            orig = r.stages[Stage.BASELINE].get("clean_accuracy")
        if orig is not None:
            out.setdefault((r.setting, r.seed), float(orig))
    return out


# ---------------------------------------------------------------------------------------------- output

def _pct(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def _ratio(v: float | None, std: float | None = None) -> str:
    """A fraction of the original accuracy, in percent."""
    return "—" if v is None else f"{100 * v:.1f}%" + (f" ± {100 * std:.1f}" if std is not None else "")


def _num(v: Any, fmt: str = ".2f") -> str:
    return "—" if v is None else format(v, fmt)


def _sigma_str(s: Any) -> str:
    return f"{s:g}" if isinstance(s, float) else str(s)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def csv_rows(groups: list[Group], runs: list[Run], out: Path) -> list[dict[str, Any]]:
    """One row per group (status ok) and one per failed or never-started run."""
    rows = []
    for g in groups:
        s = g.stats()
        rows.append({"method": g.method, "setting": g.setting, "stage": g.stage, "final": g.final,
                     "sigma": g.sigma, "status": "ok", **{k: s[k] for k in CSV_FIELDS if k in s},
                     "seeds": " ".join(map(str, s["seeds"])), "failed": len(g.failed), "overrides": "", "error": "",
                     "run_dirs": " ".join(_rel(r.path, out) for r in g.runs)})
    for r in runs:
        if r.status != "ok":
            rows.append({"method": r.method, "setting": r.setting, "stage": "", "final": "", "sigma": r.sigma,
                         "status": r.status, "n_runs": 0, "seeds": "" if r.seed is None else r.seed,
                         "overrides": " ".join(r.overrides), "error": r.error or "", "run_dirs": _rel(r.path, out)})
    return [{k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS} for row in rows]


def _table(groups: list[Group], show_setting: bool) -> list[str]:
    head = ["method"] + (["setting"] if show_setting else []) + [
        "stage", "σ", "n", "clean", "chip mean", "p5", "min", "chip std", "mean/orig", "p5/orig", "+params", "+MACs",
        "s/run", "failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        s = g.stats()
        cells = [g.method] + ([g.setting or "—"] if show_setting else []) + [
            g.stage, _sigma_str(g.sigma), str(s["n_runs"]), _pct(s["clean_mean"], s["clean_std"]),
            _pct(s["acc_mean"], s["acc_std"]), _pct(s["p5_mean"]), _pct(s["min_mean"]),
            _num(None if s["chip_std_mean"] is None else 100 * s["chip_std_mean"]),
            _ratio(s["mean_of_original"], s["mean_of_original_std"]), _ratio(s["p5_of_original"]),
            "—" if s["params_pct"] is None else f"{s['params_pct']:.2f}%",
            "—" if s["macs_pct"] is None else f"{s['macs_pct']:.2f}%", _num(s["seconds_mean"], ".1f"),
            str(len(g.failed)) if g.failed else ""]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return lines


def _failed_only(runs: list[Run], groups: list[Group], show_setting: bool) -> list[str]:
    """Table rows for (method, setting, sigma) cells where no run finished."""
    covered = {(g.method, g.setting, _sigma_key(g.sigma)) for g in groups}
    lines, seen = [], set()
    for r in runs:
        key = (r.method, r.setting, _sigma_key(r.sigma))
        if r.status == "ok" or key in covered or key in seen:
            continue
        seen.add(key)
        n = sum(1 for x in runs if (x.method, x.setting, _sigma_key(x.sigma)) == key)
        cells = [r.method] + ([r.setting or "—"] if show_setting else []) + [
            f"**{r.status}**", _sigma_str(r.sigma), "0"] + ["—"] * 10 + [str(n)]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return lines


def write_markdown(path: Path, root: Path, runs: list[Run], groups: list[Group], plot: Path | None,
                   out: Path) -> None:
    """``results.md``: the final-stage table, the all-stages table and the list of runs."""
    ok = [r for r in runs if r.status == "ok"]
    counts = {s: sum(1 for r in runs if r.status == s) for s in ("ok", "failed", "not run")}
    show_setting = any(r.setting for r in runs)
    lines = [f"# Sweep results: {Path(root).name}", "",  # the directory name: no machine paths in results
             f"{len(runs)} runs: {counts['ok']} finished, {counts['failed']} failed, {counts['not run']} not run."]
    if ok:
        datasets = sorted({f"{(r.metrics or {}).get('model')} on {(r.metrics or {}).get('dataset')}" for r in ok})
        variations = sorted({str(((r.metrics or {}).get("variation") or {}).get("name")) for r in ok})
        lines.append(f"Model/data: {', '.join(datasets)}; variation: {', '.join(variations)}.")
    common = common_overrides(runs)
    if common:
        lines.append("Common overrides: `" + " ".join(common) + "`.")
    lines += ["",
              "Per run: clean accuracy (nominal weights) and the Monte-Carlo accuracy over its simulated chips "
              "(chip mean, 5th percentile, min, std over chips) on the test split. n: runs (seeds) in the group; "
              "each cell is the mean over them, ± the std over seeds where there are several. +params/+MACs: the digital "
              "compensation modules. s/run: wall-clock seconds of the whole run.", ""]
    final = [g for g in groups if g.final]
    lines += ["## Final stage per method", "",
              "Each method's last stage: calibrated > compensated > its training stage.", ""]
    lines += _table(final, show_setting) + _failed_only(runs, groups, show_setting) + [""]
    lines += ["## All stages", ""] + (_table(groups, show_setting) if groups else ["No finished runs."]) + [""]
    bad = [r for r in runs if r.status != "ok"]
    if bad:
        lines += ["## Failed or missing runs", "", "| run | status | overrides | error |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in (_rel(r.path, out), f"**{r.status}**",
                                                           "`" + " ".join(r.overrides) + "`", r.error or "")) + " |"
                  for r in bad] + [""]
    if plot is not None:
        lines += ["## Accuracy vs σ", "", f"![accuracy vs sigma]({_rel(plot, out)})", ""]
    lines += ["## Runs", "", "| run | status | method | σ | seed | overrides | result / error | plots |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.status == "ok":
            last = list(r.stages)[-1]
            mc = r.stages[last].get("mc", {})
            result = f"{last}: {_pct(mc.get('mean'))} (clean {_pct(r.stages[last].get('clean_accuracy'))})"
        else:
            result = r.error or ""
        plots = " ".join(f"[{p.stem.removeprefix('layer_profile_')}]({_rel(p, out)})"
                         for p in sorted(r.path.glob("layer_profile_*.png"))) if r.path.is_dir() else ""
        cells = [_rel(r.path, out), r.status if r.status == "ok" else f"**{r.status}**", r.method,
                 _sigma_str(r.sigma), "—" if r.seed is None else r.seed, "`" + " ".join(r.overrides) + "`",
                 result, plots]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    _write_text(path, "\n".join(lines) + "\n")


def write_plot(path: Path, groups: list[Group], stages: str = "final") -> Path | None:
    """Accuracy vs sigma, a line per method (and setting/stage): chip-mean accuracy (mean over seeds),
    shaded between the mean over runs of each run's 5th and 95th percentile over chips. None: no finished run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [g for g in groups if (g.final or stages == "all") and isinstance(g.sigma, (int, float))]
    if not chosen:
        return None
    series: dict[tuple[str, str, str], list[tuple[float, dict[str, Any]]]] = {}
    for g in chosen:
        label_stage = stage_label(g.stage) if stages == "all" else ""
        series.setdefault((g.method, g.setting, label_stage), []).append((float(g.sigma), g.stats()))
    tiers = [k[2] for k in series]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, ((method, setting, stage), pts) in enumerate(series.items()):
        pts.sort(key=lambda p: p[0])
        x = np.array([p[0] for p in pts])
        y = np.array([100 * p[1]["acc_mean"] for p in pts])
        lo = np.array([100 * (p[1]["band_lo"] if p[1]["band_lo"] is not None else p[1]["acc_mean"]) for p in pts])
        hi = np.array([100 * (p[1]["p95_mean"] if p[1]["p95_mean"] is not None else p[1]["acc_mean"]) for p in pts])
        # with stages=all a stage that only one method produces is named by what it is (e.g. "CorrectNet calibrated")
        who = "" if stage and tiers.count(stage) == 1 else (method if method != NO_METHOD else "")
        label = " ".join(t for t in (stage, who, setting) if t) if stage else \
            " ".join(t for t in (method if method != NO_METHOD else "", setting) if t) or "runs"
        color = f"C{i % 10}"
        line, = ax.plot(x, y, marker="o", color=color, label=label)
        if len(x) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
        else:
            ax.errorbar(x, y, yerr=[y - lo, hi - y], color=color, capsize=4, lw=1)
    ax.set_xlabel("σ (variation)")
    ax.set_ylabel("test accuracy over chips (%)")
    ax.set_title("chip-mean accuracy (line) and chip p5–p95 (band), mean over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from .io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), overwrite=True)
    plt.close(fig)
    return path


def _write_text(path: Path, text: str) -> None:
    from .io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)


def aggregate(root: str | Path, out: str | Path | None = None, stages: str = "final") -> dict[str, Any]:
    """Aggregate the runs under ``root`` into ``out`` (default ``root``); the paths written and the runs."""
    if stages not in ("final", "all"):
        raise ConfigError(f"stages must be final or all, got {stages!r}")
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise ConfigError(f"no runs found under {root}: expected run directories with metrics.json or "
                          f".hydra/overrides.yaml, as python -m correctnet.train [-m] writes them")
    out = Path(out) if out is not None else root
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create out={out}: {e}") from None
    groups = group_runs(runs)
    paths = {"md": out / "results.md", "csv": out / "results.csv", "png": out / "accuracy_vs_sigma.png"}
    try:
        plot = write_plot(paths["png"], groups, stages)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        writer.writerows(csv_rows(groups, runs, out))
        _write_text(paths["csv"], buf.getvalue())
        write_markdown(paths["md"], root, runs, groups, plot, out)
    except OSError as e:
        raise ConfigError(f"cannot write into out={out}: {e}") from None
    if plot is None:
        paths.pop("png")
    return {"paths": paths, "runs": runs, "groups": groups}


def parse_args(argv: Sequence[str]) -> dict[str, str] | None:
    """``DIR`` and ``key=value`` arguments as a dict of strings; None when help was asked for."""
    opts: dict[str, str] = {}
    for a in argv:
        if a in ("-h", "--help"):
            return None
        key, eq, value = a.partition("=")
        if not eq:
            key, value = "dir", a
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}; accepted: DIR, {', '.join(k + '=...' for k in KEYS[1:])}")
        if key in opts:
            raise ConfigError(f"{key} given twice")
        opts[key] = value
    if not opts.get("dir"):
        raise ConfigError("the sweep directory is required (python -m correctnet.aggregate --help)")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0, or 2 after one ``correctnet: error:`` line)."""
    argv = sys.argv[1:] if argv is None else argv
    found: dict[str, Any] = {}

    def action() -> None:
        opts = parse_args(argv)
        if opts is None:
            print(USAGE, end="")
            return
        found["res"] = aggregate(opts["dir"], opts.get("out"), opts.get("stages", "final"))

    status = run_command(action)
    if "res" not in found:
        return status
    res = found["res"]
    runs = res["runs"]
    bad = [r for r in runs if r.status != "ok"]
    print(f"{len(runs)} runs ({len(runs) - len(bad)} finished, {len(bad)} failed or not run), "
          f"{len(res['groups'])} table rows")
    for r in bad:
        print(f"  {r.status}: {r.path}  {' '.join(r.overrides)}\n    {r.error}")
    for p in res["paths"].values():
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m correctnet.evaluate checkpoint=PATH [key=value ...]``: re-evaluate an exported checkpoint.

Plain ``key=value`` arguments in the style of ``python -m correctnet.train`` (no Hydra: nothing is
written unless ``out=FILE`` is given). A comma-separated ``variation.sigma``, ``variation.name`` or (rram)
``variation.t_eval`` is a sweep (their cross product), run in this one process over the same loaded model
and data; ``-m`` is accepted for symmetry with Hydra multirun and changes nothing. Errors print one ``correctnet: error: ...`` line and exit 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ..calibration import CalibrationConfig, evaluate_calibrated
from ..checkpoint import read_metadata
from ..io import atomic_write
from ..errors import ConfigError, run_command
from ..runtime import resolve_progress, resolve_workers, set_threads
from . import check_chip_range, evaluate_checkpoint, format_summary, merge_shards

USAGE = """\
usage: python -m correctnet.evaluate checkpoint=PATH [key=value ...]
       python -m correctnet.evaluate merge=SHARD.json,SHARD.json,... out=ALL.json

Re-runs the clean and Monte-Carlo evaluation of a checkpoint written by python -m correctnet.train.
Defaults are the checkpoint's own settings: with them the exported metrics are reproduced exactly.

  checkpoint=PATH           the .safetensors checkpoint (required)
  variation.name=NAME       lognormal | gaussian; comma-separated for a sweep
  variation.sigma=S         e.g. 0.5, or a sweep: variation.sigma=0.3,0.5,0.8
  variation.t_eval=T        rram: seconds after programming, e.g. a sweep variation.t_eval=1,3600,86400
  evaluation.n_chips=N      number of simulated chips
  evaluation.chips=A:B      only chips A to B-1 (a shard: N jobs evaluate disjoint ranges, each with out=FILE;
                            merge=FILE,... joins them into exactly the result of one job evaluating all)
  evaluation.seed=S         chip i is seeding.chip_seed(Stream.EVAL, S, i)
  evaluation.batch_size=B   images per batch: auto (250 on CPU, 1000 on GPU) or an integer (default: the run's)
  evaluation.test_samples=N the first N test images (default: the checkpoint's setting, else all)
  evaluation.workers=auto|N processes the chips are spread over (default auto: cores / threads)
  evaluation.chips_per_pass=auto|K  chips computed in one pass (default auto: 1 on CPU, from free memory on CUDA)
  evaluation.precision=float32|bfloat16|float16  the forward under torch.autocast (chip draws stay float32)
  dataset.root=DIR          where the dataset is on this machine
  dataset.name=NAME  dataset.val_fraction=F  seed=S   only for checkpoints that do not record them
  dataset.path=FILE         a moved data file (dataset=file runs)
  calibration=per_chip      re-run per-chip calibration of every chip from the checkpoint, as the training run
                            did (its calibration settings); reproduces the exported "calibrated" stage
  calibration.KEY=V         override one calibration setting (steps, n_images, lr, batch_size, start, ...)
  export_chip=I out_chip=FILE   with calibration=per_chip: also write evaluation chip I's calibrated state
                            (compensators, BatchNorm statistics, fitted biases) to FILE (correctnet.calibration.load_calibrated_chip)
  trust=MOD[,MOD...]        modules the checkpoint's model may be imported from (names or prefixes, e.g.
                            trust=mypkg): nothing else is imported but correctnet, transformers, timm;
                            trust=true allows any module (importing a module runs its code: only for files you trust)
  device=auto|cpu|cuda|cuda:N   (default auto)
  progress=auto|true|false  progress bar on stderr (default auto: only when stderr is a terminal)
  threads=auto|N            torch CPU threads (default: the count the run recorded, environment.torch_threads, so
                            that the exported numbers are reproduced bit for bit; else auto: see correctnet.runtime)
  out=FILE  (or --out FILE) also write the results as JSON; overwrite=true replaces an existing FILE
  merge=FILE,FILE,...       join shard results (out= files of evaluation.chips=A:B runs of one checkpoint)
"""

KEYS = ("checkpoint", "variation.name", "variation.sigma", "variation.t_eval", "evaluation.n_chips", "evaluation.seed",
        "evaluation.batch_size", "evaluation.test_samples", "dataset.root", "dataset.name", "dataset.val_fraction", "seed", "device",
        "progress", "out", "overwrite", "dataset.path", "calibration", "export_chip", "out_chip", "threads",
        "evaluation.workers", "evaluation.chips_per_pass", "trust", "evaluation.chips", "merge", "evaluation.precision")
MAX_RECORDED_THREADS = 1024  # a larger recorded torch thread count is refused (an edited or broken file)
CALIBRATION_KEYS = tuple(CalibrationConfig.__dataclass_fields__)  # every per-chip calibration setting


def parse_args(argv: Sequence[str]) -> dict[str, str] | None:
    """``key=value`` arguments as a dict of strings; None when help was asked for."""
    opts: dict[str, str] = {}
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            return None
        if a in ("-m", "--multirun"):
            continue
        if a == "--out":
            if not args:
                raise ConfigError("--out needs a file name")
            a = "out=" + args.pop(0)
        elif a.startswith("--out="):
            a = a[2:]
        key, eq, value = a.partition("=")
        if not eq:
            raise ConfigError(f"expected key=value, got {a!r}; accepted keys: {', '.join(KEYS)}")
        if key not in KEYS and not (key.startswith("calibration.") and key[12:] in CALIBRATION_KEYS):
            raise ConfigError(f"unknown key {key!r}; accepted keys: {', '.join(KEYS)}")
        if key in opts:
            raise ConfigError(f"{key} given twice")
        opts[key] = value
    if "merge" in opts:
        extra = sorted(set(opts) - {"merge", "out", "overwrite"})
        if extra:
            raise ConfigError(f"merge=... takes only out= and overwrite=, got {', '.join(extra)}")
    elif not opts.get("checkpoint"):
        raise ConfigError("checkpoint=PATH is required (python -m correctnet.evaluate --help)")
    return opts


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.strip().strip("[]").split(",")]


def _number(key: str, value: str, cast: type) -> Any:
    try:
        return cast(value)
    except ValueError:
        raise ConfigError(f"{key} must be {'an integer' if cast is int else 'a number'}, got {value!r}") from None


def _bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return v in ("true", "1", "yes")


def _value(key: str, value: str) -> Any:
    """A calibration override: int, float, bool or string, as the key needs."""
    kind = CalibrationConfig.__dataclass_fields__[key[12:]].type
    if kind in ("int", int):
        return _number(key, value, int)
    if kind in ("float", float):
        return _number(key, value, float)
    if kind in ("bool", bool):
        return _bool(key, value)
    return value


def sweep_variations(opts: dict[str, str]) -> list[dict[str, Any]] | None:
    """The cross product of ``variation.name``, ``variation.sigma`` and ``variation.t_eval`` (comma lists) as
    dicts merged onto the checkpoint's variation; None when none is given (the checkpoint's own)."""
    if not any(f"variation.{k}" in opts for k in ("name", "sigma", "t_eval")):
        return None
    names = _list(opts["variation.name"]) if "variation.name" in opts else [None]
    sigmas = ([_number("variation.sigma", s, float) for s in _list(opts["variation.sigma"])]
              if "variation.sigma" in opts else [None])
    times = ([_number("variation.t_eval", t, float) for t in _list(opts["variation.t_eval"])]
             if "variation.t_eval" in opts else [None])
    return [{k: v for k, v in (("name", n), ("sigma", s), ("t_eval", t)) if v is not None}
            for n in names for s in sigmas for t in times]


def parse_trust(value: str) -> bool | list[str]:
    """``trust=``: ``true`` (any module) or comma-separated module names or prefixes (``[a,b]`` too)."""
    if value.strip().lower() == "true":
        return True
    names = [n for n in _list(value) if n]
    bad = [n for n in names if not all(part.isidentifier() for part in n.split("."))]
    if not names or bad:
        raise ConfigError(f"trust must be true or comma-separated module names (e.g. trust=mypkg,mypkg.models), "
                          f"got {value!r}")
    return names


def _label(variation: dict[str, Any]) -> str:
    t = variation.get("t_eval", 1.0)
    return f"{variation['name']} {variation['sigma']:g}" + (f" t={t:g}s" if t != 1.0 else "")


def recorded_threads(checkpoint: str) -> int | str:
    """The torch thread count the run that exported ``checkpoint`` recorded, else ``"auto"``."""
    env = ((read_metadata(checkpoint).get("metrics") or {}).get("environment") or {})
    n = env.get("torch_threads")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_RECORDED_THREADS:
        raise ConfigError(f"threads must be an integer in [1, {MAX_RECORDED_THREADS}], got {n!r} (recorded in "
                          f"{checkpoint}, metrics.environment.torch_threads; pass threads=N to override it)")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else "auto"


def _merge(value: str) -> dict[str, Any]:
    files = [f for f in _list(value) if f]
    shards = []
    for f in files:
        try:
            shards.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as e:
            raise ConfigError(f"merge: cannot read {f}: {e}") from None
        if not isinstance(shards[-1], dict) or not isinstance(shards[-1].get("results"), list):
            raise ConfigError(f"merge: {f} is not a result of python -m correctnet.evaluate ... out=FILE")
    return merge_shards(shards, files)


def run(opts: dict[str, str]) -> dict[str, Any]:
    """Evaluate as ``opts`` (from :func:`parse_args`) says, print the summary, write ``out``; the results dict."""
    trust = parse_trust(opts["trust"]) if "trust" in opts else None
    out = Path(opts["out"]) if opts.get("out") else None
    overwrite = _bool("overwrite", opts.get("overwrite", "false"))
    if out is not None and out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=true to replace it")
    if "merge" in opts:
        return _report(_merge(opts["merge"]), out, overwrite)
    variations = sweep_variations(opts)
    dataset: dict[str, Any] = {}
    if "dataset.root" in opts:
        dataset["root"] = None if opts["dataset.root"] in ("", "null") else opts["dataset.root"]
    if "dataset.name" in opts:
        dataset["name"] = opts["dataset.name"]
    if "dataset.path" in opts:
        dataset["path"] = opts["dataset.path"]
    if "dataset.val_fraction" in opts:
        dataset["val_fraction"] = _number("dataset.val_fraction", opts["dataset.val_fraction"], float)
    if "seed" in opts:
        dataset["seed"] = _number("seed", opts["seed"], int)
    ints: dict[str, Any] = {}  # evaluation settings (batch_size may also be "auto")
    for k in ("n_chips", "seed", "batch_size", "test_samples"):
        v = opts.get(f"evaluation.{k}")
        if v is not None:
            ints[k] = v if (k, v) == ("batch_size", "auto") else _number(f"evaluation.{k}", v, int)
    mode = opts.get("calibration", "none")
    if mode not in ("none", "per_chip"):
        raise ConfigError(f"calibration must be none or per_chip, got {mode!r}")
    overrides = {k[12:]: _value(k, v) for k, v in opts.items() if k.startswith("calibration.")}
    if overrides and mode != "per_chip":
        raise ConfigError(f"{sorted('calibration.' + k for k in overrides)} need calibration=per_chip")
    if ("export_chip" in opts) != ("out_chip" in opts) or ("export_chip" in opts and mode != "per_chip"):
        raise ConfigError("export_chip=I and out_chip=FILE go together, with calibration=per_chip")
    progress = resolve_progress(opts.get("progress", "auto"))
    threads = set_threads(opts["threads"] if "threads" in opts else recorded_threads(opts["checkpoint"]))
    workers = resolve_workers(opts.get("evaluation.workers", "auto"), threads)
    cpp = opts.get("evaluation.chips_per_pass", "auto")
    chips = check_chip_range(opts["evaluation.chips"]) if "evaluation.chips" in opts else None
    common = dict(variations=variations, dataset=dataset, device=opts.get("device", "auto"), progress=progress, trust=trust,
                  chips=chips, precision=str(opts.get("evaluation.precision", "float32")),
                  workers=workers, chips_per_pass=cpp if cpp == "auto" else _number("evaluation.chips_per_pass", cpp, int),
                  **ints)
    if mode == "per_chip":
        export = _number("export_chip", opts["export_chip"], int) if "export_chip" in opts else None
        res = evaluate_calibrated(opts["checkpoint"], calibration=overrides, export_chip=export,
                                  chip_path=opts.get("out_chip"), overwrite=overwrite, **common)
    else:
        res = evaluate_checkpoint(opts["checkpoint"], **common)
    return _report(res, out, overwrite)


def _report(res: dict[str, Any], out: Path | None, overwrite: bool) -> dict[str, Any]:
    """Write ``res`` to ``out`` (when given) and print its table."""
    if out is not None:
        try:
            atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=2)), overwrite=overwrite)
        except OSError as e:
            raise ConfigError(f"cannot write out={out}: {e}") from None

    rows = res["results"]
    if len(rows) == 1:  # exactly the table train prints
        table = format_summary(res["model"], res["dataset"], rows[0]["variation"],
                               [(res["stage"], res["clean_accuracy"], rows[0]["mc"])])
    else:
        table = format_summary(res["model"], res["dataset"], None, label="variation",
                               rows=[(_label(r["variation"]), res["clean_accuracy"],
                                      r["mc"]) for r in rows])
    lines = ["", table, f"  checkpoint: {res['checkpoint']} ({res['stage']}, "
                        f"correctnet {res['versions']['exported'].get('correctnet', '?')})"]
    for r in rows:
        if r["reproduces_export"] is not None:
            lines.append("  reproduces the exported metrics exactly (clean and per-chip accuracies)"
                         if r["reproduces_export"] else
                         f"  DIFFERS from the exported metrics (same settings; exported on {res['exported_device']}, "
                         f"evaluated on {res['device']}: other hardware or library versions?)")
    if "exported_chip" in res:
        c = res["exported_chip"]
        lines.append(f"  calibrated chip {c['index']} (seed {c['chip_seed']}, {100 * c['accuracy']:.2f}%): {c['file']}")
    if res.get("shards"):
        lines.append(f"  merged from {len(res['shards'])} shards, chips {rows[0]['chips'][0]}:{rows[0]['chips'][1]}")
    if out is not None:
        lines.append(f"  results:    {out}")
    lines[-1] += f"   ({res['seconds']:.1f} s)"
    print("\n".join(lines), flush=True)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0, or 2 after one ``correctnet: error:`` line)."""
    argv = sys.argv[1:] if argv is None else argv

    def action() -> None:
        opts = parse_args(argv)
        if opts is None:
            print(USAGE, end="")
        else:
            run(opts)

    return run_command(action)

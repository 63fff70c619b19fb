"""``python -m correctnet.evaluate checkpoint=PATH [key=value ...]``: re-evaluate an exported checkpoint.

Plain ``key=value`` arguments in the style of ``python -m correctnet.train`` (no Hydra: nothing is
written unless ``out=FILE`` is given). A comma-separated ``variation.sigma`` or ``variation.name`` is a
sweep, run in this one process over the same loaded model and data; ``-m`` is accepted for symmetry
with Hydra multirun and changes nothing. Errors print one ``correctnet: error: ...`` line and exit 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import atomic_write
from ..errors import ConfigError, run_command
from . import evaluate_checkpoint, format_summary

USAGE = """\
usage: python -m correctnet.evaluate checkpoint=PATH [key=value ...]

Re-runs the clean and Monte-Carlo evaluation of a checkpoint written by python -m correctnet.train.
Defaults are the checkpoint's own settings: with them the exported metrics are reproduced exactly.

  checkpoint=PATH           the .safetensors checkpoint (required)
  variation.name=NAME       lognormal | gaussian; comma-separated for a sweep
  variation.sigma=S         e.g. 0.5, or a sweep: variation.sigma=0.3,0.5,0.8
  evaluation.n_chips=N      number of simulated chips
  evaluation.seed=S         chip i is seeding.chip_seed(Stream.EVAL, S, i)
  evaluation.batch_size=B
  evaluation.test_samples=N the first N test images (default: the checkpoint's setting, else all)
  dataset.root=DIR          where the dataset is on this machine
  dataset.name=NAME  dataset.val_fraction=F  seed=S   only for checkpoints that do not record them
  device=auto|cpu|cuda|cuda:N   (default auto)
  progress=true|false       progress bar on stderr (default true)
  out=FILE  (or --out FILE) also write the results as JSON; overwrite=true replaces an existing FILE
"""

KEYS = ("checkpoint", "variation.name", "variation.sigma", "evaluation.n_chips", "evaluation.seed",
        "evaluation.batch_size", "evaluation.test_samples", "dataset.root", "dataset.name", "dataset.val_fraction", "seed", "device",
        "progress", "out", "overwrite")


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
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}; accepted keys: {', '.join(KEYS)}")
        if key in opts:
            raise ConfigError(f"{key} given twice")
        opts[key] = value
    if not opts.get("checkpoint"):
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


def run(opts: dict[str, str]) -> dict[str, Any]:
    """Evaluate as ``opts`` (from :func:`parse_args`) says, print the summary, write ``out``; the results dict."""
    out = Path(opts["out"]) if opts.get("out") else None
    overwrite = _bool("overwrite", opts.get("overwrite", "false"))
    if out is not None and out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; pass overwrite=true to replace it")
    variations = None
    if "variation.name" in opts or "variation.sigma" in opts:  # the cross product; unset keys: the checkpoint's
        names = _list(opts["variation.name"]) if "variation.name" in opts else [None]
        sigmas = ([_number("variation.sigma", s, float) for s in _list(opts["variation.sigma"])]
                  if "variation.sigma" in opts else [None])
        variations = [{k: v for k, v in (("name", n), ("sigma", s)) if v is not None} for n in names for s in sigmas]
    dataset: dict[str, Any] = {}
    if "dataset.root" in opts:
        dataset["root"] = None if opts["dataset.root"] in ("", "null") else opts["dataset.root"]
    if "dataset.name" in opts:
        dataset["name"] = opts["dataset.name"]
    if "dataset.val_fraction" in opts:
        dataset["val_fraction"] = _number("dataset.val_fraction", opts["dataset.val_fraction"], float)
    if "seed" in opts:
        dataset["seed"] = _number("seed", opts["seed"], int)
    ints = {k: _number(f"evaluation.{k}", opts[f"evaluation.{k}"], int)
            for k in ("n_chips", "seed", "batch_size", "test_samples") if f"evaluation.{k}" in opts}
    res = evaluate_checkpoint(opts["checkpoint"], variations=variations, dataset=dataset, device=opts.get("device", "auto"),
                              progress=_bool("progress", opts.get("progress", "true")), **ints)
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
                               rows=[(f"{r['variation']['name']} {r['variation']['sigma']:g}", res["clean_accuracy"],
                                      r["mc"]) for r in rows])
    lines = ["", table, f"  checkpoint: {res['checkpoint']} ({res['stage']}, "
                        f"correctnet {res['versions']['exported'].get('correctnet', '?')})"]
    for r in rows:
        if r["reproduces_export"] is not None:
            lines.append("  reproduces the exported metrics exactly (clean and per-chip accuracies)"
                         if r["reproduces_export"] else
                         f"  DIFFERS from the exported metrics (same settings; exported on {res['exported_device']}, "
                         f"evaluated on {res['device']}: other hardware or library versions?)")
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

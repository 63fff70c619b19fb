"""Compare the deployment tiers of sweeps run with experiments/sweep_correctnet_fashion_mnist.sh.

For each sigma: vanilla (the vanilla reference, stage "baseline" of correctnet runs), noise-aware training
(method=noise_aware), CorrectNet chip-agnostic (stage "compensated") and CorrectNet calibrated (stage
"calibrated"): mean over seeds of the chip-mean accuracy (± std over seeds), of the p5 and min over chips, as %
of the original (the same seed's vanilla clean accuracy), and the difference chip-agnostic − noise-aware in
standard errors over seeds (Welch). Writes a markdown table and a JSON file with the provenance record.

    python experiments/compare_methods.py SWEEP_DIR [SWEEP_DIR ...] --out experiments/results/NAME

``--earlier JSON`` (an earlier output of this script) adds what it measured when its run directories are gone:
its one-seed rows are that run's values, so they join the new runs of the same σ as runs (seeds already among
the new runs are not counted twice); its rows of a σ with no new runs are copied as they are.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from common import portable, record

# (label, methods whose runs give the tier, for each seed the first one that ran it, stage): the chip-agnostic tier
# is method=correctnet where the sweep ran it, else the compensated stage of the correctnet_calibrated run
TIERS = (("vanilla", ("correctnet_calibrated", "correctnet"), "baseline"), ("noise-aware", ("noise_aware",), "noise_aware"),
         ("CorrectNet chip-agnostic", ("correctnet", "correctnet_calibrated"), "compensated"),
         ("CorrectNet calibrated", ("correctnet_calibrated",), "calibrated"))


def load(dirs: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for d in dirs:
        for p in sorted(d.glob("*/metrics.json")):
            m = json.loads(p.read_text())
            runs.append({"method": (m["config"].get("method") or {}).get("name"), "sigma": m["variation"]["sigma"],
                         "seed": m["config"]["seed"], "stages": m["stages"], "original": m.get("original_accuracy"),
                         "model": m["model"], "overhead": m.get("overhead")})
            r = runs[-1]
            if r["method"] in ("correctnet", "correctnet_calibrated") and "compensated" not in r["stages"] \
                    and "noise_aware" in r["stages"]:
                # the search chose no layer: the run deploys its network without compensators (no overhead), which is
                # its chip-agnostic CorrectNet result; leaving the seed out would keep only the seeds compensation helped
                r["stages"]["compensated"] = {**r["stages"]["noise_aware"],
                                              "overhead": {"total": {"params_pct": 0.0, "macs_pct": 0.0}}}
    return runs


def legacy_method(row: dict[str, Any]) -> str:
    """The preset a row written before the "method" field came from: correctnet_calibrated (noise-aware: noise_aware)."""
    return "noise_aware" if row["tier"] == "noise-aware" else "correctnet_calibrated"


def earlier_runs(rows: list[dict[str, Any]], have: set[tuple[float, int]]) -> list[dict[str, Any]]:
    """One-seed rows of an earlier comparison as run records (its values are that run's), except (σ, seed) in ``have``."""
    runs: dict[tuple[float, int], dict[str, Any]] = {}
    for r in rows:
        if "tier" not in r or "diff" in r or len(r["seeds"]) != 1 or (r["sigma"], r["seeds"][0]) in have:
            continue
        # rows written before the "method" field came from correctnet_calibrated runs (noise-aware: noise_aware)
        stage = next(s for label, _, s in TIERS if label == r["tier"])
        method = r.get("method") or legacy_method(r)
        run = runs.setdefault((r["sigma"], r["seeds"][0]), {
            "sigma": r["sigma"], "seed": r["seeds"][0], "stages": {}, "original": None, "model": None, "methods": {}})
        if r["of_original"]:
            run["original"] = r["mean"] / r["of_original"]
        over = None if r["params_pct"] is None else {"total": {"params_pct": r["params_pct"], "macs_pct": r["macs_pct"]}}
        run["methods"][stage] = method
        run["stages"][stage] = {"clean_accuracy": r["clean"], "overhead": over,
                                "mc": {"mean": r["mean"], "p5": r["p5"], "min": r["min"], "n_chips": r["n_chips"][0]}}
    out = []
    for run in runs.values():  # one record per method, as load() gives
        for method in set(run["methods"].values()):
            stages = {k: v for k, v in run["stages"].items() if run["methods"][k] == method}
            out.append({**{k: v for k, v in run.items() if k != "methods"}, "method": method, "stages": stages})
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    originals = {(r["sigma"], r["seed"]): r["original"] for r in runs if r["original"] is not None}
    rows = []
    for sigma in sorted({r["sigma"] for r in runs}):
        per_tier: dict[str, list[float]] = {}
        for label, methods, stage in TIERS:
            at = [r for r in runs if r["sigma"] == sigma and stage in r["stages"] and r["method"] in methods]
            by_seed: dict[int, dict[str, Any]] = {}  # per seed, the first of ``methods`` that ran it
            for r in sorted(at, key=lambda r: methods.index(r["method"])):
                by_seed.setdefault(r["seed"], r)
            sel = [by_seed[k] for k in sorted(by_seed)]
            method = " + ".join(m for m in methods if any(r["method"] == m for r in sel))
            if not sel:
                continue
            mc = [r["stages"][stage]["mc"] for r in sel]
            orig = [originals.get((sigma, r["seed"])) for r in sel]
            means = [m["mean"] for m in mc]
            per_tier[label] = means
            rel = [m["mean"] / o for m, o in zip(mc, orig) if o]
            rel_p5 = [m["p5"] / o for m, o in zip(mc, orig) if o]
            over = [((r["stages"][stage].get("overhead") or {}).get("total") or {}) for r in sel]
            rows.append({"sigma": sigma, "tier": label, "method": method, "seeds": [r["seed"] for r in sel],
                         "clean": float(np.mean([r["stages"][stage]["clean_accuracy"] for r in sel])),
                         "mean": float(np.mean(means)), "mean_std": float(np.std(means, ddof=1)) if len(sel) > 1 else None,
                         "p5": float(np.mean([m["p5"] for m in mc])), "min": float(np.mean([m["min"] for m in mc])),
                         "n_chips": sorted({m["n_chips"] for m in mc}),
                         "of_original": float(np.mean(rel)) if rel else None,
                         "p5_of_original": float(np.mean(rel_p5)) if rel_p5 else None,
                         "params_pct": float(np.mean([o["params_pct"] for o in over])) if all(over) else None,
                         "macs_pct": float(np.mean([o["macs_pct"] for o in over])) if all(over) else None})
        a, b = per_tier.get("CorrectNet chip-agnostic"), per_tier.get("noise-aware")
        if a and b and len(a) > 1 and len(b) > 1:
            se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
            diff = float(np.mean(a) - np.mean(b))
            rows.append({"sigma": sigma, "tier": "chip-agnostic − noise-aware", "diff": diff, "se": se,
                         "z": diff / se if se > 0 else math.inf})
    return rows


def markdown(rows: list[dict[str, Any]], models: list[str]) -> str:
    pct = lambda v: "—" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    lines = [f"Models: {', '.join(models)}. Mean over seeds; ± std over seeds; p5/min: over chips, mean over seeds.", "",
             "| σ | tier | from runs of | seeds | clean | chip mean | p5 | min | mean / orig | p5 / orig | +params | +MACs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "diff" in r:
            lines.append(f"| {r['sigma']:g} | **{r['tier']}** | | | | {100 * r['diff']:+.2f} pts "
                         f"({r['z']:.1f} SE, SE {100 * r['se']:.2f}) | | | | | | |")
            continue
        std = "" if r["mean_std"] is None else f" ± {100 * r['mean_std']:.2f}"
        rel = "—" if r["of_original"] is None else f"{100 * r['of_original']:.1f}%"
        rel5 = "—" if r["p5_of_original"] is None else f"{100 * r['p5_of_original']:.1f}%"
        params = "—" if r["params_pct"] is None else f"{r['params_pct']:.2f}%"
        macs = "—" if r["macs_pct"] is None else f"{r['macs_pct']:.2f}%"
        seeds = " ".join(map(str, r["seeds"]))
        lines.append(f"| {r['sigma']:g} | {r['tier']} | {r.get('method') or '—'} | {seeds} | {pct(r['clean'])} | {pct(r['mean'])}{std} | "
                     f"{pct(r['p5'])} | {pct(r['min'])} | {rel} | {rel5} | {params} | {macs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.json")
    p.add_argument("--earlier", type=Path, help="an earlier output (JSON) whose runs are gone (see the docstring)")
    args = p.parse_args()
    runs = load(args.dirs)
    models = sorted({r["model"] for r in runs})
    kept: list[dict[str, Any]] = []
    if args.earlier:
        before = json.loads(args.earlier.read_text())["rows"]
        new_sigmas = {r["sigma"] for r in runs}
        runs += earlier_runs([r for r in before if r["sigma"] in new_sigmas], {(r["sigma"], r["seed"]) for r in runs})
        kept = [r if "diff" in r or r.get("method") else {**r, "method": legacy_method(r)}
                for r in before if r["sigma"] not in new_sigmas]
    rows = sorted(summarize(runs) + kept, key=lambda r: r["sigma"])  # stable: each σ keeps its tier order
    md = markdown(rows, models)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    earlier = portable(args.earlier.resolve()) if args.earlier else None
    setup = record({"dirs": [d.name for d in args.dirs], "out": portable(args.out.resolve()), "earlier": earlier})
    # the sweep directories by name (they live outside the checkout), the output relative to it
    setup["command"] = (f"python experiments/compare_methods.py {' '.join(d.name for d in args.dirs)} "
                        f"--out {portable(args.out.resolve())}" + (f" --earlier {earlier}" if earlier else ""))
    args.out.with_suffix(".md").write_text(f"Command: `{setup['command']}` (commit {setup['git'].get('commit')})\n\n" + md)
    args.out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

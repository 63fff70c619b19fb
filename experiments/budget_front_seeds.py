"""Several seeds of ``budget_front.py`` in one table and one plot: each arm's mean and standard error over seeds.

Arms are matched by label across the files (``noise-aware alone``, ``none``, ``all``, ``<strategy> @ <budget>``);
each seed's search may choose another placement for the same label, so the overheads are averaged too. The
difference to noise-aware alone is paired by seed (the same seed trains both networks from one initialisation and
evaluates them on the same chips), and its standard error is that of the per-seed differences.

    python experiments/budget_front_seeds.py experiments/results/budget_front_fashion_mnist_lenet5_s0.5_seed{0,1,2}.json \\
        --out experiments/results/budget_front_fashion_mnist_lenet5_s0.5_3seeds.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from budget_front import arms, mean_se, plot
from common import machine_line, portable, record


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm: mean and standard error over seeds of overheads and accuracies, and the paired difference (pp) to
    noise-aware alone, chip-agnostic and calibrated."""
    per_seed = [arms(r) for r in results]
    labels = [k for k in per_seed[0] if all(k in a for a in per_seed)]
    base = [a["noise-aware alone"] for a in per_seed]
    out: dict[str, Any] = {}
    for label in labels:
        rows = [a[label] for a in per_seed]
        d: dict[str, Any] = {}
        for key in ("macs_pct", "params_pct", "agnostic", "p5", "calibrated", "search_pct"):
            if all(key in r for r in rows):
                d[key] = mean_se([r[key] for r in rows])
        for key in ("agnostic", "calibrated"):
            if label != "noise-aware alone" and all(key in r for r in rows) and all(key in b for b in base):
                diffs = [r[key] - b[key] for r, b in zip(rows, base)]
                m, se = mean_se(diffs)
                d[f"{key}_vs_noise_aware"] = {"mean": m, "se": se, "per_seed": diffs}
        out[label] = d
    return out


def table(res: dict[str, Any]) -> str:
    first = res["runs"][0]
    s = first["setup"]
    seeds = ", ".join(str(r["setup"]["seed"]) for r in res["runs"])
    ncal = s.get("calibrated_chips", 0)
    lines = [f"Budget front over seeds {seeds}: {s['model']} on {s['dataset']}, lognormal sigma={s['sigma']}, "
             f"{s['epochs']} epochs; test: {s['chips']} chips x {s['test_samples']} images (calibrated: the first "
             f"{ncal}). Mean ± standard error over seeds; the difference to noise-aware alone is paired by seed. "
             f"Machine: {machine_line(s)}", "", "Commands:", ""]
    lines += [f"- `{r['setup']['command']}`" for r in res["runs"]]
    lines += [f"- `{res['setup']['command']}`", "",
              "| arm | + MACs | + params | search: % of exhaustive | chip-agnostic mean | vs noise-aware (pp, SE) | p5 | "
              "calibrated mean | vs noise-aware calibrated (pp, SE) |",
              "|---|---|---|---|---|---|---|---|---|"]

    def ms(v: tuple[float, float] | None, unit: str = "%") -> str:
        return "-" if v is None else f"{v[0]:.2f}{unit} ± {v[1]:.2f}"

    def diff(v: dict[str, Any] | None) -> str:
        if v is None:
            return "-"
        z = f", {v['mean'] / v['se']:+.1f} SE" if v["se"] > 0 else ""
        return f"{v['mean']:+.2f} ± {v['se']:.2f}{z}"
    for label, d in res["arms"].items():
        lines.append(f"| {label} | {ms(d.get('macs_pct'))} | {ms(d.get('params_pct'))} | {ms(d.get('search_pct'))} | "
                     f"{ms(d.get('agnostic'))} | "
                     f"{diff(d.get('agnostic_vs_noise_aware'))} | {ms(d.get('p5'))} | {ms(d.get('calibrated'))} | "
                     f"{diff(d.get('calibrated_vs_noise_aware'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", type=Path, nargs="+", help="budget_front.py result JSONs, one per seed")
    p.add_argument("--out", type=Path, required=True, help="summary JSON (.md and .png beside it)")
    args = p.parse_args()
    runs = [json.loads(f.read_text()) for f in args.files]
    keys = {(r["setup"]["model"], r["setup"]["dataset"], r["setup"]["sigma"]) for r in runs}
    if len(keys) != 1:
        raise SystemExit(f"the files mix setups (model, dataset, sigma): {sorted(keys)}")
    if len({r["setup"]["seed"] for r in runs}) != len(runs):
        raise SystemExit("the files repeat a seed")
    res = {"setup": {**portable(vars(args)), **record()}, "runs": runs, "arms": summarize(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(table(res))
    plot(runs, args.out.with_suffix(".png"))
    print(table(res))


if __name__ == "__main__":
    main()

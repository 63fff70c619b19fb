"""Benchmark: networks calibrated per chip on their digital biases alone (no compensator, no extra hardware).

Each checkpoint (e.g. a ``method=noise_aware`` run's ``model.safetensors``) is re-evaluated on its own evaluation
chips with per-chip calibration that fits only the biases of its Linear/Conv layers (``calibration.biases=true``)
with the settings of the ``correctnet_calibrated`` preset (120 steps, 4,000 unlabeled training images, start from
the trained state) and the chip-ensemble teacher (a noise-aware run exports no vanilla reference). Against the
run's own uncalibrated accuracy on the same chips.

    python experiments/bias_calibration.py RUN_DIR... --threads 1 --out experiments/results/bias_calibration_lenet5_s05.json

``--original`` gives each run's original accuracy (its seed's vanilla clean accuracy) for the % columns.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from correctnet.calibration import evaluate_calibrated

from common import add_run_args, apply_threads, machine_line, record, write_result

SETTINGS = {"biases": True, "steps": 120, "n_images": 4000, "teacher": "ensemble", "start": "trained"}


def render(result: dict[str, Any]) -> str:
    s = result["setup"]
    lines = [f"Per-chip calibration of the digital biases alone; {machine_line(s)}", "",
             f"Command: `{s['command']}`", "", f"Calibration: `{json.dumps(SETTINGS)}`", "",
             "| run | seed | uncalibrated | calibrated (biases) | p5 | gain | mean / orig |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        orig = f"{100 * r['calibrated'] / r['original']:.1f}%" if r.get("original") else "—"
        lines.append(f"| {r['run']} | {r['seed']} | {100 * r['uncalibrated']:.2f}% | {100 * r['calibrated']:.2f}% | "
                     f"{100 * r['p5']:.2f}% | {100 * (r['calibrated'] - r['uncalibrated']):+.2f} | {orig} |")
    cal = [r["calibrated"] for r in result["rows"]]
    if len(cal) > 1:
        lines += ["", f"Mean {100 * statistics.mean(cal):.2f}% ± {100 * statistics.stdev(cal):.2f} (std over runs).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with model.safetensors and metrics.json")
    p.add_argument("--original", type=float, nargs="*", default=None, help="each run's original accuracy (0-1)")
    add_run_args(p, threads=1)
    args = p.parse_args()
    apply_threads(args)
    if args.original and len(args.original) != len(args.runs):
        p.error("--original needs one value per run")
    rows = []
    for i, run in enumerate(args.runs):
        metrics = json.loads((run / "metrics.json").read_text())
        final = list(metrics["stages"])[-1]
        res = evaluate_calibrated(run / "model.safetensors", calibration=SETTINGS, workers=1)["results"][0]
        rows.append({"run": run.name, "seed": metrics["config"]["seed"], "stage": final,
                     "uncalibrated": metrics["stages"][final]["mc"]["mean"], "calibrated": res["mc"]["mean"],
                     "p5": res["mc"]["p5"], "accuracies": res["mc"]["accuracies"],
                     "original": args.original[i] if args.original else None})
        print(f"{run}: {100 * rows[-1]['uncalibrated']:.2f}% -> {100 * rows[-1]['calibrated']:.2f}%", flush=True)
    out = args.out or Path(__file__).parent / "results" / "bias_calibration.json"
    write_result(out, {"setup": record(args), "rows": rows}, render)


if __name__ == "__main__":
    main()

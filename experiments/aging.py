"""Accuracy versus time after programming: vanilla, noise-aware and CorrectNet on aging RRAM chips.

Reads checkpoints of runs trained under ``variation=rram_wan2022`` (1 s after programming): a
``method=noise_aware`` run and a ``method=correctnet_calibrated`` run (whose vanilla reference is exported beside
it). For each time ``t`` (``variation.t_eval``, seconds; the Wan 2022 fits cover 1 s to 2 days) and each of the
same ``--chips`` evaluation chips, it measures on the run's test split:

* vanilla, noise-aware, CorrectNet chip-agnostic: the chip read at ``t``;
* CorrectNet calibrated once: the chip calibrated at 1 s (the run's calibration settings and teacher), its
  compensators and BatchNorm statistics kept, then read at ``t``;
* CorrectNet recalibrated: the chip calibrated again at ``t`` (towards the same teacher, computed at 1 s).

A chip keeps its programming-noise draw as it ages (its deviations grow with the fit's std), so "calibrated once"
follows one chip through time. Prints a table; ``--out`` writes JSON with the provenance.

    OMP_NUM_THREADS=1 python experiments/aging.py --na RUN_NA/model.safetensors --cn RUN_CN/model.safetensors \\
        --threads 1 --out experiments/results/aging_fashion_mnist_lenet5.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import correctnet as cn
from common import add_run_args, apply_threads, machine_line, record
from correctnet.analog import chip, set_variation
from correctnet.calibration import (ChipCalibrator, calibration_images, calibration_state, checkpoint_calibration,
                                    load_reference, teacher_network)
from correctnet.data import dataset_from_config
from correctnet.evaluate import first_samples
from correctnet.registry import make_variation
from correctnet.seeding import Stream, chip_seed


def plot(result: dict, path: Path) -> None:
    """Chip mean (band: p5) against time after programming, one line per arm, from a result JSON's rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    arms = list(dict.fromkeys(r["arm"] for r in result["rows"]))
    for arm in arms:
        rows = sorted((r for r in result["rows"] if r["arm"] == arm), key=lambda r: r["t_eval"])
        t = [r["t_eval"] for r in rows]
        ax.plot(t, [100 * r["mean"] for r in rows], marker="o", label=arm)
        ax.fill_between(t, [100 * r["p5"] for r in rows], [100 * r["mean"] for r in rows], alpha=0.12)
    if result.get("original_accuracy"):
        ax.axhline(100 * result["original_accuracy"], color="k", lw=0.8, ls="--", label="original (vanilla, clean)")
    ax.set_xscale("log")
    ax.set_xlabel("time after programming (s)")
    ax.set_ylabel("accuracy over chips (%): mean, band down to p5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replot", type=Path, help="only redraw the figure of this result JSON (beside it, .png)")
    p.add_argument("--na", type=Path, help="checkpoint of the method=noise_aware run")
    p.add_argument("--cn", type=Path, help="checkpoint of the method=correctnet_calibrated run")
    p.add_argument("--times", type=float, nargs="+", default=[1, 60, 3600, 86400, 172800])
    p.add_argument("--chips", type=int, default=100)
    add_run_args(p, threads=1)
    args = p.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    if args.na is None or args.cn is None:
        p.error("--na and --cn are required (or --replot)")
    apply_threads(args)
    cn_model, meta = cn.load_checkpoint(args.cn)
    na_model, _ = cn.load_checkpoint(args.na)
    vanilla = load_reference(args.cn, meta)
    cfg = meta["config"]
    data = dataset_from_config(cfg["dataset"], seed=cfg["seed"])
    test = first_samples(data.test, cfg["evaluation"].get("test_samples"))
    x, y = test.tensors
    cal_cfg = checkpoint_calibration(meta)
    images = calibration_images(data.train, cal_cfg.n_images, cal_cfg.seed)
    stored = meta["variation"]
    aged = {t: make_variation(**{**stored, "t_eval": t}) for t in args.times}
    seeds = [chip_seed(Stream.EVAL, cfg["evaluation"]["seed"], i) for i in range(args.chips)]

    def acc(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return (model(x).argmax(1) == y).float().mean().item()

    def calibrator() -> ChipCalibrator:  # the run's settings and teacher
        joint = bool((cfg.get("compensation") or {}).get("joint"))
        return ChipCalibrator(cn_model, images, cal_cfg, teacher=teacher_network(cal_cfg, cn_model, vanilla, joint))

    t0 = time.perf_counter()
    arms = ("vanilla", "noise-aware", "CorrectNet chip-agnostic", "CorrectNet calibrated once (1 s)",
            "CorrectNet recalibrated at t")
    res: dict[str, dict[float, list[float]]] = {a: {t: [] for t in args.times} for a in arms}
    for m in (vanilla, na_model, cn_model):
        m.eval()
    snapshot = {k: v.clone() for k, v in cn_model.state_dict().items()}
    set_variation(cn_model, make_variation(**stored))
    cal = calibrator()  # its teacher is computed once, at 1 s (a digital artifact of the design), and reused at t
    for i, s in enumerate(seeds):
        # calibrated once: at 1 s
        set_variation(cn_model, make_variation(**stored))
        with chip(cn_model, s):
            cal(cn_model, s)
        state = calibration_state(cn_model)
        for t in args.times:
            for name, m in (("vanilla", vanilla), ("noise-aware", na_model)):
                set_variation(m, aged[t])
                with chip(m, s):
                    res[name][t].append(acc(m))
            cn_model.load_state_dict(snapshot)
            set_variation(cn_model, aged[t])
            with chip(cn_model, s):
                res["CorrectNet chip-agnostic"][t].append(acc(cn_model))
            cn_model.load_state_dict({**snapshot, **state})
            with chip(cn_model, s):
                res["CorrectNet calibrated once (1 s)"][t].append(acc(cn_model))
            cn_model.load_state_dict(snapshot)
            with chip(cn_model, s):
                cal(cn_model, s)
                res["CorrectNet recalibrated at t"][t].append(acc(cn_model))
            cn_model.load_state_dict(snapshot)
        print(f"chip {i + 1}/{len(seeds)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    setup = record(args)
    rows = [{"arm": a, "t_eval": t, "mean": float(np.mean(v)), "p5": float(np.percentile(v, 5)),
             "min": float(np.min(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "accuracies": v}
            for a in arms for t, v in res[a].items()]
    orig = meta["metrics"].get("original_accuracy")
    print(f"\n{meta['model']} on {meta['dataset']}, {stored}, {args.chips} chips; original {100 * orig:.2f}%; "
          f"{machine_line(setup)}")
    print("| arm | " + " | ".join(f"t = {t:g} s" for t in args.times) + " |\n|---|" + "---|" * len(args.times))
    for a in arms:
        cells = [next(r for r in rows if r["arm"] == a and r["t_eval"] == t) for t in args.times]
        print(f"| {a} | " + " | ".join(f"{100 * c['mean']:.2f}% (p5 {100 * c['p5']:.2f}%)" for c in cells) + " |")
    if args.out:
        result = {"setup": setup, "original_accuracy": orig, "variation": stored, "rows": rows,
                  "seconds": time.perf_counter() - t0}
        args.out.write_text(json.dumps(result, indent=2))
        plot(result, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()

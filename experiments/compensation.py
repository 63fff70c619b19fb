"""Benchmark: error compensation on Fashion-MNIST (issue 4), with and without suppression and noise-aware training.

For each sigma it trains (or reuses) four base models with the same epochs and seed: vanilla, Lipschitz
suppression, noise-aware at that sigma, and both. On each base it measures, on the same held-out
evaluation chips (``Stream.EVAL``):

* ``none``: no compensation;
* ``all``: a compensator at every analog layer, trained chip-agnostically (``Stream.COMPENSATION`` chips);
* ``all+calibrated``: the same, then calibrated per evaluation chip on unlabeled training images;
* on the ``--search-bases`` (default: suppression only), ``best`` / ``best+calibrated``: a placement chosen on the *validation* split with
  ``Stream.SEARCH`` chips among each single layer, all layers, and unions of the best single layers (all
  within ``--max-params-pct``), then measured on the test chips like the others. The per-placement search
  scores are recorded too.

Accuracies are also given as a percentage of the *original* accuracy: the clean test accuracy of the
vanilla model (same architecture and epochs, no regularizer, no noise) on the same test images.

    python experiments/compensation.py --model lenet5 --test-samples 5000
    python experiments/compensation.py --model vgg11 --width 0.25 --epochs 3 --batch-size 128 --test-samples 1000

Each measured entry is appended to ``--out`` (JSON) as it finishes and base models are cached next to it,
so an interrupted run resumes where it stopped. The Markdown table is printed and written next to it.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

import correctnet as cn
from correctnet.calibration import (START, CalibrationConfig, ChipCalibrator, CompensationConfig, calibration_images,
                                    check_compensation, train_compensation)
from correctnet.compensation import attach_compensation, overhead
from correctnet.data import load_dataset
from correctnet.lipschitz import LipschitzRegularizer, input_shapes
from correctnet.seeding import Stream
from correctnet.training import TrainConfig, train

from common import add_base_args, add_run_args, apply_threads, machine_line, model_kwargs, portable, record  # noqa: F401 (re-exported)

BASES = ("vanilla", "lipschitz", "noise_aware", "lipschitz_noise_aware")


def base_model(name: str, sigma: float, args, data, cache: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or load from the cache) one base model; noise-aware bases are trained at ``sigma``."""
    noisy = "noise_aware" in name
    tag = f"{name}_s{sigma}" if noisy else name
    path = cache / f"{tag}.safetensors"
    if path.exists():
        model, meta = cn.load_checkpoint(path)
        return model, meta["bench"]
    torch.manual_seed(args.seed)
    kw = model_kwargs(args.model, args.width)  # recorded in the checkpoint
    model = cn.build_model(args.model, data.input_shape, data.num_classes, **kw)
    model = cn.analogize(model, cn.LogNormal(sigma), inplace=True)
    reg = None
    if "lipschitz" in name:
        reg = LipschitzRegularizer("relative", args.lip_strength, input_shapes=input_shapes(model, data.train.tensors[0][:1]),
                                   seed=args.seed)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, noise_aware=noisy)
    t0 = time.perf_counter()
    train(model, data.train, data.val, cfg, regularizer=reg, progress=args.progress, stage=tag)
    info = {"base": name, "train_sigma": sigma if noisy else None, "train_seconds": time.perf_counter() - t0,
            "epochs": args.epochs}
    meta = {"model": {"name": args.model, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                      "kwargs": kw}, "variation": cn.LogNormal(sigma).to_dict(), "analog": {"include": None, "exclude": []},
            "dataset": data.name, "bench": info}
    cn.save_checkpoint(path, model, meta, overwrite=True)
    print(f"  trained {tag} in {info['train_seconds']:.0f} s", flush=True)
    return model, info


def compensated(model: torch.nn.Module, placement: Any, args, data, train_images: int | None = None,
                steps: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    m = copy.deepcopy(model)
    attach_compensation(m, placement, kind=args.kind, rank=args.rank, seed=args.seed)
    x, y = data.train.tensors
    res = train_compensation(m, (x[:train_images], y[:train_images]), CompensationConfig(steps=steps or args.comp_steps, lr=args.comp_lr,
                                                               distill=args.distill, seed=args.seed),
                             progress=args.progress)
    ov = overhead(m, data.test.tensors[0][:1])
    info = {"compensation_seconds": res.seconds, "compensation_steps": res.steps, "distill": args.distill,
            "kind": args.kind, "rank": args.rank, "teacher_batchnorm": "re-estimated on nominal weights",
            "overhead": ov["total"], "overhead_layers": ov["layers"]}
    if args.check_chips and steps is None:  # not during the placement search, which scores on validation itself
        vx, vy = data.val.tensors
        info["check"] = check_compensation(m, (vx[:args.search_val], vy[:args.search_val]), chips=args.check_chips,
                                           seed=args.seed)
    return m, info


def measure(model, test, args, desc: str, calibrator=None, n_chips=None, seed=None, stream=Stream.EVAL) -> dict:
    r = cn.monte_carlo(model, test, n_chips=n_chips or args.chips, seed=args.eval_seed if seed is None else seed,
                       progress=args.progress, desc=desc, calibrate=calibrator, stream=stream)
    return r.to_dict() | {"sem": r.sem}


def search_placement(model, base_key: str, args, data, val, record) -> dict[str, Any]:
    """Score placements on validation images with SEARCH-stream chips; return the best within the budget."""
    layers = list(cn.analog_layers(model))
    scores: dict[str, dict[str, Any]] = {}

    def score(names: list[str]) -> None:
        key = "+".join(names) if len(names) < len(layers) else "all"
        if key in scores:
            return
        m, info = compensated(model, names, args, data, args.search_train, args.search_steps)
        mc = measure(m, val, args, f"search {key}", n_chips=args.search_chips, seed=args.seed, stream=Stream.SEARCH)
        scores[key] = {"layers": names, "val_mean": mc["mean"], "params_pct": info["overhead"]["params_pct"],
                       "macs_pct": info["overhead"]["macs_pct"]}
        print(f"    search {base_key} {key:<28} val {100 * mc['mean']:.2f}%  +{info['overhead']['params_pct']:.2f}% params",
              flush=True)

    for n in layers:
        score([n])
    score(layers)
    ranked = sorted((k for k in scores if k != "all"), key=lambda k: -scores[k]["val_mean"])
    for k in range(2, len(layers)):
        score([n for n in layers if n in {r for r in ranked[:k]}])
    ok = {k: v for k, v in scores.items() if v["params_pct"] <= args.max_params_pct}
    best = max(ok, key=lambda k: ok[k]["val_mean"])
    record["search"] = {"scores": scores, "best": best, "max_params_pct": args.max_params_pct,
                        "train_images": args.search_train or len(data.train), "steps": args.search_steps,
                        "chips": args.search_chips, "val_images": len(val[0])}
    return scores[best]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_args(p)
    p.add_argument("--sigmas", nargs="+", type=float, default=[0.5, 0.8])
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    p.add_argument("--kind", default="output", choices=["input", "output"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--comp-steps", type=int, default=422, help="chip-agnostic steps (422 = one pass over the FMNIST training split at batch 128)")
    p.add_argument("--comp-lr", type=float, default=1e-2)
    p.add_argument("--distill", type=float, default=1.0)
    p.add_argument("--no-distill-check", action="store_true", help="skip the distill=0 comparison")
    p.add_argument("--check-chips", type=int, default=0,
                   help="reset chip-agnostic compensators to a no-op if they lower accuracy on N search chips (the pipeline uses 8)")
    p.add_argument("--cal-steps", type=int, default=60)
    p.add_argument("--cal-images", type=int, default=2000)
    p.add_argument("--cal-lr", type=float, default=1e-2)
    p.add_argument("--cal-start", default="best", choices=START,
                   help="compensator state each chip's calibration starts from")
    p.add_argument("--no-search", action="store_true")
    p.add_argument("--no-calibration", action="store_true", help="chip-agnostic rows only")
    p.add_argument("--search-bases", nargs="+", default=["lipschitz"], choices=BASES)
    p.add_argument("--search-sigmas", nargs="+", type=float, default=None, help="default: every sigma")
    p.add_argument("--search-train", type=int, default=None,
                   help="training images for the compensators trained during the search (default: all)")
    p.add_argument("--search-steps", type=int, default=200, help="chip-agnostic steps during the search")
    p.add_argument("--search-chips", type=int, default=20)
    p.add_argument("--search-val", type=int, default=2000, help="validation images used by the placement search")
    p.add_argument("--max-params-pct", type=float, default=5.0)
    p.add_argument("--chips", type=int, default=100)
    p.add_argument("--test-samples", type=int, default=None)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--models", type=Path, default=None, help="base-model cache folder (default: <out>_models)")
    add_run_args(p)
    args = p.parse_args()
    apply_threads(args)
    out = args.out or Path(__file__).parent / "results" / f"compensation_{args.dataset}_{args.model}.json"
    cache = args.models or out.with_name(out.stem + "_models")
    cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("entries", {})
    results["setup"] = {**portable(vars(args)), **record()}

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(table(results))

    data = load_dataset(args.dataset, None, val_fraction=0.1, seed=args.seed)
    n = args.test_samples or len(data.test)
    test = (data.test.tensors[0][:n], data.test.tensors[1][:n])
    val = (data.val.tensors[0][:args.search_val], data.val.tensors[1][:args.search_val])
    cal_x = calibration_images(data.train, args.cal_images, args.seed)
    if "original" not in results:
        vanilla, _ = base_model("vanilla", args.sigmas[0], args, data, cache)
        results["original"] = cn.clean_accuracy(vanilla, test)
        save()
    print(f"original accuracy (vanilla, clean, {n} test images): {100 * results['original']:.2f}%", flush=True)

    for sigma in args.sigmas:
        for base in args.bases:
            model, info = base_model(base, sigma, args, data, cache)
            cn.set_variation(model, cn.LogNormal(sigma))
            key = f"{base}|{sigma}"
            rec = results["entries"].setdefault(key, {"base": base, "sigma": sigma, "train": info,
                                                      "clean": cn.clean_accuracy(model, test), "rows": {}})
            rows = rec["rows"]

            def run(row: str, fn) -> None:
                if row in rows:
                    return
                t0 = time.perf_counter()
                rows[row] = fn() | {"seconds": time.perf_counter() - t0}
                r = rows[row]
                print(f"  σ={sigma} {base:<22} {row:<18} mean {100 * r['mean']:.2f}% ± {100 * r['sem']:.2f} "
                      f"p5 {100 * r['p5']:.2f}%  ({r['seconds']:.0f} s)", flush=True)
                save()

            run("none", lambda: measure(model, test, args, f"{key} none"))
            placements = [("all", "all")]
            if (base in args.search_bases and not args.no_search
                    and sigma in (args.search_sigmas or args.sigmas)):
                if "search" not in rec:
                    search_placement(model, key, args, data, val, rec)
                    save()
                best = rec["search"]["best"]
                if best != "all":
                    placements.append(("best", rec["search"]["scores"][best]["layers"]))
            for label, placement in placements:
                if f"{label}+calibrated" in rows or (args.no_calibration and label in rows):
                    continue
                m, info_c = compensated(model, placement, args, data)
                extra = info_c | {"placement": placement}
                run(label, lambda: measure(m, test, args, f"{key} {label}") | extra)
                if args.no_calibration:
                    continue
                cal = ChipCalibrator(m, cal_x, CalibrationConfig(steps=args.cal_steps, n_images=args.cal_images,
                                                                 lr=args.cal_lr, start=args.cal_start, seed=args.seed))
                run(f"{label}+calibrated", lambda: measure(m, test, args, f"{key} {label}+cal", calibrator=cal)
                    | extra | {"calibration": cal.stats()})
            if base == "lipschitz" and sigma == args.sigmas[0] and not args.no_distill_check and "all/labels_only" not in rows:
                saved = args.distill
                args.distill = 0.0
                m, info_c = compensated(model, "all", args, data)
                args.distill = saved
                run("all/labels_only", lambda: measure(m, test, args, f"{key} all labels-only") | info_c)
    print(table(results))


def table(results: dict[str, Any]) -> str:
    orig = results.get("original")
    lines = [f"Original accuracy (vanilla, clean): {100 * orig:.2f}%" if orig else "",
             "", "| σ | base | compensation | clean | mean ± sem | p5 | mean / orig | p5 / orig | +params | +MACs | time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in results["entries"].values():
        for row, r in rec["rows"].items():
            ov = r.get("overhead")
            cal = r.get("calibration")
            pp, pm = (f"{ov['params_pct']:.2f}%", f"{ov['macs_pct']:.2f}%") if ov else ("-", "-")
            t = f"{r['seconds']:.0f} s" + (f" ({cal['seconds_per_chip']:.2f} s/chip calib.)" if cal else "")
            if r.get("check") and not r["check"]["kept"]:
                row += " (check: reset to no-op)"
            lines.append(
                f"| {rec['sigma']} | {rec['base']} | {row} | {100 * rec['clean']:.2f}% | {100 * r['mean']:.2f}% ± {100 * r['sem']:.2f} "
                f"| {100 * r['p5']:.2f}% | {100 * r['mean'] / orig:.1f}% | {100 * r['p5'] / orig:.1f}% "
                f"| {pp} | {pm} | {t} |")
    for name, rows in results.get("superseded", {}).items():
        lines += ["", f"Superseded ({name}): " + "; ".join(
            f"{row} mean {100 * r['mean']:.2f}%, p5 {100 * r['p5']:.2f}%" for row, r in rows.items())]
    searches = [(rec["base"], rec["sigma"], rec["search"]) for rec in results["entries"].values() if "search" in rec]
    if searches:
        lines += ["", "Placement search (validation images, SEARCH-stream chips, chip-agnostic training):", ""]
        for base, sigma, s in searches:
            cells = ", ".join(f"{k}: {100 * v['val_mean']:.2f}% (+{v['params_pct']:.1f}%)" for k, v in s["scores"].items())
            lines.append(f"- σ={sigma} {base}: best **{s['best']}**; {cells}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Benchmark: LeNet-5 on Fashion-MNIST under the RRAM device presets (issue 8), vanilla vs CorrectNet.

Two base models are trained once (same seed and epochs; their training does not see the device model):
``vanilla`` (plain) and ``suppressed`` (CorrectNet's Lipschitz regularizer, ``conf/training/lipschitz.yaml``).
For each variation preset of ``conf/variation/`` (composed with Hydra like ``python -m correctnet.train
variation=...``, ``--set`` adds overrides such as ``variation.levels=16``) it measures on the same
held-out evaluation chips (``Stream.EVAL``), each chip with its own static deviations and fresh read noise
at every forward:

* ``vanilla``: the plain model;
* ``correctnet/suppressed``: the suppressed model alone;
* ``correctnet``: the suppressed model with a compensator at every analog layer (``conf/compensation/all.yaml``),
  trained chip-agnostically under that preset (``Stream.COMPENSATION`` chips): CorrectNet's full pipeline;
* optionally (``--noise-aware``) ``noise_aware``: plain training with the preset's noise at every forward.

    python experiments/devices.py --test-samples 5000

Writes ``experiments/results/devices_<dataset>_<model>.{json,md}`` (arguments, machine, per-method clean,
mean, std, p5 and min over the chips); trained models are cached next to them (not committed) and finished
entries are kept, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

import correctnet as cn
from correctnet.checkpoint import atomic_write
from correctnet.conf import DIR as CONFIG_DIR
from correctnet.calibration import CompensationConfig, train_compensation
from correctnet.compensation import attach_compensation, overhead
from correctnet.data import load_dataset
from correctnet.lipschitz import LipschitzRegularizer, input_shapes
from correctnet.training import TrainConfig, train

from common import build_network, machine_line, portable, record

CONF = CONFIG_DIR  # the package's Hydra config groups


def preset(name: str, overrides: list[str]) -> cn.VariationModel:
    """The variation model of ``variation=<name> <overrides>``, composed exactly as the train command does."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"variation={name}", *overrides])
    params = OmegaConf.to_container(cfg.variation, resolve=True)
    assert isinstance(params, dict)
    return cn.make_variation(**params)


def base_model(kind: str, variation: cn.VariationModel, args, data, cache: Path) -> tuple[torch.nn.Module, dict]:
    """Train (or load) ``vanilla``, ``suppressed`` or ``noise_aware`` (the last under ``variation``)."""
    tag = kind if kind != "noise_aware" else f"noise_aware_{args.current}"
    path = cache / f"{tag}.safetensors"
    if path.exists():
        model, meta = cn.load_checkpoint(path)
        cn.set_variation(model, variation)
        return model, meta["bench"]
    torch.manual_seed(args.seed)
    model = cn.analogize(build_network(args, data), variation, inplace=True)
    reg = None
    if kind == "suppressed":
        reg = LipschitzRegularizer("relative", args.lip_strength, seed=args.seed)
        reg.shapes = input_shapes(model, data.train.tensors[0][:1])
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                      noise_aware=kind == "noise_aware")
    t0 = time.perf_counter()
    train(model, data.train, data.val, cfg, regularizer=reg, progress=args.progress, stage=tag)
    info = {"train_seconds": time.perf_counter() - t0, "epochs": args.epochs,
            "lipschitz_strength": args.lip_strength if reg else None}
    meta = {"model": {"name": args.model, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
                      "kwargs": {}}, "variation": variation.to_dict(), "analog": {"include": None, "exclude": []},
            "dataset": data.name, "bench": info}
    cn.save_checkpoint(path, model, meta, overwrite=True)
    print(f"  trained {tag} in {info['train_seconds']:.0f} s", flush=True)
    return model, info


def measure(model: torch.nn.Module, test, args, desc: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = cn.monte_carlo(model, test, n_chips=args.chips, seed=args.eval_seed, progress=args.progress, desc=desc)
    return {"clean": cn.clean_accuracy(model, test), **r.to_dict(), "sem": r.sem,
            "eval_seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--width", type=float, default=0.25, help="VGG channel multiplier (as conf/model/vgg11.yaml)")
    p.add_argument("--variations", nargs="+", default=["rram_wan2022", "rram_faulty"], help="conf/variation presets")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides, e.g. variation.levels=16")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lip-strength", type=float, default=0.02)
    p.add_argument("--comp-steps", type=int, default=500)
    p.add_argument("--noise-aware", action="store_true", help="add the noise-aware training baseline")
    p.add_argument("--chips", type=int, default=100)
    p.add_argument("--test-samples", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(__file__).parent / "results" / f"devices_{args.dataset}_{args.model}.json"
    cache = out.with_name(out.stem + "_models")
    cache.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("entries", {})
    results["setup"] = {**portable(vars(args)), **record()}

    def save() -> None:
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)), overwrite=True)
        out.with_suffix(".md").write_text(table(results))

    data = load_dataset(args.dataset, None, val_fraction=0.1, seed=args.seed)
    n = args.test_samples or len(data.test)
    test = (data.test.tensors[0][:n], data.test.tensors[1][:n])
    for name in args.variations:
        args.current = name
        variation = preset(name, args.set)
        entry = results["entries"].setdefault(name, {"variation": variation.to_dict(), "rows": {}})
        rows = entry["rows"]

        def run(row: str, fn) -> None:
            if row in rows:
                return
            rows[row] = fn()
            r = rows[row]
            print(f"  {name:<14} {row:<22} clean {100 * r['clean']:.2f}%  mean {100 * r['mean']:.2f}% "
                  f"± {100 * r['sem']:.2f}  std {100 * r['std']:.2f}  p5 {100 * r['p5']:.2f}%  ({r['eval_seconds']:.0f} s)",
                  flush=True)
            save()

        vanilla, info_v = base_model("vanilla", variation, args, data, cache)
        run("vanilla", lambda: measure(vanilla, test, args, f"{name} vanilla") | {"train": info_v})
        suppressed, info_s = base_model("suppressed", variation, args, data, cache)
        run("correctnet/suppressed", lambda: measure(suppressed, test, args, f"{name} suppressed") | {"train": info_s})
        if "correctnet" not in rows:
            m = copy.deepcopy(suppressed)
            attach_compensation(m, "all", kind="output", rank=4, seed=args.seed)
            res = train_compensation(m, data.train, CompensationConfig(steps=args.comp_steps, lr=1e-2, seed=args.seed),
                                     progress=args.progress, stage=f"{name} compensation")
            ov = overhead(m, data.test.tensors[0][:1])["total"]
            run("correctnet", lambda: measure(m, test, args, f"{name} correctnet")
                | {"train": info_s, "compensation_seconds": res.seconds, "overhead": ov})
        if args.noise_aware:
            na, info_n = base_model("noise_aware", variation, args, data, cache)
            run("noise_aware", lambda: measure(na, test, args, f"{name} noise_aware") | {"train": info_n})
    print(table(results))


def table(results: dict[str, Any]) -> str:
    s = results["setup"]
    lines = [f"LeNet-5 ({s['model']}) on {s['dataset']}, {s['epochs']} epochs, {s['chips']} chips, "
             f"{s['test_samples'] or 'all'} test images; {machine_line(s)}.",
             f"Command: `{s['command']}`", "",
             "| variation | method | clean | mean ± sem | std | p5 | min | +params | +MACs | eval time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results["entries"].items():
        for row, r in e["rows"].items():
            ov = r.get("overhead")
            pp, pm = (f"{ov['params_pct']:.2f}%", f"{ov['macs_pct']:.2f}%") if ov else ("-", "-")
            lines.append(f"| {name} | {row} | {100 * r['clean']:.2f}% | {100 * r['mean']:.2f}% ± {100 * r['sem']:.2f} "
                         f"| {100 * r['std']:.2f} | {100 * r['p5']:.2f}% | {100 * r['min']:.2f}% | {pp} | {pm} "
                         f"| {r['eval_seconds']:.0f} s |")
    lines += ["", "Variations: " + "; ".join(
        f"{name}: " + ", ".join(f"{k}={v}" for k, v in e["variation"].items() if k != "name")
        for name, e in results["entries"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

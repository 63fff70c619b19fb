"""Benchmark: training and calibration on several chips at once, against one chip at a time.

For each model (the pipeline's LeNet-5 and VGG11, seeded random weights: the time of a step does not depend
on their values), in one process, side by side:

* ``train K=k``: a noise-aware training step (forward, backward, Adam) on a batch of ``--batch-size``
  Fashion-MNIST training images with ``chips_per_step=k`` fresh chips (k = batch size: every sample on its
  own chip); seconds per step (best of ``--repeat`` runs of ``--steps`` steps) and the ratio to ``K=1``.
* ``calibrate K=k``: ``monte_carlo(calibrate=ChipCalibrator, chips_per_pass=k)`` over ``--cal-chips`` chips
  (calibration: the calibrated preset's 120 steps on 4,000 training images unless ``--cal-steps`` /
  ``--cal-images``; rank-4 output compensators on every layer, BatchNorm re-estimated), seconds per chip
  (calibration and the evaluation on ``--test-samples`` test images) and the ratio to ``K=1``; the per-chip
  accuracies of every K are compared with K=1's.

Peak memory as in ``mc_speed.py`` (the process's peak resident set during the measurement). Results:
``experiments/results/chips_per_step_<device>.{json,md}``.

    python experiments/chips_per_step.py --threads 1
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import correctnet as cn
from common import add_run_args, apply_threads, machine_line, record, write_result
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images
from correctnet.compensation import attach_compensation
from correctnet.data import load_dataset
from mc_speed import timed


def _model(name: str, shape, classes: int, sigma: float, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"width": 0.25, "batch_norm": True, "fc_layers": 3, "fc_width": 512} if name == "vgg11" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cn.analogize(cn.build_model(name, shape, classes, **kw), cn.make_variation("lognormal", sigma),
                            inplace=True).to(device)


def bench_training(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, ks: list[int], args, device) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    rows: dict[str, Any] = {}

    def steps(k: int) -> None:
        with cn.noise_aware(model, 0, chips=k):
            for _ in range(args.steps):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    steps(1)  # warm-up
    for k in ks:
        t, mem, _ = timed(lambda: steps(k), device, args.repeat)
        rows[f"train K={k}"] = {"seconds_per_step": t / args.steps, **mem}
    base = rows["train K=1"]["seconds_per_step"]
    for r in rows.values():
        r["ratio"] = r["seconds_per_step"] / base
        print(f"  {r}", flush=True)
    model.eval()
    return rows


def bench_calibration(model: torch.nn.Module, data, ks: list[int], args, device) -> dict:
    attach_compensation(model, "all", kind="output", rank=4)
    cfg = CalibrationConfig(steps=args.cal_steps, n_images=args.cal_images, batch_size=128, teacher="self")
    cal = ChipCalibrator(model, calibration_images(data.train, args.cal_images, 0), cfg)
    xt, yt = data.test.tensors[0][:args.test_samples], data.test.tensors[1][:args.test_samples]
    rows: dict[str, Any] = {}
    accs: dict[int, list[float]] = {}
    for k in ks:
        t, mem, r = timed(lambda: cn.monte_carlo(model, (xt, yt), n_chips=args.cal_chips, progress=False,
                                                 calibrate=cal, chips_per_pass=k), device)
        accs[k] = r.accuracies
        rows[f"calibrate K={k}"] = {"seconds_per_chip": t / args.cal_chips, "mean_accuracy": r.mean, **mem}
    base = rows["calibrate K=1"]["seconds_per_chip"]
    for r in rows.values():
        r["ratio"] = r["seconds_per_chip"] / base
        print(f"  {r}", flush=True)
    same = all(a == accs[ks[0]] for a in accs.values())
    return {"rows": rows, "same_accuracies_across_k": same, "accuracies": {str(k): a for k, a in accs.items()}}


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    a = s["args"]
    lines = [f"Training and calibration on several chips at once, Fashion-MNIST, lognormal sigma={a['sigma']}; "
             f"{machine_line(s)}; device {s['device']}", "", f"Command: `{s['command']}`", "",
             f"Noise-aware training step, batch {a['batch_size']}, seconds per step (best of {a['repeat']} x "
             f"{a['steps']} steps):", "",
             "| model | chips per step | s per step | x one chip per step | peak MiB |", "|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for key, r in m["training"].items():
            lines.append(f"| {name} | {key.split('=')[1]} | {r['seconds_per_step']:.4f} | {r['ratio']:.2f} | "
                         f"{r['peak_mib']:.0f} |")
    lines += ["", f"Per-chip calibration ({a['cal_steps']} steps on {a['cal_images']} images, rank-4 output "
              f"compensators on every layer, BatchNorm re-estimated) + evaluation on {a['test_samples']} test "
              f"images, {a['cal_chips']} chips, seconds per chip:", "",
              "| model | chips per pass | s per chip | x one by one | peak MiB | same per-chip accuracies as K=1 |",
              "|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        c = m["calibration"]
        for key, r in c["rows"].items():
            lines.append(f"| {name} | {key.split('=')[1]} | {r['seconds_per_chip']:.3f} | {r['ratio']:.2f} | "
                         f"{r['peak_mib']:.0f} | {c['same_accuracies_across_k']} |")
    lines += ["", "Weights: a seeded random initialisation (the time of a step does not depend on their values), so the "
              "accuracies are near chance; that K chips per pass compute bit-identical calibrated chips is tested in "
              "tests/test_chips_per_step.py. Ratios are side by side in one process; absolute seconds depend on the load."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lenet5", "vgg11"])
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64, help="training batch (the pipeline's default)")
    p.add_argument("--train-chips", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cal-chips-per-pass", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--cal-chips", type=int, default=16)
    p.add_argument("--cal-steps", type=int, default=120)
    p.add_argument("--cal-images", type=int, default=4000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    add_run_args(p, threads=1)
    args = p.parse_args()
    apply_threads(args)
    device = torch.device(args.device)
    data = load_dataset("fashion_mnist", None, val_fraction=0.1, seed=0)
    res: dict[str, Any] = {"setup": {**record(args), "device": torch.cuda.get_device_name(device)
                                     if device.type == "cuda" else "cpu"}, "models": {}}
    x, y = data.train.tensors[0][:args.batch_size].to(device), data.train.tensors[1][:args.batch_size].to(device)
    for name in args.models:
        print(name, flush=True)
        t0 = time.perf_counter()
        model = _model(name, data.input_shape, data.num_classes, args.sigma, device)
        res["models"][name] = {"training": bench_training(model, x, y, args.train_chips, args, device),
                               "calibration": bench_calibration(model, data, args.cal_chips_per_pass, args, device),
                               "seconds": time.perf_counter() - t0}
    write_result(args.out or Path(__file__).parent / "results" / f"chips_per_step_{device.type}.json", res, table)


if __name__ == "__main__":
    main()

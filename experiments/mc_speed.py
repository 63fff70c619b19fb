"""Benchmark: what one simulated chip costs, against a clean forward pass (issue 9).

For each model, on the same Fashion-MNIST test images, in one process:

* (a) ``clean``: the plain digital model, ``eval()`` + ``no_grad``, a forward over the test set in batches
  of ``--batch-size`` (the default PyTorch layout). The reference: every ratio below is to this time.
  ``clean_cl`` is the same forward in the channels-last layout the Monte-Carlo evaluation uses on CPU,
  so the injection's own cost can be read apart from the layout's gain.
* (b) ``simple``: one chip by the simplest correct method: copy the model, write the chip's weights into
  the copy (``correctnet.chip_copy``), forward. Per chip, over ``min(10, max chips)`` chips.
* (c) ``mc``: ``correctnet.monte_carlo`` over 1, 10 and 100 chips (``--chips``), per chip; and
  ``mc_comp``: the same with rank-4 output compensators on every layer (as the CorrectNet pipeline runs).
* (d) ``calibrated``: ``monte_carlo`` with per-chip calibration (``ChipCalibrator``, default
  ``CalibrationConfig``: 60 steps on 2000 training images, BatchNorm re-estimated), per chip.

Peak memory: the process's peak resident set (``VmHWM``, reset before each measurement through
``/proc/self/clear_refs``), in MiB, and its growth over the resident set before the measurement;
on CUDA, ``torch.cuda.max_memory_allocated``. Weights are a seeded random initialisation: the time of a
forward does not depend on the weights' values. The first chip's predictions of (b) and (c) are compared.

    python experiments/mc_speed.py --threads 2
    python experiments/mc_speed.py --device cuda --batch-size 10000

Results go to ``experiments/results/mc_speed_<device>.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import correctnet as cn
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images
from correctnet.compensation import attach_compensation
from correctnet.data import load_dataset
from correctnet.evaluate import iter_batches, to_channels_last
from correctnet.seeding import Stream, chip_seed


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict[str, float]) -> Iterator[None]:
    """Peak memory (MiB) while the block runs: ``peak_mib`` and ``growth_mib`` (over the start)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux)
            start, get = _status_kib("VmRSS") * 1024, lambda: _status_kib("VmHWM") * 1024
        except OSError:
            import resource  # no reset: the peak is the process's since it started
            start, get = 0, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        yield
        peak = get()
    out["peak_mib"], out["growth_mib"] = peak / 2 ** 20, (peak - start) / 2 ** 20


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> tuple[float, dict[str, float], Any]:
    """Best-of-``repeat`` seconds of ``fn()``, its peak memory, and its last result."""
    best, mem, result = float("inf"), {}, None
    for _ in range(repeat):
        m: dict[str, float] = {}
        with peak_memory(device, m):
            t0 = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        if dt < best:
            best, mem = dt, m
    return best, mem, result


def forward_predictions(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x).argmax(1) for x, _ in batches])


def bench_model(name: str, args: argparse.Namespace, data, device: torch.device) -> dict[str, Any]:
    x, y = data.test.tensors[0][:args.test_samples], data.test.tensors[1][:args.test_samples]
    kw = {"width": args.width} if name.startswith("vgg") else {}
    torch.manual_seed(args.seed)
    plain = cn.build_model(name, data.input_shape, data.num_classes, **kw).to(device).eval()
    batches = list(iter_batches((x, y), args.batch_size, device))
    batches_cl = [(to_channels_last(a), b) for a, b in batches]
    model = cn.analogize(plain, cn.LogNormal(args.sigma))
    rows: dict[str, dict[str, Any]] = {}

    def add(key: str, seconds: float, chips: int, mem: dict[str, float], **extra: Any) -> None:
        rows[key] = {"seconds": seconds, "chips": chips, "per_chip_s": seconds / chips, **mem, **extra}
        print(f"{name:<7} {key:<18} {seconds / chips:8.4f} s per {'pass' if key.startswith('clean') else 'chip'}"
              f"  peak {mem['peak_mib']:7.0f} MiB (+{mem['growth_mib']:.0f})", flush=True)

    forward_predictions(plain, batches)  # warm-up
    t, mem, _ = timed(lambda: forward_predictions(plain, batches), device, args.repeat)
    add("clean", t, 1, mem)
    t, mem, _ = timed(lambda: forward_predictions(plain, batches_cl), device, args.repeat)
    add("clean_cl", t, 1, mem)

    n_simple = min(10, max(args.chips))
    seeds = [chip_seed(Stream.EVAL, 0, i) for i in range(n_simple)]
    t, mem, preds = timed(lambda: [forward_predictions(cn.chip_copy(model, s).eval(), batches) for s in seeds], device)
    add("simple", t, n_simple, mem)
    simple_first = preds[0]

    for n in args.chips:
        t, mem, r = timed(lambda: cn.monte_carlo(model, (x, y), n_chips=n, batch_size=args.batch_size, progress=False),
                          device)
        add(f"mc_{n}", t, n, mem, mean_accuracy=r.mean)
    with cn.chip(model, seeds[0]):
        same = bool(torch.equal(forward_predictions(model, batches_cl), simple_first))
    print(f"{name:<7} chip 0: fast-path predictions identical to the simple method: {same}", flush=True)

    comp = copy.deepcopy(model)
    attach_compensation(comp, "all", kind="output", rank=4, seed=args.seed)
    n = max(args.chips)
    t, mem, _ = timed(lambda: cn.monte_carlo(comp, (x, y), n_chips=n, batch_size=args.batch_size, progress=False), device)
    add(f"mc_comp_{n}", t, n, mem)
    cal_cfg = CalibrationConfig()
    cal = ChipCalibrator(comp, calibration_images(data.train, cal_cfg.n_images, 0).to(device), cal_cfg)
    t, mem, _ = timed(lambda: cn.monte_carlo(comp, (x, y), n_chips=args.cal_chips, batch_size=args.batch_size,
                                             progress=False, calibrate=cal), device)
    add("calibrated", t, args.cal_chips, mem, calibration_s_per_chip=sum(cal.seconds) / len(cal.seconds))
    clean_s = rows["clean"]["seconds"]
    for r in rows.values():
        r["ratio_to_clean"] = r["per_chip_s"] / clean_s
    params = sum(p.numel() for p in plain.parameters())
    return {"rows": rows, "fast_equals_simple": same, "params": params, "test_images": len(x)}


def table(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"Monte-Carlo cost per chip, Fashion-MNIST test ({s['test_samples']} images, batch {s['batch_size']}), "
             f"lognormal sigma={s['sigma']}; machine: {s['machine']}; torch {s['torch']}", "",
             f"Command: `{s['command']}`", "",
             "| model | measurement | chips | s per chip | x clean forward | peak MiB | growth MiB |",
             "|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for key, r in m["rows"].items():
            lines.append(f"| {name} | {key} | {r['chips']} | {r['per_chip_s']:.4f} | {r['ratio_to_clean']:.2f} | "
                         f"{r['peak_mib']:.0f} | {r['growth_mib']:.0f} |")
    lines += ["", "clean: plain model, default layout; clean_cl: plain model, channels-last inputs; simple: copy + "
              "perturb + forward; mc_N: correctnet.monte_carlo over N chips; mc_comp_N: with rank-4 output "
              "compensators on every layer; calibrated: per-chip calibration (60 steps, 2000 images) + evaluation.",
              "Fast path = simple method (same predictions, chip 0): "
              + ", ".join(f"{n}: {m['fast_equals_simple']}" for n, m in res["models"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["lenet5", "vgg11"])
    p.add_argument("--width", type=float, default=0.25, help="VGG width")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--chips", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--cal-chips", type=int, default=3)
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3, help="clean forwards: best of this many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = load_dataset(args.dataset, None, val_fraction=0.1, seed=args.seed)
    args.test_samples = min(args.test_samples, len(data.test))
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    res: dict[str, Any] = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {
        "machine": machine, "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}, "models": {}}
    for name in args.models:
        res["models"][name] = bench_model(name, args, data, device)
    out = args.out or Path(__file__).parent / "results" / f"mc_speed_{device.type}.json"
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(table(res))
    print(table(res))


if __name__ == "__main__":
    main()

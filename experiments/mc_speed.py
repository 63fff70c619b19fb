"""Benchmark: what one simulated chip costs, against a clean forward pass.

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
    python experiments/mc_speed.py --device cuda --batch-size 10000 --precision bfloat16   # + autocast rows

Results go to ``experiments/results/mc_speed_<device>.{json,md}``.

``--batched`` measures chips in batches instead (``monte_carlo(chips_per_pass=K)``, K from
``--chips-per-pass``, default 1 10 100, and 1000 for LeNet-5 with ``--lenet-1000``), side by side in one
process: ``clean`` / ``clean_cl`` as above, then per K the seconds per chip over ``max(K, --min-chips)``
chips (``--min-chips`` for K=1), its ratio to ``clean`` and the peak memory. The data batch of a pass
is ``min(--batch-size, --max-rows // K)`` images (a pass holds K times that many rows). It also times
the three ways of one chip-batched convolution (per-chip loop, grouped convolution over channel-stacked
inputs, unfold + bmm) on the models' own conv shapes. Results: ``mc_speed_batched_<device>.{json,md}``.

    python experiments/mc_speed.py --batched --threads 1 --models lenet5 vgg11 resnet20 --test-samples 1000 --lenet-1000

``--eval-batch-sizes B1 B2 ...`` measures the evaluation batch size instead: per B, the clean forward in both
layouts and ``monte_carlo`` over ``max(--chips)`` chips one by one, with batches of B images; each ratio both
to the reference clean forward (``--batch-size``, default layout) and to the faster clean forward at the same
B. Results: ``mc_speed_batch_size_<device>.{json,md}``.

    python experiments/mc_speed.py --threads 1 --chips 100 --eval-batch-sizes 1000 250
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import correctnet as cn
from common import model_kwargs, write_result
from correctnet.calibration import CalibrationConfig, ChipCalibrator, calibration_images
from correctnet.compensation import attach_compensation
from correctnet.data import load_dataset
from correctnet.evaluate import iter_batches, to_channels_last
from correctnet.seeding import Stream, chip_seed
from correctnet.tensors import forward_precision


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


def _prepare(name: str, args: argparse.Namespace, data, device: torch.device, widths: tuple[int, int],
             **clean_extra: Any):
    """The test images and labels, the plain and analog model, the evaluation batches (NCHW and channels-last), the rows dict with its
    ``add(key, seconds, chips, mem, **extra)`` printer, and the two clean-forward rows already measured."""
    x, y = data.test.tensors[0][:args.test_samples], data.test.tensors[1][:args.test_samples]
    kw = model_kwargs(name, args.width)
    torch.manual_seed(args.seed)
    plain = cn.build_model(name, data.input_shape, data.num_classes, **kw).to(device).eval()
    batches = list(iter_batches((x, y), args.batch_size, device))
    batches_cl = [(to_channels_last(a), b) for a, b in batches]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reference models declare what stays digital; nothing to report here
        model = cn.analogize(plain, cn.LogNormal(args.sigma))
    rows: dict[str, dict[str, Any]] = {}

    def add(key: str, seconds: float, chips: int, mem: dict[str, float], **extra: Any) -> None:
        rows[key] = {"seconds": seconds, "chips": chips, "per_chip_s": seconds / chips, **mem, **extra}
        print(f"{name:<{widths[0]}} {key:<{widths[1]}} {seconds / chips:8.4f} s per "
              f"{'pass' if key.startswith('clean') else 'chip'}"
              f"  peak {mem['peak_mib']:7.0f} MiB (+{mem['growth_mib']:.0f})", flush=True)

    forward_predictions(plain, batches)  # warm-up
    t, mem, _ = timed(lambda: forward_predictions(plain, batches), device, args.repeat)
    add("clean", t, 1, mem, **clean_extra)
    t, mem, _ = timed(lambda: forward_predictions(plain, batches_cl), device, args.repeat)
    add("clean_cl", t, 1, mem, **clean_extra)
    return x, y, plain, model, batches, batches_cl, rows, add


def bench_model(name: str, args: argparse.Namespace, data, device: torch.device) -> dict[str, Any]:
    x, y, plain, model, batches, batches_cl, rows, add = _prepare(name, args, data, device, (7, 18))

    n_simple = min(10, max(args.chips))
    seeds = [chip_seed(Stream.EVAL, 0, i) for i in range(n_simple)]
    t, mem, preds = timed(lambda: [forward_predictions(cn.chip_copy(model, s).eval(), batches) for s in seeds], device)
    add("simple", t, n_simple, mem)
    simple_first = preds[0]

    for n in args.chips:
        t, mem, r = timed(lambda: cn.monte_carlo(model, (x, y), n_chips=n, batch_size=args.batch_size, progress=False),
                          device)
        add(f"mc_{n}", t, n, mem, mean_accuracy=r.mean)
    if args.precision != "float32":  # the same, every forward under torch.autocast (chip draws float32)
        amp = forward_precision(device, args.precision)
        with amp():
            t, mem, _ = timed(lambda: forward_predictions(plain, batches), device, args.repeat)
        add(f"clean_{args.precision}", t, 1, mem)
        for n in args.chips:
            t, mem, r = timed(lambda: cn.monte_carlo(model, (x, y), n_chips=n, batch_size=args.batch_size,
                                                     progress=False, precision=args.precision), device)
            add(f"mc_{args.precision}_{n}", t, n, mem, mean_accuracy=r.mean)
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


def conv_strategies(model: torch.nn.Module, x: torch.Tensor, k: int) -> list[dict[str, Any]]:
    """Seconds of one K-chip convolution, three ways, at each Conv2d's input shape (``x`` one data batch)."""
    import torch.nn.functional as F
    shapes: list[tuple[torch.nn.Conv2d, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a: shapes.append((m, a[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = []
    for conv, shp in shapes[:4]:
        n, c, h, w = shp
        xs = to_channels_last(torch.randn(k * n, c, h, w))
        ws = torch.randn(k, *conv.weight.shape)
        kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)

        def loop():
            return torch.cat([F.conv2d(xk, ws[i], groups=conv.groups, **kw) for i, xk in enumerate(xs.chunk(k))])

        def grouped():
            xg = to_channels_last(xs.view(k, n, c, h, w).transpose(0, 1).reshape(n, k * c, h, w))
            y = F.conv2d(xg, ws.reshape(-1, *ws.shape[2:]), groups=k * conv.groups, **kw)
            return to_channels_last(y.view(n, k, -1, *y.shape[2:]).transpose(0, 1).reshape(k * n, -1, *y.shape[2:]))

        def unfold():
            u = F.unfold(xs, conv.kernel_size, **kw)
            L = u.shape[-1]
            u = u.view(k, n, -1, L).transpose(2, 3).reshape(k, n * L, -1)
            return torch.bmm(u, ws.view(k, ws.shape[1], -1).transpose(1, 2))

        row: dict[str, Any] = {"shape": [k * n, c, h, w], "out_channels": conv.out_channels, "k": k}
        for key, fn in (("loop", loop), ("grouped", grouped), ("unfold_bmm", unfold) if conv.groups == 1 else ("", None)):
            if fn is not None:
                row[key] = timed(fn, torch.device("cpu"), 2)[0]
        out.append(row)
        print(f"conv {row}", flush=True)
    return out


def bench_batched(name: str, args: argparse.Namespace, data, device: torch.device) -> dict[str, Any]:
    x, y, plain, model, batches, batches_cl, rows, add = _prepare(name, args, data, device, (8, 10), batch=args.batch_size)
    ks = list(args.chips_per_pass) + ([1000] if name == "lenet5" and args.lenet_1000 else [])
    accs: dict[int, list[float]] = {}
    for k in ks:
        n = max(k, args.min_chips)
        bs = max(1, min(args.batch_size, args.max_rows // k))
        t, mem, r = timed(lambda: cn.monte_carlo(model, (x, y), n_chips=n, batch_size=bs, progress=False,
                                                 chips_per_pass=k), device)
        add(f"K={k}", t, n, mem, batch=bs, rows_per_pass=bs * k, mean_accuracy=r.mean)
        accs[k] = r.accuracies
    m = min(len(a) for a in accs.values())
    same = all(a[:m] == accs[ks[0]][:m] for a in accs.values())
    print(f"{name:<8} per-chip accuracies identical across K (first {m} chips): {same}", flush=True)
    clean_s = rows["clean"]["seconds"]
    for r in rows.values():
        r["ratio_to_clean"] = r["per_chip_s"] / clean_s
    conv = conv_strategies(plain, batches_cl[0][0][:max(1, args.max_rows // 100)], 10) \
        if args.conv_strategies and device.type == "cpu" and any(isinstance(mm, torch.nn.Conv2d) for mm in plain.modules()) else []
    return {"rows": rows, "same_accuracies_across_k": same, "params": sum(p.numel() for p in plain.parameters()),
            "test_images": len(x), "conv_strategies": conv}


def table_batched(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"Chips in batches: Monte-Carlo cost per chip, Fashion-MNIST test subset (first {s['test_samples']} "
             f"images; the per-image cost is the full set's), lognormal sigma={s['sigma']}; machine: {s['machine']}; "
             f"torch {s['torch']}; commit {s['commit']}", "",
             f"Command: `{s['command']}`", "", f"Load: {s['load']}", "",
             "| model | measurement | chips | batch | rows/pass | s per chip | x clean forward | peak MiB | growth MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for key, r in m["rows"].items():
            lines.append(f"| {name} | {key} | {r['chips']} | {r['batch']} | {r.get('rows_per_pass', r['batch'])} | "
                         f"{r['per_chip_s']:.4f} | {r['ratio_to_clean']:.2f} | {r['peak_mib']:.0f} | {r['growth_mib']:.0f} |")
    lines += ["", "clean: plain model, default (NCHW) layout, eager, batch as shown; clean_cl: channels-last inputs; "
              "K=k: monte_carlo(chips_per_pass=k) over max(k, min_chips) chips, data batch = min(batch, max_rows // k).",
              "Per-chip accuracies identical across K: "
              + ", ".join(f"{n}: {m['same_accuracies_across_k']}" for n, m in res["models"].items()), "",
              "One chip-batched convolution (K=10 chips, channels-last), seconds, three ways:", "",
              "| model | input [K*N, C, H, W] | out | loop | grouped | unfold+bmm |", "|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for c in m["conv_strategies"]:
            lines.append(f"| {name} | {c['shape']} | {c['out_channels']} | {c['loop']:.4f} | {c['grouped']:.4f} | "
                         f"{c.get('unfold_bmm', float('nan')):.4f} |")
    return "\n".join(lines) + "\n"


def bench_batch_sizes(name: str, args: argparse.Namespace, data, device: torch.device) -> dict[str, Any]:
    """Evaluation batch size: clean forwards (both layouts) and ``monte_carlo`` over ``max(--chips)`` chips
    one by one, per batch size of ``--eval-batch-sizes``; ratios to the reference clean forward (batch
    ``--batch-size``, default layout) and to the clean forward at the same batch size."""
    x, y, plain, model, _, _, rows, add = _prepare(name, args, data, device, (7, 18), batch=args.batch_size)
    n = max(args.chips)
    accs = {}
    for bs in args.eval_batch_sizes:
        b = list(iter_batches((x, y), bs, device))
        b_cl = [(to_channels_last(a), c) for a, c in b]
        same_bs = {}
        for key, bb in ((f"clean@{bs}", b), (f"clean_cl@{bs}", b_cl)):
            t, mem, _ = timed(lambda: forward_predictions(plain, bb), device, args.repeat)
            add(key, t, 1, mem, batch=bs)
            same_bs[key] = t
        t, mem, r = timed(lambda: cn.monte_carlo(model, (x, y), n_chips=n, batch_size=bs, progress=False,
                                                 chips_per_pass=1), device)
        add(f"mc_{n}@{bs}", t, n, mem, batch=bs, mean_accuracy=r.mean,
            ratio_to_clean_same_batch=t / n / min(same_bs.values()))
        accs[bs] = r.accuracies
    clean_s = rows["clean"]["seconds"]
    for r in rows.values():
        r["ratio_to_clean"] = r["per_chip_s"] / clean_s
        r.setdefault("batch", args.batch_size)
    same = all(a == accs[args.eval_batch_sizes[0]] for a in accs.values())
    print(f"{name:<7} per-chip accuracies identical across batch sizes: {same}", flush=True)
    return {"rows": rows, "same_accuracies_across_batch_sizes": same, "test_images": len(x)}


def table_batch_sizes(res: dict[str, Any]) -> str:
    s = res["setup"]
    lines = [f"Evaluation batch size: Monte-Carlo cost per chip (one by one), Fashion-MNIST test (first "
             f"{s['test_samples']} images), lognormal sigma={s['sigma']}; machine: {s['machine']}; torch {s['torch']}; "
             f"commit {s['commit']}", "", f"Command: `{s['command']}`", "", f"Load: {s['load']}", "",
             "| model | measurement | batch | chips | s per chip | x clean forward (batch "
             f"{s['batch_size']}) | x best clean forward, same batch | peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for name, m in res["models"].items():
        for key, r in m["rows"].items():
            same = r.get("ratio_to_clean_same_batch")
            lines.append(f"| {name} | {key} | {r['batch']} | {r['chips']} | {r['per_chip_s']:.4f} | "
                         f"{r['ratio_to_clean']:.2f} | {'' if same is None else f'{same:.2f}'} | {r['peak_mib']:.0f} |")
    lines += ["", "clean: plain model, eager, default (NCHW) layout; clean_cl: channels-last inputs; mc_N@b: "
              "correctnet.monte_carlo over N chips, one chip per pass, batch b. Per-chip accuracies identical across "
              "batch sizes: " + ", ".join(f"{n}: {m['same_accuracies_across_batch_sizes']}" for n, m in res["models"].items())]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="also measure the clean forward and the chips under torch.autocast at this dtype")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--batched", action="store_true", help="measure chips in batches (chips_per_pass)")
    p.add_argument("--chips-per-pass", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--lenet-1000", action="store_true", help="--batched: also K=1000 for LeNet-5")
    p.add_argument("--min-chips", type=int, default=10, help="--batched: chips measured at least, per K")
    p.add_argument("--max-rows", type=int, default=10000, help="--batched: at most this many rows per pass")
    p.add_argument("--load-note", default=None, help="--batched: what else ran on the machine")
    p.add_argument("--no-conv-strategies", dest="conv_strategies", action="store_false")
    p.add_argument("--eval-batch-sizes", type=int, nargs="+", default=None,
                   help="measure the evaluation batch size instead: these batch sizes, max(--chips) chips")
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
    if args.batched or args.eval_batch_sizes:
        import subprocess
        res["setup"]["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                                cwd=Path(__file__).parent).stdout.strip()
        res["setup"]["versions"] = cn.checkpoint.versions() if hasattr(cn, "checkpoint") else {}
        res["setup"]["load"] = (f"load average at start {Path('/proc/loadavg').read_text().split()[:3]} on "
                                f"{__import__('os').cpu_count()} CPUs; set it with --load-note")
        if args.load_note:
            res["setup"]["load"] = args.load_note
    if args.eval_batch_sizes:
        bench, render, suffix = bench_batch_sizes, table_batch_sizes, "batch_size_"
    elif args.batched:
        bench, render, suffix = bench_batched, table_batched, "batched_"
    else:
        bench, render, suffix = bench_model, table, ""
    for name in args.models:
        res["models"][name] = bench(name, args, data, device)
    write_result(args.out or Path(__file__).parent / "results" / f"mc_speed_{suffix}{device.type}.json", res, render)


if __name__ == "__main__":
    main()

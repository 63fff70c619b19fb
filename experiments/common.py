"""What the benchmark scripts share: their common options and the provenance every result file records.

Scripts run as ``python experiments/<name>.py ...``; Python puts this directory on ``sys.path`` for them, so
``from common import ...`` needs no path manipulation.

:func:`record` is the ``setup`` block of every result JSON: the command, the arguments, the git commit (and
whether the tree had uncommitted changes), the versions (torch, numpy, correctnet, python), the machine
(platform, processor, CPU count) and the torch threads. Paths inside the checkout are stored relative to it,
and neither the host name nor the user's directories are recorded, so committed results name no machine path.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import correctnet

REPO = Path(__file__).resolve().parents[1]


def add_base_args(p: argparse.ArgumentParser) -> None:
    """The options :func:`compensation.base_model` reads (data, architecture, training), shared by the benchmarks."""
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lip-strength", type=float, default=0.02)


def add_run_args(p: argparse.ArgumentParser, threads: int | None = None) -> None:
    """``--threads`` (torch CPU threads), ``--progress`` (bars) and ``--out`` (result JSON), shared by the benchmarks."""
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch CPU threads (default: {threads or 'torch' + chr(39) + 's own, one per core'})")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=None)


def apply_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads(args.threads)`` when it is set."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def portable(value: Any) -> Any:
    """``value`` for a committed JSON file: paths inside the checkout relative to it, other paths as given."""
    if isinstance(value, Path):
        try:
            return str(value.resolve().relative_to(REPO)) if value.is_absolute() else str(value)
        except ValueError:
            return str(value)
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    return value


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` (dirty: tracked files differ from the commit)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def command() -> str:
    """The command line that is running, as one would type it again from the checkout's root."""
    script = Path(sys.argv[0])
    name = portable(script.resolve()) if script.suffix == ".py" else sys.argv[0]
    return " ".join(["python", shlex.quote(str(name)), *map(shlex.quote, sys.argv[1:])])


def record(args: argparse.Namespace | dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance block of a result file (see the module docstring); ``args``: the parsed arguments."""
    params = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return {
        "command": command(),
        **({"args": portable(params)} if params else {}),
        "git": git_state(),
        "versions": {"correctnet": correctnet.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()},
        "threads": torch.get_num_threads(),
    }


def write_result(out: Path, result: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """Write ``result`` to ``out`` (JSON) and its table ``render(result)`` beside it (``.md``), and print the table."""
    out.write_text(json.dumps(result, indent=1))
    text = render(result)
    out.with_suffix(".md").write_text(text)
    print(text)


def machine_line(setup: dict[str, Any]) -> str:
    """One line for a result table: the machine, the threads, torch and the commit (older files: their string)."""
    m = setup.get("machine")
    if not isinstance(m, dict):
        return f"{m}, torch {setup.get('torch', '?')}"
    git = setup.get("git") or {}
    commit = (git.get("commit") or "?")[:10] + (" + uncommitted changes" if git.get("dirty") else "")
    return (f"{m['processor']}, {m['cpu_count']} CPUs, {setup.get('threads')} torch thread(s), "
            f"torch {setup.get('versions', {}).get('torch', '?')}, commit {commit}")


__all__ = ["add_base_args", "add_run_args", "apply_threads", "build_network", "git_state", "machine_line",
           "model_kwargs", "portable", "record", "write_result"]


def add_training_args(p: argparse.ArgumentParser, model: str = "lenet5", epochs: int = 3, chips: int = 100,
                      test_samples: int | None = 2000) -> None:
    """``--dataset``, ``--model``, ``--seed``, ``--epochs``, ``--chips`` (evaluation chips) and ``--test-samples``:
    the setup the accuracy benchmarks share (read by :func:`benchmark_data`)."""
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--model", default=model)
    p.add_argument("--seed", type=int, default=0, help="training seed and the train/validation split's seed")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--chips", type=int, default=chips, help="evaluation chips (Stream.EVAL)")
    p.add_argument("--test-samples", type=int, default=test_samples, help="the first N test images")
    p.add_argument("--width", type=float, default=0.25, help="VGG channel multiplier (as conf/model/vgg11.yaml)")


def model_kwargs(model: str, width: float) -> dict[str, Any]:
    """``build_model`` kwargs for benchmark ``model``: VGGs take the channel multiplier ``width``."""
    return {"width": width} if model.startswith("vgg") else {}


def build_network(args: argparse.Namespace, data: Any) -> torch.nn.Module:
    """The plain reference network ``args.model`` (``args.width`` for VGGs) for ``data``'s inputs and classes."""
    return correctnet.build_model(args.model, data.input_shape, data.num_classes,
                                  **model_kwargs(args.model, args.width))


def benchmark_data(args: argparse.Namespace) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """The dataset splits (10% validation, split by ``args.seed``) and the first ``args.test_samples`` test images
    ``(x [N, ...], y [N])``."""
    from correctnet.data import load_dataset

    data = load_dataset(args.dataset, None, val_fraction=0.1, seed=args.seed)
    return data, (data.test.tensors[0][:args.test_samples], data.test.tensors[1][:args.test_samples])

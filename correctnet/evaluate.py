"""Monte-Carlo evaluation: accuracy of a model over N simulated chips.

Seed scheme: chip ``i`` of an evaluation with seed ``s`` is ``seeding.chip_seed(Stream.EVAL, s, i)``; each
analog layer draws its variations from ``(chip seed, layer name)`` (see :mod:`correctnet.seeding`).
Same model, data and seed give the same per-chip accuracies; chips used in training come from other
streams and are never evaluation chips. Evaluation runs in ``eval()`` mode under ``torch.no_grad()``
and restores the model's previous train/eval mode and analog mode afterwards, even on error.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .analog import chip, nominal
from .seeding import Stream, chip_seed

Data = TensorDataset | DataLoader | tuple[torch.Tensor, torch.Tensor]


def iter_batches(data: Data, batch_size: int, device: torch.device | str | None = None, *,
                 generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches; tensors are sliced directly (no per-sample collation).

    With ``generator`` the order is shuffled by ``torch.randperm(n, generator=generator)``.
    """
    if isinstance(data, DataLoader):
        for x, y in data:
            yield x.to(device) if device else x, y.to(device) if device else y
        return
    x, y = data.tensors if isinstance(data, TensorDataset) else data
    n = len(x)
    order = torch.randperm(n, generator=generator) if generator is not None else None
    for i in range(0, n, batch_size):
        if order is None:
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        else:
            idx = order[i:i + batch_size]
            xb, yb = x[idx], y[idx]
        yield (xb.to(device), yb.to(device)) if device else (xb, yb)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` under ``torch.no_grad()``, the previous train flags restored on exit."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, t in flags.items():
            m.training = t


def _accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    for x, y in batches:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def accuracy(model: nn.Module, data: Data, *, batch_size: int = 1000) -> float:
    """Accuracy (fraction in [0, 1]) of ``model`` as it is now (its current analog mode)."""
    with eval_mode(model):
        return _accuracy(model, list(iter_batches(data, batch_size, model_device(model))))


def clean_accuracy(model: nn.Module, data: Data, *, batch_size: int = 1000) -> float:
    """Accuracy without any variation (nominal weights)."""
    with nominal(model):
        return accuracy(model, data, batch_size=batch_size)


@dataclass
class MCResult:
    """Per-chip accuracies of a Monte-Carlo evaluation and their summary statistics (fractions)."""

    accuracies: list[float]
    seed: int
    chip_seeds: list[int] = field(default_factory=list)

    @property
    def n_chips(self) -> int:
        return len(self.accuracies)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Sample standard deviation over chips (ddof=1; 0 for one chip)."""
        return float(np.std(self.accuracies, ddof=1)) if self.n_chips > 1 else 0.0

    @property
    def sem(self) -> float:
        """Standard error of the mean accuracy."""
        return self.std / math.sqrt(self.n_chips)

    @property
    def min(self) -> float:
        return float(np.min(self.accuracies))

    @property
    def p5(self) -> float:
        """5th percentile over chips (numpy's linear interpolation)."""
        return float(np.percentile(self.accuracies, 5))

    def to_dict(self) -> dict[str, Any]:
        return {"n_chips": self.n_chips, "mean": self.mean, "std": self.std, "min": self.min, "p5": self.p5,
                "accuracies": list(self.accuracies), "seed": self.seed}

    def summary(self) -> str:
        return (f"mean {100 * self.mean:.2f}% ± {100 * self.std:.2f} (std over {self.n_chips} chips), "
                f"p5 {100 * self.p5:.2f}%, min {100 * self.min:.2f}%")


def monte_carlo(model: nn.Module, data: Data, *, n_chips: int, seed: int = 0, batch_size: int = 1000,
                stream: Stream = Stream.EVAL, progress: bool = True, desc: str = "chips") -> MCResult:
    """Accuracy of ``model`` on ``data`` over ``n_chips`` simulated chips.

    The model must have analog layers (:func:`correctnet.analogize`). Data is moved to the model's
    device once; chips are programmed one after another.
    """
    if n_chips < 1:
        raise ValueError(f"n_chips must be >= 1, got {n_chips}")
    batches = list(iter_batches(data, batch_size, model_device(model)))
    seeds = [chip_seed(stream, seed, i) for i in range(n_chips)]
    accs: list[float] = []
    bar = tqdm(seeds, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    with eval_mode(model):
        for s in bar:
            with chip(model, s):
                accs.append(_accuracy(model, batches))
            bar.set_postfix(mean=f"{100 * np.mean(accs):.2f}%")
    return MCResult(accuracies=accs, seed=seed, chip_seeds=seeds)

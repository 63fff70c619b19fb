"""Small tensor and module helpers at the ground floor: data batches, a model's device, evaluation mode.

``Data`` is what the library accepts as a split: a ``TensorDataset``, a ``DataLoader`` or an ``(x, y)`` pair.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import ConfigError

__all__ = ["Data", "eval_mode", "first_samples", "iter_batches", "model_device"]

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


def first_samples(data: TensorDataset, n: int | None, key: str = "evaluation.test_samples") -> TensorDataset:
    """The first ``n`` samples of ``data`` (all of them when ``n`` is None)."""
    if n is None:
        return data
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(data):
        raise ConfigError(f"{key} must be null or an integer in [1, {len(data)}] (the split's size), got {n!r}")
    return TensorDataset(*(t[:n] for t in data.tensors))


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

"""Small tensor and module helpers at the ground floor: data batches, a model's device, evaluation mode, the
logits of a model's output.

``Data`` is what the library accepts as a split: a ``TensorDataset``, a ``DataLoader`` or an ``(x, y)`` pair.
``OutputFn`` is what the library's ``output=`` keyword takes: a function from a model's raw output to its
logits ``[N, C]`` (see :func:`logits_of`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import ConfigError

__all__ = ["Data", "OutputFn", "eval_mode", "first_samples", "iter_batches", "logits_of", "model_device"]

Data = TensorDataset | DataLoader | tuple[torch.Tensor, torch.Tensor]
OutputFn = Callable[[Any], torch.Tensor]

ACCEPTED_OUTPUTS = ("a tensor of logits [N, C], a tuple or list (its first element), a dict with a 'logits' key, "
                    "or an object with a .logits attribute (a transformers ModelOutput)")


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def logits_of(output: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The logits ``[N, C]`` in a model's raw ``output``, as the model zoos return them.

    Accepted: a tensor (the logits themselves); a tuple or list (its first element, a tensor); an object with
    a tensor ``.logits`` attribute (transformers' ``ModelOutput``, e.g. ``SequenceClassifierOutput``, read by
    the attribute although it is also a dict); a dict or other ``Mapping`` with a ``"logits"`` key.
    ``output_fn`` (the library's ``output=`` keyword), when given, maps the raw output to the logits instead,
    for any other form (``output=lambda out: out["scores"]``); it must return a tensor.

    Anything else is one :class:`ConfigError` naming the type received and what is accepted.
    """
    if output_fn is not None:
        logits = output_fn(output)
        if not isinstance(logits, torch.Tensor):
            raise ConfigError(f"output={getattr(output_fn, '__qualname__', output_fn)!r} returned a "
                              f"{_type_name(logits)} for a model output of type {_type_name(output)}; it must "
                              f"return the logits, a tensor [N, C]")
        return logits
    if isinstance(output, torch.Tensor):
        return output
    attr = getattr(output, "logits", None)
    if isinstance(attr, torch.Tensor):  # transformers' ModelOutput (an OrderedDict too: read by the attribute)
        return attr
    if isinstance(output, Mapping):
        if "logits" in output and isinstance(output["logits"], torch.Tensor):
            return output["logits"]
        raise ConfigError(f"the model returned a {_type_name(output)} with keys {list(output)} and no tensor "
                          f"under 'logits'; pass output=fn mapping the model's output to its logits [N, C] "
                          f"(e.g. output=lambda out: out[{next(iter(output), 'key')!r}])")
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    what = _type_name(output)
    if isinstance(output, (tuple, list)):
        what += (" that is empty" if not output else f" whose first element is a {_type_name(output[0])}")
    raise ConfigError(f"cannot read logits from a model output of type {what}: accepted are {ACCEPTED_OUTPUTS}; "
                      f"for any other output pass output=fn, a function mapping the model's output to its "
                      f"logits [N, C]")


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


PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def forward_precision(device: torch.device, precision: str, key: str = "precision") -> Callable[[], Any]:
    """A factory of the forward's precision context on ``device``: ``torch.autocast`` at ``bfloat16`` /
    ``float16`` (matmuls and convolutions in that dtype; elementwise work such as every chip draw stays float32),
    a no-op at ``float32``. Another ``precision`` raises :class:`ConfigError` naming ``key``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {list(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)

"""The read check: does every analog weight reach the output through the analog path under a chip?

An analog layer serves the chip's weight to any code that reads it as an attribute
(:mod:`correctnet.analog`), but code can still hold the nominal ``Parameter`` itself (a reference kept
before :func:`~correctnet.analogize`, ``module._parameters["weight"]``, ``named_parameters()`` fed to a
functional call) and compute with it, and a module that reads another layer's weight (``F.linear(x,
self.qkv.weight)``, timm's BEiT/EVA attention) bypasses that layer's forward: its compensator never runs
and its converters never act. :func:`check_reads` runs one forward under a chip and watches every torch
call (a ``TorchFunctionMode``): a nominal analog weight reaching an operation outside correctnet's own
analog computations is found by identity, whatever path the code took.

Reported (:class:`ReadReport`): nominal uses (the chip never reaches them); compensators whose layer's
forward never ran; attribute reads from outside the layer when the layer's variation has converters or
tiles (which act only inside the layer's forward). Each is an :class:`AnalogReadWarning`, or one
:class:`~correctnet.errors.ConfigError` when the model was made with ``analogize(..., strict=True)`` (or
``strict=True`` here). Reads outside the layer with a plain variation are exact and only listed.
A use through a module that registers the same Parameter itself (a tied embedding table) is
:func:`~correctnet.analogize`'s digital-weights report, not repeated here.

:func:`~correctnet.evaluate.monte_carlo` and noise-aware :func:`~correctnet.training.train` run the check
once per model (on two samples of the first batch, with the model's analog mode, train flags and the
global random state restored).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .analog import READ_STATE, AnalogLayer, analog_layers, chip
from .errors import ConfigError
from .tensors import eval_mode

__all__ = ["AnalogReadWarning", "ReadReport", "check_reads", "read_probe"]

#: the chip the check runs on (any chip reads the same weights; this one is drawn by no evaluation stream)
PROBE_SEED = 2**31 - 7


class AnalogReadWarning(UserWarning):
    """An analog weight is used under a chip without going through the analog path (see the module docstring)."""


@dataclass
class ReadReport:
    """What one probed forward read. Names are analog layer names; ``"layer.param"`` for weights."""

    #: analog layers whose own forward ran
    called: set[str] = field(default_factory=set)
    #: layer -> analog parameters read as attributes by code outside the layer's forward
    outside: dict[str, set[str]] = field(default_factory=dict)
    #: "layer.param" -> torch operations that consumed the nominal Parameter itself
    nominal: dict[str, set[str]] = field(default_factory=dict)
    #: layers with a compensator, their variation's converters/tiles, and their analog parameters
    compensated: set[str] = field(default_factory=set)
    converting: set[str] = field(default_factory=set)
    layers: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """One sentence per way the chip fails to reach the output through the analog path (empty: none)."""
        out = []
        for w, ops in sorted(self.nominal.items()):
            out.append(f"{w} is used with its nominal value by {sorted(ops)} (code holding the Parameter itself: "
                       f"a reference kept before analogize, module._parameters, a functional call on "
                       f"named_parameters()): the chip never reaches this use")
        for name in sorted(self.compensated - self.called):
            how = (f"its weight is read by another module's forward ({sorted(self.outside[name])})"
                   if name in self.outside else "its forward did not run")
            out.append(f"the compensator of {name} never runs: {how}; detach it or compensate a layer "
                       f"whose forward computes the output")
        for name in sorted(set(self.outside) & self.converting):
            out.append(f"{name}.{'/'.join(sorted(self.outside[name]))} is read by another module's forward: "
                       f"it computes with the chip's weight, but the converters (DAC/ADC) and tiles of the "
                       f"variation act only inside {name}'s own forward")
        return out

    @property
    def unused(self) -> list[str]:
        """Analog layers neither called nor read in this forward (weights this input does not use)."""
        used = self.called | set(self.outside) | {w.rsplit(".", 1)[0] for w in self.nominal}
        return [n for n in self.layers if n not in used]


class _Probe(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = analog_layers(model)
        self.report = ReadReport(layers=list(self.layers))
        self.names = {id(l): n for n, l in self.layers.items()}
        self.nominal_ids: dict[int, str] = {}
        for n, l in self.layers.items():
            for p in l.analog_parameters:
                self.nominal_ids.setdefault(id(l.nominal(p)), f"{n}.{p}")
            if "compensator" in l._modules:
                self.report.compensated.add(n)
            if l.variation.converts:
                self.report.converting.add(n)
        self.stack: list[nn.Module] = []

    # module calls: which analog forwards ran; correctnet's own ones read nominal weights on purpose
    def pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(module)
        if isinstance(module, AnalogLayer) and id(module) in self.names:
            self.report.called.add(self.names[id(module)])
            if not module.foreign_forward:
                READ_STATE.internal += 1

    def post(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
            if isinstance(module, AnalogLayer) and id(module) in self.names and not module.foreign_forward:
                READ_STATE.internal -= 1

    def outside_read(self, layer: AnalogLayer, name: str) -> None:
        if READ_STATE.internal == 0 and id(layer) in self.names:
            self.report.outside.setdefault(self.names[id(layer)], set()).add(name)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if READ_STATE.internal == 0 and READ_STATE.nominal == 0:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and id(t) in self.nominal_ids:
                    owner = self.stack[-1] if self.stack else None
                    if owner is not None and not isinstance(owner, AnalogLayer) \
                            and any(q is t for q in owner._parameters.values()):
                        continue  # a module's own (tied) Parameter: analogize's digital-weights report
                    op = getattr(func, "__name__", str(func))
                    self.report.nominal.setdefault(self.nominal_ids[id(t)], set()).add(op)
        return func(*args, **kwargs)


class read_probe:
    """``with read_probe(model) as report:`` records what the forwards inside read (see the module docstring).

    Leaves the model's state alone: run it around a forward of a model already under a chip.
    """

    def __init__(self, model: nn.Module) -> None:
        self.probe = _Probe(model)

    def __enter__(self) -> ReadReport:
        if READ_STATE.probe is not None:
            raise ConfigError("read_probe: a read probe is already active in this thread")
        self.hooks = [register_module_forward_pre_hook(self.probe.pre),
                      register_module_forward_hook(self.probe.post, always_call=True)]
        READ_STATE.probe = self.probe
        self.saved_internal = READ_STATE.internal
        READ_STATE.internal = 0
        self.probe.__enter__()
        return self.probe.report

    def __exit__(self, *exc: Any) -> None:
        self.probe.__exit__(*exc)
        READ_STATE.probe = None
        READ_STATE.internal = self.saved_internal
        for h in self.hooks:
            h.remove()


def check_reads(model: nn.Module, *inputs: Any, strict: bool | None = None, **kwargs: Any) -> ReadReport:
    """Run ``model(*inputs, **kwargs)`` once under a chip (eval mode, no grad) and report what bypasses the
    analog path: an :class:`AnalogReadWarning` per model, or a :class:`ConfigError` when ``strict`` (None: the
    ``strict=`` the model's :func:`~correctnet.analogize` was given). The model's analog mode, train flags,
    parameters and the global random state are as before. Returns the :class:`ReadReport`."""
    layers = analog_layers(model)
    if not layers:
        raise ConfigError(f"check_reads: {type(model).__name__} has no analog layers (correctnet.analogize first)")
    if strict is None:
        strict = any(l.strict for l in layers.values())
    devices = [t.device for t in tree_leaves((inputs, kwargs)) if isinstance(t, torch.Tensor)]
    with torch.random.fork_rng(devices=[d for d in set(devices) if d.type == "cuda"]), eval_mode(model), \
            chip(model, PROBE_SEED):
        with read_probe(model) as report:
            model(*inputs, **kwargs)
    problems = report.problems()
    if problems:
        msg = (f"{type(model).__name__}: {len(problems)} analog weight use(s) bypass the analog path under a chip: "
               + "; ".join(problems))
        if strict:
            raise ConfigError(msg + " (strict=True)")
        warnings.warn(msg, AnalogReadWarning, stacklevel=2)
    return report


def check_reads_once(model: nn.Module, sample: Any) -> None:
    """:func:`check_reads` on ``sample`` (a batch tensor: its first two samples) unless this model, with its
    current compensators, was checked already (the library's evaluation and training call this)."""
    layers = analog_layers(model)
    if not layers or not isinstance(sample, torch.Tensor) or not len(sample):
        return
    key = tuple((n, "compensator" in l._modules) for n, l in layers.items())
    if model.__dict__.get("_cn_reads_checked") == key:
        return
    check_reads(model, sample[:2])
    model.__dict__["_cn_reads_checked"] = key

"""Training for the periphery: weight constraints and learned DAC input ranges (used by :func:`correctnet.train`).

Two things a user deploying fixed-range converters trains for, besides the noise itself (which noise-aware
training already draws through the whole device model: programming noise, levels, DAC, output noise, ADC):

* :func:`clip_weights`: after every optimizer step each analog weight is clipped to ``±c·std`` of its own
  values, per layer or per output channel (aihwkit-lightning's ``WeightClipType.LAYER_GAUSSIAN`` and its
  per-channel variant). The mapping's full scale is ``max|W|``, so outliers waste conductance range and
  ADC range; the clip keeps ``max|W| <= c·std``.
* :class:`LearnedInputRanges`: each analog layer with a numeric ``dac_range`` gets its calibrated input
  range as a trainable scalar for the duration of training (PACT, Choi et al. 2018; aihwkit's
  ``learn_input_range``). The DAC computes ``clip(x, -X, X)`` with ``X = dac_range·R``; its gradient in
  ``X`` is ``sign(x)`` where ``|x| > X`` and 0 elsewhere (rounding is straight-through and passes nothing
  to ``X``), and the ADC full scale ``Y = adc_range·s·X`` and output noise ``f·Y`` pass theirs too (a larger
  input range also widens the ADC range and the absolute output noise). An optional decay adds
  ``decay·sum(R)`` to the loss. At the end the ranges are written back to ``layer.input_range`` as floats,
  so checkpoints (``meta["analog"]["input_ranges"]``) store the learned values.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from .analog import AnalogLayer, analog_layers
from .errors import ConfigError


def _crossbar_view(layer: AnalogLayer, parameter: str) -> torch.Tensor:
    """The nominal Parameter of ``layer`` viewed as ``[out, in, ...]`` (a view: in-place edits reach the Parameter)."""
    w = layer.nominal(parameter)
    return w.t() if layer.transposed else w


def clip_weights(model: nn.Module, clip: float, per_channel: bool = False) -> int:
    """Clip every analog weight of ``model`` in place to ``[-clip·std, clip·std]``; returns the tensors clipped.

    ``std``: ``torch.std`` (unbiased) of the nominal weight over the whole layer, or (``per_channel``) over
    each output channel (dimension 0 of the crossbar layout ``[out, in, ...]``, so one bound per output);
    a channel with a single weight is left alone. Every analog Parameter of every analog layer (attention
    in-projections, recurrent weights) is clipped on its own; a Parameter shared by several analog layers
    (tied weights) once. Digital parameters (biases, norms, compensators, layers left digital) are untouched.
    Units: those of the weight; ``clip`` in standard deviations.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for layer in analog_layers(model).values():
            for p in layer.analog_parameters:
                if id(layer.nominal(p)) in seen:
                    continue
                seen.add(id(layer.nominal(p)))
                w = _crossbar_view(layer, p)
                if w.numel() < 2:
                    continue
                if per_channel and w.dim() > 1:
                    std = w.std(dim=tuple(range(1, w.dim())), keepdim=True).nan_to_num(nan=math.inf)
                else:
                    std = w.std()
                bound = clip * std
                w.copy_(torch.maximum(torch.minimum(w, bound), -bound))
    return len(seen)


class LearnedInputRanges:
    """The trainable input ranges of a model's fixed-range DACs (see the module docstring).

    Built before training (it checks the model and makes one scalar leaf tensor per layer, in the layer's
    dtype and device, initialised from its calibrated ``input_range``); :meth:`installed` puts them on the
    layers for the duration of a ``with`` block and writes them back as floats on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = {n: l for n, l in analog_layers(model).items() if l.variation.needs_input_range}
        if not layers:
            raise ConfigError("training.learn_input_ranges=true needs analog layers whose variation has a numeric "
                              "dac_range (a fixed-range DAC), e.g. correctnet.devices.RRAM(dac_range=1.0, ...)")
        missing = [n for n, l in layers.items() if l.input_range is None]
        if missing:
            raise ConfigError(f"training.learn_input_ranges=true starts from calibrated input ranges: layers "
                              f"{missing[:4]}{' ...' if len(missing) > 4 else ''} have none; run "
                              f"correctnet.calibrate_input_ranges(model, batches) first")
        self.layers = layers
        self.ranges: dict[str, torch.Tensor] = {}
        for n, l in layers.items():
            w = l.nominal(l.analog_parameters[0])
            self.ranges[n] = torch.tensor(float(l.input_range), dtype=w.dtype,  # type: ignore[arg-type]
                                          device=w.device, requires_grad=True)
        self._floor = {n: float(r.detach()) * 1e-6 for n, r in self.ranges.items()}

    def parameters(self) -> list[torch.Tensor]:
        """The range tensors (scalars, input units), in layer order: what the optimizer trains."""
        return list(self.ranges.values())

    def penalty(self) -> torch.Tensor:
        """``sum(R)`` over the learned ranges (input units), differentiable: the decay term's sum."""
        return torch.stack(self.parameters()).sum()

    def constrain(self) -> None:
        """Keep every range positive (at least 1e-6 of its initial value) after an optimizer step."""
        with torch.no_grad():
            for n, r in self.ranges.items():
                r.clamp_(min=self._floor[n])

    def values(self) -> dict[str, float]:
        """The current ranges as floats, by layer name."""
        return {n: float(r.detach()) for n, r in self.ranges.items()}

    def load(self, values: dict[str, float]) -> None:
        """Set the ranges to ``values`` (a :meth:`values` dict, e.g. from a resume snapshot)."""
        if set(values) != set(self.ranges):
            raise ConfigError(f"learned input ranges for layers {sorted(values)} do not match this model's "
                              f"{sorted(self.ranges)}")
        with torch.no_grad():
            for n, r in self.ranges.items():
                r.fill_(values[n])

    @contextlib.contextmanager
    def installed(self) -> Iterator["LearnedInputRanges"]:
        """Inside the block each layer's ``input_range`` is its trainable tensor; on exit (also on an error)
        the current values are written back as floats."""
        try:
            for n, l in self.layers.items():
                l.input_range = self.ranges[n]
            yield self
        finally:
            for n, l in self.layers.items():
                l.input_range = float(self.ranges[n].detach())


__all__ = ["LearnedInputRanges", "clip_weights"]

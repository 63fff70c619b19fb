"""Models of how programmed RRAM weights deviate from their targets.

A variation model turns a nominal weight tensor into the weight a chip actually computes with. It is
split in two so that a chip can be stored and replayed:

* ``sample(weight, generator) -> noise``: the random part of one chip for one layer (same shape);
* ``apply(weight, noise) -> weight'``: the deterministic, differentiable map (gradients reach ``weight``).

Models:

* ``lognormal`` (CorrectNet, Eldebiky et al., DATE 2023): ``w' = w * exp(theta)``, ``theta ~ N(0, sigma^2)``
  per weight. Note ``E[exp(theta)] = exp(sigma^2/2)`` (1.13 at sigma=0.5): biased, not only noisy.
* ``gaussian``: additive, relative to the layer's largest weight, ``w' = w + sigma * max|w| * eps``,
  ``eps ~ N(0, 1)`` per weight (``max|w|`` is treated as a constant of the chip, not differentiated).

Both act on weights only; biases are taken as digital (exact).

* ``rram`` (:mod:`correctnet.devices`): an RRAM crossbar: weights mapped onto differential conductance
  pairs, conductance-dependent programming noise (Wan et al., Nature 2022), read noise drawn at every
  forward, stuck cells, finite levels, DAC/ADC converters. Presets: ``conf/variation/rram_*.yaml``.

Per-read noise and converters are optional hooks of the base class: :meth:`VariationModel.apply_read`
(the weight seen by one read, given a generator advanced at every forward) and ``dac``/``adc`` with
``converts``; the defaults do nothing, so ``lognormal`` and ``gaussian`` are static weight models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class VariationModel:
    """Base class. ``sigma`` is dimensionless (log-space std, or a fraction of max|w|)."""

    sigma: float
    name: ClassVar[str] = "base"

    def __post_init__(self) -> None:
        s = self.sigma
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ConfigError(f"variation.sigma must be a number >= 0, got {s!r}")
        if not math.isfinite(s) or s < 0:
            raise ConfigError(f"variation.sigma must be a finite number >= 0, got {s!r}")
        object.__setattr__(self, "sigma", float(s))

    def sample(self, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Standard-normal draws shaped like ``weight`` (on its device, in its dtype)."""
        return torch.randn(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)

    def apply(self, weight: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_read(self, weight: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The weight seen by one read (one forward): ``apply`` plus per-read noise drawn from ``generator``.

        The base models have no read noise; ``generator`` is None when only the static chip is wanted.
        """
        return self.apply(weight, noise)

    @property
    def reads(self) -> bool:
        """Whether ``apply_read`` draws per-read noise (off by default)."""
        return False

    @property
    def converts(self) -> bool:
        """Whether ``dac``/``adc`` quantize the analog layer's input/output (off by default)."""
        return False

    def dac(self, x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        """Input converter; ``dims``: the dimensions of one input vector. Identity by default."""
        return x

    def adc(self, y: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        """Output converter (before the digital bias); ``dims`` as for ``dac``. Identity by default."""
        return y

    @property
    def needs_input_range(self) -> bool:
        """Whether ``convert`` needs the layer's calibrated input range (a fixed-range DAC; off by default)."""
        return False

    def tiles(self, shape: Sequence[int]) -> tuple[list[slice], list[slice]] | None:
        """Crossbar tiles (slices of the weight's output and input dimensions) or None: one array (default)."""
        return None

    def weight_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The full-scale weight of the array mapping ``weight`` (for fixed-range converters); None by default."""
        return None

    def convert(self, mvm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dims: Sequence[int], *,
                weight_scale: torch.Tensor | None = None, input_range: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """One converted crossbar MVM (bias excluded): ``adc(mvm(dac(x)))`` by default.

        ``weight_scale`` (from :meth:`weight_scale`, broadcastable to the output), ``input_range`` (the
        layer's calibrated input range or None) and ``generator`` (the layer's read stream) serve models with
        fixed-range converters or output noise.
        """
        return self.adc(mvm(self.dac(x, dims)), dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma}


@dataclass(frozen=True)
class LogNormal(VariationModel):
    """``w' = w * exp(sigma * eps)``: multiplicative log-normal variation (CorrectNet)."""

    name: ClassVar[str] = "lognormal"

    def apply(self, weight: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return weight * torch.exp(self.sigma * noise)


@dataclass(frozen=True)
class Gaussian(VariationModel):
    """``w' = w + sigma * max|w| * eps``: additive Gaussian variation relative to the layer's range."""

    name: ClassVar[str] = "gaussian"

    def apply(self, weight: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().max()
        return weight + (self.sigma * scale) * noise

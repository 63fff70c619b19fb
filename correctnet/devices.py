"""RRAM device models: conductance mapping, programming and read noise, stuck cells, levels, converters.

One variation model, ``rram`` (:class:`RRAM`), chains the stages below. Every stage but the mapping is
off at its default, so the presets in ``correctnet/conf/variation/`` (``rram_wan2022``, ``rram_faulty``) pick and
compose them, and so does the command line, by overriding keys::

    python -m correctnet.train variation=rram_wan2022 variation.stuck_fraction=0.01 variation.levels=16
    python -m correctnet.train variation=rram_wan2022 variation.dac_bits=8 variation.adc_bits=8

For one weight tensor ``W`` (shape ``[out, ...]``) of one chip; conductances ``G`` in µS:

1. mapping (differential pair): ``s = max|W|`` over the layer (``mapping=layer``) or over each output
   channel (``mapping=channel``), a constant of the chip (not differentiated);
   ``G+ = g_min + (g_max - g_min) * relu(W) / s``, ``G- = g_min + (g_max - g_min) * relu(-W) / s``.
2. levels (``levels=N``): each cell is programmed to the nearest of ``N`` evenly spaced conductances in
   ``[g_min, g_max]`` (straight-through gradient).
3. programming noise, static per chip (``programming=wan2022``, Wan et al., Nature 608, 2022, as fitted
   in IBM aihwkit's ``ReRamWan2022NoiseModel``, 1 s after programming):
   ``G_p = max(0, G + sigma * std(G) * eps)``, ``eps ~ N(0, 1)`` per cell, with
   ``std(G) = (g_max / 40 µS) * (0.348 + 16.030 x - 43.853 x^2 + 45.393 x^3 - 16.815 x^4) µS``,
   ``x = G / g_max`` (the fit's reference g_max is 40 µS). ``sigma`` is the scale factor of this
   noise: 1.0 = the measured device, 0 = exact programming. ``programming=lognormal`` uses CorrectNet's
   ``G_p = G * exp(sigma * eps)`` instead (``sigma`` then is the log-space std).
4. stuck cells, static per chip: each cell is stuck with probability ``stuck_fraction``, at ``g_max``
   for a fraction ``stuck_high`` of the stuck cells and at ``g_min`` for the others, whatever its target.
   One uniform draw ``u`` per cell decides (stuck high if ``u < f * h``, low if ``f * h <= u < f``), so
   the faulty set of a chip grows monotonically with ``f``.
5. read noise, drawn anew at every forward (every read of the array), on top of 3-4:
   ``G_r = G_p + read_noise * g_max * eps_r``, ``eps_r ~ N(0, 1)`` per cell and read; current noise,
   not clamped. One read serves a whole batch.
6. unmapping: ``W' = (G+_r - G-_r) * s / (g_max - g_min)``. Without noise, levels and faults ``W' = W``.

Converters act on the analog layer's input and output (the digital bias is added after the ADC):

* DAC (``dac_bits=b``): each input vector (the last dimension for Linear, one sample's whole input map
  for conv) is scaled by its own ``max|x|`` (aihwkit's ``ABS_MAX`` input management) and rounded to the
  signed grid ``k / (2^(b-1) - 1)``, ``k`` integer; the scale is re-applied digitally.
* ADC (``adc_bits=b``): the same rule on the crossbar output ``W' x`` (per output vector / per sample):
  an ideal auto-ranging ADC whose full scale is the largest output of that vector. This is optimistic
  (real ADCs have a fixed range that clips or wastes levels): it measures resolution, not range.

Both use a straight-through gradient. In a layer's ``off`` mode nothing is applied (nominal, exact, no
converters); in ``chip`` and ``noisy`` modes everything is. Sources: Wan et al., "A compute-in-memory chip
based on resistive random-access memory", Nature 608, 504-512 (2022); aihwkit (Rasch et al., APL Mach.
Learn. 2023); Joshi et al., Nat. Commun. 11, 2473 (2020) for read noise as a fraction of g_max.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from .errors import is_int, is_number, require
from .variation import VariationModel

WAN2022_COEFFS: tuple[float, ...] = (0.348, 16.030, -43.853, 45.393, -16.815)  # µS, powers x^0..x^4
WAN2022_G_MAX = 40.0  # µS, the g_max the coefficients were fitted for
MAPPINGS = ("layer", "channel")
PROGRAMMING = ("wan2022", "lognormal")


def wan2022_std(g: torch.Tensor, g_max: float) -> torch.Tensor:
    """Programming-noise std in µS at target conductance ``g`` (µS): the Wan et al. 2022 polynomial."""
    x = g / g_max
    std = torch.zeros_like(g)
    for c in reversed(WAN2022_COEFFS):  # Horner
        std = std * x + c
    return std * (g_max / WAN2022_G_MAX)


def channel_scale(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``max|W|`` (detached) over the layer, or per output channel (shape ``[out, 1, ...]``); never 0."""
    w = weight.detach().abs()
    s = w.amax(dim=tuple(range(1, w.dim())), keepdim=True) if per_channel and w.dim() > 1 else w.max()
    return s.clamp_min(torch.finfo(w.dtype).tiny)


def to_conductance(weight: torch.Tensor, scale: torch.Tensor, g_min: float, g_max: float) -> torch.Tensor:
    """Differential pair ``[G+, G-]`` in µS (shape ``[2, *weight.shape]``) for weights ``|W| <= scale``."""
    k = (g_max - g_min) / scale
    return torch.stack((g_min + k * torch.relu(weight), g_min + k * torch.relu(-weight)))


def from_conductance(g: torch.Tensor, scale: torch.Tensor, g_min: float, g_max: float) -> torch.Tensor:
    """Inverse of :func:`to_conductance`: ``W = (G+ - G-) * scale / (g_max - g_min)``."""
    return (g[0] - g[1]) * (scale / (g_max - g_min))


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def quantize_levels(g: torch.Tensor, levels: int, g_min: float, g_max: float) -> torch.Tensor:
    """Nearest of ``levels`` evenly spaced conductances in ``[g_min, g_max]`` (straight-through gradient)."""
    step = (g_max - g_min) / (levels - 1)
    q = g_min + torch.round((g.detach() - g_min) / step).clamp(0, levels - 1) * step
    return _straight_through(g, q)


def quantize_signal(x: torch.Tensor, bits: int, dims: Sequence[int]) -> torch.Tensor:
    """Signed ``bits``-bit quantization with per-vector range ``max|x|`` over ``dims`` (straight-through)."""
    n = 2 ** (bits - 1) - 1
    s = x.detach().abs().amax(dim=tuple(dims), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    q = torch.round(x.detach() / s * n) * (s / n)
    return _straight_through(x, q)


def _opt_int(key: str, v: Any, low: int, high: int | None = None) -> int | None:
    if v is None:
        return None
    accepted = f"an integer >= {low}" + (f" and <= {high}" if high else "") + " or null (off)"
    require(is_int(v) and v >= low and (high is None or v <= high), f"variation.{key}", accepted, v)
    return int(v)


def _fraction(key: str, v: Any) -> float:
    require(is_number(v) and 0 <= v <= 1, f"variation.{key}", "a number in [0, 1]", v)
    return float(v)


@dataclass(frozen=True)
class RRAM(VariationModel):
    """RRAM crossbar: differential-pair mapping, programming + read noise, stuck cells, levels, DAC/ADC.

    ``sigma``: scale of the programming noise (1.0 = Wan et al. 2022). Conductances in µS, fractions in
    [0, 1]. See the module docstring for every formula. ``sample`` returns ``[2 or 4, *weight.shape]``:
    programming draws ``eps`` of G+ and G-, then (only when ``stuck_fraction > 0``) their fault draws ``u``.
    """

    sigma: float = 1.0
    g_max: float = 40.0              # µS, the conductance max|W| maps to
    g_min: float = 0.0               # µS, the conductance W = 0 maps to (both cells of the pair)
    mapping: str = "layer"           # layer | channel: where max|W| is taken
    programming: str = "wan2022"     # wan2022 | lognormal
    read_noise: float = 0.0          # std of the per-read noise, fraction of g_max
    stuck_fraction: float = 0.0      # fraction of cells stuck (per chip)
    stuck_high: float = 0.5          # fraction of the stuck cells stuck at g_max (the rest at g_min)
    levels: int | None = None        # programmable conductance levels per cell; null = continuous
    dac_bits: int | None = None      # input DAC resolution; null = ideal
    adc_bits: int | None = None      # output ADC resolution; null = ideal
    name: ClassVar[str] = "rram"

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = self._set
        require(is_number(self.g_max) and self.g_max > 0, "variation.g_max", "a number > 0 (µS)", self.g_max)
        require(is_number(self.g_min) and 0 <= self.g_min < self.g_max, "variation.g_min",
                f"a number >= 0 and < variation.g_max={self.g_max} (µS)", self.g_min)
        set_("g_max", float(self.g_max))
        set_("g_min", float(self.g_min))
        require(self.mapping in MAPPINGS, "variation.mapping", f"one of {list(MAPPINGS)}", self.mapping)
        require(self.programming in PROGRAMMING, "variation.programming", f"one of {list(PROGRAMMING)}",
                self.programming)
        require(is_number(self.read_noise) and self.read_noise >= 0, "variation.read_noise",
                "a number >= 0 (fraction of g_max)", self.read_noise)
        set_("read_noise", float(self.read_noise))
        set_("stuck_fraction", _fraction("stuck_fraction", self.stuck_fraction))
        set_("stuck_high", _fraction("stuck_high", self.stuck_high))
        set_("levels", _opt_int("levels", self.levels, 2))
        set_("dac_bits", _opt_int("dac_bits", self.dac_bits, 2, 24))
        set_("adc_bits", _opt_int("adc_bits", self.adc_bits, 2, 24))

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)  # frozen dataclass: normalise validated values

    # -- static part of a chip -------------------------------------------------------------------
    def sample(self, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Programming draws ``N(0, 1)`` then, with faults, uniform fault draws: ``[2 or 4, *weight.shape]``."""
        kw = dict(generator=generator, device=weight.device, dtype=weight.dtype)
        eps = torch.randn((2, *weight.shape), **kw)
        if self.stuck_fraction == 0:
            return eps
        return torch.cat((eps, torch.rand((2, *weight.shape), **kw)))

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The mapping's ``max|W|`` (layer scalar or ``[out, 1, ...]``), detached."""
        return channel_scale(weight, self.mapping == "channel")

    def conductances(self, weight: torch.Tensor, noise: torch.Tensor,
                     read: torch.Generator | None = None) -> torch.Tensor:
        """``[G+, G-]`` in µS as read once (shape ``[2, *weight.shape]``); read noise only with ``read``."""
        g = to_conductance(weight, self.scale(weight), self.g_min, self.g_max)
        if self.levels is not None:
            g = quantize_levels(g, self.levels, self.g_min, self.g_max)
        eps = noise[:2]
        if self.sigma > 0:
            if self.programming == "wan2022":
                g = (g + self.sigma * wan2022_std(g.detach(), self.g_max) * eps).clamp_min(0.0)
            else:
                g = g * torch.exp(self.sigma * eps)
        if self.stuck_fraction > 0:
            u, f = noise[2:4], self.stuck_fraction
            high = u < f * self.stuck_high
            g = torch.where(high, torch.full_like(g, self.g_max), g)
            g = torch.where(~high & (u < f), torch.full_like(g, self.g_min), g)
        if read is not None and self.read_noise > 0:
            g = g + (self.read_noise * self.g_max) * torch.randn(g.shape, generator=read, device=g.device,
                                                                 dtype=g.dtype)
        return g

    def apply(self, weight: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The chip's static weight (no read noise); differentiable in ``weight``."""
        return self.apply_read(weight, noise, None)

    def apply_read(self, weight: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The weight seen by one read: static deviations plus read noise drawn from ``generator``."""
        return from_conductance(self.conductances(weight, noise, generator), self.scale(weight),
                                self.g_min, self.g_max)

    # -- converters ------------------------------------------------------------------------------
    @property
    def reads(self) -> bool:
        return self.read_noise > 0

    @property
    def converts(self) -> bool:
        return self.dac_bits is not None or self.adc_bits is not None

    def dac(self, x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        return x if self.dac_bits is None else quantize_signal(x, self.dac_bits, dims)

    def adc(self, y: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        return y if self.adc_bits is None else quantize_signal(y, self.adc_bits, dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

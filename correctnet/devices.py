"""RRAM device models: conductance mapping, programming and read noise, stuck cells, levels, converters.

One variation model, ``rram`` (:class:`RRAM`), chains the stages below. Every stage but the mapping is
off at its default, so the presets in ``conf/variation/`` (``rram_wan2022``, ``rram_faulty``) pick and
compose them, and so does the command line, by overriding keys::

    python -m correctnet.train variation=rram_wan2022 variation.stuck_fraction=0.01 variation.levels=16
    python -m correctnet.train variation=rram_wan2022 variation.dac_bits=8 variation.adc_bits=8
    python -m correctnet.train -m variation=rram_wan2022 variation.t_eval=1,3600,86400

For one weight tensor ``W`` (shape ``[out, ...]``) of one chip; conductances ``G`` in µS:

1. mapping (differential pair): ``s = max|W|`` over the layer (``mapping=layer``) or over each output
   channel (``mapping=channel``), a constant of the chip (not differentiated);
   ``G+ = g_min + (g_max - g_min) * relu(W) / s``, ``G- = g_min + (g_max - g_min) * relu(-W) / s``.
2. levels (``levels=N``): each cell is programmed to the nearest of ``N`` evenly spaced conductances in
   ``[g_min, g_max]`` (straight-through gradient).
3. programming noise, static per chip (``programming=wan2022``, Wan et al., Nature 608, 2022, as fitted
   in IBM aihwkit's ``ReRamWan2022NoiseModel``), read ``t_eval`` seconds after programming:
   ``G_p = max(0, G + sigma * std_t(G) * eps)``, ``eps ~ N(0, 1)`` per cell, with
   ``std_t(G) = (g_max / 40 µS) * sum_i c_i(t) x^i`` µS, ``x = G / g_max`` (the fit's reference g_max is
   40 µS). At ``t_eval = 1`` (default) ``c = (0.348, 16.030, -43.853, 45.393, -16.815)``; aihwkit's fits
   for 1 day and 2 days are in :data:`WAN2022_FITS`. Between fitted times each ``c_i`` is interpolated
   linearly in ``log t``; beyond 2 days the 2-day fit is used (clamped); ``t_eval < 1`` is refused. The fit
   gives only the spread at each time (the mean stays the target, but for the clamp at 0), so aging is
   noise growth: a chip keeps its draw ``eps`` and its deviation from target grows with ``std_t``, which
   makes the aged chip a deterministic function of (chip seed, layer, t_eval). (aihwkit instead redraws
   the noise at each ``drift_weights`` call.) ``sigma`` is the scale factor of this noise: 1.0 = the
   measured device, 0 = exact programming. ``programming=lognormal`` uses CorrectNet's
   ``G_p = G * exp(sigma * eps)`` instead (``sigma`` then is the log-space std; ``t_eval`` must stay 1).
4. stuck cells, static per chip: each cell is stuck with probability ``stuck_fraction``, at ``g_max``
   for a fraction ``stuck_high`` of the stuck cells and at ``g_min`` for the others, whatever its target.
   One uniform draw ``u`` per cell decides (stuck high if ``u < f * h``, low if ``f * h <= u < f``), so
   the faulty set of a chip grows monotonically with ``f``.
5. read noise, drawn anew at every forward (every read of the array), on top of 3-4:
   ``G_r = G_p + read_noise * g_max * eps_r``, ``eps_r ~ N(0, 1)`` per cell and read; current noise,
   not clamped. One read serves a whole batch.
6. unmapping: ``W' = (G+_r - G-_r) * s / (g_max - g_min)``. Without noise, levels and faults ``W' = W``.
7. drift compensation (``drift_compensation=global``): ``W'' = alpha W'`` with
   ``alpha = mean|W| / mean|W'_static|`` over the layer, ``W'_static`` the chip's weight without read noise
   (detached, a constant of the chip). This is aihwkit's ``GlobalDriftCompensation`` readout (mean |output|
   over one-hot inputs) against the exact nominal reference (aihwkit's ``...WithExactReference``); it is
   applied as a scale of the read weight, i.e. before the ADC (aihwkit rescales digitally after it: the
   same with an auto-ranging ADC). It restores mean|W| exactly; the output gain only approximately, and it
   over-corrects when large zero-mean noise inflates mean|W'|.

Converters act on the analog layer's input and output (the digital bias is added after the ADC):

* DAC (``dac_bits=b``): each input vector (the last dimension for Linear, one sample's whole input map
  for conv) is scaled by its own ``max|x|`` (aihwkit's ``ABS_MAX`` input management) and rounded to the
  signed grid ``k / (2^(b-1) - 1)``, ``k`` integer; the scale is re-applied digitally.
* ADC (``adc_bits=b``): the same rule on the crossbar output ``W' x`` (per output vector / per sample):
  an ideal auto-ranging ADC whose full scale is the largest output of that vector. This is optimistic
  (real ADCs have a fixed range that clips or wastes levels): it measures resolution, not range.
* fixed DAC range (``dac_range=r``, default ``auto`` = the per-vector rule above): full scale
  ``X = r * R`` with ``R`` the layer's input range calibrated from data by
  :func:`correctnet.analog.calibrate_input_ranges` (nearest-rank percentile of per-vector ``max|x|``);
  inputs are clipped to ``[-X, X]`` and, with ``dac_bits``, rounded to ``k X / (2^(b-1) - 1)``.
* fixed ADC range (``adc_range=r``, default ``auto``): full scale ``Y = r * s * X`` with ``s`` the mapping's
  ``max|W|`` (per layer or per output channel, nominal) and ``X`` the DAC full scale of that vector: ``r = 1``
  is the output of one cell at ``g_max`` driven at full input, aihwkit's ``out_bound`` unit (its default is
  12). Outputs are clipped to ``[-Y, Y]`` and, with ``adc_bits``, rounded to ``k Y / (2^(b-1) - 1)``.
* output noise (``output_noise=f``): ``y + f * Y * eps_o`` per MVM output and read before the ADC,
  ``eps_o ~ N(0, 1)`` from the layer's read stream (reproducible per chip); with ``adc_range=auto``,
  ``Y`` is the vector's noiseless ``max|y|``. ``f = 0.005`` at ``r = 12`` is aihwkit's ``out_noise`` 0.06.

* tiles (``tile_rows=R``, ``tile_cols=C``, default null = one array per layer): a weight ``[out, in, *k]``
  is split into crossbar arrays of at most ``C`` outputs and ``R`` rows (a row per input and kernel
  position: ``R // prod(k)`` whole input channels per tile, ``R >= prod(k)``). Each tile has its own mapping
  scale ``s`` (its ``max|W|``, or per output row with ``mapping=channel``) and its own DAC (range over its
  input slice), output noise and ADC (full scale ``r * s_tile * X_tile``); the partial outputs of a
  column of tiles are summed digitally after their ADCs. Linear and ungrouped Conv layers only (attention
  in-projections and grouped convolutions refuse tiles when converting; recurrent layers get the per-tile
  mapping only, as they get no converters).

Rounding uses a straight-through gradient; clipping passes no gradient at or beyond the bounds (a range that requires
grad, a learned input range, gets PACT's ``sign(x)`` there: :mod:`correctnet.periphery`). In a layer's
``off`` mode nothing is applied (nominal, exact, no converters); in ``chip`` and ``noisy`` modes everything is. Sources: Wan et al., "A compute-in-memory chip
based on resistive random-access memory", Nature 608, 504-512 (2022); aihwkit (Rasch et al., APL Mach.
Learn. 2023); Joshi et al., Nat. Commun. 11, 2473 (2020) for read noise as a fraction of g_max.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence, cast

import torch

from .errors import ConfigError, is_int, is_number, require
from .variation import VariationModel

# aihwkit src/aihwkit/inference/noise/reram.py (ReRamWan2022NoiseModel.coeff_dic, commit 4545f11b), stored
# there highest power first and reversed; here in µS, powers x^0..x^4, keyed by seconds after programming.
WAN2022_FITS: dict[float, tuple[float, ...]] = {
    1.0: (0.348, 16.030, -43.853, 45.393, -16.815),            # 1 s
    86400.0: (0.701, 22.086, -50.773, 47.095, -16.458),        # 1 day
    172800.0: (0.782, 20.274, -43.507, 37.062, -11.934),       # 2 days
}
WAN2022_COEFFS: tuple[float, ...] = WAN2022_FITS[1.0]
WAN2022_G_MAX = 40.0  # µS, the g_max the coefficients were fitted for
MAPPINGS = ("layer", "channel")
PROGRAMMING = ("wan2022", "lognormal")
DRIFT_COMPENSATION = ("none", "global")


def wan2022_coeffs(t_eval: float = 1.0) -> tuple[float, ...]:
    """Polynomial coefficients (µS, powers x^0..x^4) of the programming-noise std ``t_eval`` s after programming.

    The fit covers 1 s, 1 day and 2 days. At a fitted time: that fit, exactly. Between two fitted times
    ``t0 < t < t1``: each coefficient linearly interpolated in ``log t``,
    ``c = (1 - a) c(t0) + a c(t1)``, ``a = (ln t - ln t0) / (ln t1 - ln t0)``. Before 1 s: the 1 s fit;
    after 2 days: the 2-day fit (clamped; no extrapolation).
    """
    times = sorted(WAN2022_FITS)
    if t_eval <= times[0]:
        return WAN2022_FITS[times[0]]
    if t_eval >= times[-1]:
        return WAN2022_FITS[times[-1]]
    if t_eval in WAN2022_FITS:
        return WAN2022_FITS[t_eval]
    t1 = next(t for t in times if t > t_eval)
    t0 = times[times.index(t1) - 1]
    a = (math.log(t_eval) - math.log(t0)) / (math.log(t1) - math.log(t0))
    return tuple((1 - a) * c0 + a * c1 for c0, c1 in zip(WAN2022_FITS[t0], WAN2022_FITS[t1]))


def wan2022_std(g: torch.Tensor, g_max: float, t_eval: float = 1.0) -> torch.Tensor:
    """Programming-noise std in µS at target conductance ``g`` (µS), ``t_eval`` s after programming.

    The Wan et al. 2022 polynomial of :func:`wan2022_coeffs` in ``x = g / g_max``, scaled by
    ``g_max / 40 µS`` (the fit's reference).
    """
    x = g / g_max
    c = wan2022_coeffs(t_eval)
    std = (x * c[-1]).add_(c[-2])  # Horner from the top (0 * x + c is c), in place: the same values, fewer passes
    for ci in reversed(c[:-2]):
        std.mul_(x).add_(ci)
    return std.mul_(g_max / WAN2022_G_MAX)


def channel_scale(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``max|W|`` (detached) over the layer, or per output channel (shape ``[out, 1, ...]``); never 0."""
    w = weight.detach().abs()
    s = w.amax(dim=tuple(range(1, w.dim())), keepdim=True) if per_channel and w.dim() > 1 else w.max()
    return s.clamp_min(torch.finfo(w.dtype).tiny)


def to_conductance(weight: torch.Tensor, scale: torch.Tensor, g_min: float, g_max: float) -> torch.Tensor:
    """Differential pair ``[G+, G-]`` in µS (shape ``[2, *weight.shape]``) for weights ``|W| <= scale``."""
    k = (g_max - g_min) / scale
    return torch.stack((weight, -weight)).relu_().mul(k).add_(g_min)  # g_min + k relu(+-W); autograd-safe in place


def from_conductance(g: torch.Tensor, scale: torch.Tensor, g_min: float, g_max: float) -> torch.Tensor:
    """Inverse of :func:`to_conductance`: ``W = (G+ - G-) * scale / (g_max - g_min)``."""
    return (g[0] - g[1]).mul_(scale / (g_max - g_min))


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def quantize_levels(g: torch.Tensor, levels: int, g_min: float, g_max: float) -> torch.Tensor:
    """Nearest of ``levels`` evenly spaced conductances in ``[g_min, g_max]`` (straight-through gradient)."""
    step = (g_max - g_min) / (levels - 1)
    gd = g.detach()
    q = ((gd - g_min) / step).round_().clamp_(0, levels - 1).mul_(step).add_(g_min)  # in place: the same values
    return g + q.sub_(gd)  # straight-through: the value of g + (q - g).detach(), the gradient of g


def quantize_signal(x: torch.Tensor, bits: int, dims: Sequence[int]) -> torch.Tensor:
    """Signed ``bits``-bit quantization with per-vector range ``max|x|`` over ``dims`` (straight-through)."""
    n = 2 ** (bits - 1) - 1
    s = x.detach().abs().amax(dim=tuple(dims), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    q = torch.round(x.detach() / s * n) * (s / n)
    return _straight_through(x, q)


def _scalar_bound(f: torch.Tensor) -> float | None:
    """``F`` as a Python float when it is one CPU value (clamping at a Python scalar is the faster kernel; the
    comparisons are exact either way), else None."""
    return float(f) if f.dim() == 0 and f.device.type == "cpu" else None


def _clip_round(x: torch.Tensor, f: torch.Tensor, bits: int | None) -> torch.Tensor:
    """``clip(x, -f, f)``, with ``bits`` rounded to ``k f / n``, without an autograd graph.

    The rounding ``round(c / f * n) * (f / n)`` runs in place on the clipped copy: the same operations in the same
    order as the straight-through form ``c + (round(c / f * n) * (f / n) - c)``, whose value it is bit for bit
    (``q - c`` is exact, Sterbenz)."""
    fv = _scalar_bound(f)
    c = x.clamp(-fv, fv) if fv is not None else torch.clamp(x, -f, f)
    if bits is not None:
        n = 2 ** (bits - 1) - 1
        c = c.div_(f).mul_(n).round_().mul_(f / n)
    return c


class _ClipQuantize(torch.autograd.Function):
    """``clip(x, -F, F)``, then (with ``bits``) rounding to ``k F / n``, as one autograd node (no per-op graph).

    Gradients: ``x`` gets ``grad`` where ``-F < x < F`` and 0 at or beyond the bounds (rounding is
    straight-through); ``F`` (when it requires grad, e.g. a learned input range) gets ``grad * sign(x)`` summed over
    the entries at or beyond the bounds (PACT), summed over the dimensions it was broadcast along."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, f: torch.Tensor, bits: int | None) -> torch.Tensor:
        ctx.save_for_backward(x, f)
        return _clip_round(x, f, bits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, f = ctx.saved_tensors
        gx = gf = None
        if ctx.needs_input_grad[0]:
            fv = _scalar_bound(f)
            gx = (torch.ops.aten.hardtanh_backward(grad, x, -fv, fv) if fv is not None
                  else grad * (x.abs() < f))
        if ctx.needs_input_grad[1]:
            g = grad * ((x >= f).to(grad.dtype) - (x <= -f).to(grad.dtype))
            gf = g.sum() if f.dim() == 0 else g.sum_to_size(f.shape)
        return gx, gf, None


class _ThroughSlope(torch.autograd.Function):
    """``value`` (computed without a graph) as a function of ``weight``, elementwise: the backward multiplies the
    incoming gradient by ``factors`` in order, then zeroes it outside ``mask`` (the order in which autograd
    multiplies through the stages of :meth:`RRAM.apply_read`, so the gradient is autograd's bit for bit)."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                *factors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask, *factors)
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mask, *factors = ctx.saved_tensors
        for f in factors:
            grad = grad * f
        return (grad.masked_fill(~mask, 0.0), None, None, *[None] * len(factors))


def clip_quantize(x: torch.Tensor, full_scale: torch.Tensor | float, bits: int | None) -> torch.Tensor:
    """Fixed-range converter: clip to ``[-F, F]`` (no gradient at or beyond the bounds),
    then, with ``bits``, round to the signed grid ``k F / (2^(bits-1) - 1)`` (straight-through). ``F`` broadcasts
    against ``x``; a ``F`` that requires grad (a learned range) gets the PACT gradient: ``sign(x)`` summed over the
    clipped entries, times the incoming gradient. One autograd node (:class:`_ClipQuantize`)."""
    f = torch.as_tensor(full_scale, dtype=x.dtype, device=x.device).clamp_min(torch.finfo(x.dtype).tiny)
    if not torch.is_grad_enabled() or not (x.requires_grad or f.requires_grad):
        return _clip_round(x, f, bits)
    return cast(torch.Tensor, _ClipQuantize.apply(x, f, bits))


def _abs_max(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    return x.detach().abs().amax(dim=tuple(dims), keepdim=True)


def _opt_range(key: str, v: Any) -> str | float:
    require(v == "auto" or (is_number(v) and v > 0), f"variation.{key}", "'auto' or a number > 0", v)
    return v if v == "auto" else float(v)


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
    t_eval: float = 1.0              # s after programming at which the chip is read (Wan 2022 fits: 1 s-2 days)
    drift_compensation: str = "none"  # none | global: rescale each layer by nominal / aged mean |W|
    dac_range: Any = "auto"          # auto (per-vector max|x|) | r > 0: clip at r * the layer's calibrated range
    adc_range: Any = "auto"          # auto (per-vector max|y|) | r > 0: clip at r * max|W| * DAC full scale
    output_noise: float = 0.0        # std of additive noise per MVM output and read, fraction of the ADC full scale
    tile_rows: int | None = None     # max rows (inputs x kernel positions) per crossbar array; null = one array
    tile_cols: int | None = None     # max outputs per crossbar array; null = one array
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
        require(is_number(self.t_eval) and self.t_eval >= 1, "variation.t_eval",
                "a number >= 1 (seconds after programming; the Wan 2022 fits start at 1 s)", self.t_eval)
        set_("t_eval", float(self.t_eval))
        require(self.t_eval == 1 or self.programming == "wan2022", "variation.t_eval",
                "1 with variation.programming=lognormal (only the wan2022 fit depends on time)", self.t_eval)
        require(self.drift_compensation in DRIFT_COMPENSATION, "variation.drift_compensation",
                f"one of {list(DRIFT_COMPENSATION)}", self.drift_compensation)
        set_("dac_range", _opt_range("dac_range", self.dac_range))
        set_("adc_range", _opt_range("adc_range", self.adc_range))
        require(is_number(self.output_noise) and self.output_noise >= 0, "variation.output_noise",
                "a number >= 0 (fraction of the ADC full scale)", self.output_noise)
        set_("output_noise", float(self.output_noise))
        set_("tile_rows", _opt_int("tile_rows", self.tile_rows, 1))
        set_("tile_cols", _opt_int("tile_cols", self.tile_cols, 1))

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)  # frozen dataclass: normalise validated values

    # -- static part of a chip -------------------------------------------------------------------
    def sample(self, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Programming draws ``N(0, 1)`` then, with faults, uniform fault draws: ``[2 or 4, *weight.shape]``."""
        kw: dict[str, Any] = dict(generator=generator, device=weight.device, dtype=weight.dtype)
        eps = torch.randn((2, *weight.shape), **kw)
        if self.stuck_fraction == 0:
            return eps
        return torch.cat((eps, torch.rand((2, *weight.shape), **kw)))

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The mapping's ``max|W|`` (layer scalar or ``[out, 1, ...]``; tiled: per tile, shaped like ``weight``), detached."""
        tiles = self.tiles(weight.shape)
        if tiles is None:
            return channel_scale(weight, self.mapping == "channel")
        s = torch.empty_like(weight, requires_grad=False)
        for o in tiles[0]:
            for i in tiles[1]:
                s[o, i] = channel_scale(weight[o, i], self.mapping == "channel")
        return s

    def tiles(self, shape: Sequence[int]) -> tuple[list[slice], list[slice]] | None:
        """Crossbar tiles of a weight ``[out, in, *kernel]``: slices of ``out`` and of ``in``; None for one tile.

        A tile holds at most ``tile_cols`` outputs and ``tile_rows`` rows, a row per input and kernel
        position, so it takes ``tile_rows // prod(kernel)`` whole input channels (conv) or ``tile_rows``
        inputs (Linear).
        """
        if (self.tile_rows is None and self.tile_cols is None) or len(shape) < 2:
            return None
        per_channel = math.prod(shape[2:])
        if self.tile_rows is not None and self.tile_rows < per_channel:
            raise ConfigError(f"variation.tile_rows must be >= {per_channel} (the rows of one input channel's kernel "
                              f"{tuple(shape[2:])}), got {self.tile_rows}")
        rows = shape[1] if self.tile_rows is None else self.tile_rows // per_channel
        cols = shape[0] if self.tile_cols is None else self.tile_cols
        if rows >= shape[1] and cols >= shape[0]:
            return None
        return ([slice(a, min(a + cols, shape[0])) for a in range(0, shape[0], cols)],
                [slice(a, min(a + rows, shape[1])) for a in range(0, shape[1], rows)])

    def conductances(self, weight: torch.Tensor, noise: torch.Tensor,
                     read: torch.Generator | None = None) -> torch.Tensor:
        """``[G+, G-]`` in µS as read once (shape ``[2, *weight.shape]``); read noise only with ``read``."""
        return self._read(self._static_conductances(weight, noise), read)

    def _static_conductances(self, weight: torch.Tensor, noise: torch.Tensor,
                             slope: dict[str, torch.Tensor] | None = None,
                             s: torch.Tensor | None = None) -> torch.Tensor:
        """``[G+, G-]`` of the chip (no read noise). With ``slope`` (a dict, filled in): what autograd's gradient
        through these stages is made of: ``k`` (the mapping's ``(g_max - g_min) / s``), ``alive`` (per cell, bool
        ``[2, *weight.shape]``: not clamped at 0 µS, not stuck) and, for log-normal programming, ``factor`` (per
        cell, ``exp(sigma * eps)``). Levels are straight-through; the scale and the noise std are constants.
        ``s``: :meth:`scale` of ``weight`` when the caller has it."""
        s = self.scale(weight) if s is None else s
        g = to_conductance(weight, s, self.g_min, self.g_max)
        alive: torch.Tensor | None = None
        if slope is not None:
            slope["k"] = (self.g_max - self.g_min) / s
        if self.levels is not None:
            g = quantize_levels(g, self.levels, self.g_min, self.g_max)
        eps = noise[:2]
        if self.sigma > 0:
            if self.programming == "wan2022":
                pre = g + wan2022_std(g.detach(), self.g_max, self.t_eval).mul_(self.sigma).mul_(eps)  # sigma*std*eps
                if slope is not None:
                    alive = pre >= 0
                g = pre.clamp_min(0.0) if pre.requires_grad else pre.clamp_min_(0.0)
            else:
                factor = torch.exp(self.sigma * eps)
                g = g * factor
                if slope is not None:
                    slope["factor"] = factor
        if self.stuck_fraction > 0:
            u, f = noise[2:4], self.stuck_fraction
            high = u < f * self.stuck_high
            low = ~high & (u < f)
            g = torch.where(high, torch.full_like(g, self.g_max), g)
            g = torch.where(low, torch.full_like(g, self.g_min), g)
            if slope is not None:
                alive = ~(high | low) if alive is None else alive & ~(high | low)
        if slope is not None and alive is not None:
            slope["alive"] = alive
        return g

    def _read(self, g: torch.Tensor, read: torch.Generator | None) -> torch.Tensor:
        if read is not None and self.read_noise > 0:
            g = g + (self.read_noise * self.g_max) * torch.randn(g.shape, generator=read, device=g.device,
                                                                 dtype=g.dtype)
        return g

    def apply(self, weight: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The chip's static weight (no read noise); differentiable in ``weight``."""
        return self.apply_read(weight, noise, None)

    def apply_read(self, weight: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The weight seen by one read: static deviations plus read noise drawn from ``generator``.

        Differentiable in ``weight``: when a gradient is needed the read is computed without an autograd graph and
        joined to ``weight`` by one node whose backward multiplies by the elementwise ``dW'/dW`` factors (drift
        factor, unmapping scale, log-normal factor, mapping slope; zero where the driven cell is clamped at 0 µS or
        stuck, and for ``W = 0``) in the order autograd would through the chain of stages, so the gradient is
        autograd's bit for bit while a noise-aware step costs one node per weight instead of one per stage."""
        if torch.is_grad_enabled() and weight.requires_grad:
            slope: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                value = self._read_weight(weight, noise, generator, slope)
                pos = weight > 0  # the cell a weight drives: G+ for W > 0, G- for W < 0 (none for W = 0)
                mask = weight != 0
                if "alive" in slope:
                    mask &= torch.where(pos, slope["alive"][0], slope["alive"][1])
                # autograd's order: drift factor, unmapping scale, log-normal factor, mapping slope k
                factors = [slope[k] for k in ("alpha", "unmap") if k in slope]
                if "factor" in slope:
                    factors.append(torch.where(pos, slope["factor"][0], slope["factor"][1]))
                factors.append(slope["k"])
            return cast(torch.Tensor, _ThroughSlope.apply(weight, value, mask, *factors))
        return self._read_weight(weight, noise, generator, None)

    def _read_weight(self, weight: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None,
                     slope: dict[str, torch.Tensor] | None) -> torch.Tensor:
        s = self.scale(weight)
        g = self._static_conductances(weight, noise, slope, s)
        w = from_conductance(self._read(g, generator), s, self.g_min, self.g_max)
        if slope is not None:
            slope["unmap"] = s / (self.g_max - self.g_min)
        if self.drift_compensation == "global":
            alpha = self.drift_factor(weight, from_conductance(g.detach(), s, self.g_min, self.g_max))
            w = w * alpha
            if slope is not None:
                slope["alpha"] = alpha
        return w

    @staticmethod
    def drift_factor(weight: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """Global drift compensation ``alpha = mean|W| / mean|W'|`` over the layer (detached scalar).

        ``W'`` is the chip's static weight (no read noise): aihwkit's ``GlobalDriftCompensation`` readout
        (mean |output| over one-hot inputs = mean |W'|) against the exact nominal reference.
        """
        ref = weight.detach().abs().sum()
        return ref / static.abs().sum().clamp_min(torch.finfo(static.dtype).tiny)

    # -- converters ------------------------------------------------------------------------------
    @property
    def reads(self) -> bool:
        return self.read_noise > 0

    @property
    def converts(self) -> bool:
        return self.dac_bits is not None or self.adc_bits is not None or not self._ideal_ranges

    @property
    def _ideal_ranges(self) -> bool:
        return self.dac_range == "auto" and self.adc_range == "auto" and self.output_noise == 0

    @property
    def needs_input_range(self) -> bool:
        return self.dac_range != "auto"

    def weight_scale(self, weight: torch.Tensor) -> torch.Tensor:
        return self.scale(weight)

    def convert(self, mvm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dims: Sequence[int], *,
                weight_scale: torch.Tensor | None = None, input_range: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """DAC, crossbar ``mvm``, output noise, ADC; see the module docstring for the ranges.

        ``weight_scale``: the mapping's ``max|W|`` broadcastable to the output; ``input_range``: the
        layer's calibrated input range (needed when ``dac_range`` is a number); ``generator``: the read stream.
        """
        if self._ideal_ranges:
            return self.adc(mvm(self.dac(x, dims)), dims)
        if self.dac_range == "auto":
            x_fs: torch.Tensor | float = _abs_max(x, dims)
            xq = self.dac(x, dims)
        else:
            if input_range is None:
                raise ConfigError(f"variation.dac_range={self.dac_range:g} needs a calibrated input range "
                                  f"(correctnet.analog.calibrate_input_ranges)")
            x_fs = self.dac_range * input_range
            xq = clip_quantize(x, x_fs, self.dac_bits)
        y = mvm(xq)
        if self.adc_range == "auto":
            full = _abs_max(y, dims)
        else:
            s = weight_scale if weight_scale is not None else torch.ones((), dtype=y.dtype, device=y.device)
            full = self.adc_range * s.detach() * x_fs
        if self.output_noise > 0 and generator is not None:
            eps = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            sd = self.output_noise * full
            y = y + (eps.mul_(sd) if not (isinstance(sd, torch.Tensor) and sd.requires_grad) else sd * eps)
        if self.adc_range == "auto":
            return self.adc(y, dims)
        return clip_quantize(y, full, self.adc_bits)

    def dac(self, x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        return x if self.dac_bits is None else quantize_signal(x, self.dac_bits, dims)

    def adc(self, y: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
        return y if self.adc_bits is None else quantize_signal(y, self.adc_bits, dims)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

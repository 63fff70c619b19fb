"""Error compensation: small *digital* modules beside analog layers that learn to correct their errors.

A :class:`Compensator` sits inside an analog layer (as its ``compensator`` submodule) and turns the
layer's analog output ``y`` (``[N, out]`` or ``[N, out, *spatial]``) into ``y + correction``:

* ``kind="input"``: a low-rank branch from the layer's input ``x``: ``up(down(x))``, ``down`` having the
  layer's own geometry (kernel, stride, padding) with ``rank`` outputs and ``up`` a 1x1 map to the
  layer's outputs. It can learn chip errors that depend on ``x`` (``(W - W') x`` projected on ``rank``
  directions).
* ``kind="output"``: a low-rank branch on the noisy output itself: ``up(down(y))`` with 1x1 maps
  ``out -> rank -> out``. It only sees what survived the analog layer.

Both add, with ``affine=True``, a per-output-channel scale and shift ``gamma * y + beta`` (2 parameters
per channel), which can undo the bias of log-normal variation (``E[w'] = exp(sigma^2/2) w``).
Every last map (``up``, ``gamma``, ``beta``) starts at zero, so a fresh compensator is an exact no-op.

Without gradients (evaluation) an ``output`` compensator runs as one folded 1x1 map,
``y -> (diag(1 + gamma) + up @ down) y + beta``: the same function (equal up to float round-off) in one
pass over the feature map instead of five, which matters most in the channels-last layout the
Monte-Carlo evaluation uses. Training and :func:`overhead` use the factorized modules, whose sizes are
the hardware the overhead counts.

The modules are digital: they are not stored in the RRAM array and no variation reaches them. Their cost
is counted by :func:`overhead`. A *placement* maps layer names to ranks (``{"fc1": 4, "conv2": 2}``).
Training on sampled chips lives in :mod:`correctnet.calibration`.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
from typing import Any, Callable, Iterable, Iterator, Mapping, cast

import torch
import torch.nn.functional as F
from torch import nn

from .analog import analog_layers
from .errors import ConfigError
from .seeding import layer_generator

KINDS = ("input", "output")
_Map = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d  # a compensator's down/up maps
# Callable[...]: the stubs of Conv1d/2d/3d() want _size_1/2/3_t; an analog layer's geometry is typed tuple[int, ...]
_CONV: dict[int, Callable[..., _Map]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_FOLDED: dict[int, Callable[..., torch.Tensor]] = {0: F.linear, 1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Compensator(nn.Module):
    """Digital correction for one analog layer; ``forward(x, y) -> y + correction`` (shape of ``y``)."""

    def __init__(self, layer: nn.Module, *, kind: str = "output", rank: int = 4, affine: bool = True) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"compensation kind must be one of {list(KINDS)}, got {kind!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"compensation rank must be an integer >= 0, got {rank!r}")
        if rank == 0 and not affine:
            raise ConfigError("a compensator with rank 0 and affine=false would do nothing")
        self.kind, self.rank, self.affine = kind, rank, affine
        self.active = True
        self.use_rank: int | None = None  # None: all `rank` components; k: the first k only (a placement search's option)
        self._fold = True  # fold into one map when no gradients are needed (see the module docstring)
        if isinstance(layer, nn.Linear):
            out_ch, in_ch = layer.out_features, layer.in_features
            self.conv_dims = 0
        elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out_ch, in_ch = layer.out_channels, layer.in_channels
            self.conv_dims = len(layer.kernel_size)
        else:
            raise ConfigError(f"cannot compensate a {type(layer).__name__}; only Linear and Conv layers")
        self.out_channels = out_ch
        if rank > 0:
            if self.conv_dims == 0:
                self.down: _Map = nn.Linear(in_ch if kind == "input" else out_ch, rank, bias=False)
                self.up: _Map = nn.Linear(rank, out_ch, bias=False)
            else:
                conv = _CONV[self.conv_dims]
                if kind == "input":  # same receptive field and output grid as the analog layer
                    self.down = conv(in_ch, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                                     dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode)
                else:
                    self.down = conv(out_ch, rank, 1, bias=False)
                self.up = conv(rank, out_ch, 1, bias=False)
            nn.init.zeros_(self.up.weight)
        if affine:
            self.gamma = nn.Parameter(torch.zeros(out_ch))
            self.beta = nn.Parameter(torch.zeros(out_ch))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Back to a no-op: ``up``, ``gamma``, ``beta`` zero, ``down`` re-drawn (Kaiming-uniform)."""
        if any(p.is_meta for p in self.parameters()):
            return  # shapes only (checkpoint checks)
        with torch.no_grad():
            if self.rank > 0:
                w = self.down.weight
                bound = (1.0 / w[0].numel()) ** 0.5  # = kaiming_uniform(a=sqrt(5)), nn.Linear's default
                w.copy_(torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype) * 2 * bound - bound)
        self.zero_()

    def zero_(self) -> "Compensator":
        """Make it a no-op by zeroing its last maps (``up``, ``gamma``, ``beta``); ``down`` is kept."""
        with torch.no_grad():
            if self.rank > 0:
                self.up.weight.zero_()
            if self.affine:
                self.gamma.zero_()
                self.beta.zero_()
        return self

    def _channel(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # per-channel vector -> broadcastable against y ([N, C] or [N, C, *spatial])
        return v.view(-1, *([1] * (y.dim() - 2))) if self.conv_dims else v

    @property
    def effective_rank(self) -> int:
        """Low-rank components in use: ``rank``, or the first ``use_rank`` of them."""
        return self.rank if self.use_rank is None else min(self.use_rank, self.rank)

    def set_option(self, rank: int | None) -> None:
        """Switch to one option of a placement search: None = off, ``k`` = affine plus the first ``k``
        low-rank components (``0 <= k <= rank``; 0 needs ``affine``)."""
        if rank is None:
            self.active = False
            return
        self._check_option(rank)
        self.active, self.use_rank = True, rank

    def _check_option(self, rank: int) -> None:
        if not 0 <= rank <= self.rank or (rank == 0 and not self.affine):
            raise ConfigError(f"compensator option rank {rank} is not within this compensator (rank {self.rank}, "
                              f"affine={self.affine})")

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An ``output`` compensator as one map: weight ``[out, out, 1, ...]`` (``[out, out]`` for Linear)
        and bias ``[out]`` (None without ``affine``), so that ``forward(x, y) = map(y)``."""
        if self.kind != "output":
            raise ConfigError("only output compensators fold into one map (input ones read the layer's input)")
        ref = next(self.parameters())
        scale = torch.ones(self.out_channels, device=ref.device, dtype=ref.dtype)
        w = torch.diag(scale + self.gamma if self.affine else scale)
        k = self.effective_rank
        if k > 0:
            w = w + self.up.weight.flatten(1)[:, :k] @ self.down.weight.flatten(1)[:k]
        return w.view(*w.shape, *([1] * self.conv_dims)), (self.beta if self.affine else None)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return y
        k = self.effective_rank
        if self._fold and self.kind == "output" and k > 0 and not torch.is_grad_enabled():
            w, b = self.folded()
            return _FOLDED[self.conv_dims](y, w, b)
        out = y
        if self.affine:
            out = out + self._channel(self.gamma, y) * y + self._channel(self.beta, y)
        if k == self.rank and k > 0:
            out = out + self.up(self.down(x if self.kind == "input" else y))
        elif k > 0:  # the first k components: rows of down, columns of up (1x1 / Linear up maps)
            h = self.down(x if self.kind == "input" else y)
            h = h[..., :k] if self.conv_dims == 0 else h[:, :k]  # Linear: features last ([N, ..., rank])
            out = out + _FOLDED[self.conv_dims](h, self.up.weight[:, :k])
        return out

    def shrunk(self, rank: int) -> "Compensator":
        """A standalone compensator of rank ``rank`` holding this one's affine part and first ``rank``
        low-rank components: what deploying option ``rank`` of a placement search puts on the chip."""
        self._check_option(rank)
        new = copy.deepcopy(self)
        new.rank, new.use_rank, new.active = rank, None, True
        with torch.no_grad():
            if rank == 0 and self.rank > 0:
                del new.down, new.up
            elif 0 < rank < self.rank:
                new.down.weight = nn.Parameter(self.down.weight[:rank].clone())
                new.up.weight = nn.Parameter(self.up.weight[:, :rank].clone())
                if isinstance(new.down, nn.Linear) and isinstance(new.up, nn.Linear):
                    new.down.out_features = new.up.in_features = rank
                elif not isinstance(new.down, nn.Linear) and not isinstance(new.up, nn.Linear):
                    new.down.out_channels = new.up.in_channels = rank
        return new

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "affine": self.affine}

    def extra_repr(self) -> str:
        use = "" if self.use_rank is None else f", use_rank={self.use_rank}"
        return f"kind={self.kind}, rank={self.rank}, affine={self.affine}, active={self.active}{use}"


# ----------------------------------------------------------------------------- placement

def resolve_placement(model: nn.Module, placement: Mapping[str, int] | Iterable[str] | str,
                      rank: int = 4) -> dict[str, int]:
    """Normalise a placement to ``{layer name: rank}`` over the compensable analog layers of ``model``.

    Accepts ``"all"``, ``"none"``, a list of names or glob patterns (each gets ``rank``), or a mapping
    ``{name or pattern: rank}``. Every pattern must match an analog layer that can carry a compensator
    (``AnalogLayer.can_compensate``: Linear and Conv layers, attention ``out_proj`` included; not the
    attention or recurrent modules, whose forward would not run one): a pattern matching only other
    analog layers is an error naming them; a glob matching both keeps the compensable ones.
    """
    analog = analog_layers(model)
    if not analog:
        raise ConfigError(f"{type(model).__name__} has no analog layers; call correctnet.analogize(model, variation) first")
    layers = [n for n, l in analog.items() if l.can_compensate]
    if isinstance(placement, str):
        if placement == "all":
            return {n: rank for n in layers}
        if placement == "none":
            return {}
        placement = [placement]
    items = placement.items() if isinstance(placement, Mapping) else ((p, rank) for p in placement)
    out: dict[str, int] = {}
    for pattern, r in items:
        if not isinstance(pattern, str):
            raise ConfigError(f"placement entries must be layer names, got {pattern!r}")
        matched = [n for n in layers if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            others = [f"{n} ({type(l).__name__})" for n, l in analog.items() if fnmatch.fnmatchcase(n, pattern)]
            if others:
                raise ConfigError(f"placement {pattern!r} names analog layers that cannot carry a compensator "
                                  f"(their forward would not run it): {others}; layers that can: {layers}")
            raise ConfigError(f"placement {pattern!r} matches no analog layer; analog layers: {layers}")
        for n in matched:
            out[n] = r
    return {n: out[n] for n in layers if n in out}  # module order


def attach_compensation(model: nn.Module, placement: Mapping[str, int] | Iterable[str] | str, *,
                        kind: str = "output", rank: int = 4, affine: bool = True, seed: int = 0
                        ) -> dict[str, Compensator]:
    """Attach a fresh (no-op) compensator to each placed analog layer of ``model``, in place.

    ``placement``: see :func:`resolve_placement`. ``down`` maps are initialised from ``seed`` and the
    layer name, so the same call gives the same modules. Returns the new modules by layer name.
    """
    ranks = resolve_placement(model, placement, rank)
    layers = analog_layers(model)
    taken = [n for n in ranks if "compensator" in layers[n]._modules]
    if taken:
        raise ConfigError(f"layers {taken} already have a compensator; detach_compensation first")
    made: dict[str, Compensator] = {}
    for name, r in ranks.items():
        layer = layers[name]
        comp = Compensator(layer, kind=kind, rank=r, affine=affine)
        comp.reset_parameters(layer_generator(seed, "compensator:" + name))
        p = layer.nominal()  # a Linear or Conv layer: Compensator() accepted it
        layer.compensator = comp.to(device=p.device, dtype=p.dtype)
        made[name] = layer.compensator
    return made


def attach_from_spec(model: nn.Module, spec: Mapping[str, Mapping[str, Any]]) -> dict[str, Compensator]:
    """Attach compensators described by :func:`compensation_spec` (e.g. read from a checkpoint)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a compensation spec maps layer names to {{kind, rank, affine}}, got {spec!r}")
    made: dict[str, Compensator] = {}
    for name, s in spec.items():
        if not isinstance(s, Mapping) or "rank" not in s or set(s) - {"kind", "rank", "affine"}:
            raise ConfigError(f"compensation spec for {name!r} must be {{kind, rank, affine}}, got {s!r}")
        s = dict(s)
        made |= attach_compensation(model, {name: s.pop("rank")}, **s)
    return made


def detach_compensation(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Compensator]:
    """Remove compensators (all, or those of ``names``); returns the removed modules."""
    comps = compensators(model)
    names = list(comps) if names is None else list(names)
    missing = [n for n in names if n not in comps]
    if missing:
        raise ConfigError(f"layers {missing} have no compensator; compensated layers: {list(comps)}")
    layers = analog_layers(model)
    return {n: cast(Compensator, layers[n]._modules.pop("compensator")) for n in names}


def keep_compensation(model: nn.Module, ranks: Mapping[str, int]) -> dict[str, Compensator]:
    """Cut ``model``'s compensators to ``ranks`` (``{layer: rank}``), in place: the others are removed, each kept
    one is replaced by its first ``rank`` components (:meth:`Compensator.shrunk`). Deploys a placement
    search's choice from a supernet's compensators. Returns the kept modules."""
    comps = compensators(model)
    missing = [n for n in ranks if n not in comps]
    if missing:
        raise ConfigError(f"layers {missing} have no compensator to keep; compensated layers: {list(comps)}")
    layers = analog_layers(model)
    for n, c in comps.items():
        if n in ranks:
            layers[n].compensator = c.shrunk(ranks[n])
        else:
            del layers[n]._modules["compensator"]
    return compensators(model)


def compensators(model: nn.Module) -> dict[str, Compensator]:
    """The compensators of ``model`` by the name of the layer they belong to, in module order."""
    return {n: cast(Compensator, l._modules["compensator"]) for n, l in analog_layers(model).items()
            if l._modules.get("compensator") is not None}


def compensation_spec(model: nn.Module) -> dict[str, dict[str, Any]] | None:
    """``{layer: {"kind", "rank", "affine"}}`` of the attached compensators, or None when there are none."""
    comps = compensators(model)
    return {n: c.spec() for n, c in comps.items()} or None


def compensation_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for c in compensators(model).values() for p in c.parameters()]


@contextlib.contextmanager
def bypass(model: nn.Module) -> Iterator[nn.Module]:
    """``with bypass(model):`` compensators pass their input through (the uncompensated network)."""
    comps = list(compensators(model).values())
    saved = [c.active for c in comps]
    for c in comps:
        c.active = False
    try:
        yield model
    finally:
        for c, a in zip(comps, saved):
            c.active = a


# ----------------------------------------------------------------------------- overhead

def layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one Linear/Conv call that produced ``out`` (batch included)."""
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    conv = cast("nn.Conv1d | nn.Conv2d | nn.Conv3d", module)  # not a Linear: a Conv layer
    k = 1
    for s in conv.kernel_size:
        k *= s
    return out.numel() * (conv.in_channels // conv.groups) * k


def overhead(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Extra digital parameters and MACs of the compensators, absolute and in % of the network's.

    ``example``: one input batch ``[1, C, H, W]`` (MACs are per sample). The network's parameters are all
    parameters outside compensators; its MACs are those of its Linear/Conv layers and of the analog
    MVMs of attention in-projections and recurrent layers (``mvm_macs``). A compensator's MACs are those
    of its ``down``/``up`` maps plus one per output element for the affine scale. Its parameters are its
    ``down``/``up`` weights and ``gamma``; its shift ``beta`` counts too, unless the layer has a bias: the
    bias is digital and added before the compensator, whose output is then a linear map of the analog output
    plus one constant per channel (``(1 + gamma) b + beta``, with an output branch ``+ up(down(b))``), so
    one register per channel holds both, as the bias alone did. Only compensators that
    run in the forward of ``example`` are counted: one that does not run costs 0 params and 0 MACs.
    Returns ``{"network": {params, macs}, "layers": {name: {params, macs, params_pct, macs_pct}},
    "total": {params, macs, params_pct, macs_pct}}``.
    """
    comps = compensators(model)
    layers_of = analog_layers(model)
    comp_params = {id(p) for c in comps.values() for p in c.parameters()}
    net_params = sum(p.numel() for p in model.parameters() if id(p) not in comp_params)
    owner = {m: n for n, c in comps.items() for m in c.modules()}
    macs: dict[str, int] = {"network": 0, **{n: 0 for n in comps}}
    n_batch = example.shape[0]

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        name = owner.get(module, "network")
        macs[name] += layer_macs(module, out) // n_batch

    ran: set[str] = set()

    def affine_hook(module: Compensator, args: tuple, out: torch.Tensor) -> None:
        ran.add(owner[module])
        if module.affine:
            macs[owner[module]] += out.numel() // n_batch

    def mvm_hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        # only layers with an mvm_macs method get this hook; Module.__getattr__'s stub types it Tensor | Module
        macs["network"] += module.mvm_macs(args, kwargs, out) // n_batch  # type: ignore[operator]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    handles += [c.register_forward_hook(affine_hook) for c in comps.values()]
    handles += [m.register_forward_hook(mvm_hook, with_kwargs=True) for m in analog_layers(model).values()
                if hasattr(m, "mvm_macs")]
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for c in comps.values():
            c._fold = False  # count the factorized modules: they are the hardware
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
        for c in comps.values():
            c._fold = True
    net_macs = macs.pop("network")
    layers = {}
    for n, c in comps.items():
        folds = c.affine and isinstance(getattr(layers_of[n], "bias", None), nn.Parameter)  # beta joins the bias
        p = sum(q.numel() for q in c.parameters()) - (c.beta.numel() if folds else 0) if n in ran else 0
        layers[n] = {"params": p, "macs": macs[n], "params_pct": 100 * p / max(net_params, 1),
                     "macs_pct": 100 * macs[n] / max(net_macs, 1)}
    tp, tm = sum(v["params"] for v in layers.values()), sum(v["macs"] for v in layers.values())
    return {"network": {"params": net_params, "macs": net_macs}, "layers": layers,
            "total": {"params": tp, "macs": tm, "params_pct": 100 * tp / max(net_params, 1),
                      "macs_pct": 100 * tm / max(net_macs, 1)}}


__all__ = ["KINDS", "Compensator", "attach_compensation", "attach_from_spec", "bypass", "compensation_parameters",
           "compensation_spec", "compensators", "detach_compensation", "keep_compensation", "overhead",
           "resolve_placement"]

"""Reference models (LeNet-5, a configurable VGG, an MLP, a CIFAR-style ResNet-20, a small ViT), models built from a
user's class or factory function by import path (Hydra's ``_target_`` convention) and from the model zoos (timm's
``create_model``, a transformers model built from a config: :func:`hf_model`). Plain ``nn.Module``s, nothing
analog here.

Image models take ``[N, C, H, W]`` float tensors; the MLP takes any ``[N, *features]``; outputs are
``[N, num_classes]`` logits.

User models (:func:`build_target`, used by ``python -m correctnet.train model=custom model._target_=...``):
the target is ``"pkg.module.Class"`` or ``"pkg.module:Outer.Inner"`` (a class or a function returning an
``nn.Module``), importable from ``sys.path`` (``PYTHONPATH`` or an installed package). It is called with the
configured keyword arguments plus, for each name of :data:`INJECTED` (``num_classes``, ``num_labels``,
``in_channels``, ``in_chans``, ``num_channels``, ``image_size``, ``input_shape``, ``in_features``) that its
signature names explicitly and that the configuration does not set, the value the dataset implies (the channel
counts and ``image_size`` only for ``[C, H, W]`` inputs, ``image_size`` only when square). A key of these set to
``null`` in the configuration is filled the same way, whatever the signature says (``model=timm``: timm's
``create_model`` takes them through ``**kwargs``). A keyword argument that is a mapping with a ``_target_`` is
built the same way first (a sub-module, e.g. a backbone). :func:`check_fits` runs one dataset sample through the
model before training: a model whose input channels or class count do not fit the data is one
:class:`ConfigError` naming the key to set.

The zoos are optional extras, imported only when a target names them: ``pip install 'correctnet[timm]'``,
``pip install 'correctnet[hf]'`` (transformers).

Trust (targets read from a file, ``from_file=True``): importing a module runs its top-level code, so a target
from a checkpoint is imported only from a trusted module (:func:`is_trusted`): correctnet's own, the zoos
(:data:`TRUSTED_MODULES`), modules already imported in this process (``sys.modules``: nothing runs), and those the
caller names, ``trust=["mypkg"]`` (names or prefixes: ``"mypkg"`` covers ``mypkg.nets``) or ``trust=True`` (any).
Anything else is an :class:`UntrustedModuleError` naming the module, before it is imported.
"""
from __future__ import annotations

import importlib
import inspect
import math
import sys
from typing import Any, Callable, Mapping, Sequence, Union, cast

import torch
from torch import nn

from .errors import ConfigError

VGG_CONFIGS: dict[str, list[int | str]] = {  # numbers: conv output channels at width 1; "M": 2x2 max-pool
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class LeNet5(nn.Module):
    """LeNet-5 (ReLU, max-pool). For 28x28/32x32 inputs the classic 5x5 convs; for 8x8 inputs (digits)
    3x3 convs with padding. 5 weight layers: conv1, conv2, fc1, fc2, fc3."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10):
        super().__init__()
        if image_size >= 28:
            k, pad1 = 5, 2 if image_size == 28 else 0
            self.conv1 = nn.Conv2d(in_channels, 6, k, padding=pad1)
            self.conv2 = nn.Conv2d(6, 16, k)
            side = ((image_size + 2 * pad1 - 4) // 2 - 4) // 2
        elif image_size >= 8:
            self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
            self.conv2 = nn.Conv2d(6, 16, 3, padding=1)
            side = image_size // 4
        else:
            raise ConfigError(f"LeNet5 needs image_size >= 8, got {image_size}")
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = x.flatten(1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


class VGG(nn.Module):
    """VGG with the classic layer configurations, scaled by ``width`` (channels = round(c * width)).

    Max-pools are skipped once the feature map is 1 pixel wide, so small inputs (28x28) work.
    The classifier has ``fc_layers`` Linear layers (3 as in the original: vgg16 = 13 conv + 3 fc).
    """

    def __init__(self, config: str = "vgg11", in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
                 width: float = 1.0, batch_norm: bool = True, fc_layers: int = 3, fc_width: int = 512):
        super().__init__()
        if config not in VGG_CONFIGS:
            raise ConfigError(f"model.config must be one of {sorted(VGG_CONFIGS)}, got {config!r}")
        if not width > 0:
            raise ConfigError(f"model.width must be > 0, got {width!r}")
        if fc_layers < 1:
            raise ConfigError(f"model.fc_layers must be >= 1, got {fc_layers!r}")
        layers: list[nn.Module] = []
        c, side = in_channels, image_size
        for v in VGG_CONFIGS[config]:
            if v == "M":
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            out = max(1, round(int(v) * width))
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        hidden = max(1, round(fc_width * width))
        dims = [c * side * side] + [hidden] * (fc_layers - 1) + [num_classes]
        fc: list[nn.Module] = []
        for i in range(fc_layers):
            fc.append(nn.Linear(dims[i], dims[i + 1]))
            if i < fc_layers - 1:
                fc.append(nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Fully connected network: flatten, then Linear+ReLU per hidden size, then a Linear to the classes."""

    def __init__(self, in_features: int, num_classes: int = 10, hidden: Sequence[int] = (256, 128)):
        super().__init__()
        dims = [in_features, *hidden, num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm; the skip is the identity, option A (subsample + zero channels) or B (1x1 conv)."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=True)
        self.stride, self.pad = stride, c_out - c_in
        self.shortcut: nn.Module | None = None
        if (stride != 1 or c_in != c_out) and shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def _skip(self, x):
        if self.shortcut is not None:
            return self.shortcut(x)
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            x = nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self._skip(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): a 3x3 stem, 3 stages of ``blocks`` basic blocks with
    16/32/64 channels (times ``width``), stride 2 at the start of stages 2 and 3, global average pooling,
    one Linear. ``blocks=3`` is ResNet-20 (19 conv + 1 fc). ``shortcut="A"``: parameter-free skips
    (subsample, zero-padded channels); ``"B"``: 1x1 conv + BatchNorm projections where the shape changes.
    Any input size works (28x28, 32x32, 8x8 digits)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, blocks: int = 3, width: float = 1.0,
                 shortcut: str = "A"):
        super().__init__()
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ConfigError(f"model.blocks must be an integer >= 1, got {blocks!r}")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ConfigError(f"model.width must be > 0, got {width!r}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"model.shortcut must be 'A' (identity, zero-padded) or 'B' (1x1 projection), got {shortcut!r}")
        chans = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.act = nn.ReLU(inplace=True)
        stages, c = [], chans[0]
        for i, out in enumerate(chans):
            layer = []
            for j in range(blocks):
                layer.append(_BasicBlock(c, out, 2 if (i > 0 and j == 0) else 1, shortcut))
                c = out
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def ResNet20(in_channels: int = 3, num_classes: int = 10, width: float = 1.0, shortcut: str = "A") -> ResNet:
    """ResNet-20: :class:`ResNet` with 3 blocks per stage."""
    return ResNet(in_channels, num_classes, blocks=3, width=width, shortcut=shortcut)


class ViT(nn.Module):
    """A small Vision Transformer: non-overlapping ``patch_size`` patches embedded by a Conv2d (stride = kernel),
    a learned position embedding, ``depth`` pre-norm ``nn.TransformerEncoderLayer``s (``batch_first=True``,
    ``heads`` heads, MLP of ``mlp_ratio * dim``, GELU), a final LayerNorm, mean-pooled tokens (``pool="mean"``)
    or a class token (``pool="cls"``), and a Linear head. ``image_size`` must be a multiple of ``patch_size``
    (28 with 4 or 7; 8x8 digits with 2 or 4).

    ``pos_embed`` and ``cls_token`` are added, not multiplied: they stay digital on purpose
    (:attr:`digital_parameters`)."""

    digital_parameters = ("pos_embed", "cls_token")

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, patch_size: int = 4,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 pool: str = "mean"):
        super().__init__()
        for key, v in (("patch_size", patch_size), ("dim", dim), ("depth", depth), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{key} must be an integer >= 1, got {v!r}")
        if image_size % patch_size:
            raise ConfigError(f"model.patch_size={patch_size} does not divide the image size {image_size}")
        if dim % heads:
            raise ConfigError(f"model.dim={dim} must be a multiple of model.heads={heads}")
        if pool not in ("mean", "cls"):
            raise ConfigError(f"model.pool must be 'mean' or 'cls', got {pool!r}")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
            raise ConfigError(f"model.mlp_ratio must be > 0, got {mlp_ratio!r}")
        n = (image_size // patch_size) ** 2
        self.pool = pool
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + (pool == "cls"), dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, max(1, round(dim * mlp_ratio)), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, patches, dim]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = self.norm(self.encoder(x + self.pos_embed))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(1))


MODELS = ("lenet5", "mlp", *VGG_CONFIGS, "resnet20", "vit")
# keyword arguments a user model gets from the dataset (see the module docstring): timm says in_chans,
# transformers configs num_labels and num_channels
INJECTED = ("num_classes", "num_labels", "in_channels", "in_chans", "num_channels", "image_size", "input_shape",
            "in_features")
CHANNEL_KEYS = ("in_channels", "in_chans", "num_channels")
CLASS_KEYS = ("num_classes", "num_labels")
# optional extras: top-level module -> the extra that installs it
EXTRAS = {"timm": "timm", "transformers": "hf"}
# factories of the zoos that take INJECTED names through **kwargs: (top-level module, function) -> names
ZOO_FACTORIES = {("timm", "create_model"): ("num_classes", "in_chans")}
# keyword arguments of a factory that load weights; off when a model is rebuilt from a file (its weights are there)
WEIGHT_LOADING = {"pretrained": False, "checkpoint_path": ""}


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build reference model ``name`` for inputs of shape ``(C, H, W)`` (the MLP: any shape); extra kwargs go
    to the model."""
    if name not in MODELS:
        raise ConfigError(f"model.name must be one of {list(MODELS)}, got {name!r} (your own class: model=custom "
                          f"model._target_=package.module.Class)")
    shape = tuple(int(d) for d in input_shape)
    try:
        if name == "mlp":
            return MLP(math.prod(shape), num_classes, **kwargs)
        if len(shape) != 3:
            raise ConfigError(f"model {name!r} needs image inputs [C, H, W], got shape {list(shape)}; "
                              f"model=mlp takes any shape")
        c, h, w = shape
        if h != w:
            raise ConfigError(f"model {name!r} needs square inputs, got {h}x{w}")
        if name == "lenet5":
            return LeNet5(c, h, num_classes, **kwargs)
        if name == "resnet20":
            return ResNet20(c, num_classes, **kwargs)
        if name == "vit":
            return ViT(c, h, num_classes, **kwargs)
        return VGG(name, c, h, num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"bad parameters for model {name!r}: {e}") from None


# ----------------------------------------------------------------------------- user models by import path

def _extra_hint(module: str | None) -> str:
    extra = EXTRAS.get((module or "").partition(".")[0])
    return f" (an optional extra of correctnet: pip install 'correctnet[{extra}]')" if extra else ""


# modules a target read from a file may be imported from without being named by the caller (see the module docstring)
TRUSTED_MODULES = ("correctnet", "transformers", "timm")

Trust = Union[bool, str, Sequence[str], None]  # trust=: True (any module), a module name/prefix or a list of them


class UntrustedModuleError(ConfigError):
    """A target read from a file would import a module the caller does not trust (nothing was imported)."""

    def __init__(self, message: str, module: str):
        super().__init__(message)
        self.module = module


def trust_list(trust: Trust, key: str = "trust") -> bool | tuple[str, ...]:
    """``trust`` as True (any module) or a tuple of module names/prefixes; a :class:`ConfigError` naming ``key``
    for anything else (``None``/``False``: none beyond the defaults; a string is one name)."""
    if trust is True:
        return True
    if trust is None or trust is False:
        return ()
    out: list[Any] = [trust] if isinstance(trust, str) else list(trust) if isinstance(trust, (list, tuple)) else [trust]
    if any(not isinstance(n, str) or not n.strip() or n.strip().startswith(".") or ":" in n for n in out):
        raise ConfigError(f"{key} must be True or a list of module names (e.g. ['mypkg', 'mypkg.models']), "
                          f"got {trust!r}")
    return tuple(n.strip() for n in out)


def is_trusted(module: str, trust: Trust = None) -> bool:
    """Whether a target read from a file may import ``module``: it is already imported (``sys.modules``), it is
    one of (or inside) :data:`TRUSTED_MODULES` or the names in ``trust``, or ``trust`` is True."""
    names = trust_list(trust)
    if isinstance(names, bool) or module in sys.modules:
        return True
    return any(module == p or module.startswith(p + ".") for p in (*TRUSTED_MODULES, *names))


def target_module(target: str) -> str:
    """The module :func:`locate` imports ``target`` from: the part before ``:``; for ``"pkg.mod.Name"`` the
    longest prefix already imported, else ``"pkg.mod"`` (the first one it tries)."""
    target = target.strip()
    if ":" in target:
        return target.partition(":")[0]
    parts = target.split(".")
    candidates = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    return next((m for m in candidates if m in sys.modules), candidates[0] if candidates else target)


def locate(target: str, key: str = "model._target_", *, trust: Trust = True) -> Any:
    """The object named by ``target`` (``"pkg.mod.Name"`` or ``"pkg.mod:Qual.Name"``), imported from sys.path.

    A :class:`ConfigError` naming ``key`` says what could not be imported and why (module not found, an
    error inside the module, no such attribute); a missing optional extra (timm, transformers) names the
    ``pip install 'correctnet[...]'`` that installs it. ``trust`` (default True: a target the user configured)
    limits the modules it may import (:func:`is_trusted`): any other is an :class:`UntrustedModuleError`,
    raised before the module is imported.
    """
    if not isinstance(target, str) or not target.strip() or target.startswith((".", ":")):
        raise ConfigError(f"{key} must be an import path 'package.module.Name', got {target!r}")
    target = target.strip()
    if ":" in target:
        module_name, _, qual = target.partition(":")
        candidates = [(module_name, qual.split("."))]
    else:
        parts = target.split(".")
        if len(parts) < 2:
            raise ConfigError(f"{key}={target!r} names no module: expected 'package.module.Name' "
                              f"(the module importable via PYTHONPATH or installed)")
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    first_error: str | None = None
    missing: str | None = None
    for module_name, attrs in candidates:
        if trust is not True and not is_trusted(module_name, trust):
            raise UntrustedModuleError(f"{key}={target!r} would import module {module_name!r} (running its code), "
                                       f"which is not trusted", module_name)
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not (module_name == e.name or module_name.startswith(e.name + ".")):
                raise ConfigError(f"{key}={target!r}: importing module {module_name!r} failed: it needs module "
                                  f"{e.name!r}, which is not installed{_extra_hint(e.name)}") from None
            first_error = f"no module named {e.name or module_name!r}"
            missing = e.name or module_name
            continue
        except Exception as e:  # noqa: BLE001 - any error raised by the user's module while importing
            raise ConfigError(f"{key}={target!r}: importing module {module_name!r} raised "
                              f"{type(e).__name__}: {e}") from None
        try:
            for a in attrs:
                obj = getattr(obj, a)
        except AttributeError:
            raise ConfigError(f"{key}={target!r} cannot be found: module {module_name!r} has no attribute "
                              f"{'.'.join(attrs)!r}") from None
        return obj
    if _extra_hint(missing):
        raise ConfigError(f"{key}={target!r} cannot be imported: {first_error}{_extra_hint(missing)}")
    raise ConfigError(f"{key}={target!r} cannot be imported: {first_error}. Is its package on PYTHONPATH "
                      f"(PYTHONPATH=/dir/containing/the/package python -m ...) or installed?")


def target_name(obj: Any) -> str:
    """``"module:qualname"`` of a class or function (what :func:`locate` reads back)."""
    return f"{obj.__module__}:{obj.__qualname__}"


def importable(obj: Any) -> str | None:
    """None when ``obj`` (a class or function) can be imported back by :func:`target_name`; else why not."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module is None:
        return f"{obj!r} has no module"
    if module == "__main__":
        return f"{qual} is defined in the script being run (__main__), which another process cannot import"
    if "<locals>" in qual:
        return f"{qual} is defined inside a function (a local scope), which cannot be imported"
    try:
        found = locate(f"{module}:{qual}", key="target")
    except ConfigError as e:
        return str(e)
    return None if found is obj else f"{module}:{qual} names another object than {qual}"


def _is_module_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, nn.Module)


def _zoo_factory(obj: Any) -> tuple[str, ...] | None:
    """The INJECTED names a zoo factory (timm's ``create_model``) takes through ``**kwargs``; None for others."""
    module = getattr(obj, "__module__", None) or ""
    return ZOO_FACTORIES.get((module.partition(".")[0], getattr(obj, "__name__", "")))


def factory_refusal(obj: Any) -> str | None:
    """Why ``obj`` may not be called to rebuild a model from a file (None: it may).

    A file names what it is rebuilt with, so only what builds models is called: ``nn.Module`` subclasses, Python
    functions whose return annotation is an ``nn.Module`` class (``def make_net(...) -> nn.Module``) and the
    zoos' factories (:data:`ZOO_FACTORIES`). Builtins, other classes and functions that do not say they return
    a module (``torch.load``, ``os.remove``, ...) are refused.
    """
    if _is_module_class(obj):
        return None
    if inspect.isclass(obj):
        return f"the class {obj.__qualname__} is not an nn.Module subclass"
    if not inspect.isfunction(obj):
        return f"a {type(obj).__name__} is not an nn.Module class or a Python function"
    if _zoo_factory(obj) is not None:
        return None
    try:
        import typing
        returns = typing.get_type_hints(obj).get("return")
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: no evidence it builds a module
        returns = None
    if _is_module_class(returns):
        return None
    return (f"the function {obj.__qualname__} does not declare that it returns an nn.Module (annotate it: "
            f"'def {obj.__name__}(...) -> nn.Module')")


def build_target(target: str, kwargs: Mapping[str, Any] | None = None, *, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, key: str = "model", from_file: bool = False, name: str | None = None,
                 trust: Trust = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the user's model ``target`` with ``kwargs``; returns ``(module, the keyword arguments used)``.

    The dataset's ``input_shape``/``num_classes`` are added for the parameters the constructor names and for the
    :data:`INJECTED` keys set to None (see the module docstring); the returned arguments rebuild the same module
    with ``build_target(target, args)``. ``name`` (the configured ``model.name``) is passed too when the target's
    signature names a ``name`` parameter (:func:`hf_model`'s model type). ``from_file`` (the target comes from a
    checkpoint) calls only what :func:`factory_refusal` allows, and with the :data:`WEIGHT_LOADING` arguments
    turned off (no download, no second file: the weights are in the checkpoint), and imports only from the modules
    :func:`is_trusted` allows with ``trust`` (else an :class:`UntrustedModuleError`).
    """
    obj = locate(target, f"{key}._target_", trust=trust if from_file else True)
    if from_file:
        why = factory_refusal(obj)
        if why is not None:
            raise ConfigError(f"{key}._target_={target!r} is not called when a model is rebuilt from a file: {why}")
    if not callable(obj):
        raise ConfigError(f"{key}._target_={target!r} is a {type(obj).__name__}, not an nn.Module class or a function "
                          f"returning one")
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        raise ConfigError(f"{key}._target_={target!r} is the class {obj.__qualname__}, which is not an nn.Module "
                          f"subclass")
    args = dict(kwargs or {})
    if name is not None and "name" not in args and "name" in _parameters(obj):
        args = {"name": name, **args}
    if input_shape is not None or num_classes is not None:
        implied = _implied_args(obj, input_shape, num_classes, args)
        args = {**implied, **{k: v for k, v in args.items() if k not in implied}}
    used = dict(args)
    if from_file:
        args.update({k: v for k, v in WEIGHT_LOADING.items() if k in args})
    built = {k: _build_nested(v, f"{key}.{k}", from_file, trust) for k, v in args.items()}
    try:
        inspect.signature(obj).bind(**built)
    except TypeError as e:
        raise ConfigError(f"{key}._target_={target!r} does not accept the arguments {sorted(args)}: {e}"
                          f"{_accepted(obj)}") from None
    except ValueError:  # no signature (builtin): let the call decide
        pass
    try:
        module = obj(**built)
    except ConfigError as e:
        raise ConfigError(f"{key}._target_={target!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's constructor rejects its arguments
        raise ConfigError(f"{key}._target_={target!r} raised {type(e).__name__} when called with "
                          f"{_short(args)}: {e}{_accepted(obj)}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{key}._target_={target!r} returned a {type(module).__name__}, not an nn.Module")
    return module, used


def _parameters(obj: Callable) -> set[str]:
    """The parameters ``obj`` names explicitly (positional-or-keyword, keyword-only)."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _accepted(obj: Callable) -> str:
    try:
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return ""
    return f" (its parameters: {', '.join(p.name for p in params) or 'none'})"


def _short(args: Mapping[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "no arguments"
    return text if len(text) < 300 else text[:300] + " ..."


def _implied_args(obj: Callable, input_shape: Sequence[int] | None, num_classes: int | None,
                  given: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset's values for the INJECTED names ``obj`` takes (explicitly, or a zoo factory's ``**kwargs``)
    that ``given`` does not set, and for those ``given`` sets to None."""
    named = _parameters(obj) | set(_zoo_factory(obj) or ()) | {k for k, v in given.items() if v is None}
    set_keys = {k for k, v in given.items() if v is not None}
    implied: dict[str, Any] = {}
    if num_classes is not None:
        implied["num_classes"] = implied["num_labels"] = int(num_classes)
    if input_shape is not None:
        shape = [int(d) for d in input_shape]
        implied["input_shape"] = shape
        implied["in_features"] = math.prod(shape)
        if len(shape) == 3:
            implied["in_channels"] = implied["in_chans"] = implied["num_channels"] = shape[0]
            if shape[1] == shape[2]:
                implied["image_size"] = shape[1]
    return {k: v for k, v in implied.items() if k in named and k not in set_keys}


def _build_nested(value: Any, key: str, from_file: bool, trust: Trust = None) -> Any:
    if isinstance(value, Mapping) and "_target_" in value:
        sub = {k: v for k, v in value.items() if k != "_target_"}
        return build_target(value["_target_"], sub, key=key, from_file=from_file, trust=trust)[0]
    return value


def model_from_config(params: Mapping[str, Any], input_shape: Sequence[int], num_classes: int
                      ) -> tuple[nn.Module, dict[str, Any]]:
    """The model a ``model`` config section describes; returns ``(module, spec for the checkpoint)``.

    ``{"name": <built-in>, **kwargs}`` builds a reference model (:data:`MODELS`); ``{"_target_": path,
    **kwargs}`` the user's class or factory (:func:`build_target`), ``name`` then being a display name (passed
    on when the target takes a ``name``: ``model=hf model.name=vit``). The spec is ``{"name", "input_shape",
    "num_classes", "kwargs"}``, plus ``"target"`` for user models (``kwargs`` are then the complete arguments,
    dataset-implied ones included).
    """
    kwargs = dict(params)
    name, target = kwargs.pop("name", None), kwargs.pop("_target_", None)
    spec: dict[str, Any] = {"input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes)}
    if target is None:
        if name is None:
            raise ConfigError("the model config needs model.name (one of " + ", ".join(MODELS) + ") or "
                              "model._target_ (your own class: model=custom model._target_=package.module.Class)")
        return build_model(name, input_shape, num_classes, **kwargs), {"name": name, **spec, "kwargs": kwargs}
    obj = locate(target)
    if name in MODELS and "name" not in _parameters(obj):
        raise ConfigError(f"model.name={name!r} is a built-in model but model._target_={target!r} is set too; "
                          f"use model=custom for your own class (or drop model._target_)")
    module, args = build_target(target, kwargs, input_shape=input_shape, num_classes=num_classes, name=name)
    return module, {"name": name or getattr(obj, "__name__", str(target)), "target": target, **spec, "kwargs": args}


# ----------------------------------------------------------------------------- the model zoos

HF_TASKS = {"image-classification": "AutoModelForImageClassification",
            "text-classification": "AutoModelForSequenceClassification"}


def import_extra(module: str) -> Any:
    """Import the optional extra ``module`` (``"timm"``, ``"transformers"``); a :class:`ConfigError` naming its
    ``pip install`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{module} is not installed ({e}): pip install 'correctnet[{EXTRAS[module]}]'") from None


def hf_model(name: str, task: str = "image-classification", *, num_labels: int | None = None,
             num_channels: int | None = None, image_size: int | None = None, **config: Any) -> nn.Module:
    """A transformers model of type ``name`` (``"vit"``, ``"deit"``, ``"swin"``, ``"convnext"``, ``"bert"``, ...)
    for ``task`` (:data:`HF_TASKS`) with freshly initialised weights, built offline from a config:
    ``transformers.AutoConfig.for_model(name, **config)`` and the task's ``AutoModelFor...from_config``.
    ``num_labels``, ``num_channels`` and ``image_size`` (the dataset's, from ``python -m correctnet.train
    model=hf``) are set where the model type's config has them. Needs ``pip install 'correctnet[hf]'``."""
    transformers = import_extra("transformers")
    if task not in HF_TASKS:
        raise ConfigError(f"model.task must be one of {list(HF_TASKS)}, got {task!r}")
    try:
        default = transformers.AutoConfig.for_model(name)
    except (ValueError, KeyError):
        raise ConfigError(f"model.name={name!r} is not a transformers model type (e.g. vit, deit, swin, convnext, "
                          f"bert; transformers {transformers.__version__})") from None
    known = {k: v for k, v in (("num_channels", num_channels), ("image_size", image_size))
             if v is not None and hasattr(default, k)}
    if num_labels is not None:
        known["num_labels"] = num_labels
    try:
        cfg = transformers.AutoConfig.for_model(name, **config, **known)
        return getattr(transformers, HF_TASKS[task]).from_config(cfg)
    except ValueError as e:  # e.g. no model of this type for the task
        raise ConfigError(f"model.name={name!r}, model.task={task!r}: {e}") from None


def hf_spec(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild a transformers model (a ``transformers.PreTrainedModel``): ``{"class", "config_class",
    "config"}`` (import paths and the complete ``config.to_dict()``, as JSON); None for other models. Does not
    import transformers (a transformers model has imported it)."""
    import sys
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    import json
    config = model.config
    return {"class": target_name(type(model)), "config_class": target_name(type(config)),
            "config": json.loads(config.to_json_string(use_diff=False))}


def hf_from_spec(spec: Mapping[str, Any], key: str = "model.transformers", *, trust: Trust = None
                 ) -> Callable[[], nn.Module]:
    """A function building the transformers model :func:`hf_spec` describes, with fresh weights
    (``cls._from_config(config_class.from_dict(config))``: no download, no file read). The classes are imported
    only from trusted modules (:func:`is_trusted` with ``trust``: transformers itself always is)."""
    transformers = import_extra("transformers")
    cls, config_cls, config = spec.get("class"), spec.get("config_class"), spec.get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{key}.config must be a mapping (a transformers config), got {type(config).__name__}")
    if not (isinstance(cls, str) and isinstance(config_cls, str)):
        raise ConfigError(f"{key}.class and {key}.config_class must be import paths (strings), got "
                          f"{type(cls).__name__} and {type(config_cls).__name__}")
    cls, config_cls = locate(cls, f"{key}.class", trust=trust), locate(config_cls, f"{key}.config_class", trust=trust)
    if not (inspect.isclass(cls) and issubclass(cls, transformers.PreTrainedModel)):
        raise ConfigError(f"{key}.class={spec['class']!r} is not a transformers PreTrainedModel class")
    if not (inspect.isclass(config_cls) and issubclass(config_cls, transformers.PretrainedConfig)):
        raise ConfigError(f"{key}.config_class={spec['config_class']!r} is not a transformers config class")
    cfg = cast(Any, config_cls).from_dict(dict(config))
    return lambda: cast(Any, cls)._from_config(cfg)


def check_fits(model: nn.Module, sample: torch.Tensor, num_classes: int, kwargs: Mapping[str, Any] | None = None,
               key: str = "model") -> None:
    """Run ``sample`` (one input ``[1, *input_shape]``) through ``model`` (eval mode, no gradients, the global
    RNG untouched); a model that cannot take it (input channels, image size) or whose output's last dimension is
    not ``num_classes`` is a :class:`ConfigError` naming the key to set (``kwargs``: the configured arguments)."""
    kwargs = kwargs or {}
    shape = list(sample.shape[1:])
    flags = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            model.eval()
            try:
                out = model(sample)
            except Exception as e:  # noqa: BLE001 - any error of the user's forward on the dataset's input
                chan = next((k for k in CHANNEL_KEYS if k in kwargs), None)
                if len(shape) != 3:
                    hint = "the model must take inputs of the dataset's sample shape"
                elif chan is not None and kwargs[chan] != shape[0]:
                    hint = f"{key}.{chan}={kwargs[chan]!r}, but the images have {shape[0]} channels: set {key}.{chan}={shape[0]}"
                elif chan is not None:
                    hint = f"the images are [C, H, W] = {shape}: check the arguments that depend on the image size"
                else:
                    hint = (f"the images have {shape[0]} channels: set the model's input channels, {key}.in_channels, "
                            f"in_chans (timm) or num_channels (transformers), whichever its constructor takes")
                what = " ".join(f"{type(e).__name__}: {e}".split())
                raise ConfigError(f"the model does not run on the dataset's inputs {[1, *shape]}: "
                                  f"{what[:400]}{' ...' if len(what) > 400 else ''}; {hint}") from None
    finally:
        for m, t in flags.items():
            m.training = t
    logits = _logits(out)
    got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
    if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or logits.shape[-1] != num_classes:
        classes = next((k for k in CLASS_KEYS if k in kwargs), None)
        hint = (f"{key}.{classes}={kwargs[classes]!r}, set it to {num_classes}" if classes else
                f"set the model's class count to {num_classes}: {key}.num_classes, or num_labels (transformers), "
                f"whichever its constructor takes")
        raise ConfigError(f"the model outputs {got} for one input, but the dataset has {num_classes} classes "
                          f"(expected [1, {num_classes}] logits): {hint}")


def _logits(out: Any) -> Any:
    """The logits of a model output: a tensor, a transformers ``ModelOutput`` (``.logits``) or a tuple's first."""
    # NOTE: correctnet.tensors is getting a shared ``logits_of`` for model outputs (another change); use it here
    # once it is there
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out

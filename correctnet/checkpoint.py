"""Checkpoints: nominal weights in safetensors, everything needed to rebuild the model as JSON metadata.

Format 2 is one ``.safetensors`` file. Its tensors are the model's ``state_dict()`` (a tensor shared by
several names, e.g. tied weights, is stored once); its string metadata holds ``correctnet_format``
(``"2"``), ``correctnet_meta``, a JSON string (below), and ``correctnet_sha256``, the SHA-256 over the format
string, the exact ``correctnet_meta`` string and the tensors (:func:`checkpoint_sha256`): an edit of the
metadata (a variation sigma, a stored metric, the config) or of a weight, and bit rot, are detected on load and
refused (one :class:`CheckpointError`: the file was modified or damaged), as is a format 2 file without the
digest. Format 1 (written by correctnet before this format; its digest, :func:`tensor_digest`, covers the
tensors only) still loads, with a warning that its metadata is not covered. ``correctnet_meta`` is a JSON
object with

* ``model``: how to rebuild the network, one of

  - ``{"name", "input_shape", "num_classes", "kwargs"}``: a reference model, :func:`correctnet.build_model`;
  - ``{"name", "target", "kwargs", ...}``: any other ``nn.Module``: ``target`` is its class or the factory
    function that built it as ``"module:QualName"`` (or the ``_target_`` string of ``python -m correctnet.train
    model=custom|timm|hf``), ``kwargs`` its (JSON) arguments (null when unknown: the class is then called without
    arguments); for a factory, ``class`` is the class it returned (checked when rebuilt). A library caller may
    give ``meta["model"] = {"target": ..., "kwargs": {...}}`` (e.g. ``{"target": "timm.create_model", "kwargs":
    {"model_name": "resnet18", "num_classes": 10, "in_chans": 1}}``); without them :func:`save_checkpoint`
    records the model's own class. A class that cannot be imported again (defined in ``__main__`` or inside a
    function) is saved with ``target: null`` and a ``rebuild`` note (and a warning): such a checkpoint loads only
    into an instance, ``load_checkpoint(path, model=MyNet())``;
  - a transformers model (a ``transformers.PreTrainedModel``) has, besides, ``transformers``: ``{"class",
    "config_class", "config"}``, its class and its config class as import paths and the complete config
    (``config.to_json_string(use_diff=False)``): it is rebuilt from these, ``cls._from_config(config)``
    (:func:`correctnet.models.hf_from_spec`), whatever built it;
* ``variation``: ``VariationModel.to_dict()``; ``analog``: ``{"include", "exclude", "layers", "input_ranges"}``
  (``layers``, the analog layer names, and ``input_ranges``, the fixed DAC ranges set by
  ``calibrate_input_ranges``, are filled in at save; ``variations``, ``{layer: to_dict()}`` of the layers whose
  device settings differ from ``variation``, when there are such layers);
* ``normalization``: ``{"mean", "std", "scale", "axis"}``, the input normalization of the training data
  (per channel = per index of dimension 1); :func:`normalize` applies it to raw inputs:
  ``model(normalize(raw, meta))``. Written by ``python -m correctnet.train``; optional otherwise;
* ``aliases``: ``{name: stored name}`` for state_dict entries that are the same tensor as another (tied
  weights); loading restores the tie (both names are the same ``Parameter`` again);
* ``versions``: ``{"correctnet", "torch", "safetensors", "format", ...}``, filled in at save;
* written by ``python -m correctnet.train``: ``dataset`` (its name), ``dataset_source`` (how to load it
  again, e.g. the absolute path of a data file), ``stage``, ``config`` (the resolved Hydra config) and
  ``metrics`` (``metrics.json``, per-chip accuracies and chip seeds included);
* ``compensation``: ``{layer: {"kind", "rank", "affine"}}`` of the attached compensation modules (null
  when none), filled in at save; loading re-attaches them before the weights are loaded;
* reserved: ``placement`` (the placement search's record).

Safety: loading never unpickles. The header is checked before safetensors sees the file (pickles and
zip archives from ``torch.save`` are named and refused, the header size is bounded by the file size),
the model is built on the meta device and compared with the file before any weight is allocated, and
weights holding NaN or infinite values are refused (naming the first such tensor), and every failure is one
:class:`CheckpointError`. Nothing named in the metadata is imported unless trusted (importing a module runs its
top-level code): built-in correctnet models, ``transformers`` and ``timm`` (the zoos; only their model and config
classes and ``create_model`` are called) and modules already imported in the process (``sys.modules``) are
trusted; any other module that ``target`` (or a nested ``_target_``, or the transformers classes) names is
imported only when the caller allows it, ``load_checkpoint(path, trust=["mypkg", "mypkg.models"])`` (module names
or prefixes; ``trust=True``: any) or ``python -m correctnet.evaluate ... trust=mypkg`` (the command printed by
``python -m correctnet.train`` passes it for the run's own model); otherwise one :class:`CheckpointError` names the
module and the argument that allows it, and nothing is imported. Rebuilding a user model then calls only what
builds models (:func:`correctnet.models.factory_refusal`):
``nn.Module`` subclasses, functions whose return annotation is an ``nn.Module`` class, timm's ``create_model``,
and for transformers models the ``PreTrainedModel`` and config classes; arguments that load weights
(``pretrained``, ``checkpoint_path``) are turned off, the weights come from the file. Files are written
atomically (temporary file, fsync, rename) and an existing file is only replaced when ``overwrite=True``.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from . import analog as analog_module
from .analog import analog_layers, analogize
from .compensation import attach_from_spec, compensation_spec
from .data import normalize
from .errors import CheckpointError, ConfigError, CorrectNetError
from .io import atomic_write
from .models import (MODELS, TRUSTED_MODULES, Trust, UntrustedModuleError, build_model, build_target, hf_from_spec,
                     hf_spec, importable, locate, target_module, target_name, trust_list)
from .registry import make_variation

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_metadata", "normalize", "atomic_write", "tensor_digest",
           "checkpoint_sha256", "trust_needed", "versions"]

FORMAT_VERSION = "2"  # written; format "1" (the digest covers the tensors only) is still read, with a warning
READ_FORMATS = ("1", "2")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger length field is not a safetensors file


# ----------------------------------------------------------------------------- writing

def _hash_tensors(h: Any, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.detach().reshape(-1).view(torch.uint8).numpy().data)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and raw bytes of ``tensors`` (CPU, contiguous): the digest
    of format 1 checkpoints (and of calibrated chip files)."""
    h = hashlib.sha256()
    _hash_tensors(h, tensors)
    return h.hexdigest()


def checkpoint_sha256(tensors: dict[str, torch.Tensor], meta_json: str, fmt: str = FORMAT_VERSION) -> str:
    """The digest of a format 2 checkpoint: SHA-256 (hex) over the format string, the exact metadata string
    ``meta_json`` and then the tensors as :func:`tensor_digest` hashes them."""
    h = hashlib.sha256()
    h.update(json.dumps(["correctnet", fmt, meta_json]).encode())
    _hash_tensors(h, tensors)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions recorded in every checkpoint (the format is :data:`FORMAT_VERSION`)."""
    return {"correctnet": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            "format": FORMAT_VERSION}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``model.state_dict()`` and ``meta`` (JSON-serializable) to ``path`` atomically; returns ``path``.

    ``meta`` needs ``variation``; ``model`` describes how to rebuild the network (see the module docstring;
    when absent, or without ``name``/``target``, the model's own class is recorded). ``versions``,
    ``analog.layers``, ``compensation`` and ``aliases`` are added to the stored copy, ``meta`` itself is
    not modified.
    """
    if "variation" not in meta:
        raise CheckpointError("checkpoint metadata needs a 'variation' entry")
    analog = analog_layers(model)
    layers = list(analog)
    if not layers:
        raise CheckpointError(f"{type(model).__name__} has no analog layers; analogize it before saving")
    state = model.state_dict()
    aliases = _aliases(state)
    ranges = {n: float(layer.input_range) for n, layer in analog.items() if layer.input_range is not None}
    main = meta["variation"] if isinstance(meta["variation"], dict) else None
    own = {n: layer.variation.to_dict() for n, layer in analog.items() if layer.variation.to_dict() != main}
    meta = {**meta, "model": _model_spec(model, meta.get("model")),
            "versions": {**(meta.get("versions") or {}), **versions()},
            "analog": {"include": None, "exclude": [], **(meta.get("analog") or {}), "layers": layers,
                       "input_ranges": ranges, **({"variations": own} if own else {})},
            "compensation": compensation_spec(model), "aliases": aliases}
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serializable: {e}") from None
    tensors = _unshared({k: v.detach() for k, v in state.items() if k not in aliases})
    metadata = {"correctnet_format": FORMAT_VERSION, "correctnet_sha256": checkpoint_sha256(tensors, meta_json),
                "correctnet_meta": meta_json}
    try:
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from None


def _restore_input_ranges(path: str | os.PathLike, model: nn.Module, ranges: Any) -> None:
    """Set the fixed DAC ranges :func:`~correctnet.analog.calibrate_input_ranges` found before the export."""
    layers = analog_layers(model)
    if not isinstance(ranges, dict) or any(n not in layers or not isinstance(r, (int, float)) or isinstance(r, bool)
                                           for n, r in ranges.items()):
        raise CheckpointError(f"{path}: analog.input_ranges must map analog layer names to numbers, got {ranges!r}"
                              f" (layers: {list(layers)[:8]})")
    for name, r in ranges.items():
        layers[name].input_range = float(r)


def _restore_variations(path: str | os.PathLike, model: nn.Module, own: Any) -> None:
    """The layers analogized with their own device settings (``analogize(..., per_layer=...)``) get them back."""
    layers = analog_layers(model)
    if not isinstance(own, dict) or any(n not in layers or not isinstance(v, dict) for n, v in own.items()):
        raise CheckpointError(f"{path}: analog.variations must map analog layer names to variation settings, got "
                              f"{str(own)[:200]}")
    for name, v in own.items():
        layers[name].variation = make_variation(**v)


def _digital_class(model: nn.Module) -> type:
    return model.__dict__.get("_digital_class", type(model))  # a bare analog layer: its original class


def _model_spec(model: nn.Module, given: Any) -> dict[str, Any]:
    """The stored ``model`` entry: the given one completed, or one recording the model's own class."""
    if given is not None and not isinstance(given, dict):
        raise CheckpointError(f"checkpoint metadata 'model' must be a mapping, got {type(given).__name__}")
    spec = dict(given or {})
    if spec.get("target") is None and spec.get("name") in MODELS:
        return spec  # a reference model: build_model(name, input_shape, num_classes, **kwargs)
    cls = _digital_class(model)
    hf = hf_spec(model)
    if hf is not None:
        spec["transformers"] = hf  # rebuilt from its config, whatever built it
    if spec.get("target") is not None:
        try:
            obj = locate(spec["target"], "meta['model']['target']")
        except ConfigError as e:
            raise CheckpointError(f"cannot record how to rebuild the model: {e}") from None
        spec.setdefault("name", spec["target"].replace(":", ".").rsplit(".", 1)[-1])
        spec.setdefault("kwargs", None)
        if obj is not cls:
            spec.setdefault("class", target_name(cls))  # what a factory returned: checked when rebuilt
        return spec
    why = importable(cls)
    spec.update(name=spec.get("name") or cls.__name__, target=None if why else target_name(cls))
    spec.setdefault("kwargs", None)
    notes = []
    if why and hf is None:
        notes.append(f"{why}: load this checkpoint into an instance, load_checkpoint(path, model={cls.__name__}(...))")
        warnings.warn(f"checkpoint {cls.__name__}: {notes[-1]}", stacklevel=3)
    elif spec["kwargs"] is None and hf is None:
        notes.append(f"the constructor arguments are not recorded (meta['model']['kwargs']): load_checkpoint(path) "
                     f"calls {cls.__name__}() without arguments (a model made by a factory: record it, "
                     f"meta['model'] = {{'target': 'pkg.module.factory', 'kwargs': {{...}}}})")
    if notes:
        spec["rebuild"] = "; ".join(notes)
    return spec


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: first name}`` for state_dict entries that are exactly the same tensor view as an earlier one."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for k, v in state.items():
        if v.numel() == 0 or v.device.type == "meta":
            continue
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride(), v.dtype)
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
    return aliases


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors of which none shares memory with another (safetensors refuses shared storage:
    partly overlapping views are copied)."""
    out, storages = {}, set()
    for k, v in tensors.items():
        t = v.cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in storages:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[k] = t
    return out


# ----------------------------------------------------------------------------- reading

def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of ``path``, after checks that need no large allocation."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
        n = int.from_bytes(head[:8], "little")  # bounded before anything more is read or allocated
        if len(head) < 9 or head[8:] != b"{" or not 2 <= n <= MAX_HEADER_BYTES:
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                kind = "a zip archive (torch.save)" if head[:1] == b"P" else "a Python pickle (torch.save)"
                raise CheckpointError(f"{path} is not a correctnet safetensors checkpoint: it is {kind}. correctnet "
                                      f"never unpickles files (unpickling can run arbitrary code); export models "
                                      f"with correctnet.save_checkpoint")
            if len(head) < 9:
                raise CheckpointError(f"{path} is not a correctnet safetensors checkpoint: only {size} bytes long")
            raise CheckpointError(f"{path} is not a correctnet safetensors checkpoint (it does not start with "
                                  f"a safetensors header)")
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}")
        raw = b"{" + f.read(n - 1)
    try:
        header = json.loads(raw)
        end = max([8 + n] + [8 + n + int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        raise CheckpointError(f"{path} is not a correctnet safetensors checkpoint (its header is not a valid "
                              f"safetensors JSON header; corrupt file?)") from None
    if end > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {end} bytes, the file has {size} "
                              f"(interrupted copy or download?)")
    if end < size:
        raise CheckpointError(f"{path} is corrupt: {size - end} unexpected bytes after the tensors")
    return header


def _check_state(path: Path, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                 what: str = "the model described in its metadata", note: str = "") -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {list(tensors[k].shape)} (model: {list(v.shape)})" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    problems = [f"{kind}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{path}: the weights do not fit {what}; " + "; ".join(problems) + note)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the checkpoint at ``path`` (what :func:`load_checkpoint` returns second), read from the
    header alone: no tensor is loaded and no model built, so the digest is not verified (:func:`load_checkpoint`
    verifies it). Raises :class:`CheckpointError` like it for a file that is not a readable checkpoint."""
    return _stored_meta(Path(path))[1]


def checkpoint_digest(path: str | os.PathLike) -> str:
    """The SHA-256 recorded at export in the checkpoint at ``path`` (from the header alone): of its metadata and
    tensors (format 2; of the tensors only in format 1)."""
    return str(_stored_meta(Path(path))[0].get("correctnet_sha256"))


def _stored_meta(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the safetensors ``__metadata__``, the parsed correctnet metadata) of ``path``, after the header checks."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    header = _read_header(path)
    stored = header.get("__metadata__")
    stored = stored if isinstance(stored, dict) else {}
    fmt = stored.get("correctnet_format")
    if fmt is None:
        raise CheckpointError(f"{path} is a safetensors file but not a correctnet checkpoint (no correctnet_format "
                              f"in its metadata)")
    if fmt not in READ_FORMATS:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not supported; correctnet {__version__} reads "
                              f"formats {', '.join(repr(f) for f in READ_FORMATS)} (a newer correctnet may read it)")
    try:
        meta = json.loads(stored["correctnet_meta"])
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: the correctnet metadata is missing or corrupt ({e})") from None
    return stored, meta


def trust_hint(module: str) -> str:
    """How to allow a checkpoint to import ``module``: the library argument and the command-line key."""
    return (f"if you trust it, allow it: load_checkpoint(path, trust=[{module!r}]) "
            f"(python -m correctnet.evaluate: trust={module})")


def _untrusted(path: Path, e: UntrustedModuleError) -> CheckpointError:
    return CheckpointError(f"{path}: {e}; nothing from a checkpoint is imported unless trusted (built-in models, "
                           f"{', '.join(TRUSTED_MODULES[1:])} and modules already imported are); {trust_hint(e.module)}")


def trust_needed(meta: dict[str, Any]) -> list[str]:
    """The modules a fresh process must be told to trust (``trust=``) to rebuild the model ``meta`` describes:
    those its import paths name (``model.target``, nested ``_target_`` arguments, the transformers classes)
    outside :data:`~correctnet.models.TRUSTED_MODULES`."""
    spec = meta.get("model") if isinstance(meta, dict) else None
    if not isinstance(spec, dict):
        return []
    paths: list[str] = []

    def nested(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("_target_"), str):
                paths.append(value["_target_"])
            for v in value.values():
                nested(v)
        elif isinstance(value, list):
            for v in value:
                nested(v)

    if isinstance(spec.get("target"), str):
        paths.append(spec["target"])
    nested(spec.get("kwargs"))
    hf = spec.get("transformers")
    if isinstance(hf, dict):
        paths += [hf[k] for k in ("class", "config_class") if isinstance(hf.get(k), str)]
    out: list[str] = []
    for p in paths:
        if not p.strip():
            continue
        m = target_module(p)
        if not any(m == t or m.startswith(t + ".") for t in TRUSTED_MODULES) and m not in out:
            out.append(m)
    return out


def _verify(path: Path, stored: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The digest check of the format (2: metadata and tensors; 1: tensors only, with a warning), then the
    refusal of non-finite weights."""
    digest = stored.get("correctnet_sha256")
    if stored.get("correctnet_format") == "1":
        warnings.warn(f"{path} is a checkpoint of the older format 1: its metadata (variation, config, metrics, "
                      f"model spec) is not covered by the digest, so edits to it cannot be detected; re-export it "
                      f"with save_checkpoint (format {FORMAT_VERSION}) to protect it", UserWarning, stacklevel=3)
        if digest is not None and digest != tensor_digest(tensors):
            raise CheckpointError(f"{path} is corrupt: its weights do not match the digest recorded at export "
                                  f"(the file was modified or damaged)")
    elif not isinstance(digest, str):
        raise CheckpointError(f"{path}: the file was modified or damaged: it has no correctnet_sha256 digest (format "
                              f"{stored.get('correctnet_format')} checkpoints always record one)")
    elif digest != checkpoint_sha256(tensors, stored["correctnet_meta"], stored["correctnet_format"]):
        raise CheckpointError(f"{path}: the file was modified or damaged after export: its metadata or weights do "
                              f"not match the digest recorded at export")
    for name, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values; the checkpoint was written "
                                  f"from a diverged or broken model and cannot be evaluated")


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module | None = None,
                    device: str | torch.device = "cpu", trust: Trust = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the analog model saved at ``path``; returns ``(model in eval mode on device, metadata)``.

    Needs neither Hydra nor training code. The model computes nominally (analog mode off) until a chip
    is programmed (:func:`correctnet.chip`); its layers use the variation model stored in the metadata.
    Reference models are built by name; other models from their recorded ``target`` class (its module must
    be importable: PYTHONPATH or installed). With ``model`` (a plain, non-analog instance of the saved
    architecture, e.g. of a class defined in a script) the weights are loaded into that instance instead:
    it is analogized in place with the stored variation and analog layer names, the stored compensators
    are attached, and names and shapes are checked first (a mismatch changes nothing and lists the
    missing, unexpected and shape-mismatched keys). Tied weights come back tied.

    Integrity: the digest (format 2: over the metadata and the tensors) must match, else the file was modified or
    damaged; format 1 files load with a warning (their metadata is not covered). Weights with NaN or infinite
    values are refused. Trust: the modules the metadata names are imported only if trusted (see the module
    docstring): built-in models, transformers, timm, modules already imported, and those in ``trust`` (module
    names or prefixes, ``trust=["mypkg"]``; ``trust=True``: any).
    """
    try:
        trust_list(trust)
    except ConfigError as e:
        raise CheckpointError(f"load_checkpoint: {e}") from None
    if model is not None:
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"model= must be an nn.Module instance, got {type(model).__name__}")
        if analog_layers(model):
            raise CheckpointError(f"model= must be the plain (non-analog) network; {type(model).__name__} already "
                                  f"has analog layers {list(analog_layers(model))[:4]}: pass correctnet.digitize(model) "
                                  f"or a fresh instance")
    path = Path(path)
    stored, meta = _stored_meta(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None
    _verify(path, stored, tensors)

    try:
        spec, var, analog = meta["model"], meta["variation"], meta.get("analog") or {}
        variation = make_variation(**var)

        layers = analog.get("layers")
        include: list[str] | None
        exclude: list[str]
        if layers is not None:  # exact names recorded at save (glob.escape: names are not patterns)
            include, exclude = [glob.escape(n) for n in layers], []
        else:
            include, exclude = analog.get("include"), analog.get("exclude") or []
        comp = meta.get("compensation")
        aliases = _check_aliases(path, meta.get("aliases") or {}, tensors)
        for alias, name in aliases.items():
            tensors[alias] = tensors[name]

        def prepare(m: nn.Module) -> nn.Module:
            with warnings.catch_warnings():  # the weights left digital were reported when the model was analogized
                warnings.simplefilter("ignore", getattr(analog_module, "DigitalWeightsWarning", UserWarning))
                analogize(m, variation, include=include, exclude=exclude, inplace=True)
            if comp:
                attach_from_spec(m, comp)
            _retie(m, aliases)
            return m

        if model is not None:
            what = f"the {type(model).__name__} instance passed as model="
            with torch.random.fork_rng(devices=[]):  # compensators' initialisation must not move the caller's RNG
                twin = copy.deepcopy(model)
                try:
                    prepare(twin)
                except ConfigError as e:  # e.g. a stored analog layer name the instance lacks: list what differs
                    plain = {k: v for k, v in tensors.items() if ".compensator." not in f".{k}"}
                    _check_state(path, model.state_dict(), plain, what)
                    raise CheckpointError(f"{path}: the {type(model).__name__} instance passed as model= does not "
                                          f"fit the checkpoint: {e}") from None
                _check_state(path, twin.state_dict(), tensors, what)
                del twin
                model = prepare(model)
        else:
            build = _builder(path, spec, prepare, trust)
            with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the caller's RNG
                try:
                    with torch.device("meta"):  # shapes only: nothing allocated before the file is known to fit
                        expected = build().state_dict()
                except CorrectNetError:
                    raise
                except Exception:  # noqa: BLE001 - a user constructor that cannot run on the meta device
                    if spec.get("target") is None:
                        raise
                    expected = None  # checked after the real build below
                note = (f". {spec['name']}() was built without arguments: the checkpoint does not record its "
                        f"constructor arguments; pass an instance: load_checkpoint(path, model=<plain instance>)"
                        if spec.get("target") is not None and spec.get("kwargs") is None
                        and not spec.get("transformers") else "")
                if expected is not None:
                    _check_state(path, expected, tensors, note=note)
                model = build()
                if expected is None:
                    _check_state(path, model.state_dict(), tensors, note=note)
        _check_ties(path, model, aliases, tensors)
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            model.to(dtypes.pop())  # a float64 export stays float64: outputs must be bit-identical
        model.load_state_dict(tensors, strict=True)
        _restore_input_ranges(path, model, analog.get("input_ranges") or {})
        _restore_variations(path, model, analog.get("variations") or {})
    except CheckpointError:
        raise
    except (CorrectNetError, KeyError, TypeError, ValueError, RuntimeError, AttributeError, RecursionError) as e:
        hint = ("; if its class is yours, pass an instance: load_checkpoint(path, model=MyNet(...))"
                if isinstance(meta.get("model"), dict) and "target" in meta["model"] and model is None else "")
        raise CheckpointError(f"{path}: cannot rebuild the model from this checkpoint "
                              f"({type(e).__name__}: {e}){hint}") from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, TypeError) as e:  # AssertionError: torch built without CUDA
        raise ConfigError(f"cannot use device {device!r} here ({e}); use device=cpu") from None
    return model.eval(), meta


def _builder(path: Path, spec: dict[str, Any], prepare: Callable[[nn.Module], nn.Module],
             trust: Trust = None) -> Callable[[], nn.Module]:
    """A function building the (analog, compensated, tied) model ``spec`` describes, importing only trusted
    modules."""
    if "target" not in spec:
        return lambda: prepare(build_model(spec["name"], spec["input_shape"], spec["num_classes"],
                                           **(spec.get("kwargs") or {})))
    if spec.get("transformers") is not None:
        hf = spec["transformers"]
        if not isinstance(hf, dict):
            raise CheckpointError(f"{path}: model.transformers must be a mapping, got {type(hf).__name__}")
        try:
            make = hf_from_spec(hf, trust=trust)
        except UntrustedModuleError as e:
            raise _untrusted(path, e) from None
        except ConfigError as e:
            raise CheckpointError(f"{path}: cannot rebuild the transformers model: {e}") from None
        return lambda: prepare(make())
    target, kwargs = spec["target"], spec.get("kwargs")
    if target is None:
        raise CheckpointError(f"{path}: the model ({spec.get('name', '?')}) cannot be rebuilt from the file: "
                              f"{spec.get('rebuild') or 'its class was not importable at save'}. Build the network "
                              f"yourself and pass it: load_checkpoint(path, model=<plain instance>)")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: model.kwargs must be a mapping or null, got {kwargs!r}")

    expected_class = spec.get("class")

    def build() -> nn.Module:
        try:
            m, _ = build_target(target, kwargs or {}, from_file=True, trust=trust)
        except UntrustedModuleError as e:
            raise _untrusted(path, e) from None
        except ConfigError as e:
            note = (" (the checkpoint does not record its constructor arguments, so it was called without "
                    "any)" if kwargs is None else "")
            raise CheckpointError(f"{path}: cannot rebuild the model: {e}{note}; pass an instance instead: "
                                  f"load_checkpoint(path, model=<plain instance>)") from None
        if expected_class is not None and target_name(type(m)) != expected_class:
            raise CheckpointError(f"{path}: {target} built a {target_name(type(m))}, but the checkpoint was saved "
                                  f"from a {expected_class}; pass an instance: load_checkpoint(path, model=...)")
        return prepare(m)
    return build


def _check_aliases(path: Path, aliases: Any, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    ok = isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())
    if not ok:
        raise CheckpointError(f"{path}: metadata 'aliases' must map names to stored tensor names, got {aliases!r}")
    bad = [f"{k} -> {v}" for k, v in aliases.items() if v not in tensors or k in tensors]
    if bad:
        raise CheckpointError(f"{path}: metadata 'aliases' do not fit the stored tensors: {', '.join(bad[:4])}")
    return aliases


def _check_ties(path: Path, model: nn.Module, aliases: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a model that shares a tensor between names the file stores with different values (loading
    would silently keep only one of them)."""
    clash = [f"{a} = {n}" for a, n in _aliases(model.state_dict()).items()
             if aliases.get(a) != n and a in tensors and n in tensors and not torch.equal(tensors[a], tensors[n])]
    if clash:
        raise CheckpointError(f"{path}: the model ties {', '.join(clash[:4])} (one tensor), but the checkpoint holds "
                              f"different values for them: it was saved from an untied model; build it untied and "
                              f"pass it: load_checkpoint(path, model=<plain instance>)")


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias the same Parameter/buffer as its stored name again (when the shapes agree)."""
    for alias, name in aliases.items():
        try:
            owner, leaf = _owner(model, alias)
            src_owner, src_leaf = _owner(model, name)
        except AttributeError:
            continue  # reported by the state check as missing
        for table in ("_parameters", "_buffers"):
            src = getattr(src_owner, table).get(src_leaf)
            dst = getattr(owner, table)
            if src is not None and dst.get(leaf) is not None and dst[leaf] is not src \
                    and dst[leaf].shape == src.shape:
                dst[leaf] = src


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf

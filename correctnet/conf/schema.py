"""The schemas of the config groups, built from the library's typed configs: one source of defaults.

:func:`register` stores in Hydra's ConfigStore one node per group the library configures, named ``schema``:

=================  ===========================================================================================
group              fields and defaults from
=================  ===========================================================================================
``training``       :class:`~correctnet.training.TrainConfig`, + ``lipschitz``
                   (:class:`~correctnet.lipschitz.LipschitzRegularizer`'s keyword defaults)
``compensation``   :class:`~correctnet.calibration.CompensationConfig`, + ``placement`` and
                   :func:`~correctnet.compensation.attach_compensation`'s ``kind``, ``rank``, ``affine``
``calibration``    :class:`~correctnet.calibration.CalibrationConfig`, + ``enabled``
``placement``      :class:`~correctnet.placement.SearchConfig`, + ``strategy`` and ``ppo``
                   (:class:`~correctnet.placement.PPOConfig`)
=================  ===========================================================================================

The ``model`` group's ``hf`` option starts from ``hf_schema`` (:func:`model_schemas`), built from
:func:`~correctnet.models.hf_model`'s keyword defaults the same way.

Every YAML option of these groups starts from its schema (``defaults: [schema, _self_]``) and states only what
it changes, so ``TrainConfig()`` in a script and ``correctnet train`` run the same experiment; a key the library
does not know is refused when the config is composed. ``seed`` is the job's top-level ``seed``. Values are typed
``Any`` here on purpose: they are validated in one place, by the library's configs, with one message naming the
key and what is accepted. Importing :mod:`correctnet.conf` registers the schemas (``train`` and the doc check do).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from typing import Any, Callable

from hydra.core.config_store import ConfigStore

from ..calibration import CalibrationConfig, CompensationConfig
from ..compensation import attach_compensation
from ..lipschitz import LipschitzRegularizer
from ..models import hf_model
from ..placement import PPOConfig, SearchConfig
from ..training import TrainConfig

NAME = "schema"  # the option name each group's YAML files list first in their defaults


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _field(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, type):
        return dataclasses.field(default_factory=value)
    if isinstance(value, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.copy, value))
    return dataclasses.field(default=value)


def _node(name: str, defaults: dict[str, Any]) -> type:
    """A dataclass (for OmegaConf) with one ``Any`` field per key of ``defaults``, in that order."""
    return dataclasses.make_dataclass(name, [(k, Any, _field(_plain(v))) for k, v in defaults.items()])


def _fields(cls: type, *, skip: tuple[str, ...] = ("seed",)) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}


def keyword_defaults(fn: Callable[..., Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``{key: default}`` of ``fn``'s keyword parameters ``keys`` (the library's defaults of a function)."""
    params = inspect.signature(fn).parameters
    return {k: params[k].default for k in keys}


def schemas() -> dict[str, type]:
    """group -> its schema node (a dataclass whose defaults are the library's)."""
    lipschitz = _node("LipschitzSchema", keyword_defaults(
        LipschitzRegularizer.__init__, ("kind", "strength", "target", "samples", "per_channel", "centered")))
    ppo = _node("PPOSchema", _fields(PPOConfig, skip=()))
    return {
        "training": _node("TrainingSchema", {**_fields(TrainConfig), "lipschitz": lipschitz}),
        "compensation": _node("CompensationSchema", {
            "placement": None, **keyword_defaults(attach_compensation, ("kind", "rank", "affine")),
            **_fields(CompensationConfig)}),
        "calibration": _node("CalibrationSchema", {"enabled": False, **_fields(CalibrationConfig)}),
        "placement": _node("PlacementSchema", {"strategy": None, **_fields(SearchConfig), "seed": "${seed}",
                                               "ppo": ppo}),
    }


def model_schemas() -> dict[str, dict[str, Any]]:
    """Options of the ``model`` group built from a library function: ``hf_schema`` (``model=hf``), the target
    :func:`~correctnet.models.hf_model` and its keyword defaults (plain mappings, open: the model type's config
    keys go beside them)."""
    return {"hf_schema": {"_target_": f"{hf_model.__module__}.{hf_model.__name__}",
                          **keyword_defaults(hf_model, ("task", "num_labels", "num_channels", "image_size"))}}


def internal_options() -> dict[str, set[str]]:
    """The options of each group that only other options build on (the schemas): hidden from ``--help`` and
    refused on the command line."""
    hidden: dict[str, set[str]] = {group: {NAME} for group in schemas()}
    hidden.setdefault("model", set()).update(model_schemas())
    return hidden


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for group, node in schemas().items():
        cs.store(group=group, name=NAME, node=node)
    for name, options in model_schemas().items():
        cs.store(group="model", name=name, node=options)

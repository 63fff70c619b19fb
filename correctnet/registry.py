"""The variation models by name (``variation.name`` in configs and checkpoints): ``lognormal``, ``gaussian``
(:mod:`correctnet.variation`) and ``rram`` (:mod:`correctnet.devices`)."""
from __future__ import annotations

from typing import Any

from .devices import RRAM
from .errors import ConfigError
from .variation import Gaussian, LogNormal, VariationModel

VARIATIONS: dict[str, type[VariationModel]] = {m.name: m for m in (LogNormal, Gaussian, RRAM)}


def make_variation(name: str, sigma: float, **kwargs: Any) -> VariationModel:
    """Build a variation model by name; unknown names and bad parameters raise ``ConfigError``."""
    if name not in VARIATIONS:
        raise ConfigError(f"variation.name must be one of {sorted(VARIATIONS)}, got {name!r}")
    try:
        return VARIATIONS[name](sigma=sigma, **kwargs)
    except TypeError as e:  # unexpected keyword
        raise ConfigError(f"bad parameters for variation {name!r}: {e}") from None

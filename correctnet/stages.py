"""The pipeline's stages: the keys of ``metrics.json["stages"]``, shared by training, evaluation and aggregation.

A run records its stages in pipeline order. The first (training) stage is one of ``BASELINE`` (plain training;
also the vanilla reference of the CorrectNet presets), ``NOISE_AWARE`` or ``SUPPRESSED`` (Lipschitz term);
``COMPENSATED`` is the network with digital compensation modules, one set for every chip (trained with the
network or after it); ``CALIBRATED`` is that network calibrated on each chip.
"""
from __future__ import annotations

import enum


class Stage(str, enum.Enum):
    """A pipeline stage; a ``str`` (its value is the metrics.json key, e.g. ``Stage.BASELINE == "baseline"``)."""

    BASELINE = "baseline"
    NOISE_AWARE = "noise_aware"
    SUPPRESSED = "suppressed"
    COMPENSATED = "compensated"
    CALIBRATED = "calibrated"

    def __str__(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        """How tables name the stage."""
        return _LABELS[self]

    @property
    def rank(self) -> int:
        """0 for a training stage, 1 compensated, 2 calibrated: a method's final stage has the highest rank."""
        return {Stage.COMPENSATED: 1, Stage.CALIBRATED: 2}.get(self, 0)


_LABELS = {Stage.BASELINE: "vanilla", Stage.NOISE_AWARE: "noise-aware", Stage.SUPPRESSED: "Lipschitz-suppressed",
           Stage.COMPENSATED: "CorrectNet chip-agnostic", Stage.CALIBRATED: "CorrectNet calibrated"}
TRAINING_STAGES = (Stage.BASELINE, Stage.NOISE_AWARE, Stage.SUPPRESSED)


def stage_label(name: str) -> str:
    """The table label of a stage name (the name itself when it is not a known stage)."""
    try:
        return Stage(name).label
    except ValueError:
        return name


def stage_rank(name: str, unknown: int = 3) -> int:
    """:attr:`Stage.rank` of a stage name (``unknown`` when it is not a known stage)."""
    try:
        return Stage(name).rank
    except ValueError:
        return unknown


__all__ = ["Stage", "TRAINING_STAGES", "stage_label", "stage_rank"]

"""``python -m correctnet.train``: the Hydra entry point that strings the stages together.

Stages: train (plain, noise-aware and/or Lipschitz-suppressed) -> clean and Monte-Carlo evaluation on the
test split -> optionally a placement search (``placement=ppo|exhaustive|greedy|...``) that chooses the layers
to compensate -> optionally compensation modules trained on sampled chips (stage ``compensated``) -> optionally
per-chip calibration of every evaluation chip (stage ``calibrated``) -> checkpoint + ``metrics.json`` in
the Hydra run directory. This is the only module that reads config.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .analog import analogize, calibrate_input_ranges, check_range_settings, nominal, set_variation
from .calibration import (CalibrationConfig, ChipCalibrator, CompensationConfig, calibrates_anything, calibration_images,
                          check_compensation, teacher_logits, teacher_network, train_compensation)
from .checkpoint import checkpoint_digest, save_checkpoint, versions
from .io import atomic_write
from .compensation import KINDS, attach_compensation, compensation_spec, keep_compensation, overhead, resolve_placement
from .data import DataSplits, dataset_from_config
from . import conf  # where the config groups are: conf.DIR, conf.CONFIG_PATH
from .conf import schema
from .conf.schema import keyword_defaults, schemas  # importing correctnet.conf registers the groups' schemas
from .errors import ConfigError, CorrectNetError, is_int
from .evaluate import MAX_CHIPS, clean_accuracy, evaluate_command, format_summary, monte_carlo, python_command
from .lipschitz import LipschitzRegularizer, error_profile, input_shapes, lipschitz_constants
from .models import check_fits, model_from_config
from .placement import Placement, PlacementEvaluator, PPOConfig, SearchConfig, search
from .placement.evaluator import random_options, search_ranks
from .placement.search import STRATEGIES
from .plots import plot_layer_profile
from .progress import CONSOLE
from .evaluate import eval_batch_size, resolve_chips_per_pass, resolve_device
from .tensors import eval_mode, first_samples, forward_precision, logits_of
from .resume import MODES as RESUME_MODES
from .resume import ResumeStore, open_store
from .runtime import resolve_progress, resolve_threads, resolve_workers
from .seeding import Stream
from .stages import Stage, stage_label
from .training import TrainConfig, TrainingDivergedError, train, training_variation
from .registry import make_variation
from . import runlock
from .variation import VariationModel

log = logging.getLogger("correctnet")


def _section(node: Any) -> dict[str, Any]:
    """A config node as a plain dict, interpolations resolved (the keys of a DictConfig from Hydra are strings)."""
    params = OmegaConf.to_container(node, resolve=True)
    assert isinstance(params, dict)
    return cast("dict[str, Any]", params)


def _variation(cfg: DictConfig):
    params = _section(cfg.variation)
    name = params.pop("name", None)
    return make_variation(name, **params)


def _train_config(cfg: DictConfig) -> tuple[TrainConfig, dict[str, Any]]:
    params = _section(cfg.training)
    lipschitz = params.pop("lipschitz", None) or {"strength": 0.0}
    known = set(TrainConfig.__dataclass_fields__)
    unknown = set(params) - known
    if unknown:
        raise ConfigError(f"unknown training keys {sorted(unknown)}; accepted: {sorted(known | {'lipschitz'})}")
    return TrainConfig(seed=cfg.seed, **params), lipschitz




def _ranges_config(cfg: DictConfig) -> dict[str, Any]:
    """``analog.ranges``: how fixed-range DACs get each layer's input range (``calibrate_input_ranges`` settings and
    the number of training images it runs on), checked before any work."""
    given = {k: v for k, v in (_section(cfg.analog).get("ranges") or {}).items() if v is not None}
    accepted = keyword_defaults(calibrate_input_ranges, ("percentile", "estimator", "std_factor", "momentum"))
    unknown = set(given) - set(accepted) - {"images"}
    if unknown:
        raise ConfigError(f"unknown analog.ranges key(s) {sorted(unknown)}; accepted: {', '.join(accepted)}, images")
    ranges = {**accepted, **given}
    images = ranges.get("images")
    if images is None or not is_int(images) or images < 1:
        raise ConfigError(f"analog.ranges.images must be an integer >= 1, got {images!r}")
    try:
        check_range_settings(**{k: v for k, v in ranges.items() if k != "images"})
    except ConfigError as e:
        raise ConfigError(f"analog.ranges: {e}") from None
    return ranges


def _calibrate_ranges(model: torch.nn.Module, train_data: Any, ranges: dict[str, Any], when: str,
                      batch_size: int, batch_statistics: bool = False) -> None:
    """Set the fixed DAC ranges of ``model``'s analog layers from the first ``ranges["images"]`` training images
    (``batch_statistics``: BatchNorm on each batch's statistics, as training will run; before training)."""
    x = first_samples(train_data, ranges["images"]).tensors[0]
    dev = next(model.parameters()).device
    found = calibrate_input_ranges(model, [x[i:i + batch_size].to(dev) for i in range(0, len(x), batch_size)],
                                   **{k: v for k, v in ranges.items() if k != "images"},
                                   batch_statistics=batch_statistics)
    log.info("input ranges %s (%s on %d training images%s): %s", when, ranges["estimator"], len(x),
             ", BatchNorm on batch statistics" if batch_statistics else "",
             ", ".join(f"{n} {r:.3g}" for n, r in found.items()))


def _regularizer(params: dict[str, Any], seed: int) -> LipschitzRegularizer | None:
    """The configured regularizer (validated), or None when its strength is 0."""
    accepted = {"kind", "strength", "target", "samples", "per_channel", "centered"}
    unknown = set(params) - accepted
    if unknown:
        raise ConfigError(f"unknown training.lipschitz keys {sorted(unknown)}; accepted: {sorted(accepted)}")
    reg = LipschitzRegularizer(**{"strength": 0.0, **params}, seed=seed)  # other defaults: the class's own
    return reg if reg.strength > 0 else None


_ATTACH_KEYS = ("kind", "rank", "affine")


def _compensation_config(cfg: DictConfig) -> tuple[Any, dict[str, Any], CompensationConfig | None]:
    """(placement or None, attach kwargs, training config) from ``cfg.compensation``."""
    params = _section(cfg.compensation) if cfg.get("compensation") is not None else {}
    placement = params.pop("placement", None)
    attach = {**keyword_defaults(attach_compensation, _ATTACH_KEYS),
              **{k: params.pop(k) for k in _ATTACH_KEYS if k in params}}
    known = set(CompensationConfig.__dataclass_fields__) - {"seed"}
    unknown = set(params) - known
    if unknown:
        raise ConfigError(f"unknown compensation keys {sorted(unknown)}; accepted: "
                          f"{sorted(known | set(_ATTACH_KEYS) | {'placement'})}")
    kind, rank, affine = attach["kind"], attach["rank"], attach["affine"]
    if kind not in KINDS:
        raise ConfigError(f"compensation.kind must be one of {list(KINDS)}, got {kind!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"compensation.rank must be an integer >= 0, got {rank!r}")
    if not isinstance(affine, bool):
        raise ConfigError(f"compensation.affine must be true or false, got {affine!r}")
    if placement is None:
        return None, attach, None
    if not isinstance(placement, (str, list, dict)):
        raise ConfigError(f"compensation.placement must be 'all', a list of layer names or a mapping "
                          f"{{layer: rank}}, got {placement!r}")
    return placement, attach, CompensationConfig(seed=cfg.seed, **params)


def _placement_config(cfg: DictConfig) -> tuple[str | None, SearchConfig | None, PPOConfig | None]:
    """(strategy or None, scoring settings, PPO settings) from ``cfg.placement``."""
    params = _section(cfg.placement) if cfg.get("placement") is not None else {}
    strategy = params.pop("strategy", None)
    if strategy is None:
        return None, None, None
    if strategy not in STRATEGIES:
        raise ConfigError(f"placement.strategy must be one of {list(STRATEGIES)} or null, got {strategy!r}")
    ppo = params.pop("ppo", None) or {}
    known, known_ppo = set(SearchConfig.__dataclass_fields__), set(PPOConfig.__dataclass_fields__)
    for keys, ok, where in ((set(params), known, "placement"), (set(ppo), known_ppo, "placement.ppo")):
        if keys - ok:
            raise ConfigError(f"unknown {where} keys {sorted(keys - ok)}; accepted: {sorted(ok)}")
    return strategy, SearchConfig(**params), PPOConfig(**ppo)


def _calibration_config(cfg: DictConfig) -> CalibrationConfig | None:
    params = _section(cfg.calibration) if cfg.get("calibration") is not None else {}
    enabled = params.pop("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"calibration.enabled must be true or false, got {enabled!r}")
    known = set(CalibrationConfig.__dataclass_fields__) - {"seed"}
    unknown = set(params) - known
    if unknown:
        raise ConfigError(f"unknown calibration keys {sorted(unknown)}; accepted: {sorted(known | {'enabled'})}")
    return CalibrationConfig(seed=cfg.seed, **params) if enabled else None


def _positive_int(cfg: DictConfig, key: str, high: int | None = None) -> int:
    v = OmegaConf.select(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (high is not None and v > high):
        raise ConfigError(f"{key} must be an integer >= 1{'' if high is None else f' and <= {high}'}, got {v!r}")
    return v


def _resume_record(resolved: dict[str, Any], vers: dict[str, str], threads: int) -> dict[str, Any]:
    """What identifies a run for resuming: its resolved config (minus ``progress`` and ``resume``), versions and
    the torch thread count (CPU results may differ in the last bit between thread counts)."""
    return {"config": {k: v for k, v in resolved.items() if k not in ("progress", "resume")}, "versions": vers,
            "torch_threads": threads}


def _prefixed(key: str, error: CorrectNetError) -> CorrectNetError:
    """``error`` of the same class with ``key`` in front of its message (when it does not name it yet)."""
    return error if str(error).startswith(key) else type(error)(f"{key}: {error}")


@dataclasses.dataclass
class Job:
    """A validated pipeline config: what :func:`run` will do, decided before any work starts."""

    cfg: DictConfig
    resume_mode: str
    progress: bool
    threads: int
    workers: int                        # processes the Monte-Carlo chips are spread over
    variation: VariationModel           # the chips the stages are evaluated on
    train_variation: VariationModel     # what noise-aware training draws (recorded; train() applies it)
    tcfg: TrainConfig
    lip_params: dict[str, Any]
    regularizer: LipschitzRegularizer | None
    placement: Any                      # as configured; resolved to {layer: rank} by prepare()
    attach_kw: dict[str, Any]
    comp_cfg: CompensationConfig | None
    cal_cfg: CalibrationConfig | None
    strategy: str | None
    search_cfg: SearchConfig | None
    ppo_cfg: PPOConfig | None
    use_reference: bool
    n_chips: int
    profile_chips: int
    profile_samples: int
    eval_batch: int
    chips_per_pass: int | None          # None: monte_carlo chooses (1 on CPU, from free memory on CUDA)
    eval_precision: str                 # the evaluation forward's autocast dtype (float32: none)
    eval_seed: int
    device: torch.device
    ranges: dict[str, Any] | None = None  # fixed-range DACs: how each layer's input range is measured (analog.ranges)

    @property
    def joint(self) -> bool:
        """Compensators trained with the network (``compensation.joint``)."""
        return self.comp_cfg is not None and self.comp_cfg.joint

    @property
    def base_stage(self) -> Stage:
        if self.joint:
            return Stage.COMPENSATED
        return Stage.SUPPRESSED if self.regularizer else Stage.NOISE_AWARE if self.tcfg.noise_aware else Stage.BASELINE

    @property
    def trains_reference(self) -> bool:
        """A separate vanilla reference is trained (the base training is not plain training already)."""
        return self.use_reference and (self.regularizer is not None or self.tcfg.noise_aware or self.joint
                                       or self.tcfg.distill > 0)


@functools.lru_cache(maxsize=1)
def config_keys() -> dict[str, list[str] | None]:
    """The keys of the main config (``config.yaml`` in :data:`correctnet.conf.DIR`): top-level key -> its accepted
    sub-keys for the plain sections (``analog``, ``evaluation``, ``checkpoint``), None for config groups and scalars
    (groups are checked by their schemas or by the library: ``model`` is open, its keys go to the user's
    constructor)."""
    primary = OmegaConf.load(conf.DIR / "config.yaml")
    assert isinstance(primary, DictConfig)
    keys: dict[str, list[str] | None] = {}
    for entry in primary.get("defaults", []):
        if isinstance(entry, DictConfig):
            keys.update({str(group).split("@")[0].lstrip("/"): None for group in entry
                         if not str(group).startswith(("override ", "hydra/"))})
    for k, v in primary.items():
        if k not in ("defaults", "hydra"):
            keys[str(k)] = [str(sub) for sub in v] if isinstance(v, DictConfig) else None
    return keys


def _check_keys(cfg: DictConfig) -> None:
    """Refuse keys the config does not have (``+foo=1`` adds them without complaint; they would do nothing)."""
    known = config_keys()
    unknown = sorted(str(k) for k in cfg if k not in known and k != "hydra")
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; accepted: {', '.join(known)} (+KEY=VALUE adds a key "
                          f"only where the config is open, e.g. +model.ARG=VALUE for a model's constructor)")
    for section, subkeys in known.items():
        node = cfg.get(section)
        if subkeys is not None and isinstance(node, DictConfig):
            extra = sorted(str(k) for k in node if k not in subkeys)
            if extra:
                raise ConfigError(f"unknown {section} key(s) {extra}; accepted: {', '.join(subkeys)}")


def validate(cfg: DictConfig) -> Job:
    """Every check that needs no data: a :class:`ConfigError` naming the key, its value and what is accepted."""
    _check_keys(cfg)
    seed = cfg.get("seed")
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    resume_mode = cfg.get("resume", "auto")
    if resume_mode not in RESUME_MODES:
        raise ConfigError(f"resume must be one of {list(RESUME_MODES)}, got {resume_mode!r}")
    progress = resolve_progress(cfg.get("progress", "auto"))
    threads = resolve_threads(cfg.get("threads", "auto"))
    workers = resolve_workers(cfg.evaluation.get("workers", "auto"), threads)
    variation = _variation(cfg)
    ranges = _ranges_config(cfg) if variation.needs_input_range else None
    tcfg, lip_params = _train_config(cfg)
    if tcfg.learn_input_ranges and ranges is None:
        raise ConfigError("training.learn_input_ranges=true trains the ranges of fixed-range DACs: set "
                          "variation.dac_range to a number (e.g. variation=rram_periphery variation.dac_range=1.0)")
    regularizer = _regularizer(lip_params, cfg.seed)
    train_variation = training_variation(variation, tcfg)
    placement, attach_kw, comp_cfg = _compensation_config(cfg)
    cal_cfg = _calibration_config(cfg)
    strategy, search_cfg, ppo_cfg = _placement_config(cfg)
    if strategy is not None and comp_cfg is None:
        raise ConfigError(f"placement.strategy={strategy} searches where compensation goes, but no compensation is "
                          f"configured: add compensation=all (its kind, rank and training settings are used)")
    if search_cfg is not None and search_cfg.score == "calibrated" and cal_cfg is None:
        raise ConfigError("placement.score=calibrated scores calibrated search chips, but calibration is off: add "
                          "calibration=per_chip, or placement.score=chip_agnostic")
    use_reference = cfg.get("reference", False)
    if not isinstance(use_reference, bool):
        raise ConfigError(f"reference must be true or false, got {use_reference!r}")
    if tcfg.distill > 0 and not use_reference:
        raise ConfigError(f"training.distill={tcfg.distill} distills the vanilla reference into the trained network: "
                          "set reference=true, or training.distill=0")
    if cal_cfg is not None and cal_cfg.teacher == "reference" and not use_reference:
        raise ConfigError("calibration.teacher=reference needs the vanilla reference: set reference=true")
    if cal_cfg is not None and cal_cfg.teacher == "auto" and not use_reference:
        raise ConfigError("calibration.teacher=auto chooses between the chip ensemble and the vanilla reference, "
                          "which needs reference=true; or set calibration.teacher=ensemble")
    device = resolve_device(cfg.device)
    eval_seed = cfg.evaluation.seed
    eval_precision = str(cfg.evaluation.get("precision", "float32"))
    forward_precision(device, eval_precision, "evaluation.precision")
    if isinstance(eval_seed, bool) or not isinstance(eval_seed, int) or eval_seed < 0:
        raise ConfigError(f"evaluation.seed must be an integer >= 0, got {eval_seed!r}")
    return Job(cfg=cfg, resume_mode=resume_mode, progress=progress, threads=threads, workers=workers,
               variation=variation, train_variation=train_variation, tcfg=tcfg, lip_params=lip_params,
               regularizer=regularizer, placement=placement, attach_kw=attach_kw, comp_cfg=comp_cfg, cal_cfg=cal_cfg,
               strategy=strategy, search_cfg=search_cfg, ppo_cfg=ppo_cfg, use_reference=use_reference,
               n_chips=_positive_int(cfg, "evaluation.n_chips", MAX_CHIPS),
               profile_chips=_positive_int(cfg, "evaluation.profile_chips"),
               profile_samples=_positive_int(cfg, "evaluation.profile_samples"),
               eval_batch=eval_batch_size(cfg.evaluation.batch_size, device), eval_seed=eval_seed, device=device,
               chips_per_pass=resolve_chips_per_pass(cfg.evaluation.get("chips_per_pass", "auto")), ranges=ranges,
               eval_precision=eval_precision)


@dataclasses.dataclass
class Workspace:
    """What the stages share: the job, the data splits, the analog model, the run directory and its resume store."""

    job: Job
    out_dir: Path
    data: DataSplits
    model: torch.nn.Module
    model_spec: dict[str, Any]
    include: list[str] | None
    placement: dict[str, int] | None    # resolved; None until chosen when a search decides it
    store: ResumeStore | None
    resolved: dict[str, Any]            # the resolved config, as recorded
    vers: dict[str, str]
    example: torch.Tensor               # one test input [1, *input_shape] (overheads, Lipschitz constants)

    def measure(self, m: torch.nn.Module, desc: str = "chips", clean: float | None = None, **kw: Any) -> dict[str, Any]:
        """Clean accuracy (unless given) and the Monte-Carlo evaluation of ``m`` on the test split."""
        j, t0 = self.job, time.perf_counter()
        mc = monte_carlo(m, self.data.test, n_chips=j.n_chips, seed=j.eval_seed, batch_size=j.eval_batch,
                         progress=j.progress, desc=desc, workers=j.workers, chips_per_pass=j.chips_per_pass,
                         precision=j.eval_precision, **kw)
        if clean is None:
            clean = clean_accuracy(m, self.data.test, batch_size=j.eval_batch, precision=j.eval_precision)
        return {"clean_accuracy": clean, "mc": mc.to_dict(), "eval_seconds": time.perf_counter() - t0}

    def profile(self, m: torch.nn.Module, stage: Stage) -> dict[str, Any]:
        """Per-layer Lipschitz constants and error-amplification profile of ``m``, plotted into the run directory."""
        j, v = self.job, self.job.variation
        lipschitz = lipschitz_constants(m, self.example)
        profile = error_profile(m, self.data.test.tensors[0][:j.profile_samples], n_chips=j.profile_chips,
                                seed=j.eval_seed)
        plot = plot_layer_profile(lipschitz, profile, self.out_dir / f"layer_profile_{stage}.png",
                                  title=f"{self.model_spec['name']} on {self.data.name}, {stage}, {v.name} sigma={v.sigma:g}")
        return {"lipschitz": lipschitz, "plot": plot.name,
                "error_profile": {"n_chips": j.profile_chips, "n_samples": j.profile_samples, "seed": j.eval_seed,
                                  "relative_error": profile}}


def prepare(job: Job, out_dir: Path) -> Workspace:
    """Build the data splits and the analog model, then run the checks that need them; opens the resume store."""
    cfg = job.cfg
    torch.set_num_threads(job.threads)  # before any work (the dataset and the model are built next)
    model_params = _section(cfg.model)
    data = dataset_from_config(_section(cfg.dataset), seed=cfg.seed)
    data = dataclasses.replace(data, test=first_samples(data.test, cfg.evaluation.get("test_samples")))
    torch.manual_seed(cfg.seed)
    model, model_spec = model_from_config(model_params, data.input_shape, data.num_classes)  # built-in or _target_
    if "target" in model_spec:  # the user's or a zoo's: channels and classes must fit the data (one dry forward)
        check_fits(model, data.train.tensors[0][:1], data.num_classes, model_spec["kwargs"])
    include = list(cfg.analog.include) if cfg.analog.include is not None else None
    try:
        model = analogize(model, job.variation, include=include, exclude=list(cfg.analog.exclude), inplace=True)
    except ConfigError as e:
        key = "analog.include" if include and any(repr(p) in str(e) for p in include) else "analog.exclude"
        raise _prefixed(key if "pattern" in str(e) else "analog", e) from None
    model = model.to(job.device)
    if job.ranges is not None:  # fixed-range DACs: the ranges noise-aware training starts from (and learns, if asked)
        _calibrate_ranges(model, data.train, job.ranges, "before training", job.eval_batch, batch_statistics=True)
    placement = None
    if job.placement is not None:
        try:  # bad names fail before training
            placement = resolve_placement(model, job.placement, job.attach_kw["rank"])
        except ConfigError as e:
            raise _prefixed("compensation.placement", e) from None
    cal = job.cal_cfg
    if job.strategy is not None and len(data.val) == 0:
        raise ConfigError("the placement search scores placements on the validation split, which is empty; "
                          "set dataset.val_fraction > 0")
    if job.search_cfg is not None and job.search_cfg.val_images >= len(data.val) and (
            (cal is not None and cal.teacher == "auto")
            or (job.comp_cfg is not None and job.comp_cfg.check_chips > 0 and not job.joint)):
        # a later choice (the calibration teacher, the compensation check) needs validation images the search did not
        # score placements on: the search keeps the first half of a small validation split
        job.search_cfg = dataclasses.replace(job.search_cfg, val_images=max(len(data.val) // 2, 1))
        log.info("placement search: scoring on the first %d of the %d validation images (the rest are kept for %s)",
                 job.search_cfg.val_images, len(data.val),
                 "the calibration teacher's choice" if cal is not None else "the compensation check")
    if cal is not None and cal.teacher == "auto" and len(data.val) == 0:
        raise ConfigError("calibration.teacher=auto scores the candidate teachers on the validation split, which is "
                          "empty; set dataset.val_fraction > 0 or choose calibration.teacher=ensemble|self|reference")
    if cal is not None and cal.n_images > len(data.train):  # e.g. the preset's 4,000 on the digits default
        log.info("calibration.n_images=%d is more than the %d training images: each chip calibrates on all of them",
                    cal.n_images, len(data.train))
        job.cal_cfg = cal = dataclasses.replace(cal, n_images=len(data.train))
    if cal is not None and placement is None and not calibrates_anything(model, cal):
        raise ConfigError("calibration=per_chip needs compensation modules (compensation=all or "
                          "compensation.placement=[...]), biases to fit (calibration.biases=true) or a model with "
                          "BatchNorm to re-estimate")
    log.info("%s on %s (%d train / %d val / %d test), %d parameters, device %s", model_spec["name"], data.name,
             len(data.train), len(data.val), len(data.test), sum(p.numel() for p in model.parameters()), job.device,
             extra=CONSOLE)
    resolved = _section(cfg)
    resolved["evaluation"]["batch_size"] = job.eval_batch  # "auto" recorded as the size used: replays use it
    if cal is not None:
        resolved["calibration"]["n_images"] = cal.n_images  # the number used (capped at the training split)
    if job.search_cfg is not None:
        resolved["placement"]["val_images"] = job.search_cfg.val_images  # the number used (see above)
    vers = versions() | {"numpy": np.__version__, "python": platform.python_version()}
    store = open_store(out_dir / "resume", job.resume_mode, _resume_record(resolved, vers, job.threads))
    if job.regularizer is not None:  # conv layers need their input shapes for the spectral form
        job.regularizer.shapes = input_shapes(model, data.train.tensors[0][:1].to(job.device))
    return Workspace(job=job, out_dir=out_dir, data=data, model=model, model_spec=model_spec, include=include,
                     placement=placement, store=store, resolved=resolved, vers=vers,
                     example=data.test.tensors[0][:1].to(job.device))


@dataclasses.dataclass
class StageResult:
    """One stage's entry of ``metrics.json["stages"]``."""

    stage: Stage
    record: dict[str, Any]


def train_reference(ws: Workspace) -> tuple[torch.nn.Module, StageResult]:
    """The vanilla reference (same initialisation and epochs, plain training): the original accuracy and vanilla
    under variation (stage ``baseline``)."""
    j = ws.job
    reference = copy.deepcopy(ws.model)
    t0 = time.perf_counter()
    plain = dataclasses.replace(j.tcfg, noise_aware=False, chips_per_step=1, distill=0.0, learn_input_ranges=False,
                                input_range_decay=0.0, weight_clip=None)
    history = train(reference, ws.data.train, ws.data.val, plain,
                    progress=j.progress, stage=Stage.BASELINE.value, resume=ws.store, resume_key="reference")
    if j.ranges is not None:  # the trained network's inputs, not the initial one's
        _calibrate_ranges(reference, ws.data.train, j.ranges, "after vanilla training", j.eval_batch)
    seconds = time.perf_counter() - t0
    _check_outputs(reference, ws.data.test, Stage.BASELINE)
    set_variation(reference, j.variation)
    record = {**ws.measure(reference, desc=Stage.BASELINE.value),
              "training": {"noise_aware": False, "noise_variation": None, "lipschitz": None, "epochs": j.tcfg.epochs,
                           "seconds": seconds, "history": history},
              "reference": True, **ws.profile(reference, Stage.BASELINE)}
    return reference, StageResult(Stage.BASELINE, record)


def train_base(ws: Workspace, reference: torch.nn.Module | None = None) -> tuple[dict[str, Any], StageResult | None]:
    """Base training (plain, noise-aware and/or Lipschitz; with ``training.distill`` also distilling the clean
    ``reference``); with ``compensation.joint`` the compensators are attached first and train with the network.
    Returns the training record and, unless the compensators trained jointly (their stage is recorded by
    :func:`compensate`), the stage."""
    j, model = ws.job, ws.model
    teacher = None
    if j.tcfg.distill > 0:
        assert reference is not None  # validate() requires reference=true
        teacher = _clean_logits(reference)
    stage = j.base_stage
    on_step = None
    if j.joint:
        assert ws.placement is not None
        if j.strategy is not None:  # a supernet: the largest option everywhere, random options switched on per step
            assert j.search_cfg is not None
            ranks = search_ranks(j.search_cfg, j.attach_kw["rank"])
            comps = attach_compensation(model, list(ws.placement), seed=j.cfg.seed,
                                        **{**j.attach_kw, "rank": max(ranks)})
            on_step = random_options(list(comps.values()), ranks, j.search_cfg.active_prob, j.search_cfg.seed)
        else:
            attach_compensation(model, ws.placement, seed=j.cfg.seed, **j.attach_kw)
    t0 = time.perf_counter()
    history = train(model, ws.data.train, ws.data.val, j.tcfg, regularizer=j.regularizer, progress=j.progress,
                    stage=stage.value, resume=ws.store, teacher=teacher, on_step=on_step)
    seconds = time.perf_counter() - t0
    _check_outputs(model, ws.data.test, stage)
    if j.ranges is not None and not j.tcfg.learn_input_ranges:  # the trained network's inputs (learned: as trained)
        _calibrate_ranges(model, ws.data.train, j.ranges, "after training", j.eval_batch)
    set_variation(model, j.variation)
    training = {"noise_aware": j.tcfg.noise_aware,
                "noise_variation": j.train_variation.to_dict() if j.tcfg.noise_aware else None,
                "lipschitz": j.lip_params if j.regularizer else None, "epochs": j.tcfg.epochs,
                "distill": j.tcfg.distill, "seconds": seconds, "history": history, "joint_compensation": j.joint}
    if j.joint:
        return training, None
    return training, StageResult(stage, {**ws.measure(model), "training": training, **ws.profile(model, stage)})


def _clean_logits(net: torch.nn.Module):
    """``x -> logits`` of ``net`` with nominal weights, in eval mode (a fixed teacher for distillation)."""
    def logits(x: torch.Tensor) -> torch.Tensor:
        with nominal(net), eval_mode(net):
            return logits_of(net(x))
    return logits


def search_placement(ws: Workspace, reference: torch.nn.Module | None = None
                     ) -> tuple[PlacementEvaluator, Placement, dict[str, Any]]:
    """The placement search (``placement.strategy``): the evaluator, the chosen placement and its metrics record.
    With ``placement.score=calibrated`` every search chip is calibrated (``calibration`` settings, its steps
    ``placement.calibration_steps``) before it is scored, towards the vanilla ``reference`` (or the clean network)."""
    j = ws.job
    assert j.strategy is not None and j.search_cfg is not None and j.comp_cfg is not None
    layers = list(ws.placement) if ws.placement is not None else None
    calibration, teacher = None, None
    if j.search_cfg.score == "calibrated":
        assert j.cal_cfg is not None  # validate() requires it
        teacher = reference if j.cal_cfg.teacher in ("reference", "auto", "ensemble") and reference is not None else None
        calibration = dataclasses.replace(j.cal_cfg, steps=j.search_cfg.calibration_steps,
                                          teacher="reference" if teacher is not None else "self",
                                          n_images=min(j.cal_cfg.n_images, 1000))
    return _search(ws.model, ws.data, j.strategy, j.search_cfg, j.ppo_cfg, j.attach_kw, j.comp_cfg, j.progress, ws.store,
                   layers=layers, trained=j.joint, calibration=calibration, calibration_teacher=teacher)



def compensate(ws: Workspace, base_training: dict[str, Any], reference: torch.nn.Module | None,
               evaluator: PlacementEvaluator | None = None, chosen: Placement | None = None
               ) -> tuple[StageResult, dict[str, Any]]:
    """Compensation modules at ``ws.placement`` (attached now, or trained jointly by :func:`train_base`), one set for
    every chip: optional chip-agnostic training, the check, the measurement. Returns the stage and the modules' cost
    (the stage records the deployed overhead: none when the check reset them)."""
    j, model, comp_cfg = ws.job, ws.model, ws.job.comp_cfg
    assert comp_cfg is not None and ws.placement is not None
    stage = Stage.COMPENSATED
    if not j.joint:
        attach_compensation(model, ws.placement, seed=j.cfg.seed, **j.attach_kw)
        if evaluator is not None:  # fine-tune the search's shared compensators
            assert chosen is not None  # the search's choice comes with its evaluator
            evaluator.load_shared(model, chosen)
    cost = overhead(model, ws.example)
    log.info("compensation at %s: +%.2f%% parameters, +%.2f%% MACs", list(ws.placement),
             cost["total"]["params_pct"], cost["total"]["macs_pct"], extra=CONSOLE if chosen is None else {})
    result = None
    if comp_cfg.steps > 0:
        teacher = evaluator.teacher if evaluator is not None else None
        if j.joint and comp_cfg.distill > 0:  # bypassing jointly trained compensators breaks the network
            teacher = teacher_logits(reference if reference is not None else model, ws.data.train.tensors[0],
                                     bypass_compensators=False)
        result = train_compensation(model, ws.data.train, comp_cfg, progress=j.progress, stage=stage.value,
                                    resume=ws.store, teacher=teacher)
        _check_outputs(model, ws.data.test, stage)
    check = None
    if comp_cfg.check_chips > 0 and len(ws.data.val) > 0 and not j.joint:
        check_val = _unscored(ws.data.val, j.search_cfg if j.strategy is not None else None)
        check = check_compensation(model, check_val, chips=comp_cfg.check_chips, seed=comp_cfg.seed,
                                   batch_size=j.eval_batch)
        if not check["kept"]:
            log.warning("chip-agnostic compensation lowered validation accuracy (%.2f%% -> %.2f%% on %d chips): "
                        "compensators reset to a no-op; the chip-agnostic deployment carries none",
                        100 * check["without"], 100 * check["with"], check["chips"])
    deployed = cost if check is None or check["kept"] else _no_overhead(cost)
    record = {**ws.measure(model, desc=stage.value),
              "training": {**asdict(comp_cfg), **(result.to_dict() if result else {}),
                           **({"base": base_training} if j.joint else {})},
              "check": check, "placement": compensation_spec(model), "overhead": deployed,
              **(ws.profile(model, stage) if j.joint else {})}
    return StageResult(stage, record), cost


def calibrate_chips(ws: Workspace, reference: torch.nn.Module | None, clean: float,
                    cost: dict[str, Any] | None) -> StageResult:
    """Per-chip calibration of every evaluation chip on unlabeled training images (stage ``calibrated``), with the
    configured teacher (``auto``: chosen first on calibrated validation chips). ``clean``: the model's clean
    accuracy (calibration changes only what chips do)."""
    j, model = ws.job, ws.model
    cal_cfg = j.cal_cfg
    assert cal_cfg is not None
    images = calibration_images(ws.data.train, cal_cfg.n_images, cal_cfg.seed).to(j.device)
    choice = None
    if cal_cfg.teacher == "auto":
        check_val = _unscored(ws.data.val, j.search_cfg if j.strategy is not None else None)
        cal_cfg, choice = _choose_teacher(model, reference, images, cal_cfg, check_val, j.joint, j.eval_batch,
                                          j.workers)
    calibrator = ChipCalibrator(model, images, cal_cfg, teacher=teacher_network(cal_cfg, model, reference, j.joint))
    record = {**ws.measure(model, desc=Stage.CALIBRATED.value, clean=clean, calibrate=calibrator),
              "calibration": {**calibrator.stats(), "teacher_choice": choice}, "overhead": cost}
    return StageResult(Stage.CALIBRATED, record)


def export(ws: Workspace, stages: dict[str, Any], *, final: Stage, reference: torch.nn.Module | None,
           placement_record: dict[str, Any] | None, seconds: float, command: str | None) -> dict[str, Any]:
    """Write the checkpoint (the model of stage ``final``), the vanilla reference beside it, and ``metrics.json``."""
    cfg, data = ws.job.cfg, ws.data
    metrics: dict[str, Any] = {
        "dataset": data.name,
        "model": ws.model_spec["name"],
        "variation": ws.job.variation.to_dict(),
        "stages": stages,
        "original_accuracy": original_accuracy({"stages": stages}),
        "overhead": stages.get(Stage.COMPENSATED.value, {}).get("overhead"),
        "placement": placement_record,
        "config": ws.resolved,
        "versions": ws.vers,
        "device": str(ws.job.device),
        "environment": {"torch_threads": torch.get_num_threads(), "threads": cfg.get("threads", "auto"),
                        "workers": ws.job.workers, "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "command": command,
        "seconds": seconds,
    }
    meta = {"model": ws.model_spec, "normalization": data.normalization(), "dataset_source": data.source,
            "variation": ws.job.variation.to_dict(), "analog": {"include": ws.include, "exclude": list(cfg.analog.exclude)},
            "dataset": data.name, "stage": final.value, "config": ws.resolved, "versions": ws.vers}
    metrics["checkpoint"] = str(ws.out_dir / cfg.checkpoint.name)
    if reference is not None:  # the vanilla reference, a checkpoint of its own: the calibration teacher can be replayed
        ref_file = ws.out_dir / f"reference_{cfg.checkpoint.name}"
        metrics["reference_checkpoint"] = str(ref_file)
        save_checkpoint(ref_file, reference, {**meta, "stage": Stage.BASELINE.value, "metrics": metrics},
                        overwrite=True)
        meta["reference"] = {"file": ref_file.name, "sha256": checkpoint_digest(ref_file)}
    meta["metrics"] = metrics
    save_checkpoint(ws.out_dir / cfg.checkpoint.name, ws.model, meta, overwrite=True)
    atomic_write(ws.out_dir / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)),
                 overwrite=True)
    return metrics


def run(cfg: DictConfig, out_dir: str | Path, *, command: str | None = None) -> dict[str, Any]:
    """Run the pipeline described by ``cfg``, writing the checkpoint and ``metrics.json`` into ``out_dir``.

    The stages, in order: :func:`train_reference` (with ``reference=true``), :func:`train_base`, the placement
    search (:func:`search_placement`, with ``placement.strategy``), :func:`compensate`, :func:`calibrate_chips`,
    :func:`export`. Everything is validated before any work starts (:func:`validate`, then :func:`prepare`).
    ``cfg.resume`` (``auto`` | ``fresh`` | ``require`` | ``off``, see :func:`correctnet.resume.open_store`)
    decides whether snapshots in ``<out_dir>/resume/`` are continued from; they are removed once ``metrics.json``
    is written. ``command`` (the command line) is recorded.
    """
    t_start = time.perf_counter()
    job = validate(cfg)
    runlock.acquire(out_dir)  # another live run in this directory is refused (it would interleave with this one)
    try:
        return _run(job, Path(out_dir), t_start, command)
    finally:
        runlock.release(out_dir)


def _run(job: Job, out_dir: Path, t_start: float, command: str | None) -> dict[str, Any]:
    ws = prepare(job, out_dir)
    stages: dict[str, Any] = {}

    def add(result: StageResult | None) -> None:
        if result is not None:
            stages[result.stage.value] = result.record

    reference = None
    result: StageResult | None
    if job.trains_reference:
        reference, result = train_reference(ws)
        add(result)
    base_training, result = train_base(ws, reference)
    add(result)
    final = job.base_stage
    evaluator, chosen, placement_record = None, None, None
    if job.strategy is not None:
        evaluator, chosen, placement_record = search_placement(ws, reference)
        ws.placement = evaluator.to_placement(chosen) or None
        if job.joint:  # deploy what was chosen: the supernet's compensators cut to the chosen layers and ranks
            keep_compensation(ws.model, ws.placement or {})
        if ws.placement is None:
            log.info("the search chose no compensation: no compensated stage", extra=CONSOLE)
            if job.joint:  # the jointly trained network alone is the result
                final = Stage.SUPPRESSED if job.regularizer else Stage.NOISE_AWARE if job.tcfg.noise_aware \
                    else Stage.BASELINE
                add(StageResult(final, {**ws.measure(ws.model), "training": base_training,
                                        **ws.profile(ws.model, final)}))
    cost = None
    if ws.placement is not None:
        result, cost = compensate(ws, base_training, reference, evaluator, chosen)
        add(result)
        final = Stage.COMPENSATED
    if job.cal_cfg is not None and ws.placement is None and job.strategy is not None \
            and not calibrates_anything(ws.model, job.cal_cfg):
        log.info("nothing to calibrate (no compensation chosen, no BatchNorm, no biases to fit): no calibrated stage",
                 extra=CONSOLE)
    elif job.cal_cfg is not None:
        add(calibrate_chips(ws, reference, stages[final]["clean_accuracy"], cost))
    metrics = export(ws, stages, final=final, reference=reference, placement_record=placement_record,
                     seconds=time.perf_counter() - t_start, command=command)
    if ws.store is not None:
        ws.store.clear()  # the results are written: the snapshots are no longer needed
    _print_summary(metrics, ws.out_dir)
    return metrics



def _unscored(val: Any, search_cfg: SearchConfig | None) -> Any:
    """The validation images the placement search did not score placements on (all of them without a search)."""
    if search_cfg is None:
        return val
    x, y = val.tensors
    if len(x) <= search_cfg.val_images:
        raise ConfigError(f"the compensation check needs validation images the placement search did not score on, "
                          f"but the search uses all {len(x)}: lower placement.val_images, raise dataset.val_fraction "
                          f"or set compensation.check_chips=0")
    return torch.utils.data.TensorDataset(x[search_cfg.val_images:], y[search_cfg.val_images:])


def _no_overhead(cost: dict[str, Any]) -> dict[str, Any]:
    """The overhead record of a deployment without compensation hardware (the check reset the modules)."""
    total = {k: 0 if isinstance(v, int) else 0.0 for k, v in cost["total"].items() if k.endswith(("params", "macs", "pct"))}
    return {**cost, "layers": {}, "total": {**cost["total"], **total}, "reset_by_check": True}


def _choose_teacher(model: torch.nn.Module, reference: torch.nn.Module | None, images: torch.Tensor,
                    cal_cfg: CalibrationConfig, val: Any, joint: bool, batch_size: int, workers: int = 1
                    ) -> tuple[CalibrationConfig, dict[str, Any]]:
    """``calibration.teacher=auto``: calibrate ``select_chips`` chips of ``Stream.CHECK`` with each candidate
    teacher (the chip ensemble, the vanilla reference) and keep the one with the higher mean accuracy on the
    validation images ``val`` (a tie keeps the ensemble, which needs no second network). Returns the config with
    the chosen teacher and the record of the choice."""
    scores: dict[str, float] = {}
    for name in ("ensemble", "reference") if reference is not None else ("ensemble",):
        c = dataclasses.replace(cal_cfg, teacher=name)
        cal = ChipCalibrator(model, images, c, teacher=teacher_network(c, model, reference, joint))
        scores[name] = monte_carlo(model, val, n_chips=cal_cfg.select_chips, seed=cal_cfg.seed, stream=Stream.CHECK,
                                   batch_size=batch_size, progress=False, calibrate=cal, workers=workers).mean
    chosen = max(scores, key=lambda k: scores[k])  # first (ensemble) on a tie
    log.info("calibration teacher: %s (validation accuracy on %d calibrated check chips: %s)", chosen,
             cal_cfg.select_chips, ", ".join(f"{k} {100 * v:.2f}%" for k, v in scores.items()))
    return dataclasses.replace(cal_cfg, teacher=chosen), {
        "chosen": chosen, "validation_accuracy": scores, "chips": cal_cfg.select_chips,
        "chip_stream": Stream.CHECK.name, "images": len(val.tensors[0])}


def _check_outputs(model: torch.nn.Module, test: Any, stage: str, n: int = 256) -> None:
    """Stop with :class:`TrainingDivergedError` if the nominal network outputs NaN/inf on ``n`` test images
    (accuracies measured on such outputs would be meaningless, e.g. a silent 10%)."""
    x = test.tensors[0][:n].to(next(model.parameters()).device)
    with torch.no_grad(), nominal(model), eval_mode(model):
        out = logits_of(model(x))
    if not torch.isfinite(out).all():
        raise TrainingDivergedError(f"{stage}: after training, the network outputs NaN or infinite values on test "
                                    f"images; lower the learning rate or check the data")


def _search(model: torch.nn.Module, data: Any, strategy: str, search_cfg: SearchConfig, ppo_cfg: PPOConfig | None,
            attach_kw: dict[str, Any], comp_cfg: CompensationConfig, progress: bool,
            store: ResumeStore | None = None, *, layers: list[str] | None = None, trained: bool = False,
            calibration: CalibrationConfig | None = None, calibration_teacher: torch.nn.Module | None = None
            ) -> tuple[PlacementEvaluator, Placement, dict[str, Any]]:
    """The placement search stage: (the evaluator, the chosen placement, its metrics record). ``trained``: the
    model's compensators were trained with the network as a supernet (joint training) and are searched as they are."""
    t0 = time.perf_counter()
    shared = "the jointly trained compensators" if trained else f"shared compensators ({search_cfg.shared_steps} steps)"
    log.info("placement search (%s) over %s, scoring on %d %ssearch chips x %d validation images", strategy, shared,
             search_cfg.chips, "calibrated " if calibration is not None else "", min(search_cfg.val_images, len(data.val)))
    evaluator = PlacementEvaluator(model, data.train, data.val.tensors, search_cfg, attach=attach_kw,
                                   comp_cfg=comp_cfg, progress=progress, resume=store, layers=layers, trained=trained,
                                   calibration=calibration, calibration_teacher=calibration_teacher)
    result = search(evaluator, strategy, seed=search_cfg.seed, ppo=ppo_cfg, progress=progress)
    evaluator.save_cache()
    b = result.best
    limits = ", ".join(f"{v:g}% {k}" for k, v in evaluator.limits.items()) or "none"
    chosen = ", ".join(f"{n} (rank {r})" for n, r in result.chosen_ranks.items()) or "no layer"
    msg = (f"placement search ({strategy}, budget {limits}): {chosen}; objective {b.objective:.2f} pp "
           f"(recovers {100 * (b.accuracy - evaluator.base_accuracy):.2f} pp at +{b.costs.get('params', 0):.2f}% "
           f"parameters, +{b.costs.get('macs', 0):.2f}% MACs, price {search_cfg.price:g} per % {search_cfg.cost}), "
           f"{result.evaluations} of {result.n_placements} placements evaluated in {result.seconds:.1f} s")
    log.info("%s", msg, extra=CONSOLE)
    record = {**result.to_dict(), "evaluator": evaluator.summary(), "seconds_total": time.perf_counter() - t0}
    return evaluator, b.placement, record



def original_accuracy(metrics: dict[str, Any]) -> float | None:
    """The original accuracy: the vanilla network's clean accuracy (its ``baseline`` stage), when the run has one."""
    base = metrics["stages"].get(Stage.BASELINE)
    return base["clean_accuracy"] if base else None


def _print_summary(metrics: dict[str, Any], out_dir: Path) -> None:
    rows = [(stage_label(name), s["clean_accuracy"], s["mc"]) for name, s in metrics["stages"].items()]
    over = metrics.get("overhead")
    replay = evaluate_command(metrics["checkpoint"], calibrated=Stage.CALIBRATED in metrics["stages"])
    print("\n" + format_summary(metrics["model"], metrics["dataset"], metrics["variation"], rows,
                                original=original_accuracy(metrics))
          + (f"\n  compensation: +{over['total']['params_pct']:.2f}% parameters, "
             f"+{over['total']['macs_pct']:.2f}% MACs (digital)"
             + (" (reset by the check: none deployed chip-agnostic)" if over.get("reset_by_check") else "")
             if over else "")
          + f"\n  checkpoint:  {metrics['checkpoint']}"
          + f"\n  metrics:     {out_dir / 'metrics.json'}   ({metrics['seconds']:.1f} s)"
          + f"\n  re-evaluate: {replay}", flush=True)


PROG = "python -m correctnet.train"  # how the recorded command starts (``correctnet train`` there); printed ones
# start with this interpreter (python_command), so that they work in a shell without the virtual environment


def _log_to_file(level: int, msg: str) -> None:
    """``msg`` into the job's log file only (the console handler would print it a second time)."""
    # typeshed wants args as a tuple or mapping; LogRecord takes None (no %-arguments: msg is used as it is)
    record = log.makeRecord(log.name, level, __file__, 0, msg, None, None)  # type: ignore[arg-type]
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _remove_if_unused(out_dir: Path) -> None:
    """Remove the run directory when the run wrote nothing in it but Hydra's records, its log and an empty
    resume store (it failed validation): no empty run directories are left behind. Only those files are
    removed, and the directory itself only when it is then empty (and not the working directory)."""
    ours = [out_dir / ".hydra" / f for f in ("config.yaml", "hydra.yaml", "overrides.yaml")]
    ours += [out_dir / "resume" / "config.json", *out_dir.glob("*.log")]
    try:
        if any(p not in ours for p in [*out_dir.iterdir(), *(out_dir / ".hydra").glob("*"),
                                       *(out_dir / "resume").glob("*")] if p.name not in (".hydra", "resume")):
            return
        for p in ours:
            p.unlink(missing_ok=True)
        for d in (out_dir / ".hydra", out_dir / "resume"):
            if d.is_dir():
                d.rmdir()
        if out_dir.resolve() != Path.cwd().resolve():
            out_dir.rmdir()
        # the date directory and outputs/ of Hydra's default layout, when this command created them and they are empty
        for parent in (out_dir.parent, out_dir.parent.parent):
            if _EXISTING is None or parent.resolve() in _EXISTING or parent.resolve() == Path.cwd().resolve() \
                    or any(parent.iterdir()):
                break
            parent.rmdir()
    except OSError:
        pass


def _default_dirs() -> set[Path]:
    """``outputs/``, ``multirun/`` and their date directories as they are now (Hydra's default
    ``outputs/<date>/<time>`` and ``multirun/<date>/<time>``)."""
    dirs: set[Path] = set()
    for root in (Path.cwd().resolve() / "outputs", Path.cwd().resolve() / "multirun"):
        if root.is_dir():
            dirs |= {root, *(p for p in root.iterdir() if p.is_dir())}
    return dirs


def _remove_sweep_records(since: float) -> None:
    """A sweep refused while Hydra composed its jobs leaves ``<sweep dir>/multirun.yaml`` alone in a new directory:
    remove it, the directory and the default layout's parents this command created, when they are then empty."""
    if not {"-m", "--multirun"} & set(sys.argv[1:]):
        return
    explicit = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("hydra.sweep.dir=")]
    candidates = [Path(d) for d in explicit] or list((Path.cwd() / "multirun").glob("*/*"))
    for d in candidates:
        record = d / "multirun.yaml"
        try:
            if not record.is_file() or record.stat().st_mtime < since - 1 or any(p != record for p in d.iterdir()):
                continue
            record.unlink()
            for p in (d, d.parent, d.parent.parent)[:1 if explicit else 3]:
                if _EXISTING is not None and p.resolve() in _EXISTING or p.resolve() == Path.cwd().resolve() \
                        or any(p.iterdir()):
                    break
                p.rmdir()
        except OSError:
            pass


def _snapshots(out_dir: Path) -> list[str]:
    """The stages with resume snapshots in ``out_dir`` (sorted), when the run has not finished."""
    if (out_dir / "metrics.json").exists():
        return []
    return sorted(p.stem for p in (out_dir / "resume").glob("*.pt"))


def _resume_command(command: str, out_dir: Path) -> str:
    return f"{command} hydra.run.dir={shlex.quote(str(out_dir))}"


def _interrupted_runs(out_dir: Path, overrides: list[str], limit: int = 500) -> list[Path]:
    """Earlier run directories beside ``out_dir`` (Hydra's ``outputs/<date>/<time>`` layout) of the same
    command (``.hydra/overrides.yaml``) that hold resume snapshots and no metrics.json, newest first."""
    import yaml

    root = out_dir.parent.parent
    found: list[Path] = []
    candidates = sorted(root.glob("*/*/.hydra/overrides.yaml"), reverse=True)[:limit]
    for f in candidates:
        run_dir = f.parent.parent
        if run_dir.resolve() == out_dir.resolve() or not _snapshots(run_dir) or runlock.holder(run_dir) is not None:
            continue  # a live run holding its lock is running, not interrupted
        try:
            if yaml.safe_load(f.read_text()) == list(overrides):
                found.append(run_dir)
        except (OSError, yaml.YAMLError):
            continue
    return found


_TASK_ERROR: list[BaseException] = []  # what escaped main()'s body: a bug of ours, not a Hydra composition error
_FAILED: list[tuple[str, CorrectNetError]] = []  # the sweep's jobs refused (their overrides, the error)
_EXISTING: set[Path] | None = None  # Hydra's default output directories before this command (see _run_app)


@hydra.main(config_path=conf.CONFIG_PATH, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """The Hydra task: one job (or one job of a sweep) in its run directory."""
    try:
        _job(cfg)
    except Exception as e:
        _TASK_ERROR.append(e)
        raise


def _job(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    task = [str(o) for o in cast("list[Any]", OmegaConf.to_container(hc.overrides.task, resolve=False))]  # as typed
    command = " ".join([PROG, *map(shlex.quote, task)])  # recorded in metrics.json
    printed = " ".join([python_command("correctnet.train"), *map(shlex.quote, task)])  # suggested
    out_dir = Path(hc.runtime.output_dir)
    explicit_dir = any(o.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in hc.overrides.hydra)
    if not multirun and not explicit_dir:
        earlier = _interrupted_runs(out_dir, task)
        if earlier:
            print(f"correctnet: an interrupted run of this command is in {earlier[0]} (snapshots: "
                  f"{', '.join(_snapshots(earlier[0]))}); this is a new run in {out_dir}. To continue that one "
                  f"instead: {_resume_command(printed, earlier[0])}", file=sys.stderr, flush=True)
    try:
        _check_interpolations(cfg)
        _refuse_internal(hc.runtime.choices)
        run(cfg, out_dir, command=command)
    except CorrectNetError as e:
        _log_to_file(logging.ERROR, str(e))
        if multirun:
            _FAILED.append((" ".join(task), e))
            raise  # Hydra records the job as failed and the sweep goes on with the other jobs
        print(f"correctnet: error: {e}", file=sys.stderr, flush=True)
        runlock.release_all()
        _remove_if_unused(out_dir)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        saved = _snapshots(out_dir)
        if multirun:
            sweep = shlex.quote(str(Path(hc.sweep.dir).resolve()))
            again = f"rerun the same sweep with hydra.sweep.dir={sweep}: each job continues from its snapshots"
        elif saved:
            again = f"continue with: {_resume_command(printed, out_dir)}"
        else:
            runlock.release_all()
            _remove_if_unused(out_dir)
            again = f"rerun: {_resume_command(printed, out_dir) if explicit_dir else printed}"
        what = (f"resume snapshots of {', '.join(saved)} saved in {out_dir / 'resume'}" if saved
                else "nothing was saved yet")
        _log_to_file(logging.WARNING, f"interrupted: {what}")
        print(f"\ncorrectnet: interrupted: {what}; {again}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None

def _check_interpolations(cfg: DictConfig) -> None:
    """Every ``${...}`` of the config resolves (``training.epochs='${oops}'``): else one error naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None


def _refuse_internal(choices: Any) -> None:
    """A schema chosen as a group's option (``training=schema``): refused, naming the options there are."""
    for group, hidden in schema.internal_options().items():
        choice = choices.get(group)
        if choice in hidden:
            options = sorted(p.stem for p in (conf.DIR / group).glob("*.yaml"))
            raise ConfigError(f"{group}={choice}: {choice!r} is the schema the {group} options build on, not an "
                              f"option; available: {', '.join(options)}")


def help_text(text: str) -> str:
    """Hydra's ``--help`` page without the internal schema options in its list of config groups."""
    hidden = schema.internal_options()
    out = []
    for line in text.splitlines():
        group, sep, options = line.partition(": ")
        if sep and group in hidden and "=" not in line:
            line = f"{group}: " + ", ".join(o for o in options.split(", ") if o not in hidden[group])
        out.append(line)
    return "\n".join(out) + "\n"


def _accepted_keys(parent: str) -> list[str] | None:
    """The keys the config accepts under ``parent`` ("" for the top level), where a schema fixes them."""
    if not parent:
        return list(config_keys())
    group, *rest = parent.split(".")
    if config_keys().get(group) is not None:
        return None if rest else config_keys()[group]
    node: Any = schemas().get(group)
    for name in rest:
        field = {f.name: f for f in dataclasses.fields(node)}.get(name) if dataclasses.is_dataclass(node) else None
        node = field.default_factory if field is not None and callable(field.default_factory) else None
    return [f.name for f in dataclasses.fields(node)] if isinstance(node, type) and dataclasses.is_dataclass(node) \
        else None


def hydra_error_message(error: BaseException) -> str:
    """Hydra's multi-line composition error (an unknown key, option or override syntax) as one line that names
    the key or option and what is accepted."""
    import difflib
    import re

    text = str(error)
    missing = re.match(r"In '[^']*': Could not find '(.+)/([^'/]+)'", text)
    if missing:
        group, option = missing.groups()
        listed = text.partition("Available options in")[2].partition("Config search path")[0].splitlines()[1:]
        options = [o.strip() for o in listed if o.startswith("\t") and not o.strip().endswith(schema.NAME)]
        return (f"{group}={option}: {group} has no option {option!r}"
                + (f"; available: {', '.join(options)}" if options else ""))
    override = re.match(r"Could not override '([^']+)'", text)
    if override:
        key = override.group(1)
        parent, _, leaf = key.rpartition(".")
        where = f"in {parent}" if parent else "at the top level"
        accepted = _accepted_keys(parent)
        if accepted is None:
            hint = "; add a constructor argument with +model." if key.startswith("model.") else ""
            return f"{key}: {where} there is no key {leaf!r}" + (f"{hint}{key[6:]}=VALUE" if hint else "")
        close = difflib.get_close_matches(leaf, accepted, n=1)
        return (f"{key}: {where} there is no key {leaf!r}" + (f" (did you mean {close[0]}?)" if close else "")
                + f"; accepted: {', '.join(accepted)}")
    lines = []
    for line in [*text.splitlines(), *str(error.__cause__ or "").splitlines()[:1]]:
        if line.startswith(("Config search path", "Set the environment variable")):
            break
        if line.strip() and not line.startswith("\t"):
            lines.append(line.strip())
    return " ".join(lines) or type(error).__name__


def _run_app() -> int:
    """Run the Hydra app; its own errors (composing the config from the command line: an unknown key or option,
    bad override syntax) become one ``correctnet: error:`` line and exit status 2. HYDRA_FULL_ERROR=1 in the
    environment keeps Hydra's full report."""
    global _EXISTING
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun: N copies of the job would share one run directory
        print(f"correctnet: error: {PROG} runs one process (WORLD_SIZE={os.environ['WORLD_SIZE']}): data-parallel "
              "training is correctnet.training.train(...) under torchrun, see docs/distributed.md", file=sys.stderr, flush=True)
        return 2
    _EXISTING = _default_dirs()
    user_full = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors instead of printing a multi-line report
    _TASK_ERROR.clear()
    _FAILED.clear()
    sweep = [a for a in sys.argv[1:] if a in ("-m", "--multirun")]  # Hydra's parser wants it before the overrides
    sys.argv = [sys.argv[0], *sweep, *(a for a in sys.argv[1:] if a not in sweep)]
    t_start = time.time()
    page = io.StringIO() if {"--help", "-h"} & set(sys.argv[1:]) else None
    try:
        with contextlib.redirect_stdout(page) if page is not None else contextlib.nullcontext():
            main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:
        if user_full == "1":
            raise
        if isinstance(e, CorrectNetError):  # a sweep's refused jobs (the others ran), or the run directory's lock
            for overrides, err in _FAILED or [("", e)]:
                print(f"correctnet: error: {f'job {overrides}: ' if overrides else ''}{err}", file=sys.stderr,
                      flush=True)
            return 2
        if e in _TASK_ERROR:
            raise
        print(f"correctnet: error: {hydra_error_message(e)}", file=sys.stderr, flush=True)
        _remove_sweep_records(t_start)
        return 2
    finally:
        runlock.release_all()
        if page is not None:
            sys.stdout.write(help_text(page.getvalue()))
        if user_full is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_full
    return 0


def cli_main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """``main`` with ``argv`` (default ``sys.argv[1:]``) as its command line; returns the exit status."""
    global PROG
    PROG = prog
    sys.argv = [prog.split()[-1] if " " in prog else prog, *(sys.argv[1:] if argv is None else argv)]
    return _run_app()


if __name__ == "__main__":
    # run the importable module's app, not this __main__ copy: joblib/submitit workers unpickle the task function
    # by its module name, which a function of __main__ does not have
    from correctnet.train import _run_app as _app

    sys.exit(_app())

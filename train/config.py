"""The experiment schema: frozen dataclasses filled from a plain TOML file, unknown keys refused."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lowmag.errors import SpecError
from lowmag.train.augment import AugmentConfig
from lowmag.train.losses import PIXEL_MODES

REGIMES = ("labeled", "labeled+unlabeled")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split (paths relative to the config file)."""

    images: str = ""  # image folder, one subfolder per class
    slides: str = ""  # or a CSV of slide,label,split
    scan_mpp: float = 0.0  # µm/px of the image files (required for image folders)
    metadata: str = ""  # CSV with path + group columns, relative to `images`
    group_by: tuple[str, ...] = ()
    crop_px: int = 0  # centred square crop in scan pixels before any resampling, 0 = none
    split: Mapping[str, float] = field(default_factory=lambda: {"train": 0.6, "test": 0.2, "val": 0.2})
    labeled_fraction: float = 1.0  # of the training groups; the rest is unlabeled auxiliary data
    unlabeled: tuple[str, ...] = ()  # extra unlabeled image folders (any layout of class folders)
    cache_dir: str = ""  # default: <run dir>/cache
    #: The seed of the split (and of the labeled/unlabeled division); -1: the experiment's
    #: seed. Runs of several training seeds keep it fixed so they share one split.
    split_seed: int = -1


@dataclass(frozen=True)
class PhaseConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    #: The default recipe (issue 14; evidence in docs/kather2016-recipe.md). Configs written
    #: for the recipe before it spell out the old values: weight_decay 0, schedule
    #: "constant", warmup_epochs 0, min_lr_fraction 0.
    weight_decay: float = 5e-4
    #: Learning rate over the epochs: "constant", or "cosine" (down to lr x min_lr_fraction
    #: at the last epoch), after ``warmup_epochs`` of linear warm-up (at most epochs - 1 of
    #: them take effect, so a short test run keeps the default).
    schedule: str = "cosine"
    warmup_epochs: int = 1
    min_lr_fraction: float = 0.01
    #: Cross-entropy on labels (teacher, baselines) with this label smoothing. Off by
    #: default: it measured no gain, and a label-smoothed teacher distils worse (Müller et
    #: al. 2019; the demo's students collapsed to one class behind such a teacher).
    label_smoothing: float = 0.0
    #: Mixup (Zhang et al. 2018): each batch is blended with a shuffled copy of itself by a
    #: weight drawn from Beta(mixup, mixup); 0 turns it off. Label-trained models learn the
    #: blended labels; a distilled pair is blended alike at both resolutions (blending is
    #: linear, so it commutes with downsampling exactly) and the student learns the
    #: teacher's answer on the blend.
    mixup: float = 0.0

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch`` (the same after a resume)."""
        warmup = min(self.warmup_epochs, self.epochs - 1)
        if epoch < warmup:
            return self.lr * (epoch + 1) / warmup
        if self.schedule == "constant":
            return self.lr
        span = max(self.epochs - warmup - 1, 1)
        t = min((epoch - warmup) / span, 1.0)
        low = self.min_lr_fraction
        return self.lr * (low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * t)))


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 4.0
    pixel: str = "both"
    pixel_weight: float = 1.0
    attention_weight: float = 0.0
    regimes: tuple[str, ...] = ("labeled", "labeled+unlabeled")
    ablation: tuple[str, ...] = ()  # extra pixel modes to compare, e.g. maxpool, bicubic, none
    ablation_resolutions: tuple[str, ...] = ()
    ablation_regime: str = "labeled"


@dataclass(frozen=True)
class FinetuneConfig:
    enabled: bool = False
    epochs: int = 5
    lr: float = 1e-3


@dataclass(frozen=True)
class EvaluationConfig:
    split: str = "test"
    bootstrap: int = 10_000
    batch_size: int = 64


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    # bf16 autocast on CUDA (ignored on CPU). Off by default: on an H200 (torch 2.11) it made
    # every step of the recipe slower, 1.11-1.48x (GroupNorm runs in float32 under autocast, so
    # the small ResNets pay casts and gain nothing; docs/gpu-check.md), and float32 keeps
    # GPU runs numerically closest to the published CPU runs.
    bf16: bool = False
    channels_last: bool = True
    workers: int = 0
    threads: int = 0  # CPU threads, 0 = torch default


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    #: More training seeds (same split, same cache), each trained into RUN/seed-<k>/: the
    #: headline steps (teacher, baselines, labeled+unlabeled students), or every step.
    extra_seeds: tuple[int, ...] = ()
    extra_seed_steps: str = "headline"
    architecture: str = "resnet18"
    pretrained: str = ""  # local ImageNet-style weights for the teacher, never downloaded
    teacher_resolution: str = "scan"
    student_resolutions: tuple[str, ...] = ("scan/2", "scan/4", "scan/8")
    data: DataConfig = field(default_factory=DataConfig)
    teacher: PhaseConfig = field(default_factory=PhaseConfig)
    student: PhaseConfig = field(default_factory=PhaseConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    base_dir: str = ""  # folder of the config file; relative paths resolve against it

    def path(self, value: str) -> Path:
        """A path from the config, resolved against the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() or not self.base_dir else Path(self.base_dir) / p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment TOML; every problem is listed in one error."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(path, ["file not found"]) from None
    except tomllib.TOMLDecodeError as error:
        raise SpecError(path, [f"not valid TOML: {error}"]) from error
    raw = _merge(raw, overrides or {})
    raw["base_dir"] = str(path.resolve().parent)
    return config_from_dict(raw, path)


def config_from_dict(raw: Mapping[str, Any], path: str | Path | None = None) -> ExperimentConfig:
    problems: list[str] = []
    config = _build(ExperimentConfig, raw, "", problems)
    # Bad entries were left at their defaults, so the checks below still see every other
    # value; a field already reported above is not reported again.
    reported = {p.split(":", 1)[0] for p in problems}
    problems += [p for p in _check(config) if p.split(":", 1)[0] not in reported]
    if problems:
        raise SpecError(path or "<config>", problems)
    return config


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, Mapping):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a table")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            problems.append(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value, hint = raw[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, value, f"{prefix}{f.name}.", problems)
            continue
        coerced = _coerce(value, hint)
        if coerced is _BAD:
            problems.append(f"{prefix}{f.name}: expected {_describe(hint)}, got {value!r}")
        else:
            values[f.name] = coerced
    return cls(**values)  # entries with problems keep their defaults


_BAD = object()


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            return _BAD
        items = [_coerce(v, item) for v in value]
        return _BAD if any(v is _BAD for v in items) else tuple(items)
    if origin is Mapping or origin is dict:
        if not isinstance(value, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ):
            return _BAD
        return {k: float(v) for k, v in value.items()}
    return value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return "a list of integers" if item is int else "a list of strings"
    if origin in (Mapping, dict):
        return "a table of numbers"
    return getattr(hint, "__name__", str(hint))


def _check(config: ExperimentConfig) -> list[str]:
    from lowmag.resolution import Resolution
    from lowmag.train.models import ARCHITECTURES

    problems = []
    data = config.data
    if bool(data.images) == bool(data.slides):
        problems.append("data: give exactly one of data.images (image folder) or data.slides (slide CSV)")
    if data.images and data.scan_mpp <= 0:
        problems.append("data.scan_mpp: required for an image folder (µm/px of its images, e.g. 0.495)")
    if not 0 < data.labeled_fraction <= 1:
        problems.append("data.labeled_fraction: must be in (0, 1]")
    if data.metadata and not data.group_by:
        problems.append("data.group_by: name the metadata columns that define a group")
    if config.architecture not in ARCHITECTURES:
        problems.append(f"architecture: {config.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    for text in (config.teacher_resolution, *config.student_resolutions, *config.distill.ablation_resolutions):
        try:
            Resolution.parse(text)
        except Exception as error:  # noqa: BLE001 - reported as a config problem
            problems.append(f"resolution {text!r}: {error}")
    for mode in (config.distill.pixel, *config.distill.ablation):
        if mode not in PIXEL_MODES:
            problems.append(f"distill: pixel mode {mode!r} is not one of {', '.join(PIXEL_MODES)}")
    for regime in (*config.distill.regimes, config.distill.ablation_regime):
        if regime not in REGIMES:
            problems.append(f"distill: regime {regime!r} is not one of {', '.join(REGIMES)}")
    if config.evaluation.split not in data.split and data.images:
        problems.append(f"evaluation.split: {config.evaluation.split!r} is not a split in data.split")
    for name, phase in (("teacher", config.teacher), ("student", config.student)):
        if phase.epochs < 1 or phase.batch_size < 1 or phase.lr <= 0:
            problems.append(f"{name}: epochs and batch_size must be >= 1 and lr > 0")
        if phase.schedule not in SCHEDULES:
            problems.append(f"{name}.schedule: {phase.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if phase.warmup_epochs < 0:
            problems.append(f"{name}.warmup_epochs: must be at least 0")
        if not 0 <= phase.min_lr_fraction <= 1 or not 0 <= phase.label_smoothing < 1:
            problems.append(f"{name}: min_lr_fraction must be in [0, 1] and label_smoothing in [0, 1)")
        if not 0 <= phase.mixup <= 10:
            problems.append(f"{name}: mixup must be in [0, 10] (the Beta distribution's parameter; 0 is off)")
    if config.extra_seed_steps not in ("headline", "all"):
        problems.append("extra_seed_steps: must be 'headline' or 'all'")
    if config.seed in config.extra_seeds or len(set(config.extra_seeds)) != len(config.extra_seeds):
        problems.append("extra_seeds: must differ from seed and from each other")
    augment = config.augment
    if augment.hed < 0 or augment.hed >= 1 or augment.hed_bias < 0:
        problems.append("augment.hed must be in [0, 1) and augment.hed_bias >= 0")
    return problems

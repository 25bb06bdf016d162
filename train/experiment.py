"""One experiment's data, splits, caches and run folder, shared by every phase.

A run folder holds ``config.json`` (the resolved config), ``splits.json`` (which items went
where), ``cache/`` (pixels per µm/px) and ``steps/<name>/`` (one checkpoint per step, with
its training history and test metrics). Rerunning with the same folder reuses all of it.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lowmag.errors import LowmagError
from lowmag.io import atomic_write_text
from lowmag.labeled import Item, scan_image_folder
from lowmag.resolution import Resolution
from lowmag.spec import ModelSpec, Normalization, new_provenance
from lowmag.train.cache import PixelCache, build_cache, build_cache_with_progress, channel_stats
from lowmag.train.config import ExperimentConfig
from lowmag.train.data import describe, scan_slide_list, split_by_group
from lowmag.train.engine import Runtime
from lowmag.train.report import WITH_UNLABELED

log = logging.getLogger(__name__)

LABELED, UNLABELED = "labeled", "unlabeled"


@dataclass(frozen=True)
class Step:
    """One model the experiment trains."""

    phase: str  # teacher | baseline | distill | finetune
    resolution: str  # as written in the config, e.g. "scan/4" or "5x"
    regime: str = LABELED  # distill: "labeled" or "labeled+unlabeled"
    pixel: str = "both"
    attention_weight: float = 0.0

    @property
    def name(self) -> str:
        res = self.resolution.replace("/", "_")
        if self.phase in ("teacher", "baseline"):
            return f"{self.phase}-{res}"
        regime = "labeled" if self.regime == LABELED else "aux"
        extra = f"-att{self.attention_weight:g}" if self.attention_weight else ""
        return f"{self.phase}-{regime}-{self.pixel}{extra}-{res}"

    @property
    def method(self) -> str:
        if self.phase == "teacher":
            return "Teacher"
        if self.phase == "baseline":
            return "Baseline (from scratch)"
        data = "labeled" if self.regime == LABELED else WITH_UNLABELED
        pixel = {"both": "", "maxpool": ", max-pool only", "bicubic": ", bicubic only", "none": ", no pixel loss"}[self.pixel]
        attention = f", + attention {self.attention_weight:g}" if self.attention_weight else ""
        prefix = "Distillation + FC fine-tune" if self.phase == "finetune" else "Distillation"
        return f"{prefix} ({data}{pixel}{attention})"

    @property
    def seed_offset(self) -> int:
        return zlib.crc32(self.name.encode()) % 100_000


def headline_steps(config: ExperimentConfig) -> list[Step]:
    """The steps repeated for every extra seed: the teacher, the baselines and the students
    distilled on labeled + unlabeled data (the rows a claim rests on)."""
    d = config.distill
    return [s for s in plan_steps(config) if s.phase in ("teacher", "baseline")
            or (s.phase == "distill" and s.regime == "labeled+unlabeled" and s.pixel == d.pixel
                and s.attention_weight == d.attention_weight)]


def plan_steps(config: ExperimentConfig) -> list[Step]:
    """Every step of a full experiment, in the order they depend on each other."""
    d = config.distill
    steps = [Step("teacher", config.teacher_resolution)]
    steps += [Step("baseline", r) for r in config.student_resolutions]
    for regime in d.regimes:
        for r in config.student_resolutions:
            steps.append(Step("distill", r, regime, d.pixel, d.attention_weight))
            if config.finetune.enabled:
                steps.append(Step("finetune", r, regime, d.pixel, d.attention_weight))
    for mode in d.ablation:
        for r in d.ablation_resolutions or config.student_resolutions:
            step = Step("distill", r, d.ablation_regime, mode, d.attention_weight)
            if step not in steps:
                steps.append(step)
    return steps


class Experiment:
    """Data and folders of one run; every phase asks it for datasets and writes into it."""

    def __init__(self, config: ExperimentConfig, run_dir: str | Path, runtime: Runtime,
                 training_seed: int | None = None, cache_dir: Path | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.runtime = runtime
        #: The seed of training (initialisation, order, augmentation); the split keeps
        #: ``split_seed`` whatever this is.
        self.training_seed = config.seed if training_seed is None else training_seed
        self.cache_dir = cache_dir or (config.path(config.data.cache_dir) if config.data.cache_dir
                                       else self.run_dir / "cache")
        self._caches: dict[tuple[str, float], PixelCache] = {}
        if runtime.is_main:
            self._record_config()
        runtime.barrier()

    # -- config and folders -------------------------------------------------------------
    def _record_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.json"
        current = _comparable(self.config.to_dict())
        if path.is_file():
            previous = _comparable(json.loads(path.read_text(encoding="utf-8")))
            if previous != current:
                changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
                hint = ""
                if {"teacher", "student", "augment"} & set(changed):
                    hint = ("; if the config did not change, the default recipe did (it was "
                            "improved): set the values in the folder's config.json explicitly, as "
                            "train/configs/kather2016-v1.toml does for the recipe before it")
                raise LowmagError(
                    f"{self.run_dir}: this run folder was made with a different config "
                    f"(changed: {', '.join(changed)}); use a new --out folder to start over, "
                    f"or restore the original config to resume{hint}"
                )
        atomic_write_text(path, json.dumps(self.config.to_dict(), indent=2, default=str))

    def step_dir(self, step: Step) -> Path:
        return self.run_dir / "steps" / step.name

    # -- data -----------------------------------------------------------------------------
    @cached_property
    def _dataset(self) -> tuple[tuple[str, ...], dict[str, list[Item]]]:
        cfg, data = self.config, self.config.data
        if data.images:
            classes, items = scan_image_folder(
                cfg.path(data.images),
                scan_mpp=data.scan_mpp,
                metadata=data.metadata or None,
                group_by=data.group_by,
                crop_px=data.crop_px or None,
            )
            splits = split_by_group(items, data.split, self.split_seed)
        else:
            classes, splits = scan_slide_list(cfg.path(data.slides), assume_mpp=data.scan_mpp or None)
        if "train" not in splits:
            raise LowmagError("the data has no 'train' split; name one split 'train'")
        train = splits.pop("train")
        # Training slides listed without a label are auxiliary data, whatever the split says.
        auxiliary = list(splits.pop(UNLABELED, [])) + [i for i in train if i.label is None]
        train = [i for i in train if i.label is not None]
        if data.labeled_fraction < 1:
            parts = split_by_group(train, {LABELED: data.labeled_fraction, UNLABELED: 1 - data.labeled_fraction},
                                   self.split_seed + 1)
        else:
            parts = {LABELED: train, UNLABELED: []}
        auxiliary = list(parts[UNLABELED]) + auxiliary
        for folder in data.unlabeled:
            auxiliary += scan_image_folder(cfg.path(folder), scan_mpp=data.scan_mpp, crop_px=data.crop_px or None)[1]
        splits[LABELED] = parts[LABELED]
        # Labels of the auxiliary part are never used: drop them so no code path can.
        splits[UNLABELED] = [Item(i.path, None, i.group, i.region, i.scan_mpp) for i in auxiliary]
        if self.runtime.is_main:
            summary = {name: describe(items, classes) for name, items in splits.items()}
            listing = {name: [i.key() for i in items] for name, items in splits.items()}
            atomic_write_text(self.run_dir / "splits.json", json.dumps({"summary": summary, "items": listing}, indent=1))
            log.info("splits: %s", {k: v["items"] for k, v in summary.items()})
        return tuple(classes), splits

    @property
    def classes(self) -> tuple[str, ...]:
        return self._dataset[0]

    def items(self, split: str) -> list[Item]:
        splits = self._dataset[1]
        if split not in splits:
            raise LowmagError(f"no split named {split!r}; the data has {', '.join(splits)}")
        return splits[split]

    def items_or_empty(self, split: str) -> list[Item]:
        return self._dataset[1].get(split, [])

    def mpp(self, resolution: str) -> float:
        scan = self.config.data.scan_mpp or None
        return Resolution.parse(resolution).to_mpp(scan)

    def cache(self, split: str, resolution: str) -> PixelCache:
        """Pixels of a split at a resolution, built once (by rank 0 under torchrun)."""
        mpp = self.mpp(resolution)
        key = (split, mpp)
        if key not in self._caches:
            items = self.items(split)
            if self.runtime.is_main:
                self._caches[key] = build_cache_with_progress(items, mpp, self.cache_dir, f"reading {split} at {mpp:g} µm/px")
            self.runtime.barrier()
            if not self.runtime.is_main:
                self._caches[key] = build_cache(items, mpp, self.cache_dir)
        return self._caches[key]

    @cached_property
    def normalization(self) -> Normalization:
        """Per-channel mean/std of the labeled training images at the teacher's resolution."""
        mean, std = channel_stats(self.cache(LABELED, self.config.teacher_resolution))
        return Normalization(mean=mean, std=std)

    @property
    def split_seed(self) -> int:
        """The split's seed: ``data.split_seed``, else the experiment's."""
        return self.config.data.split_seed if self.config.data.split_seed >= 0 else self.config.seed

    def step_seed(self, step: Step) -> int:
        return self.training_seed + step.seed_offset

    def for_seed(self, seed: int) -> "Experiment":
        """The same experiment (split, cache) trained with another seed, in RUN/seed-<k>/."""
        return Experiment(self.config, self.run_dir / f"seed-{seed}", self.runtime, training_seed=seed,
                          cache_dir=self.cache_dir)

    def spec(self, step: Step, extra: dict | None = None) -> ModelSpec:
        return ModelSpec(
            classes=self.classes,
            target_mpp=self.mpp(step.resolution),  # the spec derives the magnification
            normalization=self.normalization,
            architecture=self.config.architecture,
            provenance=new_provenance(
                config={"experiment": self.config.to_dict(), "step": step.name, **(extra or {})},
                data={name: describe(self.items(name), self.classes) for name in self._dataset[1]},
                seed=self.step_seed(step),
            ),
            fingerprint=self.fingerprint(step),
        )

    def fingerprint(self, step: Step) -> dict[str, Any]:
        """What the step's training images looked like at its µm/px (``lowmag.fingerprint``),
        its threshold set on the validation images; empty (with a warning) when there are too
        few images to make one."""
        from lowmag.fingerprint import Fingerprint

        parts = [LABELED] + ([UNLABELED] if step.regime != LABELED and self.items_or_empty(UNLABELED) else [])
        training = [self.cache(part, step.resolution) for part in parts]
        held_out = self.cache("val", step.resolution) if self.items_or_empty("val") else []
        try:
            made = Fingerprint.build((c[i] for c in training for i in range(len(c))),
                                     (held_out[i] for i in range(len(held_out))), self.mpp(step.resolution),
                                     source=f"distill-train {step.name}: {' + '.join(parts)} images, threshold on val")
        except LowmagError as error:
            log.warning("%s: no fingerprint of the training data (%s); edge-classify will only check that "
                        "slides are brightfield", step.name, error)
            return {}
        return made.data


def _comparable(config: dict) -> dict:
    """The parts of a config that decide results (runtime knobs may change on resume)."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in config.items() if k not in ("runtime", "base_dir")}

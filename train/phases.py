"""The phases: teacher, from-scratch baseline, distillation, FC fine-tuning — and evaluation.

Each phase builds its model and loss, trains with :func:`lowmag.train.engine.fit`
(choosing the epoch with the best validation macro F1), writes a checkpoint, and
:func:`evaluate_step` scores it on the held-out split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowmag.errors import LowmagError
from lowmag.io import atomic_write_text
from lowmag.train.cache import ConcatCache
from lowmag.train.config import PhaseConfig
from lowmag.train.checkpoint import is_complete, load_checkpoint, save_checkpoint
from lowmag.train.datasets import MultiResolutionDataset
from lowmag.train.engine import Mixed, Runtime, fit, predict
from lowmag.train.experiment import LABELED, UNLABELED, Experiment, Step
from lowmag.train.flops import forward_gflops
from lowmag.train.losses import DistillationLoss
from lowmag.train.models import ResNet, build_model, load_pretrained

log = logging.getLogger(__name__)

METRICS = "metrics.json"


class WithFeatures(nn.Module):
    """Forward returns (logits, final feature map), so DDP sees the student's whole use."""

    def __init__(self, model: ResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_features(x)


def _logits(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def run_step(exp: Experiment, step: Step) -> Path:
    """Train ``step`` unless its checkpoint is already complete; returns its folder."""
    out = exp.step_dir(step)
    if is_complete(out):
        log.info("%s: already trained, skipping", step.name)
        return out
    out.mkdir(parents=True, exist_ok=True)
    trainer = {"teacher": _teacher, "baseline": _baseline, "distill": _distill, "finetune": _finetune}[step.phase]
    result, extra = trainer(exp, step, out)
    if exp.runtime.is_main:
        history = {"best_epoch": result.best_epoch, "best_val_macro_f1": result.best_score, "epochs": result.history}
        atomic_write_text(out / "history.json", json.dumps(history, indent=1))
        extra = {**extra, "best_epoch": result.best_epoch, "runtime": exp.runtime.describe()}
        save_checkpoint(result.best_state, exp.spec(step, extra), out)
        (out / "train_state.pt").unlink(missing_ok=True)
    exp.runtime.barrier()
    return out


def _validation_score(exp: Experiment, resolution: str):
    """Macro F1 on the validation split at ``resolution`` (None when there is no such split)."""
    if not exp.items_or_empty("val"):
        return None
    dataset = MultiResolutionDataset([exp.cache("val", resolution)], [i.label for i in exp.items("val")], exp.normalization)

    def score(model: nn.Module) -> float:
        logits, labels = predict(model, dataset, exp.runtime, exp.config.evaluation.batch_size, "validating")
        return macro_f1(labels, logits.argmax(1), len(exp.classes))

    return score


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    from lowmag.metrics import classification_metrics

    names = [str(i) for i in range(num_classes)]
    return classification_metrics(y_true, y_pred, names, n_bootstrap=0)["macro_f1"]["value"]


def _labeled(exp: Experiment, resolutions: list[str], seed: int) -> MultiResolutionDataset:
    items = exp.items(LABELED)
    caches = [exp.cache(LABELED, r) for r in resolutions]
    return MultiResolutionDataset(caches, [i.label for i in items], exp.normalization, exp.config.augment, seed)


def _cross_entropy(smoothing: float = 0.0):
    """The step of the label-trained models (teacher, baselines)."""
    def step(model: nn.Module, images: list[torch.Tensor], labels) -> torch.Tensor:
        logits = _logits(model(images[0])).float()
        if isinstance(labels, Mixed):  # mixup: the blend of the two images' losses
            return (labels.lam * F.cross_entropy(logits, labels.a, label_smoothing=smoothing)
                    + (1.0 - labels.lam) * F.cross_entropy(logits, labels.b, label_smoothing=smoothing))
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)

    return step


def _teacher(exp: Experiment, step: Step, out: Path):
    return _from_labels(exp, step, out, exp.config.teacher, exp.config.pretrained)


def _baseline(exp: Experiment, step: Step, out: Path):
    return _from_labels(exp, step, out, exp.config.student, "")


def _from_labels(exp: Experiment, step: Step, out: Path, phase: PhaseConfig, pretrained: str):
    """Cross-entropy on the labeled split at the step's resolution (teacher and baselines)."""
    seed = exp.step_seed(step)
    torch.manual_seed(seed)
    model = build_model(exp.config.architecture, len(exp.classes))
    extra: dict[str, Any] = {}
    if pretrained:
        load_pretrained(model, exp.config.path(pretrained))
        extra["pretrained"] = pretrained
    dataset = _labeled(exp, [step.resolution], seed)
    result = fit(model, _cross_entropy(phase.label_smoothing), dataset, phase, exp.runtime, out,
                 seed=seed, score=_validation_score(exp, step.resolution), description=step.name)
    return result, extra


def _load_teacher(exp: Experiment) -> ResNet:
    teacher_step = Step("teacher", exp.config.teacher_resolution)
    folder = exp.step_dir(teacher_step)
    if not is_complete(folder):
        seeded = f" --seed {exp.training_seed}" if exp.training_seed != exp.config.seed else ""
        raise LowmagError(f"{folder}: no finished teacher; run `distill-train teacher{seeded}` (or `run`) first")
    teacher, _ = load_checkpoint(folder)
    teacher = exp.runtime.prepare(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _distill(exp: Experiment, step: Step, out: Path):
    cfg = exp.config
    seed = exp.step_seed(step)
    torch.manual_seed(seed)
    teacher = _load_teacher(exp)
    student = build_model(cfg.architecture, len(exp.classes))
    loss_fn = DistillationLoss(cfg.distill.temperature, step.pixel, cfg.distill.pixel_weight, step.attention_weight)
    resolutions = [cfg.teacher_resolution, step.resolution]
    parts = [LABELED] + ([UNLABELED] if step.regime != LABELED else [])
    items = [i for part in parts for i in exp.items(part)]
    if step.regime != LABELED and not exp.items(UNLABELED):
        raise LowmagError("the labeled+unlabeled regime needs unlabeled data: set data.labeled_fraction < 1 or data.unlabeled")
    caches = [ConcatCache([exp.cache(p, r) for p in parts]) for r in resolutions]
    dataset = MultiResolutionDataset(caches, [None] * len(items), exp.normalization, cfg.augment, seed)
    log.info("%s: distilling on %d images (%s)", step.name, len(items), " + ".join(parts))

    def step_fn(model: nn.Module, images: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        high, low = images
        with torch.no_grad():
            t_logits, t_features = teacher.forward_with_features(high)
        s_logits, s_features = model(low)
        parts_ = loss_fn(s_logits, s_features, t_logits, t_features, student.fc.weight, teacher.fc.weight)
        return parts_.total

    wrapped = WithFeatures(student)
    result = fit(wrapped, step_fn, dataset, cfg.student, exp.runtime, out,
                 seed=seed, score=_validation_score(exp, step.resolution), description=step.name)
    result.best_state = {k.removeprefix("model."): v for k, v in result.best_state.items()}
    extra = {"temperature": cfg.distill.temperature, "pixel": step.pixel, "pixel_weight": cfg.distill.pixel_weight,
             "attention_weight": step.attention_weight, "regime": step.regime}
    return result, extra


def _finetune(exp: Experiment, step: Step, out: Path):
    cfg = exp.config
    seed = exp.step_seed(step)
    source = exp.step_dir(Step("distill", step.resolution, step.regime, step.pixel, step.attention_weight))
    if not is_complete(source):
        raise LowmagError(f"{source}: no finished distilled student to fine-tune; run `distill` first")
    student, _ = load_checkpoint(source)
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    dataset = _labeled(exp, [step.resolution], seed)
    # The FC fine-tuning keeps its own plain recipe (constant lr, no decay): nothing measured
    # says the default recipe helps a single linear layer.
    phase = PhaseConfig(epochs=cfg.finetune.epochs, batch_size=cfg.student.batch_size, lr=cfg.finetune.lr,
                        weight_decay=0.0, schedule="constant", warmup_epochs=0, min_lr_fraction=0.0)
    result = fit(student, _cross_entropy(), dataset, phase, exp.runtime, out, seed=seed,
                 score=_validation_score(exp, step.resolution), parameters=list(student.fc.parameters()),
                 description=step.name)
    return result, {"finetuned_from": step.name.replace("finetune", "distill", 1)}


def evaluate_step(exp: Experiment, step: Step) -> dict[str, Any]:
    """Test-split metrics of a finished step, written beside its checkpoint (cached)."""
    out = exp.step_dir(step)
    path = out / METRICS
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    model, spec = load_checkpoint(out)
    split = exp.config.evaluation.split
    cache = exp.cache(split, step.resolution)
    evaluation = exp.config.evaluation
    labels = [i.label for i in exp.items(split)]
    metrics = evaluate_model(model, cache, labels, spec, exp.runtime, evaluation.bootstrap, batch_size=evaluation.batch_size)
    row = {
        "name": step.name, "phase": step.phase, "method": step.method, "seed": exp.training_seed,
        "magnification": spec.magnification, "mpp": spec.target_mpp,
        "input_px": metrics.pop("input_px"), "gflops": metrics.pop("gflops"), "metrics": metrics,
    }
    atomic_write_text(path, json.dumps(row, indent=1))
    return row


def evaluate_model(
    model: ResNet, cache, labels, spec, runtime: Runtime, bootstrap: int, seed: int = 0, batch_size: int = 64
) -> dict[str, Any]:
    """Metrics with bootstrap CIs, plus the input size and GFLOPs of one forward pass."""
    from lowmag.metrics import classification_metrics

    dataset = MultiResolutionDataset([cache], labels, spec.normalization)
    logits, y = predict(model, dataset, runtime, batch_size, "evaluating")
    metrics = classification_metrics(y, logits.argmax(1), list(spec.classes), n_bootstrap=bootstrap, seed=seed)
    shapes = np.array([(int(h), int(w)) for _, h, w in cache.index])
    height, width = (int(v) for v in np.median(shapes, axis=0))
    metrics["input_px"] = height if height == width else f"{width}x{height}"
    metrics["input_size_note"] = "" if cache.uniform_shape else "median input size of the evaluated images"
    metrics["gflops"] = round(forward_gflops(model.cpu(), height, width), 5)
    return metrics

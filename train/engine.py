"""The training loop: devices, torchrun data parallelism, bf16, accumulation, resumable epochs.

One loop serves every phase; a phase supplies ``step(model, images, labels) -> loss``.
Launched plainly it uses one device; launched by ``torchrun --nproc_per_node=N`` it reads
RANK/WORLD_SIZE/LOCAL_RANK, wraps the model in DistributedDataParallel (NCCL on CUDA, Gloo
on CPU) and shards the data, so the same command runs on one GPU, several, or several nodes.
After every epoch the rank-0 process writes the training state atomically; a rerun of the
same step continues from the last finished epoch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from lowmag.errors import LowmagError
from lowmag.io import atomic_write_bytes
from lowmag.train.config import PhaseConfig, RuntimeConfig
from lowmag.train.datasets import MultiResolutionDataset, make_loader

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, list[torch.Tensor], "torch.Tensor | Mixed"], torch.Tensor]
ScoreFn = Callable[[nn.Module], float]


@dataclass
class Runtime:
    """Where and how this process computes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    bf16: bool = False
    channels_last: bool = False
    workers: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def to_device(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return [x.to(self.device, non_blocking=True, memory_format=fmt) for x in images]

    def describe(self) -> dict[str, Any]:
        info = {"device": str(self.device), "world_size": self.world_size, "bf16_autocast": self.bf16 and self.device.type == "cuda"}
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        else:
            info["cpu"] = _cpu_model()
            info["cpu_threads"] = torch.get_num_threads()
        return info


def _cpu_model() -> str:
    from lowmag.provenance import cpu_info

    cpu = cpu_info()
    return f"{cpu['model']}, {cpu['cores']} cores"


def make_runtime(config: RuntimeConfig) -> Runtime:
    """The runtime of this process, joining the torchrun process group when launched by it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.threads:
        torch.set_num_threads(config.threads)
    wanted = config.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(wanted)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LowmagError("runtime.device asks for CUDA but torch sees no GPU; use device = \"cpu\"")
        if world_size > 1:
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:
                per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world_size))
                raise LowmagError(f"torchrun started {per_node} processes on this machine but torch sees {gpus} "
                                  f"GPU(s); run one process per GPU: --nproc_per_node={gpus}")
            device = torch.device("cuda", local_rank)
        elif device.index is None:  # torch.cuda.set_device refuses a bare "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = False
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # NCCL is told its GPU, instead of guessing it from the rank (it warns of a hang otherwise).
        torch.distributed.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    # Channels-last pays off on GPUs; on CPUs it was slower at the tile sizes measured.
    channels_last = config.channels_last and device.type == "cuda"
    return Runtime(device, rank, world_size, config.bf16, channels_last, config.workers)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Mixed:
    """The labels of a mixup batch: item i is ``lam`` of label ``a[i]`` and 1 - ``lam`` of ``b[i]``."""

    a: torch.Tensor
    b: torch.Tensor
    lam: float


def mix_batch(images: list[torch.Tensor], labels: torch.Tensor, alpha: float, rng: np.random.Generator
              ) -> tuple[list[torch.Tensor], "torch.Tensor | Mixed"]:
    """Mixup: blend the batch with a shuffled copy of itself, alike at every resolution.

    The weight comes from Beta(alpha, alpha), folded to >= 0.5 so the first image leads. A
    batch of one image (variable-size pieces) is left as it is.
    """
    if alpha <= 0 or len(labels) < 2:
        return images, labels
    lam = float(rng.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    order = torch.from_numpy(rng.permutation(len(labels))).to(labels.device)
    mixed = [lam * x + (1.0 - lam) * x[order] for x in images]
    return mixed, Mixed(labels, labels[order], lam)


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)


def fit(
    model: nn.Module,
    step: StepFn,
    dataset: MultiResolutionDataset,
    phase: PhaseConfig,
    runtime: Runtime,
    workdir: Path,
    *,
    seed: int,
    score: ScoreFn | None = None,
    parameters: Sequence[nn.Parameter] | None = None,
    description: str = "training",
) -> FitResult:
    """Train ``model`` in place and return the weights of the best-scoring epoch.

    ``score`` (higher is better, e.g. validation macro F1) picks the epoch; without it the
    last epoch is kept. ``parameters`` restricts what the optimiser updates (FC fine-tuning).
    """
    seed_everything(seed)
    model = runtime.prepare(model)
    params = list(parameters) if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay)
    result = FitResult(0, -1, float("-inf"))
    state_path = workdir / "train_state.pt"
    start = 0
    if state_path.is_file():
        start = _resume(state_path, model, optimiser, result)
        log.info("%s: resuming after epoch %d", description, start)
    trained = model
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    loader, accumulate = make_loader(
        dataset, phase.batch_size, shuffle=True, seed=seed, workers=runtime.workers, distributed=runtime.distributed
    )
    for epoch in range(start, phase.epochs):
        for group in optimiser.param_groups:  # the schedule is a function of the epoch: resumes agree
            group["lr"] = phase.lr_at(epoch)
        dataset.set_epoch(epoch)
        # The shuffle order depends on (seed, epoch) only, so a resumed step draws the same
        # order as an uninterrupted one.
        loader.generator.manual_seed(seed * 100_003 + epoch)
        if runtime.distributed:
            loader.sampler.set_epoch(epoch)
        trained.train()
        began = time.perf_counter()
        mix = None
        if phase.mixup > 0:  # drawn from (seed, epoch, batch): a resumed epoch mixes alike
            def mix(images, labels, i):
                return mix_batch(images, labels, phase.mixup, np.random.default_rng([seed, epoch, i, runtime.rank]))
        mean_loss = _run_epoch(trained, step, loader, accumulate, optimiser, runtime,
                               f"{description} {epoch + 1}/{phase.epochs}", mix)
        record = {"epoch": epoch + 1, "loss": mean_loss, "lr": phase.lr_at(epoch),
                  "train_seconds": round(time.perf_counter() - began, 1)}
        if runtime.is_main:
            model.eval()
            if score is not None:
                record["score"] = float(score(model))
            if score is None or record["score"] > result.best_score:
                result.best_score = record.get("score", float("nan"))
                result.best_epoch = epoch + 1
                result.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result.history.append(record)
            log.info("%s: %s", description, record)
            _save_state(state_path, model, optimiser, epoch + 1, result)
        runtime.barrier()
    result.epochs_run = phase.epochs
    if not result.best_state:
        result.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return result


def _run_epoch(model, step, loader, accumulate, optimiser, runtime, description, mix=None) -> float:
    from tqdm import tqdm

    total, count = 0.0, 0
    optimiser.zero_grad(set_to_none=True)
    batches = tqdm(loader, desc=description, leave=False, disable=not runtime.is_main, unit="batch")
    pending = 0
    for i, (images, labels) in enumerate(batches):
        images = runtime.to_device(images)
        labels = labels.to(runtime.device)
        if mix is not None:
            images, labels = mix(images, labels, i)
        last = i + 1 == len(loader)
        sync = pending + 1 == accumulate or last
        context = model.no_sync() if runtime.distributed and not sync else contextlib.nullcontext()
        with context:
            with runtime.autocast():
                loss = step(model, images, labels)
            (loss / accumulate).backward()
        pending += 1
        if sync:
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            pending = 0
        total += float(loss.detach())
        count += 1
        batches.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def _save_state(path: Path, model: nn.Module, optimiser, epoch: int, result: FitResult) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "epoch": epoch,
            "best_epoch": result.best_epoch,
            "best_score": result.best_score,
            "best_state": result.best_state,
            "history": result.history,
        },
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())


def _resume(path: Path, model: nn.Module, optimiser, result: FitResult) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    result.best_epoch = int(state["best_epoch"])
    result.best_score = float(state["best_score"])
    result.best_state = dict(state["best_state"])
    result.history = list(state["history"])
    return int(state["epoch"])


@torch.no_grad()
def predict(
    model: nn.Module, dataset: MultiResolutionDataset, runtime: Runtime, batch_size: int = 64, description: str = "predicting"
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, classes) and labels (N,) of ``dataset`` (its first resolution), in order."""
    from tqdm import tqdm

    model = runtime.prepare(model)
    model.eval()
    loader, _ = make_loader(dataset, batch_size, shuffle=False, seed=0, workers=runtime.workers)
    logits, labels = [], []
    for images, y in tqdm(loader, desc=description, leave=False, disable=not runtime.is_main, unit="batch"):
        with runtime.autocast():
            out = model(runtime.to_device(images)[0])
        if isinstance(out, tuple):  # a model that also returns its feature map
            out = out[0]
        logits.append(out.float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


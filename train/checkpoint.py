"""Checkpoints: a folder with ``model.safetensors`` and the ``lowmag.json`` spec beside it.

The weights are written first and the spec (which records their sha256) last, both
atomically, so a folder whose spec exists and whose hashes match is a complete checkpoint;
anything interrupted earlier is simply rewritten. Loading never unpickles code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowmag.io import atomic_write_bytes
from lowmag.errors import SpecError
from lowmag.spec import ModelSpec, check_preprocessing, read_spec, verify_artifacts, write_spec
from lowmag.train.models import ResNet, build_model

WEIGHTS = "model.safetensors"


def save_checkpoint(state: dict[str, torch.Tensor], spec: ModelSpec, directory: str | Path) -> ModelSpec:
    """Write weights then spec into ``directory``; returns the spec with artifact hashes."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(directory / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    spec = spec.with_artifacts(directory, [WEIGHTS])
    write_spec(spec, directory)
    return spec


def is_complete(directory: str | Path) -> bool:
    """True when the folder holds a spec whose artifacts are all present and intact."""
    try:
        spec = read_spec(directory)
        verify_artifacts(spec, directory)
    except Exception:  # noqa: BLE001 - any problem means "not finished"
        return False
    return True


def load_checkpoint(path: str | Path) -> tuple[ResNet, ModelSpec]:
    """The model and spec of a checkpoint folder (or its ``lowmag.json``), hashes verified."""
    from safetensors.torch import load_file

    directory = Path(path)
    if directory.name.endswith(".json"):
        directory = directory.parent
    spec = read_spec(directory)
    if spec.export or WEIGHTS not in spec.artifacts:
        source = (spec.export.get("source_checkpoint") or {}).get("path")
        raise SpecError(directory / "lowmag.json", (
            "is an exported bundle, not a training checkpoint (no model.safetensors); pass the "
            "checkpoint folder distill-train wrote" + (f", here {source}" if source else "")) + ".")
    verify_artifacts(spec, directory)
    check_preprocessing(spec, directory)
    model = build_model(spec.architecture, len(spec.classes))
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    model.eval()
    return model, spec

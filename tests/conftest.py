"""Shared fixtures: synthetic pyramidal slides with known µm/px, and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lowmag.synthetic import Blob, make_synthetic_slide

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LOWMAG_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = SHARED_DATA / "slides"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
        for item in gpu_items:
            item.add_marker(skip)


def _cuda_available() -> bool:
    """A CUDA GPU usable from here: through torch on training hosts, else (edge
    workstations install no torch) through TensorRT with cuda-python."""
    try:
        import torch  # imported only when a gpu test was collected
    except ImportError:
        from lowmag.tensorrt_runtime import tensorrt_runtime_available

        return tensorrt_runtime_available()
    return bool(torch.cuda.is_available())


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """The real slides of ../shared/data/slides; tests using it skip when absent."""
    if not SLIDES.is_dir():
        pytest.skip(f"real slides not found at {SLIDES}")
    return SLIDES


SYNTHETIC_MPP = 0.5
SYNTHETIC_SIZE = (2048, 1536)
SYNTHETIC_BLOBS = (Blob(614, 768, 368, 491), Blob(1536, 614, 204, 230))


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048x1536 pyramidal TIFF at 0.5 µm/px with two tissue pieces (SYNTHETIC_BLOBS)."""
    path = tmp_path_factory.mktemp("synthetic") / "two-pieces.tif"
    return make_synthetic_slide(path, *SYNTHETIC_SIZE, mpp=SYNTHETIC_MPP, blobs=SYNTHETIC_BLOBS, seed=1)

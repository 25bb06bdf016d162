"""Shared fixtures: synthetic pyramidal slides with known µm/px, and the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lowmag.synthetic import Blob, make_synthetic_slide

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("LOWMAG_SHARED_DATA", REPO.parent / "shared" / "data"))
SLIDES = SHARED_DATA / "slides"


@pytest.fixture(scope="session", autouse=True)
def _machine_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Machine-local caches (ONNX Runtime's optimised model copies, calibration sets) go to a
    folder of this test session, for the CLIs run in subprocesses too, not ~/.cache/lowmag."""
    if "LOWMAG_CACHE_DIR" not in os.environ:
        os.environ["LOWMAG_CACHE_DIR"] = str(tmp_path_factory.mktemp("lowmag-cache"))


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


KATHER = SHARED_DATA / "kather2016"
#: The µm/px of the edge tests' bundles (5x).
BUNDLE_MPP = 2.0


def kather_split(every: int = 1) -> dict[str, list[Path]]:
    """Kather 2016 tiles split by group (label, source image) 60/20/20, every ``every``-th tile."""
    import csv
    import hashlib

    if not (KATHER / "tiles.csv").is_file():
        pytest.skip(f"Kather 2016 tiles not found at {KATHER}")
    splits: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    with open(KATHER / "tiles.csv", encoding="utf-8") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            if i % every:
                continue
            h = int(hashlib.sha256(f"{row['label']}/{row['source_image']}".encode()).hexdigest(), 16) % 10
            splits["train" if h < 6 else "val" if h < 8 else "test"].append(KATHER / row["path"])
    return splits


def read_tiles(paths: list[Path], mpp: float = BUNDLE_MPP) -> list:
    """Kather tiles (0.495 µm/px) at ``mpp``, read as training reads them."""
    from lowmag.reader import read_at_mpp
    from lowmag.slide import open_slide

    images = []
    for path in paths:
        with open_slide(path, assume_mpp=0.495) as slide:
            images.append(read_at_mpp(slide, mpp, exact=True))
    return images


@pytest.fixture(scope="session")
def he_fingerprint() -> dict:
    """A fingerprint of real H&E training data: a third of the Kather training and validation
    tiles at 2 µm/px (about 4 s), as distill-train would record it."""
    from lowmag.fingerprint import Fingerprint

    splits = kather_split(every=3)
    return Fingerprint.build(read_tiles(splits["train"]), read_tiles(splits["val"]), BUNDLE_MPP,
                             source="Kather 2016 train tiles (every third), threshold on val").data

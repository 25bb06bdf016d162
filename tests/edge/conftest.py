"""Bundles and slides for the edge runner's tests: real ONNX/OpenVINO models, real TIFFs."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from lowmag.synthetic import Blob, make_synthetic_slide
from tests.models import make_bundle

REPO = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "edge-classify"
EDGE = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "lowmag.edge.cli"]


@pytest.fixture(scope="session")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2 µm/px (5x) ONNX bundle telling pink tissue from glass, temperature 2."""
    pytest.importorskip("onnx")
    return make_bundle(tmp_path_factory.mktemp("bundles") / "onnx", "onnx", temperature=2.0)


@pytest.fixture(scope="session")
def openvino_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return make_bundle(tmp_path_factory.mktemp("bundles") / "openvino", "openvino", temperature=2.0)


@pytest.fixture(scope="session")
def slide_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Small pyramidal TIFFs at 0.5 µm/px; same arguments give byte-identical files."""
    cache = tmp_path_factory.mktemp("slides")

    def make(name: str = "slide.tif", width: int = 1024, height: int = 768, seed: int = 0,
             blobs: tuple[Blob, ...] | None = None, mpp: float | None = 0.5) -> Path:
        return make_synthetic_slide(cache / name, width, height, mpp=mpp, blobs=blobs, seed=seed)

    return make


def edge(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None,
         **kwargs) -> subprocess.CompletedProcess:
    """Run edge-classify as a user would, in a fresh process (``env``: variables to add)."""
    return subprocess.run([*EDGE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **kwargs)


def start_watch(scans: Path, out: Path, bundle: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    log_handle = open(log or out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen([*EDGE, "watch", str(scans), "--model", str(bundle), "--out", str(out), *extra],
                            stdout=log_handle, stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def ledger_states(out: Path) -> dict[str, str]:
    """path -> state, read as status does (safe while a watcher runs)."""
    db = out / "ledger.sqlite"
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        try:
            return dict(connection.execute("SELECT path, state FROM slides").fetchall())
        except sqlite3.OperationalError:  # the table is being created
            return {}


def wait_for(condition: Callable[[], bool], timeout: float = 60, what: str = "condition",
             proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the watcher exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop(proc: subprocess.Popen, timeout: float = 30) -> int:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


@pytest.fixture(scope="session")
def he_bundle(tmp_path_factory: pytest.TempPathFactory, he_fingerprint: dict) -> Path:
    """The 5x test bundle with a fingerprint of real H&E training tiles (Kather 2016)."""
    pytest.importorskip("onnx")
    return make_bundle(tmp_path_factory.mktemp("bundles") / "he", "onnx", temperature=2.0, fingerprint=he_fingerprint)

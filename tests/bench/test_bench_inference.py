"""Inference per backend and precision on a tissue piece and on a batch of tiles.

Bundles: every ``runs/kather2016-bundles/*/lowmag.json`` present (written by
``bash docs/kather2016-export.sh``; gitignored), each on the runtime its gate measured
(``choose_backend`` auto) and, for ONNX bundles, also on OpenVINO; and always a tiny
mean-colour bundle from ``tests.models`` (ONNX and OpenVINO) so the suite runs anywhere.
One session per bundle and backend, with 2 threads, warmed up on each input shape first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pytest

from lowmag.bundle import Bundle, load_bundle
from lowmag.edge.backends import BackendChoice, choose_backend, open_session
from lowmag.runtimes import OpenVinoSession, Session
from lowmag.synthetic import Blob, synthetic_pixels

pytestmark = pytest.mark.benchmark

REPO = Path(__file__).resolve().parents[2]
KATHER_BUNDLES = REPO / "runs" / "kather2016-bundles"
THREADS = 2
TINY = ("tiny-onnx", "tiny-openvino")


def _cases() -> list[tuple[str, str]]:
    """(bundle name, backend): 'auto' is the gated runtime; ONNX bundles also on 'openvino'."""
    cases = [(name, "auto") for name in TINY] + [("tiny-onnx", "openvino")]
    for spec in sorted(KATHER_BUNDLES.glob("*/lowmag.json")):
        cases.append((spec.parent.name, "auto"))
        if json.loads(spec.read_text()).get("export", {}).get("target") == "onnx":
            cases.append((spec.parent.name, "openvino"))
    return cases


def _inputs() -> dict[str, np.ndarray]:
    """A 512x512 tissue piece (1, 512, 512, 3) and 8 tiles of 72x72 cut from it."""
    piece = synthetic_pixels(512, 512, [Blob(256, 256, 240, 200)], seed=6)
    tiles = np.stack([piece[y:y + 72, x:x + 72] for y in (150, 300) for x in (60, 170, 280, 390)])
    return {"piece-512": piece[None], "tiles-8x72": tiles}


INPUTS = _inputs()


class Opened(NamedTuple):
    bundle: Bundle
    choice: BackendChoice
    session: Session


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, str], Opened]]:
    """A getter of sessions by (bundle, backend); one is kept at a time, so memory stays flat."""
    cache: dict[tuple[str, str], Opened] = {}
    tiny: dict[str, Path] = {}

    def bundle_dir(name: str) -> Path:
        if name in TINY:
            if name not in tiny:
                pytest.importorskip("onnx")
                from tests.models import make_bundle

                target = name.removeprefix("tiny-")
                tiny[name] = make_bundle(tmp_path_factory.mktemp("bench-bundles") / name, target)
            return tiny[name]
        return KATHER_BUNDLES / name

    def get(name: str, backend: str) -> Opened:
        if (name, backend) not in cache:
            cache.clear()
            bundle = load_bundle(bundle_dir(name))
            choice = choose_backend(bundle, backend)
            cache[(name, backend)] = Opened(bundle, choice, open_session(bundle, choice, threads=THREADS))
        return cache[(name, backend)]

    yield get
    cache.clear()


@pytest.mark.parametrize(("name", "backend", "input_name"),
                         [(*case, input_name) for case in _cases() for input_name in INPUTS],
                         ids=lambda value: str(value))
def test_inference(benchmark, sessions, name: str, backend: str, input_name: str) -> None:
    opened = sessions(name, backend)
    pixels = INPUTS[input_name]
    opened.session.run(pixels)  # warm-up: the first run of a shape compiles or plans it
    benchmark.group = f"inference {input_name} {tuple(pixels.shape)}"
    benchmark.extra_info.update(
        bundle=name, target=opened.bundle.target, backend=opened.choice.backend, device=opened.choice.device,
        asked=backend, gated=backend == "auto",
        precision=opened.bundle.precision, target_mpp=opened.bundle.spec.target_mpp,
        architecture=opened.bundle.spec.architecture, threads=THREADS, input=list(pixels.shape),
    )
    if isinstance(opened.session, OpenVinoSession):
        # What OpenVINO really computes in: without the bundle's f32 hint (an ONNX bundle
        # run on OpenVINO), CPUs with AMX or AVX512-BF16 default to bf16.
        hint = opened.session.compiled.get_property("INFERENCE_PRECISION_HINT")
        benchmark.extra_info["openvino_precision"] = str(hint)
    outputs = benchmark(opened.session.run, pixels)
    assert outputs["logits"].shape == (len(pixels), len(opened.bundle.spec.classes))

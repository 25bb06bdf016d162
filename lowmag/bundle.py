"""Deployable bundles: a folder of model files with the ``lowmag.json`` that vouches for them.

``export-student`` writes a bundle; the edge runner and the benchmarks load one with
``load_bundle``, which checks the spec and the sha256 of every file before anything runs.
A bundle's spec carries an ``export`` section (see ``lowmag.export.bundle``) naming the
target, the precision, the model files, the runtime settings the parity gate was measured
with, and the gate's results. Torch-free: scanner workstations load bundles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from lowmag.errors import SpecError
from lowmag.spec import SPEC_FILENAME, ModelSpec, check_preprocessing, read_spec, verify_artifacts

#: Targets a bundle can be exported for, and the runtimes that can load each.
TARGETS = ("onnx", "openvino", "tensorrt")

#: Names of the tensors every exported graph has (``features`` only when asked for).
INPUT_NAME = "pixels"
LOGITS_NAME = "logits"
FEATURES_NAME = "features"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its folder and its spec (whose ``export`` section is filled)."""

    directory: Path
    spec: ModelSpec

    @property
    def target(self) -> str:
        return str(self.spec.export["target"])

    @property
    def precision(self) -> str:
        return self.spec.precision

    @property
    def files(self) -> Mapping[str, str]:
        """Roles (``model``, ``onnx``, ``sidecar``...) to file names inside the bundle."""
        return self.spec.export["files"]

    def path(self, role: str = "model") -> Path:
        return self.directory / self.files[role]

    @property
    def runtime_settings(self) -> Mapping[str, Any]:
        """Settings the gate ran with, per runtime (e.g. OpenVINO's precision hint)."""
        return self.spec.export.get("runtime", {})

    @property
    def sha256(self) -> str:
        """The hash of the main model file: a short, stable bundle identity."""
        return self.spec.artifacts[self.files["model"]]


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle folder (or its ``lowmag.json``); raises ``SpecError``."""
    directory = Path(path)
    if directory.name == SPEC_FILENAME:
        directory = directory.parent
    if not directory.is_dir():
        raise SpecError(directory, "is not a bundle folder; pass the folder export-student wrote (--out).")
    spec = read_spec(directory)
    spec_path = directory / SPEC_FILENAME
    export = spec.export
    if not export:
        raise SpecError(
            spec_path,
            "has no export section: this is a training checkpoint, not a deployable bundle. "
            "Make one with: export-student CHECKPOINT --target onnx --out BUNDLE_DIR",
        )
    problems = []
    if export.get("target") not in TARGETS:
        problems.append(f"export.target must be one of {', '.join(TARGETS)}, got {export.get('target')!r}")
    files = export.get("files")
    if not isinstance(files, Mapping) or "model" not in files:
        problems.append("export.files must name the model file ({'model': ...})")
    else:
        unlisted = sorted(name for name in files.values() if name not in spec.artifacts)
        if unlisted:
            problems.append(f"export.files lists {', '.join(unlisted)} without a sha256 in artifacts")
    if problems:
        problems.append("re-export the bundle with export-student")
        raise SpecError(spec_path, problems)
    verify_artifacts(spec, directory)
    check_preprocessing(spec, spec_path)
    return Bundle(directory=directory, spec=spec)

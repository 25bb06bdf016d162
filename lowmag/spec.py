"""``lowmag.json``: the contract between training, export and the edge runner.

Training writes one beside every checkpoint, export adds to it in every bundle, and
the edge runner refuses a bundle whose spec it cannot honour. The file is plain JSON;
``ModelSpec`` is its schema. Unknown keys, missing keys, wrong types and other spec
versions are errors that say what differs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from lowmag.errors import ArtifactHashError, SpecError
from lowmag.io import atomic_write_text, sha256_file
from lowmag.reader import PREPROCESSING_VERSION
from lowmag.resolution import format_magnification, mpp_to_magnification

SPEC_VERSION = 1
SPEC_FILENAME = "lowmag.json"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Normalization:
    """Input standardisation: pixels / 255, then (x - mean) / std per RGB channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Provenance:
    """Where a model came from: enough to reproduce or audit it."""

    created_at: str
    lowmag_version: str
    git_sha: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything a runtime needs to feed a model exactly as it was trained."""

    classes: tuple[str, ...]
    target_mpp: float
    normalization: Normalization
    architecture: str
    provenance: Provenance
    magnification: str = ""
    precision: str = "fp32"
    temperature: float = 1.0
    preprocessing_version: str = PREPROCESSING_VERSION
    artifacts: Mapping[str, str] = field(default_factory=dict)
    #: Written by export-student only: target, files, source checkpoint, tool versions,
    #: runtime settings, calibration and the parity/accuracy gate results (plain JSON).
    export: Mapping[str, Any] = field(default_factory=dict)
    #: What the training images looked like at ``target_mpp`` (``lowmag.fingerprint``); the
    #: edge runner flags slides unlike them. Empty in specs written before it existed.
    fingerprint: Mapping[str, Any] = field(default_factory=dict)
    spec_version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if not self.magnification and _positive(self.target_mpp):
            object.__setattr__(self, "magnification", format_magnification(self.target_mpp))
        problems = _validate(self)
        if problems:
            raise SpecError(None, problems)

    # -- conversion ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        data["normalization"] = {
            "mean": list(self.normalization.mean),
            "std": list(self.normalization.std),
        }
        data["artifacts"] = dict(sorted(self.artifacts.items()))
        data["provenance"]["config"] = dict(self.provenance.config)
        data["provenance"]["data"] = dict(self.provenance.data)
        data["export"] = json.loads(json.dumps(self.export))
        if not data["export"]:
            del data["export"]  # checkpoints carry no export section
        data["fingerprint"] = json.loads(json.dumps(self.fingerprint))
        if not data["fingerprint"]:
            del data["fingerprint"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | Path | None = None) -> "ModelSpec":
        """Build a spec from parsed JSON; every problem is reported at once."""
        if not isinstance(data, Mapping):
            raise SpecError(path, f"expected a JSON object, got {type(data).__name__}")
        version = data.get("spec_version")
        if version != SPEC_VERSION:
            hint = (
                "it was written by a newer lowmag: upgrade lowmag"
                if isinstance(version, int) and version > SPEC_VERSION
                else "re-export the model with this lowmag"
            )
            raise SpecError(
                path, f"spec_version is {version!r}, this lowmag reads version {SPEC_VERSION}; {hint}."
            )
        problems = _check_keys(data, cls, "")
        norm = data.get("normalization")
        prov = data.get("provenance")
        if isinstance(norm, Mapping):
            problems += _check_keys(norm, Normalization, "normalization.")
        elif "normalization" in data:
            problems.append("normalization must be an object with mean and std")
        if isinstance(prov, Mapping):
            problems += _check_keys(prov, Provenance, "provenance.")
        elif "provenance" in data:
            problems.append("provenance must be an object")
        if problems:
            raise SpecError(path, problems)
        try:
            return cls(
                classes=_tuple(data["classes"]),
                target_mpp=data["target_mpp"],
                magnification=data.get("magnification", ""),
                normalization=Normalization(
                    mean=_tuple(norm["mean"]), std=_tuple(norm["std"])  # type: ignore[index]
                ),
                architecture=data["architecture"],
                provenance=Provenance(**prov),  # type: ignore[arg-type]
                precision=data.get("precision", "fp32"),
                temperature=data.get("temperature", 1.0),
                preprocessing_version=data.get("preprocessing_version", PREPROCESSING_VERSION),
                artifacts=dict(data.get("artifacts", {})),
                export=dict(data.get("export", {})) if isinstance(data.get("export", {}), Mapping)
                else data["export"],
                fingerprint=dict(data.get("fingerprint", {})) if isinstance(data.get("fingerprint", {}), Mapping)
                else data["fingerprint"],
                spec_version=version,
            )
        except SpecError as error:
            raise SpecError(path, error.problems) from None

    # -- helpers ------------------------------------------------------------------
    def with_artifacts(self, directory: str | Path, names: list[str]) -> "ModelSpec":
        """A copy recording the sha256 of each named file (relative to ``directory``)."""
        directory = Path(directory)
        hashes = dict(self.artifacts)
        for name in names:
            hashes[name] = sha256_file(directory / name)
        return dataclasses.replace(self, artifacts=hashes)


def new_provenance(
    config: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    seed: int | None = None,
    repo: str | Path | None = None,
) -> Provenance:
    """Provenance stamped now, with this lowmag's version and the git SHA if any."""
    from lowmag import __version__
    from lowmag.provenance import git_sha

    return Provenance(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        lowmag_version=__version__,
        git_sha=git_sha(repo),
        config=dict(config or {}),
        data=dict(data or {}),
        seed=seed,
    )


def read_spec(path: str | Path) -> ModelSpec:
    """Read ``lowmag.json`` (or the one inside a folder) and validate it."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILENAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(path, "not found; a checkpoint or bundle folder must hold lowmag.json.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SpecError(path, f"is not valid JSON ({error}); restore it from the bundle.") from None
    return ModelSpec.from_dict(data, path)


def write_spec(spec: ModelSpec, directory: str | Path) -> Path:
    """Write ``directory/lowmag.json`` atomically; returns its path."""
    path = Path(directory) / SPEC_FILENAME
    atomic_write_text(path, spec.to_json())
    return path


def verify_artifacts(spec: ModelSpec, directory: str | Path) -> None:
    """Check every artifact the spec lists exists in ``directory`` with its sha256."""
    directory = Path(directory)
    problems = []
    for name, expected in sorted(spec.artifacts.items()):
        file = directory / name
        if not file.is_file():
            problems.append(f"{name} is missing")
            continue
        actual = sha256_file(file)
        if actual != expected:
            problems.append(f"{name} has sha256 {actual[:12]}…, the spec records {expected[:12]}…")
    if problems:
        problems.append("the files were changed or damaged after export; re-export or restore the bundle")
        raise ArtifactHashError(directory / SPEC_FILENAME, problems)


def check_preprocessing(spec: ModelSpec, path: str | Path | None = None) -> None:
    """Refuse a spec whose inputs were made by another reading recipe than this lowmag's."""
    if spec.preprocessing_version != PREPROCESSING_VERSION:
        raise SpecError(
            path,
            f"the model expects inputs read with {spec.preprocessing_version!r}, this lowmag "
            f"reads with {PREPROCESSING_VERSION!r}; install the lowmag version that trained it "
            "or retrain/re-export the model.",
        )


# -- validation -----------------------------------------------------------------------
def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _check_keys(data: Mapping[str, Any], schema: type, prefix: str) -> list[str]:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    required = {
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    }
    problems = []
    unknown = sorted(set(data) - set(fields))
    if unknown:
        problems.append(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} (allowed: "
            f"{', '.join(sorted(fields))}); a newer lowmag may have written it: upgrade lowmag"
        )
    missing = sorted(required - set(data))
    if missing:
        problems.append(f"missing key(s) {', '.join(prefix + k for k in missing)}")
    return problems


def _validate(spec: ModelSpec) -> list[str]:
    problems = []
    classes = spec.classes
    if not (isinstance(classes, tuple) and classes and all(isinstance(c, str) and c for c in classes)):
        problems.append("classes must be a non-empty list of non-empty strings")
    elif len(set(classes)) != len(classes):
        problems.append(f"classes must be unique, got {list(classes)}")
    if not _positive(spec.target_mpp) or spec.target_mpp > 100:
        problems.append(f"target_mpp must be a positive µm/px up to 100, got {spec.target_mpp!r}")
    elif spec.magnification:
        try:
            label = float(str(spec.magnification).rstrip("x"))
        except ValueError:
            label = math.nan
        if not abs(label - mpp_to_magnification(spec.target_mpp)) <= 0.01 * max(label, 1e-9):
            problems.append(
                f"magnification {spec.magnification!r} does not match target_mpp "
                f"{spec.target_mpp} (expected {format_magnification(spec.target_mpp)}; 10x = 1 µm/px)"
            )
    norm = spec.normalization
    if not isinstance(norm, Normalization):
        problems.append("normalization must have mean and std")
    else:
        for name, values, check in (("mean", norm.mean, lambda v: math.isfinite(v)), ("std", norm.std, _positive)):
            if not (isinstance(values, tuple) and len(values) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and check(v) for v in values
            )):
                problems.append(f"normalization.{name} must be 3 numbers (R, G, B){' > 0' if name == 'std' else ''}, got {values!r}")
    if not (isinstance(spec.architecture, str) and spec.architecture):
        problems.append("architecture must be a non-empty string such as 'resnet18'")
    if spec.precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {spec.precision!r}")
    if not _positive(spec.temperature):
        problems.append(f"temperature must be a positive number, got {spec.temperature!r}")
    if not (isinstance(spec.preprocessing_version, str) and spec.preprocessing_version):
        problems.append("preprocessing_version must be a non-empty string")
    if not isinstance(spec.artifacts, Mapping):
        problems.append("artifacts must map file names to sha256 hex digests")
    else:
        for name, digest in spec.artifacts.items():
            if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
                problems.append(f"artifact name {name!r} must be a relative path inside the bundle")
            if not (isinstance(digest, str) and _SHA256.match(digest)):
                problems.append(f"artifact {name!r} needs a 64-character lowercase sha256, got {digest!r}")
    if not isinstance(spec.export, Mapping):
        problems.append("export must be an object (written by export-student)")
    if not isinstance(spec.fingerprint, Mapping):
        problems.append("fingerprint must be an object (written by distill-train or export-student)")
    prov = spec.provenance
    if not isinstance(prov, Provenance):
        problems.append("provenance must be an object")
    else:
        if not (isinstance(prov.created_at, str) and prov.created_at):
            problems.append("provenance.created_at must be an ISO-8601 time")
        if not (isinstance(prov.lowmag_version, str) and prov.lowmag_version):
            problems.append("provenance.lowmag_version must be a string")
        if prov.git_sha is not None and not isinstance(prov.git_sha, str):
            problems.append("provenance.git_sha must be a string or null")
        if not isinstance(prov.config, Mapping) or not isinstance(prov.data, Mapping):
            problems.append("provenance.config and provenance.data must be objects")
        if prov.seed is not None and not (isinstance(prov.seed, int) and not isinstance(prov.seed, bool)):
            problems.append("provenance.seed must be an integer or null")
    return problems

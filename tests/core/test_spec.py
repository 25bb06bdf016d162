"""lowmag.json: round trips, strict validation and artifact hashes."""

import dataclasses
import json

import pytest

from lowmag.errors import ArtifactHashError, SpecError
from lowmag.reader import PREPROCESSING_VERSION
from lowmag.spec import (
    SPEC_VERSION,
    ModelSpec,
    Normalization,
    check_preprocessing,
    new_provenance,
    read_spec,
    verify_artifacts,
    write_spec,
)


def make_spec(**changes):
    spec = ModelSpec(
        classes=("TUMOR", "STROMA", "EMPTY"),
        target_mpp=8.0,
        normalization=Normalization(mean=(0.7, 0.5, 0.7), std=(0.15, 0.2, 0.15)),
        architecture="resnet18",
        provenance=new_provenance(config={"epochs": 2}, data={"images": "kather2016"}, seed=7),
    )
    return dataclasses.replace(spec, **changes) if changes else spec


def test_round_trip_through_a_file(tmp_path):
    spec = make_spec()
    assert spec.magnification == "1.25x" and spec.preprocessing_version == PREPROCESSING_VERSION
    path = write_spec(spec, tmp_path)
    assert path.name == "lowmag.json"
    assert read_spec(tmp_path) == spec
    data = json.loads(path.read_text())
    assert data["spec_version"] == SPEC_VERSION and data["classes"] == ["TUMOR", "STROMA", "EMPTY"]
    assert data["provenance"]["seed"] == 7 and data["provenance"]["lowmag_version"]


def test_unknown_and_missing_keys_are_named(tmp_path):
    data = make_spec().to_dict()
    data["colour"] = "pink"
    data["normalization"]["gamma"] = 2.2
    del data["architecture"]
    (tmp_path / "lowmag.json").write_text(json.dumps(data))
    with pytest.raises(SpecError) as err:
        read_spec(tmp_path)
    message = str(err.value)
    assert "lowmag.json" in message
    assert "colour" in message and "normalization.gamma" in message and "architecture" in message


@pytest.mark.parametrize("version, hint", [(SPEC_VERSION + 1, "upgrade lowmag"), (0, "re-export")])
def test_other_spec_versions_say_what_to_do(tmp_path, version, hint):
    data = make_spec().to_dict()
    data["spec_version"] = version
    (tmp_path / "lowmag.json").write_text(json.dumps(data))
    with pytest.raises(SpecError, match=hint):
        read_spec(tmp_path)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"classes": ()}, "classes"),
        ({"classes": ("A", "A")}, "unique"),
        ({"target_mpp": -1.0}, "target_mpp"),
        ({"magnification": "5x"}, "does not match"),
        ({"precision": "int4"}, "precision"),
        ({"temperature": 0.0}, "temperature"),
        ({"normalization": Normalization(mean=(0.5, 0.5), std=(1.0, 1.0, 1.0))}, "normalization.mean"),
        ({"normalization": Normalization(mean=(0.5,) * 3, std=(1.0, 0.0, 1.0))}, "normalization.std"),
        ({"artifacts": {"../model.onnx": "0" * 64}}, "relative path"),
        ({"artifacts": {"model.onnx": "abc"}}, "sha256"),
    ],
)
def test_invalid_values_are_refused_with_the_reason(changes, words):
    with pytest.raises(SpecError, match=words):
        make_spec(**changes)


def test_not_json_and_absent_file(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        read_spec(tmp_path)
    (tmp_path / "lowmag.json").write_text("{broken")
    with pytest.raises(SpecError, match="not valid JSON"):
        read_spec(tmp_path)


def test_artifact_hashes_catch_changed_and_missing_files(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"weights")
    (tmp_path / "extra.bin").write_bytes(b"more")
    spec = make_spec().with_artifacts(tmp_path, ["model.onnx", "extra.bin"])
    write_spec(spec, tmp_path)
    verify_artifacts(read_spec(tmp_path), tmp_path)  # intact: no error
    (tmp_path / "model.onnx").write_bytes(b"weightz")
    (tmp_path / "extra.bin").unlink()
    with pytest.raises(ArtifactHashError) as err:
        verify_artifacts(spec, tmp_path)
    assert "model.onnx has sha256" in str(err.value) and "extra.bin is missing" in str(err.value)


def test_other_preprocessing_is_refused():
    check_preprocessing(make_spec())
    with pytest.raises(SpecError, match="lowmag-read-0"):
        check_preprocessing(make_spec(preprocessing_version="lowmag-read-0"))

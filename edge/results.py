"""What edge-classify writes for each slide, under a versioned schema (``RESULT_SCHEMA``).

Per slide, under ``OUT/results/`` at the slide's path relative to the watched folder:

- ``NAME.json``: the result (schema in README, "Output schema");
- ``NAME.geojson``: one rectangle per tissue piece in level-0 pixels, with its class and
  probabilities as QuPath reads them (File > Import objects);
- ``NAME.png``: a thumbnail with the tissue boxes, numbered and labelled.

Each file is written atomically (temporary file, fsync, rename) and the JSON last, so a
JSON that exists is a complete result. ``OUT/summary.csv`` gets one row per slide
(done or failed), appended under an exclusive ``flock`` with a single ``write`` on an
``O_APPEND`` descriptor, so concurrent workers never interleave rows; a row torn by a
crash is cut off before the next append.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lowmag import __version__
from lowmag.bundle import Bundle
from lowmag.draw import draw_boxes, save_png
from lowmag.edge.backends import BackendChoice
from lowmag.edge.pipeline import SLIDE_RULE, SlideClassification
from lowmag.io import atomic_write_text
from lowmag.names import printable, shown

logger = logging.getLogger(__name__)

RESULT_SCHEMA = "lowmag.edge.result/2"
CSV_NAME = "summary.csv"
CSV_COLUMNS = (
    "finished_at", "status", "slide", "sha256", "label", "confidence", "needs_review", "distribution",
    "distribution_reasons", "probabilities", "tissue_pieces", "ms", "backend", "bundle_sha256", "result", "error",
    "result_id",
)

#: Distinct colours for up to ten classes (then they repeat).
PALETTE = ((220, 40, 40), (40, 120, 220), (30, 160, 60), (230, 140, 20), (150, 60, 200),
           (20, 170, 170), (200, 60, 140), (120, 120, 40), (90, 90, 90), (0, 90, 150))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


#: Longest file name most filesystems take (bytes).
NAME_MAX = 255


def output_paths(out: Path, relative: str) -> dict[str, Path]:
    """Where a slide's outputs go: ``OUT/results/<relative>.{json,geojson,png}``.

    A slide name too long to take the suffixes (over 247 bytes) is cut to 200 bytes plus
    ``~`` and 16 hex digits of its sha256, so it still maps to one name of its own.
    """
    base = out / "results" / relative
    name = os.fsencode(base.name)
    if len(name) + len(".geojson") > NAME_MAX:
        name = name[:200] + b"~" + hashlib.sha256(name).hexdigest()[:16].encode()
    stem = os.fsdecode(name)
    return {kind: base.with_name(f"{stem}.{kind}") for kind in ("json", "geojson", "png")}


def remove_outputs(out: Path, relative: str) -> None:
    """Delete a slide's outputs (its file was replaced: they describe a file that is gone)."""
    for path in output_paths(out, relative).values():
        path.unlink(missing_ok=True)


def _probabilities(classes: tuple[str, ...], values: np.ndarray) -> dict[str, float]:
    return {name: round(float(p), 6) for name, p in zip(classes, values)}


def result_document(result: SlideClassification, bundle: Bundle, choice: BackendChoice,
                    threads: int | None, review_threshold: float, timings_ms: Mapping[str, float],
                    slide_path: Path | None = None) -> dict[str, Any]:
    """The JSON result of one slide (``slide_path``: the slide as the watched folder names it,
    when it was read through a link)."""
    info = result.info
    spec = bundle.spec
    pieces = []
    for i, piece in enumerate(result.pieces, start=1):
        box = piece.box
        probs = _probabilities(result.classes, piece.probabilities)
        label = max(probs, key=probs.get)
        pieces.append({
            "id": i,
            "box_px": {"x": box.x, "y": box.y, "width": box.width, "height": box.height},
            "box_um": {"x": round(box.x_um, 1), "y": round(box.y_um, 1),
                       "width": round(box.width_um, 1), "height": round(box.height_um, 1)},
            "tissue_area_um2": round(box.tissue_area_um2, 1),
            "input_px": {"width": piece.input_px[0], "height": piece.input_px[1]},
            "tiles": piece.tiles,
            "label": label,
            "confidence": probs[label],
            "probabilities": probs,
        })
    return {
        "schema": RESULT_SCHEMA,
        "slide": {
            "path": shown(slide_path or result.path), "name": shown((slide_path or result.path).name),
            "format": info.format,
            "size_bytes": result.size_bytes, "files": result.files, "sha256": result.sha256,
            "width_px": info.width, "height_px": info.height,
            "mpp": round(info.mpp, 5), "mpp_source": info.mpp_source, "objective_power": info.objective_power,
        },
        "model": {
            "bundle": str(bundle.directory), "bundle_sha256": bundle.sha256, "target": bundle.target,
            "precision": bundle.precision, "architecture": spec.architecture, "classes": list(spec.classes),
            "mpp": spec.target_mpp, "magnification": spec.magnification, "temperature": spec.temperature,
        },
        "runtime": {"backend": choice.backend, "device": choice.device, "threads": threads},
        "reading": result.reading,
        "tissue": pieces,
        "result": {
            "label": result.label, "confidence": round(result.confidence, 6),
            "probabilities": _probabilities(result.classes, result.probabilities),
            "needs_review": result.needs_review, "review_threshold": review_threshold, "rule": SLIDE_RULE,
        },
        "distribution": {
            **result.distribution.to_dict(),
            "modality": result.modality.kind if result.modality is not None else None,
            "fingerprint": {k: spec.fingerprint.get(k) for k in ("version", "source", "images", "sha256")}
            if spec.fingerprint else None,
        },
        "timings_ms": dict(timings_ms),
        "lowmag_version": __version__,
        "created_at": now_iso(),
    }


def geojson_document(document: Mapping[str, Any]) -> dict[str, Any]:
    """A FeatureCollection of the tissue boxes (level-0 pixels), QuPath's annotation form."""
    classes = document["model"]["classes"]
    features = []
    for piece in document["tissue"]:
        b = piece["box_px"]
        x0, y0, x1, y1 = b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]
        colour = PALETTE[classes.index(piece["label"]) % len(PALETTE)]
        features.append({
            "type": "Feature",
            "id": f"tissue-{piece['id']}",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "annotation",
                "name": f"tissue {piece['id']}",
                "classification": {"name": piece["label"], "color": list(colour)},
                "measurements": {"confidence": piece["confidence"],
                                 **{f"p({name})": p for name, p in piece["probabilities"].items()}},
                "isLocked": False,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def thumbnail_image(result: SlideClassification) -> np.ndarray:
    thumb = result.thumbnail
    scale = (thumb.shape[1] / result.info.width, thumb.shape[0] / result.info.height)
    labels, colours = [], []
    for i, piece in enumerate(result.pieces, start=1):
        k = int(np.argmax(piece.probabilities))
        labels.append(f"{i} {result.classes[k]} {piece.probabilities[k]:.2f}")
        colours.append(PALETTE[k % len(PALETTE)])
    return draw_boxes(thumb, [p.box for p in result.pieces], scale, labels, colours=colours)


def write_slide_outputs(out: Path, relative: str, result: SlideClassification, bundle: Bundle,
                        choice: BackendChoice, threads: int | None, review_threshold: float,
                        slide_path: Path | None = None) -> dict[str, Any]:
    """Write thumbnail, GeoJSON and (last) JSON atomically; returns the JSON document."""
    paths = output_paths(out, relative)
    timer = result.timer
    with timer.stage("write"):
        save_png(thumbnail_image(result), paths["png"])
        document = result_document(result, bundle, choice, threads, review_threshold, {}, slide_path)
        atomic_write_text(paths["geojson"], json.dumps(geojson_document(document), indent=1) + "\n")
    document["timings_ms"] = timer.ms()  # the JSON's own write is the only part not counted
    document["outputs"] = {kind: shown(path.name) for kind, path in paths.items()}
    atomic_write_text(paths["json"], json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return document


def csv_row(status: str, slide: Path, result_id: str, document: Mapping[str, Any] | None = None,
            error: str = "", sha256: str = "", result_path: Path | None = None) -> dict[str, str]:
    row = {column: "" for column in CSV_COLUMNS}
    row.update(finished_at=now_iso(), status=status, slide=shown(slide), error=printable(error), sha256=sha256,
               result_id=result_id)
    if document is not None:
        res = document["result"]
        distribution = document.get("distribution") or {}
        row.update(
            sha256=document["slide"]["sha256"], label=res["label"], confidence=f"{res['confidence']:.4f}",
            needs_review=str(res["needs_review"]).lower(), distribution=distribution.get("verdict", ""),
            distribution_reasons=printable("; ".join(distribution.get("reasons", []))),
            probabilities=json.dumps(res["probabilities"], separators=(",", ":")),
            tissue_pieces=str(len(document["tissue"])), ms=f"{document['timings_ms']['total']:.0f}",
            backend=f"{document['runtime']['backend']}/{document['runtime']['device']}",
            bundle_sha256=document["model"]["bundle_sha256"][:16],
            result=shown(result_path) if result_path else "",
        )
    return row


def append_csv(path: Path, row: Mapping[str, str], skip_if_present: bool = False) -> bool:
    """Append one row under an exclusive lock; returns False when ``skip_if_present`` found it.

    ``skip_if_present`` is for a slide retried after a crash: its row may already be there.
    """
    buffer = io.StringIO()
    csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n").writerow(row)
    line = buffer.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path)
    try:
        fd = _rotate_if_other_columns(fd, path)
        size = os.fstat(fd).st_size
        if size == 0:
            os.write(fd, (",".join(CSV_COLUMNS) + "\n").encode())
        else:
            size = _cut_torn_row(fd, path, size)
            if skip_if_present and _has_result_id(path, row["result_id"]):
                return False
        os.write(fd, line)
        os.fsync(fd)
        return True
    finally:
        os.close(fd)  # closing releases the lock


def _open_locked(path: Path) -> int:
    """``path`` opened for appending and exclusively locked, and still the file at ``path``
    once locked (another thread may have rotated it while this one waited)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _rotate_if_other_columns(fd: int, path: Path) -> int:
    """A summary.csv written by an older lowmag (other columns) is kept as
    ``summary.<when it was last written>.csv`` and a new one started, so no file mixes two
    layouts.
    Called with ``fd`` locked; returns the (locked) descriptor to append to."""
    header = os.pread(fd, 4096, 0).split(b"\n", 1)[0].decode("utf-8", "replace")
    if not header or header == ",".join(CSV_COLUMNS):
        return fd
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(os.fstat(fd).st_mtime))  # when it was last written
    kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    counter = 1
    while kept.exists():  # never overwrite one kept before
        kept = path.with_name(f"{path.stem}.{stamp}-{counter}{path.suffix}")
        counter += 1
    os.rename(path, kept)
    _fsync_folder(path.parent)
    logger.warning("%s had the columns of an older lowmag; kept as %s, new rows go to a new %s", shown(path),
                   shown(kept.name), path.name)
    fresh = _open_locked(path)
    os.close(fd)
    return fresh


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_row(fd: int, path: Path, size: int) -> int:
    """A crash mid-append can leave a row without its newline: cut it off, logged."""
    tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16)))
    if tail.endswith(b"\n"):
        return size
    keep = size - (len(tail) - tail.rfind(b"\n") - 1) if b"\n" in tail else 0
    logger.warning("%s: removing a row torn by an earlier crash (%d bytes)", path, size - keep)
    os.ftruncate(fd, keep)
    return keep


def _has_result_id(path: Path, result_id: str) -> bool:
    with open(path, newline="", encoding="utf-8") as handle:
        return any(row.get("result_id") == result_id for row in csv.DictReader(handle))

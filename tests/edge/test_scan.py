"""What the watcher takes for a slide in a scanner's folder: real files and folders, no slide reading."""

from __future__ import annotations

from pathlib import Path

import os
import socket

import pytest

from lowmag.edge.scan import SlideUnit, check_files, find_units, same_files, unit_for
from lowmag.errors import UnsupportedSlideError


def put(path: Path, data: bytes = b"slide bytes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def units(root: Path, **kwargs) -> dict[str, str]:
    """relative path -> kind, for every slide unit find_units yields (skipped entries left out)."""
    return {unit.relative: unit.kind for unit in find_units(root, **kwargs) if not unit.skipped}


def skipped(root: Path, **kwargs) -> dict[str, str]:
    """relative path -> reason, for every entry find_units yields as no slide."""
    return {unit.relative: unit.skip_reason() for unit in find_units(root, **kwargs) if unit.skipped}


def test_names_being_written_are_never_slides(tmp_path: Path) -> None:
    temporary = ["a.svs.part", "b.tif.filepart", "c.ndpi.tmp", "d.svs~", "E.SVS.PART", ".f.svs",
                 ".staging/g.svs", "batch/.incoming/h.tif"]
    for name in temporary:
        put(tmp_path / name)
    put(tmp_path / "ready.svs")

    assert units(tmp_path) == {"ready.svs": "file"}
    for name in temporary:
        assert unit_for(tmp_path / name, tmp_path) is None, name


def test_slides_in_nested_folders_keep_their_path_below_the_root(tmp_path: Path) -> None:
    put(tmp_path / "b.ndpi")
    put(tmp_path / "2024" / "06" / "a.svs")
    put(tmp_path / "x" / "y" / "C.TIF")

    found = {unit.relative: unit for unit in find_units(tmp_path)}

    assert set(found) == {"b.ndpi", "2024/06/a.svs", "x/y/C.TIF"}
    assert found["2024/06/a.svs"].path == tmp_path / "2024" / "06" / "a.svs"
    assert unit_for(tmp_path / "2024" / "06" / "a.svs", tmp_path).relative == "2024/06/a.svs"


def test_files_that_are_not_slides_are_skipped_each_with_its_reason(tmp_path: Path) -> None:
    for name in ("notes.txt", "label.png", "macro.jpg", "scan.log"):
        put(tmp_path / name)
        assert unit_for(tmp_path / name, tmp_path).skipped, name
    put(tmp_path / "slide.svs")
    put(tmp_path / "olympus.vsi")
    put(tmp_path / "_olympus_" / "stack1" / "frame_t.ets")  # the VSI's data: part of the .vsi, not listed
    put(tmp_path / "renamed", b"II*\x00" + b"\x00" * 200)
    put(tmp_path / "loose-dicom", b"\x00" * 128 + b"DICM" + b"\x00" * 100)
    os.mkfifo(tmp_path / "pipe.svs")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "control.sock"))

        assert units(tmp_path) == {"slide.svs": "file", "loose-dicom": "file"}  # a DICOM file is a slide
        reasons = skipped(tmp_path)
    assert set(reasons) == {"notes.txt", "label.png", "macro.jpg", "scan.log", "olympus.vsi", "renamed", "pipe.svs",
                            "control.sock"}
    assert "(.txt)" in reasons["notes.txt"] and "(.png)" in reasons["label.png"]
    assert "VSI" in reasons["olympus.vsi"] and "OME-TIFF" in reasons["olympus.vsi"]
    assert "TIFF" in reasons["renamed"] and "rename it to .tif" in reasons["renamed"]
    assert "named pipe" in reasons["pipe.svs"] and "socket" in reasons["control.sock"]
    assert unit_for(tmp_path / "_olympus_" / "stack1" / "frame_t.ets", tmp_path).relative == "olympus.vsi"


def test_mirax_file_and_its_data_folder_are_one_slide(tmp_path: Path) -> None:
    mrxs = put(tmp_path / "x.mrxs")
    data = [put(tmp_path / "x" / name) for name in ("Slidedat.ini", "Data0000.dat", "Data0001.dat")]

    [unit] = find_units(tmp_path)
    assert (unit.relative, unit.kind) == ("x.mrxs", "mrxs")
    assert set(unit.files()) == {mrxs, *data}

    before = unit.signature()
    with data[2].open("ab") as handle:  # the scanner is still writing tiles
        handle.write(b"more tiles")
    assert unit.signature() != before

    # An event on a data file is an event on the slide.
    assert unit_for(tmp_path / "x" / "Data0001.dat", tmp_path) == unit


def test_dicom_series_folder_is_one_slide_but_a_loose_dcm_is_its_own(tmp_path: Path) -> None:
    instances = [put(tmp_path / "series1" / f"{i}.dcm") for i in range(3)]
    # Some exports name the instances without an extension: their first bytes say DICOM.
    instances.append(put(tmp_path / "series1" / "1.2.840.99", b"\x00" * 128 + b"DICM" + b"\x00" * 64))
    put(tmp_path / "series1" / "DICOMDIR.txt")
    put(tmp_path / "loose.dcm")

    found = {unit.relative: unit for unit in find_units(tmp_path)}

    assert {name: unit.kind for name, unit in found.items()} == {
        "series1": "dicom-folder", "loose.dcm": "file", "series1/DICOMDIR.txt": "skipped"}
    assert "not a DICOM instance" in found["series1/DICOMDIR.txt"].skip_reason()
    assert found["series1"].files() == sorted(instances)
    assert unit_for(instances[1], tmp_path) == found["series1"]
    assert unit_for(tmp_path / "loose.dcm", tmp_path) == found["loose.dcm"]


def test_output_folder_inside_the_scan_folder_is_skipped(tmp_path: Path) -> None:
    out = tmp_path / "classified"
    put(out / "overlays" / "a.tif")
    put(tmp_path / "a.svs")

    assert units(tmp_path, exclude=[out]) == {"a.svs": "file"}
    assert unit_for(out / "overlays" / "a.tif", tmp_path, exclude=[out]) is None
    assert list(find_units(tmp_path, exclude=[out], under=out / "overlays")) == []


def test_symlinks_are_followed_only_inside_the_scan_folder(tmp_path: Path) -> None:
    root, outside = tmp_path / "scans", tmp_path / "elsewhere"
    secret = put(outside / "secret.svs")
    real = put(root / "real.svs")
    (root / "out-file.svs").symlink_to(secret)
    (root / "out-folder").symlink_to(outside, target_is_directory=True)
    (root / "alias.svs").symlink_to(real)
    (root / "out-notes.txt").symlink_to(put(outside / "notes.txt"))

    # A link out named like a slide is a unit: the runner refuses it once, with its reason.
    assert units(root) == {"real.svs": "file", "alias.svs": "file", "out-file.svs": "file"}
    reasons = skipped(root)
    assert set(reasons) == {"out-folder", "out-notes.txt"}
    assert "linked folders are not walked" in reasons["out-folder"]
    assert "link out of the watched folder" in reasons["out-notes.txt"]
    assert unit_for(root / "alias.svs", root) is not None
    # A polling observer walks into symlinked folders; what it reports there is not ours.
    assert unit_for(root / "out-folder" / "secret.svs", root) is None
    assert list(find_units(root, under=root / "out-folder")) == []

    link_out = SlideUnit(root / "out-file.svs", "file", root)
    with pytest.raises(UnsupportedSlideError, match="symbolic link to .*elsewhere/secret.svs, outside the watched"):
        check_files(link_out)
    [alias] = check_files(SlideUnit(root / "alias.svs", "file", root))
    assert alias.real == real and same_files([alias])


def test_a_link_inside_a_dicom_series_leading_out_refuses_the_whole_series(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    put(root / "series" / "1.dcm")
    (root / "series" / "zz.dcm").symlink_to("/etc/passwd")

    [series] = [u for u in find_units(root) if not u.skipped]

    assert series.kind == "dicom-folder" and [p.name for p in series.files()] == ["1.dcm", "zz.dcm"]
    assert all(entry[3] != os.stat("/etc/passwd").st_ino for entry in series.signature())  # never followed
    with pytest.raises(UnsupportedSlideError, match="zz.dcm: is a symbolic link to /etc/passwd, outside"):
        check_files(series)


def test_a_slide_swapped_for_a_link_or_a_fifo_is_not_the_file_that_was_checked(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    slide = put(root / "a.svs")
    checked = check_files(SlideUnit(slide, "file", root))
    slide.unlink()
    slide.symlink_to(put(tmp_path / "secret.svs"))
    assert not same_files(checked)
    with pytest.raises(UnsupportedSlideError, match="outside the watched folder"):
        check_files(SlideUnit(slide, "file", root))
    slide.unlink()
    os.mkfifo(slide)
    with pytest.raises(UnsupportedSlideError, match="named pipe"):
        check_files(SlideUnit(slide, "file", root))


def test_a_symlink_loop_does_not_stop_the_scan(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    put(tmp_path / "a.svs")

    assert units(tmp_path) == {"a.svs": "file"}
    assert skipped(tmp_path) == {"loop": "a broken symbolic link (or a link loop)."}
    assert unit_for(tmp_path / "loop", tmp_path).skipped


def test_scanning_below_a_subfolder_reports_paths_from_the_root(tmp_path: Path) -> None:
    put(tmp_path / "a.svs")
    put(tmp_path / "batch" / "b.svs")
    put(tmp_path / "batch" / "deep" / "c.svs")
    put(tmp_path / ".staging" / "d.svs")

    assert units(tmp_path, under=tmp_path / "batch") == {"batch/b.svs": "file", "batch/deep/c.svs": "file"}
    assert units(tmp_path, under=tmp_path / ".staging") == {}


def test_a_slide_folder_that_goes_away_has_no_signature(tmp_path: Path) -> None:
    put(tmp_path / "series1" / "1.dcm")
    [unit] = find_units(tmp_path)
    assert unit.signature() is not None

    (tmp_path / "series1").rename(tmp_path / "moved")  # e.g. to the quarantine, while still a candidate

    assert unit.signature() is None


def test_every_entry_of_a_dicom_series_folder_is_vetted_because_openslide_opens_them_all(tmp_path: Path) -> None:
    root, outside = tmp_path / "scans", tmp_path / "elsewhere"
    put(root / "series" / "1.dcm")
    series = SlideUnit(root / "series", "dicom-folder", root)
    assert [c.path.name for c in check_files(series)] == ["1.dcm"]

    os.mkfifo(root / "series" / "notes")  # not an instance, but OpenSlide would block opening it
    with pytest.raises(UnsupportedSlideError, match="holds notes, a named pipe .* would block on it"):
        check_files(series)
    (root / "series" / "notes").unlink()
    (root / "series" / "inst2").symlink_to(put(outside / "other.dcm"))  # no extension: no instance to the scan
    with pytest.raises(UnsupportedSlideError, match="holds inst2, a symbolic link out of the watched folder"):
        check_files(series)


def test_a_tree_nested_deeper_than_the_limit_is_skipped_not_a_crash(tmp_path: Path) -> None:
    import sys

    from lowmag.edge.scan import MAX_DEPTH

    put(tmp_path / "/".join(["d"] * 300) / "x.svs")
    put(tmp_path / "d" / "ok.svs")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a walk that recursed per level (as it did) fails here; 1,200 levels hit 1,000
    try:
        found = list(find_units(tmp_path))
    finally:
        sys.setrecursionlimit(limit)

    assert {u.relative: u.kind for u in found if not u.skipped} == {"d/ok.svs": "file"}
    [too_deep] = [u for u in found if u.skipped]
    assert len(Path(too_deep.relative).parts) == MAX_DEPTH + 1 and "nested more than" in too_deep.skip_reason()

"""What the watcher takes for a slide in a scanner's folder: real files and folders, no slide reading."""

from __future__ import annotations

from pathlib import Path

from lowmag.edge.scan import find_units, unit_for


def put(path: Path, data: bytes = b"slide bytes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def units(root: Path, **kwargs) -> dict[str, str]:
    """relative path -> kind, for every unit find_units yields."""
    return {unit.relative: unit.kind for unit in find_units(root, **kwargs)}


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


def test_files_that_are_not_slides_are_ignored(tmp_path: Path) -> None:
    for name in ("notes.txt", "label.png", "macro.jpg", "scan.log"):
        put(tmp_path / name)
        assert unit_for(tmp_path / name, tmp_path) is None, name
    put(tmp_path / "slide.svs")

    assert units(tmp_path) == {"slide.svs": "file"}


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
    put(tmp_path / "series1" / "DICOMDIR.txt")
    put(tmp_path / "loose.dcm")

    found = {unit.relative: unit for unit in find_units(tmp_path)}

    assert {name: unit.kind for name, unit in found.items()} == {"series1": "dicom-folder", "loose.dcm": "file"}
    assert found["series1"].files() == instances
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

    assert units(root) == {"real.svs": "file", "alias.svs": "file"}
    assert unit_for(root / "alias.svs", root) is not None
    assert unit_for(root / "out-file.svs", root) is None
    # A polling observer walks into symlinked folders; what it reports there is not ours.
    assert unit_for(root / "out-folder" / "secret.svs", root) is None
    assert list(find_units(root, under=root / "out-folder")) == []


def test_a_symlink_loop_does_not_stop_the_scan(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    put(tmp_path / "a.svs")

    assert units(tmp_path) == {"a.svs": "file"}
    assert unit_for(tmp_path / "loop", tmp_path) is None


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

import pytest

from lowmag.io import atomic_open, atomic_write_text, sha256_file


def test_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old and complete")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write("new but half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old and complete"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_sha256_of_known_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

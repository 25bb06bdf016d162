"""A shorter soak of the watcher for ``make test-all`` (the full one is ``make soak``)."""

from __future__ import annotations

import pytest

from tests.soak.soak import main


@pytest.mark.slow
def test_a_short_soak_with_kills_keeps_every_promise(tmp_path, capsys):
    """200 slides, hostile names, bad files, 3 SIGKILLs (about a minute on 2 cores)."""
    code = main(["--slides", "200", "--kills", "3", "--bad-files", "16", "--work", str(tmp_path), "--seed", "7"])
    assert code == 0, capsys.readouterr().err[-4000:]

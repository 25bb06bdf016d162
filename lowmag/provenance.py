"""Who made an output: lowmag's version and the git commit of the code that ran."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_sha(repo: str | Path | None = None) -> str | None:
    """The HEAD commit of the lowmag checkout (or ``repo``), with ``-dirty`` if modified.

    None when lowmag runs from an installed wheel rather than a git checkout.
    """
    where = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None

"""Who made an output: lowmag's version and the git commit of the code that ran."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

#: Instruction sets that decide how fast INT8 and bf16 inference can be on x86.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")


def cpu_info() -> dict[str, object]:
    """This machine's CPU: model name, logical cores and the inference-relevant ISA flags."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "model": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "isa": [f for f in CPU_FEATURES if f in flags],
    }


def memory_gib() -> float | None:
    """Physical memory of this machine in GiB (None where the OS does not say)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


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

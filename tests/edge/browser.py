"""Open an HTML file in headless Chromium (Debian's ``chromium`` package), as a reader would."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

#: The flags this machine's closed network needs (no background connections, no sandbox as root).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(html: Path, screenshot: Path, width: int = 1280, height: int = 2400) -> str:
    """The DOM after Chromium loaded and rendered ``html``; a PNG screenshot of it in ``screenshot``."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        common = [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        dom = subprocess.run([*common, "--dump-dom", html.resolve().as_uri()], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        subprocess.run([*common, f"--screenshot={screenshot}", html.resolve().as_uri()], capture_output=True,
                       timeout=120, check=True)
    return dom

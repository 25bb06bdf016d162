"""Feed a scan folder the way slide scanners do, then wait for edge-classify to settle.

Usage: scanner.py SCANS OUT SLIDE...
Each slide is written differently: in place, in pieces with pauses (most scanners); under a
temporary name then renamed (copy tools, network transfers); or all at once. Then waits
until the watcher's ledger in OUT has every slide done or failed, and prints the results.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from lowmag.edge.results import output_paths
from lowmag.edge.status import summarise
from lowmag.synthetic import write_in_pieces


def main(scans: Path, out: Path, slides: list[Path]) -> int:
    for i, source in enumerate(slides):
        target = scans / f"case-{i + 1:02d}" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:
            print(f"scanner: writing {target.relative_to(scans)} in pieces", flush=True)
            write_in_pieces(source, target, pieces=5, pause=0.6)
        elif i % 3 == 1:
            print(f"scanner: copying {target.relative_to(scans)} as .part, then renaming", flush=True)
            shutil.copy(source, target.with_name(target.name + ".part"))
            time.sleep(1.0)
            target.with_name(target.name + ".part").rename(target)
        else:
            print(f"scanner: dropping {target.relative_to(scans)}", flush=True)
            shutil.copy(source, target)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(1.0)
        try:
            counts = summarise(out)["counts"]
        except Exception:  # the ledger is being created
            continue
        if counts["done"] + counts["failed"] >= len(slides) and not counts["queued"] + counts["processing"]:
            break
    else:
        print("scanner: edge-classify did not finish within 10 minutes", file=sys.stderr)
        return 1
    print()
    for i, source in enumerate(slides):
        relative = f"case-{i + 1:02d}/{source.name}"
        result = output_paths(out, relative)["json"]
        if result.exists():
            doc = json.loads(result.read_text())
            res, distribution = doc["result"], doc["distribution"]
            review = "  (needs review)" if res["needs_review"] else ""
            print(f"{relative}: {res['label']} {res['confidence']:.2f}, {len(doc['tissue'])} tissue piece(s), "
                  f"{doc['timings_ms']['total']:.0f} ms{review}")
            print(f"    {distribution['verdict'].replace('_', ' ')}"
                  + (": " + "; ".join(distribution["reasons"]) if distribution["reasons"] else ""))
            print(f"    {result}\n    {result.with_suffix('.geojson')}\n    {result.with_suffix('.png')}")
        else:
            print(f"{relative}: failed (see edge-classify status)")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]))

"""Soak test of ``edge-classify watch``: a long stream of slides, hostile names, bad files,
renames and replacements, while the watcher is killed with SIGKILL at random.

Run it with ``make soak`` (or ``python tests/soak/soak.py --help``). It exits 0 when every
promise held, and prints its figures as JSON (slides, kills, seconds, RSS). Checked at the
end, against the files as they are then:

- every good slide has exactly one ``done`` ledger row and one result whose sha256 is the
  file's current content, and a CSV row with that (slide, sha256);
- no (slide, sha256) pair appears twice in ``summary.csv``;
- every bad file is ``failed`` with the reason expected for it, every non-slide ``skipped``;
- no temporary file is left in the output folder;
- the watcher never died by itself, and its resident memory stayed under ``--max-rss-mb``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lowmag.edge.results import output_paths  # noqa: E402
from lowmag.io import sha256_file  # noqa: E402
from lowmag.names import shown  # noqa: E402
from lowmag.synthetic import Blob, make_synthetic_slide  # noqa: E402
from tests.hostile import write_huge_header_tiff  # noqa: E402
from tests.models import make_bundle  # noqa: E402

EDGE = str(Path(sys.executable).parent / "edge-classify")


class Soak:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.work = work
        self.scans = Path(os.path.realpath(work / "scans"))
        self.out = work / "out"
        self.outside = work / "outside"
        for folder in (self.scans, self.outside, work / "variants"):
            folder.mkdir(parents=True, exist_ok=True)
        self.bundle = make_bundle(work / "bundle", "onnx", temperature=2.0)
        self.variants = [make_synthetic_slide(work / "variants" / f"v{i}.tif", 384 + 16 * (i % 5), 384, mpp=0.5,
                                              blobs=(Blob(192, 192, 150, 150),), seed=i) for i in range(args.variants)]
        self.good: dict[bytes, Path] = {}  # raw name below scans -> the variant it now holds
        self.used: dict[bytes, set[int]] = {}  # variants each name has held (a name never gets one back)
        self.bad: dict[bytes, str] = {}  # raw name -> what its failure must say
        self.not_slides: dict[bytes, str] = {}
        self.proc: subprocess.Popen | None = None
        self.kills = 0
        self.rss_mb: list[float] = []
        self.crashes: list[str] = []
        self.written = 0

    # -- the watcher ---------------------------------------------------------------------
    def start(self) -> None:
        log = open(self.work / "watch.log", "ab")
        self.proc = subprocess.Popen(
            [EDGE, *(["-vv"] if os.environ.get("LOWMAG_SOAK_DEBUG") else []), "watch", str(self.scans), "--model", str(self.bundle), "--out", str(self.out), "--settle", "0.5",
             "--threads", "1", "--workers", str(self.args.workers), "--rescan-interval", "20", "--retry-delay",
             "0.5", "--max-attempts", "3"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills += 1
        self.start()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.crashes.append(f"the watcher exited by itself with {self.proc.returncode}")
            self.start()
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss_mb.append(int(line.split()[1]) / 1024)
        except OSError:
            pass

    # -- what lands in the folder ---------------------------------------------------------
    def name(self) -> bytes:
        i = self.written
        style = self.rng.random()
        if style < 0.08:
            return b"caf\xe9-%d.svs" % i
        if style < 0.12:
            return b"two\nlines-%d.tif" % i
        if style < 0.16:
            return b"tab\there %d.tif" % i
        if style < 0.20:
            return b"%d-" % i + b"L" * 230 + b".svs"
        if style < 0.35:
            return b"day%d/case-%d.tif" % (i % 7, i)
        return b"slide-%d.tif" % i

    def put(self, raw: bytes, variant: int) -> None:
        """Write a variant under a name, the way scanners and people do."""
        target = os.fsencode(self.scans) + b"/" + raw
        os.makedirs(os.path.dirname(target), exist_ok=True)
        source = self.variants[variant]
        how = self.rng.random()
        if how < 0.3:  # copy under a temporary name, then rename into place
            part = target + b".part"
            shutil.copy(source, part)
            os.rename(part, target)
        elif how < 0.4:  # written in three pieces with pauses under the settle time
            data = source.read_bytes()
            with open(target, "wb") as handle:
                for k in range(3):
                    handle.write(data[k * len(data) // 3:(k + 1) * len(data) // 3])
                    handle.flush()
                    time.sleep(0.05)
        else:
            shutil.copy(source, target)
        self.good[raw] = source
        self.used.setdefault(raw, set()).add(variant)
        self.written += 1

    def new_slide(self) -> None:
        raw = self.name()
        self.put(raw, self.rng.randrange(len(self.variants)))

    def replace_slide(self) -> None:
        """A name gets new content it never held before (a rescan of the case)."""
        candidates = [raw for raw in self.good if len(self.used[raw]) < len(self.variants)]
        if not candidates:
            return self.new_slide()
        raw = self.rng.choice(candidates)
        fresh = [v for v in range(len(self.variants)) if v not in self.used[raw]]
        self.put(raw, self.rng.choice(fresh))

    def rename_slide(self) -> None:
        """A person moves a slide to another name (the new name is a new slide)."""
        if not self.good:
            return self.new_slide()
        raw = self.rng.choice(sorted(self.good))
        new = b"renamed-%d-" % self.written + os.path.basename(raw)[-60:]
        os.rename(os.fsencode(self.scans) + b"/" + raw, os.fsencode(self.scans) + b"/" + new)
        self.good[new] = self.good.pop(raw)
        self.used[new] = set(self.used.pop(raw))

    def bad_file(self, k: int) -> None:
        scans = os.fsencode(self.scans)
        kind = k % 8
        if kind == 0:
            raw = b"empty-%d\xff.svs" % k
            open(scans + b"/" + raw, "wb").close()
            self.bad[raw] = "is empty (0 bytes)"
        elif kind == 1:
            raw = b"truncated-%d.tif" % k
            data = self.variants[k % len(self.variants)].read_bytes()
            Path(os.fsdecode(scans + b"/" + raw)).write_bytes(data[: len(data) // 3])
            self.bad[raw] = "is truncated"
        elif kind == 2:
            raw = b"garbage-%d.svs" % k
            Path(os.fsdecode(scans + b"/" + raw)).write_bytes(self.rng.randbytes(5000))
            self.bad[raw] = "not a slide format"
        elif kind == 3:
            raw = b"huge-%d.tif" % k
            write_huge_header_tiff(Path(os.fsdecode(scans + b"/" + raw)))
            self.bad[raw] = "larger than any glass slide"
        elif kind == 4:
            raw = b"no-mpp-%d.tif" % k
            make_synthetic_slide(Path(os.fsdecode(scans + b"/" + raw)), 256, 256, mpp=None,
                                 blobs=(Blob(128, 128, 90, 80),), seed=k)
            self.bad[raw] = "µm/px"
        elif kind == 5:
            raw = b"link-out-%d.svs" % k
            target = shutil.copy(self.variants[0], self.outside / f"secret-{k}.tif")
            os.symlink(target, scans + b"/" + raw)
            self.bad[raw] = "outside the watched folder"
        elif kind == 6:
            raw = b"series-%d" % k
            os.makedirs(scans + b"/" + raw)
            shutil.copy(self.variants[1], os.fsdecode(scans + b"/" + raw + b"/1.dcm"))
            os.symlink("/etc/passwd", scans + b"/" + raw + b"/zz.dcm")
            self.bad[raw] = "zz.dcm: is a symbolic link to /etc/passwd"
        else:
            raw = b"notes-%d\n.txt" % k
            Path(os.fsdecode(scans + b"/" + raw)).write_text("a lab's notes")
            self.not_slides[raw] = "not a slide format"

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        args = self.args
        started = time.monotonic()
        self.start()
        next_kill = time.monotonic() + self.rng.uniform(2, 6)
        bad_at = sorted(self.rng.sample(range(args.slides), args.bad_files))
        step = 0
        while self.written < args.slides:
            roll = self.rng.random()
            if roll < 0.12 and self.good:
                self.replace_slide()
            elif roll < 0.17 and self.good:
                self.rename_slide()
            else:
                self.new_slide()
            while bad_at and bad_at[0] <= self.written:
                self.bad_file(len(self.bad) + len(self.not_slides))
                bad_at.pop(0)
            step += 1
            time.sleep(self.rng.uniform(0.0, 2 * args.pace))
            if step % 5 == 0:
                self.check_alive()
            if time.monotonic() >= next_kill and (self.kills < args.kills or self.rng.random() < 0.3):
                self.kill()
                next_kill = time.monotonic() + self.rng.uniform(2, 6)
        while self.kills < args.kills:  # the rest of the kills while the backlog drains
            time.sleep(self.rng.uniform(1, 4))
            self.check_alive()
            self.kill()
        writing_s = time.monotonic() - started
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline and not self.settled():
            time.sleep(1)
            self.check_alive()
        drained = self.settled()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        total_s = time.monotonic() - started
        problems = [] if drained else ["the backlog did not drain before --drain-timeout"]
        problems += self.crashes + self.verify()
        return {
            "slides_written": self.written, "good_slides_at_end": len(self.good), "bad_files": len(self.bad),
            "not_slides": len(self.not_slides), "kills": self.kills, "workers": args.workers,
            "writing_s": round(writing_s, 1), "total_s": round(total_s, 1),
            "rss_mb": {"first": round(self.rss_mb[0]) if self.rss_mb else None,
                       "max": round(max(self.rss_mb)) if self.rss_mb else None,
                       "last": round(self.rss_mb[-1]) if self.rss_mb else None, "samples": len(self.rss_mb)},
            "csv_rows": len(self.csv_rows()), "problems": problems,
        }

    def ledger(self) -> dict[str, tuple]:
        db = self.out / "ledger.sqlite"
        if not db.exists():
            return {}
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
            try:
                return {row[0]: row[1:] for row in connection.execute(
                    "SELECT path, state, sha256, error, result FROM slides")}
            except sqlite3.OperationalError:
                return {}

    def settled(self) -> bool:
        rows = self.ledger()
        wanted = [shown(self.scans / os.fsdecode(raw)) for raw in [*self.good, *self.bad, *self.not_slides]]
        return all(p in rows and rows[p][0] in ("done", "failed", "skipped") for p in wanted) and \
            not any(r[0] in ("queued", "processing") for r in rows.values())

    def csv_rows(self) -> list[dict[str, str]]:
        path = self.out / "summary.csv"
        return list(csv.DictReader(path.open(encoding="utf-8"))) if path.exists() else []

    def verify(self) -> list[str]:
        problems = []
        rows = self.ledger()
        table = self.csv_rows()
        pairs: dict[tuple[str, str], int] = {}
        for row in table:
            pairs[(row["slide"], row["sha256"])] = pairs.get((row["slide"], row["sha256"]), 0) + 1
        problems += [f"CSV has {n} rows for {pair}" for pair, n in pairs.items() if n > 1 and pair[1]]
        for raw in self.good:
            path = self.scans / os.fsdecode(raw)
            key, sha = shown(path), sha256_file(path)
            state = rows.get(key)
            if state is None or state[0] != "done" or state[1] != sha:
                problems.append(f"{key}: ledger says {state and state[:2]}, the file's sha256 is {sha[:12]}")
                continue
            with open(output_paths(self.out, os.fsdecode(raw))["json"], encoding="utf-8") as handle:
                if json.load(handle)["slide"]["sha256"] != sha:
                    problems.append(f"{key}: the result describes other content")
            if pairs.get((key, sha), 0) != 1:
                problems.append(f"{key}: {pairs.get((key, sha), 0)} CSV rows with its current sha256")
        for raw, reason in self.bad.items():
            key = shown(self.scans / os.fsdecode(raw))
            state = rows.get(key)
            if state is None or state[0] != "failed" or reason not in (state[2] or ""):
                problems.append(f"{key}: expected failed with '{reason}', got {state and state[:3:2]}")
        for raw, reason in self.not_slides.items():
            key = shown(self.scans / os.fsdecode(raw))
            state = rows.get(key)
            if state is None or state[0] != "skipped" or reason not in (state[2] or ""):
                problems.append(f"{key}: expected skipped with '{reason}', got {state and state[:3:2]}")
        stray = [p for p in self.out.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
        problems += [f"temporary file left behind: {shown(p)}" for p in stray]
        if self.rss_mb and max(self.rss_mb) > self.args.max_rss_mb:
            problems.append(f"the watcher's RSS reached {max(self.rss_mb):.0f} MB (limit {self.args.max_rss_mb})")
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--slides", type=int, default=1000, help="slides written (new ones and replacements)")
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs of the watcher, at least")
    parser.add_argument("--bad-files", type=int, default=24, help="bad files and non-slides dropped in between")
    parser.add_argument("--variants", type=int, default=40, help="distinct slide contents")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pace", type=float, default=0.05, help="mean seconds between two writes")
    parser.add_argument("--drain-timeout", type=float, default=1200.0)
    parser.add_argument("--max-rss-mb", type=float, default=1500.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lowmag-soak-"))
    try:
        figures = Soak(work, args).run()
    finally:
        if args.work is None and os.environ.get("LOWMAG_SOAK_KEEP") is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    for problem in figures["problems"][:50]:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if figures["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

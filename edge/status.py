"""``edge-classify status``: what the ledger says (done, failed with reasons, queued, throughput)."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lowmag.edge.ledger import LEDGER_NAME, Ledger
from lowmag.edge.lock import holder
from lowmag.errors import LowmagError, without_path


def summarise(out: Path, failures: int = 20) -> dict[str, Any]:
    """A plain-data summary of the ledger in ``out`` (read-only; safe while a watcher runs)."""
    if not (Path(out) / LEDGER_NAME).is_file():
        raise LowmagError(f"{out}: no {LEDGER_NAME} here; pass the --out folder of edge-classify run or watch.")
    ledger = Ledger(out, readonly=True)
    try:
        rows = list(ledger.rows())
    finally:
        ledger.close()
    now = time.time()
    done = [r for r in rows if r["state"] == "done"]
    failed = [r for r in rows if r["state"] == "failed"]
    ms = [r["ms"] for r in done if r["ms"] is not None]
    finished = sorted(r["finished_at"] for r in done if r["finished_at"])
    span_h = (finished[-1] - finished[0]) / 3600 if len(finished) > 1 else 0.0
    return {
        "out": str(out),
        "running": holder(out),
        "counts": {state: sum(1 for r in rows if r["state"] == state)
                   for state in ("done", "failed", "queued", "processing", "skipped")},
        "needs_review": sum(1 for r in done if r["needs_review"]),
        "distribution": _distribution(done, failed),
        "retrying": sum(1 for r in rows if r["state"] == "queued" and r["error"]),
        "throughput": {
            "done_last_hour": sum(1 for t in finished if now - t <= 3600),
            "done_last_24h": sum(1 for t in finished if now - t <= 86400),
            "median_ms_per_slide": round(statistics.median(ms), 1) if ms else None,
            "slides_per_hour_between_first_and_last": round((len(finished) - 1) / span_h, 1) if span_h else None,
        },
        "labels": dict(Counter(r["label"] for r in done).most_common()),
        "failed": [{"path": r["path"], "error": r["error"], "kind": r["error_kind"], "attempts": r["attempts"],
                    "quarantined_to": r["quarantined_to"]} for r in failed[-failures:]],
        "queued": [{"path": r["path"], "attempts": r["attempts"], "last_error": r["error"]}
                   for r in rows if r["state"] in ("queued", "processing")][:failures],
        "skipped": [{"path": r["path"], "reason": r["error"]} for r in rows if r["state"] == "skipped"][-failures:],
    }


def _distribution(done: list, failed: list) -> dict[str, int]:
    """Done slides by their verdict against the training data, and those refused for it."""
    keys = done[0].keys() if done else []
    verdicts = Counter((r["distribution"] if "distribution" in keys else None) or "unchecked" for r in done)
    return {"in_distribution": verdicts.get("in_distribution", 0),
            "out_of_distribution_flagged": verdicts.get("out_of_distribution", 0),
            "out_of_distribution_refused": sum(1 for r in failed if r["error_kind"] == "out_of_distribution"),
            "unchecked": verdicts.get("unchecked", 0)}


def format_summary(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    running = summary["running"]
    lines = [
        f"{summary['out']}: " + (f"a watcher is running (pid {running.get('pid', '?')}, since "
                                 f"{running.get('started', '?')})" if running is not None else "no watcher running"),
        f"  done {c['done']} ({summary['needs_review']} need review), failed {c['failed']}, "
        f"queued {c['queued']} ({summary['retrying']} waiting to retry), processing {c['processing']}, "
        f"skipped {c['skipped']} (not slides)",
    ]
    d = summary["distribution"]
    lines.append(f"  training data: {d['in_distribution']} like it, {d['out_of_distribution_flagged']} unlike it "
                 f"(classified, need review), {d['out_of_distribution_refused']} unlike it (refused), "
                 f"{d['unchecked']} unchecked (bundle without fingerprint)")
    t = summary["throughput"]
    if t["median_ms_per_slide"] is not None:
        rate = t["slides_per_hour_between_first_and_last"]
        lines.append(f"  throughput: {t['done_last_hour']} in the last hour, {t['done_last_24h']} in 24 h; "
                     f"median {t['median_ms_per_slide']:.0f} ms per slide"
                     + (f"; {rate:g} slides/hour from first to last" if rate else ""))
    if summary["labels"]:
        lines.append("  labels: " + ", ".join(f"{k} {v}" for k, v in summary["labels"].items()))
    if summary["failed"]:
        lines.append("  failed:")
        for f in summary["failed"]:
            moved = f" [moved to {f['quarantined_to']}]" if f["quarantined_to"] else ""
            lines.append(f"    {f['path']}: {without_path(f['error'] or '', f['path'])}{moved}")
    if summary["skipped"]:
        lines.append("  skipped (not slides):")
        for entry in summary["skipped"]:
            lines.append(f"    {entry['path']}: {entry['reason']}")
    if summary["queued"]:
        lines.append("  queued:")
        for q in summary["queued"]:
            why = f" (attempt {q['attempts']} failed: {without_path(q['last_error'], q['path'])})" \
                if q["last_error"] else ""
            lines.append(f"    {q['path']}{why}")
    return "\n".join(lines)

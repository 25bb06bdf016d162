"""``edge-classify``: Classify every new slide a scanner writes, on a CPU or a small GPU (no torch)."""

from __future__ import annotations

from lowmag.cli_support import stage_group

main = stage_group(
    "Classify every new slide a scanner writes, on a CPU or a small GPU (no torch).",
    pending="the edge-classify issue (#5)",
)

if __name__ == "__main__":  # pragma: no cover
    main()

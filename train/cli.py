"""``distill-train``: Teacher-to-student resolution distillation (DiPalma et al.) on a GPU server or CPU."""

from __future__ import annotations

from lowmag.cli_support import stage_group

main = stage_group(
    "Teacher-to-student resolution distillation (DiPalma et al.) on a GPU server or CPU.",
    pending="the distill-train issue (#3)",
)

if __name__ == "__main__":  # pragma: no cover
    main()

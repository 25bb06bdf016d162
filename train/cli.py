"""``distill-train``: Teacher-to-student resolution distillation (DiPalma et al.) on a GPU server or CPU.

The command group exists so the entry point, ``--help`` and ``--version`` work from the
first release; its subcommands arrive with the distill-train issue (#3).
"""

from __future__ import annotations

import click

from lowmag.cli_support import configure_logging, verbose_option, version_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option()
@verbose_option
def main(verbose: int) -> None:
    """Teacher-to-student resolution distillation (DiPalma et al.) on a GPU server or CPU.

    No subcommands yet: they land with the distill-train issue (#3). Meanwhile `lowmag info|read|tissue`
    shows how slides are opened, read at a magnification and searched for tissue.
    """
    configure_logging(verbose)


if __name__ == "__main__":  # pragma: no cover
    main()

"""``edge-classify``: Classify every new slide a scanner writes, on a CPU or a small GPU (no torch).

The command group exists so the entry point, ``--help`` and ``--version`` work from the
first release; its subcommands arrive with the edge-classify issue (#5).
"""

from __future__ import annotations

import click

from lowmag.cli_support import configure_logging, verbose_option, version_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option()
@verbose_option
def main(verbose: int) -> None:
    """Classify every new slide a scanner writes, on a CPU or a small GPU (no torch).

    No subcommands yet: they land with the edge-classify issue (#5). Meanwhile `lowmag info|read|tissue`
    shows how slides are opened, read at a magnification and searched for tissue.
    """
    configure_logging(verbose)


if __name__ == "__main__":  # pragma: no cover
    main()

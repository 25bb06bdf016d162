"""What every lowmag command line shares: error handling, logging, common options."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import click

from lowmag import __version__
from lowmag.errors import LowmagError


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our own errors into a one-line message and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LowmagError as error:
            raise click.ClickException(str(error)) from error

    return wrapper


def configure_logging(verbose: int = 0) -> None:
    """Log warnings (and info with -v, debug with -vv) to stderr; entry points only."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # libvips reports every thread pool it finishes at INFO; keep its warnings only.
    logging.getLogger("pyvips").setLevel(max(level, logging.WARNING))


def version_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.version_option(__version__, prog_name="lowmag", message="%(prog)s %(version)s")


def verbose_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")(func)


def assume_mpp_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--assume-mpp",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        metavar="UM_PER_PX",
        help="Level-0 µm/px to use when a file has none or an implausible one "
        "(required for plain images). Overrides the metadata.",
    )(func)


class ResolutionType(click.ParamType):
    """A click parameter for '1.25x', '8um' or 'scan/4'."""

    name = "resolution"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from lowmag.resolution import Resolution

        if not isinstance(value, str):
            return value
        try:
            return Resolution.parse(value)
        except LowmagError as error:
            self.fail(str(error), param, ctx)


class DefaultCommandGroup(click.Group):
    """A group whose ``default`` subcommand runs when the first argument names no command.

    ``export-student CHECKPOINT --target onnx`` then means ``export-student export CHECKPOINT ...``
    while ``export-student bench ...`` still reaches its own subcommand.
    """

    def __init__(self, *args: Any, default: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if self.default and args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


class ManyValuesCommand(click.Command):
    """A command whose ``many`` options take several values after one flag.

    ``--models a b --slides x y`` (what a shell glob such as ``--models bundles/*`` gives)
    is read as ``--models a --models b --slides x --slides y``; repeating the flag still
    works. A value that begins with "-" needs its own flag (or a ``./`` in front).
    """

    def __init__(self, *args: Any, many: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.many = many

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        spread: list[str] = []
        current: str | None = None  # the many-valued flag whose values are being read
        for i, arg in enumerate(args):
            if arg == "--":
                spread.extend(args[i:])
                break
            if arg.startswith("-"):
                flag = arg.split("=", 1)[0]
                current = flag if flag in self.many else None
                spread.append(arg)
                continue
            if current is not None and spread and spread[-1] != current:
                spread.append(current)  # a further value of the same flag
            spread.append(arg)
        return super().parse_args(ctx, spread)


def stage_group(summary: str, pending: str | None = None, default: str | None = None) -> click.Group:
    """The top-level click group of a stage command, with --version and -v.

    ``pending`` says which issue brings the subcommands, while there are none yet;
    ``default`` names the subcommand that runs when no subcommand is named.
    """
    doc = summary
    if pending:
        doc += (
            f"\n\nNo subcommands yet: they land with {pending}. Meanwhile `lowmag info|read|tissue` "
            "shows how slides are opened, read at a magnification and searched for tissue."
        )

    @click.group(help=doc, cls=DefaultCommandGroup, default=default,
                 context_settings={"help_option_names": ["-h", "--help"]})
    @version_option()
    @verbose_option
    def group(verbose: int) -> None:
        configure_logging(verbose)

    return group

"""The ``arbiter`` Typer application and its global options; commands register on ``cli``."""

from __future__ import annotations

import os
from typing import Annotated

import typer

cli = typer.Typer(
    help="Arbiter: a governance proxy for the Model Context Protocol.",
    no_args_is_help=True,
    # A failure is one line (main() below); the traceback is for --debug, never the default.
    pretty_exceptions_enable=False,
)
_debug = {"on": os.environ.get("ARBITER_LOG_LEVEL", "").upper() == "DEBUG"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("arbiter")
    except PackageNotFoundError:
        return "0.0.0"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"arbiter {_version()}")
        raise typer.Exit()


@cli.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Print tracebacks of errors")] = False,
) -> None:
    if debug:
        _debug["on"] = True


def debug_enabled() -> bool:
    return _debug["on"]

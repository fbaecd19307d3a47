"""The ``arbiter`` command line: serve, migrate, demo, api-key, policy, audit; and, through a running
Arbiter's admin API (client.py): upstreams, keys, limits, approvals, policy export/import/dry-run,
audit query.

Only typer and the standard library are imported here and in the command modules' top level: each
command imports what it needs when it runs, so ``arbiter --help`` and ``--version`` answer at once
(tests/cli/test_cli_startup.py holds that line). Errors are one line on stderr and an exit code
(exits.py); ``--debug`` (or ARBITER_LOG_LEVEL=DEBUG) adds the traceback.
"""

from __future__ import annotations

import sys
import traceback

# The commands register themselves on `cli` when imported (their own imports are inside them).
from arbiter.cli import (  # noqa: F401
    access,  # pyright: ignore[reportUnusedImport]
    approvals,  # pyright: ignore[reportUnusedImport]
    audit,  # pyright: ignore[reportUnusedImport]
    audit_query,  # pyright: ignore[reportUnusedImport]
    keys,  # pyright: ignore[reportUnusedImport]
    limits,  # pyright: ignore[reportUnusedImport]
    policy,  # pyright: ignore[reportUnusedImport]
    policy_admin,  # pyright: ignore[reportUnusedImport]
    run,  # pyright: ignore[reportUnusedImport]
    upstreams,  # pyright: ignore[reportUnusedImport]
)
from arbiter.cli.app import cli, debug_enabled
from arbiter.cli.exits import Exit, exit_code


def main() -> None:
    """The console script: a failure is one line on stderr and its exit code (exits.py)."""
    try:
        cli()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        from arbiter.errors import ArbiterError

        if not isinstance(exc, ArbiterError):
            raise
        if debug_enabled():
            traceback.print_exc()
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(int(exit_code(exc))) from None


__all__ = ["Exit", "cli", "main"]

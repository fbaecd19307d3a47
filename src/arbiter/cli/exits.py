"""The CLI's exit codes: one per kind of failure, so scripts and orchestrators can tell them apart.

Listed in docs/operations.md ("Exit codes"); keep the two in step. Kept free of imports so that
``arbiter --help`` stays fast.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    # A check that ran and found something: a policy test case that differs, an audit chain that is broken.
    FAILED = 1
    # Invalid input or options, an unreadable file or audit store, any other error with a message.
    USAGE = 2
    # An ARBITER_* variable or config file key that is no setting, or a value a setting cannot take.
    CONFIG = 3
    # The database cannot be reached, or does not exist.
    DATABASE = 4
    # The database schema is behind (or ahead of) this Arbiter: run `arbiter migrate`.
    SCHEMA = 5
    PORT_IN_USE = 6
    REDIS = 7
    JWKS = 8
    # `arbiter audit verify --require-signatures`: the chain is intact but its signatures were not
    # checked (no trusted key) or some checkpoints are unsigned.
    UNSIGNED = 9
    # The commands that call a running Arbiter (upstreams, keys, limits, policy export/import/dry-run,
    # audit query): the admin API refused the call (its error on one line), or could not be reached.
    API_REFUSED = 10
    API_UNREACHABLE = 11


def exit_code(exc: BaseException) -> Exit:
    """The exit code of an ArbiterError (imported here, not at the top: it pulls in the MCP SDK)."""
    from arbiter import errors

    for cls, code in (
        (errors.SettingsInvalid, Exit.CONFIG),
        (errors.DatabaseUnreachable, Exit.DATABASE),
        (errors.SchemaOutOfDate, Exit.SCHEMA),
        (errors.PortInUse, Exit.PORT_IN_USE),
        (errors.RedisUnreachable, Exit.REDIS),
        (errors.JwksUnreachable, Exit.JWKS),
        (errors.AdminApiRefused, Exit.API_REFUSED),
        (errors.AdminApiUnreachable, Exit.API_UNREACHABLE),
    ):
        if isinstance(exc, cls):
            return code
    return Exit.USAGE

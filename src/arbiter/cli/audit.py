"""``arbiter audit verify | export | keygen | purge``; the work is in ``arbiter.audit.commands``.
(``audit query`` asks a running Arbiter: audit_query.py.)"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from arbiter.audit.filters import FILTERS
from arbiter.cli.app import cli
from arbiter.cli.exits import Exit
from arbiter.cli.progress import counter, spinner

audit_cli = typer.Typer(
    help="Verify, export and purge the audit log; make a checkpoint signing key.", no_args_is_help=True
)
cli.add_typer(audit_cli, name="audit")


@audit_cli.command("verify")
def audit_verify(
    file: Annotated[
        Path | None,
        typer.Option("--file", help="An exported bundle to verify offline (default: the database)"),
    ] = None,
    public_key: Annotated[
        list[str] | None,
        typer.Option(
            "--public-key",
            help="A trusted Ed25519 public key, base64 (repeatable). Default: the bundle's own keys, or "
            "for the database the configured signing key and audit.trusted_public_keys",
        ),
    ] = None,
    require_signatures: Annotated[
        bool,
        typer.Option(
            "--require-signatures",
            help="Exit 9 unless the checkpoints' signatures were checked against a trusted key and "
            "none is unsigned",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON")] = False,
) -> None:
    """Check the hash chain and the checkpoints' signatures: exit 0 intact, 1 broken, 2 unreadable,
    9 intact but unsigned or not verifiable with --require-signatures.

    Without a trusted key the signatures are not checked (and the output says so): the chain's own
    consistency decides the exit code."""
    from arbiter.audit import commands
    from arbiter.audit.bundle import verify_bundle
    from arbiter.cli import config

    keys = list(public_key or [])
    if file is not None:
        with spinner(f"verifying {file}"):
            report = verify_bundle(file, keys or None)
        what, doc = str(file), report.to_json()
    else:
        settings = config.load()
        with spinner("verifying the audit log"):
            found = asyncio.run(commands.verify_database(settings, keys or None))
        report = found.report
        what = "database"
        doc = {**report.to_json(), "head_seq": found.head.seq, "anchor_seq": found.head.anchor_seq}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        for line in commands.describe(report, what):
            typer.echo(line)
    if not report.ok:
        raise typer.Exit(Exit.FAILED)
    unverifiable = (
        not report.signatures_checked
        or report.checkpoints_unsigned > 0
        or (report.records > 0 and report.last_signed_seq is None)
    )
    if require_signatures and unverifiable:
        typer.echo("error: --require-signatures: the chain is intact but not verifiably signed", err=True)
        raise typer.Exit(Exit.UNSIGNED)
    raise typer.Exit(Exit.OK)


def with_filters(command: Callable[..., None]) -> Callable[..., None]:
    """``command``'s ``**filters`` as one ``--<filter>`` option each (``audit.filters.FILTERS``)."""
    params = list(inspect.signature(command, eval_str=True).parameters.values())
    options = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[str | None, typer.Option(help=help)],
        )
        for name, help in FILTERS.items()
    ]
    fixed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if p.kind is not p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature(fixed[:2] + options + fixed[2:], return_annotation=None)  # type: ignore[attr-defined]
    return command


@audit_cli.command("export")
@with_filters
def audit_export(
    fmt: Annotated[str, typer.Option("--format", help="jsonl, csv, or bundle (verifiable offline)")],
    out: Annotated[Path | None, typer.Option(help="Write to this file (owner-only); default stdout")] = None,
    order: Annotated[str, typer.Option(help="asc or desc (jsonl, csv)")] = "asc",
    from_seq: Annotated[int | None, typer.Option(help="Bundle: first record (default: oldest kept)")] = None,
    to_seq: Annotated[int | None, typer.Option(help="Bundle: last record (default: newest)")] = None,
    **filters: str | None,
) -> None:
    """Export records from the database: filtered JSONL or CSV, or a bundle (a contiguous range of
    the chain with its checkpoints and public keys) for `arbiter audit verify --file`."""
    from arbiter.audit import commands
    from arbiter.audit.query import Filters, parse_order
    from arbiter.cli import config

    settings = config.load()
    parsed, ordered = Filters.parse(**filters), parse_order(order)
    # Progress only when writing to a file: on stdout it would mix with the records.
    with counter(f"exporting to {out}", "lines", enabled=out is not None) as advance:
        done = asyncio.run(
            commands.export(settings, fmt, out, parsed, ordered, from_seq, to_seq, progress=advance)
        )
    if out is not None:
        count = f"{done.records} records, " if done.records is not None else ""
        typer.echo(f"wrote {count}{done.bytes} bytes to {out}", err=True)


@audit_cli.command("keygen")
def audit_keygen() -> None:
    """Make a new Ed25519 key for signing audit checkpoints; prints the private seed and public key."""
    from arbiter.audit.signing import generate_key, key_id

    seed, public = generate_key()
    typer.echo(f"ARBITER_AUDIT__SIGNING_KEY={seed}")
    typer.echo(f"public_key={public}")
    typer.echo(f"key_id={key_id(public)}")
    typer.echo(
        "Keep the signing key in a secret store. Give the public key to auditors. When you rotate, add "
        "the old public key to ARBITER_AUDIT__TRUSTED_PUBLIC_KEYS so its checkpoints still verify.",
        err=True,
    )


@audit_cli.command("purge")
def audit_purge() -> None:
    """Purge records older than audit.retention_days now, behind a signed checkpoint (the purge is
    itself recorded); what every replica's retention loop does every purge_interval_s."""
    from arbiter.audit import commands
    from arbiter.cli import config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = config.load()
    purged = asyncio.run(commands.purge_now(settings))
    if purged:
        typer.echo(f"purged {purged} records older than {settings.audit.retention_days} days")
    else:
        typer.echo(f"nothing purged: no record is older than {settings.audit.retention_days} days")

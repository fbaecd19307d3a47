"""The ``arbiter`` command line: serve, migrate, demo, api-key, policy, audit."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from arbiter.errors import ArbiterError, InvalidInput
from arbiter.settings import load_settings

if TYPE_CHECKING:
    from arbiter.policies.engine import PolicyEngine

cli = typer.Typer(help="Arbiter: a governance proxy for the Model Context Protocol.", no_args_is_help=True)


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: ARBITER_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: ARBITER_PORT)")] = None,
) -> None:
    """Run Arbiter (the database must be migrated: `arbiter migrate`)."""
    from arbiter.app import create_app
    from arbiter.serving import graceful_server, uvicorn_config
    from arbiter.telemetry.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.telemetry.log_format or "json", settings.log_level)
    app = create_app(settings)
    config = uvicorn_config(
        app,
        settings,
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_config=None,  # uvicorn's own lines go through the same handler, in the same format
    )
    # SIGTERM: readyz 503 and new requests refused at once, in-flight ones finish (serving.py).
    graceful_server(config, app.state.admission, settings).run()


@cli.command()
def migrate() -> None:
    """Upgrade the database (ARBITER_DATABASE_URL) to the newest schema."""
    from arbiter.store import schema

    settings = load_settings()
    schema.upgrade(settings.database_url)
    typer.echo(f"database is at revision {schema.head_revision()}")


@cli.command()
def demo(
    port: Annotated[int, typer.Option(help="Port for Arbiter (0: pick a free one)")] = 8080,
    info_file: Annotated[
        Path, typer.Option(help="Write connection details and API keys here (owner-only) once ready")
    ] = Path("demo-info.json"),
    state_dir: Annotated[Path, typer.Option(help="Where the demo keeps its SQLite file")] = Path(
        ".arbiter-demo"
    ),
) -> None:
    """Start two demo upstream MCP servers and Arbiter in front of them, on SQLite, in one command."""
    from arbiter.demo.runner import run_demo
    from arbiter.telemetry.logs import configure_logging

    configure_logging(load_settings().telemetry.log_format or "text", logging.WARNING)
    asyncio.run(run_demo(port, info_file, state_dir))


api_key = typer.Typer(help="Manage API keys directly in the database (e.g. the first admin key).")
cli.add_typer(api_key, name="api-key")


@api_key.command("create")
def api_key_create(
    owner: Annotated[str, typer.Option(help="Who the key is for")],
    role: Annotated[list[str], typer.Option(help="A role (repeatable), e.g. security-admin")],
    tenant: Annotated[str | None, typer.Option(help="The key's tenant")] = None,
) -> None:
    """Create an API key and print it once (for bootstrapping the first security admin)."""
    from arbiter.auth.apikeys import ApiKeys
    from arbiter.store.db import create_engine, session_factory

    settings = load_settings()

    async def create() -> str:
        engine = create_engine(settings.database_url)
        try:
            _, key = await ApiKeys(session_factory(engine)).create(
                owner=owner, roles=role, tenant=tenant, created_by="arbiter api-key create"
            )
            return key
        finally:
            await engine.dispose()

    typer.echo(asyncio.run(create()))


policy_cli = typer.Typer(help="Test and explain policies, against a policy file or the live policy.")
cli.add_typer(policy_cli, name="policy")
PolicyFile = Annotated[
    Path | None,
    typer.Option("--policy", help="A Casbin CSV policy file (default: the live policy in the database)"),
]


def _engine(policy_file: Path | None) -> PolicyEngine:
    from arbiter.policies.engine import PolicyEngine
    from arbiter.policies.rules import parse_csv
    from arbiter.policies.store import PolicyStore
    from arbiter.store.db import create_engine, session_factory

    if policy_file is not None:
        return PolicyEngine(parse_csv(_read(policy_file)), 0)
    settings = load_settings()

    async def live() -> PolicyEngine:
        db = create_engine(settings.database_url)
        try:
            engine, _ = await PolicyStore(session_factory(db)).load()
            return engine
        finally:
            await db.dispose()

    return asyncio.run(live())


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None


@policy_cli.command("test")
def policy_test(
    table: Annotated[Path, typer.Argument(help="Decision table: YAML, or CSV with a header row")],
    policy_file: PolicyFile = None,
) -> None:
    """Check every expected decision in TABLE; exit 1 if any differs (each case is printed)."""
    from arbiter.policies.tables import parse_table, run_table

    cases = parse_table(_read(table), "csv" if table.suffix.lower() == ".csv" else "yaml")
    if not cases:
        raise InvalidInput(f"{table} has no cases: an empty table would pass without testing anything")
    engine = _engine(policy_file)
    outcomes = run_table(engine, cases)
    for outcome in outcomes:
        typer.echo(outcome.describe())
    failed = sum(not o.ok for o in outcomes)
    source = str(policy_file) if policy_file else f"live policy version {engine.version}"
    typer.echo(f"{len(outcomes) - failed} passed, {failed} failed ({source})")
    raise typer.Exit(1 if failed else 0)


@policy_cli.command("explain")
def policy_explain(
    subject: Annotated[str, typer.Option(help="The caller's subject")],
    obj: Annotated[str, typer.Option("--object", help="crm/get_customer or crm__get_customer")],
    role: Annotated[list[str] | None, typer.Option(help="A role of the caller (repeatable)")] = None,
    tenant: Annotated[str, typer.Option(help="The caller's tenant")] = "",
    action: Annotated[str, typer.Option(help="call, read, get, list, admin:read, admin:write")] = "call",
    args: Annotated[str, typer.Option(help="The call's arguments as a JSON object")] = "{}",
    policy_file: PolicyFile = None,
) -> None:
    """Say whether the policy allows a call, and which rule decided."""
    from arbiter.policies.engine import Subject
    from arbiter.policies.rules import ACTIONS
    from arbiter.policies.tables import object_name

    try:
        arguments = json.loads(args)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--args is not JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise InvalidInput("--args must be a JSON object")
    if action not in ACTIONS:
        raise InvalidInput(f"unknown action {action!r}; actions are: {', '.join(ACTIONS)}")
    engine = _engine(policy_file)
    sub = Subject(subject, tenant, tuple(sorted(role or [])))
    decision = engine.decide(sub, object_name(obj), action, cast(dict[str, Any], arguments))
    typer.echo(json.dumps(decision.to_json(), indent=2))


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON")] = False,
) -> None:
    """Check the hash chain and the checkpoints' signatures: exit 0 intact, 1 broken, 2 unreadable."""
    from arbiter.audit import commands
    from arbiter.audit.bundle import verify_bundle

    keys = list(public_key or [])
    if file is not None:
        report = verify_bundle(file, keys or None)
        what, doc = str(file), report.to_json()
    else:
        found = asyncio.run(commands.verify_database(load_settings(), keys or None))
        report = found.report
        what = "database"
        doc = {**report.to_json(), "head_seq": found.head.seq, "anchor_seq": found.head.anchor_seq}
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
    else:
        for line in commands.describe(report, what):
            typer.echo(line)
    raise typer.Exit(0 if report.ok else 1)


def _with_filters(command: Callable[..., None]) -> Callable[..., None]:
    """``command``'s ``**filters`` as one ``--<filter>`` option each (``audit.query.FILTERS``)."""
    from arbiter.audit.query import FILTERS

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
@_with_filters
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

    done = asyncio.run(
        commands.export(
            load_settings(), fmt, out, Filters.parse(**filters), parse_order(order), from_seq, to_seq
        )
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

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    purged = asyncio.run(commands.purge_now(settings))
    if purged:
        typer.echo(f"purged {purged} records older than {settings.audit.retention_days} days")
    else:
        typer.echo(f"nothing purged: no record is older than {settings.audit.retention_days} days")


def main() -> None:
    try:
        cli()
    except ArbiterError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

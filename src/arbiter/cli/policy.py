"""``arbiter policy test | explain``: against a policy file or the live policy in the database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from arbiter.cli.app import cli

if TYPE_CHECKING:
    from arbiter.policies.engine import PolicyEngine

policy_cli = typer.Typer(
    help="Test and explain policies (a file or the live policy); export, import and dry-run them (admin API)."
)
cli.add_typer(policy_cli, name="policy")
PolicyFile = Annotated[
    Path | None,
    typer.Option("--policy", help="A Casbin CSV policy file (default: the live policy in the database)"),
]


def _engine(policy_file: Path | None) -> PolicyEngine:
    from arbiter.cli import config, preflight
    from arbiter.policies.engine import PolicyEngine
    from arbiter.policies.rules import parse_csv
    from arbiter.policies.store import PolicyStore
    from arbiter.store.db import create_engine, session_factory

    if policy_file is not None:
        return PolicyEngine(parse_csv(read(policy_file)), 0)
    settings = config.load()
    preflight.check_database(settings)

    async def live() -> PolicyEngine:
        db = create_engine(settings.database_url)
        try:
            engine, _ = await PolicyStore(session_factory(db)).load()
            return engine
        finally:
            await db.dispose()

    return asyncio.run(live())


def read(path: Path) -> str:
    from arbiter.errors import InvalidInput

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
    from arbiter.errors import InvalidInput
    from arbiter.policies.tables import parse_table, run_table

    cases = parse_table(read(table), "csv" if table.suffix.lower() == ".csv" else "yaml")
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
    from arbiter.errors import InvalidInput
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

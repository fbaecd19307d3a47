"""The ``arbiter`` command line: serve, migrate, demo."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from arbiter.errors import ArbiterError
from arbiter.settings import load_settings

cli = typer.Typer(help="Arbiter: a governance proxy for the Model Context Protocol.", no_args_is_help=True)


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: ARBITER_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: ARBITER_PORT)")] = None,
) -> None:
    """Run Arbiter (the database must be migrated: `arbiter migrate`)."""
    from arbiter.app import create_app

    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port if port is not None else settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )


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

    logging.basicConfig(level=logging.WARNING)
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


def main() -> None:
    try:
        cli()
    except ArbiterError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

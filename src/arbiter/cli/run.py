"""``arbiter serve | migrate | demo | api-key create``: running Arbiter and preparing its database."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from arbiter.cli.app import cli
from arbiter.cli.progress import spinner


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: ARBITER_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: ARBITER_PORT)")] = None,
) -> None:
    """Run Arbiter (the database must be migrated: `arbiter migrate`)."""
    from arbiter.cli import config, preflight

    settings = config.load()
    config.print_summary(settings)
    bind_host = host or settings.host
    bind_port = port if port is not None else settings.port
    # Cheap and most often wrong first; the app itself is built only once all of them pass.
    preflight.check_port(bind_host, bind_port)
    preflight.check_database(settings)
    preflight.check_redis(settings)
    preflight.check_jwks(settings)

    from arbiter.app import create_app
    from arbiter.serving import graceful_server, uvicorn_config
    from arbiter.telemetry.logs import configure_logging

    configure_logging(settings.telemetry.log_format or "json", settings.log_level)
    app = create_app(settings)
    uv = uvicorn_config(
        app,
        settings,
        host=bind_host,
        port=bind_port,
        log_config=None,  # uvicorn's own lines go through the same handler, in the same format
    )
    # SIGTERM: readyz 503 and new requests refused at once, in-flight ones finish (serving.py).
    graceful_server(uv, app.state.admission, settings).run()


@cli.command()
def migrate() -> None:
    """Upgrade the database (ARBITER_DATABASE_URL) to the newest schema."""
    from sqlalchemy.exc import SQLAlchemyError

    from arbiter.cli import config, preflight
    from arbiter.errors import DatabaseUnreachable
    from arbiter.store import schema

    settings = config.load()
    config.print_summary(settings)
    preflight.check_database(settings, check_schema=False, create=True)
    try:
        with spinner("migrating the database"):
            schema.upgrade(settings.database_url)
    except (SQLAlchemyError, OSError) as exc:
        raise DatabaseUnreachable(f"migration failed: {preflight.first_line(exc)}") from exc
    typer.echo(f"database is at revision {schema.head_revision()}")


@cli.command()
def demo(
    port: Annotated[int, typer.Option(help="Port for Arbiter (0: pick a free one)")] = 8080,
    info_file: Annotated[
        Path, typer.Option(help="Write connection details and API keys here (owner-only) once ready")
    ] = Path("demo-info.json"),
    state_dir: Annotated[
        Path, typer.Option(help="Where the demo keeps its SQLite file and keys, reused between runs")
    ] = Path(".arbiter-demo"),
    reset: Annotated[
        bool, typer.Option("--reset", help="Forget the previous run's keys, upstreams and policy")
    ] = False,
) -> None:
    """Start two demo upstream MCP servers and Arbiter in front of them, on SQLite, in one command.

    A second run reuses what the first made (keys, policy changes, audit log); --reset starts over."""
    from arbiter.cli import config, preflight

    settings = config.load()
    preflight.check_port("127.0.0.1", port)

    from arbiter.demo.runner import run_demo
    from arbiter.telemetry.logs import configure_logging

    configure_logging(settings.telemetry.log_format or "text", logging.WARNING)
    asyncio.run(run_demo(port, info_file, state_dir, reset=reset))


api_key = typer.Typer(help="Manage API keys directly in the database (e.g. the first admin key).")
cli.add_typer(api_key, name="api-key")


@api_key.command("create")
def api_key_create(
    owner: Annotated[str, typer.Option(help="Who the key is for")],
    role: Annotated[list[str], typer.Option(help="A role (repeatable), e.g. security-admin")],
    tenant: Annotated[str | None, typer.Option(help="The key's tenant")] = None,
) -> None:
    """Create an API key and print it once (for bootstrapping the first security admin)."""
    from arbiter.cli import config, preflight

    settings = config.load()
    preflight.check_database(settings)

    from arbiter.auth.apikeys import ApiKeys
    from arbiter.store.db import create_engine, session_factory

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

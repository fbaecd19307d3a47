"""Start-up failures: one readable line and an exit code of its own each (docs/operations.md), checked
before anything slow; and a CLI whose help path imports none of the heavy modules."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from arbiter.store import schema
from tests.cli.helpers import arbiter

DATABASE, SCHEMA, PORT_IN_USE, REDIS, JWKS = 4, 5, 6, 7, 8


@pytest.fixture
def migrated(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'arbiter.db'}"
    schema.upgrade(url)
    return url


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_help_and_version_import_no_driver_sdk_server_or_policy_engine() -> None:
    heavy = (
        "sqlalchemy",
        "asyncpg",
        "aiosqlite",
        "mcp",
        "mcp_types",
        "casbin",
        "fastapi",
        "starlette",
        "uvicorn",
        "redis",
        "httpx",
        "alembic",
        "arbiter.errors",
        "arbiter.settings",
    )
    probe = f"""
import sys
from arbiter.cli import main
for argv in (["arbiter", "--help"], ["arbiter", "--version"], ["arbiter", "audit", "--help"]):
    sys.argv = argv
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
print("MODULES", sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r} or m in {heavy!r}))
"""
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MODULES "))
    assert line == "MODULES []"
    assert "serve" in proc.stdout and "verify" in proc.stdout and "arbiter " in proc.stdout


def test_a_missing_sqlite_file_is_named_and_not_created(tmp_path: Path) -> None:
    db = tmp_path / "nowhere.db"
    ran = arbiter("serve", "--port", "0", env={"ARBITER_DATABASE_URL": f"sqlite:///{db}"})
    assert ran.code == DATABASE
    assert (
        ran.error == f"error: the SQLite file {db} does not exist; create it with `arbiter migrate` "
        "(or set ARBITER_DATABASE_URL)"
    )
    assert not db.exists()
    assert "Traceback" not in ran.err


def test_an_unreachable_postgres_names_host_and_database_but_not_the_password() -> None:
    port = closed_port()
    url = f"postgresql://arbiter:hunter2@127.0.0.1:{port}/orders"
    for command in ("serve", "migrate"):
        ran = (
            arbiter(command, "--port", "0", env={"ARBITER_DATABASE_URL": url})
            if command == "serve"
            else (arbiter(command, env={"ARBITER_DATABASE_URL": url}))
        )
        assert ran.code == DATABASE, ran.err
        assert ran.error.startswith(
            f"error: cannot reach the database 'orders' on 127.0.0.1:{port} (user arbiter): "
        )
        assert "hunter2" not in ran.err and "Traceback" not in ran.err


def test_a_missing_postgres_database_is_named(postgres_url: str) -> None:
    url = postgres_url.rsplit("/", 1)[0] + "/no_such_db_here"
    ran = arbiter("serve", "--port", "0", env={"ARBITER_DATABASE_URL": url})
    assert ran.code == DATABASE
    assert "database 'no_such_db_here' on" in ran.error and "does not exist" in ran.error


def test_a_schema_behind_says_run_migrate(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    schema.upgrade(url, "0001")
    ran = arbiter("serve", "--port", "0", env={"ARBITER_DATABASE_URL": url})
    assert ran.code == SCHEMA
    assert ran.error.startswith("error: database schema is at 0001 but this Arbiter needs ")
    assert ran.error.endswith("run `arbiter migrate` first")
    ran = arbiter("migrate", env={"ARBITER_DATABASE_URL": url})
    assert ran.code == 0 and "database is at revision" in ran.out


def test_a_port_in_use_is_found_before_the_database(taken_port: int, tmp_path: Path) -> None:
    # The database does not exist either: the port is checked first, so that is what is reported.
    env = {"ARBITER_DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}"}
    ran = arbiter("serve", "--port", str(taken_port), env=env)
    assert ran.code == PORT_IN_USE
    assert ran.error == (
        f"error: port {taken_port} on 127.0.0.1 is already in use; stop what listens there or choose "
        "another port (--port or ARBITER_PORT)"
    )
    ran = arbiter("demo", "--port", str(taken_port), "--state-dir", str(tmp_path / "s"), cwd=tmp_path)
    assert ran.code == PORT_IN_USE


def test_unreachable_redis_is_named_when_limits_fail_closed(migrated: str) -> None:
    url = f"redis://:pw@127.0.0.1:{closed_port()}/0"
    ran = arbiter(
        "serve",
        "--port",
        str(closed_port()),
        env={"ARBITER_DATABASE_URL": migrated, "ARBITER_REDIS_URL": url},
    )
    assert ran.code == REDIS
    assert ran.error.startswith("error: cannot reach Redis at redis://:***@127.0.0.1:")
    assert "set it to fallback" in ran.error and ":pw@" not in ran.err


def test_an_unreachable_jwks_is_named(migrated: str) -> None:
    jwks = f"http://127.0.0.1:{closed_port()}/jwks"
    issuers = json.dumps([{"issuer": "https://idp.example", "jwks_uri": jwks}])
    ran = arbiter(
        "serve",
        "--port",
        str(closed_port()),
        env={"ARBITER_DATABASE_URL": migrated, "ARBITER_AUTH__ISSUERS": issuers},
    )
    assert ran.code == JWKS
    assert ran.error.startswith("error: cannot fetch the signing keys of issuer at 127.0.0.1:")
    assert jwks in ran.error


def test_debug_adds_the_traceback(taken_port: int) -> None:
    ran = arbiter("--debug", "serve", "--port", str(taken_port))
    assert ran.code == PORT_IN_USE
    assert "Traceback" in ran.err and ran.error.startswith("error: port")
    ran = arbiter("serve", "--port", str(taken_port), env={"ARBITER_LOG_LEVEL": "DEBUG"})
    assert "Traceback" in ran.err

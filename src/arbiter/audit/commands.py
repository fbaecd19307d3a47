"""What ``arbiter audit …`` does outside a running Arbiter: open the store the way the app does,
verify it, export from it, purge it, and say what a verification found in words.

The typer commands in ``arbiter/cli/audit.py`` only parse options and call these.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import anyio.to_thread
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.audit.bundle import SELF_KEYS_NOTE, BundleReport
from arbiter.audit.export import bundle_chunks, csv_chunks, jsonl_chunks, plan_bundle
from arbiter.audit.query import Filters, Order
from arbiter.audit.record import renderer_for
from arbiter.audit.retention import purge_expired
from arbiter.audit.signing import Signer, hmac_key
from arbiter.audit.store import AuditStore, Head
from arbiter.audit.verify import Report
from arbiter.errors import ArbiterError, ConfigError, InvalidInput
from arbiter.settings import Settings
from arbiter.store.db import create_engine
from arbiter.store.schema import require_head

T = TypeVar("T")
NO_KEY_HINT = (
    "no trusted public key was given, so only the hash chain was checked; give the signing key's "
    "public key with --public-key (or set ARBITER_AUDIT__SIGNING_KEY or ARBITER_AUDIT__TRUSTED_PUBLIC_KEYS)"
)
_SHOWN_PROBLEMS = 10


class AuditStoreUnreadable(ArbiterError):
    """The database could not be reached or read (not the same as a chain that does not verify)."""

    code = "audit_store_unreadable"
    http_status = 503


def open_store(settings: Settings, public_keys: list[str] | None = None) -> tuple[AsyncEngine, AuditStore]:
    """The store as ``create_app`` builds it. With ``public_keys``, checkpoints are checked against
    exactly those keys and no signing key is needed (an auditor verifying with the published key)."""
    cfg = settings.audit
    if public_keys:
        signer = Signer.from_secret(None)
        cfg = cfg.model_copy(update={"trusted_public_keys": list(public_keys)})
    else:
        signer = Signer.from_secret(cfg.signing_key)
    key, _ = hmac_key(cfg.hmac_key, signer)
    renderer = renderer_for(cfg.redact, key)
    engine = create_engine(settings.database_url)
    return engine, AuditStore(engine, signer, cfg, renderer.render)


async def with_store(
    settings: Settings,
    work: Callable[[AsyncEngine, AuditStore], Awaitable[T]],
    public_keys: list[str] | None = None,
) -> T:
    """Run ``work`` on an up-to-date database; an unreachable or unreadable one is an ArbiterError
    (the command exits 2), never a traceback with the URL's password in it."""
    try:
        engine, store = open_store(settings, public_keys)
    except ArgumentError:
        raise ConfigError("ARBITER_DATABASE_URL is not a database URL") from None
    try:
        await require_head(engine)
        return await work(engine, store)
    except (SQLAlchemyError, OSError) as exc:
        orig = getattr(exc, "orig", None)
        detail = str(orig if orig is not None else exc).splitlines()[0][:300]
        raise AuditStoreUnreadable(f"cannot read the audit log at {_safe_url(settings)}: {detail}") from None
    finally:
        await engine.dispose()


def _safe_url(settings: Settings) -> str:
    try:
        return make_url(settings.database_url).render_as_string(hide_password=True)
    except ArgumentError:
        return "ARBITER_DATABASE_URL"


@dataclass(frozen=True)
class DatabaseReport:
    report: Report
    head: Head


async def verify_database(settings: Settings, public_keys: list[str] | None = None) -> DatabaseReport:
    async def run(_: AsyncEngine, store: AuditStore) -> DatabaseReport:
        head = await store.head()
        return DatabaseReport(await store.verify(), head)

    return await with_store(settings, run, public_keys)


async def purge_now(settings: Settings) -> int:
    if settings.audit.retention_days is None:
        raise InvalidInput(
            "audit.retention_days is not set (ARBITER_AUDIT__RETENTION_DAYS): without a retention "
            "period there is nothing to purge"
        )
    actor: dict[str, object] = {"subject": f"cli:{_os_user()}", "auth_method": "cli", "source_ip": None}

    async def run(_: AsyncEngine, store: AuditStore) -> int:
        return await purge_expired(store, settings.audit, actor)

    return await with_store(settings, run)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        return f"uid-{os.getuid()}"


@dataclass
class Exported:
    records: int | None = None  # None for CSV, whose rows a line count would get wrong
    bytes: int = 0


async def export(
    settings: Settings,
    fmt: str,
    out: Path | None,
    filters: Filters,
    order: Order = "asc",
    from_seq: int | None = None,
    to_seq: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Exported:
    """Write an export to ``out`` (atomically: a failed export leaves no file) or to stdout;
    ``progress`` is told of each chunk's lines as they are written."""
    if fmt not in ("jsonl", "csv", "bundle"):
        raise InvalidInput(f"--format must be jsonl, csv or bundle; got {fmt!r}")
    if fmt == "bundle" and (filters != Filters() or order != "asc"):
        raise InvalidInput(
            "a bundle is a contiguous range of the chain: use --from-seq/--to-seq, not filters"
        )
    if fmt != "bundle" and (from_seq is not None or to_seq is not None):
        raise InvalidInput("--from-seq/--to-seq select a bundle's range; jsonl and csv take filters")

    async def run(engine: AsyncEngine, store: AuditStore) -> Exported:
        chunks: AsyncIterator[str]
        if fmt == "bundle":
            plan = await plan_bundle(engine, store, from_seq, to_seq)
            chunks = bundle_chunks(engine, plan)
        elif fmt == "jsonl":
            chunks = jsonl_chunks(engine, filters, order=order)
        else:
            chunks = csv_chunks(engine, filters, order=order)
        return await _write(chunks, out, fmt, progress)

    return await with_store(settings, run)


async def _write(
    chunks: AsyncIterator[str], out: Path | None, fmt: str, progress: Callable[[int], None] | None = None
) -> Exported:
    done = Exported(records=None if fmt == "csv" else 0)

    def account(chunk: str) -> None:
        if progress is not None:
            progress(chunk.count("\n"))
        done.bytes += len(chunk.encode("utf-8"))
        if fmt == "jsonl" and done.records is not None:
            done.records += chunk.count("\n")
        elif fmt == "bundle" and done.records is not None:
            done.records += sum(line.startswith('{"type":"record"') for line in chunk.split("\n"))

    if out is None:
        async for chunk in chunks:
            try:
                await anyio.to_thread.run_sync(_emit, sys.stdout, chunk)
            except BrokenPipeError:
                # The reader went away (`| head`): stop quietly, and keep the interpreter's final
                # flush from complaining about the same closed pipe.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return done
            account(chunk)
        return done
    partial = out.with_name(out.name + ".partial")
    f = await _on_file(out, _create, partial)
    try:
        with f:
            async for chunk in chunks:
                await _on_file(out, _emit, f, chunk)
                account(chunk)
        await _on_file(out, os.replace, partial, out)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return done


async def _on_file(out: Path, work: Callable[..., T], *args: object) -> T:
    # The output file's errors are the caller's input (a bad path, a full disk), not the database's.
    try:
        return await anyio.to_thread.run_sync(work, *args)
    except OSError as exc:
        raise InvalidInput(f"cannot write {out}: {exc.strerror or exc}") from None


def _create(path: Path) -> IO[str]:
    # Owner-only: records are redacted, but still say who did what.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return open(fd, "w", encoding="utf-8", newline="")


def _emit(stream: IO[str], chunk: str) -> None:
    stream.write(chunk)
    stream.flush()


def describe(report: Report, what: str) -> list[str]:
    """A verification in words, for a person at a terminal."""
    lines: list[str] = []
    span = f"seq {report.first_seq}..{report.last_seq}" if report.records else "no records"
    if report.ok:
        lines.append(f"OK: {what}: {report.records} records ({span}); the chain is intact")
    else:
        lines.append(
            f"BROKEN: {what}: {report.problem_count} problem(s) in {report.records} records ({span})"
        )
        first = report.problems[0]
        lines.append(f"first broken record: seq {first.seq} ({first.kind}): {first.message}")
        for p in report.problems[1:_SHOWN_PROBLEMS]:
            lines.append(f"  then seq {p.seq} ({p.kind}): {p.message}")
        if report.problem_count > _SHOWN_PROBLEMS:
            lines.append(f"  … and {report.problem_count - _SHOWN_PROBLEMS} more (--json lists up to 100)")
    unchecked = f", {report.checkpoints_unchecked} not checked" if report.checkpoints_unchecked else ""
    lines.append(
        f"checkpoints: {report.checkpoints_valid} valid, {report.checkpoints_invalid} invalid, "
        f"{report.checkpoints_unsigned} unsigned{unchecked}"
    )
    signed = report.last_signed_seq
    if not report.signatures_checked:
        lines.append(f"signatures not checked: {NO_KEY_HINT}")
    elif report.last_seq is not None:
        if signed is None:
            lines.append(
                "no record is covered by a valid signature: only the chain's internal consistency was "
                "checked (anyone who can write the records could have rebuilt it)"
            )
        elif signed < report.last_seq:
            lines.append(
                f"records {signed + 1}..{report.last_seq} are not yet covered by a signed checkpoint"
            )
    if isinstance(report, BundleReport):
        ids = ", ".join(report.key_ids) or "none"
        lines.append(f"keys ({'from the bundle' if report.keys_source == 'bundle' else 'given'}): {ids}")
        if report.keys_source == "bundle":
            lines.append(f"note: {SELF_KEYS_NOTE}")
    return lines

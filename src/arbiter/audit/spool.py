"""The local spool: an append-only JSON-lines file that holds rendered records while the store is down.

Each process appends to its own file (``spool-<uuid7>.jsonl``) and holds an exclusive ``flock`` on it,
so a replica replaying the directory (at start-up, or when the store returns) never takes a file
another live process is still writing. Lines are fsynced per batch; a torn last line (a crash mid-write)
is skipped with a warning. Replays skip ids the store already has, so a crash between storing a file's
records and deleting it doubles nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any

import anyio.to_thread

from arbiter.audit.record import canonical, scrub, uuid7

log = logging.getLogger(__name__)

Append = Callable[[Sequence[dict[str, Any]]], Awaitable[int]]


class Spool:
    def __init__(self, directory: Path, batch: int = 500) -> None:
        self._dir = directory
        self._batch = batch
        self._file: IO[str] | None = None
        self._path: Path | None = None
        self.records = 0  # records this process spooled and has not replayed yet

    @property
    def active(self) -> bool:
        """Whether this process has spooled records not yet back in the store (new ones must follow
        them into the spool, so the chain keeps roughly the order calls were made in)."""
        return self.records > 0

    async def write(self, bodies: Sequence[dict[str, Any]]) -> None:
        lines = "".join(canonical(_unsealed(b)) + "\n" for b in bodies)
        try:
            lines.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a client: spooled as U+FFFD, never lost
            lines = "".join(canonical(_unsealed(scrub(b))) + "\n" for b in bodies)
        await anyio.to_thread.run_sync(self._write, lines)
        self.records += len(bodies)

    def _write(self, lines: str) -> None:
        if self._file is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._path = self._dir / f"spool-{uuid7()}.jsonl"
            # Owner-only: records are redacted, but still say who did what.
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            f = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - held open for the process
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._file = f
        self._file.write(lines)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def close(self) -> None:
        """Release our file (and its lock) so the next start, or another replica, can replay it."""
        if self._file is not None:
            await anyio.to_thread.run_sync(self._file.close)
            self._file = None

    def pending_files(self) -> list[Path]:
        if not self._dir.is_dir():
            return []
        return sorted(self._dir.glob("spool-*.jsonl"))

    async def replay(self, append: Append) -> int:
        """Move every spooled record this process can lock into the store; returns how many.

        Raises whatever ``append`` raises (the store is still down): the file stays for next time.
        """
        await self.close()  # our own file is replayed below like any other
        total = 0
        for path in await anyio.to_thread.run_sync(self.pending_files):
            total += await self._replay_file(path, append)
        self.records = 0
        return total

    async def _replay_file(self, path: Path, append: Append) -> int:
        try:
            f = await anyio.to_thread.run_sync(_open_locked, path)
        except FileNotFoundError:
            return 0  # another replica replayed it first
        if f is None:
            return 0  # a live process is writing it
        try:
            bodies = await anyio.to_thread.run_sync(_read, f, path)
            stored = 0
            for start in range(0, len(bodies), self._batch):
                stored += await append(bodies[start : start + self._batch])
            await anyio.to_thread.run_sync(path.unlink)
            log.info(
                "audit spool %s replayed: %d records stored (%d already present)",
                path.name,
                stored,
                len(bodies) - stored,
            )
            return stored
        finally:
            await anyio.to_thread.run_sync(f.close)


def _unsealed(body: dict[str, Any]) -> dict[str, Any]:
    # A record's place in the chain is decided when it is finally stored.
    return {k: v for k, v in body.items() if k not in ("seq", "prev_hash")}


def _open_locked(path: Path) -> IO[bytes] | None:
    f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    if not path.exists():  # replayed and deleted between our listing and our lock
        f.close()
        raise FileNotFoundError(path)
    return f


def _read(f: IO[bytes], path: Path) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    for number, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        try:
            # Decoded per line: a crash can cut a line inside a multi-byte character.
            value: Any = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            log.warning("audit spool %s line %d is torn (a crash mid-write?); skipped", path.name, number)
            continue
        if isinstance(value, dict) and isinstance(value.get("id"), str):  # pyright: ignore[reportUnknownMemberType]
            bodies.append(value)  # pyright: ignore[reportUnknownArgumentType]
        else:
            log.warning("audit spool %s line %d is not a record; skipped", path.name, number)
    return bodies

"""Run the installed ``arbiter`` command as a user would: a subprocess with only the given ARBITER_*."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The last stderr line: the one-line error (the resolved settings come before it)."""
        lines = self.err.strip().splitlines()
        return lines[-1] if lines else ""


def arbiter(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> Ran:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "arbiter.cli", *args],
        env={**clean, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Ran(proc.returncode, proc.stdout, proc.stderr)

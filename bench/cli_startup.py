"""How long ``arbiter --help`` and ``arbiter --version`` take, as a user's shell runs them.

    .venv/bin/python bench/cli_startup.py [--runs 10]

Prints the median and the worst of ``--runs`` fresh processes for each. The line the CLI must hold
(no database driver, SDK server or policy engine imported for help) is a test:
tests/cli/test_cli_startup.py; the time itself depends on the machine, so it is measured here.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def measure(args: list[str], runs: int) -> list[float]:
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "arbiter.cli", *args], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description="Time arbiter --help and --version.")
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    measure(["--version"], 1)  # warm the file cache once
    python = [sys.executable, "-c", "pass"]
    bare: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(python, check=True)
        bare.append(time.perf_counter() - start)
    print(f"{'command':<24} {'median':>8} {'worst':>8}")
    print(f"{'python -c pass':<24} {statistics.median(bare) * 1000:>6.0f}ms {max(bare) * 1000:>6.0f}ms")
    for args in (["--version"], ["--help"], ["audit", "--help"]):
        times = measure(args, runs)
        label = "arbiter " + " ".join(args)
        print(f"{label:<24} {statistics.median(times) * 1000:>6.0f}ms {max(times) * 1000:>6.0f}ms")


if __name__ == "__main__":
    main()

"""`bench/run.py --quick` end to end: real servers on loopback, a few requests each, the results files.

Needs no peer virtualenv (the peers are not selected). Arbiter on PostgreSQL + Redis is measured when
both are reachable (CI requires them), and reported as skipped otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[2]
ARBITER = ("arbiter-min", "arbiter-gov", "arbiter-gov-jwt", "arbiter-pg")


def _bench(*args: str) -> None:
    """Run bench/run.py with ``args``; fails the test unless it exits 0."""
    argv = [sys.executable, str(ROOT / "bench" / "run.py"), *args]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=80, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.timeout(90)
def test_quick_run_writes_a_row_per_target_era_and_operation(tmp_path: Path) -> None:
    _bench(
        "--quick",
        "--only",
        "direct,arbiter",
        "--out",
        str(tmp_path),
        "--calls",
        "16",
        "--list-calls",
        "8",
        "--seq-calls",
        "4",
        "--warmup",
        "2",
    )

    data = json.loads((tmp_path / "quick.json").read_text())
    # The load is replayed over aiohttp (bench/raw_load.py), and the proxy has a CPU of its own.
    assert data["config"]["load_client"] == "raw"
    if len(os.sched_getaffinity(0)) >= 2:
        assert data["config"]["pinning"].startswith("proxy on CPU ")
    skipped: dict[str, str] = data["skipped"]
    if REQUIRE_SERVICES:
        assert "arbiter-pg" not in skipped, skipped
    expected = {"direct", *(t for t in ARBITER if t not in skipped)}
    assert set(skipped) <= {"arbiter-pg"}, skipped
    rows = {(r["target"], r["era"], r["op"]) for r in data["rows"]}
    want = {(t, era, op) for t in expected for era in ("2026-07-28", "handshake") for op in ("call", "list")}
    assert rows == want
    for row in data["rows"]:
        assert row["errors"] == 0, row
        assert row["calls_per_s"] > 0, row
        assert row["p50_ms"] > 0, row
        if row["target"] != "direct":
            assert row["proxy_cpu_ms"] is not None and row["rss_after_mb"] > 0, row
    assert not data["problems"], data["problems"]

    ratios = {(r["target"], r["era"], r["op"]): r for r in data["ratios"]}
    if "arbiter-pg" in expected:
        assert ratios[("arbiter-pg", "2026-07-28", "call")]["pg_cpu_vs_sqlite"] is not None

    md = (tmp_path / "quick.md").read_text()
    assert "## tools/call echo" in md and "## tools/list (100 tools)" in md
    for label in data["labels"].values():
        assert md.count(f"| {label} | ") >= 4, label  # both eras, both operations


@pytest.mark.timeout(90)
def test_soak_samples_memory_over_time_and_judges_it_after_warm_up(tmp_path: Path) -> None:
    # `make bench-soak` is --soak 600; a few seconds here: the same code, sampled more often.
    _bench("--soak", "3", "--soak-warmup", "1", "--soak-interval", "0.5", "--out", str(tmp_path))

    data = json.loads((tmp_path / "soak.json").read_text())
    summary, points = data["summary"], data["points"]
    assert summary["calls"] > 0 and summary["errors"] == 0, summary
    assert "git_commit" in summary, summary  # None where git cannot read the checkout
    times = [p["t_s"] for p in points]
    assert times == sorted(times) and times[-1] >= 3, times  # sampled through warm-up and judged time
    assert all(p["rss_mb"] > 0 for p in points)
    after = [p["rss_mb"] for p in points if p["t_s"] >= summary["warmup_s"]]
    assert summary["rss_max_mb"] == max(after) and summary["rss_min_mb"] == min(after), summary
    expected = max(((r - summary["rss_warm_mb"]) / summary["rss_warm_mb"] * 100 for r in after), key=abs)
    assert summary["max_deviation_pct"] == pytest.approx(expected)
    assert summary["flat"] == (abs(expected) <= 5.0)
    md = (tmp_path / "soak.md").read_text()
    assert f"Arbiter at commit {summary['git_commit'] or '?'}" in md
    assert md.count("\n| ") == len(points) + 1  # a row per sample, and the header

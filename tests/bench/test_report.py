"""The benchmark report's ratios: the paired CPU ratio is taken within each repetition, so the
machine's drift between rounds does not move it, where the ratio of medians does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from report import Report, Sample, markdown  # pyright: ignore[reportMissingImports]


def _sample(target: str, rep: int, cpu: float) -> Sample:
    return Sample(
        target=target,
        mode="auto",
        op="call",
        rep=rep,
        protocol="2026-07-28",
        calls=1000,
        errors=0,
        seconds=1.0,
        calls_per_s=1000.0 / cpu,
        proxy_cpu_ms=cpu,
        upstream_cpu_ms=0.4,
        client_cpu_ms=0.2,
        seq_calls=200,
        seq_errors=0,
        p50_ms=2.0,
        p95_ms=3.0,
        p99_ms=4.0,
        rss_before_mb=100.0,
        rss_after_mb=101.0,
    )


def test_paired_ratios_follow_each_round_where_the_ratio_of_medians_does_not() -> None:
    # The machine slows down round by round for SQLite's runs; PostgreSQL's last run came on a quick spell.
    gov = [1.0, 2.0, 3.0]
    pg = [1.1, 2.2, 1.65]
    bare = [2.0, 4.0, 6.0]
    samples = [
        _sample(target, rep, cpu)
        for target, cpus in (("bare", bare), ("arbiter-gov", gov), ("arbiter-pg", pg))
        for rep, cpu in enumerate(cpus)
    ]
    labels = {"bare": "bare", "arbiter-gov": "gov", "arbiter-pg": "pg"}
    report = Report(config={}, labels=labels, samples=samples)
    ratios = {r["target"]: r for r in report.ratios()}
    assert ratios["arbiter-pg"]["pg_cpu_vs_sqlite"] == pytest.approx(1.65 / 2.0)
    assert ratios["arbiter-pg"]["pg_cpu_vs_sqlite_paired"] == pytest.approx(1.1)
    assert ratios["arbiter-gov"]["cpu_vs_bare"] == pytest.approx(0.5)
    assert ratios["arbiter-gov"]["cpu_vs_bare_paired"] == pytest.approx(0.5)
    assert "pg_cpu_vs_sqlite_paired" not in ratios["arbiter-gov"]
    assert "| pg | 2026-07-28 | call | 0.41x (0.55x) |" in markdown(report, "bench/run.py")
    assert "0.82x (1.10x) |" in markdown(report, "bench/run.py")


def test_a_repetition_missing_on_one_side_is_left_out_of_the_pairing() -> None:
    samples = [_sample("bare", 0, 2.0), _sample("arbiter-gov", 0, 1.0), _sample("arbiter-gov", 1, 9.0)]
    report = Report(config={}, labels={}, samples=samples)
    (gov,) = report.ratios()
    assert gov["cpu_vs_bare_paired"] == pytest.approx(0.5)

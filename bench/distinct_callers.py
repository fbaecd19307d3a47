"""Policy decisions per second as the number of distinct callers grows (issue 10, finding 11).

Run: ``.venv/bin/python bench/distinct_callers.py [--callers 50000] [--window 1000] [--engine PATH]``.
Every caller is a new JWT subject with the same roles and tenant, making the calls one ``tools/call``
makes (a decision and a visibility check) on a few tools, with the demo policy plus role links, a
deny rule and argument conditions. It prints decisions per second of CPU and allocated blocks for the
first and the last window of callers. ``--engine`` loads ``PolicyEngine`` from another copy of
``engine.py`` (e.g. an older version saved aside) to compare.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from arbiter.auth.principal import Principal
from arbiter.policies.rules import parse_csv

EXTRA = """
p, role:support-agent, *, crm/refund, call, allow, r.args.amount <= 100
p, role:support-agent, *, crm/*, call, deny, r.args.force == True
g, role:support-lead, role:support-agent
g, role:oncall-lead, role:support-lead, acme
"""
CALLS_PER_CALLER = 8


def load_engine(path: str | None) -> Any:
    if path is None:
        from arbiter.policies.engine import PolicyEngine

        return PolicyEngine
    spec = importlib.util.spec_from_file_location("arbiter.policies._bench_engine", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.PolicyEngine


def caller_calls(engine: Any) -> Callable[[int], None]:
    def calls(i: int) -> None:
        who = Principal(f"agent-{i}", "https://idp.example", "jwt", "acme", frozenset({"oncall-lead"}))
        for obj, args in (("crm/refund", {"amount": 5}), ("crm/get_customer", {"customer_id": "C-1"})):
            engine.decide(who, obj, "call", args)
            engine.visible(who, obj, "call")
        engine.decide(who, "crm/delete_customer", "call", {"force": i % 2 == 0})
        engine.visible(who, "crm/delete_customer", "call")
        engine.decide(who, "kb/search_docs", "call", {"query": "x"})
        engine.visible(who, "kb/search_docs", "call")

    return calls


def window(calls: Callable[[int], None], start: int, size: int) -> tuple[float, float]:
    """Decisions per CPU second, and allocated blocks left per caller, over callers start..start+size."""
    gc.collect()
    blocks = sys.getallocatedblocks()
    began = time.process_time()
    for i in range(start, start + size):
        calls(i)
    spent = time.process_time() - began
    gc.collect()
    return size * CALLS_PER_CALLER / spent, (sys.getallocatedblocks() - blocks) / size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=50_000)
    parser.add_argument("--window", type=int, default=1_000)
    parser.add_argument("--engine", help="path of an engine.py to load PolicyEngine from")
    opts = parser.parse_args()
    text = (files("arbiter.policies") / "demo.csv").read_text(encoding="utf-8") + EXTRA
    engine = load_engine(opts.engine)(parse_csv(text), 1)
    calls = caller_calls(engine)
    first = window(calls, 0, opts.window)
    began = time.process_time()
    for i in range(opts.window, opts.callers - opts.window):
        calls(i)
    middle = time.process_time() - began
    last = window(calls, opts.callers - opts.window, opts.window)
    print(f"engine: {opts.engine or 'arbiter.policies.engine'}; {CALLS_PER_CALLER} calls per caller")
    print(f"callers 1..{opts.window}: {first[0]:10.0f} calls/s CPU, {first[1]:7.1f} blocks kept per caller")
    print(
        f"callers {opts.callers - opts.window + 1}..{opts.callers}: "
        f"{last[0]:10.0f} calls/s CPU, {last[1]:7.1f} blocks kept per caller"
    )
    print(f"callers in between: {middle:.1f} s CPU")


if __name__ == "__main__":
    main()

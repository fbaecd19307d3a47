"""CPU cost of the policy step: a cached decision, an uncached one, and filtering a tools list.

Run: ``.venv/bin/python bench/policy_cost.py``. Uses the demo policy plus conditional rules, so the
uncached figure includes Casbin scanning every rule and evaluating argument conditions.
"""

from __future__ import annotations

import time
from importlib.resources import files

from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import parse_csv

EXTRA = """
p, role:support-agent, *, crm/refund, call, allow, r.args.amount <= 100
p, role:support-agent, *, crm/*, call, deny, r.args.force == True
"""


def per_call_us(fn: object, n: int) -> float:
    assert callable(fn)
    start = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    text = (files("arbiter.policies") / "demo.csv").read_text(encoding="utf-8") + EXTRA
    rules = parse_csv(text)
    sub = Subject("alice", "acme", ("support-agent",))
    engine = PolicyEngine(rules, 1)
    engine.decide(sub, "crm/refund", "call", {"amount": 5})
    cached = per_call_us(lambda _: engine.decide(sub, "crm/refund", "call", {"amount": 5}), 20_000)
    uncached = per_call_us(lambda i: engine.decide(sub, "crm/refund", "call", {"amount": i}), 2_000)
    # A tool no conditional rule names: new arguments still hit the cache.
    plain = per_call_us(lambda i: engine.decide(sub, "kb/search_docs", "call", {"query": str(i)}), 20_000)
    tools = [f"crm/tool_{i}" for i in range(100)]
    for obj in tools:
        engine.visible(sub, obj, "call")
    listing = per_call_us(lambda _: [engine.visible(sub, obj, "call") for obj in tools], 2_000)
    print(f"{len(rules)} rules")
    print(f"decision, cached:               {cached:8.1f} us CPU")
    print(f"decision, new arguments:        {uncached:8.1f} us CPU (a tool with a conditional rule)")
    print(f"decision, new arguments:        {plain:8.1f} us CPU (a tool without one)")
    print(f"filter a 100-tool list, cached: {listing:8.1f} us CPU")


if __name__ == "__main__":
    main()

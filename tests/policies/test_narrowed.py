"""A decision that reads the arguments is taken by Casbin over only the rules whose action, object,
tenant and subject match (``PolicyEngine._narrowed``); it must be the decision, rule included, that
Casbin's scan of the whole policy gives. Random policies and requests pin the two to each other."""

from __future__ import annotations

import gc
import random
import sys
import threading
import weakref
from typing import Any

from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import Rule

SUBJECTS = ["*", "role:support", "role:manager", "role:sales", "user:alice", "user:bob"]
TENANTS = ["*", "acme", "globex"]
OBJECTS = ["crm/*", "crm/get_*", "crm/refund", "kb/*", "*", "billing/refund"]
CONDITIONS = [
    "",
    "",
    "r.args.amount > 100",
    "r.args.amount <= 500",
    "r.args.region == r.sub.tenant",
    "r.args.force == True",
    "'limit' not in r.args or r.args.limit <= 10",
    "r.tool.readOnlyHint == True",
    "r.sub.subject == 'alice'",
]
CALLERS = [
    Subject("alice", "acme", ("support",)),
    Subject("bob", "globex", ("manager",)),
    Subject("carol", "acme", ("sales", "support")),
    Subject("dave", "initech", ()),
    Subject("erin", "globex", ("lead",)),
]
TARGETS = ["crm/refund", "crm/get_customer", "kb/search", "billing/refund", "crm/delete"]
ARGS: list[dict[str, Any]] = [
    {},
    {"amount": 50},
    {"amount": 200, "region": "acme"},
    {"amount": 900, "force": True, "limit": 5},
    {"region": "globex", "limit": 50},
    {"amount": "text"},  # a comparison that cannot be evaluated
]


def _policy(rng: random.Random) -> list[Rule]:
    rules: list[Rule] = []
    for _ in range(rng.randint(4, 24)):
        make = rng.choice([Rule.allow, Rule.allow, Rule.deny, Rule.approve])
        sub, obj, dom, cond = (rng.choice(x) for x in (SUBJECTS, OBJECTS, TENANTS, CONDITIONS))
        rule = make(sub, obj, "call", dom=dom, cond=cond)
        if rule not in rules:
            rules.append(rule)
    rules.append(Rule("g", ("role:manager", "role:support", "*")))
    rules.append(Rule("g", ("role:lead", "role:manager", "globex")))
    return rules


def _full_scan(engine: PolicyEngine) -> PolicyEngine:
    # The same engine's decisions with every call scanning the whole policy, as before narrowing.
    engine._narrowed = lambda *_: engine._enforcer  # type: ignore[method-assign]  # pyright: ignore[reportPrivateUsage, reportAttributeAccessIssue]
    return engine


def test_narrowed_decisions_are_the_full_scans() -> None:
    rng = random.Random(1207)
    compared = narrowed_used = 0
    for seed in range(30):
        rules = _policy(rng)
        engine, reference = PolicyEngine(rules, seed), _full_scan(PolicyEngine(rules, seed))
        for caller in CALLERS:
            for obj in TARGETS:
                for args in ARGS:
                    for hints in (None, {"readOnlyHint": True}):
                        got = engine.decide(caller, obj, "call", args, hints)
                        want = reference.decide(caller, obj, "call", args, hints)
                        assert got == want, (rules, caller, obj, args, hints)
                        compared += 1
        narrowed_used += engine.cache_sizes()["narrowed"]
    assert compared == 30 * len(CALLERS) * len(TARGETS) * len(ARGS) * 2
    assert narrowed_used > 50  # the narrowed path really decided most of these


def test_evaluators_are_not_shared_between_threads() -> None:
    # Conditions are evaluated by one reused evaluator per thread: decisions taken on several threads at
    # once (the impact preview decides on worker threads) must each read their own arguments.
    rules = [Rule.allow("role:support", "crm/refund", "call", cond="r.args.amount <= 100")]
    engines = [PolicyEngine(rules, 1) for _ in range(4)]
    caller = Subject("alice", "acme", ("support",))
    wrong: list[tuple[int, bool]] = []
    start = threading.Barrier(len(engines))

    def decide(engine: PolicyEngine, offset: int) -> None:
        start.wait()
        for i in range(2000):
            amount = (i * 7 + offset) % 200
            if engine.decide(caller, "crm/refund", "call", {"amount": amount}).allowed != (amount <= 100):
                wrong.append((amount, not amount <= 100))

    threads = [threading.Thread(target=decide, args=(e, n)) for n, e in enumerate(engines)]
    # Switch threads as often as the interpreter can, so an evaluator shared between them would be
    # caught between setting one call's names and evaluating them.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []


def test_objects_under_the_same_rules_share_one_narrowed_enforcer() -> None:
    # resources/read names a new object for every URI: the enforcer is chosen by the rules that could
    # match, not by the object, so a thousand URIs build one.
    rules = [
        Rule.allow("role:support", "fs/file:*", "read", cond="r.sub.tenant == 'acme'"),
        Rule.deny("*", "fs/file:///etc/*", "read"),
        *(Rule.allow("role:support", f"crm/tool_{i}", "call") for i in range(20)),
    ]
    engine = PolicyEngine(rules, 1)
    caller = Subject("alice", "acme", ("support",))
    for i in range(1000):
        assert engine.decide(caller, f"fs/file:///srv/doc-{i}.txt", "read", {"n": i}).allowed
    assert not engine.decide(caller, "fs/file:///etc/passwd", "read", {"n": 0}).allowed
    assert engine.cache_sizes()["narrowed"] == 2  # the /srv URIs' rule set, and /etc's


class _Args(dict[str, Any]):
    """Arguments that can be watched with a weak reference."""


def test_no_evaluator_keeps_a_calls_arguments_alive() -> None:
    rules = [Rule.allow("role:support", "crm/refund", "call", cond="r.args.amount <= 100")]
    engine = PolicyEngine(rules, 1)
    args = _Args(amount=5, note="x" * 100_000)
    watch = weakref.ref(args)
    assert engine.decide(Subject("alice", "acme", ("support",)), "crm/refund", "call", args).allowed
    del args
    gc.collect()
    assert watch() is None

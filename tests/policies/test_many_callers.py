"""Per-decision work and memory do not grow with the number of distinct callers (issue 10, finding 11).

Role links are followed in the engine's own map of the ``g`` rules, never in pycasbin's role manager
(which made every caller a node of its role graph and scanned them all on each decision), and
callers the policy cannot tell apart share cached decisions. The first test pins the engine's answers
to Casbin's own role manager on random policies, so the shortcut changes no decision.
"""

from __future__ import annotations

import gc
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from casbin.core_enforcer import EnforceContext
from casbin.rbac.default_role_manager.role_manager import DomainManager, RoleManager

import arbiter.policies.engine as engine_module
from arbiter.auth.principal import Principal
from arbiter.limits.backend import BucketSpec, Plan
from arbiter.limits.memory import MemoryBackend
from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import Rule, parse_csv

VISIBILITY = EnforceContext(rtype="r", ptype="p", etype="e", mtype="m2")

POLICY = """\
p, role:support, *, kb/*, call, allow
p, role:support, *, crm/get_*, call, allow
p, role:support, *, crm/delete_customer, call, deny
p, role:support, *, crm/create_ticket, call, allow, r.args.priority in ("low", "normal")
p, role:support, *, crm/list_tickets, call, allow, r.args.region == r.sub.tenant
p, role:manager, *, crm/delete_customer, call, allow
p, role:sales, acme, crm/*, call, allow
p, user:alice, *, crm/*, call, allow
p, *, *, billing/refund, call, deny, r.args.amount > 1000
g, role:manager, role:support
g, role:lead, role:manager, acme
g, user:carol, role:manager
"""


def _reference(rules: list[Rule]) -> Any:
    """A Casbin enforcer that matches subjects through pycasbin's role manager, as Arbiter once did."""
    enforcer: Any = PolicyEngine(rules, 0)._enforcer  # pyright: ignore[reportPrivateUsage]

    def match(sub: Subject, pattern: str, tenant: str) -> bool:
        if pattern == "*":
            return True
        rm = enforcer.get_role_manager()
        return any(rm.has_link(identity, pattern, tenant) for identity in sub.identities)

    enforcer.add_function("subjectMatch", match)
    return enforcer


def _random_policy(rng: random.Random) -> list[Rule]:
    roles = [f"role:r{i}" for i in range(6)]
    members = roles + [f"user:u{i}" for i in range(3)]
    tenants = ["*", "*", "t0", "t1"]
    conditions = [
        "",
        "",
        "",
        "r.args.n > 1",
        "r.sub.tenant == 't0'",
        "'r1' in r.sub.roles",
        "r.sub.subject == 'u1'",
        "r.args.n > 1 and r.args.t == r.sub.tenant",
        "r.sub == r.sub",
    ]
    rules: set[Rule] = set()
    for _ in range(rng.randint(0, 10)):  # cycles included: Casbin and the engine must agree on them too
        member, role = rng.choice(members), rng.choice(roles)
        if member != role:
            rules.add(Rule.role(member, role, rng.choice(tenants)))
    for _ in range(rng.randint(1, 10)):
        sub = rng.choice(["*", *members])
        obj = rng.choice(["crm/a", "crm/b", "crm/*", "kb/?"])
        act, cond = rng.choice(["call", "list"]), rng.choice(conditions)
        make = rng.choice([Rule.allow, Rule.deny])
        rules.add(make(sub, obj, act, rng.choice(tenants), cond))
    return sorted(rules, key=lambda r: (r.ptype, r.values))


def test_decisions_match_casbins_role_manager_on_random_policies() -> None:
    rng = random.Random(11)
    for _ in range(100):
        rules = _random_policy(rng)
        engine, reference = PolicyEngine(rules, 1), _reference(rules)
        for _ in range(40):
            roles = tuple(sorted(rng.sample([f"r{i}" for i in range(7)], rng.randint(0, 3))))
            sub = Subject(f"u{rng.randint(0, 4)}", rng.choice(["t0", "t1", "t2", ""]), roles)
            obj, act = rng.choice(["crm/a", "crm/b", "kb/x"]), rng.choice(["call", "list"])
            args = {"n": rng.randint(0, 2), "t": rng.choice(["t0", "t1"])}
            allowed, explain = reference.enforce_ex(sub, sub.tenant, obj, act, args)
            decision = engine.decide(sub, obj, act, args)
            context = (rules, sub, obj, act, args)
            assert decision.allowed == allowed, context
            assert decision.rule == (Rule("p", tuple(explain)) if explain else None), context
            seen = any(reference.enforce(VISIBILITY, sub, sub.tenant, obj, a, {}) for a in (act, "list"))
            assert engine.visible(sub, obj, act) == seen, context
            for member in ("role:r0", "user:u0"):
                for tenant in ("*", "t0"):
                    expected = reference.get_role_manager().get_roles(member, tenant)
                    assert sorted(engine.roles_of(member, tenant)) == sorted(expected)


def test_role_chains_stop_where_casbin_stops() -> None:
    # Validation refuses chains this deep; the engine still answers exactly as Casbin would.
    rules = [Rule.role(f"role:c{i}", f"role:c{i + 1}") for i in range(12)]
    rules += [Rule.allow(f"role:c{i}", f"kb/c{i}", "call") for i in range(13)]
    engine, reference = PolicyEngine(rules, 1), _reference(rules)
    sub = Subject("deep", "acme", ("c0",))
    expected = [reference.enforce(sub, "acme", f"kb/c{i}", "call", {}) for i in range(13)]
    assert [engine.decide(sub, f"kb/c{i}", "call").allowed for i in range(13)] == expected
    assert expected == [True] * 10 + [False] * 3  # the member itself and nine links up


def _callers(n: int, start: int = 0) -> Iterator[Principal]:
    for i in range(start, n):
        yield Principal(
            f"agent-{i}", "https://idp.example", "jwt", "acme", frozenset({"lead"}), client_id="c"
        )


def _drive(engine: PolicyEngine, callers: Iterator[Principal]) -> None:
    for i, principal in enumerate(callers):
        assert engine.decide(principal, "crm/get_customer", "call").allowed
        denied = engine.decide(principal, "crm/delete_customer", "call")
        assert (denied.allowed, denied.reason) == (False, "denied_by_rule")
        priority = ("low", "high")[i % 2]
        assert engine.decide(principal, "crm/create_ticket", "call", {"priority": priority}).allowed is (
            priority == "low"
        )
        assert engine.decide(principal, "crm/list_tickets", "call", {"region": "acme"}).allowed
        assert not engine.decide(principal, "billing/refund", "call", {"amount": 5000}).allowed
        assert engine.visible(principal, "kb/search", "call")
        assert not engine.visible(principal, "ops/page", "call")


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Callable[[PolicyEngine], dict[str, int]]:
    """Counts evaluations of the matcher by an engine's enforcer and every call into the role manager."""
    counts = {"evaluations": 0, "role_manager": 0}

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for cls, method in [
        (DomainManager, "has_link"),
        (DomainManager, "get_roles"),
        (RoleManager, "_get_role"),
        (RoleManager, "_matching_roles"),
    ]:
        monkeypatch.setattr(cls, method, counting("role_manager", getattr(cls, method)))

    def attach(engine: PolicyEngine) -> dict[str, int]:
        # Every enforcer the engine decides with: its own, and those it narrows to a target's rules.
        enforcer: Any = engine._enforcer  # pyright: ignore[reportPrivateUsage]
        monkeypatch.setattr(type(enforcer), "enforce_ex", counting("evaluations", type(enforcer).enforce_ex))
        return counts

    return attach


def _role_nodes(engine: PolicyEngine) -> int:
    rm: Any = engine._enforcer.get_role_manager()  # pyright: ignore[reportPrivateUsage]
    return len(rm.rm_map) + sum(len(m.all_roles) for m in rm.rm_map.values())


def test_work_and_memory_stay_flat_from_one_to_fifty_thousand_callers(
    counted: Callable[[PolicyEngine], dict[str, int]],
) -> None:
    engine = PolicyEngine(parse_csv(POLICY), 1)
    counts = counted(engine)
    _drive(engine, _callers(2))  # both argument variants of the conditional rule seen once
    evaluations, sizes = counts["evaluations"], engine.cache_sizes()
    assert evaluations > 0 and sizes["decisions"] > 0

    _drive(engine, _callers(10_000, start=2))
    # Every later caller is, to this policy, the same caller: no new evaluation, no new entry.
    assert counts["evaluations"] == evaluations
    assert engine.cache_sizes() == sizes

    # Memory in allocated blocks (exact and cheap, where tracemalloc would slow 40,000 callers to a
    # crawl). The role manager used to keep about 50 blocks per caller: two million for these 40,000.
    gc.collect()
    blocks = sys.getallocatedblocks()
    _drive(engine, _callers(50_000, start=10_000))
    gc.collect()
    assert sys.getallocatedblocks() - blocks < 1000
    assert counts["evaluations"] == evaluations
    assert engine.cache_sizes() == sizes
    assert counts["role_manager"] == 0 and _role_nodes(engine) == 0
    assert Subject.of.cache_info().currsize <= 4096  # pyright: ignore[reportFunctionMemberAccess]


def test_a_condition_on_the_caller_keys_by_caller_and_stays_bounded(
    counted: Callable[[PolicyEngine], dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A condition reading r.sub.subject makes every caller distinct for that tool: one evaluation per
    # caller and decision, each over the same rules, in a cache that is capped.
    monkeypatch.setattr(engine_module, "_CACHE_MAX", 1000)
    rules = [*parse_csv(POLICY), Rule.allow("role:support", "crm/own", "call", cond="r.sub.subject != 'x'")]
    engine = PolicyEngine(rules, 1)
    counts = counted(engine)
    per_caller: list[int] = []
    for batch in ((0, 10), (10, 1_000), (1_000, 4_000)):
        before = counts["evaluations"]
        for principal in _callers(batch[1], start=batch[0]):
            assert engine.decide(principal, "crm/own", "call").allowed
            assert engine.decide(principal, "crm/get_customer", "call").allowed  # still shared
        per_caller.append((counts["evaluations"] - before) // (batch[1] - batch[0]))
    assert per_caller == [1, 1, 1]
    assert engine.cache_sizes()["decisions"] <= 1000
    assert counts["role_manager"] == 0 and _role_nodes(engine) == 0


def test_callers_with_different_standing_do_not_share_decisions() -> None:
    engine = PolicyEngine(parse_csv(POLICY), 1)
    lead_acme = Subject("a", "acme", ("lead",))
    lead_globex = Subject("b", "globex", ("lead",))  # role:lead links to manager in acme only
    carol = Subject("carol", "globex", ())  # a manager by name, everywhere
    alice = Subject("alice", "globex", ())
    plain = Subject("zed", "globex", ())
    assert engine.decide(lead_acme, "crm/get_customer", "call").allowed
    assert not engine.decide(lead_globex, "crm/get_customer", "call").allowed
    assert engine.decide(carol, "crm/get_customer", "call").allowed
    assert engine.decide(alice, "crm/get_customer", "call").allowed
    assert not engine.decide(plain, "crm/get_customer", "call").allowed
    # The tenant counts where a rule names it, and where a condition reads it.
    sales = [Subject("s", tenant, ("sales",)) for tenant in ("acme", "globex")]
    assert [engine.decide(s, "crm/anything", "call").allowed for s in sales] == [True, False]
    support = [Subject("t", tenant, ("support",)) for tenant in ("acme", "globex")]
    tickets = [engine.decide(s, "crm/list_tickets", "call", {"region": "acme"}).allowed for s in support]
    assert tickets == [True, False]
    assert engine.roles_of("user:carol") == ["role:manager"]
    assert engine.roles_of("role:lead", "acme") == ["role:manager"]
    assert engine.roles_of("role:lead") == []


def test_in_process_limit_housekeeping_stays_linear_in_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each caller leaves a bucket that still limits it (it refills over an hour), so nothing can be
    # swept; the sweeps must still cost a bounded amount per admission, not grow with the table.
    now = [1_000_000.0]
    backend = MemoryBackend(lambda: now[0])
    walked = [0]
    sweep = backend.sweep

    def counting_sweep(at: float | None = None) -> None:
        walked[0] += sum(backend.sizes().values())
        sweep(at)

    monkeypatch.setattr(backend, "sweep", counting_sweep)
    admits = 100_000
    for i in range(admits):
        now[0] += 0.001
        plan = Plan(buckets=(BucketSpec(f"rl:1:agent-{i}", 10, 1 / 3600),))
        assert backend.admit_now(plan).outcome == "ok"
    assert backend.sizes()["buckets"] == admits  # all still live: kept, as they must be
    # A sweep every 10,000 admits walked 550,000 entries here, and grew quadratically beyond.
    assert walked[0] <= 2 * admits


def test_decisions_on_argument_values_have_a_cache_of_their_own_and_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Agents rarely repeat arguments: a decision keyed by their values is mostly single use. Those fill a
    # smaller cache of their own, never the one every caller's argument-free decisions live in.
    monkeypatch.setattr(engine_module, "_ARGS_CACHE_MAX", 100)
    rules = [*parse_csv(POLICY), Rule.allow("role:support", "crm/echo", "call", cond="r.args.text != 'x'")]
    engine = PolicyEngine(rules, 1)
    sub = Subject("sam", "acme", ("support",))
    engine.decide(sub, "kb/search", "call", {"query": "q"})
    for i in range(1_000):
        assert engine.decide(sub, "crm/echo", "call", {"text": f"t{i}"}).allowed
    sizes = engine.cache_sizes()
    assert sizes["argument_decisions"] == 100
    assert sizes["decisions"] <= 1  # only the argument-free decision
    assert not engine.decide(sub, "crm/echo", "call", {"text": "x"}).allowed

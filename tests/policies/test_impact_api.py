"""``POST /admin/v1/policies/impact``: the console's impact preview, as an API (audit/impact.py)."""

from __future__ import annotations

from tests.conftest import ALLOW_ALL, ArbiterFactory, UpstreamProc
from tests.console.test_console_policies import calls, recorded_calls
from tests.policies.conftest import new_key

CANDIDATE = ALLOW_ALL + "p, user:test-agent, acme, kb/search_docs, call, deny\n"
APPROVE = ALLOW_ALL + "p, user:test-agent, acme, kb/search_docs, call, approve\n"


async def test_the_impact_of_a_candidate_is_counted_per_agent_and_tool_and_needs_both_rights(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory()
    server.register("kb", kb_upstream.url)
    await calls(server, server.agent_key, "kb__search_docs", 3)
    recorded_calls(server, "test-agent", "kb__search_docs", 3)
    with server.admin() as admin:
        found = admin.post("/policies/impact", json={"policy": CANDIDATE})
        assert found.status_code == 200, found.text
        report = found.json()
        assert (report["allow_to_deny"], report["deny_to_allow"], report["undecidable"]) == (3, 0, 0)
        assert report["agents"] == [
            {
                "subject": "test-agent",
                "tenant": "acme",
                "allow_to_deny": 3,
                "deny_to_allow": 0,
                "allow_to_approve": 0,
                "approve_to_allow": 0,
                "approve_to_deny": 0,
                "deny_to_approve": 0,
                "undecidable": 0,
            }
        ]
        assert report["tools"][0]["tool"] == "kb__search_docs" and not report["capped"]
        assert report["samples"][0]["rule_after"] == "p, user:test-agent, acme, kb/search_docs, call, deny"
        assert (report["samples"][0]["before"], report["samples"][0]["after"]) == ("allow", "deny")
        # An approve rule over the same calls: they would wait for a person's yes, not be denied.
        asked = admin.post("/policies/impact", json={"policy": APPROVE}).json()
        assert (asked["allow_to_approve"], asked["allow_to_deny"]) == (3, 0), asked
        assert asked["tools"][0]["allow_to_approve"] == 3 and asked["samples"][0]["after"] == "approve"
        capped = admin.post("/policies/impact", json={"policy": CANDIDATE, "limit": 2}).json()
        assert capped["capped"] and capped["read"] == 2
        empty = admin.post("/policies/impact", json={"policy": CANDIDATE, "until": "2020-01-01"}).json()
        assert (empty["read"], empty["allow_to_deny"]) == (0, 0)
        for bad in (
            {"policy": "p, nobody"},
            {"policy": CANDIDATE, "since": "yesterday"},
            {"policy": CANDIDATE, "limit": 10_001},
        ):
            refused = admin.post("/policies/impact", json=bad)
            assert refused.status_code == 422, refused.text
        assert admin.get("/policies").json()["version"] == 1  # a preview changes nothing

    # Reading the policy is not enough, nor is reading the audit log: a preview shows both.
    admin_rule = "p, role:policy-reader, *, admin/policies, admin:read, allow\n"
    with server.admin() as admin:
        admin.post("/policies/import", content=ALLOW_ALL + admin_rule).raise_for_status()
    for roles in (["policy-reader"], ["auditor"]):
        key = new_key(server, "someone", roles)
        with server.admin(token=key) as other:
            assert other.post("/policies/impact", json={"policy": CANDIDATE}).status_code == 403, roles

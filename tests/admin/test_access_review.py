"""Security review of ``/admin/v1/access``: the API-key inventory (ids, owners, roles, tenants) is
``admin/api-keys``' to show; ``admin:read`` on ``admin/policies`` alone does not reveal it."""

from __future__ import annotations

from tests.admin.test_access import governed, new_key  # noqa: F401  (governed is a fixture)
from tests.conftest import ArbiterServer


def test_a_policy_reader_does_not_enumerate_api_keys(governed: ArbiterServer) -> None:  # noqa: F811
    reader = new_key(governed, "rita", ["policy-reader"])
    agent = new_key(governed, "sam", ["support-agent"], tenant="globex")
    with governed.admin(reader["key"]) as admin:
        assert admin.get("/api-keys").status_code == 403  # the area that guards the inventory
        who = admin.get("/access/who", params={"tool": "kb__get_doc"})
        assert who.status_code == 200, who.text
        assert who.json()["api_keys"] == []
        assert any("admin/api-keys" in w for w in who.json()["warnings"])
        assert who.json()["grants"]  # what the policy says is still the reader's to see
        assert admin.get("/access", params={"key_id": agent["id"]}).status_code == 403
        assert admin.get("/access", params={"role": "support-agent"}).status_code == 200
    with governed.admin() as admin:  # a security admin still gets the keys
        who = admin.get("/access/who", params={"tool": "kb__get_doc"}).json()
        assert agent["id"] in {k["id"] for k in who["api_keys"]}
        assert admin.get("/access", params={"key_id": agent["id"]}).status_code == 200

"""``arbiter access show | who`` as an operator runs them: a subprocess against a real running Arbiter."""

from __future__ import annotations

import json

from tests.admin.test_access import governed, new_key  # noqa: F401  # pyright: ignore[reportUnusedImport]
from tests.cli.helpers import arbiter as run_arbiter
from tests.conftest import ADMIN_TOKEN, ArbiterServer


def _env(server: ArbiterServer) -> dict[str, str]:
    return {"ARBITER_URL": server.base_url, "ARBITER_TOKEN": ADMIN_TOKEN}


def test_show_a_key_as_a_table_and_as_json(governed: ArbiterServer) -> None:  # noqa: F811
    key = new_key(governed, "sam", ["support-agent"])
    ran = run_arbiter("access", "show", "--key-id", key["id"], env=_env(governed))
    assert ran.code == 0, ran.err
    lines = {line.split()[0]: line for line in ran.out.splitlines() if line.strip()}
    assert "allow" in lines["crm__get_customer"]
    assert "30/minute per principal" in lines["crm__get_customer"]
    assert "conditional" in lines["crm__create_ticket"]
    assert 'allowed when r.args.priority in ("low", "normal")' in lines["crm__create_ticket"]
    assert "budget 50/day" in lines["crm__create_ticket"]
    assert "crm__delete_customer" not in lines  # hidden from support agents
    assert "arbiter://kb/kb://index" in lines and "crm__summarize_customer" in lines
    assert key["key"] not in ran.out + ran.err and ADMIN_TOKEN not in ran.out + ran.err

    as_json = run_arbiter("access", "show", "--key-id", key["id"], "--json", env=_env(governed))
    assert as_json.code == 0, as_json.err
    report = json.loads(as_json.out)
    assert report["principal"]["key_id"] == key["id"]
    assert {t["name"] for t in report["tools"]} >= {"crm__get_customer", "crm__create_ticket"}


def test_show_a_role_with_a_typo_warns(governed: ArbiterServer) -> None:  # noqa: F811
    ran = run_arbiter(
        "access", "show", "--role", "suport-agent", "--tenant", "acme", "--url", governed.base_url,
        "--token", ADMIN_TOKEN,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    assert "Tools: none" in ran.out
    assert "warning: no rule mentions role 'suport-agent'; did you mean 'support-agent'?" in ran.err


def test_who(governed: ArbiterServer) -> None:  # noqa: F811
    sam = new_key(governed, "sam", ["support-agent"])
    ran = run_arbiter("access", "who", "crm__get_customer", env=_env(governed))
    assert ran.code == 0, ran.err
    assert "p, user:carol, *, crm/get_customer, call, allow" in ran.out
    assert "support-agent" in ran.out and sam["id"] in ran.out and sam["key"] not in ran.out
    as_json = json.loads(run_arbiter("access", "who", "crm/get_customer", "--json", env=_env(governed)).out)
    assert {(g["kind"], g["name"]) for g in as_json["grants"]} >= {("role", "billing"), ("user", "alice")}


def test_failures_are_one_line(governed: ArbiterServer) -> None:  # noqa: F811
    nothing = run_arbiter("access", "show", env=_env(governed))
    assert nothing.code == 2 and nothing.error.startswith("error: give --key-id")
    unknown = run_arbiter("access", "show", "--key-id", "0123456789abcdef", env=_env(governed))
    assert unknown.code != 0 and "404" in unknown.error and "no API key with id" in unknown.error

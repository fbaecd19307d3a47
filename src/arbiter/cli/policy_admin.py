"""``arbiter policy export | import | dry-run``: the live policy of a running Arbiter, through its admin
API (``policy test`` and ``explain`` in policy.py work on a file or the database directly)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, cast

import typer

from arbiter.cli.client import DEFAULT_URL, AsJson, Token, Url
from arbiter.cli.policy import policy_cli

_RESULTS = [
    ("line", "CASE"),
    ("result", "RESULT"),
    ("expected", "EXPECTED"),
    ("decision", "GOT"),
    ("rule", "RULE"),
]


@policy_cli.command("export")
def policy_export(
    out: Annotated[Path | None, typer.Option(help="Write the CSV to this file (default: stdout)")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """The live policy as a Casbin CSV file, and its version (what `import --expected-version` takes)."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, note

    resp = connect(url, token).request("GET", "/policies/export")
    version = int(resp.headers.get("x-policy-version", "0"))
    text = resp.text
    rules = sum(1 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if out is not None:
        out.write_text(text, encoding="utf-8")
    if as_json:
        emit_json({"version": version, "rules": rules, "policy": text if out is None else str(out)})
        return
    if out is None:
        typer.echo(text, nl=False)
    note(f"policy version {version}, {rules} rules" + (f", written to {out}" if out else ""))


@policy_cli.command("import")
def policy_import(
    file: Annotated[Path, typer.Argument(help="A Casbin CSV policy file (as `policy export` writes)")],
    expected_version: Annotated[
        int,
        typer.Option(
            help="The version you exported or last saw: the import is refused if the policy changed since"
        ),
    ],
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Replace the whole live policy with FILE, all or nothing, if it is still at --expected-version."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json
    from arbiter.cli.policy import read

    text = read(file)
    done = cast(
        dict[str, Any],
        connect(url, token).json(
            "POST",
            "/policies/import",
            params={"expected_version": expected_version},
            content=text,
            content_type="text/csv",
        ),
    )
    if as_json:
        emit_json(done)
    else:
        rules = cast(list[object], done.get("rules") or [])
        typer.echo(f"imported {file}: the policy is now version {done.get('version')} ({len(rules)} rules)")


@policy_cli.command("dry-run")
def policy_dry_run(
    table_file: Annotated[
        Path, typer.Argument(metavar="TABLE", help="Decision table: YAML, or CSV with a header row")
    ],
    candidate: Annotated[
        Path | None,
        typer.Option("--policy", help="A candidate Casbin CSV policy (default: the live policy)"),
    ] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Run TABLE on the server against the live policy, or a candidate, changing nothing; exit 1 if
    any case differs (as `policy test`)."""
    from arbiter.cli.client import connect
    from arbiter.cli.output import emit_json, note, table
    from arbiter.cli.policy import read
    from arbiter.errors import InvalidInput
    from arbiter.policies.tables import parse_table

    # Parsed here first: a bad table is reported with its line before anything is sent.
    cases = parse_table(read(table_file), "csv" if table_file.suffix.lower() == ".csv" else "yaml")
    if not cases:
        raise InvalidInput(f"{table_file} has no cases: an empty table would pass without testing anything")
    rows = [
        {
            "subject": c.subject,
            "roles": list(c.roles),
            "tenant": c.tenant,
            "object": c.object,
            "action": c.action,
            "args": dict(c.args),
            "expected": c.expected,
        }
        for c in cases
    ]
    body: dict[str, Any] = {"cases": rows}
    if candidate is not None:
        body["policy"] = read(candidate)
    found = cast(dict[str, Any], connect(url, token).json("POST", "/policies/dry-run", body=body))
    if as_json:
        emit_json(found)
    else:
        results = cast(list[dict[str, Any]], found.get("results") or [])
        # The server numbers cases from 1 in the order sent; say the table's own lines.
        shown = [
            {
                **r,
                "line": cases[i].line if i < len(cases) else r.get("line"),
                "result": "ok" if r.get("ok") else "FAIL",
            }
            for i, r in enumerate(results)
        ]
        table(shown, _RESULTS)
        source = str(candidate) if candidate else f"live policy version {found.get('policy_version')}"
        note(f"{found.get('passed')} passed, {found.get('failed')} failed ({source})")
    raise typer.Exit(1 if found.get("failed") else 0)

"""Configuration mistakes: each is one line on stderr naming the setting, and exit code 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from arbiter.settings_check import unknown_settings
from tests.cli.helpers import arbiter

CONFIG = 3


@pytest.mark.parametrize("command", ["serve", "migrate", "demo"])
def test_a_misspelt_variable_names_the_nearest_setting(command: str, tmp_path: Path) -> None:
    ran = arbiter(command, env={"ARBITER_DATABSE_URL": "sqlite:///x.db"}, cwd=tmp_path)
    assert ran.code == CONFIG, ran.err
    assert ran.err.strip() == (
        "error: unknown setting ARBITER_DATABSE_URL; did you mean ARBITER_DATABASE_URL? "
        "(see docs/operations.md for the settings)"
    )
    assert not (tmp_path / "arbiter.db").exists()  # nothing was done on the default database


def test_a_misspelt_nested_variable_names_the_nearest_nested_setting(tmp_path: Path) -> None:
    ran = arbiter("serve", env={"ARBITER_AUDIT__SIGNNG_KEY": "secret-value"}, cwd=tmp_path)
    assert ran.code == CONFIG
    assert "unknown setting ARBITER_AUDIT__SIGNNG_KEY; did you mean ARBITER_AUDIT__SIGNING_KEY?" in ran.error
    assert "secret-value" not in ran.err
    ran = arbiter("serve", env={"ARBITER_PORT__X": "1"}, cwd=tmp_path)
    assert ran.code == CONFIG and "ARBITER_PORT is a single value" in ran.error


def test_an_invalid_value_is_one_line_with_the_choices_and_never_the_value(tmp_path: Path) -> None:
    ran = arbiter("serve", env={"ARBITER_AUDIT__ON_STORE_FAILURE": "sp00l-s3cret"}, cwd=tmp_path)
    assert ran.code == CONFIG
    assert (
        ran.err.strip() == "error: ARBITER_AUDIT__ON_STORE_FAILURE: must be one of 'fail_closed' or 'spool'"
    )
    ran = arbiter("migrate", env={"ARBITER_MCP__JSON_RESPONSE": "maybe"}, cwd=tmp_path)
    assert ran.err.strip() == "error: ARBITER_MCP__JSON_RESPONSE: must be true or false"
    ran = arbiter("serve", env={"ARBITER_SECRET_KEY": "not-a-fernet-key"}, cwd=tmp_path)
    assert ran.code == CONFIG and ran.error.startswith("error: ARBITER_SECRET_KEY: must be one or more")
    assert "not-a-fernet-key" not in ran.err


def test_config_file_mistakes(tmp_path: Path) -> None:
    (tmp_path / "arbiter.yaml").write_text("audit:\n  signng_key: x\n")
    ran = arbiter("serve", env={"ARBITER_CONFIG_FILE": "arbiter.yaml"}, cwd=tmp_path)
    assert ran.code == CONFIG
    assert ran.error == "error: arbiter.yaml: unknown key audit.signng_key; did you mean audit.signing_key?"
    (tmp_path / "arbiter.yaml").write_text("audit:\n  retention_days: -1\n")
    ran = arbiter("serve", env={"ARBITER_CONFIG_FILE": "arbiter.yaml"}, cwd=tmp_path)
    assert ran.error == "error: audit.retention_days in the config file: Input should be greater than 0"
    (tmp_path / "arbiter.yaml").write_text("port: [1\n")
    ran = arbiter("serve", env={"ARBITER_CONFIG_FILE": "arbiter.yaml"}, cwd=tmp_path)
    assert (
        ran.code == CONFIG
        and ran.error == "error: ARBITER_CONFIG_FILE: arbiter.yaml is not valid YAML at line 2"
    )
    ran = arbiter("serve", env={"ARBITER_CONFIG_FILE": "missing.yaml"}, cwd=tmp_path)
    assert ran.code == CONFIG and "cannot read missing.yaml" in ran.error


def test_start_up_prints_what_it_resolved_with_the_passwords_masked(tmp_path: Path) -> None:
    env = {
        "ARBITER_DATABASE_URL": "postgresql://arbiter:hunter2@127.0.0.1:1/arbiter",
        "ARBITER_REDIS_URL": "redis://:hunter3@127.0.0.1:1/0",
    }
    ran = arbiter("serve", "--port", "0", env=env, cwd=tmp_path)
    assert "database  postgresql://arbiter:***@127.0.0.1:1/arbiter" in ran.err
    assert "redis     redis://:***@127.0.0.1:1/0" in ran.err
    assert "issuers   none (API keys only)" in ran.err
    assert "hunter" not in ran.err


def test_the_repositorys_own_variables_are_known_or_declared_not_settings() -> None:
    """Every ARBITER_* the tests, bench, examples, docs and Makefile set is a setting or on the list of
    names that are not settings, so none of them trips the check."""
    import re

    repo = Path(__file__).resolve().parents[2]
    names: set[str] = set()
    for folder in ("tests", "bench", "examples", "docs", "src", ".ci"):
        for path in (repo / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ""}:
                text = path.read_text(encoding="utf-8", errors="replace")
                names |= set(re.findall(r"\bARBITER_[A-Z0-9_]*[A-Z0-9]\b", text))
    names |= set(re.findall(r"\bARBITER_[A-Z0-9_]*[A-Z0-9]\b", (repo / "Makefile").read_text()))
    names -= {"ARBITER_DATABSE_URL", "ARBITER_AUDIT__SIGNNG_KEY", "ARBITER_PORT__X"}  # this file's typos
    bench_constants = {
        "ARBITER_MIN",
        "ARBITER_GOV",
        "ARBITER_PG",
        "ARBITER_TRACED",
        "ARBITER_UNCONFIRMED",
        "ARBITER_SDK",
        "ARBITER_BIN",
    }
    assert unknown_settings(dict.fromkeys(names - bench_constants, "x")) == []

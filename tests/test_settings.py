"""The one settings object: environment over config file, nested keys, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from arbiter.settings import load_settings


def test_environment_nested_keys_and_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "arbiter.yaml"
    config.write_text(
        "database_url: sqlite:///from-file.db\n"
        "mcp:\n  max_body_bytes: 2048\n"
        "upstreams:\n  - name: local-tools\n    transport: stdio\n    command: [python, -m, tools]\n"
    )
    monkeypatch.setenv("ARBITER_CONFIG_FILE", str(config))
    monkeypatch.setenv("ARBITER_DATABASE_URL", "sqlite:///from-env.db")
    monkeypatch.setenv("ARBITER_MCP__STATELESS_LEGACY", "true")
    settings = load_settings()
    assert settings.database_url == "sqlite:///from-env.db"  # the environment wins over the file
    assert settings.mcp.max_body_bytes == 2048
    assert settings.mcp.stateless_legacy is True
    assert settings.upstreams[0].command == ["python", "-m", "tools"]


@pytest.mark.parametrize(
    "upstream",
    [
        {"name": "Bad", "url": "http://x/mcp"},
        {"name": "ok", "transport": "stdio"},
        {"name": "ok", "transport": "sse"},
    ],
)
def test_invalid_operator_upstreams_are_refused(upstream: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        load_settings(upstreams=[upstream])


def test_short_admin_token_is_refused() -> None:
    with pytest.raises(ValidationError):
        load_settings(admin_token="short")
    assert load_settings(admin_token="x" * 16).admin_token is not None

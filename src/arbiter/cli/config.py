"""Settings as the CLI loads them: mistakes are one line each, and what was resolved is shown."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from arbiter.settings import Settings


def _config_data(path: str) -> dict[str, Any] | None:
    """The config file's mapping, for the unknown-key check; reading problems are reported by
    load_settings itself (with the same one-line treatment)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        data: object = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return cast(dict[str, Any], data) if isinstance(data, dict) else None


def load(**overrides: Any) -> Settings:
    """``load_settings()``, refusing unknown ``ARBITER_*`` variables and config keys
    (``SettingsInvalid``, exit 3) and saying what is wrong with a value in one line, never the value."""
    import yaml
    from pydantic import ValidationError

    from arbiter.errors import SettingsInvalid
    from arbiter.settings import load_settings
    from arbiter.settings_check import describe, unknown_settings

    config_file = os.environ.get("ARBITER_CONFIG_FILE")
    problems = unknown_settings(os.environ, _config_data(config_file) if config_file else None)
    if problems:
        raise SettingsInvalid("; ".join(problems))
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        raise SettingsInvalid("; ".join(describe(exc))) from None
    except OSError as exc:
        raise SettingsInvalid(f"ARBITER_CONFIG_FILE: cannot read {config_file}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise SettingsInvalid(f"ARBITER_CONFIG_FILE: {config_file} is not valid YAML{at}") from None
    except ValueError as exc:  # a config file whose top level is not a mapping, or not JSON
        raise SettingsInvalid(f"ARBITER_CONFIG_FILE: {str(exc).splitlines()[0]}") from None


def mask_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for printing."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not a URL)"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def summary(settings: Settings) -> list[str]:
    """What the command will use: the database, Redis and token issuers, secrets masked."""
    issuers = ", ".join(i.issuer for i in settings.auth.issuers) or "none (API keys only)"
    lines = [
        f"database  {mask_url(settings.database_url)}",
        f"redis     {mask_url(settings.redis_url) if settings.redis_url else 'none (limits in-process)'}",
        f"issuers   {issuers}",
    ]
    if settings.config_file is not None or os.environ.get("ARBITER_CONFIG_FILE"):
        lines.append(f"config    {os.environ.get('ARBITER_CONFIG_FILE') or settings.config_file}")
    return lines


def print_summary(settings: Settings) -> None:
    for line in summary(settings):
        print(line, file=sys.stderr)

"""The poisoning rules: the built-in data file plus operators' own files, validated and precompiled."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import cast

from arbiter.errors import InvalidInput

BUILTIN_NAME = "poisoning_rules.toml"
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,79}$")
_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}
_RULE_KEYS = frozenset({"id", "category", "message", "pattern", "flags", "enabled"})
_THRESHOLD_KEYS = frozenset({"max_text_length", "base64_min_length", "max_depth"})


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    message: str
    pattern: re.Pattern[str]
    source: str  # the file it came from, for operators tracing a finding back


@dataclass(frozen=True)
class Thresholds:
    max_text_length: int = 6000
    base64_min_length: int = 32
    max_depth: int = 24


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    thresholds: Thresholds


def load_rules(extra_files: Sequence[Path] = ()) -> RuleSet:
    """The built-in rules, then each operator file in order (a rule with an existing id replaces it).

    Raises ``InvalidInput`` naming the file (and the rule id) for unreadable TOML, unknown keys, a
    missing field or a pattern that does not compile, so a typo fails at startup rather than silently
    disabling a check.
    """
    builtin = resources.files("arbiter.integrity").joinpath(BUILTIN_NAME)
    sources: list[tuple[str, bytes]] = [(f"<builtin>/{BUILTIN_NAME}", builtin.read_bytes())]
    for path in extra_files:
        try:
            sources.append((str(path), path.read_bytes()))
        except OSError as exc:
            raise InvalidInput(f"poisoning rules file {path}: cannot be read ({exc.strerror})") from exc
    rules: dict[str, Rule | None] = {}
    thresholds: dict[str, int] = {}
    for name, raw in sources:
        doc = _parse(name, raw)
        thresholds.update(_thresholds(name, doc.get("thresholds", {})))
        entries = doc.get("rule", [])
        if not isinstance(entries, list):
            raise InvalidInput(f"poisoning rules file {name}: 'rule' must be an array of tables ([[rule]])")
        for index, entry in enumerate(cast(list[object], entries)):
            rule_id, rule = _rule(name, index, entry)
            rules[rule_id] = rule
    return RuleSet(
        rules=tuple(r for r in rules.values() if r is not None),
        thresholds=Thresholds(**thresholds),
    )


def _parse(name: str, raw: bytes) -> dict[str, object]:
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"poisoning rules file {name}: not valid TOML: {exc}") from exc
    unknown = set(doc) - {"rule", "thresholds"}
    if unknown:
        raise InvalidInput(f"poisoning rules file {name}: unknown top-level keys {sorted(unknown)}")
    return doc


def _thresholds(name: str, table: object) -> dict[str, int]:
    if not isinstance(table, Mapping):
        raise InvalidInput(f"poisoning rules file {name}: [thresholds] must be a table")
    out: dict[str, int] = {}
    for key, value in table.items():  # pyright: ignore[reportUnknownVariableType]
        if key not in _THRESHOLD_KEYS:
            raise InvalidInput(f"poisoning rules file {name}: unknown threshold {key!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidInput(f"poisoning rules file {name}: threshold {key!r} must be a positive integer")
        out[str(key)] = value  # pyright: ignore[reportUnknownArgumentType]
    return out


def _rule(name: str, index: int, entry: object) -> tuple[str, Rule | None]:
    where = f"poisoning rules file {name}, rule #{index + 1}"
    if not isinstance(entry, Mapping):
        raise InvalidInput(f"{where}: must be a table")
    fields: dict[str, object] = {str(k): v for k, v in entry.items()}  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
    rule_id = fields.get("id")
    if not isinstance(rule_id, str) or not _ID.match(rule_id):
        raise InvalidInput(f"{where}: 'id' must match {_ID.pattern}", file=name)
    where = f"poisoning rules file {name}, rule {rule_id!r}"
    unknown = set(fields) - _RULE_KEYS
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {sorted(unknown)}", file=name, rule=rule_id)
    enabled = fields.get("enabled", True)
    if not isinstance(enabled, bool):
        raise InvalidInput(f"{where}: 'enabled' must be true or false", file=name, rule=rule_id)
    if not enabled:
        return rule_id, None
    texts: dict[str, str] = {}
    for key in ("category", "message", "pattern"):
        value = fields.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(f"{where}: {key!r} must be a non-empty string", file=name, rule=rule_id)
        texts[key] = value
    flag_letters = fields.get("flags", "i")
    if not isinstance(flag_letters, str) or set(flag_letters) - set(_FLAGS):
        raise InvalidInput(f"{where}: 'flags' must be letters from 'imsx'", file=name, rule=rule_id)
    flags = re.NOFLAG
    for letter in flag_letters:
        flags |= _FLAGS[letter]
    try:
        pattern = re.compile(texts["pattern"], flags)
    except re.error as exc:
        raise InvalidInput(f"{where}: invalid regular expression: {exc}", file=name, rule=rule_id) from exc
    if pattern.search(""):
        # A pattern that matches nothing-at-all would flag every definition.
        raise InvalidInput(f"{where}: pattern matches the empty string", file=name, rule=rule_id)
    return rule_id, Rule(rule_id, texts["category"], texts["message"], pattern, name)

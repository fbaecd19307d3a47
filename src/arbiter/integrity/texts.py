"""Every human-readable text of an MCP definition, with its JSON path.

Full-schema poisoning hides instructions anywhere the model reads: parameter names, enum values,
defaults and examples as well as descriptions, so the walk covers all of them at any depth (bounded).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

# Keys of a JSON Schema whose values are schemas, or maps or lists of them.
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("$defs", "definitions", "dependentSchemas", "patternProperties")
# Keys whose values (strings, possibly nested in lists and objects) are text the model sees.
_TEXT_KEYS = ("title", "description", "$comment", "default", "examples", "enum", "const", "format")
_PLAIN_KEY = re.compile(r"^[A-Za-z_$][\w$-]*$")


@dataclass(frozen=True)
class Text:
    path: str
    text: str


@dataclass
class Walk:
    """The texts found, and whether the walk stopped at the depth bound."""

    texts: list[Text]
    too_deep: list[str]


def key_path(parent: str, key: str) -> str:
    step = key if _PLAIN_KEY.match(key) else f"[{json.dumps(key, ensure_ascii=False)}]"
    if not parent:
        return step
    return f"{parent}{step}" if step.startswith("[") else f"{parent}.{step}"


def _as_map(value: object) -> Mapping[str, object] | None:
    return cast(Mapping[str, object], value) if isinstance(value, Mapping) else None


def _as_list(value: object) -> list[object] | None:
    return cast(list[object], value) if isinstance(value, list) else None


def collect(kind: str, definition: Mapping[str, Any], max_depth: int) -> Walk:
    walk = Walk([], [])
    for key in ("name", "title", "description"):
        _strings(walk, key, definition.get(key), 0, max_depth)
    if kind == "tool":
        for key in ("inputSchema", "outputSchema"):
            schema = _as_map(definition.get(key))
            if schema is not None:
                _schema(walk, key, schema, 0, max_depth)
        _strings(walk, "annotations", _as_map(definition.get("annotations")), 0, max_depth)
    elif kind == "prompt":
        for i, item in enumerate(_as_list(definition.get("arguments")) or []):
            arg = _as_map(item)
            if arg is not None:
                for key in ("name", "title", "description"):
                    _strings(walk, f"arguments[{i}].{key}", arg.get(key), 1, max_depth)
    elif kind == "resource_template":
        _strings(walk, "uriTemplate", definition.get("uriTemplate"), 0, max_depth)
    elif kind == "resource":
        _strings(walk, "uri", definition.get("uri"), 0, max_depth)
    return walk


def _schema(walk: Walk, path: str, schema: Mapping[str, object], depth: int, max_depth: int) -> None:
    if depth > max_depth:
        walk.too_deep.append(path)
        return
    for key in _TEXT_KEYS:
        if key in schema:
            _strings(walk, key_path(path, key), schema[key], depth + 1, max_depth)
    for name, sub in (_as_map(schema.get("properties")) or {}).items():
        prop_path = key_path(key_path(path, "properties"), str(name))
        # The property name itself: the path of the property denotes its key.
        walk.texts.append(Text(prop_path, str(name)))
        sub_schema = _as_map(sub)
        if sub_schema is not None:
            _schema(walk, prop_path, sub_schema, depth + 1, max_depth)
    for key in _SUBSCHEMA:
        sub = _as_map(schema.get(key))
        if sub is not None:
            _schema(walk, key_path(path, key), sub, depth + 1, max_depth)
        else:
            _schema_list(walk, key_path(path, key), _as_list(schema.get(key)) or [], depth, max_depth)
    for key in _SUBSCHEMA_LISTS:
        _schema_list(walk, key_path(path, key), _as_list(schema.get(key)) or [], depth, max_depth)
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (_as_map(schema.get(key)) or {}).items():
            sub_path = key_path(key_path(path, key), name)
            walk.texts.append(Text(sub_path, name))
            sub_schema = _as_map(sub)
            if sub_schema is not None:
                _schema(walk, sub_path, sub_schema, depth + 1, max_depth)


def _schema_list(walk: Walk, path: str, subs: list[object], depth: int, max_depth: int) -> None:
    for i, sub in enumerate(subs):
        sub_schema = _as_map(sub)
        if sub_schema is not None:
            _schema(walk, f"{path}[{i}]", sub_schema, depth + 1, max_depth)


def _strings(walk: Walk, path: str, value: object, depth: int, max_depth: int) -> None:
    """Strings in a JSON value, at any depth (defaults and examples may be lists or objects)."""
    if depth > max_depth:
        walk.too_deep.append(path)
        return
    if isinstance(value, str):
        walk.texts.append(Text(path, value))
    elif (items := _as_list(value)) is not None:
        for i, item in enumerate(items):
            _strings(walk, f"{path}[{i}]", item, depth + 1, max_depth)
    elif (mapping := _as_map(value)) is not None:
        for key, item in mapping.items():
            _strings(walk, key_path(path, str(key)), item, depth + 1, max_depth)

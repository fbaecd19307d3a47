"""Compiled JSON Schema validators for pinned tool schemas, with no network and a bounded cache.

The validator class follows the schema's ``$schema`` (2020-12 when absent or unknown, as MCP says). A
``$ref`` may point inside the schema only: the ``referencing`` registry's retrieve refuses every other
URI, so a schema naming ``https://…`` or a loopback address makes Arbiter fetch nothing (jsonschema's
default would fetch it). Such a schema, like one that is not a valid schema at all, makes the call
fail closed (``InvalidToolSchema``): a call checked against part of its schema is not checked.

Errors are described by path and keyword, with the schema's own constraint where short, never with
the value that failed: that value is the caller's (or the upstream's) and may be a secret.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, cast

import orjson
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource, Unresolvable

from arbiter.errors import InvalidToolSchema

MAX_ERRORS = 5
# Keywords whose schema value says what was expected, shown when its JSON is this short.
_SHOWN = frozenset(
    {"type", "required", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
    | {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "pattern"}
    | {"format", "multipleOf", "uniqueItems"}
)
_SHOWN_MAX = 200


def _refuse(uri: str) -> Resource[Any]:
    # Every $ref outside the schema: never fetched, whatever its scheme or host.
    raise NoSuchResource(ref=uri)


_REGISTRY: Registry[Any] = Registry(retrieve=_refuse)  # pyright: ignore[reportCallIssue]


class Unchecked(Exception):
    """A schema that cannot be used; ``str()`` says why (for the refusal and the audit record)."""


class SchemaCache:
    """Validators per (tool, schema digest), least recently used dropped beyond ``size``."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._by_sha: OrderedDict[tuple[str, str], Validator | str] = OrderedDict()
        # The catalog hands out the same schema object call after call: found by identity, no digest.
        self._by_identity: dict[str, tuple[object, Validator | str]] = {}

    def validator(self, tool: str, schema: Mapping[str, Any]) -> Validator:
        """The compiled validator of ``schema``; raises ``Unchecked`` for one that cannot be used."""
        hit = self._by_identity.get(tool)
        if hit is not None and hit[0] is schema:
            compiled = hit[1]
        else:
            key = (tool, _digest(schema))
            found = self._by_sha.get(key)
            if found is None:
                found = _compile(schema)
                self._by_sha[key] = found
                if len(self._by_sha) > self._size:
                    self._by_sha.popitem(last=False)
            else:
                self._by_sha.move_to_end(key)
            compiled = found
            if len(self._by_identity) >= self._size:
                self._by_identity.clear()
            self._by_identity[tool] = (schema, compiled)
        if isinstance(compiled, str):
            raise Unchecked(compiled)
        return compiled


def _digest(schema: Mapping[str, Any]) -> str:
    try:
        data = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        data = repr(schema).encode()
    return hashlib.sha256(data).hexdigest()


def _compile(schema: Mapping[str, Any]) -> Validator | str:
    """The validator, or why there is none (kept in the cache too: a bad schema is judged once)."""
    if not isinstance(schema, Mapping):  # pyright: ignore[reportUnnecessaryIsInstance]
        return "the schema is not an object"
    cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(dict(schema))
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        return f"the schema is not a valid JSON Schema (at {where}: '{exc.validator}')"
    return cls(schema, registry=_REGISTRY)  # pyright: ignore[reportCallIssue]


def errors(validator: Validator, instance: object) -> list[dict[str, object]]:
    """Up to ``MAX_ERRORS`` violations, as path, keyword and the schema's expectation.

    Raises ``Unchecked`` when validation needs a ``$ref`` that is not in the schema."""
    found: list[dict[str, object]] = []
    try:
        for error in validator.iter_errors(cast(Any, instance)):
            found.append(_describe(error))
            if len(found) >= MAX_ERRORS:
                break
    except Unresolvable as exc:
        raise Unchecked(f"the schema refers to {_ref_of(exc)}, which Arbiter does not fetch") from None
    return found


def refusal(tool: str, why: Unchecked) -> InvalidToolSchema:
    return InvalidToolSchema(f"the schema of {tool} cannot be checked: {why}", tool=tool)


def _describe(error: ValidationError) -> dict[str, object]:
    described: dict[str, object] = {"path": _json_path(error), "keyword": str(error.validator)}
    if error.validator in _SHOWN:
        expected: Any = error.validator_value
        try:
            shown = orjson.dumps(expected)
        except TypeError:
            shown = b""
        if shown and len(shown) <= _SHOWN_MAX:
            described["expected"] = cast(object, expected)
    return described


def _json_path(error: ValidationError) -> str:
    # Built from the path only (key names and indexes), not jsonschema's message, which quotes values.
    path = "$"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _ref_of(exc: Unresolvable) -> str:
    ref = getattr(exc, "ref", None)
    return repr(ref[:200]) if isinstance(ref, str) else "a document outside the schema"

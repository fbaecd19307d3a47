"""Configuration mistakes the settings object alone lets through, said in one line each.

pydantic-settings only reads the ``ARBITER_*`` variables it knows, so a misspelt one (``ARBITER_DATABSE_URL``)
is silently ignored and Arbiter runs on the default; nested models ignore unknown keys in the config file
the same way. :func:`unknown_settings` finds both and names the nearest real setting. :func:`describe`
turns pydantic's multi-line validation report into one line per problem, naming the variable (or the
config file key) and never the value, which may be a secret.
"""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Iterator, Mapping
from typing import Any, Union, cast, get_args, get_origin

from pydantic import BaseModel, ValidationError

from arbiter.settings import Settings

PREFIX = "ARBITER_"
# ARBITER_* names that are not Arbiter's settings: the bearer token of the example agents and of the
# CLI's admin commands, the admin commands' server URL, and the test and benchmark harnesses' own
# switches. Anything else under the prefix must be a setting.
NOT_SETTINGS = frozenset(
    {"ARBITER_TOKEN", "ARBITER_URL", "ARBITER_REQUIRE_SERVICES", "ARBITER_FUZZ_EXAMPLES"}
)
NOT_SETTINGS_PREFIXES = ("ARBITER_TEST_", "ARBITER_BENCH_")


def _model_of(annotation: object) -> type[BaseModel] | None:
    """The model a field holds (``Model`` or ``Model | None``), if it holds one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [m for a in get_args(annotation) if (m := _model_of(a)) is not None]
        return models[0] if len(models) == 1 else None
    return None


def _list_model_of(annotation: object) -> type[BaseModel] | None:
    """The model of a ``list[Model]`` field (``upstreams``, ``auth.issuers``)."""
    if get_origin(annotation) is list:
        (item,) = get_args(annotation) or (None,)
        return _model_of(item)
    return None


def _nearest(word: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def _unknown_env(name: str) -> str | None:
    path = name[len(PREFIX) :].lower().split("__")
    model: type[BaseModel] = Settings
    for depth, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            known = PREFIX + "__".join(path[:depth]).upper() + ("__" if depth else "")
            near = _nearest(part, list(fields))
            hint = f"; did you mean {known}{near.upper()}?" if near else ""
            return f"unknown setting {name}{hint} (see docs/operations.md for the settings)"
        sub = _model_of(fields[part].annotation)
        if sub is None:
            # A plain value (or a list/dict given as JSON) ends the path; nothing may hang below it.
            if depth < len(path) - 1:
                setting = PREFIX + "__".join(path[: depth + 1]).upper()
                return f"unknown setting {name}: {setting} is a single value (JSON for lists), not a group"
            return None
        model = sub
    return None


def _unknown_keys(data: Mapping[str, Any], model: type[BaseModel], where: str) -> Iterator[str]:
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            near = _nearest(key, list(model.model_fields))
            hint = f"; did you mean {where}{near}?" if near else ""
            yield f"unknown key {where}{key}{hint}"
            continue
        sub = _model_of(field.annotation)
        if sub is not None and isinstance(value, Mapping):
            yield from _unknown_keys(cast(Mapping[str, Any], value), sub, f"{where}{key}.")
        item_model = _list_model_of(field.annotation)
        if item_model is not None and isinstance(value, list):
            for i, item in enumerate(cast(list[Any], value)):
                if isinstance(item, Mapping):
                    yield from _unknown_keys(cast(Mapping[str, Any], item), item_model, f"{where}{key}[{i}].")


def unknown_settings(environ: Mapping[str, str], config: Mapping[str, Any] | None = None) -> list[str]:
    """One message per ``ARBITER_*`` variable, or config file key, that is no setting."""
    problems: list[str] = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in NOT_SETTINGS or upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        problem = _unknown_env(upper)
        if problem is not None:
            problems.append(problem)
    if config is not None:
        source = environ.get("ARBITER_CONFIG_FILE", "the config file")
        problems.extend(f"{source}: {p}" for p in _unknown_keys(config, Settings, ""))
    return problems


def _env_name(loc: tuple[int | str, ...]) -> str | None:
    if not loc or not all(isinstance(p, str) for p in loc):
        return None
    return PREFIX + "__".join(str(p) for p in loc).upper()


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def _problem(error: Mapping[str, Any]) -> str:
    msg = str(error.get("msg", "invalid"))
    kind = error.get("type", "")
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "bool_parsing":
        msg = "must be true or false"
    elif kind == "literal_error":
        msg = f"must be one of {error.get('ctx', {}).get('expected', '')}"
    elif kind == "extra_forbidden":
        msg = "is not a setting"
    return msg


def describe(exc: ValidationError, environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per invalid setting: where it was set, what is wrong, what would be right."""
    env = {k.upper(): k for k in (os.environ if environ is None else environ)}
    lines: list[str] = []
    for error in exc.errors(include_input=False, include_url=False):
        # Discriminated-union and model-level errors carry tags in loc ("function-after[...]"); drop them.
        loc = tuple(p for p in error["loc"] if isinstance(p, int) or ("[" not in p and "-" not in p))
        # The variable that set it: the setting's own, or one holding a group of them as JSON.
        setters = [n for i in range(len(loc), 0, -1) if (n := _env_name(loc[:i])) is not None and n in env]
        if setters and setters[0] == _env_name(loc):
            where = setters[0]
        elif setters:
            where = f"{setters[0]} ({_dotted(loc)})"
        else:
            where = _dotted(loc) or "settings"
            if "ARBITER_CONFIG_FILE" in env:
                where += " in the config file"
        lines.append(f"{where}: {_problem(cast(Mapping[str, Any], error))}")
    return lines

"""How upstream names map to the names agents see: ``<upstream>__<tool>`` and ``arbiter://<upstream>/<uri>``.

Upstream names cannot contain ``_`` or ``/``, so splitting at the first separator is unambiguous.
"""

from __future__ import annotations

SEP = "__"
URI_PREFIX = "arbiter://"


def exposed_name(upstream: str, name: str) -> str:
    return f"{upstream}{SEP}{name}"


def split_name(exposed: str) -> tuple[str, str] | None:
    upstream, sep, name = exposed.partition(SEP)
    if not sep or not upstream or not name:
        return None
    return upstream, name


def exposed_uri(upstream: str, uri: str) -> str:
    return f"{URI_PREFIX}{upstream}/{uri}"


def exposed_target(kind: str, upstream: str, name: str) -> str:
    """The agent-facing name of a catalog entry of any kind."""
    return exposed_uri(upstream, name) if kind.startswith("resource") else exposed_name(upstream, name)


def split_uri(exposed: str) -> tuple[str, str] | None:
    if not exposed.startswith(URI_PREFIX):
        return None
    upstream, sep, uri = exposed[len(URI_PREFIX) :].partition("/")
    if not sep or not upstream or not uri:
        return None
    return upstream, uri

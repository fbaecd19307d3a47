"""The result guard: what an upstream answers a tool call with, checked before the agent sees it.

- Size: the relay stops reading an answer at ``max_bytes`` (plus a little slack for the envelope) and
  raises ``ResultTooLarge`` with what it read; that is refused, or (``on_oversize: truncate``) turned
  into a result holding the start of the first text content, marked, with ``_meta["arbiter/truncated"]``.
  Answers that arrive through the SDK (stdio and SSE upstreams) are already whole in memory: they are
  measured, and refused or cut, after the fact.
- Secrets: the detectors chosen in ``results.detectors`` are applied to ``content[].text`` (and embedded
  text resources) and to every string of ``structuredContent``. The relay shows the guard the answer's
  raw bytes first: when none of the detectors' trigger substrings occurs there (the common case), the
  result is passed on as decoded, with no walk and no re-encoding.
- ``structuredContent`` of a successful result is validated against the pinned ``outputSchema`` when the
  tool declares one (before redaction: the upstream's answer is judged as sent); a mismatch is refused
  as ``invalid_result``, since clients that validate would fail on it anyway.

This module never logs: whatever it sees may be a secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

import orjson

from arbiter.errors import InvalidResult, ResultTooLarge
from arbiter.integrity.detect import NamedDetectors
from arbiter.integrity.schemas import SchemaCache, Unchecked, errors, refusal
from arbiter.settings import ResultGuardSettings

TRUNCATED_META = "arbiter/truncated"
# The JSON-RPC envelope around a result ({"jsonrpc":"2.0","id":"arbiter-…","result":…}) and an SSE
# event's framing: read beyond the cap so that a result of exactly max_bytes is not cut.
SLACK_BYTES = 4096
_ESCAPE_TAIL = 6  # the longest JSON escape (\uXXXX)


class RawProbe:
    """Per call: told the raw answer by the relay (``__call__``), before it is decoded."""

    __slots__ = ("_detectors", "may_match", "size")

    def __init__(self, detectors: NamedDetectors) -> None:
        self._detectors = detectors
        self.size: int | None = None  # None: the answer came through the SDK, not the relay
        self.may_match = True

    def __call__(self, raw: bytes) -> None:
        self.size = len(raw)
        self.may_match = self._detectors.may_match(raw)


class ResultGuard:
    def __init__(self, settings: ResultGuardSettings, patterns: dict[str, str], schema_cache: int) -> None:
        self.settings = settings
        self.cap = settings.max_bytes
        self._detectors = NamedDetectors(
            settings.detectors if settings.redact_secrets else (), patterns, "integrity.results.detectors"
        )
        self._schemas = SchemaCache(schema_cache)

    def probe(self) -> RawProbe:
        return RawProbe(self._detectors)

    def check(
        self, tool: str, result: dict[str, Any], output_schema: Mapping[str, Any] | None, probe: RawProbe
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The result to pass on, and the detectors that redacted something in it (name -> count).

        Raises ``ResultTooLarge`` (refuse mode), ``InvalidResult`` or ``InvalidToolSchema``."""
        may_match = probe.may_match
        if probe.size is None:  # through the SDK: measured now
            raw = _encoded(result)
            if len(raw) > self.cap + SLACK_BYTES:
                if self.settings.on_oversize == "refuse":
                    raise self.too_large(tool)
                result = self._cut(result, output_schema)
            may_match = self._detectors.may_match(raw)
        if (
            self.settings.validate_output_schema
            and output_schema is not None
            and result.get("isError") is not True
            and "structuredContent" in result
        ):
            try:
                problems = errors(self._schemas.validator(tool, output_schema), result["structuredContent"])
            except Unchecked as why:
                raise refusal(tool, why) from None
            if problems:
                raise InvalidResult(f"the result of {tool} does not match its output schema", errors=problems)
        found: dict[str, int] = {}
        if may_match and self._detectors.passes:
            result = self._redact(result, found)
        return result, found

    def too_large(self, tool: str) -> ResultTooLarge:
        return ResultTooLarge(f"the result of {tool} exceeds {self.cap} bytes", max_bytes=self.cap)

    def truncated(self, exc: ResultTooLarge, output_schema: Mapping[str, Any] | None) -> dict[str, Any]:
        """A result made of the start of the first text content the relay read before it stopped."""
        text = _first_text(exc.partial, self.cap)
        return self._marked([{"type": "text", "text": text}], output_schema)

    def _cut(self, result: dict[str, Any], output_schema: Mapping[str, Any] | None) -> dict[str, Any]:
        budget = self.cap
        kept: list[Any] = []
        content: Any = result.get("content")
        for item in cast(list[Any], content) if isinstance(content, list) else []:
            if budget <= 0:
                break
            if isinstance(item, dict) and cast(dict[str, Any], item).get("type") == "text":
                text: Any = cast(dict[str, Any], item).get("text")
                if isinstance(text, str):
                    kept.append({"type": "text", "text": text[:budget]})
                    budget -= len(text)
        return self._marked(kept, output_schema)

    def _marked(self, content: list[Any], output_schema: Mapping[str, Any] | None) -> dict[str, Any]:
        content.append({"type": "text", "text": f"[TRUNCATED: the result exceeded {self.cap} bytes]"})
        cut: dict[str, Any] = {"content": content, "_meta": {TRUNCATED_META: {"max_bytes": self.cap}}}
        if output_schema is not None:
            # A successful result of such a tool must carry conforming structuredContent, which a cut
            # result cannot: it is an error result, so clients that validate do not reject it.
            cut["isError"] = True
        return cut

    def _redact(self, result: dict[str, Any], found: dict[str, int]) -> dict[str, Any]:
        out = dict(result)
        content: Any = result.get("content")
        if isinstance(content, list):
            out["content"] = [self._item(item, found) for item in cast(list[Any], content)]
        if "structuredContent" in result:
            out["structuredContent"] = self._walk(result["structuredContent"], found)
        return out if found else result

    def _item(self, item: Any, found: dict[str, int]) -> Any:
        if not isinstance(item, dict):
            return item
        entry = cast(dict[str, Any], item)
        kind = entry.get("type")
        if kind == "text" and isinstance(entry.get("text"), str):
            return {**entry, "text": self._detectors.scan(entry["text"], found)}
        resource: Any = entry.get("resource")
        if kind == "resource" and isinstance(resource, dict):
            inner = cast(dict[str, Any], resource)
            if isinstance(inner.get("text"), str):
                return {**entry, "resource": {**inner, "text": self._detectors.scan(inner["text"], found)}}
        return entry

    def _walk(self, value: Any, found: dict[str, int]) -> Any:
        if isinstance(value, str):
            return self._detectors.scan(value, found)
        if isinstance(value, dict):
            return {k: self._walk(v, found) for k, v in cast(dict[str, Any], value).items()}
        if isinstance(value, list):
            return [self._walk(v, found) for v in cast(list[Any], value)]
        return value


def _encoded(result: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(result)
    except TypeError:
        return json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")


def _first_text(partial: bytes | bytearray, limit: int) -> str:
    """The (possibly cut) value of the first ``"text"`` string in a JSON prefix, at most ``limit``
    characters; empty if there is none."""
    start = -1
    for opener in (b'"text":"', b'"text": "'):
        found = partial.find(opener)
        if found >= 0 and (start < 0 or found < start):
            start = found + len(opener)
    if start < 0:
        return ""
    end = start
    while True:  # the closing quote: one not escaped by an odd run of backslashes
        end = partial.find(b'"', end)
        if end < 0:
            end = len(partial)
            break
        run = 0
        while partial[end - 1 - run] == 0x5C:  # backslash
            run += 1
        if run % 2 == 0:
            break
        end += 1
    if end == len(partial):  # cut inside the string: drop a trailing escape that may be incomplete
        tail = partial.rfind(b"\\", max(start, end - _ESCAPE_TAIL), end)
        if tail >= 0:
            end = tail
    # Decoded from a view, and unescaped only when there is an escape: no further copies of a large cut.
    text = str(memoryview(partial)[start:end], "utf-8", "ignore")
    if "\\" in text:
        try:
            decoded: Any = json.loads(f'"{text}"')
            text = decoded if isinstance(decoded, str) else text
        except ValueError:
            pass  # a stray control character: keep the raw text
    return text[:limit]

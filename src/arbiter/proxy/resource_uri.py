"""One normal form for resource URIs: the policy judges it, and it is what goes upstream.

Agents read ``arbiter://<upstream>/<uri>`` and the policy matches ``<upstream>/<uri>`` with globs.
Matched as sent, ``up://files/../secret`` passes ``up/up://files/*``, and an upstream that resolves
dot segments then serves ``up://secret``. So the URI is normalised first, the normal form is
authorised, and that same string is forwarded: what was allowed is what is read.

Rules (RFC 3986, plus choices for custom schemes):

- Only the part between ``scheme:`` and the first ``?`` or ``#`` changes. Query and fragment pass
  byte for byte: a ``../`` there is data, not a path.
- Percent-encoded unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded (6.2.2.2); the hex of
  every other escape is upper-cased and the scheme lower-cased (6.2.2.1). Reserved characters stay
  encoded (``%2F`` in a file name is part of the name, not a separator). Nothing else changes case:
  for a custom scheme the "authority" may be a directory.
- Dot segments are removed (5.2.4) over everything after ``scheme:`` or ``scheme://`` taken as one
  path. Whether ``files`` in ``up://files/../secret`` is a host or a directory is the upstream's
  business; either way the request means ``up://secret``. URIs such as ``urn:x:y`` or ``mailto:a@b``
  have no dot segments, so they come out unchanged. A ``..`` that would climb above the first
  segment, or above the root of ``file:///``, names nothing legitimate and is refused, not clamped.
- What can still mean different things to different upstreams is refused: a ``%`` not followed by two
  hex digits, and a segment that, percent-decoded until nothing changes (to catch double encoding
  such as ``%252e``), has ``.`` or ``..`` between ``/`` or ``\\`` separators (``..%2Fsecret``,
  ``%252e%252e``, ``..\\secret``). An upstream may decode once, twice, or split on backslashes, so
  no single normal form is right for all of them.

The refusal depends on the URI alone, never on policy or catalog, so it reveals nothing about either.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from urllib.parse import unquote

from arbiter.errors import AmbiguousResourceUri

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SEPARATORS = re.compile(r"[/\\]")
_DOTS = frozenset({".", ".."})


def normalise(uri: str) -> str:
    """The normal form of a resource URI; raises ``AmbiguousResourceUri`` if there is no single one."""
    normal = _normalise(uri)
    # A normal form is its own normal form. Anything else (an escape that changes how the URI parses
    # once decoded) is refused rather than trusted.
    if _normalise(normal) != normal:
        raise _refused(uri, "it reads differently once decoded")
    return normal


def _normalise(uri: str) -> str:
    end = min((i for i in (uri.find("?"), uri.find("#")) if i >= 0), default=len(uri))
    head, tail = uri[:end], uri[end:]
    if "%" in _ESCAPE.sub("", head):
        raise _refused(uri, "a '%' not followed by two hex digits")
    # Decoded before the scheme is looked for: `%75p:..` is `up:..`, and must be judged as such.
    head = _ESCAPE.sub(_decode_unreserved, head)
    match = _SCHEME.match(head)
    scheme = match.group(0).lower() if match else ""
    hier = head[len(scheme) :]
    slashes = "//" if hier.startswith("//") else ""
    path = _remove_dot_segments(hier[len(slashes) :], uri)
    for segment in path.split("/"):
        if _has_dot_segment(segment):
            raise _refused(uri, "an encoded or backslash-separated '.' or '..' segment")
    # The query and fragment pass unchanged, but not as a way around the rule: an upstream that takes
    # the whole string for a path would resolve a `/../` found there.
    if _has_dot_segment(tail):
        raise _refused(uri, "a '.' or '..' segment in its query or fragment")
    normal = f"{scheme}{slashes}{path}{tail}"
    if not normal:
        raise _refused(uri, "it names nothing once '..' is resolved")
    return normal


def _has_dot_segment(text: str) -> bool:
    return any(piece in _DOTS for piece in _SEPARATORS.split(_fully_decoded(text)))


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else f"%{match.group(1).upper()}"


def _remove_dot_segments(path: str, uri: str) -> str:
    segments = path.split("/")
    # A leading "/" (``file:///a``, ``up:/a``) is a root that ".." may not remove: it would turn the
    # first directory into an authority.
    floor = 1 if path.startswith("/") else 0
    out: list[str] = []
    for i, segment in enumerate(segments):
        if segment not in _DOTS:
            out.append(segment)
            continue
        if segment == "..":
            if len(out) <= floor:
                raise _refused(uri, "'..' climbs above its start")
            out.pop()
        if i == len(segments) - 1:  # "a/b/.." is "a/", as RFC 3986 keeps the trailing slash
            out.append("")
    return "/".join(out)


def _fully_decoded(segment: str) -> str:
    # Each round that changes anything makes the text shorter, so this ends.
    while (decoded := unquote(segment, errors="replace")) != segment:
        segment = decoded
    return segment


def _refused(uri: str, why: str) -> AmbiguousResourceUri:
    return AmbiguousResourceUri(f"resource URI {uri!r} cannot be normalised unambiguously: {why}")


_EXPRESSION = re.compile(r"\{([+#./;?&]?)[^}]*\}")


@lru_cache(maxsize=1024)
def _template_pattern(template: str) -> re.Pattern[str]:
    parts: list[str] = []
    at = 0
    for match in _EXPRESSION.finditer(template):
        parts.append(re.escape(template[at : match.start()]))
        parts.append(".*" if match.group(1) in ("+", "#", "/", "?", "&", ";", ".") else "[^/?#]*")
        at = match.end()
    parts.append(re.escape(template[at:]))
    return re.compile("".join(parts), re.DOTALL)


def template_matches(template: str, uri: str) -> bool:
    """Whether ``uri`` could be an expansion of the URI template ``template``."""
    return _template_pattern(template).fullmatch(uri) is not None

"""Verifying an exported bundle offline: no database and no Arbiter settings, only the file and the
public key the auditor trusts.

The bundle is read twice: first every line is validated and the checkpoints collected (they follow the
records), then the records are fed to ``ChainCheck`` in file order. Memory holds the checkpoints and
one line, never the records.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from arbiter.audit.export import BUNDLE_TYPE, BUNDLE_VERSION
from arbiter.audit.signing import KeyRing
from arbiter.audit.verify import ChainCheck, Checkpoint, Report
from arbiter.errors import ConfigError, InvalidInput

KeysSource = Literal["given", "bundle"]
_HASH_RE = re.compile(r"[0-9a-f]{64}")
SELF_KEYS_NOTE = (
    "the public keys were taken from the bundle itself, so the signatures only prove the bundle is "
    "consistent with keys it brought along: compare the key ids with Arbiter's published signing key, "
    "or verify again with --public-key"
)


@dataclass
class BundleReport(Report):
    """A chain report plus where the trusted keys came from and which range the bundle holds."""

    keys_source: KeysSource = "bundle"
    key_ids: list[str] = field(default_factory=list[str])
    anchor_seq: int = 0
    from_seq: int | None = None
    to_seq: int | None = None

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        keys: dict[str, object] = {"source": self.keys_source, "key_ids": self.key_ids}
        if self.keys_source == "bundle":
            keys["note"] = SELF_KEYS_NOTE
        out["keys"] = keys
        out["bundle"] = {"anchor_seq": self.anchor_seq, "from_seq": self.from_seq, "to_seq": self.to_seq}
        return out


@dataclass(frozen=True)
class Header:
    anchor_seq: int
    anchor_hash: str
    from_seq: int | None
    to_seq: int | None
    public_keys: list[str]


@dataclass(frozen=True)
class RecordLine:
    seq: int
    body: str
    hash: str
    prev_hash: str


def verify_bundle(path: Path | str, public_keys_override: list[str] | None = None) -> BundleReport:
    """Check a bundle's chain from its anchor and its checkpoints' signatures.

    Signatures are checked against ``public_keys_override`` when given (the keys the auditor trusts),
    else against the keys in the bundle's header, and the report then says so.
    """
    path = Path(path)
    header, checkpoints = _scan(path)
    if public_keys_override:
        source: KeysSource = "given"
        ring = _keyring(public_keys_override, "--public-key")
    else:
        source = "bundle"
        ring = _keyring(header.public_keys, "line 1 (the header's public_keys)")
    check = ChainCheck(header.anchor_seq, header.anchor_hash, ring, checkpoints)
    for _, line in _lines(path):
        if isinstance(line, RecordLine):
            check.feed(line.seq, line.body, line.hash, line.prev_hash)
    report = check.finish(header.to_seq)
    base = {f.name: getattr(report, f.name) for f in fields(Report)}
    return BundleReport(
        **base,
        keys_source=source,
        key_ids=sorted(ring.keys),
        anchor_seq=header.anchor_seq,
        from_seq=header.from_seq,
        to_seq=header.to_seq,
    )


def _keyring(keys: list[str], where: str) -> KeyRing:
    try:
        return KeyRing(keys)
    except ConfigError:
        raise InvalidInput(f"{where}: a public key is not 32 bytes of Ed25519 public key in base64") from None


def _scan(path: Path) -> tuple[Header, dict[int, list[Checkpoint]]]:
    header: Header | None = None
    checkpoints: dict[int, list[Checkpoint]] = {}
    for _, line in _lines(path):
        if isinstance(line, Header):
            header = line
        elif isinstance(line, Checkpoint):
            checkpoints.setdefault(line.seq, []).append(line)
    if header is None:
        raise InvalidInput(f"{path} is empty: a bundle starts with a header line")
    return header, checkpoints


def _lines(path: Path) -> Iterator[tuple[int, Header | RecordLine | Checkpoint]]:
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                yield number, _parse(raw, number)
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(raw: bytes, number: int) -> Header | RecordLine | Checkpoint:
    try:
        value: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput(f"line {number} of the bundle is not a JSON object (UTF-8)") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"line {number} of the bundle is not a JSON object")
    obj: dict[str, Any] = value  # pyright: ignore[reportUnknownVariableType]
    kind = obj.get("type")
    if number == 1:
        if kind != BUNDLE_TYPE:
            raise InvalidInput(f"line 1 is not an Arbiter audit bundle header (type {BUNDLE_TYPE!r})")
        return _header(obj)
    if kind == "record":
        return RecordLine(
            _int(obj, "seq", number, minimum=1),
            _str(obj, "body", number),
            _str(obj, "hash", number),
            _str(obj, "prev_hash", number),
        )
    if kind == "checkpoint":
        return Checkpoint(
            _int(obj, "seq", number),
            _str(obj, "hash", number),
            _int(obj, "ts_ms", number),
            _str(obj, "kind", number),
            _str(obj, "key_id", number),
            _str(obj, "signature", number),
        )
    if kind == BUNDLE_TYPE:
        raise InvalidInput(f"line {number} is a second bundle header: bundles cannot be concatenated")
    raise InvalidInput(f"line {number} has an unknown type {kind!r} (expected 'record' or 'checkpoint')")


def _header(obj: dict[str, Any]) -> Header:
    version = obj.get("version")
    if version != BUNDLE_VERSION:
        raise InvalidInput(f"line 1: bundle version {version!r} is not supported (this Arbiter reads 1)")
    anchor_hash = _str(obj, "anchor_hash", 1)
    if not _HASH_RE.fullmatch(anchor_hash):
        raise InvalidInput("line 1: 'anchor_hash' must be 64 lowercase hexadecimal characters")
    keys: Any = obj.get("public_keys")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):  # pyright: ignore[reportUnknownVariableType]
        raise InvalidInput("line 1: 'public_keys' must be a list of base64 strings")
    return Header(
        anchor_seq=_int(obj, "anchor_seq", 1),
        anchor_hash=anchor_hash,
        from_seq=_int(obj, "from_seq", 1) if obj.get("from_seq") is not None else None,
        to_seq=_int(obj, "to_seq", 1) if obj.get("to_seq") is not None else None,
        public_keys=[str(k) for k in keys],  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
    )


def _int(obj: dict[str, Any], name: str, number: int, *, minimum: int = 0) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInput(f"line {number}: {name!r} must be a whole number >= {minimum}")
    return value


def _str(obj: dict[str, Any], name: str, number: int) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise InvalidInput(f"line {number}: {name!r} must be a string")
    return value

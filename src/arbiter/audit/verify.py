"""Checking a chain: every record hashes to what it says, links to the one before, agrees with its
indexed columns, and agrees with every signed checkpoint. Used on the database, on an exported bundle
(offline) and before a purge (so a purge never launders a tampered record into a signed anchor).

Fed rows in sequence order, it holds only the previous record's hash, so a million rows cost a
million SHA-256s and no memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from arbiter.audit.record import columns, record_hash
from arbiter.audit.signing import KeyRing, checkpoint_payload

MAX_PROBLEMS = 100


@dataclass(frozen=True)
class Problem:
    seq: int
    kind: str  # altered | missing | bad_checkpoint | truncated
    message: str

    def to_json(self) -> dict[str, object]:
        return {"seq": self.seq, "kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    ts_ms: int
    kind: str
    key_id: str
    signature: str

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "hash": self.hash,
            "ts_ms": self.ts_ms,
            "kind": self.kind,
            "key_id": self.key_id,
            "signature": self.signature,
        }


@dataclass
class Report:
    ok: bool
    records: int
    first_seq: int | None
    last_seq: int | None
    problems: list[Problem]
    problem_count: int
    checkpoints_valid: int
    checkpoints_unsigned: int
    checkpoints_invalid: int
    last_signed_seq: int | None  # records after this are not yet covered by a valid signature
    # False when the verifier had no trusted public key at all: signed checkpoints could not be
    # checked (counted in checkpoints_unchecked), which is not the same as their being invalid.
    signatures_checked: bool = field(default=True, kw_only=True)
    checkpoints_unchecked: int = field(default=0, kw_only=True)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_broken": self.problems[0].to_json() if self.problems else None,
            "problems": [p.to_json() for p in self.problems],
            "problem_count": self.problem_count,
            "checkpoints": {
                "valid": self.checkpoints_valid,
                "unsigned": self.checkpoints_unsigned,
                "invalid": self.checkpoints_invalid,
                "unchecked": self.checkpoints_unchecked,
                "last_signed_seq": self.last_signed_seq,
            },
            "signatures_checked": self.signatures_checked,
        }


@dataclass
class ChainCheck:
    """Feed rows in ``seq`` order, then ``finish``. ``anchor`` is where the chain starts (0 and the
    genesis hash, or the last purge's cut)."""

    anchor_seq: int
    anchor_hash: str
    keys: KeyRing
    checkpoints: Mapping[int, list[Checkpoint]] = field(default_factory=dict[int, list[Checkpoint]])
    # Records older than this (ms) must be covered by a valid signed checkpoint (None: not checked).
    unsigned_before_ms: int | None = None
    _problems: list[Problem] = field(default_factory=list[Problem])
    _count: int = 0
    _records: int = 0
    _first: int | None = None
    _last_seq: int = -1
    _last_hash: str = ""
    _last_bad: bool = False
    _valid: int = 0
    _unsigned: int = 0
    _unchecked: int = 0
    _invalid: int = 0
    _last_signed: int | None = None
    _old_seq: int | None = None  # the newest record older than unsigned_before_ms

    def __post_init__(self) -> None:
        self._last_seq = self.anchor_seq
        self._last_hash = self.anchor_hash
        anchor_points = self.checkpoints.get(self.anchor_seq, [])
        for cp in anchor_points:  # the purge checkpoint that signs the cut
            self._check_signature(cp)
            if cp.hash != self.anchor_hash:
                self._problem(
                    cp.seq, "bad_checkpoint", "the chain's anchor differs from its signed checkpoint"
                )

    def _problem(self, seq: int, kind: str, message: str) -> None:
        self._count += 1
        if len(self._problems) < MAX_PROBLEMS:
            self._problems.append(Problem(seq, kind, message))

    def _check_signature(self, cp: Checkpoint) -> bool:
        if not cp.signature:
            self._unsigned += 1
            return False
        if not self.keys.keys:
            # No trusted key: the signature can be neither confirmed nor refuted. The report says so
            # (signatures_checked) rather than calling an intact, signed chain broken.
            self._unchecked += 1
            return False
        if self.keys.verify(cp.key_id, checkpoint_payload(cp.seq, cp.hash, cp.ts_ms, cp.kind), cp.signature):
            self._valid += 1
            self._last_signed = cp.seq if self._last_signed is None else max(self._last_signed, cp.seq)
            return True
        self._invalid += 1
        self._problem(cp.seq, "bad_checkpoint", f"checkpoint at {cp.seq} has an invalid signature")
        return False

    def feed(
        self,
        seq: int,
        body_text: str,
        stored_hash: str,
        stored_prev: str,
        cols: Mapping[str, Any] | None = None,
    ) -> None:
        self._records += 1
        if self._first is None:
            self._first = seq
        bad = False
        ts: Any = None
        expected = self._last_seq + 1
        gap = seq != expected
        if seq < expected:
            self._problem(seq, "altered", f"record {seq} is out of order (after {self._last_seq})")
            bad = True
        elif gap:
            missing = f"record {expected}" if seq == expected + 1 else f"records {expected} to {seq - 1}"
            self._problem(expected, "missing", f"{missing} missing")
        computed = record_hash(body_text)
        body: Any
        try:
            body = json.loads(body_text)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._problem(seq, "altered", f"record {seq} is not a JSON object")
            bad = True
        else:
            record: dict[str, Any] = body  # pyright: ignore[reportUnknownVariableType]
            ts = record.get("ts_ms")
            if computed != stored_hash:
                self._problem(seq, "altered", f"record {seq} does not match its hash (content changed)")
                bad = True
            elif record.get("seq") != seq or record.get("prev_hash") != stored_prev:
                self._problem(seq, "altered", f"record {seq}'s sequence or link columns were changed")
                bad = True
            elif cols is not None and columns(record) != dict(cols):
                self._problem(seq, "altered", f"record {seq}'s indexed columns disagree with the record")
                bad = True
            if not gap and not bad and not self._last_bad and record.get("prev_hash") != self._last_hash:
                # The previous record hashes correctly but not to what this one chains to: it was
                # rewritten and re-hashed (or this link was).
                self._problem(
                    self._last_seq,
                    "altered",
                    f"record {self._last_seq} was rewritten: record {seq} chains to a different hash",
                )
        for cp in self.checkpoints.get(seq, []):
            self._check_signature(cp)
            if cp.hash != computed:
                self._problem(seq, "altered", f"record {seq} differs from the signed checkpoint at {seq}")
                bad = True
        if self.unsigned_before_ms is not None and isinstance(ts, int) and ts < self.unsigned_before_ms:
            self._old_seq = seq
        self._last_seq = max(self._last_seq, seq)
        self._last_hash = computed
        self._last_bad = bad

    @property
    def last_hash(self) -> str:
        """The hash the last record fed actually has (recomputed, not as stored)."""
        return self._last_hash

    def finish(self, head_seq: int | None = None, *, head_hash: str | None = None) -> Report:
        end = self._last_seq if head_seq is None else head_seq
        if (
            head_hash is not None
            and head_seq == self._last_seq
            and self._records
            and head_hash != self._last_hash
        ):
            self._problem(
                self._last_seq, "altered", f"record {self._last_seq} does not match the chain's head"
            )
        if (
            self.keys.keys
            and self._old_seq is not None
            and (self._last_signed is None or self._last_signed < self._old_seq)
        ):
            start = (self._last_signed or self.anchor_seq) + 1
            self._problem(
                start,
                "unsigned",
                f"no valid signed checkpoint covers records {start} to {self._old_seq}, although they are "
                "old enough to have been signed (checkpoints deleted, or signed with an untrusted key)",
            )
        if head_seq is not None and head_seq > self._last_seq:
            self._problem(
                self._last_seq + 1, "truncated", f"records {self._last_seq + 1} to {head_seq} are missing"
            )
        beyond = [cp for seq, cps in self.checkpoints.items() if seq > max(end, self._last_seq) for cp in cps]
        for cp in beyond:
            if self._check_signature(cp):
                self._problem(
                    self._last_seq + 1,
                    "truncated",
                    f"a signed checkpoint covers record {cp.seq}, which is missing",
                )
        return Report(
            ok=self._count == 0,
            records=self._records,
            first_seq=self._first,
            last_seq=self._last_seq if self._records else None,
            problems=sorted(self._problems, key=lambda p: p.seq),
            problem_count=self._count,
            checkpoints_valid=self._valid,
            checkpoints_unsigned=self._unsigned,
            checkpoints_invalid=self._invalid,
            last_signed_seq=self._last_signed,
            signatures_checked=bool(self.keys.keys),
            checkpoints_unchecked=self._unchecked,
        )

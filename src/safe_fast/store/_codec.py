"""Rows <-> records: the text a durable store keeps, and its verification.

Data goes to the database as the canonical JSON the hash is computed over
(sorted keys, no whitespace), and comes back through ``json.loads``: for
plain JSON that round trip is exact (floats by ``repr``, integers of any
size), so a loaded record hashes to what was stored. Data that is not plain
JSON (tuples, sets, other objects, NaN) would not come back as it was, so a
durable store refuses it with :exc:`ValueError` instead of storing a record
that would no longer verify.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..sharedata import GENESIS_HASH, TransactionRecord, _dumps, _is_plain_json, _record_hash
from .errors import CorruptShareData, SchemaVersionError

SCHEMA_VERSION = 1
"""Version of the database layout this code writes and reads."""

__all__ = [
    "SCHEMA_VERSION",
    "StoredShareData",
    "check_schema_version",
    "decode_stored",
    "encode_json",
    "record_row",
    "verify_tail",
]


@dataclass(frozen=True, slots=True)
class StoredShareData:
    """What a store holds for one id (or, with ``after > 0``, the records after ``after``).

    ``head_hash`` is the hash of the last stored record (``GENESIS_HASH`` for
    an empty history), ``last_id`` its transaction id as a number.
    """

    id: str
    incarnation: str
    public_key: Optional[str]
    current_state: Any
    records: list[TransactionRecord] = field(default_factory=list)
    after: int = 0
    last_id: int = 0
    head_hash: str = GENESIS_HASH


def new_incarnation() -> str:
    return uuid.uuid4().hex


def encode_json(value: Any, what: str) -> str:
    """The canonical JSON text of ``value``; ValueError naming ``what`` if it is not plain JSON."""
    if not _is_plain_json(value):
        raise ValueError(f"{what} cannot be kept by a durable store: it is not plain JSON")
    return _dumps(value)


def decode_json_text(share_data_id: str, text: Any, what: str) -> Any:
    if not isinstance(text, str):
        raise CorruptShareData(share_data_id, f"{what} is not text")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CorruptShareData(share_data_id, f"{what} does not decode: {exc}") from None


def record_row(record: TransactionRecord) -> tuple[int, Optional[str], str, bool, float, str, str, str]:
    """(seq, function_id, proposed_data, accepted, timestamp, proof, prev_hash, hash) to store."""
    return (
        int(record.transaction_id),
        record.function_id,
        encode_json(record.proposed_data, "proposed data"),
        record.accepted,
        record.timestamp,
        encode_json(record.proof, "proof"),
        record.prev_hash,
        record.hash,
    )


def decode_record(share_data_id: str, row: Iterable[Any]) -> TransactionRecord:
    seq, function_id, proposed_text, accepted, timestamp, proof_text, prev_hash, digest = row
    where = f"transaction {seq}"
    if function_id is not None and not isinstance(function_id, str):
        raise CorruptShareData(share_data_id, f"{where}: function id is not text")
    if not isinstance(accepted, (bool, int)) or not isinstance(timestamp, (float, int)):
        raise CorruptShareData(share_data_id, f"{where}: accepted/timestamp have the wrong type")
    if not isinstance(prev_hash, str) or not isinstance(digest, str):
        raise CorruptShareData(share_data_id, f"{where}: hashes are not text")
    return TransactionRecord(
        transaction_id=str(seq),
        function_id=function_id,
        proposed_data=decode_json_text(share_data_id, proposed_text, f"{where}: proposed data"),
        accepted=bool(accepted),
        timestamp=float(timestamp),
        proof=decode_json_text(share_data_id, proof_text, f"{where}: proof"),
        prev_hash=prev_hash,
        hash=digest,
    )


def verify_tail(
    share_data_id: str, records: list[TransactionRecord], after: int, prev_hash: str, head_hash: str
) -> None:
    """Raise :class:`CorruptShareData` unless ``records`` continue the chain at ``after``/``prev_hash``
    without a gap and end at ``head_hash``."""
    for offset, record in enumerate(records, after + 1):
        if record.transaction_id != str(offset):
            raise CorruptShareData(share_data_id, f"transaction {offset} is missing (found {record.transaction_id})")
        if record.prev_hash != prev_hash:
            raise CorruptShareData(share_data_id, f"transaction {offset} does not chain to the one before it")
        try:
            expected = _record_hash(record)
        except ValueError:
            expected = ""
        if record.hash != expected:
            raise CorruptShareData(share_data_id, f"transaction {offset} does not match its hash")
        prev_hash = record.hash
    if prev_hash != head_hash:
        raise CorruptShareData(share_data_id, "the history does not end at the stored head hash")


def check_schema_version(version: Any, where: str) -> None:
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{where} has store schema version {version!r}; this safe_fast knows versions up to {SCHEMA_VERSION}:"
            " upgrade safe_fast rather than let an older version write to it"
        )


def decode_stored(share_data_id: str, row: Any, record_rows: list[Any], after: int) -> StoredShareData:
    """A ShareData row and its record rows after ``after``, decoded; a whole history is verified."""
    incarnation, public_key, state_text, last_id, head_hash = row
    if not isinstance(incarnation, str) or not isinstance(head_hash, str) or not isinstance(last_id, int):
        raise CorruptShareData(share_data_id, "the ShareData row has the wrong column types")
    if public_key is not None and not isinstance(public_key, str):
        raise CorruptShareData(share_data_id, "its public key is not text")
    state = decode_json_text(share_data_id, state_text, "the current state")
    records = [decode_record(share_data_id, raw) for raw in record_rows]
    if after + len(records) != last_id:
        raise CorruptShareData(
            share_data_id, f"the row says {last_id} transactions, the history holds {after + len(records)}"
        )
    if after == 0:
        verify_tail(share_data_id, records, 0, GENESIS_HASH, head_hash)
    elif records and records[-1].hash != head_hash:
        raise CorruptShareData(share_data_id, "the history does not end at the stored head hash")
    return StoredShareData(share_data_id, incarnation, public_key, state, records, after, last_id, head_hash)

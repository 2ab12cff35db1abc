"""Decision record bytes: ``orjson`` for the record, ``json`` where a value is not finite.

Encoding was most of a record's CPU, and most of that was formatting floats (a
record holds every feature twice, as sent and as scored): ``json.dumps`` and a
hand-built text alike pay CPython's ``float.__repr__`` per value; ``orjson`` formats
them (shortest round-trip digits, like ``repr``) about 14 times faster per record.
What never changes for a version is encoded once into a :class:`VersionParts`
(lineage, the all-``request`` feature sources) and spliced in as ``orjson.Fragment``.

``orjson`` writes a non-finite float as ``null``; the record keeps the ``json``
extension instead (``NaN``, ``Infinity``, ``-Infinity``: a NaN feature value the
manifest allows must read back as NaN, which Python's ``json`` does). So a record
with any non-finite number in it is encoded by ``json`` as before. Other differences
from ``json.dumps`` are spelling only, the parsed record is equal: non-ASCII text as
UTF-8 rather than ``\\u`` escapes, exponents as ``1e-5`` rather than ``1e-05``.

Pure: no I/O, no state beyond what the caller keeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from server.explain.reasons import Reason
    from server.lineage import Lineage

__all__ = ["VersionParts", "encode_record", "finite", "lineage_json", "reasons_json"]

_json_dumps = json.JSONEncoder(separators=(",", ":")).encode


def lineage_json(lineage: Lineage | None) -> dict[str, str] | None:
    """The record's ``lineage`` object."""
    if lineage is None:
        return None
    return {
        "data_snapshot": lineage.data_snapshot,
        "code_commit": lineage.code_commit,
        "created_at": lineage.created_at,
        "algorithm": lineage.algorithm,
        "explainer_sha256": lineage.explainer_sha256,
    }


def reasons_json(reasons: Sequence[Reason]) -> list[dict[str, Any]]:
    """Reasons as JSON values (code, text, contribution, features behind it)."""
    return [
        {
            "code": reason.code,
            "text": reason.text,
            "contribution": reason.contribution,
            "features": [
                {"name": f.name, "value": f.value, "contribution": f.contribution}
                for f in reason.features
            ],
        }
        for reason in reasons
    ]


@dataclass(frozen=True, slots=True, eq=False)
class VersionParts:
    """What every record of one version shares, encoded once."""

    names: tuple[str, ...]
    lineage_value: dict[str, str] | None
    lineage: orjson.Fragment
    #: The ``feature_sources`` object when every value was sent.
    all_request_sources: orjson.Fragment

    @classmethod
    def build(cls, names: Sequence[str], lineage: Lineage | None) -> VersionParts:
        """The shared parts of a version with features ``names`` and ``lineage``."""
        names = tuple(names)
        value = lineage_json(lineage)
        return cls(
            names=names,
            lineage_value=value,
            lineage=orjson.Fragment(orjson.dumps(value)),
            all_request_sources=orjson.Fragment(orjson.dumps(dict.fromkeys(names, "request"))),
        )

    def plain(self, value: object) -> object:
        """``value`` with this version's fragments as the values they encode."""
        if value is self.lineage:
            return self.lineage_value
        if value is self.all_request_sources:
            return dict.fromkeys(self.names, "request")
        return value


def finite(numbers: Iterable[float]) -> bool:
    """True when every number is finite (``False`` also for a value that is not a number).

    One sum: an inf or a NaN anywhere makes it inf or NaN (a finite sum that overflows
    says ``False`` too, which only costs the slower encoder)."""
    try:
        return math.isfinite(sum(numbers))
    except TypeError:
        return False


def _reason_numbers(reasons: Sequence[Mapping[str, Any]]) -> list[float]:
    out: list[float] = []
    for reason in reasons:
        out.append(reason["contribution"])
        for feature in reason["features"]:
            out.append(feature["value"])
            out.append(feature["contribution"])
    return out


def encode_record(record: Mapping[str, Any], parts: VersionParts | None = None) -> bytes:
    """``record`` (the documented schema; it may hold the fragments of ``parts``) as
    JSON: by ``orjson`` when every float in it is finite, else by ``json`` (``NaN``,
    ``Infinity``), with the fragments' own values."""
    numbers = [record["ts"], record["score"], record["threshold"], record["reasons_base_value"]]
    reasons = record["reasons"]
    if reasons:
        numbers.extend(_reason_numbers(reasons))
    if (
        finite(numbers)
        and finite(record["features"].values())
        and finite(record["request"]["features"].values())
    ):
        try:
            return orjson.dumps(record)
        except TypeError:  # a value orjson does not know: json's own error or spelling
            pass
    if parts is not None:
        record = {k: parts.plain(v) for k, v in record.items()}
    return _json_dumps(record).encode()

"""Cutting a JSON record down to a size limit: long strings truncated and marked.

Numbers, booleans and the structure (so every feature value) are kept; each string
longer than a cap is cut to the cap and ends with ``…[+N chars]``; the top-level
object gains ``"truncated": {"max_string_chars": cap}``. The cap halves until the
record fits or reaches ``MIN_CAP`` (then the smallest form is returned and the
sink drops it as too large).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MIN_CAP", "shrink_json"]

MIN_CAP = 16
_START_CAP = 4096


def _cut(value: Any, cap: int) -> Any:
    if isinstance(value, str):
        if len(value) <= cap:
            return value
        return f"{value[:cap]}…[+{len(value) - cap} chars]"
    if isinstance(value, dict):
        return {_cut(k, cap): _cut(v, cap) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v, cap) for v in value]
    return value


def shrink_json(value: bytes, limit: int) -> bytes:
    """``value`` (a JSON document) with long strings truncated until it is <= ``limit`` bytes.

    Raises ``ValueError`` when ``value`` is not JSON (the sink then drops it as too large).
    """
    document = json.loads(value)
    cap = _START_CAP
    while True:
        cut = _cut(document, cap)
        if isinstance(cut, dict):
            cut["truncated"] = {"max_string_chars": cap}
        out = json.dumps(cut, separators=(",", ":"), ensure_ascii=False).encode()
        if len(out) <= limit or cap <= MIN_CAP:
            return out
        cap = max(MIN_CAP, cap // 2)

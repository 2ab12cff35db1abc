"""Entity keys: the one rule turning a raw entity id into the key the stores use.

Every path that names an entity calls this module (through
:meth:`feature_streams.definitions.Entity.key` / ``Entity.key_problem``): the batch
loader, the backfill (spine ids and event keys), the stream worker (event keys) and the
server (request ids). So ``" c-1"`` from Kafka and ``"c-1"`` from a batch file are
one entity, and a request for ``"042"`` is refused rather than served defaults.

The rule, by ``key_type``:

* ``str``: text with its surrounding whitespace (``str.strip``) removed; everything
  else (case, inner spaces, leading zeros) is kept. An integer (JSON number, Parquet
  int column) is its decimal text; so is an integral float (``7.0`` -> ``"7"``,
  a Parquet/pandas int column with nulls).
* ``int``: the decimal text of an integer, without sign for non-negative values and
  without leading zeros: ``-?(0|[1-9][0-9]*)``. Accepted spellings: an integer, an
  integral float, or text that, once stripped, is an optional sign, ASCII digits and an
  optional all-zero fraction (``" 042 "``, ``"+42"``, ``"42.0"`` -> ``"42"``;
  ``"-0"`` -> ``"0"``). Refused: exponents (``"4.2e1"``), underscores, fractions
  (``"42.5"``), non-ASCII digits.
* Both: empty text, booleans, NaN/infinite or fractional floats and any other type
  are refused with :class:`EntityKeyError` saying why.

Offline writers (batch loader, backfill, stream worker) map every accepted spelling
to its key with :func:`entity_key`, refusing the rest (the loader names column and row,
the worker dead-letters the record, the backfill refuses the spine or drops the event
as the worker would). The server takes only canonical keys: :func:`key_problem` says
why an id is not its own key, and the server answers INVALID_ARGUMENT naming
``entity_ids.<entity>``. A caller sending another spelling has a bug that silent
normalising would hide (its stickiness hash, its logs and ours would name different
entities).

Pure: no I/O and no imports beyond the standard library.
"""

from __future__ import annotations

import math
import re
from typing import Final, Literal

__all__ = ["EntityKeyError", "KeyType", "entity_key", "key_problem"]

KeyType = Literal["str", "int"]

_INT_TEXT: Final = re.compile(r"([+-]?)([0-9]+)(?:\.0+)?", re.ASCII)


class EntityKeyError(ValueError):
    """A raw id that no key can be made of; the message says why."""


def entity_key(key_type: KeyType, raw: object) -> str:
    """The key of ``raw`` under ``key_type`` (see the module docstring for the rule);
    raises :class:`EntityKeyError`."""
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            raise EntityKeyError("empty entity id")
        if key_type == "str":
            return text
        match = _INT_TEXT.fullmatch(text)
        if match is None:
            raise EntityKeyError(f"{raw!r} is not an integer id")
        sign, digits = match.groups()
        digits = digits.lstrip("0") or "0"
        return "-" + digits if sign == "-" and digits != "0" else digits
    if isinstance(raw, bool):
        raise EntityKeyError(f"{raw!r} is not an entity id")
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        if math.isfinite(raw) and raw.is_integer():
            return str(int(raw))
        raise EntityKeyError(f"{raw!r} is not an integer id")
    raise EntityKeyError(f"{raw!r} is not an entity id")


def key_problem(key_type: KeyType, text: str) -> str | None:
    """``None`` when ``text`` is already its own key, else why it is not (for the server,
    which refuses non-canonical ids)."""
    try:
        key = entity_key(key_type, text)
    except EntityKeyError as exc:
        return f"{exc} (key_type {key_type})"
    if key != text:
        return f"{text!r} is not a canonical {key_type} id (send {key!r})"
    return None

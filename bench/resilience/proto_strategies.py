"""Hypothesis strategies built from protobuf descriptors, and byte-level mutations.

``message_strategy`` walks a message descriptor's fields: scalars at their extremes
(huge, negative, NaN and infinite floats, integer bounds), long and odd strings, maps
with many keys, repeated fields, nested messages (depth-limited) and raw bytes.
``mutated`` damages a serialized message (bit flips, cut, splice, duplicated or
random spans), which yields invalid UTF-8, bad lengths and unknown tags on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

#: Nesting depth below which message fields are left unset (Struct/Value recurse).
MAX_DEPTH = 3

_INT_BOUNDS: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, 0, -1, 1, 2**31 - 1, -(2**31), 2**53 + 1) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(-10, 5000))


def _floats() -> st.SearchStrategy[float]:
    edges = [math.nan, math.inf, -math.inf, 1e308, -1e308, 3.5e38, -0.0, 5e-324, 1e-45]
    return st.one_of(st.sampled_from(edges), st.floats(allow_nan=True, allow_infinity=True))


def _long_text() -> st.SearchStrategy[str]:
    """Long strings: repeated characters up to ~1 MiB (bounded by the gRPC message cap)."""
    return st.builds(
        lambda ch, n: ch * n,
        st.sampled_from(["x", "é", "\u202e", "\x00", "💥", "../", "%s"]),
        st.sampled_from([256, 4096, 65_537]),
    )


def _text() -> st.SearchStrategy[str]:
    # Lone surrogates cannot be encoded as UTF-8: invalid UTF-8 comes from ``mutated``.
    plain = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
    return st.one_of(plain, st.sampled_from(["", " ", "lin", "1", "2", "*", "\x00"]), _long_text())


def _binary() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=256),
        st.builds(
            lambda n, b: b * n, st.sampled_from([1024, 65_536]), st.binary(min_size=1, max_size=8)
        ),
    )


def scalar_strategy(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Values of one non-message field, extremes included."""
    kind = field.type
    if kind in _INT_BOUNDS:
        return _ints(*_INT_BOUNDS[kind])
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _floats()
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return _text()
    if kind == FieldDescriptor.TYPE_BYTES:
        return _binary()
    if kind == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        assert enum is not None
        known = [value.number for value in enum.values]
        return st.one_of(st.sampled_from(known), _ints(-(2**31), 2**31 - 1))
    raise TypeError(f"unsupported field type {kind} of {field.full_name}")


def _value_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        return message_strategy(_message_type(field), depth + 1)
    return scalar_strategy(field)


def _message_type(field: FieldDescriptor) -> Descriptor:
    message_type = field.message_type
    assert message_type is not None, field.full_name
    return message_type


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and bool(
        _message_type(field).GetOptions().map_entry
    )


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _field_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(field):
        entry = _message_type(field)
        keys = scalar_strategy(entry.fields_by_name["key"])
        values = _value_strategy(entry.fields_by_name["value"], depth)
        small = st.dictionaries(keys, values, max_size=6)
        many = st.builds(
            lambda n, v: {_many_key(entry.fields_by_name["key"], i): v for i in range(n)},
            st.sampled_from([100, 2_000]),
            values,
        )
        return st.one_of(small, small, small, many)
    if _repeated(field):
        values = _value_strategy(field, depth)
        small_list = st.lists(values, max_size=6)
        many_list = st.builds(lambda n, v: [v] * n, st.sampled_from([100, 5_000]), values)
        return st.one_of(small_list, small_list, small_list, many_list)
    return _value_strategy(field, depth)


def _many_key(key_field: FieldDescriptor, i: int) -> Any:
    if key_field.type == FieldDescriptor.TYPE_STRING:
        return f"k{i}"
    if key_field.type == FieldDescriptor.TYPE_BOOL:
        return bool(i % 2)
    return i


#: Bytes one field of a generated message may hold (its items past it are left out):
#: above the server's 4 MiB message cap, so oversize messages are still sent, but a
#: repeated message inside a repeated message (5,000 x 5,000 x 64 KiB) cannot exhaust
#: the fuzzer's own memory (a 100,000-case run was OOM-killed at 24 GB).
FIELD_BUDGET_BYTES = 6 * 1024 * 1024


def _size(item: Any) -> int:
    if isinstance(item, Message):
        return item.ByteSize() + 8
    if isinstance(item, str | bytes):
        return 4 * len(item) + 8
    return 16


def _entry_size(entry: tuple[Any, Any]) -> int:
    return _size(entry[0]) + _size(entry[1])


def _within_budget(items: Any, size: Callable[[Any], int] = _size) -> list[Any]:
    """The leading ``items`` whose estimated wire size fits ``FIELD_BUDGET_BYTES``."""
    kept, used = [], 0
    for item in items:
        used += size(item)
        if used > FIELD_BUDGET_BYTES:
            break
        kept.append(item)
    return kept


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    """Set ``value`` on ``message`` within ``FIELD_BUDGET_BYTES``; values the runtime
    refuses leave the field unset."""
    target = getattr(message, field.name)
    try:
        if _is_map(field):
            value_field = _message_type(field).fields_by_name["value"]
            for key, item in _within_budget(value.items(), _entry_size):
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif _repeated(field):
            target.extend(_within_budget(value))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if _size(value) <= FIELD_BUDGET_BYTES:
                target.CopyFrom(value)
        else:
            setattr(message, field.name, value)
    except (ValueError, TypeError, OverflowError):
        message.ClearField(field.name)


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of fields set to hostile values."""
    cls: Callable[[], Message] = message_factory.GetMessageClass(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    fields = {field.name: field for field in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            _assign(message, fields[name], value)
        return message

    optional = {
        name: st.deferred(lambda f=field: _field_strategy(f, depth))  # type: ignore[misc]
        for name, field in fields.items()
    }
    return st.fixed_dictionaries({}, optional=optional).map(build)


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply byte-level operations ``(kind, position, value)`` to ``data``."""
    buffer = bytearray(data)
    for kind, position, value in ops:
        at = position % (len(buffer) + 1)
        match kind % 6:
            case 0 if buffer:  # flip bits of one byte
                buffer[at % len(buffer)] ^= (value % 255) + 1
            case 1:  # insert a byte
                buffer.insert(at, value % 256)
            case 2:  # delete a span
                del buffer[at : at + 1 + value % 16]
            case 3:  # truncate
                del buffer[at:]
            case 4:  # duplicate a span (repeated tags, overlong lengths)
                buffer[at:at] = buffer[at : at + 1 + value % 64]
            case 5:  # an extreme varint / length prefix
                buffer[at:at] = bytes([0xFF] * (1 + value % 10)) + b"\x01"
            case _:
                buffer.insert(at, value % 256)
    return bytes(buffer)


def mutation_ops() -> st.SearchStrategy[list[tuple[int, int, int]]]:
    """One to eight byte-level operations for :func:`mutate`."""
    op = st.tuples(st.integers(0, 5), st.integers(0, 2**20), st.integers(0, 2**16))
    return st.lists(op, min_size=1, max_size=8)

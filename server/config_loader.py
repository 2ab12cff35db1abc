"""Layered, keyed loading of a frozen pydantic model: defaults < YAML < env < ``--set``.

Sources, later wins::

    the model's defaults  <  YAML file  <  <PREFIX>* env vars  <  --set key.path=value

Env vars: the prefix, ``__`` between levels, names lower-cased (with prefix
``STREAMSCORE_``, ``STREAMSCORE_MODELS__DEFAULTS__MAX_BATCH_SIZE=32`` is
``models.defaults.max_batch_size``). Env and ``--set`` values are read as YAML
scalars/flow collections (``null``, ``[1, 2]``, ``'quoted'``); numbers and booleans
are handed to the field as text so that the field's type decides (``0123`` stays
``"0123"`` for a string field).

Relative paths are relative to the working directory, not to the config file.
Unknown keys are errors. Every problem is reported in one :class:`SettingsError`
naming the dotted key and where the value came from, never the value itself
(values may be secrets). A model's cross-field validators raise :class:`KeyedError`
to name the keys a problem involves. Knows nothing of any particular schema
(``server.settings`` is the server's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["Issue", "KeyedError", "SettingsError", "load_layers"]

ENV_NESTING = "__"
_DEFAULT_SOURCE = "default"

M = TypeVar("M", bound=BaseModel)
Key = tuple[str, ...]
#: One cross-field problem: its message and the keys (relative to the validated model) involved.
Issue = tuple[str, tuple[Key, ...]]


class SettingsError(Exception):
    """Settings could not be loaded; the message lists every bad key and its source."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        head = f"{count} invalid setting{'s' if count != 1 else ''}:"
        super().__init__("\n  ".join([head, *self.problems]))


class KeyedError(ValueError):
    """Cross-field problems, each a message plus the keys (relative to the validated model)
    involved: the first key is the one reported, all keys' sources are named."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        super().__init__("; ".join(message for message, _ in issues))
        self.issues = tuple(issues)

    @classmethod
    def one(cls, message: str, *keys: tuple[str, ...]) -> KeyedError:
        """A single problem."""
        return cls([(message, keys)])


def load_layers(
    model: type[M],
    config_path: Path | None,
    env: Mapping[str, str],
    overrides: Sequence[str],
    *,
    env_prefix: str,
) -> M:
    """Validate ``model`` from its defaults < ``config_path`` < the ``env_prefix``
    entries of ``env`` < ``overrides`` (``--set`` values, ``key.path=value``).

    Raises :class:`SettingsError` listing every bad key with its source.
    """
    merged: dict[str, Any] = {}
    sources: dict[Key, str] = {}
    problems: list[str] = []
    if config_path is not None:
        try:
            layer = _read_file(config_path)
        except SettingsError as exc:
            problems.extend(exc.problems)
        else:
            label = f"file {config_path}"
            for name, value in layer.items():
                _put(merged, sources, (str(name),), value, label)
    for name in sorted(env):
        if not name.startswith(env_prefix):
            continue
        key = tuple(part.lower() for part in name[len(env_prefix) :].split(ENV_NESTING))
        if not all(key):
            problems.append(f"{name}: malformed settings env var name (from env {name})")
            continue
        _put(merged, sources, key, _parse_value(env[name]), f"env {name}")
    for item in overrides:
        path, sep, text = item.partition("=")
        key = tuple(part.strip() for part in path.split("."))
        if not sep or not all(key):
            problems.append(f"{item}: expected key.path=value (from --set {item})")
            continue
        _put(merged, sources, key, _parse_value(text), f"--set {path.strip()}")
    validated: M | None = None
    try:
        validated = model.model_validate(merged)
    except ValidationError as exc:
        problems.extend(_describe(exc, sources))
    if problems or validated is None:
        raise SettingsError(problems)
    return validated


def _read_file(path: Path) -> dict[Any, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError([f"cannot read config file {path}: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SettingsError([f"config file {path}{where}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError([f"config file {path}: top level must be a mapping of sections"])
    return data


def _parse_value(text: str) -> Any:
    """YAML-read ``text``; numbers, booleans and dates stay text for the field to parse."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None or isinstance(value, str | list | dict):
        return value
    return text.strip()


def _put(target: dict[str, Any], sources: dict[Key, str], key: Key, value: Any, label: str) -> None:
    """Set ``key`` to ``value`` (mappings merge key by key) and record ``label`` as its source."""
    if isinstance(value, Mapping) and value:
        for name, item in value.items():
            _put(target, sources, (*key, str(name)), item, label)
        return
    node = target
    for depth, part in enumerate(key[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
            sources.pop(key[: depth + 1], None)
        node = child
    node[key[-1]] = value
    for stale in [k for k in sources if k[: len(key)] == key]:
        del sources[stale]
    sources[key] = label


def _describe(exc: ValidationError, sources: Mapping[Key, str]) -> list[str]:
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, KeyedError):
            for message, keys in cause.issues:
                full = [(*loc, *key) for key in keys]
                problems.append(_problem(full[0], message, full, sources))
        elif error["type"] == "extra_forbidden":
            # Name the key as the user wrote it (``bogus.x``), from each layer that set it.
            key = tuple(str(part) for part in loc)
            given = sorted(k for k in sources if k[: len(key)] == key) or [key]
            for full_key in given:
                message = "unknown key" if full_key == key else f"unknown key {_dotted(loc)!r}"
                problems.append(_problem(full_key, message, [full_key], sources))
        elif loc and loc[-1] == "[key]":  # a dict key (model name) failed validation
            problems.append(_problem(loc[:-1], f"bad name: {error['msg']}", [loc[:-1]], sources))
        else:
            problems.append(_problem(loc, error["msg"], [loc], sources))
    return problems


def _problem(
    key: tuple[str | int, ...],
    message: str,
    involved: Sequence[tuple[str | int, ...]],
    sources: Mapping[Key, str],
) -> str:
    labels: list[str] = []
    for item in involved:
        label = _source_of(tuple(str(part) for part in item), sources)
        if label not in labels:
            labels.append(label)
    return f"{_dotted(key)}: {message} (from {', '.join(labels)})"


def _source_of(key: Key, sources: Mapping[Key, str]) -> str:
    """The layer that set ``key`` or the value containing it, else the layers that set keys
    inside it, else the built-in default."""
    for end in range(len(key), 0, -1):
        label = sources.get(key[:end])
        if label is not None:
            return label
    inner = {label: None for k, label in sources.items() if k[: len(key)] == key}
    return ", ".join(inner) or _DEFAULT_SOURCE


def _dotted(key: tuple[str | int, ...]) -> str:
    text = ""
    for part in key:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text

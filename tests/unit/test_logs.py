"""Logging: JSON lines with extras and tracebacks, plain text, idempotent setup."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import pytest

from server.logs import configure_logging


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_json_line_has_core_fields_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json=True)
    logging.getLogger("server.registry").info(
        "loaded %s", "fraud", extra={"model": "fraud", "version": "3", "request_id": "r-1"}
    )
    (line,) = lines(capsys)
    record = json.loads(line)
    assert record["level"] == "INFO"
    assert record["logger"] == "server.registry"
    assert record["msg"] == "loaded fraud"
    assert (record["model"], record["version"], record["request_id"]) == ("fraud", "3", "r-1")
    ts = datetime.fromisoformat(record["ts"])
    assert ts.utcoffset() is not None
    assert ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert "exc_info" not in record


def test_json_exception_is_a_string(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json=True)
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        logging.getLogger("x").exception("failed", extra={"model": "fraud"})
    (line,) = lines(capsys)  # the traceback stays inside one JSON line
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert isinstance(record["exc_info"], str)
    assert "RuntimeError: kaput" in record["exc_info"]
    assert record["model"] == "fraud"


def test_json_odd_extras_do_not_break_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json=True)
    logging.getLogger("x").info("m", extra={"obj": object(), "level": "shadowed", "n": 1.5})
    record = json.loads(lines(capsys)[0])
    assert record["obj"].startswith("<object")
    assert record["level"] == "INFO"
    assert record["extra_level"] == "shadowed"
    assert record["n"] == 1.5


def test_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", json=True)
    log = logging.getLogger("x")
    log.info("hidden")
    log.warning("shown")
    assert [json.loads(line)["msg"] for line in lines(capsys)] == ["shown"]


def test_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG", json=False)
    logging.getLogger("server.app").debug("started", extra={"port": 50051})
    (line,) = lines(capsys)
    assert " DEBUG server.app: started port=50051" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_idempotent_and_switchable(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json=True)
    configure_logging("INFO", json=True)
    logging.getLogger("x").info("once")
    assert len(lines(capsys)) == 1
    configure_logging("INFO", json=False)
    logging.getLogger("x").info("plain")
    (line,) = lines(capsys)
    assert line.endswith("x: plain")


def test_unknown_level_refused() -> None:
    with pytest.raises(ValueError, match="loud"):
        configure_logging("loud", json=True)

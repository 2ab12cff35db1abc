"""``streamscore stream``: the worker's one command line maps settings and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import build_parser, main
from server.settings import load_settings
from server.stream_cli import worker_config

FEATURES = str(Path(__file__).resolve().parents[2] / "features.yaml")


def test_settings_and_flags_make_the_worker_config() -> None:
    sets = [
        "kafka.bootstrap_servers=k:1",
        "redis.url=redis://r:2/0",
        "kafka.group_id=g",
        "kafka.fetch_max_wait_ms=7",
    ]
    argv = ["stream", *(w for s in sets for w in ("--set", s))]
    argv += ["--metrics-port", "0", "--metrics-host", "0.0.0.0", "--stream-group", "a"]
    argv += ["--stream-group", "b", "--commit-interval-s", "2.5", "--max-batch-records", "9"]
    argv += ["--session-timeout-ms", "1000", "--heartbeat-interval-ms", "250"]
    argv += ["--trim-interval-s", "5", "--max-event-ahead-ms", "-1"]
    argv += ["--redis-timeout-s", "0.25", "--max-events-per-call", "7", "--script-retries", "2"]
    args = build_parser().parse_args(argv)
    config = worker_config(load_settings(None, {}, args.overrides), args)
    assert (config.bootstrap_servers, config.redis_url, config.group_id) == (
        "k:1",
        "redis://r:2/0",
        "g",
    )
    assert config.fetch_max_wait_ms == 7
    assert (config.metrics_port, config.metrics_host) == (0, "0.0.0.0")
    assert config.stream_groups == ("a", "b")
    assert (config.commit_interval_s, config.max_batch_records) == (2.5, 9)
    assert (config.session_timeout_ms, config.heartbeat_interval_ms) == (1000, 250)
    assert config.trim_interval_s == 5.0
    assert config.max_event_ahead_ms is None
    assert (config.redis_timeout_s, config.max_events_per_call, config.script_retries) == (
        0.25,
        7,
        2,
    )
    defaults = worker_config(load_settings(None, {}, []), build_parser().parse_args(["stream"]))
    assert defaults.max_event_ahead_ms == 86_400_000
    assert defaults.metrics_port is None
    assert (defaults.redis_timeout_s, defaults.max_events_per_call, defaults.script_retries) == (
        5.0,
        500,
        3,
    )


def test_a_bad_flag_value_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["stream", "--set", f"features.definitions_path={FEATURES}"]
    assert main([*argv, "--max-batch-records", "0"]) == 2
    err = capsys.readouterr().err
    assert "streamscore stream: max_batch_records" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--redis-timeout-s", "0"), ("--max-events-per-call", "0"), ("--script-retries", "0")],
)
def test_a_bad_failure_flag_is_a_clear_error(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["stream", "--set", f"features.definitions_path={FEATURES}", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "redis_timeout_s must be > 0" in err and "Traceback" not in err, err

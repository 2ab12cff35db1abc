"""Settings: precedence, error messages naming key and source, per-model merging."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.feature_store import redis_options
from server.settings import ModelServing, Settings, SettingsError, load_settings

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "streamscore.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamscore.yaml"
    path.write_text(text)
    return path


def problems_of(
    config: Path | None = None, env: dict[str, str] | None = None, sets: list[str] | None = None
) -> tuple[str, ...]:
    with pytest.raises(SettingsError) as caught:
        load_settings(config, env or {}, sets or [])
    assert str(caught.value).count("\n") == len(caught.value.problems)  # header + one per line
    return caught.value.problems


def test_defaults() -> None:
    settings = load_settings(None, {}, [])
    assert settings.server.port == 50051
    assert settings.server.metrics_port == 9464
    assert settings.server.max_receive_message_bytes == 4 * 1024 * 1024
    assert settings.server.admin_token is None
    assert settings.models.repository == Path("models")
    assert settings.models.defaults == ModelServing()
    assert settings.models.defaults.execution == "inline"
    assert settings.logging.level == "INFO"
    assert settings.logging.json_format is True
    assert settings.redis.failure_policy == "degrade"
    assert settings.kafka.events_topic == "transactions"
    assert settings.features.definitions_path is None  # no feature store unless configured


def test_precedence_file_then_env_then_set(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "server:\n  port: 6001\n  metrics_port: 7001\n  processes: 3\n"
        "models:\n  defaults:\n    max_batch_size: 8\n",
    )
    env = {
        "STREAMSCORE_SERVER__METRICS_PORT": "7002",
        "STREAMSCORE_SERVER__PROCESSES": "4",
        "STREAMSCORE_MODELS__DEFAULTS__MAX_BATCH_SIZE": "32",
        "UNRELATED": "ignored",
    }
    settings = load_settings(config, env, ["server.processes=5"])
    assert settings.server.port == 6001  # file only
    assert settings.server.metrics_port == 7002  # env beats file
    assert settings.server.processes == 5  # --set beats env and file
    assert settings.models.defaults.max_batch_size == 32
    assert settings.server.host == "127.0.0.1"  # untouched default


def test_values_are_typed(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {
            "STREAMSCORE_LOGGING__JSON": "false",
            "STREAMSCORE_MODELS__REPOSITORY": "/models",
            "STREAMSCORE_MODELS__DEFAULTS__VERSIONS": "[3, 4]",
        },
        [
            "logging.level=debug",
            "server.admin_token=0123",  # stays text, not the YAML octal 83
            "models.defaults.max_queue_delay_ms=2.5",
            "models.defaults.champion=4",
        ],
    )
    assert settings.logging.json_format is False
    assert settings.logging.level == "DEBUG"
    assert settings.models.repository == Path("/models")
    assert isinstance(settings.models.repository, Path)
    assert settings.models.defaults.versions == ("3", "4")
    assert settings.models.defaults.champion == "4"
    assert settings.models.defaults.max_queue_delay_ms == 2.5
    assert settings.server.admin_token is not None
    assert settings.server.admin_token.get_secret_value() == "0123"
    assert "0123" not in repr(settings)


def test_set_null_clears_a_file_value(tmp_path: Path) -> None:
    config = write(tmp_path, "models:\n  defaults:\n    versions: [1]\n")
    settings = load_settings(config, {}, ["models.defaults.versions=null"])
    assert settings.models.defaults.versions is None


def test_env_mapping_merges_into_file_section(tmp_path: Path) -> None:
    config = write(tmp_path, "server:\n  port: 6001\n")
    settings = load_settings(config, {}, ["server={metrics_port: 0}"])
    assert settings.server.port == 6001
    assert settings.server.metrics_port == 0


def test_repo_default_config_is_valid() -> None:
    settings = load_settings(REPO_CONFIG, {}, [])
    assert settings.models.repository == Path("models")
    assert settings.serving_for("fraud") == settings.models.defaults  # the demo runs on defaults


def test_serving_for_merges_overrides_onto_defaults(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "models:\n"
        "  defaults:\n    max_batch_size: 16\n    execution: thread\n    versions: [1, 2]\n"
        "  per_model:\n"
        "    fraud:\n      max_queue_delay_ms: 2\n      champion: 2\n"
        "    credit:\n      versions: null\n",
    )
    settings = load_settings(
        config, {"STREAMSCORE_MODELS__PER_MODEL__FRAUD__MAX_BATCH_SIZE": "64"}, []
    )
    fraud = settings.serving_for("fraud")
    assert fraud.max_batch_size == 64  # env override of the per-model entry
    assert fraud.max_queue_delay_ms == 2.0
    assert fraud.champion == "2"
    assert fraud.execution == "thread"  # inherited
    assert fraud.versions == ("1", "2")  # inherited
    assert settings.serving_for("credit").versions is None  # explicit null overrides
    assert settings.serving_for("credit").max_batch_size == 16
    assert settings.serving_for("unknown") == settings.models.defaults


def test_frozen() -> None:
    settings = load_settings(None, {}, [])
    with pytest.raises(ValidationError):
        settings.server.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.server = settings.server  # type: ignore[misc]
    assert isinstance(settings, Settings)


# ----------------------------------------------------------------------------- errors


def test_env_error_names_key_and_var() -> None:
    assert problems_of(env={"STREAMSCORE_SERVER__PORT": "70000"}) == (
        "server.port: Input should be less than or equal to 65535 "
        "(from env STREAMSCORE_SERVER__PORT)",
    )


def test_file_error_names_key_and_file(tmp_path: Path) -> None:
    config = write(tmp_path, "redis:\n  failure_policy: explode\n")
    (problem,) = problems_of(config)
    assert problem.startswith("redis.failure_policy: Input should be 'degrade' or 'fail'")
    assert problem.endswith(f"(from file {config})")


def test_set_error_names_key_and_flag() -> None:
    (problem,) = problems_of(sets=["models.defaults.max_queue_delay_ms=250"])
    assert problem == (
        "models.defaults.max_queue_delay_ms: Input should be less than or equal to 100 "
        "(from --set models.defaults.max_queue_delay_ms)"
    )


def test_unknown_keys_refused_from_every_source(tmp_path: Path) -> None:
    config = write(tmp_path, "server:\n  prot: 1\nextra_section:\n  a: 1\n")
    problems = problems_of(
        config,
        env={"STREAMSCORE_REDIS__URLL": "redis://x"},
        sets=["models.per_model.fraud.batch=3"],
    )
    assert set(problems) == {
        f"server.prot: unknown key (from file {config})",
        f"extra_section.a: unknown key 'extra_section' (from file {config})",
        "redis.urll: unknown key (from env STREAMSCORE_REDIS__URLL)",
        "models.per_model.fraud.batch: unknown key (from --set models.per_model.fraud.batch)",
    }


def test_every_problem_reported_at_once() -> None:
    problems = problems_of(
        env={"STREAMSCORE_SERVER__PORT": "-1", "STREAMSCORE_SERVER__UVLOOP": "maybe"},
        sets=["redis.url=http://x", "not-a-setting"],
    )
    keys = sorted(problem.split(":")[0] for problem in problems)
    assert keys == ["not-a-setting", "redis.url", "server.port", "server.uvloop"]
    assert "not-a-setting: expected key.path=value (from --set not-a-setting)" in problems


def test_cross_field_error_names_both_sources(tmp_path: Path) -> None:
    config = write(tmp_path, "models:\n  defaults:\n    max_queue_size: 100\n")
    (problem,) = problems_of(config, env={"STREAMSCORE_MODELS__DEFAULTS__MAX_BATCH_SIZE": "200"})
    assert problem == (
        "models.defaults.max_batch_size: max_batch_size (200) must not exceed max_queue_size "
        f"(100) (from env STREAMSCORE_MODELS__DEFAULTS__MAX_BATCH_SIZE, file {config})"
    )


def test_per_model_override_validated_after_merge() -> None:
    problems = problems_of(
        sets=[
            "models.per_model.fraud.max_batch_size=2048",  # > default max_queue_size 1024
            "models.per_model.credit.max_queue_delay_ms=-1",
            "models.per_model.risk.versions=[1]",
            "models.per_model.risk.champion=2",
        ]
    )
    assert set(problems) == {
        "models.per_model.fraud.max_batch_size: max_batch_size (2048) must not exceed "
        "max_queue_size (1024) (from --set models.per_model.fraud.max_batch_size, default)",
        "models.per_model.credit.max_queue_delay_ms: Input should be greater than or equal to 0 "
        "(from --set models.per_model.credit.max_queue_delay_ms)",
        "models.per_model.risk.champion: champion '2' is not among versions ['1'] "
        "(from --set models.per_model.risk.champion, --set models.per_model.risk.versions)",
    }


def test_per_model_zero_switches_off_a_default_queue_wait_budget(tmp_path: Path) -> None:
    """``max_queue_wait_ms: 0`` per model turns off a budget set in defaults, from the
    file, the environment or ``--set``; a model left out inherits it; below 0 is refused."""
    config = tmp_path / "streamscore.yaml"
    config.write_text(
        "models:\n"
        "  defaults:\n"
        "    max_queue_wait_ms: 50\n"
        "  per_model:\n"
        "    fraud:\n"
        "      max_queue_wait_ms: 0\n"
        "    credit:\n"
        "      max_batch_size: 8\n"
    )
    loaded = load_settings(
        config,
        {"STREAMSCORE_MODELS__PER_MODEL__RISK__MAX_QUEUE_WAIT_MS": "0"},
        [
            "models.per_model.limits.max_queue_wait_ms=0",
            "models.per_model.slow.max_queue_wait_ms=5",
        ],
    )
    for name in ("fraud", "risk", "limits"):
        assert loaded.serving_for(name).max_queue_wait_s is None, name
    assert loaded.serving_for("credit").max_queue_wait_s == pytest.approx(0.05)
    assert loaded.serving_for("other").max_queue_wait_s == pytest.approx(0.05)
    assert loaded.serving_for("slow").max_queue_wait_s == pytest.approx(0.005)
    assert load_settings(None, {}, []).serving_for("fraud").max_queue_wait_s is None
    (problem,) = problems_of(sets=["models.per_model.fraud.max_queue_wait_ms=-1"])
    assert problem.startswith("models.per_model.fraud.max_queue_wait_ms: Input should be greater")


def test_worker_nice_without_a_worker_thread_is_refused_naming_both_fields() -> None:
    """``worker_nice`` only nices the ``thread`` execution's worker: with ``inline`` it
    would be ignored, so it is refused, naming both fields (the model's key first)."""
    wants = "worker_nice (5) needs execution 'thread' (execution is 'inline'"
    assert problems_of(sets=["models.defaults.worker_nice=5"]) == (
        f"models.defaults.worker_nice: {wants}: there is no worker thread to nice); set "
        "worker_nice 0 or execution 'thread' (from --set models.defaults.worker_nice, default)",
    )
    (problem,) = problems_of(
        env={"STREAMSCORE_MODELS__DEFAULTS__EXECUTION": "thread"},
        sets=["models.defaults.worker_nice=5", "models.per_model.fraud.execution=inline"],
    )
    assert problem.startswith(f"models.per_model.fraud.execution: {wants}")
    assert problem.endswith(
        "(from --set models.per_model.fraud.execution, --set models.defaults.worker_nice)"
    )
    (problem,) = problems_of(sets=["models.per_model.fraud.worker_nice=3"])
    assert problem.startswith("models.per_model.fraud.worker_nice: worker_nice (3) needs")
    assert "default" in problem  # execution: inline by default
    threaded = load_settings(
        None,
        {},
        ["models.per_model.fraud.execution=thread", "models.per_model.fraud.worker_nice=3"],
    )
    assert threaded.serving_for("fraud").worker_nice == 3


def test_drift_grace_below_the_flush_interval_is_refused_naming_both(tmp_path: Path) -> None:
    """A drift bucket is read for good ``grace_s`` after it closes, and its last rows
    may be flushed ``flush_interval_s`` after: a grace below the interval is refused,
    naming both keys with their sources; equal or above loads."""
    config = tmp_path / "streamscore.yaml"
    config.write_text("drift:\n  flush_interval_s: 5\n")
    (problem,) = problems_of(config)
    assert problem.startswith(
        "drift.grace_s: grace_s (3) must be >= flush_interval_s (5): a bucket is read"
    )
    assert problem.endswith(f"(from default, file {config})")
    (problem,) = problems_of(sets=["drift.grace_s=0.5"])
    assert problem.startswith("drift.grace_s: grace_s (0.5) must be >= flush_interval_s (1)")
    assert problem.endswith("(from --set drift.grace_s, default)")
    loaded = load_settings(config, {"STREAMSCORE_DRIFT__GRACE_S": "5"}, [])
    assert (loaded.drift.grace_s, loaded.drift.flush_interval_s) == (5.0, 5.0)
    assert load_settings(None, {}, []).drift.grace_s >= 1.0  # the defaults load


def test_bad_model_name() -> None:
    (problem,) = problems_of(sets=["models.per_model.no/slash.max_batch_size=1"])
    assert problem.startswith("models.per_model.no/slash: bad name:")
    assert problem.endswith("(from --set models.per_model.no/slash.max_batch_size)")


def test_ephemeral_port_needs_single_process() -> None:
    (problem,) = problems_of(env={"STREAMSCORE_SERVER__PROCESSES": "2"}, sets=["server.port=0"])
    assert problem.startswith("server.port: port 0 (OS-chosen) cannot be shared")
    assert "--set server.port" in problem
    assert "env STREAMSCORE_SERVER__PROCESSES" in problem


def test_wrong_shape_names_the_section(tmp_path: Path) -> None:
    config = write(tmp_path, "server: 5\n")
    (problem,) = problems_of(config)
    assert problem.startswith("server: ")
    assert problem.endswith(f"(from file {config})")


def test_list_item_error_is_indexed() -> None:
    (problem,) = problems_of(env={"STREAMSCORE_MODELS__DEFAULTS__VERSIONS": "[1, 'a b']"})
    assert problem.startswith("models.defaults.versions[1]: String should match pattern")
    assert problem.endswith("(from env STREAMSCORE_MODELS__DEFAULTS__VERSIONS)")


def test_malformed_env_name() -> None:
    (problem,) = problems_of(env={"STREAMSCORE_SERVER____PORT": "1"})
    assert problem.startswith("STREAMSCORE_SERVER____PORT: malformed")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server: [1\n", "line 2"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_file(tmp_path: Path, text: str, expected: str) -> None:
    config = write(tmp_path, text)
    (problem,) = problems_of(config)
    assert str(config) in problem
    assert expected in problem


def test_missing_file(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path / "absent.yaml")
    assert problem.startswith(f"cannot read config file {tmp_path / 'absent.yaml'}")


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing\n"), {}, []) == Settings()


def test_values_not_echoed_in_errors() -> None:
    (problem,) = problems_of(sets=["redis.url=http://user:hunter2@host"])
    assert "hunter2" not in problem
    assert problem.endswith("(from --set redis.url)")


def test_durable_traffic_log_needs_a_spill_dir() -> None:
    problems = problems_of(sets=["traffic_log.delivery=durable"])
    assert len(problems) == 1
    assert "records.durable.spill_dir" in problems[0]
    assert "traffic_log.delivery" in problems[0]
    settings = load_settings(
        None, {}, ["traffic_log.delivery=durable", "records.durable.spill_dir=/tmp/spill"]
    )
    assert settings.traffic_log.delivery == "durable"


def test_every_decision_is_recorded_by_default() -> None:
    settings = load_settings(None, {}, [])
    assert settings.traffic_log.sample_rate == 1.0
    assert settings.traffic_log.topic == "streamscore.decisions"


def test_redis_socket_timeout_never_cuts_the_fetch_budget_short() -> None:
    """A 2 s fetch budget with the 0.2 s default socket timeout: every read used to time
    out at 0.2 s, degrading answers the operator had allowed 2 s for."""
    features = {"definitions_path": "features.yaml", "fetch_timeout_s": 2.0}
    settings = Settings.model_validate({"features": features})
    assert redis_options(settings.redis, settings.features).socket_timeout_s == 2.0
    shorter = Settings.model_validate({"features": {**features, "fetch_timeout_s": 0.05}})
    assert redis_options(shorter.redis, shorter.features).socket_timeout_s == 0.2
    no_store = Settings.model_validate({"features": {"fetch_timeout_s": 2.0}})
    assert redis_options(no_store.redis, no_store.features).socket_timeout_s == 0.2


@pytest.mark.parametrize(
    ("sets", "message", "admitted"),
    [
        (
            ["server.restarts.backoff_initial_s=5", "server.restarts.backoff_max_s=1"],
            "server.restarts.backoff_max_s: backoff_max_s must be >= backoff_initial_s",
            ["server.restarts.backoff_initial_s=5", "server.restarts.backoff_max_s=5"],
        ),
        (
            [
                "server.connections.pending_calls_soft_limit=64",
                "server.connections.pending_calls_hard_limit=64",
            ],
            "server.connections.pending_calls_hard_limit: pending_calls_hard_limit must be > "
            "pending_calls_soft_limit",
            [
                "server.connections.pending_calls_soft_limit=16",
                "server.connections.pending_calls_hard_limit=64",
            ],
        ),
    ],
    ids=["restart-backoff", "pending-calls"],
)
def test_ordered_pairs_are_refused_out_of_order_naming_both(
    sets: list[str], message: str, admitted: list[str]
) -> None:
    (problem,) = problems_of(sets=sets)
    assert problem.startswith(message), problem
    assert load_settings(None, {}, admitted) is not None

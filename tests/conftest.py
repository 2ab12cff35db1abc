"""Shared fixtures: small test models and free ports."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devstack.services import (
    KafkaBroker,
    LocalRedisCluster,
    RedisServer,
    kafka_broker,
    redis_server,
)
from devstack.services import redis_cluster as start_redis_cluster
from tests.support.layout import layout_problem
from tests.support.model_factory import write_linear_model

#: ``pytester`` runs the layout rule's hook on a scratch tree (tests/unit/test_layout.py).
pytest_plugins = ["pytester"]

#: Feature names of the small test model (the demo models use 30 real names).
TEST_FEATURES = [f"f{i}" for i in range(8)]


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """Undo what a test's in-process ``streamscore`` command did to the root logger
    (``configure_logging`` sets its level and handler process-wide), so one test's INFO
    level cannot put log lines into a later test's captured output."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def linear_repository(tmp_path: Path) -> Path:
    """Repository with model ``lin`` versions 1 and 2 (different weights)."""
    repository = tmp_path / "models"
    write_linear_model(repository, "lin", "1", TEST_FEATURES, seed=1)
    write_linear_model(repository, "lin", "2", TEST_FEATURES, seed=2)
    return repository


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisServer]:
    """One real ``redis-server`` for the session, on a free port (never 6379)."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_process: RedisServer) -> str:
    """URL of the session's Redis, emptied before each test."""
    client = redis.Redis(host=redis_process.host, port=redis_process.port)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_process.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A real local Redis Cluster (3 primaries, 3 replicas) for the session."""
    with start_redis_cluster() as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """Seed URL of the session's Redis Cluster, every primary emptied before each test."""
    for node in redis_cluster.nodes:
        client = redis.Redis(host=node.host, port=node.port)
        try:
            if client.info("replication").get("role") == "master":
                client.flushall()
        except redis.RedisError:
            pass  # a node a failover test stopped
        finally:
            client.close()
    return redis_cluster.url


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One real Tansu broker for the session; tests use their own topic names."""
    log = tmp_path_factory.mktemp("tansu") / "broker.log"
    with kafka_broker(log_file=log) as broker:
        yield broker


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Enforce the test layout rule (``tests/support/layout.py``) before anything runs."""
    tests_dir = config.rootpath / "tests"
    problems = []
    for item in items:
        if not item.path.is_relative_to(tests_dir):
            continue
        problem = layout_problem(
            item.path.relative_to(tests_dir),
            getattr(item, "fixturenames", ()),
            item.get_closest_marker("integration") is not None,
        )
        if problem is not None:
            problems.append(f"  {item.nodeid}: {problem}")
    if problems:
        raise pytest.UsageError("test layout rule broken:\n" + "\n".join(problems))

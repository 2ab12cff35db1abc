"""One log line per Kafka outage, not one per connection attempt.

While no broker is reachable, aiokafka logs an ERROR on logger ``aiokafka`` for
every attempt (``Unable connect to ...``, ``Unable to update metadata ...``) and a
sink retries every second or two: a long outage filled the logs. A sink owns a
:class:`KafkaOutage`: the first failure of an outage is logged (aiokafka's lines of
that attempt and one WARNING of the sink's), then aiokafka's connection errors are
suppressed (counted) until the sink is connected again, with one reminder line per
``remind_every_s`` while it lasts; the reconnection is logged with how long it took
and how many attempts failed. Failures and suppressed lines are counted in metrics.

The filter sits on the process-wide ``aiokafka`` logger between ``install`` and
``uninstall`` (the sink's start and close); it only drops aiokafka's connection
errors, and only while its sink is in an outage. An aiokafka line belongs to no one
sink: with two sinks down, the first filter that holds it back counts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Counter

__all__ = ["AIOKAFKA_LOGGER", "CONNECTION_ERRORS", "KafkaOutage"]

AIOKAFKA_LOGGER = "aiokafka"
#: The messages (format strings) aiokafka logs for a broker it cannot reach.
CONNECTION_ERRORS = (
    "Unable connect to",
    "Unable to update metadata",
    "Unable to request metadata",
)


class KafkaOutage(logging.Filter):
    """A sink's outage state, and the filter that keeps aiokafka to one line per outage."""

    def __init__(
        self,
        sink: str,
        logger: logging.Logger,
        *,
        failures: Counter | None = None,
        suppressed: Counter | None = None,
        remind_every_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sink`` names it in logs and metrics (``failures``/``suppressed``: counter
        families labelled ``sink``); ``logger`` is the sink's own."""
        super().__init__()
        self._sink = sink
        self._logger = logger
        self._failures = None if failures is None else failures.labels(sink)
        self._suppressed = None if suppressed is None else suppressed.labels(sink)
        self._remind_every_s = remind_every_s
        self._clock = clock
        self._since: float | None = None  # outage start
        self._attempts = 0
        self._hidden = 0  # aiokafka lines suppressed since the last one shown
        self._next_reminder = 0.0
        #: Outages seen and aiokafka lines suppressed (also in metrics when given).
        self.outages = 0
        self.suppressed_lines = 0

    @property
    def down(self) -> bool:
        """True between a failure and the next successful connection."""
        return self._since is not None

    def install(self) -> None:
        """Start filtering aiokafka's connection errors (idempotent)."""
        aiokafka = logging.getLogger(AIOKAFKA_LOGGER)
        if self not in aiokafka.filters:
            aiokafka.addFilter(self)

    def uninstall(self) -> None:
        """Stop filtering (idempotent)."""
        logging.getLogger(AIOKAFKA_LOGGER).removeFilter(self)

    def failed(self, error: BaseException | str, action: str) -> None:
        """One attempt to reach Kafka failed; logged only when it starts an outage
        (``action``: what the sink does meanwhile, e.g. "dropping records")."""
        self._attempts += 1
        if self._failures is not None:
            self._failures.inc()
        if self._since is not None:
            return
        now = self._clock()
        self._since = now
        self._next_reminder = now + self._remind_every_s
        self.outages += 1
        self._logger.warning(
            "%s: Kafka unreachable (%s); %s until it is back (logged when it is, and "
            "reminded every %.0f s)",
            self._sink,
            error,
            action,
            self._remind_every_s,
            extra={"sink": self._sink},
        )

    def connected(self) -> None:
        """Kafka reached: ends an outage (logged once with its length and attempts)."""
        if self._since is None:
            return
        lasted = self._clock() - self._since
        self._logger.info(
            "%s: Kafka reachable again after %.1f s (%d failed attempts, %d client errors "
            "not logged)",
            self._sink,
            lasted,
            self._attempts,
            self._hidden,
            extra={"sink": self._sink},
        )
        self._since = None
        self._attempts = 0
        self._hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop aiokafka's connection errors once an outage is known (the first
        attempt's lines pass), but for one reminder per ``remind_every_s``."""
        if self._since is None or not str(record.msg).startswith(CONNECTION_ERRORS):
            return True
        now = self._clock()
        if now >= self._next_reminder:
            self._next_reminder = now + self._remind_every_s
            record.msg = f"{record.msg} (Kafka unreachable for %.0f s; %d similar not logged)"
            record.args = (*_args(record), now - self._since, self._hidden)
            self._hidden = 0
            return True
        self._hidden += 1
        self.suppressed_lines += 1
        if self._suppressed is not None:
            self._suppressed.inc()
        return False


def _args(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args
    if args is None:
        return ()
    if isinstance(args, tuple):
        return args
    return (args,)

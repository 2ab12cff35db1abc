"""One consumed batch of Kafka records -> per-key tile work and dead letters (no I/O).

Each record is decoded and validated against every stream group of its topic
(:func:`feature_streams.events.group_events`: all or nothing, event keys made by the
entity's rule). A malformed record, one whose event time is too far ahead of the
worker's clock, or one that raises anything else becomes a :class:`DeadLetter` and
never stops its partition. Valid events are grouped per (group, entity key,
partition) into :class:`~feature_streams.tile_store.KeyBatch` es, one apply-script call
each, of at most ``max_events_per_call`` events: a hot key's 5,000 events become
several calls (``SortedBatch.rounds``), so no one script blocks Redis for long. Their
offsets ascend chunk after chunk, and a chunk runs only after the one before it on
its key, so the apply-once mark holds.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka import ConsumerRecord, TopicPartition

from feature_streams.events import DeadLetter, GroupEvent, MalformedEventError, group_events
from feature_streams.keys import tile_key
from feature_streams.tile_store import EventUpdates, KeyBatch
from feature_streams.windows import GroupPlan

__all__ = ["SortedBatch", "check_not_ahead", "sort_records"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SortedBatch:
    """What one consumed batch asks for: tile work per key, dead letters, positions."""

    batches: list[KeyBatch] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    """The stream group of each entry of ``batches``."""
    dead: list[DeadLetter] = field(default_factory=list)
    consumed: dict[TopicPartition, int] = field(default_factory=dict)
    """Next offset per partition read (last offset + 1)."""
    per_topic: dict[str, int] = field(default_factory=dict)
    """Records read per topic."""
    rounds: list[list[int]] = field(default_factory=list)
    """Indexes of ``batches`` to apply together, round after round: round ``r`` holds
    the ``r``-th chunk of each key (a key's next chunk waits for the one before)."""

    @property
    def records(self) -> int:
        """Records read in all."""
        return sum(self.per_topic.values())


def check_not_ahead(
    plans: Mapping[str, GroupPlan],
    events: Sequence[GroupEvent],
    limit_ms: int | None,
    ahead_ms: int | None,
) -> None:
    """``MalformedEventError`` for an event time beyond ``limit_ms`` (the wall clock
    plus ``ahead_ms``); ``None`` = no check."""
    if limit_ms is None:
        return
    for ev in events:
        if ev.ts_ms > limit_ms:
            raise MalformedEventError(
                f"event time {ev.ts_ms} is more than {ahead_ms} ms ahead of the worker's clock",
                plans[ev.group].group.event_time_field,
                ev.group,
            )


def sort_records(
    plans: Mapping[str, GroupPlan],
    plans_by_topic: Mapping[str, Sequence[GroupPlan]],
    records: Mapping[TopicPartition, Sequence[ConsumerRecord]],
    assigned: Collection[TopicPartition],
    now_ms: int,
    max_event_ahead_ms: int | None,
    max_events_per_call: int = 1000,
) -> SortedBatch:
    """Sort one ``getmany`` result; partitions not in ``assigned`` (revoked meanwhile:
    the new owner re-reads them) are skipped."""
    out = SortedBatch()
    limit = None if max_event_ahead_ms is None else now_ms + max_event_ahead_ms
    per_key: dict[tuple[str, str, TopicPartition], list[EventUpdates]] = {}
    for tp, msgs in records.items():
        if not msgs or tp not in assigned:
            continue
        topic_plans = plans_by_topic.get(tp.topic, ())
        for msg in msgs:
            try:
                evs = group_events(topic_plans, msg.value)
                check_not_ahead(plans, evs, limit, max_event_ahead_ms)
            except MalformedEventError as err:
                out.dead.append(
                    DeadLetter.of(tp.topic, tp.partition, msg.offset, msg.value, msg.key, err)
                )
                continue
            except Exception as err:  # never let one record stop its partition
                logger.exception(
                    "event could not be processed",
                    extra={"topic": tp.topic, "partition": tp.partition, "offset": msg.offset},
                )
                unexpected = MalformedEventError(f"could not be processed: {err!r}"[:300])
                out.dead.append(
                    DeadLetter.of(
                        tp.topic, tp.partition, msg.offset, msg.value, msg.key, unexpected
                    )
                )
                continue
            for ev in evs:
                per_key.setdefault((ev.group, ev.key, tp), []).append(
                    EventUpdates(msg.offset, ev.ts_ms, ev.updates)
                )
        out.consumed[tp] = msgs[-1].offset + 1
        out.per_topic[tp.topic] = out.per_topic.get(tp.topic, 0) + len(msgs)
    if max_events_per_call < 1:
        raise ValueError("max_events_per_call must be >= 1")
    for (group, key, tp), events in per_key.items():
        plan = plans[group]
        for chunk, lo in enumerate(range(0, len(events), max_events_per_call)):
            if chunk == len(out.rounds):
                out.rounds.append([])
            out.rounds[chunk].append(len(out.batches))
            out.batches.append(
                KeyBatch(
                    tile_key(group, key),
                    tp.topic,
                    tp.partition,
                    plan.retention_ms,
                    plan.group.allowed_lateness_ms,
                    events[lo : lo + max_events_per_call],
                )
            )
            out.groups.append(group)
    return out

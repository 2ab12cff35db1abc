"""``produce``: a round's batches grouped by leader, one request each, every partition's
answer checked; errors, missing answers and unknown leaders fail the round."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import TopicPartition

from server.records.produce import new_batch, produce

NOT_LEADER = 6


@dataclass
class Response:
    topics: list[tuple[str, list[tuple[Any, ...]]]]


@dataclass
class Cluster:
    leaders: dict[tuple[str, int], int]

    def leader_for_partition(self, tp: TopicPartition) -> int | None:
        return self.leaders.get((tp.topic, tp.partition))


@dataclass
class Client:
    """Answers every partition of a request with ``codes`` (default 0), or not at all."""

    cluster: Cluster
    codes: dict[tuple[str, int], int] = field(default_factory=dict)
    skip: set[tuple[str, int]] = field(default_factory=set)
    hang: bool = False
    sent: list[tuple[int, Any]] = field(default_factory=list)
    refreshes: int = 0

    async def send(self, node: int, request: Any) -> Response:
        self.sent.append((node, request))
        if self.hang:
            await asyncio.sleep(10)
        return Response(
            [
                (topic, [(p, self.codes.get((topic, p), 0), 0, -1, -1) for p, _ in parts
                         if (topic, p) not in self.skip])
                for topic, parts in request._topics
            ]
        )  # fmt: skip

    def force_metadata_update(self) -> None:
        self.refreshes += 1


def batch(*values: bytes) -> bytes:
    builder = new_batch(1 << 20)
    for offset, value in enumerate(values):
        assert builder.append(offset, None, b"k%d" % offset, value, []) is not None
    return bytes(builder.build())


BATCHES = {("t", 0): batch(b"a", b"b"), ("t", 1): batch(b"c"), ("u", 0): batch(b"d")}
LEADERS = {("t", 0): 1, ("t", 1): 2, ("u", 0): 1}


async def test_one_request_per_leader_and_every_partition_acknowledged() -> None:
    client = Client(Cluster(LEADERS))
    assert await produce(client, BATCHES, timeout_ms=1000)
    by_node = {node: request for node, request in client.sent}
    assert sorted(by_node) == [1, 2]
    assert dict(by_node[1]._topics) == {
        "t": [(0, BATCHES[("t", 0)])],
        "u": [(0, BATCHES[("u", 0)])],
    }
    assert by_node[1].required_acks == -1
    values = [r.value for r in DefaultRecordBatch(by_node[1]._topics[0][1][0][1])]
    assert values == [b"a", b"b"]


async def test_a_refused_or_unanswered_partition_fails_the_round() -> None:
    refused = Client(Cluster(LEADERS), codes={("t", 1): NOT_LEADER})
    assert not await produce(refused, BATCHES, timeout_ms=1000)
    assert refused.refreshes == 1  # stale metadata: refreshed for the retry
    unanswered = Client(Cluster(LEADERS), skip={("u", 0)})
    assert not await produce(unanswered, BATCHES, timeout_ms=1000)


async def test_unknown_leader_or_timeout_fails_the_round() -> None:
    no_leader = Client(Cluster({("t", 0): 1}))
    assert not await produce(no_leader, BATCHES, timeout_ms=1000)
    assert no_leader.sent == [] and no_leader.refreshes == 1
    hung = Client(Cluster(LEADERS), hang=True)
    assert not await produce(hung, {("t", 0): BATCHES[("t", 0)]}, timeout_ms=10)

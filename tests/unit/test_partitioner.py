"""The durable sink's key partitioner: the same partition as aiokafka's (and so the
Java client's) default partitioner for every key length and partition count."""

from __future__ import annotations

import random
import uuid

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from server.clients.decisions import keyed_partition
from server.records.partitioner import murmur2, partition_for


def test_murmur2_equals_aiokafkas_for_every_tail_length() -> None:
    rng = random.Random(7)
    for length in range(0, 70):
        for _ in range(40):
            key = rng.randbytes(length)
            assert murmur2(key) == aiokafka_murmur2(key), key


def test_murmur2_of_high_bytes_and_request_ids() -> None:
    for key in (b"\xff" * 9, b"\x80\x00\xff", "kärtchen-✓".encode(), b""):
        assert murmur2(key) == aiokafka_murmur2(key)
    for _ in range(500):
        key = str(uuid.uuid4()).encode()
        assert murmur2(key) == aiokafka_murmur2(key)


def test_partition_for_equals_the_default_partitioner() -> None:
    rng = random.Random(3)
    reference = DefaultPartitioner()
    for count in (1, 2, 3, 7, 16):
        partitions = list(range(count))
        for _ in range(300):
            key = rng.randbytes(rng.randint(1, 48))
            assert partition_for(key, partitions) == reference(key, partitions, partitions)


def test_the_sink_and_decisions_show_agree_on_a_keys_partition() -> None:
    """``decisions show`` looks a request id up in the partition its key hashes to."""
    for i in range(300):
        key = f"req-{i}-{uuid.uuid4()}".encode()
        for count in (1, 3, 8):
            assert partition_for(key, list(range(count))) == keyed_partition(key, count)

"""KVEventSubscriber keeps a PrefixIndex in step with an engine's KV event stream.

The publisher is vLLM's own ZmqEventPublisher where the scenario allows (start-up
replay, live events, an engine restart); gaps need a publisher that drops
chosen messages, so a small stand-in speaking the same wire protocol covers those.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time

import msgspec
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio

from router.kv.events import KVEventSubscriber, decode_batch
from router.kv.index import PrefixIndex

ZMQ_PORTS = range(5650, 5700)


def free_port_pair() -> tuple[int, int]:
    """Two free TCP ports from the range reserved for these tests' ZMQ sockets."""
    ports = list(ZMQ_PORTS)
    random.shuffle(ports)
    found = []
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == 2:
            return found[0], found[1]
    pytest.skip("no free ZMQ test ports")


def stored(hashes, medium="GPU", block_size=4):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None,
            "token_ids": [0] * (block_size * len(hashes)), "block_size": block_size,
            "lora_id": None, "medium": medium, "lora_name": None}


def removed(hashes, medium="GPU"):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium}


def payload(*events) -> bytes:
    return msgspec.msgpack.encode([time.time(), list(events), 0])


async def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


class StandInPublisher:
    """PUB + ROUTER replay exactly as vLLM's ZmqEventPublisher, but able to drop messages."""

    def __init__(self, pub_port: int, replay_port: int, topic: bytes = b"kv") -> None:
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(f"tcp://127.0.0.1:{pub_port}")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"tcp://127.0.0.1:{replay_port}")
        self.topic = topic
        self.buffer: list[tuple[int, bytes]] = []
        self.seq = 0
        self._task = asyncio.create_task(self._serve_replay())

    async def publish(self, body: bytes, *, drop: bool = False, keep: bool = True) -> None:
        """Send one batch; ``drop`` loses it on PUB, ``keep=False`` leaves it out of the buffer."""
        seq, self.seq = self.seq, self.seq + 1
        if keep:
            self.buffer.append((seq, body))
        if not drop:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), body])

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            for seq, body in self.buffer:
                if seq >= start_seq:
                    await self.router.send_multipart([client, b"", self.topic, seq.to_bytes(8, "big"), body])
            await self.router.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    async def close(self) -> None:
        self._task.cancel()
        self.pub.close(0)
        self.router.close(0)
        self.ctx.term()


@pytest_asyncio.fixture(loop_scope="function")
async def stand_in():
    pub_port, replay_port = free_port_pair()
    publisher = StandInPublisher(pub_port, replay_port)
    index = PrefixIndex()
    sub = KVEventSubscriber("e0", f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}",
                            index, topic="kv")
    yield publisher, sub, index
    await sub.stop()
    await publisher.close()


async def _settle_connection(publisher: StandInPublisher, sub: KVEventSubscriber) -> None:
    """PUB drops everything until SUB has joined: send a no-op batch until one arrives."""
    for _ in range(100):
        await publisher.publish(payload())
        await asyncio.sleep(0.05)
        if sub.stats.batches > 0:
            return
    raise AssertionError("subscriber never connected")


def test_decode_reads_vllm_batches_and_skips_unknown_event_types():
    body = msgspec.msgpack.encode([1.0, [stored([1, 2]), {"type": "FutureEvent", "x": 1},
                                         removed([b"\x00" * 24 + (5).to_bytes(8, "big")]),
                                         {"type": "AllBlocksCleared"}], 0])
    ts, events, unknown = decode_batch(body)
    assert ts == 1.0 and unknown == 1 and len(events) == 3
    assert type(events[0]).__name__ == "BlockStored" and events[0].block_size == 4


async def test_subscriber_replays_history_then_follows_live_events_from_vllm_publisher():
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    pub_port, replay_port = free_port_pair()
    publisher = kv_events.ZmqEventPublisher(0, endpoint=f"tcp://*:{pub_port}",
                                            replay_endpoint=f"tcp://*:{replay_port}", topic="kv")

    def batch(*events):
        return kv_events.KVEventBatch(ts=time.time(), events=list(events))

    def block_stored(hashes):
        return kv_events.BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[1] * 4 * len(hashes),
                                     block_size=4, lora_id=None, medium="GPU", lora_name=None)

    index = PrefixIndex()
    sub = KVEventSubscriber("e0", f"tcp://*:{pub_port}", f"tcp://*:{replay_port}", index, topic="kv",
                            expected_block_size=4)
    try:
        # Published before the router exists: only the replay buffer has them.
        publisher.publish(batch(block_stored([11, 12, 13])))
        publisher.publish(batch(kv_events.BlockRemoved(block_hashes=[13], medium="GPU")))
        await asyncio.sleep(0.3)
        await sub.start()
        assert index.prefix_hits([11, 12, 13]) == {"e0": 2}
        # Live: keep publishing until the SUB socket has joined and sees new batches.
        for i in range(100):
            publisher.publish(batch(block_stored([100 + i])))
            await asyncio.sleep(0.05)
            if index.holds("e0", 100 + i):
                break
        await wait_for(lambda: index.holds("e0", 100 + i))
        assert sub.stats.restarts_detected == 0 and sub.stats.block_size_seen == 4
        # Engine restart: a new publisher on the same ports counts from 0 again.
        publisher.shutdown()
        await asyncio.sleep(0.3)
        publisher = kv_events.ZmqEventPublisher(0, endpoint=f"tcp://*:{pub_port}",
                                                replay_endpoint=f"tcp://*:{replay_port}", topic="kv")
        for j in range(100):
            publisher.publish(batch(block_stored([500 + j])))
            await asyncio.sleep(0.05)
            if index.holds("e0", 500 + j):
                break
        await wait_for(lambda: index.holds("e0", 500 + j))
        assert sub.stats.restarts_detected == 1
        assert not index.holds("e0", 11), "blocks from before the restart must be forgotten"
    finally:
        await sub.stop()
        publisher.shutdown()


async def test_gap_is_filled_from_the_replay_socket(stand_in):
    publisher, sub, index = stand_in
    await sub.start()
    await _settle_connection(publisher, sub)
    await publisher.publish(payload(stored([1])), drop=True)
    await publisher.publish(payload(stored([2])), drop=True)
    await publisher.publish(payload(stored([3])))
    await wait_for(lambda: index.holds("e0", 3))
    assert index.prefix_hits([1, 2, 3]) == {"e0": 3}
    assert sub.stats.gaps == 1 and sub.stats.replayed_batches >= 2 and sub.stats.unrecovered_gaps == 0


async def test_unrecoverable_gap_clears_the_instance_rather_than_trusting_stale_blocks(stand_in):
    publisher, sub, index = stand_in
    await sub.start()
    await _settle_connection(publisher, sub)
    await publisher.publish(payload(stored([1, 2])))
    await wait_for(lambda: index.holds("e0", 2))
    await publisher.publish(payload(removed([2])), drop=True, keep=False)  # lost for good
    await publisher.publish(payload(stored([7])))
    await wait_for(lambda: index.holds("e0", 7))
    assert sub.stats.unrecovered_gaps == 1
    assert not index.holds("e0", 2) and not index.holds("e0", 1)


async def test_all_blocks_cleared_and_restart_of_the_subscriber(stand_in):
    publisher, sub, index = stand_in
    await sub.start()
    await _settle_connection(publisher, sub)
    await publisher.publish(payload(stored([1, 2])))
    await wait_for(lambda: index.holds("e0", 2))
    await publisher.publish(payload({"type": "AllBlocksCleared"}))
    await wait_for(lambda: index.block_count("e0") == 0)
    await publisher.publish(payload(stored([4, 5])))
    await wait_for(lambda: index.holds("e0", 5))
    # A router restart: the index is rebuilt from the engine's replay buffer alone.
    await sub.stop()
    index.apply_stored("e0", [999])  # stale knowledge that must not survive a restart
    await sub.start()
    assert index.prefix_hits([4, 5]) == {"e0": 2} and not index.holds("e0", 999)
    assert not index.holds("e0", 1)

"""Follow one vLLM instance's KV cache events and keep a PrefixIndex in step with it.

Wire format (``vllm/distributed/kv_events.py``, ZmqEventPublisher): the engine's
PUB socket sends multipart ``[topic, seq (8-byte big-endian), payload]`` where
``payload`` is a msgpack ``KVEventBatch`` ``[ts, [event, ...], dp_rank]`` and each
event is a map tagged by ``"type"``: ``BlockStored`` (full blocks only:
``block_hashes``, ``parent_block_hash``, ``token_ids``, ``block_size``, ``medium``,
...), ``BlockRemoved`` (``block_hashes``, ``medium``) or ``AllBlocksCleared``.
Its ROUTER replay socket answers ``[b"", start_seq]`` from a DEALER with every
buffered batch whose seq >= start_seq, as ``[b"", topic, seq, payload]``, then
``[b"", b"", -1, b""]``.

Sequence handling, ``next`` being the seq expected next:

- ``seq == next``: apply the batch.
- ``seq > next``: a gap (PUB drops under load, slow joiner): replay
  ``[next, seq)`` from the replay socket, asking from ``next - 1`` so the
  engine's copy of the last applied batch can be compared with ours: if it
  differs, the engine restarted while we were not looking (its new counter
  already passed ours), so the instance is cleared and read again from 0. If
  the replay cannot cover the gap (buffer wrapped, socket down), the instance
  is cleared: the router under-reports hits afterwards rather than trusting a
  broken history.
- ``seq < next``: either a duplicate of a batch already taken from a replay
  (same payload as recorded for that seq: dropped) or the engine restarted and
  its counter began again (different payload): the instance is cleared and
  followed from ``seq``.
- After the SUB connection drops (seen on the socket's monitor), the first
  batch that arrives is not trusted by its seq alone: a restarted engine's new
  counter can land exactly on ``next``. The last applied batch is compared with
  the engine's replay copy first (the same anchor check as for gaps).
- On ``start()`` the instance is cleared and the engine's replay buffer is
  read from seq 0, so a router restart recovers whatever the engine still has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from router.kv.index import PrefixIndex

log = logging.getLogger(__name__)

_LOW64 = (1 << 64) - 1
END_SEQ = -1


# --- decoding -----------------------------------------------------------------
# Mirrors of vLLM's msgspec structs, reduced to the fields routing needs. Unknown
# fields are ignored, so newer engines that add fields still decode.

class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[int] = []
    block_size: int = 0
    medium: str | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[int | bytes]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

_batch_decoder = msgspec.msgpack.Decoder(_Batch)
_event_decoder = msgspec.msgpack.Decoder(KVEvent)


def event_hash(value: int | bytes) -> int:
    """Normalise a published hash to the router's form (low 64 bits, unsigned).

    Engines with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`` publish raw digests.
    """
    if isinstance(value, bytes):
        return int.from_bytes(value, "big") & _LOW64
    return value & _LOW64


def decode_batch(payload: bytes) -> tuple[float, list[KVEvent], int]:
    """(ts, known events, count of events of unknown type) from one payload."""
    batch = _batch_decoder.decode(payload)
    events: list[KVEvent] = []
    unknown = 0
    for raw in batch.events:
        try:
            events.append(_event_decoder.decode(raw))
        except msgspec.ValidationError:
            unknown += 1
    return batch.ts, events, unknown


def apply_events(index: PrefixIndex, instance_id: str, events: list[KVEvent]) -> None:
    """Apply decoded events, in order, to ``index`` for ``instance_id``."""
    for ev in events:
        if isinstance(ev, BlockStored):
            index.apply_stored(instance_id, [event_hash(h) for h in ev.block_hashes], ev.medium)
        elif isinstance(ev, BlockRemoved):
            index.apply_removed(instance_id, [event_hash(h) for h in ev.block_hashes], ev.medium)
        else:
            index.apply_cleared(instance_id, device_only=True)


# --- subscriber ---------------------------------------------------------------

@dataclass
class SubscriberStats:
    """Counters a driver can export as metrics."""

    batches: int = 0
    events: int = 0
    unknown_events: int = 0
    gaps: int = 0
    replayed_batches: int = 0
    unrecovered_gaps: int = 0
    restarts_detected: int = 0
    decode_errors: int = 0
    last_seq: int = -1
    block_size_seen: int | None = None


def _connect_address(endpoint: str) -> str:
    """The engine binds ``tcp://*:PORT``; a subscriber connects to a host."""
    return endpoint.replace("*", "127.0.0.1", 1) if "://*" in endpoint else endpoint


class KVEventSubscriber:
    """Feeds ``index`` with the KV events of one instance.

    ``endpoint`` is the engine's PUB address and ``replay_endpoint`` its ROUTER
    address (None disables gap recovery: gaps then clear the instance).
    ``expected_block_size`` (the router's hashing block size) is checked against
    the events' ``block_size``; a mismatch is logged once, since no hash would match.
    """

    def __init__(self, instance_id: str, endpoint: str, replay_endpoint: str | None,
                 index: PrefixIndex, *, topic: str = "", expected_block_size: int | None = None,
                 replay_timeout_s: float = 2.0, dedupe_window: int = 10_000,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.instance_id = instance_id
        self.endpoint = _connect_address(endpoint)
        self.replay_endpoint = _connect_address(replay_endpoint) if replay_endpoint else None
        self.index = index
        self.topic = topic.encode()
        self.expected_block_size = expected_block_size
        self.replay_timeout_s = replay_timeout_s
        self.dedupe_window = dedupe_window
        self.stats = SubscriberStats()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sub: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._next_seq = 0
        # Set when the SUB connection dropped: the next batch's seq may come
        # from a restarted engine whose counter happens to equal ours.
        self._verify_next = False
        # seq -> hash(payload) of recently applied batches, to tell a duplicate
        # from an engine restart when a seq goes backwards.
        self._seen: OrderedDict[int, int] = OrderedDict()
        self._warned_block_size = False

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Connect, clear the instance, catch up from the replay buffer, then follow live."""
        if self._task is not None:
            return
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        monitor = self._sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sub.connect(self.endpoint)
        self.index.apply_cleared(self.instance_id)
        self._next_seq = 0
        self._seen.clear()
        if self.replay_endpoint is not None:
            await self._replay_from(0, until=None)
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.instance_id}")
        self._monitor_task = asyncio.create_task(self._watch_disconnects(monitor),
                                                 name=f"kv-events-monitor-{self.instance_id}")

    async def stop(self) -> None:
        """Stop following; the index keeps what it knows (call remove_instance to drop it)."""
        for task in (self._task, self._monitor_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._monitor_task = None
        if self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
            self._sub.close(linger=0)
            self._sub = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # --- main loop --------------------------------------------------------------

    async def _run(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart()
            try:
                await self._on_message(frames)
            except Exception:  # one bad batch must not stop the follower
                self.stats.decode_errors += 1
                log.exception("kv events %s: failed to handle a batch", self.instance_id)

    async def _watch_disconnects(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    log.info("kv events %s: publisher connection dropped", self.instance_id)
                    self._verify_next = True
        finally:
            monitor.close(linger=0)

    async def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.stats.decode_errors += 1
            return
        _, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        if self._verify_next:
            self._verify_next = False
            # Anchor check plus whatever was missed while disconnected.
            await self._replay_from(self._next_seq, until=seq)
        if seq > self._next_seq:
            self.stats.gaps += 1
            log.info("kv events %s: gap, expected seq %d got %d; replaying",
                     self.instance_id, self._next_seq, seq)
            await self._replay_from(self._next_seq, until=seq)
            if self._next_seq < seq:  # replay could not close the gap
                self._reset(f"gap [{self._next_seq}, {seq}) not recoverable", seq)
        elif seq < self._next_seq:
            if self._seen.get(seq) == hash(payload):
                return  # already applied (came through a replay)
            self.stats.restarts_detected += 1
            self._reset(f"seq went back from {self._next_seq - 1} to {seq} (engine restart?)", seq,
                        gap=False)
        if seq == self._next_seq:
            self._apply(seq, payload)

    async def _replay_from(self, start: int, until: int | None) -> None:
        """Apply buffered batches from ``start`` (up to ``until`` exclusive, if given).

        The request starts one batch early, at the last one applied: if the
        engine's copy of it differs from what was applied, the engine restarted
        (its counter began again and already passed ``start``), so the instance
        is cleared and the new engine's buffer read from 0 instead.
        """
        if self.replay_endpoint is None:
            return
        anchor = start - 1 if start > 0 and (start - 1) in self._seen else None
        if not await self._replay_once(start if anchor is None else anchor, until, anchor):
            self.stats.restarts_detected += 1
            self._reset(f"replayed batch {anchor} differs from the one applied (engine restart)",
                        0, gap=False)
            await self._replay_once(0, until, None)

    async def _replay_once(self, start: int, until: int | None, anchor: int | None) -> bool:
        """One replay request; False if the anchor batch no longer matches."""
        assert self.replay_endpoint is not None
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        anchor_seen = False
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await dealer.poll(self.replay_timeout_s * 1000):
                    log.warning("kv events %s: replay from %d timed out", self.instance_id, start)
                    return True
                frames = await dealer.recv_multipart()
                if len(frames) != 4:
                    continue
                _, _, seq_bytes, payload = frames
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if seq == END_SEQ:
                    # A live engine still holds its newest batch; one that lacks
                    # the anchor has restarted with a shorter history.
                    return anchor is None or anchor_seen
                if anchor is not None and not anchor_seen:
                    if seq != anchor or self._seen.get(seq) != hash(payload):
                        return False
                    anchor_seen = True
                    continue
                if until is not None and seq >= until:
                    continue  # the live message itself and later ones arrive on SUB
                if seq < self._next_seq:
                    continue
                if seq > self._next_seq:
                    # The engine's buffer no longer has [next, seq): history is broken.
                    self._reset(f"replay starts at {seq}, needed {self._next_seq}", seq)
                self._apply(seq, payload)
                self.stats.replayed_batches += 1
        finally:
            dealer.close(linger=0)

    # --- state ------------------------------------------------------------------

    def _apply(self, seq: int, payload: bytes) -> None:
        _, events, unknown = decode_batch(payload)
        apply_events(self.index, self.instance_id, events)
        self.stats.batches += 1
        self.stats.events += len(events)
        self.stats.unknown_events += unknown
        self.stats.last_seq = seq
        self._next_seq = seq + 1
        self._seen[seq] = hash(payload)
        while len(self._seen) > self.dedupe_window:
            self._seen.popitem(last=False)
        self._check_block_size(events)

    def _reset(self, why: str, seq: int, gap: bool = True) -> None:
        log.warning("kv events %s: %s; clearing this instance's prefix index", self.instance_id, why)
        self.stats.unrecovered_gaps += gap
        self.index.apply_cleared(self.instance_id)
        self._seen.clear()
        self._next_seq = seq

    def _check_block_size(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored) and ev.block_size:
                self.stats.block_size_seen = ev.block_size
                if (self.expected_block_size and ev.block_size != self.expected_block_size
                        and not self._warned_block_size):
                    self._warned_block_size = True
                    log.warning("kv events %s: engine block size %d != router hashing block "
                                "size %d; no prefix will ever match", self.instance_id,
                                ev.block_size, self.expected_block_size)
                return

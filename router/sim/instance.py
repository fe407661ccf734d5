"""One engine instance: continuous batching with chunked prefill under a token budget.

Each step mirrors vLLM v1's scheduler:

1. **running first** (decode-first): every running request, in admission order,
   gets its next chunk: one token when decoding, else the rest of its prompt
   up to the remaining token budget (chunked prefill);
2. a running request that cannot get a KV block preempts the most recently
   admitted running request (recompute: its blocks are released, it returns to
   the head of the waiting queue, keeping what the prefix cache still holds);
3. **then waiting requests** in FCFS order while budget, ``max_num_seqs`` and KV
   blocks allow (not in a step that preempted); a request admitted from waiting
   first reuses the cached leading blocks of its prompt.

The step lasts ``step_model.step_s(...)`` of the batch; at its end every
request whose known tokens are all computed samples a token. A request on a
prefill instance under PD stops after its prompt and hands its KV over
(``on_prefill_done``); others finish after ``output`` tokens (``on_finish``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from router.sim.kv_cache import KVCache, KVEventListener
from router.sim.perf_model import Deployment

if TYPE_CHECKING:
    from router.sim.events import EventQueue
    from router.sim.request import SimRequest


class SimInstance:
    __slots__ = (
        "instance_id", "role", "healthy", "dep", "kv", "events", "waiting", "running",
        "busy", "busy_s", "steps", "tokens", "inflight", "inflight_prompt_tokens",
        "queued_prefill_tokens", "running_tokens", "on_first_token", "on_finish",
        "on_prefill_done", "on_fail", "_budget", "_max_seqs", "_step_s", "_batch", "preemptions",
        "neighbours",
    )

    def __init__(self, instance_id: str, dep: Deployment, events: EventQueue,
                 listener: KVEventListener | None = None, role: str = "both") -> None:
        self.instance_id = instance_id
        self.role = role
        self.healthy = True
        self.dep = dep
        self.kv = KVCache(instance_id, dep.block_size, dep.num_kv_blocks, listener)
        self.events = events
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.busy = False
        self.busy_s = 0.0
        self.steps = 0
        self.tokens = 0
        self.preemptions = 0
        # The driver's accounting, shown to policies (see InstanceState).
        self.inflight = 0
        self.inflight_prompt_tokens = 0
        self.queued_prefill_tokens = 0
        self.running_tokens = 0
        noop: Callable[..., None] = lambda *a: None  # noqa: E731
        self.on_first_token: Callable[[SimRequest, float], None] = noop
        self.on_finish: Callable[[SimRequest, float], None] = noop
        self.on_prefill_done: Callable[[SimRequest, float], None] = noop
        self.on_fail: Callable[[SimRequest, float], None] = noop
        self._budget = dep.max_num_batched_tokens
        self._max_seqs = dep.max_num_seqs
        self._step_s = dep.step_model.step_s
        self._batch: list[tuple[SimRequest, int]] = []
        # Instances on the same host (Deployment.neighbour_prefill_slowdown); set by the cluster.
        self.neighbours: list[SimInstance] = []

    # -- intake ------------------------------------------------------------------------
    def enqueue(self, req: SimRequest) -> None:
        """Add a request to the waiting queue and start stepping if idle."""
        req.instance_id = self.instance_id
        req.queued_since = self.events.now
        self.waiting.append(req)
        self.queued_prefill_tokens += req.remaining
        if not self.busy:
            self._start_step()

    # -- one step ----------------------------------------------------------------------
    def _start_step(self) -> None:
        now = self.events.now
        kv = self.kv
        budget = self._budget
        batch = self._batch
        batch.clear()
        prefill_tokens = 0
        prefill_attn = 0.0
        decode_seqs = 0
        decode_ctx = 0
        running = self.running
        preempted = False
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            remaining = req.prompt + req.generated - req.computed
            n = remaining if remaining < budget else budget
            if not kv.grow(req, req.computed + n):
                victim = None
                while victim is not req:
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is not req and kv.grow(req, req.computed + n):
                        break
                if victim is req:
                    continue
            batch.append((req, n))
            budget -= n
            if remaining == 1 and req.generated > 0:
                decode_seqs += 1
                decode_ctx += req.computed
            else:
                prefill_tokens += n
                prefill_attn += n * (req.computed + n * 0.5)
            i += 1
        if not preempted:
            waiting = self.waiting
            max_seqs = self._max_seqs
            while waiting and budget > 0 and len(running) < max_seqs:
                req = waiting[0]
                if req.computed == 0 and not req.pinned and req.block_hashes:
                    limit = (req.prompt + req.generated - 1) // kv.block_size
                    hits = kv.pin_prefix(req, limit)
                    if hits:
                        req.computed = hits * kv.block_size
                        req.cached_tokens = max(req.cached_tokens, req.computed)
                        self.queued_prefill_tokens -= req.computed
                remaining = req.prompt + req.generated - req.computed
                n = remaining if remaining < budget else budget
                if not kv.grow(req, req.computed + n):
                    if not running and not batch:
                        self._fail_unfittable(req)
                        continue
                    break
                waiting.popleft()
                running.append(req)
                self.running_tokens += req.computed  # prefix hits or KV received from P
                if req.prefill_start_s is None:
                    req.prefill_start_s = now
                batch.append((req, n))
                budget -= n
                if remaining == 1 and req.generated > 0:
                    decode_seqs += 1
                    decode_ctx += req.computed
                else:
                    prefill_tokens += n
                    prefill_attn += n * (req.computed + n * 0.5)
        if not batch:
            self.busy = False
            return
        duration = self._step_s(prefill_tokens, prefill_attn, decode_seqs, decode_ctx)
        if self.neighbours and prefill_tokens:  # host contention, judged at the step's start
            busy = sum(1 for n in self.neighbours if n.busy)
            if busy:
                prefill_s = self._step_s(prefill_tokens, prefill_attn, 0, 0) - self._step_s(0, 0, 0, 0)
                duration += (self.dep.neighbour_prefill_slowdown * busy / len(self.neighbours)
                             * prefill_s)
        self.busy = True
        self.busy_s += duration
        self.steps += 1
        self.tokens += self._budget - budget
        self.events.schedule(now + duration, self._end_step)

    def _end_step(self, _: object) -> None:
        now = self.events.now
        kv = self.kv
        done = False
        for req, n in self._batch:
            before = req.computed
            req.computed = before + n
            if req.prompt + req.generated - before > 1 or req.generated == 0:
                self.queued_prefill_tokens -= n
            self.running_tokens += n
            if req.block_hashes and len(req.pinned) < len(req.block_hashes):
                kv.commit_full_blocks(req, req.computed)
            if req.computed == req.prompt + req.generated:
                if req.prefill_only:
                    req.prefill_end_s = now
                    req.generated = 0
                    done = True
                    continue
                req.generated += 1
                if req.generated == 1 and req.first_token_s is None:
                    if req.prefill_end_s is None:
                        req.prefill_end_s = now
                    req.first_token_s = now
                    self.on_first_token(req, now)
                if req.generated >= req.output:
                    req.finish_s = now
                    done = True
        self._batch.clear()
        if done:
            keep = []
            for req in self.running:
                if req.prefill_only and req.prefill_end_s is not None:
                    self.running_tokens -= req.computed
                    self.on_prefill_done(req, now)  # the KV is released after the transfer
                elif req.finish_s is not None:
                    self.running_tokens -= req.computed
                    kv.release(req)
                    self.on_finish(req, now)
                else:
                    keep.append(req)
            self.running = keep
        self._start_step()

    # -- helpers -----------------------------------------------------------------------
    def _preempt(self, req: SimRequest) -> None:
        self.kv.release(req)
        self.running_tokens -= req.computed
        remaining = req.prompt + req.generated - req.computed
        counted = remaining if (remaining > 1 or req.generated == 0) else 0
        self.queued_prefill_tokens += req.prompt + req.generated - counted  # recomputed from 0
        req.computed = 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _fail_unfittable(self, req: SimRequest) -> None:
        """A request that cannot fit even in an empty cache: vLLM rejects it."""
        self.kv.release(req)
        self.waiting.popleft()
        self.queued_prefill_tokens -= req.remaining
        req.ok = False
        req.error = "does not fit in the KV cache"
        self.on_fail(req, self.events.now)

    def release_transferred(self, req: SimRequest) -> None:
        """Drop a prefill-only request's blocks once its KV has left this instance."""
        self.kv.release(req)

    def stats(self, span_s: float) -> dict[str, float]:
        return {"utilisation": self.busy_s / span_s if span_s > 0 else 0.0,
                "steps": self.steps, "tokens": self.tokens, "preemptions": self.preemptions,
                "evictions": self.kv.evictions, "role": self.role}

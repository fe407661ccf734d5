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

With ``classes`` (``router.sim.classes.ClassScheduling``) the instance follows
XLLMScheduler's online/offline rules on top: online first in the waiting queue
and in the batch, offline preempted for waiting online work that lacks run slots
or KV blocks, the SLO-aware step budget. ``migrate_out`` moves offline requests to another instance (at the end
of the current step), where they re-prefill prompt + generated tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from router.sim.classes import ClassScheduling, plan_class_step
from router.sim.kv_cache import KVCache, KVEventListener
from router.sim.perf_model import Deployment
from xllm_plugin.scheduler.budget import OnlineDecode, banked_step_limit

if TYPE_CHECKING:
    from router.sim.events import EventQueue
    from router.sim.request import SimRequest


class SimInstance:
    __slots__ = (
        "instance_id", "role", "healthy", "dep", "kv", "events", "waiting", "running",
        "busy", "busy_s", "steps", "tokens", "inflight", "inflight_prompt_tokens",
        "queued_prefill_tokens", "running_tokens", "on_first_token", "on_finish",
        "on_prefill_done", "on_fail", "_budget", "_max_seqs", "_step_s", "_batch", "preemptions",
        "neighbours", "classes", "waiting_offline", "offline_running",
        "offline_queued_prefill_tokens", "preempted_for_online", "_migrate", "on_migrate",
        "budget_constrained_steps", "offline_prefill_held", "offline_decodes_held", "_held",
    )

    def __init__(self, instance_id: str, dep: Deployment, events: EventQueue,
                 listener: KVEventListener | None = None, role: str = "both",
                 classes: ClassScheduling | None = None) -> None:
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
        # Online/offline classes (None: offline requests are treated like online ones).
        self.classes = classes
        self.waiting_offline: deque[SimRequest] = deque()
        self.offline_running = 0
        self.offline_queued_prefill_tokens = 0
        self.preempted_for_online = 0
        self.budget_constrained_steps = 0
        self.offline_prefill_held = 0
        self.offline_decodes_held = 0
        self._held: set[int] = set()  # id() of running offline requests sitting this step out
        self._migrate: list[tuple[int, str]] = []  # (count, target instance) pending
        self.on_migrate: Callable[[SimRequest, str], None] = noop

    # -- intake ------------------------------------------------------------------------
    def enqueue(self, req: SimRequest) -> None:
        """Add a request to the waiting queue and start stepping if idle."""
        req.instance_id = self.instance_id
        req.queued_since = self.events.now
        self._queue_of(req).append(req)
        self.queued_prefill_tokens += req.remaining
        if req.offline:
            self.offline_queued_prefill_tokens += req.remaining
        if not self.busy:
            self._start_step()

    def _queue_of(self, req: SimRequest) -> deque[SimRequest]:
        return self.waiting_offline if req.offline and self.classes is not None else self.waiting

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.waiting_offline)

    @property
    def num_offline_waiting(self) -> int:
        if self.classes is not None:
            return len(self.waiting_offline)
        return sum(1 for r in self.waiting if r.offline) if self.offline_queued_prefill_tokens else 0

    # -- one step ----------------------------------------------------------------------
    def _start_step(self) -> None:
        now = self.events.now
        kv = self.kv
        budget = self._budget
        if self.classes is not None:
            budget = self._class_rules()
        batch = self._batch
        batch.clear()
        prefill_tokens = 0
        prefill_attn = 0.0
        decode_seqs = 0
        decode_ctx = 0
        running = self.running
        preempted = False
        i = 0
        held = self._held
        while i < len(running) and budget > 0:
            req = running[i]
            if held and id(req) in held:  # offline work the step budget left out
                i += 1
                continue
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
        queues = (self.waiting, self.waiting_offline) if not preempted else ()
        blocked = False
        for waiting in queues:
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
                        if req.offline:
                            self.offline_queued_prefill_tokens -= req.computed
                remaining = req.prompt + req.generated - req.computed
                n = remaining if remaining < budget else budget
                if not kv.grow(req, req.computed + n):
                    if not running and not batch:
                        self._fail_unfittable(req, waiting)
                        continue
                    blocked = True
                    break
                waiting.popleft()
                running.append(req)
                if req.offline:
                    self.offline_running += 1
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
            if blocked or budget <= 0 or len(running) >= max_seqs:
                break  # FCFS: nothing behind a request that does not fit (online before offline)
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
                if req.offline:
                    self.offline_queued_prefill_tokens -= n
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
                    if req.offline:
                        self.offline_running -= 1
                    self.on_prefill_done(req, now)  # the KV is released after the transfer
                elif req.finish_s is not None:
                    self.running_tokens -= req.computed
                    kv.release(req)
                    if req.offline:
                        self.offline_running -= 1
                    self.on_finish(req, now)
                else:
                    keep.append(req)
            self.running = keep
        if self._migrate:
            self._migrate_now()
        self._start_step()

    # -- helpers -----------------------------------------------------------------------
    def _preempt(self, req: SimRequest) -> None:
        self.kv.release(req)
        self.running_tokens -= req.computed
        counted = _queued_part(req)
        self.queued_prefill_tokens += req.prompt + req.generated - counted  # recomputed from 0
        if req.offline:
            self.offline_queued_prefill_tokens += req.prompt + req.generated - counted
            self.offline_running -= 1
        req.computed = 0
        req.preemptions += 1
        self.preemptions += 1
        self._queue_of(req).appendleft(req)

    # -- online/offline classes (XLLMScheduler's rules) ----------------------------------
    def _class_rules(self) -> int:
        """Order the batch online first, preempt offline for waiting online work, plan the budget."""
        if self.offline_running:
            self.running.sort(key=_is_offline)  # stable: each class keeps its admission order
            if self.waiting:
                self._make_room_for_online()
        budget = self._plan_budget()
        what_if = self.classes is not None and self.classes.preempt_offline_prefill
        if what_if and self.offline_running and self.waiting:
            self._make_budget_for_online(budget)
        return budget

    def _plan_budget(self) -> int:
        classes = self.classes
        running = self.running
        self._held = set()
        if not classes.slo_budget:  # type: ignore[union-attr]
            return self._budget
        online_decodes = online_ctx = 0
        offline_decoding: list[SimRequest] = []
        offline_prefilling: list[SimRequest] = []
        default_slo_ms = slo_ms = classes.tpot_slo_ms or 0.0  # type: ignore[union-attr]
        bank = classes.spend_tpot_slack and classes.ttft_slo_ms  # type: ignore[union-attr]
        now = self.events.now
        decodes: list[OnlineDecode] = []
        for req in running:
            if req.offline:
                (offline_decoding if req.computed >= req.prompt else offline_prefilling).append(req)
                continue
            online_ctx += req.computed
            if req.computed >= req.prompt:
                online_decodes += 1
                own = req.spec.slo_tpot_ms
                if own is not None and own < slo_ms:
                    slo_ms = own
                if bank and req.first_token_s is not None:
                    decodes.append(OnlineDecode(own or default_slo_ms, req.generated,
                                                (now - req.first_token_s) * 1000))
        limit_ms = None
        if decodes:
            headroom = classes.headroom  # type: ignore[union-attr]
            ttft_ms = classes.ttft_slo_ms or 0.0  # type: ignore[union-attr]
            limit_ms = banked_step_limit(decodes, headroom, cap_ms=headroom * ttft_ms / 2)
        if not online_decodes:  # an offline step must not hold an online arrival past its TTFT
            offline_present = self.offline_running or self.waiting_offline
            slo_ms = (classes.ttft_slo_ms or 0.0) / 2 if offline_present else 0.0  # type: ignore[union-attr]
        if slo_ms <= 0:
            return self._budget
        self.budget_constrained_steps += 1
        plan = plan_class_step(
            self._step_s, online_decodes=online_decodes, online_ctx=online_ctx,
            offline_decode_ctx=[r.computed for r in offline_decoding],
            offline_prefills=[(r.computed, r.prompt + r.generated - r.computed)
                              for r in offline_prefilling], slo_ms=slo_ms,
            headroom=classes.headroom,  # type: ignore[union-attr]
            min_prefill=classes.min_prefill_tokens,  # type: ignore[union-attr]
            max_budget=self._budget,
            online_prefill_tokens=self.queued_prefill_tokens - self.offline_queued_prefill_tokens,
            online_waiting=bool(self.waiting), limit_ms=limit_ms)
        if plan.held_offline_decodes or plan.held_offline_prefills:
            self.offline_decodes_held += len(plan.held_offline_decodes)
            self.offline_prefill_held += len(plan.held_offline_prefills)
            self._held = ({id(offline_decoding[i]) for i in plan.held_offline_decodes}
                          | {id(offline_prefilling[i]) for i in plan.held_offline_prefills})
        return plan.tokens

    def _make_room_for_online(self) -> None:
        """Preempt running offline requests, newest first, while waiting online work lacks
        run slots or KV blocks (``xllm_plugin.scheduler.preemption``)."""
        bs = self.kv.block_size
        slots = len(self.running) + len(self.waiting) - self._max_seqs
        blocks = sum(-(-(r.prompt + r.generated) // bs) for r in self.waiting) - self.kv.available()
        if slots <= 0 and blocks <= 0:
            return
        victims = sorted((r for r in self.running if r.offline),
                         key=lambda r: r.spec.arrival_s, reverse=True)
        for victim in victims:
            if slots <= 0 and blocks <= 0:
                break
            held = victim.private_blocks + len(victim.pinned)
            self.running.remove(victim)
            self._preempt(victim)
            self.preempted_for_online += 1
            slots -= 1
            blocks -= held

    def _make_budget_for_online(self, budget: int) -> None:
        """Preempt running offline prefills, newest first, while the step's budget left after
        running online work and offline decodes cannot hold the waiting online prompts
        (``ClassScheduling.preempt_offline_prefill``: a what-if, XLLMScheduler lacks it)."""
        need = 0
        prefilling: list[SimRequest] = []
        for req in self.running:
            remaining = req.prompt + req.generated - req.computed
            if req.offline and (remaining > 1 or req.generated == 0):
                prefilling.append(req)
            else:
                need += remaining
        if not prefilling:
            return
        online = min(sum(r.prompt + r.generated - r.computed for r in self.waiting), budget)
        spare = budget - need - online
        offline = sum(r.prompt + r.generated - r.computed for r in prefilling)
        for victim in sorted(prefilling, key=lambda r: r.spec.arrival_s, reverse=True):
            if offline <= spare:
                break
            offline -= victim.prompt + victim.generated - victim.computed
            self.running.remove(victim)
            self._preempt(victim)
            self.preempted_for_online += 1

    # -- migration -------------------------------------------------------------------------
    def migrate_out(self, count: int, target_id: str) -> None:
        """Move up to ``count`` offline requests to ``target_id`` (now if idle, else after this step).

        Waiting offline requests go first (e.g. preempted by online work), then running
        offline requests past their prompt, most output left first. Each is released
        here and re-prefills prompt + generated tokens on the target (``on_migrate``).
        """
        if count > 0:
            self._migrate.append((count, target_id))
            if not self.busy:
                self._migrate_now()

    def _migrate_now(self) -> None:
        pending, self._migrate = self._migrate, []
        for count, target in pending:
            moved: list[SimRequest] = []
            queue = self.waiting_offline if self.classes is not None else self.waiting
            while queue and len(moved) < count:
                candidates = [r for r in queue if r.offline and not r.prefill_only]
                if not candidates:
                    break
                req = candidates[-1]
                queue.remove(req)
                self.queued_prefill_tokens -= req.remaining
                self.offline_queued_prefill_tokens -= req.remaining
                self.kv.release(req)
                moved.append(req)
            if len(moved) < count:
                decoding = sorted((r for r in self.running if r.offline and not r.prefill_only
                                   and r.computed >= r.prompt),
                                  key=lambda r: r.output - r.generated, reverse=True)
                for req in decoding[:count - len(moved)]:
                    self.running.remove(req)
                    self.kv.release(req)
                    self.running_tokens -= req.computed
                    self.offline_running -= 1
                    queued = _queued_part(req)  # a recompute still under way
                    self.queued_prefill_tokens -= queued
                    self.offline_queued_prefill_tokens -= queued
                    moved.append(req)
            for req in moved:
                req.computed = 0
                req.migrations += 1
                self.on_migrate(req, target)

    def _fail_unfittable(self, req: SimRequest, queue: deque[SimRequest] | None = None) -> None:
        """A request that cannot fit even in an empty cache: vLLM rejects it."""
        self.kv.release(req)
        (queue if queue is not None else self.waiting).popleft()
        self.queued_prefill_tokens -= req.remaining
        if req.offline:
            self.offline_queued_prefill_tokens -= req.remaining
        req.ok = False
        req.error = "does not fit in the KV cache"
        self.on_fail(req, self.events.now)

    def release_transferred(self, req: SimRequest) -> None:
        """Drop a prefill-only request's blocks once its KV has left this instance."""
        self.kv.release(req)

    def stats(self, span_s: float) -> dict[str, float]:
        out = {"utilisation": self.busy_s / span_s if span_s > 0 else 0.0,
               "steps": self.steps, "tokens": self.tokens, "preemptions": self.preemptions,
               "evictions": self.kv.evictions, "role": self.role}
        if self.classes is not None:
            out["preempted_for_online"] = self.preempted_for_online
            out["budget_constrained_steps"] = self.budget_constrained_steps
            out["offline_prefill_held"] = self.offline_prefill_held
            out["offline_decodes_held"] = self.offline_decodes_held
        return out


def _is_offline(req: SimRequest) -> bool:
    return req.offline


def _queued_part(req: SimRequest) -> int:
    """What of a running request's known tokens ``queued_prefill_tokens`` still counts: the
    rest of its prompt (or of a recompute), not the single token of a decode."""
    remaining = req.prompt + req.generated - req.computed
    return remaining if (remaining > 1 or req.generated == 0) else 0

"""XLLMScheduler: the thin place where the plugin's scheduling policies meet vLLM.

Selected with ``vllm serve ... --scheduler-cls xllm_plugin.scheduler.XLLMScheduler``.
Policies live in sibling modules and stay testable without an engine; this
class only feeds them vLLM's state and publishes what it sees.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import create_request_queue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from xllm_plugin import __version__
from xllm_plugin.config import XLLMConfig, parse_xllm_config
from xllm_plugin.memory.wiring import check_worker as check_xtensor_worker
from xllm_plugin.memory.wiring import scheduler_lookahead_tokens
from xllm_plugin.scheduler.budget import (BudgetDecision, OnlineDecode, banked_step_limit,
                                           plan_step_budget)
from xllm_plugin.scheduler.class_queue import ClassAwareQueue
from xllm_plugin.scheduler.phases import EncodeHold, running_rank
from xllm_plugin.scheduler.preemption import OfflineVictimPicker, shortfall
from xllm_plugin.scheduler.request_class import CLASSES, RequestClass, classify
from xllm_plugin.scheduler.step_model import StepLatencyModel, StepWork
from xllm_plugin.scheduler.step_timing import StepTiming
from xllm_plugin.spec import adaptive_speculation_for
from xllm_plugin.status_channel import StatusPublisher


class XLLMScheduler(Scheduler):
    """vLLM's scheduler plus online/offline classes and a live status feed.

    Online requests wait ahead of offline ones, run ahead of them in each step
    (so vLLM's own out-of-memory preemption, which takes the last running
    request, hits offline work first), and preempt running offline requests
    when they lack a slot or KV blocks.

    vLLM chooses ``AsyncScheduler`` over ``Scheduler`` when async scheduling is
    on (GPUs; the CPU platform turns it off). A custom class bypasses that
    choice, so constructing ``XLLMScheduler`` yields ``XLLMAsyncScheduler``
    whenever the config asks for async scheduling.
    """

    def __new__(cls, vllm_config: Any, *args: Any, **kwargs: Any) -> XLLMScheduler:
        if cls is XLLMScheduler and vllm_config.scheduler_config.async_scheduling:
            cls = XLLMAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Authoritative check: also covers engines built from Python, where the
        # command-line fast path in register() never ran.
        self.xllm_config: XLLMConfig = parse_xllm_config(self.vllm_config.additional_config)
        if self.xllm_config.xtensor:  # see xllm_plugin/memory/wiring.py
            check_xtensor_worker(self.xllm_config, self.parallel_config.worker_cls)
            # Allocate the next block one token early so the worker pre-maps it.
            self.num_lookahead_tokens = max(self.num_lookahead_tokens,
                                            scheduler_lookahead_tokens(self.xllm_config))
        self._classes: dict[str, RequestClass] = {}
        self.waiting = ClassAwareQueue(lambda: create_request_queue(self.policy),
                                       self.request_class)
        self._victims = OfflineVictimPicker(
            is_offline=lambda r: self.request_class(r) == "offline",
            arrival_time=lambda r: r.arrival_time,
            blocks_held=lambda r: len(self.kv_cache_manager.get_block_ids(r.request_id)[0]))
        self._preempted_for_online = 0
        batching = self.xllm_config.batching
        self._encode_hold = (EncodeHold(batching.max_encode_hold_steps)
                             if batching.phase_aware else None)
        self._preemptions: Counter[str] = Counter()
        self._finished: Counter[str] = Counter()
        self._steps = 0
        self._last_step_tokens = 0
        self._configured_budget = self.max_num_scheduled_tokens
        self._step_model = StepLatencyModel()
        self._budget = BudgetDecision(self._configured_budget, constrained=False)
        self._budget_constrained_steps = 0
        self._offline_prefill_held = 0
        self._offline_decodes_held = 0
        self._step_started: tuple[float, StepWork] | None = None
        self._last_step_ms: float | None = None
        # When the previous update_from_output began: the host's work between two timed
        # steps (vLLM's and the plugin's bookkeeping) runs from there to the next step.
        self._last_update_began: float | None = None
        self._last_gap_ms: float | None = None
        self._last_predicted_ms: float | None = None  # the model's, for the work scheduled
        # Under async scheduling the next schedule() runs before this step's outputs
        # arrive: there is no gap between steps to measure.
        self._timing = None if self.scheduler_config.async_scheduling else StepTiming()
        slo = self.xllm_config.slo
        self._spend_slack = slo.spend_tpot_slack and slo.ttft_ms is not None
        # When each online request's first output token came (perf_counter): its TPOT so
        # far. Kept only while slack is spent, the one thing that reads it.
        self._first_token_at: dict[str, float] = {}
        # Adaptive speculation length (None when off); see xllm_plugin/spec.
        self._spec = adaptive_speculation_for(self.vllm_config, self.xllm_config.speculative)
        self._publisher = StatusPublisher(self.xllm_config.status_interval_ms / 1000)
        self._publisher.publish(self.status_snapshot, force=True)

    def request_class(self, request: Request) -> RequestClass:
        cached = self._classes.get(request.request_id)
        if cached is None:
            extra = request.sampling_params.extra_args if request.sampling_params else None
            cached = classify(request.priority, extra, self.xllm_config.request_classes)
            self._classes[request.request_id] = cached
        return cached

    def add_request(self, request: Request) -> None:
        self.request_class(request)
        super().add_request(request)

    def schedule(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        if self._timing is not None:
            self._timing.step_began(time.perf_counter())
        if self._encode_hold is None:
            # Stable sort: online first, each class keeping its order.
            self.running.sort(key=lambda r: self.request_class(r) == "offline")
        else:  # and within a class decodes before unfinished prefills
            self.running.sort(key=lambda r: running_rank(
                self.request_class(r) == "offline", r.num_computed_tokens,
                r.num_prompt_tokens))
        self._make_room_for_online()
        restore_waiting = self._hold_new_encodes()
        self._budget, offline_decoding, offline_prefilling = self._plan_budget()
        self._budget_constrained_steps += self._budget.constrained
        self._sit_out_offline_work(offline_decoding, offline_prefilling)
        self.max_num_scheduled_tokens = self._budget.tokens
        if self._spec is not None:
            self._spec.before_schedule(self.running)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = self._configured_budget
            restore_waiting()
        if self._spec is not None:
            self._spec.after_schedule(output)
        self._steps += 1
        self._last_step_tokens = output.total_num_scheduled_tokens
        self._step_started = (time.perf_counter(), self._work_of(output.num_scheduled_tokens))
        return output

    def _sit_out_offline_work(self, offline_decoding: list[Request],
                              offline_prefilling: list[Request]) -> None:
        """Keep the offline work the budget left out of this step out of vLLM's pass.

        vLLM skips a running request while ``current_step`` is below its
        ``next_decode_eligible_step``; ``schedule`` advances ``current_step`` before it
        checks, so ``current_step + 2`` skips this call alone (as vLLM's own diffusion
        scheduler does)."""
        decodes = [offline_decoding[i] for i in self._budget.held_offline_decodes]
        chunks = [offline_prefilling[i] for i in self._budget.held_offline_prefills]
        self._offline_decodes_held += len(decodes)
        self._offline_prefill_held += len(chunks)
        for request in decodes + chunks:
            request.next_decode_eligible_step = max(request.next_decode_eligible_step,
                                                    self.current_step + 2)

    def _hold_new_encodes(self) -> Callable[[], None]:
        """Phase-aware batching: keep new requests whose images need the encoder out of
        this step while an admitted prefill is unfinished (xllm_plugin/scheduler/phases.py).
        Returns what puts them back after vLLM's pass."""
        if self._encode_hold is None or not self.waiting:
            return _nothing
        prefill_pending = any(r.num_computed_tokens < r.num_prompt_tokens for r in self.running)
        held = self._encode_hold.select(self.waiting, prefill_pending=prefill_pending,
                                        needs_encode=self._needs_encoder,
                                        key=lambda r: r.request_id)
        return self.waiting.withhold(held)

    def _needs_encoder(self, request: Request) -> bool:
        """A request not yet started with a multimodal item neither in the encoder cache
        nor offered by the EC connector (an E->PD consumer loads, it does not encode)."""
        if request.num_computed_tokens or not request.has_encoder_inputs:
            return False
        cached = getattr(self.encoder_cache_manager, "cached", {})
        for feature in request.mm_features:
            if feature.identifier in cached:
                continue
            if self.ec_connector is not None and self.ec_connector.has_cache_item(
                    feature.identifier):
                continue
            return True
        return False

    def tpot_slo_ms(self, request: Request) -> float | None:
        """The request's own TPOT SLO (``vllm_xargs.slo_tpot_ms``), else the configured one."""
        extra = request.sampling_params.extra_args if request.sampling_params else None
        own = (extra or {}).get("slo_tpot_ms")
        return float(own) if isinstance(own, (int, float)) and own > 0 else \
            self.xllm_config.slo.tpot_ms

    def _plan_budget(self) -> tuple[BudgetDecision, list[Request], list[Request]]:
        """The step's budget, and the decoding and prefilling running offline requests it
        speaks of (in running order)."""
        online_running, online_decoding, offline_decoding, offline_prefilling = [], [], [], []
        for r in self.running:
            online = self.request_class(r) == "online"
            if online:
                online_running.append(r)
            if r.num_computed_tokens >= r.num_prompt_tokens:
                (online_decoding if online else offline_decoding).append(r)
            elif not online:
                offline_prefilling.append(r)
        online_prefill = sum(max(r.num_prompt_tokens - r.num_computed_tokens, 0)
                             for r in online_running)
        online_waiting = sum(r.num_tokens - r.num_computed_tokens
                             for r in self.waiting.of_class("online"))
        with_slo = [(r, own) for r in online_decoding if (own := self.tpot_slo_ms(r)) is not None]
        slo = self.xllm_config.slo
        tpot_limit = None
        if self._spend_slack and with_slo:
            now = time.perf_counter()
            tpot_limit = banked_step_limit(
                [OnlineDecode(own, r.num_output_tokens,
                              (now - self._first_token_at.get(r.request_id, now)) * 1000)
                 for r, own in with_slo],
                slo.headroom, cap_ms=slo.headroom * slo.ttft_ms / 2)
        decision = plan_step_budget(
            self._step_model, online_decodes=len(online_decoding),
            online_context_tokens=sum(r.num_computed_tokens for r in online_running),
            offline_decode_contexts=[r.num_computed_tokens for r in offline_decoding],
            offline_prefills=[(r.num_computed_tokens, r.num_prompt_tokens - r.num_computed_tokens)
                              for r in offline_prefilling],
            tightest_tpot_slo_ms=min(own for _, own in with_slo) if with_slo else None,
            ttft_slo_ms=slo.ttft_ms,
            offline_present=len(online_running) < len(self.running)
            or self.waiting.count("offline") > 0,
            max_budget=self._configured_budget, min_prefill=slo.min_prefill_tokens,
            headroom=slo.headroom, online_prefill_tokens=online_prefill + online_waiting,
            online_waiting=online_waiting > 0, tpot_limit_ms=tpot_limit)
        return decision, offline_decoding, offline_prefilling

    def _note_first_tokens(self) -> None:
        """Remember when online requests got their first output token (``_plan_budget``)."""
        now = time.perf_counter()
        for request in self.running:
            if request.num_output_tokens and request.request_id not in self._first_token_at \
                    and self.request_class(request) == "online":
                self._first_token_at[request.request_id] = now

    def _work_of(self, scheduled: dict[str, int]) -> StepWork:
        """The step's work; called after vLLM advanced num_computed_tokens by ``scheduled``."""
        prefill = decode = context = 0
        for request_id, tokens in scheduled.items():
            if tokens == 1:
                decode += 1
            else:
                prefill += tokens
            request = self.requests.get(request_id)
            if request is not None:
                context += max(0, request.num_computed_tokens - tokens)
        return StepWork(prefill, decode, context)

    def _make_room_for_online(self) -> None:
        """Preempt offline requests when waiting online requests lack slots or KV blocks."""
        online_waiting = list(self.waiting.of_class("online"))
        if not online_waiting:
            return
        block_size = self.block_size
        need = shortfall([-(-r.num_tokens // block_size) for r in online_waiting],
                         running=len(self.running), max_running=self.max_num_running_reqs,
                         free_blocks=self.kv_cache_manager.block_pool.get_num_free_blocks())
        if not need.any:
            return
        now = time.monotonic()
        for victim in self._victims.pick(self.running, need):
            self.running.remove(victim)
            self._preempt_request(victim, now)
            # Preempted and possibly resumed within one step: vLLM must treat it as
            # not scheduled in the previous step (as reset_prefix_cache does).
            self.prev_step_scheduled_req_ids.discard(victim.request_id)
            self._preempted_for_online += 1

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        self._preemptions[self.request_class(request)] += 1
        super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Request, *args: Any, **kwargs: Any):  # type: ignore[override]
        self._finished[self.request_class(request)] += 1
        self._classes.pop(request.request_id, None)
        self._first_token_at.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)

    def update_from_output(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        if self._step_started is not None:
            started, work = self._step_started
            self._step_started = None
            now = time.perf_counter()
            self._last_step_ms = (now - started) * 1000
            self._last_gap_ms = None if self._last_update_began is None else \
                (started - self._last_update_began) * 1000
            self._last_update_began = now
            # Judged before the model learns from this step: the error a plan made with it had.
            # (The budget's own prediction is of the most work the limit allowed, which a step
            # with less work to do falls short of by design.)
            self._last_predicted_ms = self._step_model.predict_ms(work)
            if work.prefill_tokens or work.decode_tokens:
                self._step_model.observe(work, self._last_step_ms)
            if self._timing is not None:
                self._timing.step_finished(now, self._last_step_ms, self._last_predicted_ms,
                                           self._budget.limit_ms, self._budget.constrained)
        outputs = super().update_from_output(*args, **kwargs)
        if self._spend_slack:
            self._note_first_tokens()
        if self._spec is not None:
            self._spec.after_update(*args[:2], self._last_step_ms, self.requests,
                                    gap_ms=self._last_gap_ms)
        self._publisher.publish(self.status_snapshot, force=not self.has_requests())
        if self._timing is not None:
            self._timing.outputs_sent(busy=self.has_requests())
        return outputs

    def finish_requests(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        result = super().finish_requests(*args, **kwargs)
        self._publisher.publish(self.status_snapshot, force=not self.has_requests())
        return result

    def status_snapshot(self) -> dict[str, Any]:
        """The live state served by /xllm/status (read in the API-server process)."""
        running = Counter(self.request_class(r) for r in self.running)
        waiting_requests = [*self.waiting, *self.kv_holding_waiting]
        waiting = Counter(self.request_class(r) for r in waiting_requests)
        return {
            "plugin_version": __version__,
            "engine_pid": os.getpid(),
            "published_at": time.time(),
            "scheduler": type(self).__name__,
            "async_scheduling": bool(self.scheduler_config.async_scheduling),
            "config": self.xllm_config.model_dump(),
            "steps": self._steps,
            "last_step_scheduled_tokens": self._last_step_tokens,
            "kv_cache_usage": self.get_kv_cache_usage(),
            "running": {c: running.get(c, 0) for c in CLASSES},
            "waiting": {c: waiting.get(c, 0) for c in CLASSES},
            "preemptions": {c: self._preemptions.get(c, 0) for c in CLASSES},
            "offline_preempted_for_online": self._preempted_for_online,
            "phase_aware": None if self._encode_hold is None else {
                "encode_holds": self._encode_hold.holds,
                "released_by_cap": self._encode_hold.released_by_cap},
            "budget": {
                "configured_tokens": self._configured_budget,
                "last_tokens": self._budget.tokens,
                "last_constrained": self._budget.constrained,
                "last_slo_ms": self._budget.slo_ms,
                "last_planned_ms": self._budget.planned_ms,
                "last_predicted_ms": self._last_predicted_ms,
                "last_limit_ms": self._budget.limit_ms,
                "last_step_ms": self._last_step_ms,
                "constrained_steps": self._budget_constrained_steps,
                "offline_prefill_chunks_held": self._offline_prefill_held,
                "offline_decodes_held": self._offline_decodes_held,
                "step_model_ms": dict(zip(("c0", "per_prefill_token", "per_decode_token",
                                           "per_1k_context_tokens"),
                                          map(float, self._step_model.coefficients))),
                "step_model_samples": self._step_model.samples,
                "timing": self._timing.status() if self._timing is not None else None,
            },
            "finished": {c: self._finished.get(c, 0) for c in CLASSES},
            "speculative": self._spec.status() if self._spec is not None else None,
        }


def _nothing() -> None:
    """Nothing was held back: nothing to restore."""


class XLLMAsyncScheduler(XLLMScheduler, AsyncScheduler):
    """XLLMScheduler on top of vLLM's AsyncScheduler (output placeholders for overlap)."""

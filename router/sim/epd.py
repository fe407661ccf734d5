"""EPD disaggregation in the simulator: encode, prefill and decode pools per strategy.

``simulate_epd(workload, EPDConfig, MMDeployment)`` runs a multimodal workload
(``RequestSpec.image_tokens``/``image_count``, e.g. ServeGen mm-image) on the
instance split of one strategy (``router.policies.epd``):

- **encode** is its own stage: a step may carry an encoder batch (whole images,
  never chunked; ``router.sim.encoder`` gives its compute time) beside the
  instance's language-model work, which then waits for it (same GPU);
- **encoder outputs** cross to a prefill instance on the sender's NIC
  (``image_tokens x out_hidden`` BF16 values) when E and P are apart;
- **prefill** is chunked under the config's token budget (the deployment's
  ``max_num_batched_tokens`` by default), decode-first as in vLLM v1;
- **KV** crosses to a decode instance when P and D are apart, as in
  ``router.sim.cluster`` (``transfer_latency_ms + prompt x kv_bytes_per_token /
  transfer_bytes_per_s``, serialised per sender); the decode instance's first
  step computes the first token (so TTFT includes the transfer).

Step composition: running decodes, then running prefill chunks, then new
prefills while the budget lasts, then an encoder batch. Without
``phase_aware`` (vLLM's behaviour) the encoder batch takes waiting images up to
a token budget equal to the step's (``max_num_encoder_input_tokens`` defaults
to ``max_num_batched_tokens``); with it (XLLMScheduler's phase-aware batching)
the batch holds at most ``encode_batch`` images and new encodes start only when
no admitted-but-unstarted prefill waits. vLLM encodes an image in the same step
as its first prefill chunk; here the encode step comes first and the prefill
follows in the next step (one step later, a few ms on the GPU deployments).

Routing inside a strategy is the same for all of them: a new request goes to
the least-backlogged instance of its first stage (images: the encoder-capable
pool; text only: the prefill-capable pool), and each handoff to the
least-backlogged instance of the next stage. KV capacity is reserved whole
(prompt + output) at admission; nothing is preempted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.policies.epd import EPDConfig, StageCosts, WorkloadSummary, summarize_requests
from router.sim.encoder import MMDeployment
from router.sim.events import EventQueue
from router.sim.metrics import SLO, RequestRecord, summarize
from router.sim.sweep import OVERLOAD_GRACE, max_rate_at_attainment
from router.sim.workload import RequestSpec, Workload


class EPDRequest:
    """Run state of one multimodal request across its stages."""

    __slots__ = ("spec", "prompt", "output", "images", "computed", "generated", "encode_start_s",
                 "encode_end_s", "prefill_start_s", "prefill_end_s", "first_token_s", "finish_s",
                 "encoder_id", "prefill_id", "decode_id", "ok", "error")

    def __init__(self, spec: RequestSpec) -> None:
        self.spec = spec
        self.prompt = spec.prompt_tokens
        self.output = spec.output_tokens
        # image tokens split evenly over the request's images (the trace gives only the total)
        count = max(spec.image_count, 1) if spec.image_tokens > 0 else 0
        share, extra = divmod(spec.image_tokens, count) if count else (0, 0)
        self.images = [share + (k < extra) for k in range(count)]
        self.computed = 0
        self.generated = 0
        self.encode_start_s: float | None = None
        self.encode_end_s: float | None = None
        self.prefill_start_s: float | None = None
        self.prefill_end_s: float | None = None
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.encoder_id: str | None = None
        self.prefill_id: str | None = None
        self.decode_id: str | None = None
        self.ok = True
        self.error = ""


Handoff = Callable[[EPDRequest, "EPDInstance"], None]


class EPDInstance:
    """One engine serving some of the phases ``E``, ``P``, ``D`` (see the module doc)."""

    __slots__ = ("instance_id", "phases", "events", "mm", "budget", "encode_batch",
                 "encode_tokens", "phase_aware", "max_seqs", "kv_capacity", "kv_used",
                 "encode_q", "prefill_q", "prefilling", "decode_q", "decoding", "busy", "busy_s",
                 "queued_image_tokens", "queued_prefill_tokens", "decode_ctx", "on_encoded",
                 "on_prefilled",
                 "on_done", "_chunks", "_decodes", "_encodes")

    def __init__(self, instance_id: str, phases: str, mm: MMDeployment, config: EPDConfig,
                 events: EventQueue, on_encoded: Handoff, on_prefilled: Handoff,
                 on_done: Handoff) -> None:
        dep = mm.llm
        self.instance_id = instance_id
        self.phases = phases
        self.events = events
        self.mm = mm
        self.budget = ((config.token_budget if "D" in phases else None)
                       or dep.max_num_batched_tokens)
        self.encode_batch = config.encode_batch if config.phase_aware else None
        # vLLM's encoder budget (max_num_encoder_input_tokens) defaults to max_num_batched_tokens;
        # a profiled encoder batch counts images instead.
        self.encode_tokens = self.budget if self.encode_batch is None else float("inf")
        self.phase_aware = config.phase_aware
        self.max_seqs = dep.max_num_seqs
        self.kv_capacity = dep.num_kv_blocks * dep.block_size
        self.kv_used = 0
        self.encode_q: deque[EPDRequest] = deque()
        self.prefill_q: deque[EPDRequest] = deque()
        self.prefilling: list[EPDRequest] = []
        self.decode_q: deque[EPDRequest] = deque()
        self.decoding: list[EPDRequest] = []
        self.busy = False
        self.busy_s = 0.0
        self.queued_image_tokens = 0
        self.queued_prefill_tokens = 0
        self.decode_ctx = 0  # context tokens of ``decoding`` (kept, not summed every step)
        self.on_encoded = on_encoded
        self.on_prefilled = on_prefilled
        self.on_done = on_done
        self._chunks: list[tuple[EPDRequest, int]] = []
        self._decodes: list[EPDRequest] = []
        self._encodes: list[EPDRequest] = []

    # -- intake ------------------------------------------------------------------------------
    def add_encode(self, req: EPDRequest) -> None:
        req.encoder_id = self.instance_id
        self.encode_q.append(req)
        self.queued_image_tokens += req.spec.image_tokens
        self.queued_prefill_tokens += req.prompt if "P" in self.phases else 0
        self._wake()

    def add_prefill(self, req: EPDRequest) -> None:
        req.prefill_id = self.instance_id
        self.prefill_q.append(req)
        self.queued_prefill_tokens += req.prompt
        self._wake()

    def add_decode(self, req: EPDRequest) -> None:
        req.decode_id = self.instance_id
        self.decode_q.append(req)
        self._wake()

    def _wake(self) -> None:
        if not self.busy:
            self._start_step()

    @property
    def decode_load(self) -> int:
        return len(self.decoding) + len(self.decode_q) + len(self.prefilling)

    # -- one step ----------------------------------------------------------------------------
    def _reserve(self, req: EPDRequest) -> bool:
        need = req.prompt + req.output
        if self.kv_used + need > self.kv_capacity:
            return False
        self.kv_used += need
        return True

    def _start_step(self) -> None:
        now = self.events.now
        seqs = len(self.decoding) + len(self.prefilling)
        while self.decode_q and seqs < self.max_seqs and self._reserve(self.decode_q[0]):
            req = self.decode_q.popleft()
            self.decoding.append(req)
            self.decode_ctx += req.prompt + req.generated
            seqs += 1
        decodes = self._decodes
        decodes[:] = self.decoding
        decode_ctx = self.decode_ctx
        budget = self.budget
        chunks = self._chunks
        chunks.clear()
        prefill_tokens = 0
        prefill_attn = 0.0
        for req in self.prefilling:
            if budget <= 0:
                break
            n = min(req.prompt - req.computed, budget)
            chunks.append((req, n))
            prefill_tokens += n
            prefill_attn += n * (req.computed + n * 0.5)
            budget -= n
        while self.prefill_q and budget > 0 and seqs < self.max_seqs:
            req = self.prefill_q[0]
            if not self._reserve(req):
                if not self.prefilling and not self.decoding and not self.kv_used:
                    self.prefill_q.popleft()
                    self.queued_prefill_tokens -= req.prompt
                    self._fail(req, "does not fit in the KV cache")
                    continue
                break
            self.prefill_q.popleft()
            self.prefilling.append(req)
            seqs += 1
            req.prefill_start_s = now
            n = min(req.prompt, budget)
            chunks.append((req, n))
            prefill_tokens += n
            prefill_attn += n * n * 0.5
            budget -= n
        encodes = self._encodes
        encodes.clear()
        image_tokens: list[int] = []
        if self.encode_q and not (self.phase_aware and self.prefill_q):
            images = tokens = 0
            while self.encode_q:
                req = self.encode_q[0]
                more = len(req.images)
                over_batch = self.encode_batch is not None and images + more > self.encode_batch
                if encodes and (over_batch or tokens + req.spec.image_tokens > self.encode_tokens):
                    break
                self.encode_q.popleft()
                req.encode_start_s = now
                encodes.append(req)
                image_tokens.extend(req.images)
                images += more
                tokens += req.spec.image_tokens
        if not decodes and not chunks and not encodes:
            self.busy = False
            return
        duration = self.mm.encoder.compute_s(image_tokens) if encodes else 0.0
        if decodes or chunks:
            duration += self.mm.llm.step_model.step_s(prefill_tokens, prefill_attn, len(decodes),
                                                      decode_ctx)
        else:
            duration += self.mm.encoder.overhead_ms * 1e-3
        self.busy = True
        self.busy_s += duration
        self.events.schedule(now + duration, self._end_step)

    def _end_step(self, _: object) -> None:
        now = self.events.now
        finished = False
        self.decode_ctx += len(self._decodes)
        for req in self._decodes:
            req.generated += 1
            if req.generated == 1:
                req.first_token_s = now
            if req.generated >= req.output:
                req.finish_s = now
                finished = True
        if finished:
            keep = []
            for req in self.decoding:
                if req.finish_s is None:
                    keep.append(req)
                else:
                    self.kv_used -= req.prompt + req.output
                    self.decode_ctx -= req.prompt + req.generated
                    self.on_done(req, self)
            self.decoding = keep
        done_prefill = False
        for req, n in self._chunks:
            req.computed += n
            self.queued_prefill_tokens -= n
            done_prefill |= req.computed >= req.prompt
        if done_prefill:
            keep = []
            for req in self.prefilling:
                if req.computed < req.prompt:
                    keep.append(req)
                    continue
                req.prefill_end_s = now
                if "D" in self.phases:  # the prefill step samples the first token
                    req.generated = 1
                    req.first_token_s = now
                    req.decode_id = self.instance_id
                    if req.output <= 1:
                        req.finish_s = now
                        self.kv_used -= req.prompt + req.output
                        self.on_done(req, self)
                    else:
                        self.decoding.append(req)
                        self.decode_ctx += req.prompt + 1
                else:
                    self.kv_used -= req.prompt + req.output  # released once the KV has left
                    self.on_prefilled(req, self)
            self.prefilling = keep
        for req in self._encodes:
            req.encode_end_s = now
            self.queued_image_tokens -= req.spec.image_tokens
            if "P" in self.phases:
                self.queued_prefill_tokens -= req.prompt  # add_prefill counts it again
                self.add_prefill(req)
            else:
                self.on_encoded(req, self)
        self._encodes.clear()
        self._start_step()

    def _fail(self, req: EPDRequest, error: str) -> None:
        req.ok = False
        req.error = error
        self.on_done(req, self)


@dataclass
class EPDResult:
    records: list[RequestRecord]
    summary: dict[str, Any]
    requests: list[EPDRequest]
    wall_s: float


class EPDCluster:
    """The instances of one ``EPDConfig`` and the handoffs between them."""

    def __init__(self, workload: Workload, config: EPDConfig, mm: MMDeployment, slo: SLO,
                 stop_after_s: float | None = None) -> None:
        self.workload = workload
        self.config = config
        self.mm = mm
        self.slo = slo
        self.stop = stop_after_s if stop_after_s is not None else float("inf")
        self.events = EventQueue()
        self.instances: list[EPDInstance] = []
        for phases, count in config.pools():
            for _ in range(count):
                self.instances.append(EPDInstance(
                    f"{phases.lower()}{len(self.instances)}", phases, mm, config, self.events,
                    self._encoded, self._prefilled, self._done))
        self.encoders = [i for i in self.instances if "E" in i.phases]
        self.prefillers = [i for i in self.instances if "P" in i.phases]
        self.decoders = [i for i in self.instances if "D" in i.phases]
        self._nic_free_at = {i.instance_id: 0.0 for i in self.instances}
        self.done: list[EPDRequest] = []

    # -- routing -------------------------------------------------------------------------------
    def _arrive(self, spec: RequestSpec) -> None:
        req = EPDRequest(spec)
        if spec.prompt_tokens + spec.output_tokens > self.mm.llm.max_model_len:
            req.ok, req.error = False, f"longer than max_model_len {self.mm.llm.max_model_len}"
            self.done.append(req)
            return
        if req.images:
            # a pool that also prefills is judged by all the prompt work queued on it
            key = _prefill_backlog if "P" in self.encoders[0].phases else _encode_backlog
            min(self.encoders, key=key).add_encode(req)
        else:
            min(self.prefillers, key=_prefill_backlog).add_prefill(req)

    def _send(self, sender: EPDInstance, nbytes: float, then: Callable[[Any], None],
              req: EPDRequest) -> None:
        """Serialise transfers on the sender's NIC, as ``router.sim.cluster`` does for KV."""
        dep = self.mm.llm
        start = max(self.events.now, self._nic_free_at[sender.instance_id])
        end = start + dep.transfer_latency_ms * 1e-3 + nbytes / dep.transfer_bytes_per_s
        self._nic_free_at[sender.instance_id] = end
        self.events.schedule(end, then, req)

    def _encoded(self, req: EPDRequest, source: EPDInstance) -> None:
        target = min(self.prefillers, key=_prefill_backlog)
        self._send(source, self.mm.encoder.output_bytes(req.spec.image_tokens),
                   lambda r: target.add_prefill(r), req)

    def _prefilled(self, req: EPDRequest, source: EPDInstance) -> None:
        target = min(self.decoders, key=_decode_backlog)
        self._send(source, req.prompt * self.mm.llm.kv_bytes_per_token,
                   lambda r: target.add_decode(r), req)

    def _done(self, req: EPDRequest, _: EPDInstance) -> None:
        self.done.append(req)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> EPDResult:
        began = time.perf_counter()
        arrivals = self.workload.requests
        events = self.events
        k, n = 0, len(arrivals)
        while True:
            t_event = events.next_time()
            if k < n and arrivals[k].arrival_s <= t_event:
                if arrivals[k].arrival_s > self.stop:
                    break
                events.now = arrivals[k].arrival_s
                self._arrive(arrivals[k])
                k += 1
            elif events and t_event <= self.stop:
                events.pop_and_run()
            else:
                break
        records = [self._record(r) for r in self.done]
        seen = {r.request_id for r in records}
        records += [RequestRecord(s.request_id, s.arrival_s, s.prompt_tokens, s.output_tokens,
                                  None, None, False, None, None, None,
                                  error="unfinished when the run stopped")
                    for s in arrivals if s.request_id not in seen]
        end = events.now
        span = self.workload.duration_s or end
        summary = summarize(records, self.slo, span)
        summary.update(self._stage_summary(end))
        return EPDResult(records, summary, self.done, time.perf_counter() - began)

    def _record(self, req: EPDRequest) -> RequestRecord:
        spec = req.spec
        ttft = tpot = None
        if req.ok and req.first_token_s is not None:
            ttft = (req.first_token_s - spec.arrival_s) * 1e3
            if req.output > 1 and req.finish_s is not None:
                tpot = (req.finish_s - req.first_token_s) * 1e3 / (req.output - 1)
        return RequestRecord(spec.request_id, spec.arrival_s, spec.prompt_tokens,
                             spec.output_tokens, req.decode_id,
                             req.prefill_id if req.prefill_id != req.decode_id else None,
                             req.ok and req.finish_s is not None, ttft, tpot, req.finish_s,
                             slo_ttft_ms=spec.slo_ttft_ms, slo_tpot_ms=spec.slo_tpot_ms,
                             error=req.error)

    def _stage_summary(self, end: float) -> dict[str, Any]:
        """Mean encode queueing and encode time (ms), and per-pool utilisation."""
        encoded = [r for r in self.done if r.encode_start_s is not None and r.encode_end_s]
        out: dict[str, Any] = {
            "encode_wait_ms_mean": (sum(r.encode_start_s - r.spec.arrival_s for r in encoded)
                                    * 1e3 / len(encoded)) if encoded else 0.0,
            "encode_ms_mean": (sum(r.encode_end_s - r.encode_start_s for r in encoded)
                               * 1e3 / len(encoded)) if encoded else 0.0,
            "sim_end_s": end,
        }
        for phases, _ in self.config.pools():
            pool = [i for i in self.instances if i.phases == phases]
            out[f"utilisation_{phases}"] = (sum(i.busy_s for i in pool) / (len(pool) * end)
                                            if end > 0 else 0.0)
        return out


def _encode_backlog(inst: EPDInstance) -> tuple[int, int]:
    return inst.queued_image_tokens, inst.decode_load


def _prefill_backlog(inst: EPDInstance) -> tuple[int, int]:
    return inst.queued_prefill_tokens, inst.decode_load


def _decode_backlog(inst: EPDInstance) -> tuple[int, int]:
    return inst.decode_load, inst.queued_prefill_tokens


def simulate_epd(workload: Workload, config: EPDConfig, mm: MMDeployment, slo: SLO,
                 stop_after_s: float | None = None) -> EPDResult:
    """Run ``workload`` on ``config``'s instance split (see the module doc)."""
    return EPDCluster(workload, config, mm, slo, stop_after_s).run()


# -- the profiler's view of the simulated deployment --------------------------------------------

def stage_costs(mm: MMDeployment) -> StageCosts:
    """The deployment's step model and encoder roofline as the profiler's cost functions
    (a prefill of ``t`` tokens from an empty context: ``t**2 / 2`` attention pairs)."""
    step = mm.llm.step_model.step_s
    return StageCosts(encode_s=mm.encoder.batch_s,
                      step_s=lambda t, seqs, ctx: step(t, t * t * 0.5, seqs, ctx),
                      encode_overhead_s=mm.encoder.overhead_ms * 1e-3)


def workload_summary(workload: Workload) -> WorkloadSummary:
    """The profiler's summary of a workload (means per request, rate over its span)."""
    return summarize_requests((r.arrival_s, r.prompt_tokens - r.image_tokens, r.image_tokens,
                               r.image_count if r.image_tokens else 0, r.output_tokens)
                              for r in workload.requests)


def attainment_at(workload: Workload, config: EPDConfig, mm: MMDeployment, slo: SLO,
                  rate: float) -> float:
    """SLO attainment of ``workload`` time-scaled to ``rate`` req/s, stopped as sweeps stop."""
    scaled = workload.at_rate(rate)
    result = simulate_epd(scaled, config, mm, slo, OVERLOAD_GRACE * scaled.duration_s + 60.0)
    return result.summary["slo_attainment"]


def max_goodput(workload: Workload, config: EPDConfig, mm: MMDeployment, slo: SLO,
                target: float = 0.9, start: float | None = None, rel_tol: float = 0.03) -> float:
    """Highest rate (req/s) at which ``target`` of requests meet both SLOs (0 if none does)."""
    rate = max_rate_at_attainment(lambda r: attainment_at(workload, config, mm, slo, r), target,
                                  start or max(workload.mean_rate, 0.1), rel_tol)
    return rate or 0.0

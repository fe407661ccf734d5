"""Fixed-step beam search over vLLM, with each beam kept alive as an engine session.

Stock vLLM (``use_beam_search``) submits every beam as a new request at every
step: each one re-reads the prompt from the prefix cache, recomputes the
prompt's partial last block plus the item tokens so far, and returns ``2 x width``
log-probs as Python dicts. For wide beams and short items that recomputation is
most of the work. This driver does the same search with less work:

1. **Beams live between steps.** Each beam is a vLLM streaming-input session
   (``AsyncLLM.generate`` with an async input stream): after a step the engine
   keeps the beam's KV and waits; the next step appends one token. A selected
   child continues in its parent's session (a one-token step).
2. **Forks copy KV.** A parent's second and later children start new sessions
   whose prompt is the parent's tokens plus their own; with ``BeamForkConnector``
   (``kv_fork.py``) the engine copies the parent's blocks instead of recomputing
   the partial block, and full blocks come from the prefix cache either way.
3. **One engine step per search step.** All beams' next tokens are sent together
   and only then awaited, so the engine schedules them in one batch.
4. **Partial top-k.** Each beam returns its ``width`` best log-probs (``+1`` for
   the mask's sink), flat (no per-token objects); ``topk.select_top`` keeps the
   best ``width`` with a bounded min-heap and early exits.
5. **Buffers reused.** Item tokens and scores live in two preallocated arrays
   that swap roles every step; a beam's token list is built only for a fork.

With ``sessions=False`` the driver resubmits every beam every step like stock
vLLM (keeping 3-5), an ablation that isolates the host-side work.

Scores are sums of the model's log-probs of the item tokens, as in stock beam
search with ``ignore_eos`` (items have a fixed length, so no length penalty).
With a catalog the log-probs come from ``CatalogMaskProcessor`` with a sink, so
they are the unmasked model log-probs of the valid tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from vllm.engine.protocol import EngineClient, StreamingInput
from vllm.inputs import tokens_input
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from xllm_plugin.config import RecommendConfig
from xllm_plugin.recommend.admission import Admission
from xllm_plugin.recommend.catalog import Catalog
from xllm_plugin.recommend.kv_fork import BEAM_ARG, FORK_FROM_ARG
from xllm_plugin.recommend.logits import CATALOG_ARG, PREFIX_ARG, SINK_ARG
from xllm_plugin.recommend.topk import select_top

FORK_CONNECTOR = "BeamForkConnector"
MASK_PROCESSOR = "CatalogMaskProcessor"


class RecommendError(ValueError):
    """A request this server cannot run; the message says which flag or field to change."""


class EngineFailure(RuntimeError):
    """The engine aborted or failed one of the beams."""


@dataclass(frozen=True)
class SearchSpec:
    """One beam search: ``num_tokens`` steps of width ``beam_width``, best ``top_k`` returned."""

    prompt_token_ids: list[int]
    beam_width: int
    num_tokens: int
    top_k: int
    catalog: Catalog | None = None
    catalog_ref: str | None = None
    sessions: bool | None = None  # None: the server's xllm.recommend.sessions
    fork: bool = True  # copy KV into forked beams when BeamForkConnector is loaded


@dataclass
class SearchStats:
    mode: str
    queued_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    engine_requests: int = 0
    continued: int = 0
    forked: int = 0


@dataclass
class SearchResult:
    items: list[tuple[list[int], float]]  # (item tokens, score), best first
    stats: SearchStats


@dataclass(frozen=True)
class EngineFeatures:
    """What the running engine offers, read once from its config."""

    max_logprobs: int
    max_num_seqs: int
    num_blocks: int | None
    block_size: int
    fork_connector: bool
    mask_processor: bool
    processed_logprobs: bool

    @classmethod
    def of(cls, engine_client: EngineClient) -> EngineFeatures:
        config = engine_client.vllm_config
        kv_transfer = config.kv_transfer_config
        connectors = []
        if kv_transfer is not None:
            connectors.append(kv_transfer.kv_connector or "")
            extra = kv_transfer.kv_connector_extra_config or {}
            connectors += [c.get("kv_connector", "") for c in extra.get("connectors", [])]
        processors = [p if isinstance(p, str) else getattr(p, "__name__", "")
                      for p in (config.model_config.logits_processors or [])]
        return cls(
            max_logprobs=config.model_config.max_logprobs,
            max_num_seqs=config.scheduler_config.max_num_seqs,
            num_blocks=config.cache_config.num_gpu_blocks,
            block_size=config.cache_config.block_size,
            fork_connector=FORK_CONNECTOR in connectors,
            mask_processor=any(p.endswith(MASK_PROCESSOR) for p in processors),
            processed_logprobs=config.model_config.logprobs_mode == "processed_logprobs")


def _top_candidates(output: RequestOutput) -> tuple[np.ndarray, np.ndarray]:
    """The step's top-k (tokens, log-probs) of one beam, best first, without the
    sampled token that vLLM puts in front."""
    logprobs = output.outputs[0].logprobs
    if logprobs is None or len(logprobs) == 0:
        raise EngineFailure(f"engine returned no logprobs for {output.request_id}")
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        start, end = logprobs.start_indices[-1], logprobs.end_indices[-1]
        tokens = np.asarray(logprobs.token_ids[start + 1:end], dtype=np.int64)
        values = np.asarray(logprobs.logprobs[start + 1:end], dtype=np.float64)
    else:
        last = logprobs[-1]
        tokens = np.fromiter(last.keys(), dtype=np.int64, count=len(last))
        values = np.fromiter((lp.logprob for lp in last.values()), dtype=np.float64,
                             count=len(last))
    if values.size > 1 and not bool(np.all(values[:-1] >= values[1:])):
        order = np.argsort(-values, kind="stable")
        tokens, values = tokens[order], values[order]
    return tokens, values


class _Session:
    """One beam as a vLLM streaming-input request: the KV stays while it waits."""

    def __init__(self, engine: EngineClient, key: str, prompt: list[int],
                 params: SamplingParams) -> None:
        self.key = key
        self._queue: asyncio.Queue[StreamingInput | None] = asyncio.Queue()
        self._queue.put_nowait(StreamingInput(prompt=tokens_input(prompt)))
        self._outputs = engine.generate(self._inputs(), params, key)
        self._closed = False

    async def _inputs(self) -> AsyncGenerator[StreamingInput, None]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    def push(self, tokens: list[int], params: SamplingParams | None) -> None:
        self._queue.put_nowait(StreamingInput(prompt=tokens_input(tokens), sampling_params=params))

    async def result(self) -> RequestOutput:
        output = await self._outputs.__anext__()
        reason = output.outputs[0].finish_reason if output.outputs else None
        if reason in ("abort", "error"):
            raise EngineFailure(f"beam {self.key} ended with finish_reason={reason}")
        return output

    async def close(self) -> None:
        """Abort the session so the engine frees its KV now."""
        if not self._closed:
            self._closed = True
            await self._outputs.aclose()


class BeamSearchDriver:
    """Runs beam searches against the engine of this ``vllm serve`` process."""

    def __init__(self, engine: EngineClient, config: RecommendConfig,
                 features: EngineFeatures | None = None) -> None:
        self._engine = engine
        self._config = config
        self.features = features or EngineFeatures.of(engine)
        beams = min(config.max_live_beams or self.features.max_num_seqs, self.features.max_num_seqs)
        blocks = self.features.num_blocks
        self.admission = Admission(beams, int(blocks * 0.9) if blocks else None)
        self._serial = 0

    def check(self, spec: SearchSpec) -> None:
        """Reject what this server cannot run, naming the flag that would allow it."""
        width, feats = spec.beam_width, self.features
        if width > self._config.max_beam_width:
            raise RecommendError(f"beam_width {width} > xllm.recommend.max_beam_width "
                                 f"{self._config.max_beam_width}")
        if not 1 <= spec.top_k <= width:
            raise RecommendError(f"top_k must be in [1, beam_width={width}], got {spec.top_k}")
        if spec.num_tokens < 1:
            raise RecommendError("num_tokens must be >= 1")
        if not spec.prompt_token_ids:
            raise RecommendError("the prompt is empty")
        needed = self._num_logprobs(spec)
        if feats.max_logprobs != -1 and needed > feats.max_logprobs:
            raise RecommendError(f"beam_width {width} needs {needed} logprobs per beam; start "
                                 f"vllm serve with --max-logprobs {needed} or more "
                                 f"(now {feats.max_logprobs})")
        if spec.catalog is not None:
            if spec.num_tokens != spec.catalog.item_len:
                raise RecommendError(f"catalog {spec.catalog_ref!r} has {spec.catalog.item_len}"
                                     f" tokens per item, request asks num_tokens={spec.num_tokens}")
            if not feats.mask_processor:
                raise RecommendError("catalog search needs vllm serve --logits-processors "
                                     "xllm_plugin.recommend.logits:CatalogMaskProcessor")
            if not feats.processed_logprobs:
                raise RecommendError("catalog search needs vllm serve --logprobs-mode "
                                     "processed_logprobs (scores are read after the mask)")

    def _num_logprobs(self, spec: SearchSpec) -> int:
        # Each beam contributes at most `width` survivors; the mask's sink takes one more slot.
        return spec.beam_width + (1 if spec.catalog is not None else 0)

    def _params(self, spec: SearchSpec, prefix: Sequence[int] | None = None,
                beam: str | None = None, fork_from: str | None = None) -> SamplingParams:
        """Per-step request: one greedy token, the top-k log-probs flat, no detokenizing."""
        args: dict[str, Any] = {}
        if spec.catalog is not None:
            args.update({CATALOG_ARG: spec.catalog_ref, PREFIX_ARG: list(prefix or ()),
                         SINK_ARG: True})
        if beam is not None and spec.fork and self.features.fork_connector:
            args[BEAM_ARG] = beam
            if fork_from is not None:
                args[FORK_FROM_ARG] = fork_from
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=self._num_logprobs(spec),
                              ignore_eos=True, detokenize=False, flat_logprobs=True,
                              output_kind=RequestOutputKind.DELTA, extra_args=args or None)

    def _blocks_needed(self, spec: SearchSpec) -> int:
        size = self.features.block_size
        prompt = len(spec.prompt_token_ids)
        private = -(-(prompt + spec.num_tokens) // size) - prompt // size
        return -(-prompt // size) + spec.beam_width * private

    async def search(self, spec: SearchSpec, request_id: str) -> SearchResult:
        self.check(spec)
        sessions = self._config.sessions if spec.sessions is None else spec.sessions
        stats = SearchStats(mode="sessions" if sessions else "resubmit")
        queued = time.perf_counter()
        async with self.admission.reserve(spec.beam_width, self._blocks_needed(spec)):
            stats.queued_ms = (time.perf_counter() - queued) * 1e3
            if sessions:
                items = await self._search_sessions(spec, request_id, stats)
            else:
                items = await self._search_resubmit(spec, request_id, stats)
        return SearchResult(items, stats)

    def _candidates(self, spec: SearchSpec, outputs: list[RequestOutput], items: np.ndarray,
                    step: int) -> tuple[list[list[int]], list[list[float]]]:
        tokens, values = [], []
        for beam, output in enumerate(outputs):
            beam_tokens, beam_values = _top_candidates(output)
            if spec.catalog is not None:  # drop the sink and masked (-inf) tokens
                valid = spec.catalog.children(tuple(items[beam, :step].tolist()))
                keep = np.isin(beam_tokens, valid) & np.isfinite(beam_values)
                beam_tokens, beam_values = beam_tokens[keep], beam_values[keep]
            tokens.append(beam_tokens.tolist())
            values.append(beam_values.tolist())
        return tokens, values

    async def _search_sessions(self, spec: SearchSpec, request_id: str,
                               stats: SearchStats) -> list[tuple[list[int], float]]:
        width, length = spec.beam_width, spec.num_tokens
        items, next_items = (np.zeros((width, length), dtype=np.int64) for _ in range(2))
        scores, next_scores = np.zeros(width), np.zeros(width)
        serial = 0

        def new_session(prompt_tail: list[int], prefix: list[int], parent: str | None) -> _Session:
            nonlocal serial
            key = f"{request_id}-beam{serial}"
            serial += 1
            stats.engine_requests += 1
            params = self._params(spec, prefix, beam=key, fork_from=parent)
            return _Session(self._engine, key, spec.prompt_token_ids + prompt_tail, params)

        sessions: list[_Session] = [new_session([], [], None)]
        closing: list[asyncio.Task[None]] = []
        try:
            started = time.perf_counter()
            outputs = [await sessions[0].result()]
            count = 1
            for step in range(length):
                stats.step_ms.append((time.perf_counter() - started) * 1e3)
                tokens, values = self._candidates(spec, outputs, items, step)
                selected = select_top(scores[:count].tolist(), tokens, values, width)
                if not selected:
                    raise RecommendError("no valid continuation: the catalog has no item "
                                         "that the model gives a finite score")
                for j, pick in enumerate(selected):
                    next_items[j, :step] = items[pick.beam, :step]
                    next_items[j, step] = pick.token
                    next_scores[j] = pick.score
                items, next_items = next_items, items
                scores, next_scores = next_scores, scores
                count = len(selected)
                if step + 1 == length:
                    break
                started = time.perf_counter()
                next_sessions: list[_Session] = []
                continued: set[int] = set()
                for j, pick in enumerate(selected):
                    prefix = items[j, :step + 1].tolist()
                    if pick.beam not in continued:
                        continued.add(pick.beam)
                        session = sessions[pick.beam]
                        session.push([pick.token], self._params(spec, prefix) if spec.catalog
                                     is not None else None)
                        stats.continued += 1
                    else:
                        session = new_session(prefix, prefix, sessions[pick.beam].key)
                        stats.forked += 1
                    next_sessions.append(session)
                closing += [asyncio.create_task(s.close()) for b, s in enumerate(sessions)
                            if b not in continued]
                sessions = next_sessions
                outputs = list(await asyncio.gather(*(s.result() for s in sessions)))
            return [(items[j].tolist(), float(scores[j])) for j in range(min(spec.top_k, count))]
        finally:
            closing += [asyncio.create_task(s.close()) for s in sessions]
            await asyncio.gather(*closing, return_exceptions=True)

    async def _search_resubmit(self, spec: SearchSpec, request_id: str,
                               stats: SearchStats) -> list[tuple[list[int], float]]:
        """Stock vLLM's request pattern (a new request per beam and step), our host side."""
        width, length = spec.beam_width, spec.num_tokens
        items, next_items = (np.zeros((width, length), dtype=np.int64) for _ in range(2))
        scores, next_scores = np.zeros(width), np.zeros(width)
        count = 1
        for step in range(length):
            started = time.perf_counter()

            async def one(beam: int) -> RequestOutput:
                prefix = items[beam, :step].tolist()
                params = self._params(spec, prefix)
                params.output_kind = RequestOutputKind.FINAL_ONLY
                last = None
                async for output in self._engine.generate(
                        tokens_input(spec.prompt_token_ids + prefix), params,
                        f"{request_id}-s{step}-b{beam}"):
                    last = output
                assert last is not None
                return last

            stats.engine_requests += count
            outputs = list(await asyncio.gather(*(one(b) for b in range(count))))
            stats.step_ms.append((time.perf_counter() - started) * 1e3)
            tokens, values = self._candidates(spec, outputs, items, step)
            selected = select_top(scores[:count].tolist(), tokens, values, width)
            if not selected:
                raise RecommendError("no valid continuation in the catalog")
            for j, pick in enumerate(selected):
                next_items[j, :step] = items[pick.beam, :step]
                next_items[j, step] = pick.token
                next_scores[j] = pick.score
            items, next_items = next_items, items
            scores, next_scores = next_scores, scores
            count = len(selected)
        return [(items[j].tolist(), float(scores[j])) for j in range(min(spec.top_k, count))]

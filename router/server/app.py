"""The router's HTTP front door: OpenAI in, one chosen engine instance out.

Routes (all answers to errors use OpenAI's error shape):

==========================  ========================================================
``POST /v1/completions``    routed; streamed chunk by chunk when ``stream`` is true
``POST /v1/chat/completions`` routed, likewise
``GET /v1/models``          union of the models the instances serve
``GET /health``             200 while the router runs, with instance counts
``GET /ready``              200 when at least one instance is healthy, else 503
``GET /metrics``            the router's Prometheus metrics
``GET /admin/instances``    the load view (admin token)
``POST /admin/instances``   ``{"add": "URL[;opts]"}`` or ``{"remove": "ID"}`` (admin token)
``GET /admin/epd``          the EPD profiler's measurements and choices (admin token)
``POST /admin/epd/profile`` ``{"model": NAME, "wait": bool}``: profile it again (admin token)
==========================  ========================================================

Request path: parse and validate -> (tokenize and look up prefix hits, only for
policies that read them) -> ``policy.route(request_info, cluster_view)`` ->
forward. If the instance fails before any byte reached the client, the request
is routed once more with that instance excluded; a stream that breaks later moves to
another instance with its tokens so far (``_migrate``, router/server/migration.py,
``--migration-limit``). Every wait has a timeout
(connect, first byte, idle between chunks, whole non-streaming response).
A client that disconnects cancels the handler, which closes the upstream
connection, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import msgspec
from aiohttp import web

from router.batch import BatchRunner, BatchStore, http_sender
from router.batch.routes import BatchAPI
from router.config import RouterConfig
from router.discovery.etcd import EtcdClient
from router.discovery.records import RecordError, parse_instance_spec
from router.discovery.watcher import EtcdWatcher
from router.policies import POLICY_FACTORIES, make_policy
from router.policies.recovery import ResumeCandidate, plan_resume
from router.policies.types import (
    MigratingPolicy,
    Migration,
    NoInstanceAvailable,
    ObservingPolicy,
    RebalancingPolicy,
    RequestOutcome,
    RoutingDecision,
    RoutingPolicy,
)
from router.server.assemble import CollectedResponse
from router.server.errors import RouterError, error_body
from router.server.instance_state import Transition
from router.server.liveness import (LivenessProber, ProbeResult, Silence,
                                    probe_after_s, probe_timeout_s, read_or_probe)
from router.server.load_view import InstanceLoad, LoadTicket, LoadView
from router.server.metrics import RouterMetrics
from router.server.migration import (MalformedEvent, SeamRepair, SSESplitter, StreamLedger,
                                     migratable, start_ledger)
from router.server.moves import LiveRequests, MoveHandle
from router.server.epd import (EncodeResult, EncodeStage, encode_instance, encode_instance_ids,
                               image_count, wants_encode)
from router.server.epd_profile import (HEADER_EPD_STRATEGY, HEADER_PROBE, LIVE_STRATEGIES,
                                       EPDAutoStrategy)
from router.server.pd import Handoff, PrefillStage, supports_handoff
from router.server.prefix import PrefixLookup, policy_uses_prefix_hits
from router.server.profiler import InstanceProfiler
from router.server.requests import HEADER_POLICY, Kind, ParsedRequest, parse_request
from router.server.upstream import post as upstream_post

log = logging.getLogger("xllm.router")

HEADER_INSTANCE = "x-xllm-instance"  # response header: which instance served the request
HEADER_POLICY_USED = "x-xllm-policy"
HEADER_PREFILL_INSTANCE = "x-xllm-prefill-instance"  # set when P prefilled for D
HEADER_PD = "x-xllm-pd"  # "handoff" or "fallback_<reason>" for disaggregated requests
HEADER_ENCODE_INSTANCE = "x-xllm-encode-instance"  # set when E encoded the images for PD
HEADER_EPD = "x-xllm-epd"  # "loaded" or "fallback_<reason>" for requests with an encode stage
HEADER_MIGRATIONS = "x-xllm-migrations"  # non-streamed answers: times the request moved
REBALANCE_INTERVAL_S = 1.0
_PATHS: dict[Kind, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_CLIENT_CLOSED = 499  # nginx's convention for "client closed the request", metrics only
_NOT_FORWARDED = frozenset({HEADER_POLICY, "x-forwarded-for"})
T = TypeVar("T")


class UpstreamFailure(Exception):
    """The chosen instance failed before any byte went to the client (so a retry is safe)."""

    def __init__(self, reason: str, status: int, message: str, *, connect: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message
        self.connect = connect


def _unanswered(instance_id: str, what: str, silence: Silence, wait_s: float) -> UpstreamFailure:
    """No response or first token yet: a failed liveness probe (retried elsewhere, and it
    counts against the instance) or the plain timeout."""
    if silence.kind in ("dead", "stuck"):
        return UpstreamFailure(silence.kind, 502, f"instance {instance_id} sent no {what}: "
                               f"{silence.detail}", connect=True)
    return UpstreamFailure("timeout", 504, f"instance {instance_id} sent no {what} within "
                           f"{wait_s:g}s")


class Router:
    """One router: configuration, load view, policies, metrics and the aiohttp app."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        upstream_headers = ({"Authorization": f"Bearer {config.upstream_api_key}"}
                            if config.upstream_api_key else {})
        self.load = LoadView(scrape_interval_s=config.scrape_interval_s,
                             scrape_timeout_s=config.scrape_timeout_s,
                             rules=config.state_rules(),
                             upstream_headers=upstream_headers)
        self.upstream_headers = upstream_headers
        self.policies: dict[str, RoutingPolicy] = {}
        self._policy(config.policy)
        self.live_requests = LiveRequests()  # what a policy's move or a failover may cut
        self.liveness = LivenessProber(lambda: self.session, upstream_headers, self._probed)
        # Per instance: EWMA of first-token time per prompt token (queueing included), the
        # prefill cost estimate for choosing where a failed request resumes.
        self._prefill_ms_per_token: dict[str, float] = {}
        self.prefix: PrefixLookup | None = None
        if config.block_size is not None:
            try:
                self.prefix = PrefixLookup(block_size=config.block_size,
                                           tokenizer_dir=config.tokenizer,
                                           hash_seed=config.hash_seed, hash_algo=config.hash_algo)
            except ImportError as exc:
                log.warning("KV-aware routing unavailable (%s); prefix hits stay empty", exc)
        self.session: aiohttp.ClientSession | None = None
        self.etcd: EtcdClient | None = None
        self.watcher: EtcdWatcher | None = None
        self._background: list[asyncio.Task[None]] = []
        # P->D disaggregation: the prefill stage, and profiling for latency-predicting policies.
        self.prefill_stage = PrefillStage(self.load, self.metrics, lambda: self.session,
                                          connect_timeout_s=config.connect_timeout_s,
                                          timeout_s=config.first_byte_timeout_s)
        # E->PD: images encoded on an encode instance first (router/server/epd.py).
        self.encode_stage = EncodeStage(self.load, self.metrics, lambda: self.session,
                                        connect_timeout_s=config.connect_timeout_s,
                                        timeout_s=config.first_byte_timeout_s)
        self.profiler = InstanceProfiler(lambda: self.session, upstream_headers,
                                         enabled=config.profile_instances)
        # Whether images go through E at all: the live EPD profiler's choice per model.
        self.epd = EPDAutoStrategy(
            config.epd_settings(), self.load, self.metrics, lambda: self.session,
            lambda: self.front_url, upstream_headers,
            {"Authorization": f"Bearer {config.api_keys[0]}"} if config.api_keys else {},
            splits_prefill=getattr(self.policies[config.policy], "splits_prefill", False))
        # Batch lines go through this router's own front door at offline class;
        # its loopback URL is known once the listening socket is bound.
        self.front_url: str | None = None
        self.batch_runner: BatchRunner | None = None
        if config.batch_dir is not None:
            self.batch_runner = BatchRunner(BatchStore(config.batch_dir), self._send_batch_line,
                                            concurrency=config.batch_concurrency)
        self.load.on_added.append(self._instance_added)
        self.load.on_removed.append(self._instance_removed)
        self.load.on_scraped.append(self._instance_scraped)
        self.load.on_transition.append(self._instance_transition)

    # -- lifecycle ----------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware],
                              client_max_size=int(self.config.max_body_mb * 1024 * 1024))
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/ready", self.handle_ready)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/admin/instances", self.handle_admin_list)
        app.router.add_post("/admin/instances", self.handle_admin_change)
        app.router.add_get("/admin/epd", self.handle_admin_epd)
        app.router.add_post("/admin/epd/profile", self.handle_admin_epd_profile)
        if self.batch_runner is not None:
            BatchAPI(self.batch_runner.store, self.batch_runner).add_routes(app)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        # Idle upstream connections are dropped before vLLM's own keep-alive timeout
        # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s): reusing one the engine is closing fails
        # before the first byte, and with no other instance to retry on that loses the request.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=4)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        for record in self.config.instances:
            self.load.upsert(record)
        if self.config.etcd:
            self.etcd = EtcdClient(self.config.etcd, self.session)
            self.watcher = EtcdWatcher(self.etcd, self.config.etcd_prefix, self.load.upsert,
                                       self.load.remove)
            self.watcher.start()
            try:
                await asyncio.wait_for(self.watcher.synced.wait(), timeout=5)
            except TimeoutError:
                log.warning("etcd at %s not reachable yet; will keep trying", self.config.etcd)
        await self.load.start(self.session)
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._rebalance_loop(), name="rebalance"))
        healthy = sum(1 for i in self.load.instances.values() if i.healthy)
        log.info("router ready: policy=%s, %d instance(s), %d healthy", self.config.policy,
                 len(self.load.instances), healthy)

    def attach_front_url(self, url: str) -> None:
        """Tell the router where it listens (loopback URL); starts resuming batch jobs."""
        self.front_url = url.rstrip("/")
        if self.batch_runner is not None:
            assert self.session is not None, "call after the app has started"
            api_key = self.config.api_keys[0] if self.config.api_keys else None
            self._batch_http = http_sender(self.session, self.front_url, api_key,
                                           timeout_s=self.config.request_timeout_s)
            self.batch_runner.start()

    async def _send_batch_line(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.front_url is None:
            raise RuntimeError("batch runner used before attach_front_url()")
        return await self._batch_http(path, body)

    async def _cleanup(self, app: web.Application) -> None:
        if self.batch_runner is not None:
            await self.batch_runner.stop()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.profiler.stop()
        await self.epd.stop()
        await self.liveness.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        await self.load.stop()
        if self.prefix is not None:
            await self.prefix.close()
        if self.session is not None:
            await self.session.close()

    # -- load-view callbacks --------------------------------------------------------------------

    def _instance_added(self, load: InstanceLoad) -> None:
        record = load.record
        self.metrics.instance_healthy.labels(record.instance_id).set(0)
        if self.prefix is not None and record.kv_events_endpoint:
            if record.block_size and record.block_size != self.prefix.block_size:
                log.warning("instance %s uses block size %d but the router hashes with %d: "
                            "its prefix hits will be zero", record.instance_id,
                            record.block_size, self.prefix.block_size)
            try:
                self.prefix.subscribe(record.instance_id, record.kv_events_endpoint,
                                      record.kv_events_replay_endpoint)
            except ImportError as exc:
                log.warning("cannot subscribe to KV events of %s: %s", record.instance_id, exc)

    def _instance_removed(self, load: InstanceLoad) -> None:
        if self.prefix is not None:
            self.prefix.unsubscribe(load.instance_id)
        self.metrics.forget_instance(load.instance_id)

    def _instance_transition(self, change: Transition) -> None:
        self.metrics.instance_transitions.labels(change.before, change.after).inc()
        load = self.load.instances.get(change.instance_id)
        if load is not None and load.health.incarnation == change.incarnation:
            self.metrics.instance_healthy.labels(change.instance_id).set(
                1 if load.healthy else 0)
        if change.after in ("failed", "removed"):
            cut = self.live_requests.cut_all(change.instance_id)
            if cut:
                log.warning("instance %s %s: moving its %d live requests now", change.instance_id,
                            change.after, cut)

    def _instance_scraped(self, load: InstanceLoad) -> None:
        if self.load.instances.get(load.instance_id) is not load:
            return
        m, iid = self.metrics, load.instance_id
        m.instance_healthy.labels(iid).set(1 if load.healthy else 0)
        m.instance_inflight.labels(iid).set(load.inflight)
        m.instance_load.labels(iid, "running").set(load.running)
        m.instance_load.labels(iid, "waiting").set(load.waiting)
        m.instance_kv_usage.labels(iid).set(load.kv_usage)
        m.set_role(iid, load.role)
        self.profiler.maybe_start(load, self.policies[self.config.policy])
        for model in load.models or ((load.record.model,) if load.record.model else ()):
            self.epd.maybe_start(model)

    async def _rebalance_loop(self) -> None:
        while True:
            await asyncio.sleep(REBALANCE_INTERVAL_S)
            policy = self.policies[self.config.policy]
            if isinstance(policy, RebalancingPolicy) and self.load.instances:
                models = self.load.models()
                for model in models:
                    self._apply_role_changes(policy.rebalance(self.load.view(model)))
            if isinstance(policy, MigratingPolicy) and self.load.instances:
                for model in self.load.models():
                    self._order_moves(policy.migrations(self.load.view(model)))

    def _order_moves(self, moves: tuple[Migration, ...]) -> None:
        """Carry out a policy's offline moves (router/server/moves.py)."""
        for move in moves:
            target = self.load.instances.get(move.to_instance_id)
            if target is None or not target.healthy:
                continue
            ordered = sum(h.order_move(move.to_instance_id, move.reason or "rebalance")
                          for h in self.live_requests.pick(move.from_instance_id, move.count,
                                                           self.config.migration_limit))
            if ordered:
                log.info("moving %d offline requests %s -> %s (%s)", ordered,
                         move.from_instance_id, move.to_instance_id, move.reason)
                self.metrics.offline_moves.labels(move.from_instance_id, move.to_instance_id,
                                                  move.reason or "rebalance").inc(ordered)

    def _apply_role_changes(self, changes: Any) -> None:
        for change in changes:
            load = self.load.instances.get(change.instance_id)
            if load is not None and load.role != change.role:
                log.info("instance %s: role %s -> %s (%s)", change.instance_id, load.role,
                         change.role, change.reason)
                self.metrics.role_switches.labels(change.instance_id, load.role, change.role,
                                                  change.reason or "unspecified").inc()
                load.role_override = change.role
                self.metrics.set_role(change.instance_id, change.role)

    # -- middleware: auth and error shape -------------------------------------------------------

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _check_api_key(self, request: web.Request) -> None:
        if not self.config.api_keys:
            return
        token = self._bearer(request)
        if token is None:
            raise RouterError(401, "missing API key: send 'Authorization: Bearer KEY'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in self.config.api_keys):
            raise RouterError(401, "invalid API key", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})

    def _check_admin(self, request: web.Request) -> None:
        if not self.config.admin_token:
            raise RouterError(403, "admin routes are disabled: start the router with "
                              "--admin-token", code="admin_disabled")
        token = self._bearer(request)
        if token is None or not hmac.compare_digest(token.encode(),
                                                    self.config.admin_token.encode()):
            raise RouterError(401, "missing or invalid admin token", code="invalid_admin_token",
                              headers={"WWW-Authenticate": "Bearer"})

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/"):
                self._check_api_key(request)
            elif request.path.startswith("/admin/"):
                self._check_admin(request)
            return await handler(request)
        except RouterError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return web.json_response(error_body(exc.status, f"{exc.reason}: {request.method} "
                                                f"{request.path}"), status=exc.status)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return web.json_response(error_body(500, "internal router error (see router log)"),
                                     status=500)

    # -- routed requests ------------------------------------------------------------------------

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        started = time.perf_counter()
        ctx: dict[str, Any] = {"policy": self.config.policy, "instance": "none", "status": 500,
                               "hits": 0, "ttft_ms": None, "parsed": None}
        try:
            response = await self._generate_routed(request, kind, started, ctx)
            ctx["status"] = ctx.get("stream_status") or response.status
            return response
        except RouterError as exc:
            ctx["status"] = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            ctx["status"] = _CLIENT_CLOSED
            raise
        finally:
            self.metrics.requests.labels(ctx["policy"], ctx["instance"], str(ctx["status"])).inc()
            if log.isEnabledFor(logging.DEBUG):
                parsed: ParsedRequest | None = ctx["parsed"]
                log.debug("request %s model=%s class=%s stream=%s policy=%s -> %s status=%s "
                          "hits=%s ttft_ms=%s e2e_ms=%.1f",
                          parsed.request_id if parsed else "-", parsed.model if parsed else "-",
                          parsed.request_class if parsed else "-",
                          parsed.stream if parsed else "-", ctx["policy"], ctx["instance"],
                          ctx["status"], ctx["hits"],
                          f"{ctx['ttft_ms']:.1f}" if ctx["ttft_ms"] is not None else "-",
                          (time.perf_counter() - started) * 1000)

    def _policy(self, name: str) -> RoutingPolicy:
        policy = self.policies.get(name)
        if policy is None:
            policy = self.policies[name] = make_policy(name, **self.config.policy_settings(name))
        return policy

    async def _generate_routed(self, request: web.Request, kind: Kind, started: float,
                               ctx: dict[str, Any]) -> web.StreamResponse:
        raw = await request.read()
        parsed = parse_request(kind, raw, request.headers,
                               offline_min_priority=self.config.offline_min_priority,
                               known_policies=POLICY_FACTORIES)
        ctx["parsed"] = parsed
        if self.config.migration_limit and migratable(parsed) is None:
            ctx["ledger"] = start_ledger(parsed)  # records tokens so the stream can move
        policy_name = parsed.policy_override or self.config.policy
        ctx["policy"] = policy_name
        if not self.load.serving(parsed.model):
            available = ", ".join(self.load.models()) or "none"
            raise RouterError(404, f"model '{parsed.model}' does not exist here; available: "
                              f"{available}", param="model", code="model_not_found")
        policy = self._policy(policy_name)
        encoders = encode_instance_ids(self.load, parsed.model)  # never generation targets
        encode_id = None
        if wants_encode(parsed):
            forced = request.headers.get(HEADER_EPD_STRATEGY)
            if forced is not None and forced not in LIVE_STRATEGIES:
                raise RouterError(400, f"header {HEADER_EPD_STRATEGY} must be one of "
                                  f"{', '.join(LIVE_STRATEGIES)}, not {forced!r}",
                                  param=HEADER_EPD_STRATEGY, code="invalid_header")
            ctx["epd_traffic"] = HEADER_PROBE not in request.headers
            if self.epd.encodes_apart(parsed.model, forced):
                encode_id = encode_instance(self.load, parsed.model)
        if encode_id is not None:  # E first; PD then loads E's output (router/server/epd.py)
            encoded = await self.encode_stage.run(parsed, encode_id, _PATHS[parsed.kind],
                                                  self._forward_headers(request, parsed))
            encoded.apply(parsed)
            ctx["encode"] = encoded

        decision_began = time.perf_counter()
        prompt_tokens, hashes, hits, tiers = None, (), {}, {}
        if self.prefix is not None and policy_uses_prefix_hits(policy):
            prompt_tokens, hashes, hits = self.prefix.lookup(parsed)
            tiers = self.prefix.tier_hits(hashes, [i.instance_id for i in
                                                   self.load.serving(parsed.model)])
            self.metrics.prompt_blocks.inc(len(hashes))
        info = parsed.request_info(prompt_tokens, hashes,
                                   default_slo_ttft_ms=self.config.slo_ttft_ms,
                                   default_slo_tpot_ms=self.config.slo_tpot_ms)
        lookup_s = time.perf_counter() - decision_began

        tried: set[str] = set()
        failure: UpstreamFailure | None = None
        for attempt in range(2):
            began = time.perf_counter()
            try:
                decision = policy.route(info, self.load.view(parsed.model,
                                                             frozenset(tried) | encoders, hits,
                                                             tiers))
            except NoInstanceAvailable as exc:
                if failure is not None:
                    break
                raise RouterError(503, f"no healthy instance serves model '{parsed.model}' "
                                  f"({exc})", code="no_instance_available") from None
            self.metrics.decision.labels(policy_name).observe(
                time.perf_counter() - began + (lookup_s if attempt == 0 else 0.0))
            self._apply_decision(decision)
            instance_id = decision.instance_id
            ctx["instance"] = instance_id
            ctx["hits"] = hits.get(instance_id, 0)
            ctx["prefix_hits"], ctx["tier_hits"] = hits, tiers  # where the prompt's KV lives
            self.metrics.decisions.labels(policy_name, instance_id, decision.reason).inc()
            if ctx["hits"]:
                self.metrics.prefix_hit_blocks.labels(instance_id).inc(ctx["hits"])
            # P->D: prefill on P first (router/server/pd.py), then D decodes with P's KV.
            prefill_id = decision.prefill_instance_id
            if prefill_id == instance_id or not supports_handoff(parsed):
                prefill_id = None
            ticket = self.load.begin(instance_id, info.prompt_tokens,
                                     phase="waiting" if prefill_id else "prefill",
                                     offline=parsed.request_class == "offline")
            ctx["handoff"] = None
            try:
                body = None
                if prefill_id is not None:
                    handoff = await self.prefill_stage.run(
                        parsed, prefill_id, _PATHS[parsed.kind],
                        self._forward_headers(request, parsed), info.prompt_tokens)
                    ctx["handoff"] = handoff
                    ticket.to("decode" if handoff.ok else "prefill")
                    body = handoff.decode_body(parsed)
                return await self._forward(request, parsed, instance_id, policy_name, started,
                                           ctx, policy, info.prompt_tokens, body=body,
                                           ticket=ticket)
            except UpstreamFailure as exc:
                failure = exc
                tried.add(instance_id)
                self.metrics.upstream_errors.labels(instance_id, exc.reason).inc()
                if exc.connect or exc.reason in ("error", "empty", "malformed"):
                    self.load.report_failure(instance_id, exc.message)  # not 5xx, timeouts
                log.warning("request %s: %s", parsed.request_id, exc.message)
                if ctx.get("ledger") is not None:
                    ctx["ledger"].restart()  # the retry starts the answer afresh
                if attempt == 0:
                    self.metrics.retries.labels(instance_id).inc()
            finally:
                ticket.finish()
        assert failure is not None
        raise RouterError(failure.status, f"upstream failed: {failure.message}"
                          + ("; retried once" if len(tried) > 1 else "; no other instance to "
                             "retry on"), code="upstream_error")

    def _apply_decision(self, decision: RoutingDecision) -> None:
        if decision.role_changes:
            self._apply_role_changes(decision.role_changes)

    def _forward_headers(self, request: web.Request, parsed: ParsedRequest) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "X-Request-Id": parsed.request_id}
        for name, value in request.headers.items():
            lower = name.lower()
            if lower.startswith("x-") and lower not in _NOT_FORWARDED and lower != "x-request-id":
                headers[name] = value
        headers.update(self.upstream_headers)
        return headers

    async def _forward(self, request: web.Request, parsed: ParsedRequest, instance_id: str,
                       policy_name: str, started: float, ctx: dict[str, Any],
                       policy: RoutingPolicy, prompt_tokens: int, *, body: bytes | None = None,
                       ticket: LoadTicket | None = None) -> web.StreamResponse:
        """Send ``body`` (default: the client's) to the instance and relay its answer."""
        assert self.session is not None
        load = self.load.instances[instance_id]
        cfg = self.config
        url = load.record.url + _PATHS[parsed.kind]
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s)
        ledger: StreamLedger | None = ctx.get("ledger")
        collect = ledger is not None and ledger.collect  # streamed upstream for a JSON client
        streamed = parsed.stream or collect
        wait_s = cfg.first_byte_timeout_s if streamed else cfg.request_timeout_s
        deadline = time.monotonic() + wait_s
        upstream: aiohttp.ClientResponse | None = None
        done = False
        try:
            try:
                upstream = await self._read(load, lambda: upstream_post(
                    self.session, url, data=body if body is not None else parsed.upstream_body(),
                    headers=self._forward_headers(request, parsed), timeout=timeout), wait_s)
            except Silence as exc:
                raise _unanswered(instance_id, "response", exc, wait_s) from None
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                raise UpstreamFailure("connect", 502, f"cannot connect to instance "
                                      f"{instance_id} ({load.record.url}): {exc}",
                                      connect=True) from None
            except TimeoutError:
                raise UpstreamFailure("timeout", 504, f"instance {instance_id} sent no response "
                                      f"within {wait_s:g}s") from None
            except aiohttp.ClientError as exc:
                raise UpstreamFailure("error", 502, f"instance {instance_id}: {exc!r}") from None

            if upstream.status >= 500:
                detail = await self._read_error(upstream)
                raise UpstreamFailure(f"http_{upstream.status}", 502, f"instance {instance_id} "
                                      f"answered {upstream.status}: {detail}")

            extra = {HEADER_INSTANCE: instance_id, HEADER_POLICY_USED: policy_name}
            handoff: Handoff | None = ctx.get("handoff")
            if handoff is not None:
                extra[HEADER_PREFILL_INSTANCE] = handoff.prefill_instance_id
                extra[HEADER_PD] = "handoff" if handoff.ok else f"fallback_{handoff.failure}"
            encoded: EncodeResult | None = ctx.get("encode")
            if encoded is not None:
                extra[HEADER_ENCODE_INSTANCE] = encoded.encode_instance_id
                extra[HEADER_EPD] = encoded.outcome
            content_type = upstream.headers.get("Content-Type", "application/json")
            if not (streamed and upstream.status == 200
                    and content_type.startswith("text/event-stream")):
                try:
                    async with asyncio.timeout_at(self._loop_deadline(deadline)):
                        body = await upstream.read()
                except TimeoutError:
                    raise UpstreamFailure("timeout", 504, f"instance {instance_id} did not "
                                          f"finish within {wait_s:g}s") from None
                except aiohttp.ClientError as exc:
                    raise UpstreamFailure("error", 502, f"instance {instance_id} broke off: "
                                          f"{exc!r}") from None
                if not _is_json_object(body):  # an OpenAI server always answers an object
                    snippet = body[:200].decode(errors="replace").strip() or "(empty body)"
                    if upstream.status < 400:
                        raise UpstreamFailure("malformed", 502, f"instance {instance_id} "
                                              f"answered {upstream.status} with a body that "
                                              f"is not a JSON object: {snippet!r}")
                    # A 4xx error page (e.g. from a proxy): the status holds, the shape is ours.
                    body = _json_bytes(error_body(upstream.status, f"instance {instance_id} "
                                                  f"answered {upstream.status}: {snippet!r}"))
                    content_type = "application/json"
                done = True
                load.last_progress_at = time.monotonic()
                self.metrics.e2e.observe(time.perf_counter() - started)
                self._observe(policy, parsed, instance_id, prompt_tokens, ctx, started, None, 0,
                              upstream.status < 400)
                response = web.Response(body=body, status=upstream.status, headers=extra)
                response.headers["Content-Type"] = content_type
                return response

            # Streaming: hold the client's headers until the first chunk, so that an
            # instance failing before it can still be retried elsewhere.
            try:
                first = await self._read(load, upstream.content.readany,
                                         deadline - time.monotonic())
            except Silence as exc:
                raise _unanswered(instance_id, "token", exc, wait_s) from None
            except aiohttp.ClientError as exc:
                raise UpstreamFailure("error", 502, f"instance {instance_id} broke off before "
                                      f"the first token: {exc!r}") from None
            if not first:
                raise UpstreamFailure("empty", 502, f"instance {instance_id} closed the stream "
                                      "without data")
            t_first = time.perf_counter()
            load.last_progress_at = time.monotonic()
            if ticket is not None:
                ticket.to("decode")
            ttft_ms = (t_first - started) * 1000
            ctx["ttft_ms"] = ttft_ms
            self.metrics.ttft.observe(ttft_ms / 1000)
            self._observe_prefill_rate(instance_id, ttft_ms, prompt_tokens)
            self.load.observe_ttft(instance_id, ttft_ms)

            response: web.StreamResponse | CollectedResponse
            if collect:
                assert ledger is not None
                response = CollectedResponse(parsed.kind,
                                             client_wants_ids=ledger.client_wants_ids)
            else:
                response = web.StreamResponse(status=200, headers={
                    "Content-Type": content_type, "Cache-Control": "no-cache", **extra})
            await response.prepare(request)
            splitter = SSESplitter()
            bad = await _relay(response, first, splitter, ledger)  # a malformed event
            if ledger is not None:
                # From now on a failover, and for offline work a co-location policy, may cut
                # it to move it (router/server/moves.py).
                ctx["move"] = handle = MoveHandle(parsed.request_id, instance_id, ledger,
                                                  offline=parsed.request_class == "offline")
                handle.attach(upstream.close)
                self.live_requests.register(handle)
            events = first.count(b"data: ")
            t_last = t_first
            silence_s, stall = self._silence_limit(load)
            migrated = False
            while True:
                broke: tuple[str, str] | None = None
                try:
                    if bad is not None:
                        raise MalformedEvent(bad)
                    chunk = await self._read(load, upstream.content.readany, silence_s, stall)
                except MalformedEvent as exc:
                    broke = ("malformed", f"instance {instance_id} sent a malformed event "
                             f"mid-stream: {exc}")
                except Silence as exc:
                    broke = (exc.kind, f"instance {instance_id} was {exc.detail}")
                except aiohttp.ClientError as exc:
                    broke = ("error", f"instance {instance_id} broke off mid-stream: {exc!r}")
                else:
                    if not chunk and (ledger is None or ledger.done):
                        done = True
                        break
                    if not chunk:
                        broke = ("eof", f"instance {instance_id} ended the stream before "
                                 "[DONE]")
                if broke is not None:
                    move: MoveHandle | None = ctx.get("move")
                    prefer = move.move_to if move is not None else None
                    if prefer is not None:  # the rebalance loop cut it: resume on its target
                        assert move is not None
                        broke = ("rebalance", f"{move.reason}: moved to {prefer}")
                    else:
                        log.warning("request %s: %s", parsed.request_id, broke[1])
                        self.metrics.upstream_errors.labels(instance_id, "midstream").inc()
                    if broke[0] in ("error", "eof", "stall", "idle", "dead", "stuck",
                                    "malformed"):
                        self.load.report_failure(instance_id, broke[1])
                    if ledger is not None:
                        migrated = await self._migrate(request, parsed, response, ledger, ctx,
                                                       instance_id, *broke, prefer=prefer)
                    if not migrated:
                        if isinstance(response, CollectedResponse):
                            # The client has seen nothing yet: the whole request may retry.
                            raise UpstreamFailure("midstream", 502, broke[1])
                        ctx["stream_status"] = 502
                        await response.write(b"data: " + _json_bytes(error_body(502, broke[1]))
                                             + b"\n\n")
                    break
                events += chunk.count(b"data: ")
                now = time.perf_counter()
                load.last_progress_at = time.monotonic()
                load.observe_silence(load.last_progress_at - (now - t_last),
                                     load.last_progress_at)
                t_last = now
                bad = await _relay(response, chunk, splitter, ledger)
            tokens = max(0, events - 1)  # minus the closing [DONE]
            if tokens >= 3:
                tpot_ms = (t_last - t_first) * 1000 / (tokens - 1)
                self.metrics.tpot.observe(tpot_ms / 1000)
                self.load.observe_tpot(instance_id, tpot_ms)
            self.metrics.e2e.observe(time.perf_counter() - started)
            self._observe(policy, parsed, instance_id, prompt_tokens, ctx, started,
                          (t_last - t_first) * 1000 / (tokens - 1) if tokens >= 2 else None,
                          tokens, done or migrated)
            if isinstance(response, CollectedResponse):
                assert ledger is not None
                extra[HEADER_MIGRATIONS] = str(ledger.migrations)
                return web.Response(body=_json_bytes(response.body()), status=200,
                                    headers=extra, content_type="application/json")
            try:
                await response.write_eof()
            except ConnectionResetError:  # the client read [DONE] and hung up before the end
                log.debug("request %s: client closed after [DONE]", parsed.request_id)
            return response
        finally:
            if ctx.get("move") is not None:
                self.live_requests.unregister(ctx["move"])
            if upstream is not None:
                if done:
                    upstream.release()
                else:
                    upstream.close()  # drop the connection: vLLM aborts the request

    def _read(self, load: InstanceLoad, read: Callable[[], Awaitable[T]], silence_s: float,
              stall: bool = False) -> Awaitable[T]:
        """``read()``, given up after ``silence_s`` or as soon as a liveness probe of
        ``load`` fails or finds its engine computing nothing (router/server/liveness.py)."""
        patience = probe_timeout_s(load.pauses.value(time.monotonic()),
                                   self.config.liveness_probe_timeout_s)
        return read_or_probe(
            read, silence_s=silence_s, stall=stall,
            probe_after=probe_after_s(load.tpot_ms, self.config.liveness_probe_multiple),
            probe=lambda: self.liveness.probe(load.instance_id, load.record.url, patience),
            stuck_after=max(self.config.liveness_stuck_s, patience))

    def _silent(self, instance_id: str, silence: Silence) -> tuple[str, str]:
        """A resumed stream's silence as (reason, message); a dead instance counts a failure."""
        if silence.kind in ("dead", "stuck"):
            self.load.report_failure(instance_id, silence.detail)
        return silence.kind, f"instance {instance_id} was {silence.detail}"

    def _probed(self, instance_id: str, result: ProbeResult) -> None:
        outcome = "alive" if result.alive else "dead"
        load = self.load.instances.get(instance_id)
        if result.alive and load is not None:
            answered = time.monotonic()
            load.pauses.observe(result.seconds, answered)
            load.health_answered(answered)
        self.metrics.liveness_probes.labels(instance_id, outcome).inc()
        self.metrics.liveness_probe.labels(outcome).observe(result.seconds)
        if not result.alive:
            log.warning("instance %s: liveness probe failed (%s)", instance_id, result.detail)

    def _silence_limit(self, load: InstanceLoad) -> tuple[float, bool]:
        """Longest silence allowed mid-stream, and whether it is the TPOT-based stall limit."""
        multiple = self.config.stall_timeout_multiple
        if multiple is None or not load.tpot_ms:
            return self.config.idle_timeout_s, False
        tpot_s = sorted(load.tpot_ms)[len(load.tpot_ms) // 2] / 1000
        stall_s = max(1.0, multiple * tpot_s)
        if stall_s >= self.config.idle_timeout_s:
            return self.config.idle_timeout_s, False
        return stall_s, True

    async def _migrate(self, request: web.Request, parsed: ParsedRequest,
                       response: web.StreamResponse | CollectedResponse, ledger: StreamLedger,
                       ctx: dict[str, Any], failed_id: str, reason: str, detail: str,
                       *, prefer: str | None = None) -> bool:
        """Continue the client's stream on other instances; True when it finished there.

        Each attempt resubmits prompt + generated token ids as a completions request
        (router/server/migration.py); at most ``--migration-limit`` attempts per request.
        ``prefer``: the first target (a policy's move), when it is still healthy.
        """
        tried = {failed_id}
        while True:
            why_not = ledger.can_resume()
            outcome = ("not_resumable" if why_not else
                       "limit" if ledger.migrations >= self.config.migration_limit else None)
            if outcome is not None:
                self.metrics.migrations.labels(reason, outcome).inc()
                log.warning("request %s: not migrated (%s)", parsed.request_id,
                            why_not or f"--migration-limit {self.config.migration_limit}")
                return False
            body = ledger.resume_body(parsed.body)
            preferred = self.load.instances.get(prefer) if prefer is not None else None
            prefer = None
            try:
                target = (preferred.instance_id if preferred is not None and preferred.healthy
                          else self._resume_target(parsed, ledger, ctx, tried))
            except NoInstanceAvailable:
                self.metrics.migrations.labels(reason, "no_instance").inc()
                log.warning("request %s: not migrated (no other healthy instance)",
                            parsed.request_id)
                return False
            tried.add(target)
            began = time.perf_counter()
            log.log(logging.INFO if reason == "rebalance" else logging.WARNING,
                    "request %s: migrating from %s to %s after %d generated tokens (%s: %s)",
                    parsed.request_id, failed_id, target, len(ledger.generated), reason, detail)
            ticket = self.load.begin(target, len(body["prompt"]), phase="prefill",
                                     offline=parsed.request_class == "offline")
            try:
                failure = await self._resume_on(target, request, parsed, response, ledger, body)
            finally:
                ticket.finish()
            if failure is None:
                self.metrics.migrations.labels(reason, "resumed").inc()
                log.info("request %s: resumed on %s, finished there in %.0f ms",
                         parsed.request_id, target, (time.perf_counter() - began) * 1000)
                return True
            self.metrics.migrations.labels(reason, "failed").inc()
            failed_id, (reason, detail) = target, failure

    def _observe_prefill_rate(self, instance_id: str, ttft_ms: float, prompt_tokens: int) -> None:
        rate = ttft_ms / max(prompt_tokens, 1)
        old = self._prefill_ms_per_token.get(instance_id)
        self._prefill_ms_per_token[instance_id] = rate if old is None else 0.8 * old + 0.2 * rate

    def _resume_target(self, parsed: ParsedRequest, ledger: StreamLedger, ctx: dict[str, Any],
                       tried: set[str]) -> str:
        """Where a failed request resumes: KV reuse vs recomputation by estimated cost."""
        view = self.load.view(parsed.model, frozenset(tried))
        healthy = view.healthy("both", "decode", "prefill")
        if not healthy:
            raise NoInstanceAvailable("no other healthy instance")
        assert ledger.prompt_token_ids is not None
        prompt = len(ledger.prompt_token_ids)
        block = self.prefix.block_size if self.prefix is not None else 0
        hits: dict[str, int] = ctx.get("prefix_hits") or {}
        tiers: dict[str, Any] = ctx.get("tier_hits") or {}
        handoff: Handoff | None = ctx.get("handoff")
        rates = self._prefill_ms_per_token
        default_rate = statistics.median(rates.values()) if rates else 1.0
        candidates = []
        for state in healthy:
            iid = state.instance_id
            tier = tiers.get(iid)
            local = max(hits.get(iid, 0), tier.hbm if tier else 0) * block
            if handoff is not None and handoff.ok and handoff.prefill_instance_id == iid:
                local = prompt  # P kept the prompt's blocks in its prefix cache
            remote = (tier.dram + tier.ssd + tier.store) * block if tier else 0
            candidates.append(ResumeCandidate(
                iid, rates.get(iid, default_rate), state.queued_prefill_tokens, local, remote))
        plan = plan_resume(candidates, prompt_tokens=prompt,
                           generated_tokens=len(ledger.generated),
                           kv_bytes_per_token=self.config.kv_bytes_per_token,
                           transfer_bytes_per_ms=self.config.kv_transfer_gbps * 1e9 / 8 / 1e3)
        self.metrics.resume_plans.labels(plan.mode).inc()
        log.info("request %s: resume on %s by %s (est. %.0f ms; recompute anywhere: %.0f ms; "
                 "%d tokens fetched)", parsed.request_id, plan.instance_id, plan.mode,
                 plan.estimate_ms, plan.recompute_estimate_ms, plan.transfer_tokens)
        return plan.instance_id

    async def _resume_on(self, target: str, request: web.Request, parsed: ParsedRequest,
                         response: web.StreamResponse | CollectedResponse,
                         ledger: StreamLedger,
                         body: dict[str, Any]) -> tuple[str, str] | None:
        """Stream ``body`` from ``target`` into the client's stream; the failure, if any."""
        assert self.session is not None
        load = self.load.instances[target]
        cfg = self.config
        splitter = SSESplitter()
        wait_s = cfg.first_byte_timeout_s  # the resumed prompt is prefilled first
        try:
            upstream = await self._read(load, lambda: upstream_post(
                self.session, load.record.url + _PATHS["completions"],
                data=_json_bytes(body), headers=self._forward_headers(request, parsed),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s)),
                wait_s)
        except Silence as exc:
            return self._silent(target, exc)
        except aiohttp.ClientError as exc:
            self.load.report_failure(target, repr(exc))
            return "error", f"instance {target}: {exc!r}"
        try:
            if upstream.status != 200:
                detail = await self._read_error(upstream)
                return "error", f"instance {target} answered {upstream.status}: {detail}"
            last: float | None = None  # the previous chunk (the first follows a prefill)
            while True:
                try:
                    chunk = await self._read(load, upstream.content.readany, wait_s)
                except Silence as exc:
                    return self._silent(target, exc)
                except aiohttp.ClientError as exc:
                    self.load.report_failure(target, repr(exc))
                    return "error", f"instance {target} broke off mid-stream: {exc!r}"
                if not chunk:
                    return None if ledger.done else (
                        "eof", f"instance {target} ended the stream before [DONE]")
                now = time.monotonic()
                if last is not None:
                    load.observe_silence(last, now)
                last = now
                wait_s = self._silence_limit(load)[0]
                for payload in splitter.feed(chunk):
                    try:
                        out = ledger.resumed_event(payload)
                    except (ValueError, msgspec.DecodeError) as exc:
                        return "malformed", f"instance {target}: {exc}"
                    if isinstance(out, SeamRepair):
                        out = ledger.repaired(out, await self._seam_text(load, body["model"],
                                                                         out))
                    if out is not None:
                        await response.write(out)
        finally:
            upstream.close()

    async def _seam_text(self, load: InstanceLoad, model: str, seam: SeamRepair) -> str:
        """The text of ``seam.tokens`` after ``seam.context``, by the instance's /detokenize.

        On failure the event goes out with no text (one character lost, logged) rather than
        with the engine's, which holds the whole prompt (router/server/migration.py)."""
        session = self.session
        assert session is not None

        async def detokenize(tokens: list[int]) -> str:
            async with session.post(
                    load.record.url + "/detokenize", json={"model": model, "tokens": tokens},
                    headers=self.upstream_headers,
                    timeout=aiohttp.ClientTimeout(total=self.config.connect_timeout_s)) as r:
                r.raise_for_status()
                return str((await r.json())["prompt"])

        try:
            full, context = await asyncio.gather(detokenize(seam.context + seam.tokens),
                                                 detokenize(seam.context))
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            log.warning("instance %s: /detokenize failed (%r); a resumed stream's character "
                        "at the seam is lost", load.instance_id, exc)
            return ""
        if not full.startswith(context):
            log.warning("instance %s: /detokenize of the seam context is not a prefix of the "
                        "seam's text; a resumed stream's character at the seam is lost",
                        load.instance_id)
            return ""
        return full[len(context):]

    @staticmethod
    def _loop_deadline(monotonic_deadline: float) -> float:
        return asyncio.get_running_loop().time() + max(0.0, monotonic_deadline - time.monotonic())

    @staticmethod
    async def _read_error(upstream: aiohttp.ClientResponse) -> str:
        try:
            async with asyncio.timeout(2):
                text = (await upstream.content.read(2048)).decode(errors="replace")
        except (TimeoutError, aiohttp.ClientError):
            return "(no body)"
        try:
            message = _json_loads(text)["error"]["message"]
            return str(message)[:300]
        except Exception:  # noqa: BLE001 (any non-OpenAI body is shown raw)
            return text.strip()[:300] or "(empty body)"

    def _observe(self, policy: RoutingPolicy, parsed: ParsedRequest, instance_id: str,
                 prompt_tokens: int, ctx: dict[str, Any], started: float,
                 tpot_ms: float | None, output_tokens: int, ok: bool) -> None:
        if ok and ctx.get("epd_traffic"):  # a client's image request: EPD traffic summary
            self.epd.record(parsed.model, started, parsed.prompt_chars, image_count(parsed),
                            output_tokens or parsed.max_tokens or 0)
        if not isinstance(policy, ObservingPolicy):
            return
        ttft_ms = ctx["ttft_ms"] if ctx["ttft_ms"] is not None else (
            (time.perf_counter() - started) * 1000)
        block_size = self.prefix.block_size if self.prefix is not None else 0
        # Arrival to the end of prefill: the prefill stage under P->D, else the first token
        # (unknown, 0, for a non-streaming request served whole).
        handoff: Handoff | None = ctx.get("handoff")
        if handoff is not None and handoff.ok:
            prefill_id, prefill_ms = handoff.prefill_instance_id, handoff.prefill_ms
        else:
            prefill_id, prefill_ms = None, ctx["ttft_ms"] or 0.0
        try:
            policy.observe(RequestOutcome(
                request_id=parsed.request_id, instance_id=instance_id,
                prefill_instance_id=prefill_id, prompt_tokens=prompt_tokens,
                cached_prompt_tokens=min(prompt_tokens, ctx["hits"] * block_size),
                output_tokens=output_tokens, ttft_ms=ttft_ms, tpot_ms=tpot_ms, queue_ms=0.0,
                prefill_ms=prefill_ms, finished_at=time.monotonic(), ok=ok))
        except Exception:  # noqa: BLE001 (a policy bug must not fail a served request)
            log.exception("policy %s failed in observe()", policy.name)

    # -- other routes ---------------------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "owned_by": "xllm-router",
                 "instances": sum(1 for i in self.load.serving(name) if i.healthy)}
                for name in self.load.models()]
        return web.json_response({"object": "list", "data": data})

    def _counts(self) -> dict[str, int]:
        healthy = sum(1 for i in self.load.instances.values() if i.healthy)
        return {"instances": len(self.load.instances), "healthy_instances": healthy}

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self._counts()})

    async def handle_ready(self, request: web.Request) -> web.Response:
        counts = self._counts()
        if counts["healthy_instances"] == 0:
            return web.json_response(error_body(503, "no healthy instance",
                                                code="no_instance_available"), status=503)
        return web.json_response({"status": "ready", **counts})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def handle_admin_list(self, request: web.Request) -> web.Response:
        return web.json_response({
            "policy": self.config.policy,
            "etcd": self.config.etcd,
            "kv_index": ({"block_size": self.prefix.block_size,
                          "instances": {i: self.prefix.index.block_count(i)
                                        for i in self.prefix.index.instances()}}
                         if self.prefix is not None else None),
            "instances": [load.describe() for load in sorted(self.load.instances.values(),
                                                             key=lambda x: x.instance_id)]})

    async def handle_admin_epd(self, request: web.Request) -> web.Response:
        return web.json_response({"enabled": self.epd.settings.enabled,
                                  "models": self.epd.snapshot()})

    async def handle_admin_epd_profile(self, request: web.Request) -> web.Response:
        """``{"model": NAME, "wait": bool}``: profile the model's EPD strategy again now."""
        if not self.epd.settings.enabled:
            raise RouterError(409, "the EPD profiler is off: start the router with "
                              "--epd-profile", code="epd_profile_disabled")
        try:
            body = await request.json()
        except ValueError:
            raise RouterError(400, "body must be JSON: {\"model\": NAME}") from None
        if not isinstance(body, dict):
            raise RouterError(400, "body must be JSON: {\"model\": NAME}")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RouterError(400, "'model' is required", param="model")
        if not self.load.serving(model):
            raise RouterError(404, f"model '{model}' does not exist here", param="model",
                              code="model_not_found")
        encoders, generators = self.epd.pools(model)
        if not encoders or not generators:
            raise RouterError(409, f"model '{model}' needs a healthy encode instance and a "
                              "healthy language-model instance to profile",
                              code="epd_pools_missing")
        task = self.epd.start(model)
        if body.get("wait"):
            await asyncio.shield(task)
            return web.json_response(self.epd.snapshot()[model])
        return web.json_response({"model": model, "status": "profiling"}, status=202)

    async def handle_admin_change(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise RouterError(400, "body must be JSON: {\"add\": \"URL[;opts]\"} or "
                              "{\"remove\": \"ID\"}") from None
        if not isinstance(body, dict) or len(body.keys() & {"add", "remove"}) != 1:
            raise RouterError(400, "body must be {\"add\": \"URL[;opts]\"} or {\"remove\": \"ID\"}")
        if "add" in body:
            try:
                record = parse_instance_spec(str(body["add"]))
            except RecordError as exc:
                raise RouterError(400, str(exc), param="add") from None
            current = self.load.instances.get(record.instance_id)
            if current is not None and current.record.source != "static":
                raise RouterError(409, f"instance {record.instance_id} comes from etcd; change "
                                  "it there")
            self.load.upsert(record)
            return web.json_response({"added": record.instance_id}, status=201)
        instance_id = str(body["remove"])
        current = self.load.instances.get(instance_id)
        if current is None:
            raise RouterError(404, f"no instance '{instance_id}'", param="remove")
        if current.record.source != "static":
            raise RouterError(409, f"instance {instance_id} comes from etcd; it leaves when it "
                              "deregisters or its lease expires")
        self.load.remove(instance_id, "admin removal")
        return web.json_response({"removed": instance_id})


def _loopback(host: str) -> str:
    """An address of this host that reaches a socket bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _relay(response: web.StreamResponse | CollectedResponse, chunk: bytes,
                 splitter: SSESplitter,
                 ledger: StreamLedger | None) -> str | None:
    """Pass upstream bytes on; through the ledger (whole events) when migration is on.

    With the ledger, an event that is neither ``[DONE]`` nor a JSON object (an upstream
    or a proxy in between gone wrong) is not passed on: the events before it are, and
    its start is returned so the caller can treat the stream as broken (and migrate it).
    """
    if ledger is None:
        await response.write(chunk)
        return None
    out: list[bytes] = []
    bad = None
    for payload in splitter.feed(chunk):
        try:
            out.append(ledger.event(payload))
        except MalformedEvent as exc:
            bad = str(exc)
            break
    if out:
        await response.write(b"".join(out))
    return bad


def _is_json_object(payload: bytes) -> bool:
    try:
        return isinstance(_json_loads(payload), dict)
    except msgspec.DecodeError:
        return False


def _json_bytes(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def _json_loads(text: str) -> Any:
    return msgspec.json.decode(text)


async def listen(router: Router, host: str = "127.0.0.1",
                 port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve ``router`` on ``host:port`` (0: a free port) in this event loop; the runner (to
    ``cleanup()``) and the loopback URL, which the router also learns (batch jobs, probes)."""
    runner = web.AppRunner(router.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://{_loopback(host)}:{bound}"
    router.attach_front_url(url)
    return runner, url


async def serve(config: RouterConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run the router until cancelled (the CLI calls this)."""
    runner, url = await listen(Router(config), config.host, config.port)
    log.info("xllm-router listening on http://%s:%s", config.host, url.rsplit(":", 1)[1])
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

"""The router's own Prometheus metrics (served at ``/metrics``).

Each router app gets its own registry, so several routers can live in one
process (tests, benchmarks) without clashing label sets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                    0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.5, 1.0, 2.0)
_DECISION_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                     1e-2, 5e-2)


class RouterMetrics:
    """Counters, histograms and gauges; names start with ``xllm_router_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "xllm_router_requests", "Requests answered, by policy, instance and HTTP status "
            "(instance 'none' when no instance was chosen).",
            ["policy", "instance", "status"], registry=r)
        self.retries = Counter(
            "xllm_router_retries", "Requests retried on another instance after an upstream "
            "failure before any byte reached the client.", ["instance"], registry=r)
        self.migrations = Counter(
            "xllm_router_migrations", "Streams moved to another instance mid-stream, by what "
            "broke (error, eof, idle, stall, dead: silent and its liveness probe failed, stuck: its engine computed no token while silent) and outcome (resumed, no_instance, failed, "
            "limit, not_resumable).", ["reason", "outcome"], registry=r)
        self.resume_plans = Counter(
            "xllm_router_resume_plans", "Where failed requests resumed: 'move' reused KV that "
            "outlived the failed instance (a prefix cache, a tier, the global store), "
            "'recompute' prefilled prompt + generated tokens afresh; by estimated cost.",
            ["mode"], registry=r)
        self.offline_moves = Counter(
            "xllm_router_offline_moves", "Offline requests a co-location policy moved to an "
            "idle instance (re-prefill of prompt + generated tokens), by source, target and "
            "reason.", ["from_instance", "to_instance", "reason"], registry=r)
        self.liveness_probes = Counter(
            "xllm_router_liveness_probes", "/health probes of instances whose streams fell "
            "silent, by instance and outcome (alive, dead).", ["instance", "outcome"],
            registry=r)
        self.liveness_probe = Histogram(
            "xllm_router_liveness_probe_seconds", "Time a liveness probe took (a dead "
            "instance's probes end at the timeout).", ["outcome"], buckets=_LATENCY_BUCKETS,
            registry=r)
        self.upstream_errors = Counter(
            "xllm_router_upstream_errors", "Upstream failures by instance and reason.",
            ["instance", "reason"], registry=r)
        self.ttft = Histogram(
            "xllm_router_ttft_seconds", "Time to first token as the router sees it (streaming "
            "requests: arrival to first streamed chunk).", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "xllm_router_tpot_seconds", "Time per output token after the first (streaming).",
            buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(
            "xllm_router_e2e_seconds", "Arrival to last byte relayed.", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.decision = Histogram(
            "xllm_router_routing_decision_seconds", "Time spent choosing an instance (tokenize, "
            "hash, index lookup and policy).", ["policy"], buckets=_DECISION_BUCKETS, registry=r)
        self.decisions = Counter(
            "xllm_router_decisions", "Routing decisions by policy, instance and reason.",
            ["policy", "instance", "reason"], registry=r)
        self.prefix_hit_blocks = Counter(
            "xllm_router_prefix_hit_blocks", "Prompt blocks already cached on the chosen instance "
            "(per the router's KV index).", ["instance"], registry=r)
        self.prompt_blocks = Counter(
            "xllm_router_prompt_blocks", "Full prompt blocks of requests routed with KV lookup.",
            registry=r)
        self.instance_healthy = Gauge(
            "xllm_router_instance_healthy", "1 if the instance takes requests, else 0.",
            ["instance"], registry=r)
        self.instance_transitions = Counter(
            "xllm_router_instance_transitions", "Changes of an instance's health state "
            "(healthy, suspect, failed, removed; 'removed' -> 'suspect' is a registration).",
            ["from_state", "to_state"], registry=r)
        self.instance_inflight = Gauge(
            "xllm_router_instance_inflight", "Requests the router has in flight on the instance.",
            ["instance"], registry=r)
        self.instance_load = Gauge(
            "xllm_router_instance_queue", "Engine-reported running and waiting requests.",
            ["instance", "state"], registry=r)
        self.instance_kv_usage = Gauge(
            "xllm_router_instance_kv_usage", "Engine-reported KV-cache usage (0..1).",
            ["instance"], registry=r)
        self.pd_prefills = Counter(
            "xllm_router_pd_prefills", "Prefill stages of disaggregated requests by prefill "
            "instance and outcome: 'handoff' (KV handed to the decode instance) or "
            "'fallback_<reason>' (the decode instance prefilled it itself).",
            ["instance", "outcome"], registry=r)
        self.pd_prefill = Histogram(
            "xllm_router_pd_prefill_seconds", "Prefill stage of disaggregated requests "
            "(request sent to the prefill instance to its kv_transfer_params back).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.epd_encodes = Counter(
            "xllm_router_epd_encodes", "Encode stages of multimodal requests by encode instance "
            "and outcome: 'loaded' (the prefill instance loads the encoder output) or "
            "'fallback_<reason>' (it encodes the images itself).",
            ["instance", "outcome"], registry=r)
        self.epd_encode = Histogram(
            "xllm_router_epd_encode_seconds", "Encode stage of multimodal requests (request sent "
            "to the encode instance to its ec_transfer_params back).",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.epd_strategy = Gauge(
            "xllm_router_epd_strategy", "1 for the EPD strategy the live profiler chose for the "
            "model ('E-PD', 'E-P-D': images through an encode instance; 'none', 'EP-D': the "
            "language-model instance encodes them).", ["model", "strategy"], registry=r)
        self.epd_picks = Counter(
            "xllm_router_epd_picks", "EPD profiler decisions by model and event: 'pick' "
            "(profiled), 'keep' (traffic moved too little), 'stay' (another strategy was not "
            "better enough), 'switch'.", ["model", "event"], registry=r)
        self.role_switches = Counter(
            "xllm_router_role_switches", "Instance role changes asked for by the policy, by "
            "instance, old and new role, and the policy's reason.",
            ["instance", "from_role", "to_role", "reason"], registry=r)
        self.instance_role = Gauge(
            "xllm_router_instance_role", "1 for the instance's current role (prefill, decode, "
            "both, encode).", ["instance", "role"], registry=r)

    def forget_instance(self, instance_id: str) -> None:
        for gauge in (self.instance_healthy, self.instance_inflight, self.instance_kv_usage):
            try:
                gauge.remove(instance_id)
            except KeyError:
                pass
        for role in ("both", "prefill", "decode", "encode"):
            try:
                self.instance_role.remove(instance_id, role)
            except KeyError:
                pass
        for state in ("running", "waiting"):
            try:
                self.instance_load.remove(instance_id, state)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def set_role(self, instance_id: str, role: str) -> None:
        """Mark ``role`` as the instance's current one (the others 0)."""
        for name in ("both", "prefill", "decode", "encode"):
            self.instance_role.labels(instance_id, name).set(1 if name == role else 0)

"""Discrete-event cluster simulator that drives the router's own policies.

Layout (entities, time and decisions kept apart, as in vidur):

- ``events``      the clock and the event queue;
- ``perf_model``  step-time models and deployments (fitted CPU JSON, GPU roofline);
- ``roofline``    GPU parameter sets from FLOPs/bytes per token and published peaks;
- ``kv_cache``    an instance's KV blocks: prefix cache, reference counts, LRU eviction;
- ``instance``    one engine: continuous batching, chunked prefill, decode-first;
- ``cluster``     N instances, the routing policy, P->D KV transfer, role changes;
- ``workload``    trace readers, synthetic arrivals, rate scaling;
- ``metrics``     SLO attainment, goodput, percentiles, utilisation;
- ``sweep``       rate sweeps, max rate at a target attainment, plots;
- ``encoder``/``epd``  vision-encoder roofline; EPD (encode/prefill/decode) pools per strategy;
- ``cli``         ``xllm-bench simulate``.

Nothing here imports torch or vllm.
"""

from router.sim.cluster import SimConfig, SimResult, simulate
from router.sim.metrics import SLO, summarize
from router.sim.perf_model import Deployment, load_deployment
from router.sim.workload import RequestSpec, Workload

__all__ = ["SLO", "Deployment", "RequestSpec", "SimConfig", "SimResult", "Workload",
           "load_deployment", "simulate", "summarize"]

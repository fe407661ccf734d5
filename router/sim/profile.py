"""Profiling a simulated instance the way the live router profiles a real one.

A policy that implements ``ProfilingPolicy`` asks for a few isolated
requests on every new instance. Here each runs alone on a scratch copy of the
instance (its own clock and empty KV cache), so the measurement is exactly
what the deployment's step model gives for that request, as the live probe
measures the engine with nothing else running.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.policies.types import ProfileSample
from router.sim.events import EventQueue
from router.sim.instance import SimInstance
from router.sim.perf_model import Deployment
from router.sim.request import SimRequest
from router.sim.workload import RequestSpec


def profile_deployment(dep: Deployment,
                       plan: Sequence[tuple[int, int]]) -> tuple[ProfileSample, ...]:
    """Run each ``(prompt_tokens, max_tokens)`` alone; skip those the deployment cannot take."""
    samples = []
    for k, (prompt, output) in enumerate(plan):
        if prompt + output > dep.max_model_len or prompt < 1 or output < 1:
            continue
        events = EventQueue()
        inst = SimInstance("profile", dep, events)
        req = SimRequest(RequestSpec(f"profile-{k}", 0.0, prompt, output), ())
        inst.enqueue(req)
        while events:
            events.pop_and_run()
        if not req.ok or req.first_token_s is None:
            continue
        tpot = None
        if output > 1 and req.finish_s is not None:
            tpot = (req.finish_s - req.first_token_s) * 1e3 / (output - 1)
        samples.append(ProfileSample(prompt, output, req.first_token_s * 1e3
                                     + dep.ttft_overhead_ms, tpot))
    return tuple(samples)

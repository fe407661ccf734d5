"""P->D disaggregation through the router on two real ``vllm serve`` (tiny model, NixlConnector
``kv_both`` on CPU): same greedy output as a whole request, KV really transferred, a prefill
failure falls back to local prefill, and dynamic PD flips a role under overload and back.

Slow (engines start once per session): run under
``flock /tmp/xllm-vllm.lock pytest -m engine tests/router/test_pd_engines.py``.
"""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from router_fakes import FakeBehaviour, FakeEngine, metric_total, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]


async def _external(client: aiohttp.ClientSession, url: str) -> float:
    """Prompt tokens the engine loaded from another instance's KV (NIXL), not computed."""
    async with client.get(url + "/metrics") as r:
        text = await r.text()
    return metric_total(text, "vllm:prompt_tokens_by_source_total",
                        source="external_kv_transfer")


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 1000) for _ in range(n)]


async def _complete(client: aiohttp.ClientSession, url: str, body: dict, stream: bool,
                    headers: dict | None = None) -> tuple[str, dict[str, str]]:
    payload = {"model": "tiny", "temperature": 0, "stream": stream, **body}
    async with client.post(url, json=payload, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        hdrs = dict(r.headers)
        if not stream:
            choice = (await r.json())["choices"][0]
            return (choice.get("text") if "text" in choice else choice["message"]["content"]), hdrs
        text = []
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:]).get("choices") or ():
                    text.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
        return "".join(text), hdrs


def _pd_instances(engines) -> list[str]:
    return [f"{engines[0].url};id=engine-0;role=prefill",
            f"{engines[1].url};id=engine-1;role=decode"]


async def test_p_to_d_output_equals_whole_request_greedy_output_and_kv_came_over_nixl(
        router_engines, start_router, client):
    router, url = await start_router(instances=_pd_instances(router_engines), policy="static_pd")
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10, "health")
    p_url, d_url = router_engines[0].url, router_engines[1].url
    cases = [("completions", {"prompt": _prompt(700, 1), "max_tokens": 24}),
             ("chat/completions", {"messages": [{"role": "user", "content": "Count: " + " ".join(
                 str(n) for n in range(300))}], "max_tokens": 16})]
    for kind, body in cases:
        # Reference: the whole request on the prefill engine (the decode engine's cache stays
        # empty for this prompt, so the first disaggregated request must load it over NIXL).
        reference, _ = await _complete(client, f"{p_url}/v1/{kind}", body, stream=False)
        external = await _external(client, d_url)
        for stream in (False, True):
            text, headers = await _complete(client, f"{url}/v1/{kind}", body, stream)
            assert headers["x-xllm-pd"] == "handoff"
            assert headers["x-xllm-prefill-instance"] == "engine-0"
            assert headers["x-xllm-instance"] == "engine-1"
            assert text == reference, (kind, stream)
            if not stream:  # the first one found nothing cached on D
                loaded = await _external(client, d_url) - external
                assert loaded >= 128, f"{kind}: D reports {loaded} external-KV prompt tokens"
    async with client.get(url + "/metrics") as r:
        text = await r.text()
    assert 'xllm_router_pd_prefills_total{instance="engine-0",outcome="handoff"} 4.0' in text


async def test_idle_nixl_engines_leave_their_cores_free(router_engines, start_router, client):
    """Right after a P->D transfer (agents connected), an idle engine with NixlConnector
    uses a sliver of a core: the plugin pauses NIXL's progress thread between polls
    (xllm_plugin/nixl_progress.py), where NIXL's own default spins a whole core, and vLLM's
    worker sleeps on its step queue (xllm_plugin/shm_spin.py) instead of spinning for a
    second after each step (about half a core over these 3 s)."""
    router, url = await start_router(instances=_pd_instances(router_engines), policy="static_pd")
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10, "health")
    _, headers = await _complete(client, f"{url}/v1/completions",
                                 {"prompt": _prompt(300, 7), "max_tokens": 4}, stream=False)
    assert headers["x-xllm-pd"] == "handoff"
    await router.load.stop()  # no scrapes during the measurement
    before = [e.cpu_seconds() for e in router_engines]
    await asyncio.sleep(3.0)
    cores = [(e.cpu_seconds() - b) / 3.0 for e, b in zip(router_engines, before)]
    assert max(cores) < 0.25, f"idle engines used {cores} cores"


@pytest.mark.parametrize("behaviour,outcome", [
    (FakeBehaviour(fail_status=500), "fallback_http_500"),
    (FakeBehaviour(hang_s=30), "fallback_timeout"),
])
async def test_prefill_failure_falls_back_to_local_prefill_on_decode(
        router_engines, start_router, client, behaviour, outcome):
    prefill = await FakeEngine("failing-prefill", behaviour).start()
    try:
        d_url = router_engines[1].url
        router, url = await start_router(
            instances=[f"{prefill.url};id=fake-p;role=prefill;model=tiny",
                       f"{d_url};id=engine-1;role=decode"],
            policy="static_pd", first_byte_timeout_s=3)
        await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10,
                       "health")
        body = {"prompt": _prompt(300, 7), "max_tokens": 12}
        reference, _ = await _complete(client, f"{d_url}/v1/completions", body, stream=False)
        text, headers = await _complete(client, f"{url}/v1/completions", body, stream=True)
        assert text == reference
        assert headers["x-xllm-pd"] == outcome and headers["x-xllm-instance"] == "engine-1"
        assert prefill.requests and prefill.requests[0]["max_tokens"] == 1
        assert prefill.requests[0]["kv_transfer_params"]["do_remote_decode"] is True
        async with client.get(url + "/metrics") as r:
            metrics = await r.text()
        assert (f'xllm_router_pd_prefills_total{{instance="fake-p",outcome="{outcome}"}} 1.0'
                in metrics)
    finally:
        await prefill.stop()


async def _role_switches(client: aiohttp.ClientSession, url: str) -> dict[tuple[str, ...], float]:
    """``xllm_router_role_switches_total`` by (instance, from_role, to_role, reason)."""
    async with client.get(url + "/metrics") as r:
        text = await r.text()
    return {(s.labels["instance"], s.labels["from_role"], s.labels["to_role"], s.labels["reason"]):
            s.value
            for family in text_string_to_metric_families(text)
            if family.name == "xllm_router_role_switches"
            for s in family.samples if s.name.endswith("_total")}


async def test_dynamic_pd_flips_a_role_under_overload_and_back(router_engines, start_router,
                                                               client):
    # The burst's requests count as decodes headed to engine-1 from the moment they are routed
    # (their prefill runs on engine-0), so by the time engine-0's queue is over budget engine-1
    # holds more than the default 4: the cap must not be what this test measures.
    router, url = await start_router(instances=_pd_instances(router_engines), policy="dynamic_pd",
                                     pd_role_dwell_s=1, pd_restore_quiet_s=2,
                                     pd_mixed_max_batch=64)
    await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 10, "health")
    await wait_for(lambda: len(router.profiler.results) == 2, 60, "both instances profiled")
    policy = router.policies["dynamic_pd"]
    # An SLO an idle instance meets easily but the prefill instance misses once a few
    # long prompts queue on it: the decode instance must take prefill too.
    length = 3000
    single = max(policy.predicted_ttft_ms(i, length) for i in ("engine-0", "engine-1"))
    budget = 2.5 * single
    queued = next(k for k in range(1, 64)
                  if policy.predicted_ttft_ms("engine-0", length, k * length) > budget)
    # How many depends on the fitted profile (its fixed cost vs per-token cost, which CPU
    # noise moves); the test only needs a burst the tiny model clears in seconds.
    assert queued <= 32, f"the profile predicts too little queueing ({queued} prompts to miss)"
    headers = {"x-slo-ttft-ms": f"{budget / policy.settings.ttft_headroom:.1f}"}
    # Twice the predicted queue: margin for requests that reach the policy over a few hundred
    # milliseconds on a loaded machine while engine-0 already clears the first ones.
    bodies = [{"prompt": _prompt(length, 100 + k), "max_tokens": 2}
              for k in range(2 * queued + 3)]
    results = await asyncio.gather(*(
        _complete(client, url + "/v1/completions", b, stream=False, headers=headers)
        for b in bodies))
    assert len(results) == len(bodies)  # every request answered (200s asserted inside)
    switches = await _role_switches(client, url)
    served = [(h["x-xllm-instance"], h.get("x-xllm-pd")) for _, h in results]
    assert switches.get(("engine-1", "decode", "both", "ttft_slo")) == 1, (
        queued, budget, switches, served)
    # Load gone: after the quiet period, under light traffic without SLOs (which keeps the
    # predictors learning from fast requests, as a real cluster's would), the instance returns
    # to its home role.
    deadline = asyncio.get_running_loop().time() + 60
    while (router.load.instances["engine-1"].role != "decode"
           and asyncio.get_running_loop().time() < deadline):
        await _complete(client, url + "/v1/completions",
                        {"prompt": _prompt(64, 999), "max_tokens": 2}, stream=False)
        await asyncio.sleep(1)
    assert router.load.instances["engine-1"].role == "decode", "engine-1 not back to decode"
    switches = await _role_switches(client, url)
    assert switches.get(("engine-1", "both", "decode", "restore")) == 1, switches
    assert router.load.instances["engine-0"].role == "prefill"  # never both roles lost

"""The instance state machine wired into the load view: scrapes, proxy failures,
registrations (static and etcd) and removals drive it; routing, /admin/instances and
/metrics show it. The rules themselves are unit-tested in test_instance_state.py."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from router.cli import build_serve_parser
from router.config import ConfigError, RouterConfig
from router.discovery.etcd import EtcdClient
from router.discovery.records import InstanceRecord
from router_fakes import wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _transitions(router, before: str, after: str) -> float:
    return router.metrics.instance_transitions.labels(before, after)._value.get()


def _routable(router) -> dict[str, bool]:
    return {s.instance_id: s.healthy for s in router.load.view("tiny").instances}


async def test_suspect_gets_no_requests_while_a_healthy_instance_exists(fakes, start_router,
                                                                        client):
    a, b = fakes
    # Scrapes once at start, then not for a minute: only the test moves the states.
    router, url = await start_router(instances=[f"{a.url};id=a", f"{b.url};id=b"],
                                     scrape_interval_s=60, unhealthy_after=3)
    await asyncio.sleep(0.3)
    assert _routable(router) == {"a": True, "b": True}
    router.load.report_failure("a", "connection reset")
    assert router.load.instances["a"].health.state == "suspect"
    assert _routable(router) == {"a": False, "b": True}
    for _ in range(4):
        async with client.post(url + "/v1/completions", json={"model": "tiny",
                                                              "prompt": "x"}) as r:
            assert r.status == 200 and r.headers["x-xllm-instance"] == "b"
    # Nothing healthy left: suspect instances that answered before are still tried.
    router.load.report_failure("b", "stream stalled")
    assert _routable(router) == {"a": True, "b": True}
    # Failed ones are not.
    for _ in range(2):
        router.load.report_failure("a", "connection refused")
    assert router.load.instances["a"].health.state == "failed"
    assert _routable(router) == {"a": False, "b": True}
    assert _transitions(router, "healthy", "suspect") == 2
    assert _transitions(router, "suspect", "failed") == 1
    metrics = (await (await client.get(url + "/metrics")).read()).decode()
    assert ('xllm_router_instance_transitions_total{from_state="suspect",'
            'to_state="failed"} 1.0') in metrics


async def test_failed_instance_recovers_after_successes_and_hold(fakes, start_router, client):
    a, b = fakes
    router, url = await start_router(instances=[f"{a.url};id=a", f"{b.url};id=b"],
                                     scrape_interval_s=0.05, unhealthy_after=2,
                                     recover_after=2, failed_hold_s=1.0, admin_token="t")
    await wait_for(lambda: router.load.instances["a"].healthy, 5, "a healthy")
    a.behaviour.health_status = 503
    await wait_for(lambda: router.load.instances["a"].health.state == "failed", 5, "a failed")
    failed_at = time.monotonic()
    a.behaviour.health_status = 200
    await wait_for(lambda: router.load.instances["a"].healthy, 5, "a healthy again")
    assert time.monotonic() - failed_at >= 0.9  # the hold, though scrapes succeeded at once
    async with client.get(url + "/admin/instances", headers={"Authorization": "Bearer t"}) as r:
        view = {i["instance_id"]: i for i in (await r.json())["instances"]}
    assert view["a"]["state"] == "healthy" and view["a"]["consecutive_failures"] == 0
    assert "successes after" in view["a"]["state_reason"]
    assert _transitions(router, "failed", "healthy") == 1


async def test_scrape_timeouts_do_not_fail_an_instance_whose_streams_flow(fakes, start_router,
                                                                          client):
    """An overloaded engine answers /health late while its tokens still flow: that is load,
    not failure. Once nothing flows, the same timeouts fail it."""
    a, b = fakes
    router, url = await start_router(instances=[f"{a.url};id=a", f"{b.url};id=b"],
                                     scrape_interval_s=0.05, scrape_timeout_s=0.2,
                                     unhealthy_after=2)
    await wait_for(lambda: router.load.instances["a"].healthy, 5, "a healthy")
    a.behaviour.tokens, a.behaviour.token_delay_s = 30, 0.05
    b.behaviour.hang_s = 5.0  # the request goes to a
    router.load.report_failure("b", "test: keep b out of rotation")
    a.behaviour.health_delay_s = 1.0
    async with client.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x",
                                                          "stream": True}) as r:
        assert r.status == 200 and r.headers["x-xllm-instance"] == "a"
        states = set()
        async for _ in r.content:
            states.add(router.load.instances["a"].health.state)
    assert states == {"healthy"}
    assert router.load.instances["a"].busy_scrapes >= 2
    await wait_for(lambda: router.load.instances["a"].health.state == "failed", 5,
                   "a failed once its stream ended")


async def test_registrations_keep_or_reset_state_and_removal_is_counted(fakes, start_router):
    a, _ = fakes
    router, _ = await start_router(admin_token="t", scrape_interval_s=60, unhealthy_after=2)

    def record(incarnation: str) -> InstanceRecord:
        return InstanceRecord(instance_id="a", url=a.url, model="tiny", incarnation=incarnation)

    router.load.upsert(record("one"))
    await wait_for(lambda: router.load.instances["a"].healthy, 5, "first scrape")
    for _ in range(2):
        router.load.report_failure("a", "EOF mid-stream")
    assert router.load.instances["a"].health.state == "failed"
    router.load.upsert(record("one"))  # the same registration again heals nothing
    assert router.load.instances["a"].health.state == "failed"
    router.load.upsert(record("two"))  # a new engine process behind the same id
    assert router.load.instances["a"].health.state == "suspect"
    assert router.load.instances["a"].health.last_reason == "new incarnation"
    await wait_for(lambda: router.load.instances["a"].healthy, 5, "new incarnation scraped")
    router.load.remove("a", "lease expired")
    assert "a" not in router.load.instances
    assert _transitions(router, "failed", "suspect") == 1
    assert _transitions(router, "healthy", "removed") == 1
    # Registering again after removal (same incarnation) starts afresh.
    router.load.upsert(record("two"))
    await wait_for(lambda: router.load.instances["a"].healthy, 5, "re-registered")
    assert _transitions(router, "removed", "suspect") == 2  # first and last registration


async def test_long_failed_instance_is_removed_and_no_longer_scraped(start_router):
    router, _ = await start_router(instances=["http://127.0.0.1:8197;id=gone"],
                                   scrape_interval_s=0.05, unhealthy_after=1,
                                   remove_after_s=0.3)
    await wait_for(lambda: router.load.instances["gone"].health.state == "removed", 5,
                   "removal after remove_after_s")
    load = router.load.instances["gone"]
    failures = load.health.failures
    await asyncio.sleep(0.3)
    assert load.health.failures == failures and not load.healthy


async def test_etcd_registrations_feed_the_state_machine(etcd_endpoint, fakes, start_router):
    a, _ = fakes
    prefix = f"/xllm-test/{uuid.uuid4().hex[:8]}/"
    router, _ = await start_router(etcd=etcd_endpoint, etcd_prefix=prefix, unhealthy_after=2)
    loads = router.load.instances
    async with EtcdClient(etcd_endpoint) as etcd:
        async def put(incarnation: str) -> None:
            await etcd.put(prefix + "e", InstanceRecord(
                instance_id="e", url=a.url, model="tiny",
                incarnation=incarnation).to_etcd_value())

        await put("one")
        await wait_for(lambda: "e" in loads and loads["e"].healthy, 5, "registration")
        await put("two")
        await wait_for(lambda: loads["e"].health.incarnation == "two", 5, "new incarnation")
        assert _transitions(router, "healthy", "suspect") == 1  # the new incarnation
        await wait_for(lambda: loads["e"].healthy, 5, "new incarnation healthy")
        await etcd.delete(prefix + "e")
        await wait_for(lambda: "e" not in loads, 5, "deregistration")
    assert _transitions(router, "healthy", "removed") == 1


async def test_health_flags_are_validated_and_mapped() -> None:
    config = RouterConfig.from_args({"instances": ["http://127.0.0.1:9"], "unhealthy_after": 4,
                                     "recover_after": 3, "failed_hold_s": 1.5,
                                     "failed_hold_max_s": 8, "flap_window_s": 20,
                                     "remove_after_s": 120})
    rules = config.state_rules()
    assert (rules.fail_after, rules.recover_after, rules.base_hold_s, rules.max_hold_s,
            rules.flap_window_s, rules.remove_after_s) == (4, 3, 1.5, 8, 20, 120)
    assert RouterConfig.from_args({"instances": ["http://127.0.0.1:9"]}
                                  ).state_rules().remove_after_s is None
    with pytest.raises(ConfigError, match="--failed-hold-max-s"):
        RouterConfig.from_args({"instances": ["http://127.0.0.1:9"], "failed_hold_s": 10,
                                "failed_hold_max_s": 5})
    with pytest.raises(ConfigError, match="--recover-after"):
        RouterConfig.from_args({"instances": ["http://127.0.0.1:9"], "recover_after": 0})
    args = build_serve_parser().parse_args(["--recover-after", "2", "--remove-after-s", "60"])
    assert (args.recover_after, args.remove_after_s) == (2, 60.0)

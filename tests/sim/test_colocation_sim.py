"""The simulator's online/offline classes: XLLMScheduler's rules, the offline backlog, migration."""

from __future__ import annotations

from router.policies import (
    ClusterView,
    Migration,
    RequestInfo,
    RoutingDecision,
    make_policy,
)
from router.sim import SimConfig, simulate
from router.sim.classes import ClassScheduling, OfflineBacklog, plan_class_step
from router.sim.cluster import Cluster
from router.sim.instance import SimInstance, _queued_part
from router.sim.workload import RequestSpec, Workload, synthetic
from tests.sim.conftest import tiny_deployment

PRIORITY = ClassScheduling(slo_budget=False)


def online(prompt: int, output: int, at: float, rid: str) -> RequestSpec:
    return RequestSpec(rid, at, prompt, output)


def offline(prompt: int, output: int, at: float, rid: str) -> RequestSpec:
    return RequestSpec(rid, at, prompt, output, request_class="offline")


def run(requests, policy="round_robin", n=1, **config):
    dep = config.pop("deployment", None) or tiny_deployment()
    policy = make_policy(policy) if isinstance(policy, str) else policy
    return simulate(Workload("hand", list(requests)), policy, SimConfig(dep, n, **config))


def by_id(result):
    return {r.request_id: r for r in [*result.records, *result.offline_records]}


def test_online_arrival_takes_the_run_slot_of_a_running_offline_request():
    dep = tiny_deployment(max_num_seqs=1)
    reqs = [offline(100, 50, 0.0, "off"), offline(100, 5, 0.001, "off2"),
            online(100, 2, 0.05, "on")]
    stock = by_id(run(reqs, deployment=dep))
    xllm = by_id(run(reqs, deployment=dep, classes=PRIORITY))
    # Stock FCFS: the online request waits for both offline requests to finish.
    assert stock["on"].ttft_ms > 500
    # Classes: it preempts the running offline request and goes ahead of the waiting one.
    assert xllm["on"].ttft_ms < 50
    assert xllm["off"].preemptions == 1 and xllm["off"].ok and xllm["off"].finish_s
    assert xllm["on"].finish_s < xllm["off2"].finish_s
    assert all(r.ok for r in xllm.values())


def test_by_default_online_waits_for_a_running_offline_prefill_as_in_the_engine():
    # Budget 512: the offline prompt needs 10 chunks of 61 ms; the online prompt arrives in chunk 2.
    # vLLM serves running requests' chunks before waiting ones, and XLLMScheduler preempts
    # offline work only for slots or KV blocks, so the online prompt waits (engine parity).
    reqs = [offline(5000, 1, 0.0, "off"), online(400, 1, 0.1, "on")]
    stock = by_id(run(reqs))
    xllm = by_id(run(reqs, classes=PRIORITY))
    assert stock["on"].ttft_ms > 400  # behind the whole offline prompt
    assert xllm["on"].ttft_ms == stock["on"].ttft_ms
    assert xllm["off"].preemptions == 0


def test_opt_in_rule_preempts_an_offline_prefill_that_would_take_the_step_budget():
    reqs = [offline(5000, 1, 0.0, "off"), online(400, 1, 0.1, "on")]
    stock = by_id(run(reqs))
    xllm = by_id(run(reqs, classes=ClassScheduling(slo_budget=False,
                                                   preempt_offline_prefill=True)))
    assert xllm["on"].ttft_ms < 0.2 * stock["on"].ttft_ms
    assert xllm["off"].preemptions >= 1 and xllm["off"].ok


def test_online_arrival_without_kv_blocks_preempts_offline_which_recomputes_its_tokens():
    # 16 blocks of 16 tokens: the offline request holds 9 when the online one (10 blocks) comes.
    dep = tiny_deployment(num_kv_blocks=16)
    reqs = [offline(100, 150, 0.0, "off"), online(150, 3, 0.5, "on")]
    stock = run(reqs, deployment=dep)
    xllm = run(reqs, deployment=dep, classes=PRIORITY)
    on, off = by_id(xllm)["on"], by_id(xllm)["off"]
    assert by_id(stock)["on"].ttft_ms > 1000  # stock: waits for the offline request's blocks
    assert on.ttft_ms < 100
    assert off.ok and off.preemptions == 1
    assert xllm.instances["i0"]["preempted_for_online"] == 1
    # Recompute: the offline request re-prefilled prompt + what it had generated (~40 tokens),
    # then generated only the rest of its output (no token is produced twice).
    extra = xllm.instances["i0"]["tokens"] - stock.instances["i0"]["tokens"]
    assert 100 + 30 < extra < 100 + 60
    assert off.finish_s > by_id(stock)["off"].finish_s


def test_slo_step_budget_keeps_online_tpot_while_offline_prefill_shares_the_steps():
    # Steps: 10 ms + 0.1 ms per prefill token + 1 ms per decode; a full 512-token chunk is 62 ms.
    reqs = [online(10, 10, 0.0, "on"), offline(4000, 3, 0.03, "off")]
    priority = by_id(run(reqs, classes=PRIORITY, slo=_slo(30)))
    budget = by_id(run(reqs, classes=ClassScheduling(), slo=_slo(30)))
    assert priority["on"].tpot_ms > 30  # offline chunks of 512 tokens land in its steps
    assert budget["on"].tpot_ms <= 30  # steps sized to 0.9 x 30 ms while it decodes
    assert budget["off"].ok and budget["off"].finish_s is not None


def test_waiting_online_prefill_takes_the_step_budget_from_a_running_offline_prefill():
    # While "on1" decodes under a 30 ms TPOT SLO a step holds ~160 prefill tokens, so the
    # offline prompt needs ~25 steps (~0.7 s). The online prompt arriving meanwhile gets
    # those tokens first: running offline chunks sit out while it waits or prefills.
    reqs = [online(10, 400, 0.0, "on1"), offline(4000, 1, 0.02, "off"),
            online(1000, 1, 0.1, "on2")]
    result = run(reqs, classes=ClassScheduling(), slo=_slo(30))
    done = by_id(result)
    assert done["on2"].ttft_ms < 300
    first_token_s = {k: r.arrival_s + r.ttft_ms / 1000 for k, r in done.items()}
    assert done["off"].ok and first_token_s["off"] > first_token_s["on2"]
    assert result.instances["i0"]["offline_prefill_held"] > 0
    assert done["on1"].tpot_ms <= 30


def test_ttft_slo_bounds_offline_steps_while_no_online_request_decodes():
    # Offline chunks fill a 4096-token budget: 420 ms steps. With a 100 ms TTFT SLO a step
    # with offline work and no online decode is sized for 0.9 x 50 ms (350 tokens), so an
    # online arrival waits for at most one short step before its own.
    dep = tiny_deployment(max_num_batched_tokens=4096)
    reqs = [offline(20_000, 1, 0.0, "off"), online(100, 1, 0.1, "on")]
    loose = by_id(run(reqs, deployment=dep, classes=ClassScheduling(ttft_slo_ms=10_000.0),
                      slo=_slo(30)))
    bound = by_id(run(reqs, deployment=dep, classes=ClassScheduling(ttft_slo_ms=100.0),
                      slo=_slo(30)))
    assert loose["on"].ttft_ms > 100
    assert bound["on"].ttft_ms <= 100
    assert bound["off"].preemptions == loose["off"].preemptions == 0


def _plan(**overrides):
    args = dict(online_decodes=2, online_ctx=0, offline_decode_ctx=[], offline_prefills=[],
                slo_ms=30, headroom=0.9, min_prefill=32, max_budget=512,
                online_prefill_tokens=0, online_waiting=False)
    args.update(overrides)
    return plan_class_step(tiny_deployment().step_model.step_s, **args)


def test_class_step_plan_is_the_most_prefill_within_headroom():
    # 0.9 x 30 ms = 27 ms; 10 ms + 2 decodes = 12 ms -> 150 prefill tokens.
    assert _plan().tokens == 2 + 150
    # An SLO nothing fits in still lets min_prefill through for online prefill ...
    assert _plan(slo_ms=5, online_prefill_tokens=100).tokens == 2 + 32
    # ... never more than it needs, and none for offline prefill alone.
    assert _plan(slo_ms=5, online_prefill_tokens=7).tokens == 2 + 7
    assert _plan(slo_ms=5).tokens == 2


def test_class_step_plan_lets_offline_decodes_in_while_they_fit():
    # 27 ms limit, 10 ms + 1 ms per decode: 2 online + 15 offline decodes fit, the rest sit out,
    # and a step with all of them leaves no prefill tokens.
    plan = _plan(offline_decode_ctx=[0] * 20)
    assert plan.held_offline_decodes == tuple(range(15, 20)) and plan.tokens == 17
    assert _plan(offline_decode_ctx=[0] * 5).held_offline_decodes == ()


def test_without_offline_work_the_class_rules_change_nothing():
    lengths = [(200, 20), (800, 5), (50, 100)]
    reqs = synthetic(lengths, rate=20, n=200, cv=3, seed=3).requests
    plain = run(reqs, n=2, deployment=tiny_deployment(num_kv_blocks=80))
    classes = run(reqs, n=2, deployment=tiny_deployment(num_kv_blocks=80), classes=PRIORITY)
    assert plain.summary["preemptions"] > 0  # KV pressure exercised
    assert [r.ttft_ms for r in plain.records] == [r.ttft_ms for r in classes.records]
    assert [r.tpot_ms for r in plain.records] == [r.tpot_ms for r in classes.records]


def test_offline_backlog_stays_at_its_concurrency_and_is_reported_apart():
    reqs = [online(100, 5, 0.2 * k, f"on{k}") for k in range(10)]
    inflight = []
    original = SimInstance.enqueue

    cluster = Cluster(Workload("hand", reqs), make_policy("least_load"),
                      SimConfig(tiny_deployment(), 2, classes=ClassScheduling(),
                                offline=OfflineBacklog([(300, 20), (50, 60)], 4, seed=1)))

    def counted(self, req):
        original(self, req)
        inflight.append(sum(1 for r in cluster._offline_reqs if r.finish_s is None and r.ok))

    SimInstance.enqueue = counted
    try:
        result = cluster.run()
    finally:
        SimInstance.enqueue = original
    s = result.summary
    assert s["requests"] == 10 and s["finished"] == 10  # the SLO numbers are the online ones'
    assert all(not r.request_id.startswith("offline") for r in result.records)
    assert s["offline_finished"] == len(result.offline_records) > 4
    assert s["offline_dispatched"] - s["offline_finished"] == 4
    assert max(inflight) == 4
    assert s["offline_output_tok_per_s"] > 0
    # The run is the online workload's: it ends when the last online request is done.
    assert result.sim_end_s == max(r.finish_s for r in result.records)


class MigrateOnce:
    """Sends everything to i0 and, at the first tick, moves one offline request to i1."""

    name = "migrate_once"

    def __init__(self) -> None:
        self.asked = 0

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        return RoutingDecision("i0")

    def migrations(self, view: ClusterView) -> tuple[Migration, ...]:
        self.asked += 1
        return (Migration("i0", "i1", 1, "test"),) if self.asked == 1 else ()


def test_migration_re_prefills_prompt_and_generated_tokens_on_the_target():
    reqs = [offline(100, 200, 0.0, "off"), online(10, 1, 2.5, "on")]
    result = run(reqs, policy=MigrateOnce(), n=2, classes=ClassScheduling(),
                 rebalance_interval_s=1.0)
    off = by_id(result)["off"]
    assert off.ok and off.instance_id == "i1"
    # By t=1 s it had ~80 tokens (12 ms decode steps); i1 recomputed prompt + those at once.
    i1 = result.instances["i1"]
    assert i1["tokens"] > 100 + 50
    assert result.instances["i0"]["tokens"] > 100


def _slo(tpot_ms: float):
    from router.sim.metrics import SLO

    return SLO(1000.0, tpot_ms)


class LeastLoadThatMigrates:
    """Least-load routing; every tick moves two offline requests from the busiest instance."""

    name = "least_load_migrating"

    def __init__(self) -> None:
        self.inner = make_policy("least_load")

    def route(self, request: RequestInfo, view: ClusterView) -> RoutingDecision:
        return self.inner.route(request, view)

    def migrations(self, view: ClusterView) -> tuple[Migration, ...]:
        busiest = max(view.instances, key=lambda i: (i.offline_running + i.offline_waiting,
                                                     i.instance_id))
        idlest = min(view.instances, key=lambda i: (i.load, i.instance_id))
        return (Migration(busiest.instance_id, idlest.instance_id, 2),)


def test_kv_block_accounting_adds_up_with_classes_preemption_and_migration(monkeypatch):
    dep = tiny_deployment(num_kv_blocks=60, max_num_seqs=6)
    reqs = [online(64 + 16 * (k % 3), 6, 0.01 * k, f"on{k}") for k in range(60)]
    cluster = Cluster(Workload("hand", reqs), LeastLoadThatMigrates(),
                      SimConfig(dep, 3, classes=ClassScheduling(), rebalance_interval_s=0.05,
                                offline=OfflineBacklog([(200, 30), (40, 80)], 10, seed=2)))
    inst = list(cluster.instances.values())
    original = SimInstance._end_step
    checks = []

    def checked(self, payload):
        original(self, payload)
        for i in inst:
            assert_counts_add_up(i)
        checks.append(1)

    monkeypatch.setattr(SimInstance, "_end_step", checked)
    result = cluster.run()
    assert result.summary["finished"] == 60
    assert result.summary["offline_migrations"] > 0
    assert result.summary["offline_preempted_for_online"] + result.summary["preemptions"] > 0
    assert len(checks) > 60


def assert_counts_add_up(i: SimInstance, in_transfer: set | frozenset = frozenset()) -> None:
    """What an instance shows policies equals what its queues hold (between steps)."""
    sent = [r for r in in_transfer if r.prefill_instance_id == i.instance_id]
    i.kv.check_invariant([*i.running, *i.waiting, *i.waiting_offline, *sent])
    waiting = [*i.waiting, *i.waiting_offline]
    assert i.offline_running == sum(r.offline for r in i.running)
    assert i.num_offline_waiting == sum(r.offline for r in waiting)
    queued = {r: r.remaining for r in waiting} | {r: _queued_part(r) for r in i.running}
    assert i.queued_prefill_tokens == sum(queued.values())
    assert i.offline_queued_prefill_tokens == sum(n for r, n in queued.items() if r.offline)


def test_colocation_in_the_simulator_keeps_counts_and_migrates_to_idle_relaxed_instances(
        monkeypatch):
    # 2 relaxed + 2 strict; online only in the first 2 s, so the relaxed pool turns idle while
    # the strict instances (few run slots) hold offline decodes waiting for a slot.
    dep = tiny_deployment(num_kv_blocks=200, max_num_seqs=4, transfer_bytes_per_s=1e9)
    reqs = [online(200, 20, 0.05 * k, f"on{k}") for k in range(40)]
    reqs.append(online(10, 2, 8.0, "last"))
    original = SimInstance._end_step
    in_transfer: set = set()  # prefill done, KV still held on P until the transfer ends
    sent, received = Cluster._on_prefill_done, Cluster._on_transfer_done

    def checked(self, payload):
        original(self, payload)
        for i in cluster.instances.values():
            assert_counts_add_up(i, in_transfer)
        assert all(state.online_load >= 0 for state in cluster.view().instances)

    def on_sent(self, req, now):
        in_transfer.add(req)
        sent(self, req, now)

    def on_received(self, req):
        in_transfer.discard(req)
        received(self, req)

    monkeypatch.setattr(SimInstance, "_end_step", checked)
    monkeypatch.setattr(Cluster, "_on_prefill_done", on_sent)
    monkeypatch.setattr(Cluster, "_on_transfer_done", on_received)
    cluster = Cluster(Workload("hand", reqs), make_policy("colocation"),
                      SimConfig(dep, 4, classes=ClassScheduling(), rebalance_interval_s=0.25,
                                offline=OfflineBacklog([(100, 300)], 16, seed=0)))
    result = cluster.run()
    assert [i["role"] for i in result.instances.values()] == ["prefill", "prefill", "decode",
                                                             "decode"]
    assert result.summary["finished"] == 41
    moves = cluster.migration_log
    assert moves and all(m.to_instance_id in ("i0", "i1") and m.from_instance_id in ("i2", "i3")
                         for _, m in moves)
    assert result.summary["offline_migrations"] > 0
    migrated = [r for r in cluster._offline_reqs if r.migrations]
    assert all(r.decode_instance_id in ("i0", "i1") for r in migrated if r.finish_s is None)


def test_offline_capacity_run_measures_the_offline_job_alone():
    """benchmarks/colocation_sim.py's bound: offline tok/s with only a one-token marker
    request, which ends the run at the end of the measured window."""
    from benchmarks.colocation_sim import CONFIGS, capacity_run

    cfg = next(c for c in CONFIGS if c.label == "online_priority")
    base = SimConfig(tiny_deployment(), 2)
    lengths = [(300, 20), (50, 60)]
    few, many = (capacity_run(cfg, base, lengths, level, 0, warmup_s=1.0, span_s=10.0)
                 for level in (1, 8))
    assert 0 < few < many  # one request at a time leaves the instances mostly idle


def test_slack_of_online_decodes_ahead_of_their_tpot_slo_goes_to_offline_prefill():
    # A lone online decode takes 11 ms of its 27 ms (0.9 x 30) allowance per token; the
    # time it is ahead lets offline chunks make longer steps (512 tokens, the whole budget,
    # instead of 160), and its mean TPOT still holds.
    reqs = [online(10, 300, 0.0, "on"), offline(4000, 1, 0.2, "off")]
    per_step = by_id(run(reqs, classes=ClassScheduling(spend_tpot_slack=False), slo=_slo(30)))
    banked = by_id(run(reqs, classes=ClassScheduling(spend_tpot_slack=True), slo=_slo(30)))
    assert banked["on"].tpot_ms <= 0.9 * 30 + 1e-6
    assert per_step["on"].tpot_ms <= 0.9 * 30 + 1e-6
    done = {k: r.arrival_s + r.ttft_ms / 1000 for k, r in banked.items()}
    base = {k: r.arrival_s + r.ttft_ms / 1000 for k, r in per_step.items()}
    assert done["off"] < base["off"]

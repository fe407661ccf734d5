"""The connector's scheduler-side decisions with a stand-in request and store (no engine):
what a lookup promises, what a step plans, and when blocks may be freed."""

from __future__ import annotations

from dataclasses import dataclass, field

from xllm_plugin.kvstore.backends import block_key
from xllm_plugin.kvstore.scheduler_side import StoreScheduler
from xllm_plugin.kvstore.settings import KVStoreConfig
from xllm_plugin.kvstore.tiers import FILL_STORE, PUT, SAVE, SCATTER, Tier

BS = 4
PREFIX = "xllm/test"


def h(i: int) -> bytes:
    return bytes([i]) * 32


@dataclass
class FakeRequest:
    request_id: str
    num_tokens: int
    block_hashes: list[bytes] = field(default_factory=list)


class FakeStore:
    """Answers existence checks like Mooncake Store's batch_is_exist."""

    def __init__(self, held: set[bytes]) -> None:
        self.keys = {block_key(PREFIX, x) for x in held}
        self.calls = 0

    def exists(self, keys: list[str]) -> list[bool]:
        self.calls += 1
        return [k in self.keys for k in keys]


def scheduler(store: FakeStore | None, dram: int = 16, **settings) -> StoreScheduler:
    config = KVStoreConfig(master="127.0.0.1:1" if store else None, **settings)
    return StoreScheduler(config, BS, dram, 0, PREFIX, store, clock=lambda: 0.0)


def request(n_blocks: int, extra_tokens: int = 2, rid: str = "r") -> FakeRequest:
    return FakeRequest(rid, n_blocks * BS + extra_tokens, [h(i) for i in range(n_blocks)])


def test_lookup_counts_leading_blocks_held_anywhere_and_stops_at_the_first_gap():
    store = FakeStore({h(0), h(1), h(2), h(4)})
    s = scheduler(store)
    assert s.matched_tokens(request(6), 0) == 3 * BS        # 3 is missing: 4 does not count
    assert s.matched_tokens(request(6, rid="q"), 1 * BS) == 2 * BS  # past the engine's own hit


def test_lookup_leaves_at_least_one_prompt_token_to_compute():
    s = scheduler(FakeStore({h(i) for i in range(4)}))
    assert s.matched_tokens(request(4, extra_tokens=0), 0) == 3 * BS


def test_a_load_never_exceeds_the_dram_tier():
    s = scheduler(FakeStore({h(i) for i in range(8)}), dram=5)
    assert s.matched_tokens(request(8), 0) == 5 * BS


def test_repeated_lookups_of_a_waiting_request_reuse_one_store_round_trip():
    store = FakeStore({h(0), h(1)})
    s = scheduler(store)
    r = request(4)
    for _ in range(3):
        assert s.matched_tokens(r, 0) == 2 * BS
    assert store.calls == 1


def test_load_off_means_no_hits():
    assert scheduler(FakeStore({h(0)}), load=False).matched_tokens(request(3), 0) == 0


def test_accepted_load_is_planned_from_the_store_then_saves_follow_computation():
    s = scheduler(FakeStore({h(0), h(1)}))
    r = request(4)
    assert s.matched_tokens(r, 0) == 2 * BS
    s.after_alloc(r, [10, 11, 12, 13, 14], 2 * BS)
    assert s.hit_sources(r) == {Tier.STORE: 2}
    plan = s.build_plan([], lambda _: None)
    assert [op[0] for op in plan.ops] == [FILL_STORE, FILL_STORE, SCATTER]
    assert [t[1] for t in plan.ops[-1][2]] == [10, 11]
    assert s.finished("r") is True          # load in flight: vLLM must keep the blocks
    s.on_loads_done(["r"], set())
    assert s.finished("r") is False

    # A new request computes 4 full blocks over two steps: each block is saved once,
    # on the step that completes it, and put to the store in the same step.
    q = FakeRequest("q", 4 * BS + 1, [h(20 + i) for i in range(4)])
    s.matched_tokens(q, 0)
    s.after_alloc(q, [30, 31, 32, 33, 34], 0)
    first = s.build_plan([("q", 0, 2 * BS + 1)], lambda _: [30, 31, 32, 33, 34])
    assert first.save_block_ids == [30, 31]
    assert [op[0] for op in first.ops] == [SAVE, SAVE, PUT, PUT]
    second = s.build_plan([("q", 2 * BS + 1, 2 * BS)], lambda _: [30, 31, 32, 33, 34])
    assert second.save_block_ids == [32, 33]


def test_a_failed_fill_is_forgotten_so_the_next_lookup_does_not_promise_it():
    s = scheduler(FakeStore({h(0)}))
    r = request(2)
    s.matched_tokens(r, 0)
    s.after_alloc(r, [5, 6, 7], BS)
    s.build_plan([], lambda _: None)
    assert s.directory.where(h(0)) is Tier.DRAM
    s.on_loads_done(["r"], {5})
    assert s.directory.where(h(0)) is None


def test_without_a_store_puts_are_not_planned():
    s = scheduler(None)
    q = FakeRequest("q", 2 * BS + 1, [h(1), h(2)])
    s.after_alloc(q, [1, 2, 3], 0)
    plan = s.build_plan([("q", 0, 2 * BS + 1)], lambda _: [1, 2, 3])
    assert [op[0] for op in plan.ops] == [SAVE, SAVE]


def test_synchronous_loads_run_before_the_forward_and_are_not_reported_as_waiting():
    s = scheduler(FakeStore({h(0), h(1)}), async_load=False)
    r = request(4)
    s.matched_tokens(r, 0)
    s.after_alloc(r, [10, 11, 12, 13, 14], 2 * BS)
    plan = s.build_plan([("r", 2 * BS, 2 * BS + 2)], lambda _: [10, 11, 12, 13, 14])
    loads, rest = plan.ops[:plan.load_ops_end], plan.ops[plan.load_ops_end:]
    assert [op[0] for op in loads] == [FILL_STORE, FILL_STORE, SCATTER]
    assert loads[-1][3] is False             # no finished_recving: the request is running
    assert [op[0] for op in rest] == [SAVE, SAVE, PUT, PUT]  # its other two blocks
    assert s.finished("r") is False          # nothing writes its blocks after this step

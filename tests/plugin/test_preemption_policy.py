"""The offline-victim rule on hand-made cases: newest offline first, only as many as needed."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from xllm_plugin.scheduler.preemption import OfflineVictimPicker, Shortfall, shortfall


@dataclass(frozen=True)
class Req:
    name: str
    offline: bool
    arrival: float
    blocks: int = 1


PICKER = OfflineVictimPicker(is_offline=lambda r: r.offline, arrival_time=lambda r: r.arrival,
                             blocks_held=lambda r: r.blocks)


def test_no_shortfall_when_slots_and_blocks_suffice() -> None:
    assert not shortfall([2, 3], running=1, max_running=4, free_blocks=10).any


def test_shortfall_counts_missing_slots_and_blocks() -> None:
    assert shortfall([4, 4], running=3, max_running=4, free_blocks=5) == Shortfall(slots=1, blocks=3)


def test_newest_offline_request_is_preempted_first() -> None:
    running = [Req("old", True, 1.0), Req("new", True, 3.0), Req("online", False, 2.0)]
    assert [r.name for r in PICKER.pick(running, Shortfall(slots=1, blocks=0))] == ["new"]


def test_online_requests_are_never_victims() -> None:
    running = [Req("a", False, 1.0), Req("b", False, 2.0)]
    assert PICKER.pick(running, Shortfall(slots=2, blocks=50)) == []


def test_preempts_until_enough_blocks_are_freed() -> None:
    running = [Req("a", True, 1.0, blocks=8), Req("b", True, 2.0, blocks=2),
               Req("c", True, 3.0, blocks=2)]
    assert [r.name for r in PICKER.pick(running, Shortfall(slots=0, blocks=5))] == ["c", "b", "a"]
    assert [r.name for r in PICKER.pick(running, Shortfall(slots=0, blocks=4))] == ["c", "b"]


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 100), st.integers(0, 10)), max_size=20),
       st.integers(0, 5), st.integers(0, 40))
def test_victims_are_offline_distinct_and_cover_the_need_when_possible(
        specs: list[tuple[bool, float, int]], slots: int, blocks: int) -> None:
    running = [Req(str(i), off, arrival, b) for i, (off, arrival, b) in enumerate(specs)]
    victims = PICKER.pick(running, Shortfall(slots=slots, blocks=blocks))
    assert all(v.offline for v in victims)
    assert len({v.name for v in victims}) == len(victims)
    offline = [r for r in running if r.offline]
    if len(victims) < len(offline):  # stopped early: the need was met
        assert len(victims) >= slots and sum(v.blocks for v in victims) >= blocks

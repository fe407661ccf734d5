"""Phase-aware batching rules (xllm_plugin/scheduler/phases.py) and the queue hold that
applies them to vLLM's waiting queue."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from xllm_plugin.scheduler.phases import EncodeHold, running_rank


@dataclass(eq=False)
class _Req:
    request_id: str
    image: bool = False
    offline: bool = False
    priority: int = 0
    arrival_time: float = 0.0

    def __lt__(self, other: _Req) -> bool:  # what vLLM's priority queue orders by
        return (self.priority, self.arrival_time) < (other.priority, other.arrival_time)


def test_running_order_is_class_then_decodes_then_unfinished_prefills() -> None:
    running = {  # name: (offline, computed, prompt)
        "online-prefill": (False, 64, 512), "offline-decode": (True, 600, 512),
        "online-decode": (False, 700, 512), "offline-prefill": (True, 0, 512),
        "online-decode-2": (False, 512, 512)}
    order = sorted(running, key=lambda n: running_rank(*running[n]))
    assert order == ["online-decode", "online-decode-2", "online-prefill", "offline-decode",
                     "offline-prefill"]


def _select(hold: EncodeHold, waiting: list[_Req], pending: bool) -> list[str]:
    held = hold.select(waiting, prefill_pending=pending, needs_encode=lambda r: r.image,
                       key=lambda r: r.request_id)
    return [r.request_id for r in held]


def test_image_requests_wait_only_while_a_prefill_is_unfinished() -> None:
    hold = EncodeHold(max_hold_steps=8)
    waiting = [_Req("t1"), _Req("m1", image=True), _Req("t2"), _Req("m2", image=True)]
    assert _select(hold, waiting, pending=True) == ["m1", "m2"]
    assert _select(hold, waiting, pending=False) == []
    assert hold.holds == 2


def test_hold_is_capped_so_a_stream_of_text_prompts_cannot_starve_images() -> None:
    hold = EncodeHold(max_hold_steps=3)
    m1 = _Req("m1", image=True)
    held_steps = 0
    for step in range(10):
        waiting = [m1] + ([_Req("m2", image=True)] if step >= 2 else [])
        held = _select(hold, waiting, pending=True)
        held_steps += "m1" in held
        if step >= 2:
            assert ("m2" in held) == (step < 5)
    assert held_steps == 3 and hold.released_by_cap == 2


def test_a_request_that_left_the_queue_is_forgotten() -> None:
    hold = EncodeHold(max_hold_steps=1)
    assert _select(hold, [_Req("m1", image=True)], pending=True) == ["m1"]
    assert _select(hold, [], pending=True) == []
    # Same id again (e.g. preempted and back): a fresh count.
    assert _select(hold, [_Req("m1", image=True)], pending=True) == ["m1"]


def test_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError):
        EncodeHold(max_hold_steps=-1)


vllm = pytest.importorskip("vllm")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_withheld_requests_return_to_their_places(policy: str) -> None:
    from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue

    from xllm_plugin.scheduler.class_queue import ClassAwareQueue

    queue = ClassAwareQueue(lambda: create_request_queue(SchedulingPolicy(policy)),
                            lambda r: "offline" if r.offline else "online")
    reqs = {name: _Req(name, image=name.startswith("m"), offline=name.endswith("o"),
                       arrival_time=i)
            for i, name in enumerate(["t1", "m1", "t2", "m2", "t3o", "m3o"])}
    for r in reqs.values():
        queue.add_request(r)
    restore = queue.withhold([reqs["m1"], reqs["m2"], reqs["m3o"]])
    assert [r.request_id for r in queue] == ["t1", "t2", "t3o"]
    admitted = queue.pop_request()  # vLLM admits t1 ...
    preempted = _Req("p0", arrival_time=-1)
    queue.prepend_request(preempted)  # ... and preempts a running request
    assert admitted.request_id == "t1"
    restore()
    assert [r.request_id for r in queue] == ["p0", "m1", "t2", "m2", "t3o", "m3o"]

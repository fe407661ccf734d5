"""A waiting queue that always serves online requests before offline ones.

vLLM's scheduler admits from ``self.waiting`` in queue order and stops at the
first request it cannot fit; with one queue, an online arrival would sit behind
every offline request that came before it. Two sub-queues of vLLM's own kind
(FCFS or priority, as configured) keep each class's order and put online first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request

from xllm_plugin.scheduler.request_class import RequestClass


class ClassAwareQueue(RequestQueue):
    def __init__(self, make_queue: Callable[[], RequestQueue],
                 class_of: Callable[[Request], RequestClass]) -> None:
        self._queues: dict[RequestClass, RequestQueue] = {"online": make_queue(),
                                                          "offline": make_queue()}
        self._class_of = class_of

    def _first_nonempty(self) -> RequestQueue:
        for queue in self._queues.values():
            if queue:
                return queue
        raise IndexError("pop from an empty queue")

    def count(self, request_class: RequestClass) -> int:
        return len(self._queues[request_class])

    def of_class(self, request_class: RequestClass) -> Iterator[Request]:
        return iter(self._queues[request_class])

    def add_request(self, request: Request) -> None:
        self._queues[self._class_of(request)].add_request(request)

    def pop_request(self) -> Request:
        return self._first_nonempty().pop_request()

    def peek_request(self) -> Request:
        return self._first_nonempty().peek_request()

    def prepend_request(self, request: Request) -> None:
        self._queues[self._class_of(request)].prepend_request(request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        # Each class's sub-queue keeps vLLM's own prepend semantics.
        for request_class, members in self._split(requests).items():
            if members:
                self._queues[request_class].prepend_requests(members)

    def _split(self, requests: Iterable[Request]) -> dict[RequestClass, list[Request]]:
        by_class: dict[RequestClass, list[Request]] = {"online": [], "offline": []}
        for request in requests:
            by_class[self._class_of(request)].append(request)
        return by_class

    def remove_request(self, request: Request) -> None:
        self._queues[self._class_of(request)].remove_request(request)

    def remove_requests(self, requests: Iterable[Request]) -> None:
        for request_class, members in self._split(requests).items():
            if members:
                self._queues[request_class].remove_requests(members)

    def withhold(self, requests: list[Request]) -> Callable[[], None]:
        """Take ``requests`` out of the queue for one scheduling pass; the returned
        function puts them back where they were (phase-aware batching holds back new
        multimodal requests). Requests vLLM admitted meanwhile stay out; requests it
        prepended (preempted ones) stay in front."""
        if not requests:
            return lambda: None
        before = {c: list(q) for c, q in self._queues.items()}
        self.remove_requests(requests)
        held = set(map(id, requests))

        def restore() -> None:
            for request_class, queue in self._queues.items():
                current = list(queue)
                if not any(id(r) in held for r in before[request_class]):
                    continue
                present = set(map(id, current))
                known = set(map(id, before[request_class]))
                order = [r for r in current if id(r) not in known]
                order += [r for r in before[request_class]
                          if id(r) in present or id(r) in held]
                queue.remove_requests(current)
                for request in order:
                    queue.add_request(request)

        return restore

    def __bool__(self) -> bool:
        return any(self._queues.values())

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self) -> Iterator[Request]:
        for queue in self._queues.values():
            yield from queue

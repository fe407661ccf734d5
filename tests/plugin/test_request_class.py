"""Request classes: explicit vllm_xargs win, otherwise priority decides."""

from __future__ import annotations

from xllm_plugin.config import RequestClassConfig
from xllm_plugin.scheduler.request_class import classify

DEFAULTS = RequestClassConfig()


def test_plain_request_is_online_by_default() -> None:
    assert classify(0, None, DEFAULTS) == "online"


def test_default_class_applies_to_unmarked_requests() -> None:
    assert classify(0, {}, RequestClassConfig(default_class="offline")) == "offline"


def test_priority_at_or_above_threshold_is_offline() -> None:
    assert classify(1, None, DEFAULTS) == "offline"
    assert classify(5, None, RequestClassConfig(offline_min_priority=5)) == "offline"
    assert classify(4, None, RequestClassConfig(offline_min_priority=5)) == "online"


def test_urgent_priority_is_online_even_when_default_is_offline() -> None:
    assert classify(-1, None, RequestClassConfig(default_class="offline")) == "online"


def test_explicit_xarg_overrides_priority() -> None:
    assert classify(10, {"request_class": "online"}, DEFAULTS) == "online"
    assert classify(0, {"request_class": "offline"}, DEFAULTS) == "offline"


def test_unknown_xarg_value_is_ignored() -> None:
    assert classify(0, {"request_class": "batch"}, DEFAULTS) == "online"

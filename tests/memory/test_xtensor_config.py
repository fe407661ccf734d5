"""The xtensor flag: validated in one place, checked against the worker, hinted to the scheduler."""

from __future__ import annotations

import pytest

from xllm_plugin.config import XLLMConfigError, parse_xllm_config
from xllm_plugin.memory.wiring import (
    WORKER_CLS,
    check_worker,
    scheduler_lookahead_tokens,
    worker_cls_from_argv,
)


def test_xtensor_is_off_by_default_and_costs_nothing() -> None:
    config = parse_xllm_config({})
    assert config.xtensor is False
    assert scheduler_lookahead_tokens(config) == 0
    check_worker(config, None)  # no worker needed when off


def test_xtensor_needs_its_worker() -> None:
    config = parse_xllm_config({"xllm": {"xtensor": True}})
    with pytest.raises(XLLMConfigError, match=f"needs --worker-cls {WORKER_CLS}"):
        check_worker(config, None)
    with pytest.raises(XLLMConfigError):
        check_worker(config, "vllm.v1.worker.cpu_worker.CPUWorker")
    check_worker(config, WORKER_CLS)
    check_worker(config, "xllm_plugin.memory.vllm_worker.XTensorCPUWorker")


def test_worker_cls_is_read_from_the_command_line() -> None:
    argv = ["serve", "m", "--worker-cls", WORKER_CLS, "--block-size", "32"]
    assert worker_cls_from_argv(argv) == WORKER_CLS
    assert worker_cls_from_argv(["serve", "m"]) is None


def test_premap_asks_the_scheduler_for_one_token_ahead() -> None:
    on = parse_xllm_config({"xllm": {"xtensor": True}})
    off = parse_xllm_config({"xllm": {"xtensor": True, "xtensor_options": {"premap": False}}})
    assert scheduler_lookahead_tokens(on) == 1
    assert scheduler_lookahead_tokens(off) == 0


def test_bad_xtensor_option_is_named() -> None:
    with pytest.raises(XLLMConfigError, match="xllm.xtensor_options.map_budget_fraction"):
        parse_xllm_config({"xllm": {"xtensor_options": {"map_budget_fraction": 2}}})
    with pytest.raises(XLLMConfigError, match="unknown key 'xllm.xtensor_options.pages'"):
        parse_xllm_config({"xllm": {"xtensor_options": {"pages": 3}}})

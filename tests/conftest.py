"""Session-wide fixtures: models built offline, real ``vllm serve`` engines shared across tests.

Engines take ~30 s to start on two cores, so each kind is started once per
session and reused; tests must leave them in the state they found them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from xllm_plugin.launcher.cluster import LocalCluster
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port
from xllm_plugin.models import build_model

TINY_NAME = "tiny"
# Few run slots so that a handful of offline requests saturates an engine.
MAX_NUM_SEQS = 4
# float32 so that greedy equality checks compare scheduling, not bf16 rounding:
# a preempted request is recomputed by a prefill whose bf16 sums differ from the
# decode steps it replaces, and over hundreds of tokens that flips an argmax.
ENGINE_ARGS = ["--max-num-seqs", str(MAX_NUM_SEQS), "--dtype", "float32"]


@pytest.fixture(scope="session")
def engine_max_num_seqs() -> int:
    """Run slots of the session engines."""
    return MAX_NUM_SEQS


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_model("tiny")


@pytest.fixture(scope="session")
def plugin_and_stock_engines(tiny_model_dir: Path) -> Iterator[tuple[EngineProcess, EngineProcess]]:
    """One tiny-model engine with the plugin and one stock vLLM, started side by side,
    both with ``MAX_NUM_SEQS`` run slots."""
    specs = [
        EngineSpec(model=tiny_model_dir, port=free_port(), served_model_name=TINY_NAME,
                   plugin=True, xllm_config={"status_interval_ms": 20}, cpu_bind="0",
                   extra_args=ENGINE_ARGS),
        EngineSpec(model=tiny_model_dir, port=free_port(), served_model_name=TINY_NAME,
                   plugin=False, cpu_bind="1", extra_args=ENGINE_ARGS),
    ]
    with LocalCluster(specs) as cluster:
        yield cluster.engines[0], cluster.engines[1]


@pytest.fixture(scope="session")
def plugin_engine(plugin_and_stock_engines: tuple[EngineProcess, EngineProcess]) -> EngineProcess:
    return plugin_and_stock_engines[0]


@pytest.fixture(scope="session")
def stock_engine(plugin_and_stock_engines: tuple[EngineProcess, EngineProcess]) -> EngineProcess:
    return plugin_and_stock_engines[1]

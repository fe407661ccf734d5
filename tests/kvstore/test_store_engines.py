"""The global multi-tier KV cache on two real tiny-model ``vllm serve`` instances and a real
``mooncake_master``: a prefix computed on one instance is loaded by the other from Mooncake
Store, a prefix evicted from the engine comes back from the DRAM or SSD tier, greedy output
never changes, and the tier changes reach the router's index as KV events.

Run under ``flock /tmp/xllm-vllm.lock`` (two engines, two cores).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip("vllm")
pytest.importorskip("mooncake.store", reason="Mooncake Store needs mooncake-transfer-engine-non-cuda "
                                               "and libibverbs1")

from router.kv import BlockHasher, KVEventSubscriber, PrefixIndex, PromptTokenizer  # noqa: E402
from xllm_plugin.kvstore.launch import connector_args, kv_store_section  # noqa: E402
from xllm_plugin.kvstore.master import MooncakeMaster  # noqa: E402
from xllm_plugin.launcher.cluster import LocalCluster  # noqa: E402
from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port  # noqa: E402
from xllm_plugin.models import model_path  # noqa: E402

BLOCK_SIZE = 32
DRAM_MB = 1        # tiny model, float32: 32 KiB per block -> 32 DRAM slots
ENGINE_BLOCKS = 48  # engine KV cache: about two prompts
MODEL = "tiny"


def prompt(topic: str, n: int = 40) -> str:
    """About 700 tokens (21 full blocks) that share nothing with other topics."""
    return " ".join(f"{topic} note {i}: block {i} of the {topic} prefix stays cached." for i in range(n))


def post(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310 (loopback)
        raw = response.read()
    return json.loads(raw) if raw.strip() else {}


def complete(engine: EngineProcess, text: str) -> str:
    out = post(engine.url + "/v1/completions",
               {"model": MODEL, "prompt": text, "max_tokens": 12, "temperature": 0.0})
    return out["choices"][0]["text"]


def counters(engine: EngineProcess) -> dict[str, float]:
    """vLLM's prompt-token counters by source, and cached tokens by tier."""
    with urllib.request.urlopen(engine.url + "/metrics", timeout=10) as r:  # noqa: S310
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for family in ("vllm:prompt_tokens_by_source_total", "vllm:prompt_tokens_cached_by_source_total"):
            if line.startswith(family + "{"):
                source = line.split('source="', 1)[1].split('"', 1)[0]
                out[f"{family.split(':')[1].replace('_total', '')}.{source}"] = float(line.rsplit(" ", 1)[1])
    return out


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


EXTERNAL = "prompt_tokens_by_source.external_kv_transfer"


def wait_until(predicate: Any, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def store_cluster() -> Iterator[dict[str, Any]]:
    """mooncake_master + engines A (core 0) and B (core 1), each with the connector, a
    1 MiB DRAM tier, an SSD tier and KV events; A loads asynchronously, B synchronously;
    started once for this module."""
    ssd_dir = tempfile.mkdtemp(prefix="xllm-kvstore-ssd-")
    events = [(free_port(), free_port()) for _ in range(2)]
    with MooncakeMaster() as master:
        specs = []
        for i, (pub, replay) in enumerate(events):
            kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
                         "endpoint": f"tcp://*:{pub}", "replay_endpoint": f"tcp://*:{replay}"}
            # A loads asynchronously (the request waits between steps), B inside the step.
            section = kv_store_section(master.address, dram_mb=DRAM_MB, segment_mb=16,
                                       ssd_dir=ssd_dir, ssd_mb=4, async_load=(i == 0))
            specs.append(EngineSpec(
                model=model_path(MODEL), port=free_port(), served_model_name=MODEL, plugin=True,
                xllm_config={"kv_store": section}, block_size=BLOCK_SIZE, max_model_len=1024,
                cpu_bind=str(i),
                extra_args=[*connector_args(), "--kv-events-config", json.dumps(kv_events),
                            "--num-gpu-blocks-override", str(ENGINE_BLOCKS), "--dtype", "float32",
                            "--max-num-seqs", "4"],
                env={"VLLM_SERVER_DEV_MODE": "1"}))
        with LocalCluster(specs) as cluster:
            yield {"a": cluster.engines[0], "b": cluster.engines[1], "master": master,
                   "events": [(f"tcp://127.0.0.1:{p}", f"tcp://127.0.0.1:{r}") for p, r in events],
                   "ssd_dir": Path(ssd_dir)}
    shutil.rmtree(ssd_dir, ignore_errors=True)


def test_prompt_prefilled_on_a_is_served_on_b_with_its_prefix_from_the_store(store_cluster):
    a, b = store_cluster["a"], store_cluster["b"]
    text = prompt("harbour")
    expected = complete(a, text)
    before = counters(b)
    # A's puts run on its I/O thread after the step; B sees them within moments.
    got = None
    for _ in range(20):
        got = complete(b, text)
        after = counters(b)
        if delta(after, before, EXTERNAL) > 0:
            break
        post(b.url + "/reset_prefix_cache")  # recompute on B must not mask a late store hit
        time.sleep(0.3)
    assert delta(after, before, EXTERNAL) >= 20 * BLOCK_SIZE, after
    assert delta(after, before, "prompt_tokens_cached_by_source.p2p") >= 20 * BLOCK_SIZE
    assert got == expected


def test_engine_eviction_then_reload_from_the_dram_tier(store_cluster):
    a = store_cluster["a"]
    text = prompt("orchard")
    expected = complete(a, text)
    post(a.url + "/reset_prefix_cache")  # evict every block from the engine's KV cache
    before = counters(a)
    assert complete(a, text) == expected
    after = counters(a)
    assert delta(after, before, "prompt_tokens_cached_by_source.host") >= 20 * BLOCK_SIZE, after
    assert delta(after, before, "prompt_tokens_by_source.local_cache_hit") == 0


def test_dram_overflow_demotes_to_ssd_and_the_prefix_reloads_from_there(store_cluster):
    b = store_cluster["b"]
    first = prompt("glacier")
    expected = complete(b, first)
    for other in ("meadow", "canyon"):  # 42 more blocks through a 32-slot DRAM tier
        complete(b, prompt(other))
    post(b.url + "/reset_prefix_cache")
    before = counters(b)
    assert complete(b, first) == expected
    after = counters(b)
    assert delta(after, before, "prompt_tokens_cached_by_source.disk") > 0, after
    assert delta(after, before, EXTERNAL) >= 20 * BLOCK_SIZE
    assert any(store_cluster["ssd_dir"].rglob("*")), "no block file was written"


async def test_tier_changes_reach_the_router_index_as_kv_events(store_cluster):
    """The router learns from KV events alone which instance holds a prefix in which tier,
    and that the other instance can load it from the store."""
    a, b = store_cluster["a"], store_cluster["b"]
    (a_pub, a_replay), (b_pub, b_replay) = store_cluster["events"]
    index = PrefixIndex()
    subs = [KVEventSubscriber("a", a_pub, a_replay, index, topic="kv", expected_block_size=BLOCK_SIZE),
            KVEventSubscriber("b", b_pub, b_replay, index, topic="kv", expected_block_size=BLOCK_SIZE)]
    for sub in subs:
        await sub.start()
    try:
        text = prompt("lighthouse")
        hashes = BlockHasher(BLOCK_SIZE).hashes(PromptTokenizer.from_dir(model_path(MODEL))
                                                .completion_ids(text))
        await asyncio.to_thread(complete, a, text)
        await asyncio.to_thread(complete, b, "warm-up so that b has published a store block " * 30)

        def hits() -> dict[str, tuple[int, int, int, int]]:
            return index.tier_hits(hashes, ["a", "b"])

        deadline = time.monotonic() + 20
        while (hits().get("a", (0,))[0] < len(hashes) or hits().get("b", (0, 0, 0, 0))[3] < 20):
            assert time.monotonic() < deadline, (hits(), [s.stats for s in subs])
            await asyncio.sleep(0.1)
        assert hits()["a"][0] == len(hashes)         # all of it in a's engine KV cache
        assert index.store_members() == {"a", "b"}
        await asyncio.to_thread(post, a.url + "/reset_prefix_cache")
        await asyncio.to_thread(complete, a, "hi")   # flushes AllBlocksCleared
        deadline = time.monotonic() + 20
        while hits().get("a", (1,))[0] != 0:
            assert time.monotonic() < deadline, hits()
            await asyncio.sleep(0.1)
        # the engine cache is empty, a's DRAM tier still has the prefix
        assert hits()["a"][1] >= 20
    finally:
        for sub in subs:
            await sub.stop()

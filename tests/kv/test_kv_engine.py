"""End to end on one real tiny-model ``vllm serve``: the router's tokenizer + hasher name
exactly the blocks the engine announces in its KV events, and a prefix-cache reset
empties the index. Run engine tests under ``flock /tmp/xllm-vllm.lock``."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
import urllib.request

import pytest
import pytest_asyncio

from router.kv import BlockHasher, KVEventSubscriber, PrefixIndex, PromptTokenizer

pytestmark = pytest.mark.engine
pytest.importorskip("vllm")

BLOCK_SIZE = 32
HASH_SEED = "7"  # the engine's PYTHONHASHSEED: the router must be told the same seed


def _free(ports: range) -> int:
    candidates = list(ports)
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    pytest.skip(f"no free port in {ports}")


def post(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (loopback)
        raw = response.read()
    return json.loads(raw) if raw.strip() else {}


@pytest.fixture(scope="module")
def kv_engine():
    from xllm_plugin.launcher.engine import EngineProcess, EngineSpec
    from xllm_plugin.models import model_path

    pub, replay = _free(range(5650, 5675)), _free(range(5675, 5700))
    kv_config = {"enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
                 "endpoint": f"tcp://*:{pub}", "replay_endpoint": f"tcp://*:{replay}"}
    spec = EngineSpec(model=model_path("tiny"), port=_free(range(8150, 8200)), served_model_name="tiny",
                      plugin=False, block_size=BLOCK_SIZE, max_model_len=2048, cpu_bind="0",
                      extra_args=["--enable-prefix-caching", "--kv-events-config", json.dumps(kv_config)],
                      env={"PYTHONHASHSEED": HASH_SEED, "VLLM_SERVER_DEV_MODE": "1"})
    with EngineProcess(spec) as engine:
        yield engine, f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}"


@pytest_asyncio.fixture(loop_scope="function")
async def followed(kv_engine):
    engine, pub, replay = kv_engine
    index = PrefixIndex()
    sub = KVEventSubscriber("e0", pub, replay, index, topic="kv", expected_block_size=BLOCK_SIZE)
    await sub.start()
    post(engine.url + "/reset_prefix_cache")  # each test starts from an empty engine cache
    yield engine, index, sub
    await sub.stop()


@pytest.fixture(scope="module")
def tokenizer():
    from xllm_plugin.models import model_path
    return PromptTokenizer.from_dir(model_path("tiny"))


async def wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


PROMPT = " ".join(f"Fact {i}: the router keeps KV locality for block number {i}." for i in range(30))
MESSAGES = [{"role": "system", "content": "You answer with one word. " * 20},
            {"role": "user", "content": "Which instance holds my prefix? " * 10}]


def test_router_tokenization_equals_the_engines(kv_engine, tokenizer):
    engine, _, _ = kv_engine
    assert post(engine.url + "/tokenize", {"model": "tiny", "prompt": PROMPT})["tokens"] \
        == tokenizer.completion_ids(PROMPT)
    assert post(engine.url + "/tokenize", {"model": "tiny", "messages": MESSAGES,
                                           "add_generation_prompt": True})["tokens"] \
        == tokenizer.chat_ids(MESSAGES)


async def test_completion_prompt_blocks_appear_in_the_index_under_router_hashes(followed, tokenizer):
    engine, index, sub = followed
    ids = tokenizer.completion_ids(PROMPT)
    hashes = BlockHasher(BLOCK_SIZE, hash_seed=HASH_SEED).hashes(ids)
    assert len(hashes) == len(ids) // BLOCK_SIZE >= 8
    assert index.prefix_hits(hashes) == {}
    out = post(engine.url + "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert await wait_for(lambda: index.prefix_hits(hashes).get("e0") == len(hashes)), \
        (index.prefix_hits(hashes), sub.stats)
    assert sub.stats.block_size_seen == BLOCK_SIZE and sub.stats.decode_errors == 0
    # A request sharing only the first half of the prompt matches only that half.
    half = ids[: len(ids) // 2] + [11] * BLOCK_SIZE
    half_hashes = BlockHasher(BLOCK_SIZE, hash_seed=HASH_SEED).hashes(half)
    assert index.prefix_hits(half_hashes) == {"e0": (len(ids) // 2) // BLOCK_SIZE}


async def test_chat_request_blocks_match_and_reset_clears_them(followed, tokenizer):
    engine, index, sub = followed
    hashes = BlockHasher(BLOCK_SIZE, hash_seed=HASH_SEED).hashes(tokenizer.chat_ids(MESSAGES))
    post(engine.url + "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 2})
    assert await wait_for(lambda: index.prefix_hits(hashes).get("e0") == len(hashes)), \
        (index.prefix_hits(hashes), sub.stats)
    post(engine.url + "/reset_prefix_cache")
    # vLLM publishes KV events at the end of an engine step, so AllBlocksCleared
    # goes out with the next request's step: drive one with a sub-block prompt.
    post(engine.url + "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1})
    assert await wait_for(lambda: index.block_count("e0") == 0), index.block_count("e0")
    assert index.prefix_hits(hashes) == {}


async def test_wrong_seed_never_matches(followed, tokenizer):
    """The failure a misconfigured router would see: right tokens, wrong seed, no hits."""
    engine, index, _ = followed
    ids = tokenizer.completion_ids(PROMPT)
    post(engine.url + "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 1})
    right = BlockHasher(BLOCK_SIZE, hash_seed=HASH_SEED).hashes(ids)
    assert await wait_for(lambda: index.prefix_hits(right).get("e0") == len(right))
    assert index.prefix_hits(BlockHasher(BLOCK_SIZE).hashes(ids)) == {}

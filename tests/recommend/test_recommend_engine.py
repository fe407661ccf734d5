"""POST /xllm/v1/recommend and the catalog mask inside a real ``vllm serve`` (tiny model).

One engine serves both our route and stock vLLM's beam search, in float32 so that
equality with stock compares the search, not bf16 rounding. It loads the mask
processor, the KV-fork connector and ``--logprobs-mode processed_logprobs`` (the
mask's scores need it; for unmasked requests it equals raw log-probs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from xllm_plugin.launcher.engine import EngineProcess, EngineSpec, free_port
from xllm_plugin.recommend.catalog import Catalog, load_catalog, write_catalog
from xllm_plugin.recommend.synthetic import synthetic_items

pytestmark = pytest.mark.engine

MODEL = "tiny"
BLOCK = 32
FORK = {"kv_connector": "BeamForkConnector", "kv_role": "kv_both",
        "kv_connector_module_path": "xllm_plugin.recommend.kv_fork"}


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("catalogs")
    big = write_catalog(root / "big.npy", synthetic_items(5000, 3, 49152, codebook_size=64))
    small = write_catalog(root / "small.txt", synthetic_items(40, 3, 49152, codebook_size=8,
                                                                seed=5))
    return {"big": big, "small": small}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, catalogs: dict[str, Path]) -> Iterator[EngineProcess]:
    config = {"recommend": {"catalogs": {k: str(v) for k, v in catalogs.items()},
                            "max_beam_width": 64}}
    extra = ["--dtype", "float32", "--enable-prefix-caching", "--max-num-seqs", "128",
             "--max-logprobs", "128", "--logprobs-mode", "processed_logprobs",
             "--logits-processors", "xllm_plugin.recommend.logits:CatalogMaskProcessor",
             "--kv-transfer-config", json.dumps(FORK)]
    spec = EngineSpec(model=tiny_model_dir, port=free_port(), served_model_name=MODEL,
                      plugin=True, xllm_config=config, cpu_bind="0", block_size=BLOCK,
                      extra_args=extra,
                      env={"VLLM_PLUGINS": "xllm,xllm_status,xllm_recommend"})
    with EngineProcess(spec) as process:
        yield process


def _recommend(url: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/xllm/v1/recommend", json=body, timeout=120)


def _stock_beam_search(url: str, prompt: list[int], width: int) -> list[tuple[tuple[int, ...], float]]:
    body = {"model": MODEL, "prompt": prompt, "use_beam_search": True, "n": width,
            "max_tokens": 3, "ignore_eos": True, "temperature": 0.0, "return_token_ids": True,
            "logprobs": 1}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    reply.raise_for_status()
    return [(tuple(c["token_ids"]), sum(c["logprobs"]["token_logprobs"]))
            for c in reply.json()["choices"]]


def _fork_tokens(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(
        r"^vllm:external_prefix_cache_hits_total(?:{[^}]*})? ([0-9.eE+-]+)$", text, re.MULTILINE))


def test_mask_off_results_equal_stock_beam_search(engine: EngineProcess) -> None:
    rng = np.random.default_rng(0)
    forks_before = _fork_tokens(engine.url)
    forked = 0
    for length in (45, 64, 95):  # partial last block, block-aligned, partial again
        prompt = rng.integers(1000, 40000, length).tolist()
        for width in (4, 16):
            reply = _recommend(engine.url, prompt_token_ids=prompt, beam_width=width, num_tokens=3)
            assert reply.status_code == 200, reply.text
            ours = [(tuple(i["token_ids"]), i["score"]) for i in reply.json()["items"]]
            stock = _stock_beam_search(engine.url, prompt, width)
            assert [items for items, _ in ours] == [items for items, _ in stock]
            assert [s for _, s in ours] == pytest.approx([s for _, s in stock], abs=1e-3)
            forked += reply.json()["usage"]["forked"]
    # Forked beams took their parent's KV from the connector, and still matched stock.
    assert forked > 0
    assert _fork_tokens(engine.url) > forks_before


def test_every_returned_item_is_in_the_catalog(engine: EngineProcess,
                                               catalogs: dict[str, Path]) -> None:
    catalog = load_catalog(catalogs["big"])
    prompt = catalog.items[:20].reshape(-1).tolist()  # a "user history" of 20 items
    reply = _recommend(engine.url, prompt_token_ids=prompt, beam_width=32, top_k=32,
                       catalog="big", return_text=True)
    assert reply.status_code == 200, reply.text
    items = reply.json()["items"]
    assert len(items) == 32
    assert all(catalog.contains(item["token_ids"]) for item in items)
    assert len({tuple(item["token_ids"]) for item in items}) == 32
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)


def test_small_catalog_search_is_exhaustive_with_model_logprob_scores(
        engine: EngineProcess, catalogs: dict[str, Path]) -> None:
    catalog: Catalog = load_catalog(catalogs["small"])
    prompt = list(range(2000, 2050))
    reply = _recommend(engine.url, prompt_token_ids=prompt, beam_width=64, catalog="small")
    assert reply.status_code == 200, reply.text
    items = reply.json()["items"]
    # Every prefix fits in the beam, so the search keeps every item of the catalog...
    assert sorted(tuple(i["token_ids"]) for i in items) == sorted(map(tuple, catalog.items.tolist()))
    # ...and its score is the item's unmasked log-prob under the model (the mask's sink
    # keeps the softmax normaliser), checked against prompt logprobs of /v1/completions.
    for item in items[:5]:
        body = {"model": MODEL, "prompt": prompt + item["token_ids"], "max_tokens": 1,
                "echo": True, "logprobs": 0, "temperature": 0.0}
        reply = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=60).json()
        token_logprobs = reply["choices"][0]["logprobs"]["token_logprobs"]
        assert item["score"] == pytest.approx(sum(token_logprobs[len(prompt):len(prompt) + 3]),
                                              abs=1e-3)


def test_completions_with_the_catalog_in_vllm_xargs_produce_a_catalog_item(
        engine: EngineProcess, catalogs: dict[str, Path]) -> None:
    catalog = load_catalog(catalogs["big"])
    body = {"model": MODEL, "prompt": "Recommend the next item:", "max_tokens": 3,
            "temperature": 0.0, "return_token_ids": True, "vllm_xargs": {"xllm_catalog": "big"}}
    reply = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert catalog.contains(reply.json()["choices"][0]["token_ids"])


def test_bad_requests_are_rejected_with_a_reason(engine: EngineProcess) -> None:
    unknown = _recommend(engine.url, prompt_token_ids=[1, 2, 3], beam_width=4, catalog="nope")
    assert unknown.status_code == 400 and "unknown catalog 'nope'" in unknown.text
    too_wide = _recommend(engine.url, prompt_token_ids=[1, 2, 3], beam_width=65, num_tokens=3)
    assert too_wide.status_code == 400 and "max_beam_width" in too_wide.text
    no_length = _recommend(engine.url, prompt="hi", beam_width=4)
    assert no_length.status_code == 400 and "num_tokens" in no_length.text
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "vllm_xargs": {"xllm_catalog": "nope"}}
    plain = httpx.post(f"{engine.url}/v1/completions", json=body, timeout=60)
    assert plain.status_code == 400 and "unknown catalog" in plain.text

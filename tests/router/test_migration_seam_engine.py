"""A stream that breaks inside a character resumes on a real vLLM engine with the right text.

The first instance is a fake that replays the tiny model's tokens for " hello" and the
first of the two byte tokens of "北" (its text held back, as vLLM holds it), then drops the
connection. The router resumes on the stock engine, whose detokenizer, primed with a
prompt that ends mid-character, emits the whole prompt's text with its first output; the
router must replace that text with the seam's own (router/server/migration.py). Run under
``flock /tmp/xllm-vllm.lock``.
"""

from __future__ import annotations

import json

import pytest
import tokenizers

from router_fakes import FakeBehaviour, FakeEngine, wait_for

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

PROMPT = "Tell me a story:"


async def test_resumed_text_after_a_seam_inside_a_character(stock_engine, tiny_model_dir,
                                                            start_router, client) -> None:
    tok = tokenizers.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    prompt_ids = tok.encode(PROMPT).ids
    hello = tok.encode(" hello").ids
    split = tok.encode("北").ids
    assert len(split) == 2 and tok.decode(split[:1]) == "\ufffd"  # a character in two tokens
    fake = FakeEngine("broken", FakeBehaviour(
        scripted=[*((t, tok.decode([t])) for t in hello), (split[0], "")],
        scripted_prompt_ids=prompt_ids))
    await fake.start()
    try:
        router, url = await start_router(instances=[f"{fake.url};id=broken",
                                                    f"{stock_engine.url};id=stock"])
        await wait_for(lambda: all(i.healthy for i in router.load.instances.values()), 30,
                       "both instances healthy")
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                "stream": True, "return_token_ids": True}
        seen = 0
        for _ in range(2):  # round robin: one of the two starts on the broken instance
            async with client.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()
                ids: list[int] = []
                text = []
                async for line in r.content:
                    line = line.strip()
                    if line.startswith(b"data: {"):
                        for choice in json.loads(line[6:])["choices"]:
                            ids.extend(choice.get("token_ids") or ())
                            text.append(choice.get("text") or "")
            if r.headers["x-xllm-instance"] != "broken":
                continue
            seen += 1
            assert ids[:len(hello) + 1] == [*hello, split[0]] and len(ids) == 12
            assert "".join(text) == tok.decode(ids)  # and no prompt text in it
        assert seen == 1
    finally:
        await fake.stop()

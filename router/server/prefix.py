"""KV locality for the live router: tokens -> block hashes -> prefix hits, and KV-event feeds.

Only requests routed by a policy that reads ``ClusterView.prefix_hits`` pay for
tokenizing and hashing. The KV index is fed by one ``KVEventSubscriber`` per
instance that advertises a KV-event endpoint (``--instances URL;kv=...`` or the
etcd value's ``kv_events_endpoint``).

``router.kv`` is imported lazily so the server runs (without KV-aware routing)
where that package or its tokenizer is unavailable.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from router.server.requests import ParsedRequest

log = logging.getLogger("xllm.router.prefix")

# Policies that read ClusterView.prefix_hits even without declaring ``uses_prefix_hits``.
PREFIX_POLICIES = frozenset({"kv_aware"})


def policy_uses_prefix_hits(policy: Any) -> bool:
    declared = getattr(policy, "uses_prefix_hits", None)
    return bool(declared) if declared is not None else getattr(policy, "name", "") in PREFIX_POLICIES


class PrefixLookup:
    """Tokenizes a request, hashes its full blocks and asks the index who holds them."""

    def __init__(self, *, block_size: int, tokenizer_dir: Path | None = None,
                 hash_seed: str | None = None, hash_algo: str = "sha256") -> None:
        from router.kv.hashing import BlockHasher
        from router.kv.index import PrefixIndex

        self.block_size = block_size
        self.hasher = BlockHasher(block_size, hash_seed, algorithm=hash_algo)
        self.index = PrefixIndex()
        self.tokenizer: Any = None
        if tokenizer_dir is not None:
            from router.kv.tokenize import PromptTokenizer

            self.tokenizer = PromptTokenizer.from_dir(tokenizer_dir)
        self._subscribers: dict[str, Any] = {}
        self._warned_no_tokenizer = False

    def token_ids(self, parsed: ParsedRequest) -> list[int] | None:
        """The prompt's token ids as the engine will see them, or None if unknown."""
        if parsed.prompt_token_ids is not None:
            return parsed.prompt_token_ids
        if self.tokenizer is None:
            if not self._warned_no_tokenizer:
                log.warning("KV-aware routing without --tokenizer: only token-id prompts get "
                            "prefix hits")
                self._warned_no_tokenizer = True
            return None
        if parsed.kind == "chat":
            return list(self.tokenizer.chat_ids(parsed.body["messages"]))
        prompt = parsed.body.get("prompt")
        if isinstance(prompt, str):
            return list(self.tokenizer.completion_ids(prompt))
        return None  # batched prompts: no single prefix to look up

    def lookup(self, parsed: ParsedRequest) -> tuple[int | None, tuple[int, ...], dict[str, int]]:
        """(prompt tokens or None, block hashes, instance id -> leading blocks cached)."""
        ids = self.token_ids(parsed)
        if ids is None:
            return None, (), {}
        salt = parsed.body.get("cache_salt")
        hashes = self.hasher.hashes(ids, salt if isinstance(salt, str) else None)
        return len(ids), hashes, (self.index.prefix_hits(hashes) if hashes else {})

    def tier_hits(self, hashes: tuple[int, ...], instance_ids: Any) -> dict[str, Any]:
        """instance id -> ``TierHits`` for the request's blocks; empty without tier data."""
        if not hashes:
            return {}
        from router.policies.types import TierHits

        return {i: TierHits(*counts)
                for i, counts in self.index.tier_hits(hashes, instance_ids).items()}

    # -- event feeds ------------------------------------------------------------------------

    def subscribe(self, instance_id: str, endpoint: str, replay_endpoint: str | None) -> None:
        from router.kv.events import KVEventSubscriber

        self.unsubscribe(instance_id)
        subscriber = KVEventSubscriber(instance_id, endpoint, replay_endpoint, self.index)
        self._subscribers[instance_id] = subscriber
        asyncio.get_running_loop().create_task(subscriber.start())
        log.info("subscribed to KV events of %s at %s", instance_id, endpoint)

    def unsubscribe(self, instance_id: str) -> None:
        subscriber = self._subscribers.pop(instance_id, None)
        if subscriber is not None:
            asyncio.get_running_loop().create_task(subscriber.stop())
        self.index.remove_instance(instance_id)

    async def close(self) -> None:
        subscribers, self._subscribers = list(self._subscribers.values()), {}
        await asyncio.gather(*(s.stop() for s in subscribers), return_exceptions=True)

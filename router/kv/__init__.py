"""KV-cache locality for routing: vLLM block hashes, a prefix index fed by KV events,
and the router-side tokenizer that turns a request into the token ids vLLM hashes.

``hashing``, ``index`` and ``tokenize`` are pure; ``events`` is the only I/O (ZMQ).
"""

from router.kv.events import KVEventSubscriber
from router.kv.hashing import BlockHasher
from router.kv.index import PrefixIndex
from router.kv.tokenize import PromptTokenizer

__all__ = ["BlockHasher", "KVEventSubscriber", "PrefixIndex", "PromptTokenizer"]

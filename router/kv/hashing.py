"""vLLM-compatible prefix-cache block hashes, recomputed in the router from token ids.

vLLM (v1, ``vllm/v1/core/kv_cache_utils.py``) names every *full* KV block of a
prompt by a hash chained over the whole prefix up to that block::

    h_0 = H(seed)                                   # "NONE_HASH"
    h_i = H((h_{i-1}, tuple(tokens of block i), extra_keys_i))   for i = 1..n

where ``H`` is ``--prefix-caching-hash-algo`` (default ``sha256``:
``sha256(pickle.dumps(obj, HIGHEST_PROTOCOL))``; ``sha256_cbor``: sha256 over
canonical CBOR), ``seed`` is ``PYTHONHASHSEED`` if the engine has it set and
``"vllm-none-hash"`` otherwise, and ``extra_keys`` is ``None`` for plain text
(``(("cache_salt", salt),)`` on the first block of a salted request). The
parent in the chain is the full digest; KV events publish only its low 64 bits
as an unsigned int (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, the default),
and so does :meth:`BlockHasher.hashes`.

Not covered: LoRA, multimodal and prompt-embeds extra keys, and the ``xxhash``
algorithms (their seed is random per process unless ``PYTHONHASHSEED`` is set).
Hybrid models whose ``hash_block_size`` differs from the block size must pass
the hash block size.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_HASH_SEED = "vllm-none-hash"
"""vLLM's seed for the first parent when ``PYTHONHASHSEED`` is unset."""

_LOW64 = (1 << 64) - 1


def _sha256_pickle(obj: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(obj: Any) -> bytes:
    try:
        import cbor2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ValueError("hash algorithm 'sha256_cbor' needs the cbor2 package") from exc
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


HASH_FUNCTIONS: dict[str, Callable[[Any], bytes]] = {
    "sha256": _sha256_pickle,
    "sha256_cbor": _sha256_cbor,
}


def to_event_hash(digest: bytes) -> int:
    """The form KV events publish: the digest's low 64 bits, unsigned."""
    return int.from_bytes(digest, "big") & _LOW64


class BlockHasher:
    """Recomputes the block hashes a vLLM engine assigns to a prompt.

    ``block_size`` and ``hash_seed`` (the engine's ``PYTHONHASHSEED``, or None
    when it is unset) and ``algorithm`` must match the engine, or no hash will
    ever match its KV events.
    """

    def __init__(self, block_size: int, hash_seed: str | None = None,
                 algorithm: str = "sha256") -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        try:
            self._hash = HASH_FUNCTIONS[algorithm]
        except KeyError:
            raise ValueError(f"unsupported hash algorithm '{algorithm}'; "
                             f"choose one of {', '.join(HASH_FUNCTIONS)}") from None
        self.block_size = block_size
        self.hash_seed = DEFAULT_HASH_SEED if hash_seed is None else hash_seed
        self.algorithm = algorithm
        self._none_hash = self._hash(self.hash_seed)

    def digests(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        """Full digests of every complete block of ``token_ids``, in order."""
        size = self.block_size
        parent = self._none_hash
        out: list[bytes] = []
        for start in range(0, len(token_ids) - size + 1, size):
            extra = (("cache_salt", cache_salt),) if cache_salt and start == 0 else None
            parent = self._hash((parent, tuple(token_ids[start:start + size]), extra))
            out.append(parent)
        return out

    def hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> tuple[int, ...]:
        """Event-form hashes (low 64 bits) of every complete block, in order.

        A trailing partial block has no hash: vLLM caches full blocks only.
        """
        return tuple(to_event_hash(d) for d in self.digests(token_ids, cache_salt))

"""Generative recommendation on vLLM: catalog-constrained, fast fixed-step beam search.

An item of a generative recommender (OneRec/TIGER style) is a fixed-length tuple of
tokens, and only the tuples in a catalog are valid items. This package provides:

- ``catalog``: the catalog as sorted arrays (a flat trie), loaded once per file;
- ``topk``: the host-side beam selection (bounded min-heap, early termination);
- ``logits``: a vLLM v1 logits processor that masks logits to catalog continuations;
- ``kv_fork``: a KV connector that forks a beam's KV blocks inside the engine;
- ``driver``: the beam search that keeps each beam as a live vLLM session;
- ``endpoint``: ``POST /xllm/v1/recommend`` on ``vllm serve`` (endpoint plugin);
- ``cli``: ``xllm-recommend`` (synthetic catalogs and a workload generator).

Only ``catalog``, ``topk``, ``protocol`` and ``workload`` are importable without vLLM.
See ``README.md`` beside this file.
"""

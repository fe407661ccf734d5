"""Synthetic catalogs and user histories for generative recommendation (numpy only).

Items follow the semantic-ID layout of OneRec/TIGER-style recommenders: an item is
``tokens_per_item`` codes, and each position draws from its own codebook of
``codebook_size`` token ids, so positions never share tokens. With
``codebook_size=0`` every position draws from the whole usable vocabulary, the
hardest case for the mask (wide first level). Codes are drawn with a Zipf-like
skew so that some first-level codes have many items, as real catalogs do.
"""

from __future__ import annotations

import numpy as np

from xllm_plugin.recommend.catalog import Catalog

FIRST_USABLE_TOKEN = 1000  # skip the tokenizer's special and byte tokens


def codebooks(vocab_size: int, tokens_per_item: int, codebook_size: int,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Token ids each item position may use (disjoint per position unless ``codebook_size`` is 0)."""
    usable = np.arange(FIRST_USABLE_TOKEN, vocab_size)
    if codebook_size <= 0:
        return [usable] * tokens_per_item
    if codebook_size * tokens_per_item > len(usable):
        raise ValueError(f"{tokens_per_item} codebooks of {codebook_size} tokens do not fit in a "
                         f"vocabulary of {vocab_size}")
    chosen = rng.choice(usable, size=codebook_size * tokens_per_item, replace=False)
    return [np.sort(chosen[i * codebook_size:(i + 1) * codebook_size])
            for i in range(tokens_per_item)]


def synthetic_items(num_items: int, tokens_per_item: int, vocab_size: int,
                    codebook_size: int = 256, zipf: float = 1.1, seed: int = 0) -> np.ndarray:
    """``num_items`` distinct items as an int32 array of shape (num_items, tokens_per_item)."""
    rng = np.random.default_rng(seed)
    books = codebooks(vocab_size, tokens_per_item, codebook_size, rng)
    capacity = float(np.prod([len(b) for b in books], dtype=np.float64))
    if num_items > capacity / 2:
        raise ValueError(f"{num_items} items do not fit comfortably in {capacity:.0f} code "
                         "combinations; raise codebook_size or tokens_per_item")
    found: np.ndarray = np.empty((0, tokens_per_item), dtype=np.int32)
    while len(found) < num_items:
        batch = 2 * (num_items - len(found)) + 16
        columns = []
        for position, book in enumerate(books):
            if position == 0 and zipf > 0:  # skewed first level: popular "categories"
                ranks = np.arange(1, len(book) + 1, dtype=np.float64)
                weights = ranks ** -zipf
                columns.append(book[rng.choice(len(book), size=batch, p=weights / weights.sum())])
            else:
                columns.append(book[rng.integers(0, len(book), size=batch)])
        found = np.unique(np.concatenate([found, np.stack(columns, axis=1).astype(np.int32)]),
                          axis=0)
    keep = rng.choice(len(found), size=num_items, replace=False)
    return found[np.sort(keep)]


def user_history(catalog: Catalog, num_items: int, rng: np.random.Generator) -> list[int]:
    """A prompt made of ``num_items`` random catalog items, as a user's interaction history."""
    rows = rng.integers(0, catalog.num_items, size=num_items)
    return catalog.items[rows].reshape(-1).astype(int).tolist()

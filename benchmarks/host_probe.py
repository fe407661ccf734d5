"""The host's speed right now, from a fixed float32 workload shaped like a model's decode step.

On the shared 2-core hosts these benchmarks run on, every step of an engine moved by up to
27% between rounds of one run (results/spec_interleaved.md), far more than the differences
between the configurations compared. Timing the same workload between an engine's cells
(engine idle) gives a speed factor per cell. ``spec_adaptive.py`` fits on each run how far
throughput follows it (an elasticity: 0.54 and 0.37 in the two runs of 2026-12-06) and reports every cell
at the run's median host speed; whether that helps is checked by the result itself:
corrected throughputs of one cell should scatter less between repetitions than raw ones.

The workload: every linear layer of the model (shapes from its ``config.json``) applied to
one row and to 32 rows (a decode step at batch 1 reads all weights once, memory-bound; at
batch 32 the same weights do 32 times the arithmetic). Attention, sampling and Python are
left out.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path

import torch

BATCHES = (1, 32)


@functools.lru_cache(maxsize=1)
def _weights(config_path: str) -> tuple[torch.Tensor, ...]:
    config = json.loads(Path(config_path).read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get(
        "num_key_value_heads", config["num_attention_heads"])
    kv = hidden * kv_heads // heads
    generator = torch.Generator().manual_seed(0)
    layer = [(hidden + 2 * kv, hidden), (hidden, hidden), (2 * inner, hidden), (hidden, inner)]
    shapes = layer * config["num_hidden_layers"] + [(config["vocab_size"], hidden)]
    return tuple(torch.randn(shape, generator=generator) for shape in shapes)


def probe_ms(model_dir: Path, passes: int = 7) -> float:
    """Milliseconds for one pass at each batch size in ``BATCHES`` (median of ``passes``)."""
    weights = _weights(str(model_dir / "config.json"))
    total = 0.0
    with torch.inference_mode():
        for batch in BATCHES:
            times = []
            for _ in range(passes):
                start = time.perf_counter()
                for weight in weights:
                    torch.mm(torch.ones(batch, weight.shape[1]), weight.T)
                times.append(time.perf_counter() - start)
            total += statistics.median(times)
    return 1000 * total

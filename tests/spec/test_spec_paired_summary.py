"""spec_paired's summary: ratios read within each back-to-back pair, so a host that slows
down between pairs (but not within one) leaves them as they are."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import spec_paired as paired  # noqa: E402

# Throughput at nominal host speed, by configuration (scaled by c in every cell).
TRUE_TPS = {"none": 10.0, "k2": 12.0, "k4": 13.0, "k8": 13.5, "table": 13.2,
            "adaptive": 13.4}
SETS = ("repetitive", "sharegpt")


def paired_rows(pairs: int = 3) -> list[dict]:
    """Every pair runs on a host slowed by its own factor (up to 1.5x), the same for both
    of its sides; the sharegpt cells at c=4 favour k4 over the candidate."""
    rng = random.Random(7)
    rows = []
    for peer in paired.PEERS:
        for pair in range(pairs):
            for prompt_set in SETS:
                for c in (1, 4):
                    slowdown = rng.uniform(1.0, 1.5)
                    for side, config in (("candidate", "adaptive"), ("peer", peer)):
                        tps = TRUE_TPS[config] * c / slowdown
                        if (prompt_set, c, config) == ("sharegpt", 4, "k4"):
                            tps *= 1.1
                        rows.append({"peer": peer, "pair": pair, "side": side,
                                     "set": prompt_set, "c": c, "tps": tps,
                                     "texts": ["a", "b" if side == "peer" else "c"]})
    return rows


def test_pairs_cancel_the_drift_between_them() -> None:
    out = paired.summarize(paired_rows())
    assert math.isclose(out["ratio_vs_k8_repetitive_c1"], 13.4 / 13.5)
    assert math.isclose(out["ratio_vs_k8_repetitive_c1_paired_min"],
                        out["ratio_vs_k8_repetitive_c1_paired_max"])
    assert math.isclose(out["ratio_vs_none_min"], 1.34)


def test_headline_is_the_worst_static_peer_over_both_sets() -> None:
    out = paired.summarize(paired_rows())
    assert out["best_static_repetitive_c4"] == "k8"
    assert out["best_static_sharegpt_c4"] == "k4"
    assert math.isclose(out["ratio_vs_best_static_c4"], 13.4 / (13.0 * 1.1))
    assert math.isclose(out["ratio_vs_best_static_c1"], 13.4 / 13.5)
    assert math.isclose(out["ratio_vs_table_c1"], 13.4 / 13.2)


def test_texts_compared_within_a_pair_and_left_out_without_them() -> None:
    rows = paired_rows()
    assert paired.summarize(rows)["same_texts_as_peer"] == 0.5
    stripped = [{k: v for k, v in row.items() if k != "texts"} for row in rows]
    assert "same_texts_as_peer" not in paired.summarize(stripped)


def test_sides_alternate_over_cells_pairs_and_peers() -> None:
    firsts = [paired.side_order(p, pair, cell)[0]
              for p in range(2) for pair in range(2) for cell in range(4)]
    assert firsts.count("candidate") == firsts.count("peer")
    assert paired.side_order(0, 0, 0) != paired.side_order(0, 0, 1)
    assert paired.side_order(0, 0, 0) != paired.side_order(0, 1, 0)
    assert paired.side_order(0, 0, 0) != paired.side_order(1, 0, 0)


def test_plugin_k_candidate_fixes_k_per_request() -> None:
    assert paired.bench.request_body("plugin-k8") == {"vllm_xargs": {"spec_k": 8}}
    assert paired.bench.request_body("adaptive") is None


def test_the_label_names_a_candidate_k_other_than_eight() -> None:
    assert paired._label({"candidate": 'adaptive:step_log="/tmp/x.jsonl"'}) == "adaptive"
    assert paired._label({"candidate": "plugin-k4", "candidate_max_k": 4}) == "plugin-k4 (K <= 4)"

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


def test_side_by_side_swaps_the_cores_every_pair_and_peer() -> None:
    cores = (0, 1)
    seen = [paired.cores_of(peer, pair, cores) for peer in range(2) for pair in range(2)]
    assert seen == [(0, 1), (1, 0), (1, 0), (0, 1)]
    # Over an even number of pairs each side spends as many pairs on either core.
    candidate_cores = [paired.cores_of(0, pair, cores)[0] for pair in range(4)]
    assert candidate_cores.count(0) == candidate_cores.count(1) == 2


def test_pair_spread_pools_each_cells_scatter_about_its_own_mean() -> None:
    # Two cells at different levels, each pair 10% either side of its cell's mean in logs.
    high, low = math.exp(0.1), math.exp(-0.1)
    spread = paired.pair_spread([[2 * high, 2 * low], [0.5 * high, 0.5 * low], [1.3]])
    assert math.isclose(spread["pair_sd_log"], math.sqrt(4 * 0.01 / 2))
    assert math.isclose(spread["cell_se_log"], spread["pair_sd_log"] / math.sqrt(2))
    assert paired.pair_spread([[1.0], [2.0]]) == {}


def test_summary_reports_the_spread_of_its_pairs() -> None:
    out = paired.summarize(paired_rows())
    # Every pair's ratio equals its cell's (the drift is common to both sides): no spread.
    assert out["pair_sd_log"] < 1e-9


def test_a_peer_named_twice_pools_the_pairs_of_both_engines() -> None:
    rows = []
    for engine, peer_speed in enumerate((10.0, 11.0)):  # two engines of one configuration
        for pair in range(2):
            rows += [{"peer": "k4", "engine": engine, "pair": pair, "side": "candidate",
                      "set": "sharegpt", "c": 4, "tps": 10.5},
                     {"peer": "k4", "engine": engine, "pair": pair, "side": "peer",
                      "set": "sharegpt", "c": 4, "tps": peer_speed}]
    out = paired.summarize(rows)
    assert math.isclose(out["ratio_vs_k4_sharegpt_c4"], math.sqrt(10.5 / 10.0 * 10.5 / 11.0))
    assert math.isclose(out["ratio_vs_k4_sharegpt_c4_paired_min"], 10.5 / 11.0)

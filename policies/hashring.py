"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam).

A ring of virtual nodes; a key goes to the first replica clockwise from its
hash whose load is below the bound ``policies.load.load_bound`` (capacity
ceil((1 + eps) * (active + 1) / n), HAProxy's ``hash-balance-factor``). With
eps = inf it is plain ring hashing. Removing one replica moves only the keys
it owned (plus any spill-over its removal causes), which is what keeps
prefix caches warm across membership changes.

Immutable once built (Finagle: distributors are rebuilt on membership
change, never mutated): its user builds one over the fleet's names when the
membership changes and makes replicas that may not take a key read as full
in ``pick``.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable

# Virtual nodes per replica: with 100 the largest arc share over 8 replicas is
# within ~15% of the mean (Karger et al.'s O(log n) points per node); more
# costs memory and build time for little gain.
DEFAULT_VNODES = 100
_MASK = (1 << 64) - 1
# 2^64 / golden ratio: spreads keys that are already hashes but may be
# correlated in their low bits (Fibonacci hashing).
_GOLDEN = 0x9E3779B97F4A7C15


def _point(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "big")


def mix(key: int) -> int:
    """A 64-bit ring position for an integer key."""
    return ((key & _MASK) * _GOLDEN) & _MASK


class BoundedLoadRing:
    __slots__ = ("_members", "_owners", "_points")

    def __init__(self, names: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        members = frozenset(names)
        pairs = sorted((_point(f"{name}#{i}"), name) for name in members for i in range(vnodes))
        self._points = [p for p, _ in pairs]
        self._owners = [n for _, n in pairs]
        self._members = len(members)

    def owner(self, key: int) -> str | None:
        """Plain consistent hashing: the first virtual node clockwise."""
        if not self._points:
            return None
        i = bisect_left(self._points, mix(key))
        return self._owners[i % len(self._owners)]

    def pick(self, key: int, load: Callable[[str], int], bound: int) -> str | None:
        """First replica clockwise whose ``load(name)`` is below ``bound``; None if none."""
        owners = self._owners
        m = len(owners)
        if m == 0:
            return None
        start = bisect_left(self._points, mix(key))
        seen: set[str] = set()
        for step in range(m):
            name = owners[(start + step) % m]
            if name in seen:
                continue
            if load(name) < bound:
                return name
            seen.add(name)
            if len(seen) == self._members:
                break
        return None


def rendezvous(
    key: str, names: Iterable[str], weight: Callable[[str], float] | None = None
) -> str | None:
    """Highest-random-weight hashing (Thaler and Ravishankar): the name whose
    hash with ``key`` scores highest, or None if ``names`` is empty.

    Any two callers with the same ``names`` agree without talking to each
    other, and removing a name moves only the keys it owned, so gateways
    that lost their shared session store still send a session to the same
    replica. With ``weight``, a name of weight w wins a share w / sum of the
    keys (the logarithmic method: score = w / -ln(u), u uniform in (0, 1)).
    """
    best: str | None = None
    best_score = -1.0
    for name in names:
        h = _point(f"{key}\0{name}")
        if weight is None:
            score = float(h)
        else:
            u = (h + 1) / (_MASK + 2)  # in (0, 1)
            w = weight(name)
            score = w / -math.log(u) if w > 0 else 0.0
        if score > best_score or (score == best_score and best is not None and name < best):
            best, best_score = name, score
    return best

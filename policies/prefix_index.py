"""Which replica probably holds which prompt prefix: an approximate KV-cache map.

The gateway cannot see a replica's cache, so it remembers what it sent
there (llm-d's "approximate prefix-cache" scorer; SGLang's router keeps a
radix tree per worker for the same purpose). Each replica gets an LRU of the
prefix-block hashes (policies/prefix.py) of requests routed to it, with a
capacity that stands in for its KV cache; a reverse map from block hash to
replicas answers "who has the longest prefix of this prompt" in O(log k)
dictionary lookups for a k-block prompt.

Why binary search is right: block hashes are chained (block i's hash covers
blocks 0..i), and a request's blocks are inserted together, so a replica that
holds block i almost always holds 0..i-1. The deepest block any candidate
holds is found by bisection on the block index; its owners are the
longest-match replicas. (LRU eviction can break prefix closure at the edges;
the answer is then a slightly shorter match, never a wrong one.)

Pure: no clock, no I/O; state is bounded by ``capacity_blocks`` per replica
and by the number of replicas tracked (the caller forgets replicas that
left).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

# Per-replica memory in blocks: 4,096 blocks x 64 tokens = 262k tokens, the
# order of one 8B replica's KV cache on an 80 GB GPU (Llama-3-8B in BF16:
# 128 KiB of KV per token, so the ~56 GB left after weights hold ~430k tokens).
# A smaller guess errs towards forgetting.
DEFAULT_CAPACITY_BLOCKS = 4096
# Blocks of one prompt that are remembered: affinity on the first 16k tokens
# is as good as on all of them, and it bounds on_dispatch's cost.
DEFAULT_MAX_BLOCKS = 256


class PrefixIndex:
    __slots__ = ("_lru", "_owners", "capacity_blocks", "max_blocks")

    def __init__(
        self,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        self.capacity_blocks = capacity_blocks
        self.max_blocks = max_blocks
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._owners: dict[int, set[str]] = {}

    def insert(self, replica: str, hashes: Sequence[int]) -> None:
        """Remember that ``replica`` now holds these blocks (most recent last)."""
        lru = self._lru.get(replica)
        if lru is None:
            lru = self._lru[replica] = OrderedDict()
        owners = self._owners
        for h in hashes[: self.max_blocks]:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            s = owners.get(h)
            if s is None:
                owners[h] = {replica}
            else:
                s.add(replica)
        over = len(lru) - self.capacity_blocks
        for _ in range(max(0, over)):
            old, _none = lru.popitem(last=False)
            s = owners.get(old)
            if s is not None:
                s.discard(replica)
                if not s:
                    del owners[old]

    def longest_match(
        self, hashes: Sequence[int], names: set[str] | None = None
    ) -> tuple[int, set[str]]:
        """(depth, owners): the most leading blocks any replica in ``names`` (all
        if None) holds, and which of them hold that many. (0, empty) if none."""
        owners = self._owners
        hashes = hashes[: self.max_blocks]

        def holders(i: int) -> set[str]:
            s = owners.get(hashes[i])
            if not s:
                return set()
            return s if names is None else s & names

        lo, hi = 0, len(hashes)  # invariant: depth lo is held (0 trivially), hi+1 is not
        best: set[str] = set()
        if hi == 0 or not holders(0):
            return 0, best
        while lo < hi:
            mid = (lo + hi + 1) // 2  # depth mid means blocks 0..mid-1
            s = holders(mid - 1)
            if s:
                lo, best = mid, s
            else:
                hi = mid - 1
        return lo, best

    def match_depths(self, hashes: Sequence[int], names: set[str] | None = None) -> dict[str, int]:
        """Every replica's (in ``names``) count of leading blocks held; absent = 0.

        Owner sets are nested along the prompt (prefix closure), so a replica's
        depth is where it drops out of them. Bisect on the block index and only
        descend where the set shrinks: O(distinct depths x log k) set reads,
        not O(replicas x k) (a shared system prompt held by 1,000 replicas
        costs a few lookups, not 1,000 per block).
        """
        owners = self._owners
        hashes = hashes[: self.max_blocks]
        k = len(hashes)
        out: dict[str, int] = {}
        if k == 0:
            return out
        cache: dict[int, set[str]] = {}

        def held(i: int) -> set[str]:
            s = cache.get(i)
            if s is None:
                raw = owners.get(hashes[i])
                s = set() if not raw else (set(raw) if names is None else raw & names)
                cache[i] = s
            return s

        first, last = held(0), held(k - 1)
        if not first:
            return out
        for r in last:
            out[r] = k
        stack = [(0, k - 1)]
        while stack:
            a, b = stack.pop()
            sa, sb = held(a), held(b)
            if len(sa) == len(sb):
                continue
            if b == a + 1:
                for r in sa - sb:
                    out[r] = a + 1
                continue
            m = (a + b) // 2
            stack.append((a, m))
            stack.append((m, b))
        return out

    def forget(self, keep: Iterable[str]) -> None:
        """Drop every replica not in ``keep`` (membership changed)."""
        keep = set(keep)
        for name in [n for n in self._lru if n not in keep]:
            for h in self._lru.pop(name):
                s = self._owners.get(h)
                if s is not None:
                    s.discard(name)
                    if not s:
                        del self._owners[h]

    def replicas(self) -> int:
        return len(self._lru)

    def blocks(self, replica: str) -> int:
        lru = self._lru.get(replica)
        return 0 if lru is None else len(lru)

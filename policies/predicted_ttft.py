"""Predicted time to first token: the replica that would answer first, cache and queue counted.

When to use: prompts of very different lengths that share prefixes
(multi-turn chat, agents, RAG over shared documents, the Mooncake trace):
neither a request count (queue_depth) nor a cache match alone (prefix_affinity)
knows that a replica with two 30k-token prompts queued is busier than one
with ten 200-token prompts, or that a 20k-token prompt costs 500 tokens of
prefill on the replica that holds its first 19.5k and 20k tokens elsewhere.

Formula. For each candidate r, a cost in seconds:

    cost(r) = (queued_r + uncached_weight x uncached_r) x s_r / weight_r

With ``uncached_weight`` = 1 that is the predicted TTFT itself. The default,
4, also charges the request for the prefill it adds to the replica: every
later request there waits behind it, and a miss copies a prefix the fleet
already holds into a second cache. Greedy TTFT alone gave up half the cache
hits on the Mooncake trace (hit rate 13% vs prefix_affinity's 29%, mean TTFT
20% behind it); at 4 it keeps most of them (25%) and beats both
(docs/policies.md has the table). The minimum cost wins; costs within
``slack_tokens`` x s of it count as equal, and among them the shorter
``LoadView.queue_depth`` wins (then the lower cost, then at random): in a
chunked-prefill engine a difference under one chunk is the same first
iteration, and what decides then is how many decoding requests slow every
iteration, which the request count sees and the prefill count does not.

- ``queued_r``: prompt tokens this gateway sent to r whose first token has
  not been seen yet (each counted uncached, as estimated when it was sent):
  the prefill work ahead of this request. Tracked here, per replica, from
  ``on_dispatch`` (added), ``observe`` with a TTFT (the request whose
  dispatch time + TTFT is the observation's time, within 10% of the TTFT or
  10 ms, is taken off) and ``on_complete`` (taken off whatever happened).
  ``LoadView`` carries no reported count of waiting prompt tokens today; when
  it does, it belongs here, corrected locally as ``queue_depth`` is.
- ``uncached_r``: prompt tokens minus the leading blocks r probably holds
  (``PrefixIndex.match_depths`` x ``policies.prefix.BLOCK_TOKENS``): the
  gateway's map of what it sent where, as ``prefix_affinity`` keeps it.
- ``s_r``: seconds per prefill token, learned from TTFTs in two parts. A
  sample is a TTFT divided by the work predicted for that request when it
  was sent (queued + uncached; samples under ``min_sample_tokens`` skipped:
  their TTFT is one iteration's fixed cost, not prefill), in log space,
  clipped to within ``clip`` x the estimate it corrects. The fleet's rate
  learns every sample with weight ``alpha``: it scales every candidate's cost
  alike, so it sets the unit of the predictions and may follow load quickly
  (the fleet's first sample replaces ``1 / prior_tokens_per_s``). Each
  replica's offset from it learns what the fleet's rate does not explain,
  with weight ``replica_alpha`` (0.01: ~100 of its samples): only the offsets
  change the choice, so they wait for evidence. One stalled request (a
  preemption, a GC pause) moves an offset by at most replica_alpha x
  ln(clip). s_r is the median replica's rate, moved by r's offset from the
  median offset where that exceeds RATE_DEADBAND (1.3x), and then by the
  excess; a replica without samples is the median. On identical replicas
  offsets differ by noise, and noise learned at 0.1 a sample crossed the
  dead band through a burst near overload and tilted traffic (sharegpt,
  seed 0, load 0.8: mean TTFT 38 ms vs queue_depth's 33; 31 now).

Guard: only candidates whose outstanding tokens (prompt + expected output,
``LoadView.outstanding_tokens``) are below
``policies.load.load_bound_tokens(total + this request's, n, epsilon)`` are
compared (all of them if none is): a prediction that is wrong (a cache the
engine evicted, decode load the formula does not see) can then cost at most
(1 + eps) x a fair share of tokens on one replica, never a melted replica.

Source: Mooncake's Conductor (Qin et al., "Mooncake: A KVCache-centric
Disaggregated Architecture for LLM Serving", FAST 2025, section 5: for each
prefill instance, the queueing time plus the prefill time of the prompt's
uncached part, minimum TTFT wins) and llm-d's precise-prefix-cache scorer
(cached blocks per pod, weighed against load by the scheduler); the token
bound is Mirrokni, Thorup and Zadimoghaddam's bounded load, counted in tokens.

How it fails: the cache map and the queued work are this gateway's guesses
(other gateways' requests and the engine's own evictions are invisible, so
with several gateways each sees only its share of the queue, and an evicted
prefix looks cached until the LRU ages it out); it predicts the prefill
phase only, so a replica full of decoding requests looks free until the tie
rule, the token bound or the learned offset (slower iterations mean a larger
s_r; ~50 of its samples before a 2x slowdown counts) catches it; a router
that reported TTFTs only at the end of a request would leave each request's
prefill counted as queued until it completes (the gateway and the simulator
call ``observe`` with the TTFT at the first token).
Prompt lengths in the gateway are estimates (4 characters a token).

Parameters: ``epsilon`` (0.5, the gateway's ``load_bound_epsilon``),
``prior_tokens_per_s`` (10,000), ``alpha`` (0.1), ``replica_alpha`` (0.01),
``clip`` (3.0), ``min_sample_tokens`` (256), ``uncached_weight`` (4),
``slack_tokens`` (512), ``capacity_blocks`` (per replica, 4,096),
``max_blocks`` (per prompt, 256).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from policies import signals
from policies.base import NO_CANDIDATE, BasePolicy, Decision, FleetView, RouteRequest
from policies.load import LoadView, Outcome, load_bound_tokens
from policies.pick import argmin_ties
from policies.prefix import BLOCK_TOKENS
from policies.prefix_affinity import DEFAULT_EPSILON, check_epsilon
from policies.prefix_index import DEFAULT_CAPACITY_BLOCKS, DEFAULT_MAX_BLOCKS, PrefixIndex

# Prefill throughput assumed before any TTFT is seen: Llama-2-7B on one H100
# prefills on the order of 10k tokens/s (Vidur's profile, loadtest/engine).
# Only the ratio between replicas matters to the choice, so a wrong prior
# costs nothing while the fleet is uniform.
DEFAULT_PRIOR_TOKENS_PER_S = 10_000.0
# One sample's weight in the fleet's log-space average: ~10 samples (of any
# replica) to move most of the way. The fleet rate scales every candidate's
# cost alike, so it sets the predictions' unit, not the choice: it may follow
# a change in load quickly.
DEFAULT_ALPHA = 0.1
# One sample's weight in a replica's offset from the fleet rate: ~100 of its
# own samples to move most of the way. The offset changes the choice, so it
# must rest on evidence: at 0.1 its noise alone (~20% on identical replicas,
# more through a burst near overload, when every TTFT is mostly queueing)
# crossed the dead band and tilted traffic (sharegpt, seed 0, load 0.8: mean
# TTFT 38 ms vs queue_depth's 33); at 0.01 it is ~3x smaller, and a replica
# twice as slow still crosses the dead band after ~50 of its samples.
DEFAULT_REPLICA_ALPHA = 0.01
# A sample further than 3x from the estimate counts as 3x: a preempted or
# stalled request (TTFT 50x the prediction) must not teach "this replica is
# 50x slower".
DEFAULT_CLIP = 3.0
# Below half a 512-token prefill chunk a TTFT is one engine iteration plus
# network, whatever the prompt: such samples teach overhead, not rate.
DEFAULT_MIN_SAMPLE_TOKENS = 256
# Each uncached prompt token counts 4x a queued one: 1 is TTFT alone, which
# trades cache reuse away for a few ms now; 4 and 8 measured alike on the
# Mooncake trace and chat (docs/policies.md), 4 leaves more room for load.
DEFAULT_UNCACHED_WEIGHT = 4.0
# Predictions closer than one prefill chunk (vLLM's long_prefill_token_threshold,
# the engine model's prefill_chunk: 512 tokens a request per iteration) are
# the same first iteration in a chunked-prefill engine: the shorter queue
# decides among them, because decoding requests slow every iteration.
DEFAULT_SLACK_TOKENS = 512
# A replica's offset counts only beyond this factor (and then by the excess):
# on identical replicas offsets differ by sampling noise alone, and a replica
# that looked 10% faster by chance drew 20% more traffic than its share in
# the simulator (sharegpt, load 0.8: mean TTFT +23% over queue_depth). A
# replica 2x slower still counts as 1.5x slower.
RATE_DEADBAND = 1.3
# A request whose first token is never observed and whose completion never
# arrives (a bug upstream of the policy) must not grow memory without bound.
MAX_PENDING_PER_REPLICA = 4096
# observe(ttft) is matched to the request sent at now - ttft, within this
# share of the TTFT or MATCH_FLOOR_S, whichever is larger.
MATCH_SHARE = 0.1
MATCH_FLOOR_S = 0.01
INF = float("inf")
_LOG_DEADBAND = math.log(RATE_DEADBAND)


class _Pending:
    """One request's prefill as predicted when it was sent."""

    __slots__ = ("sent", "tokens", "work")

    def __init__(self, sent: float, tokens: int, work: int) -> None:
        self.sent = sent
        self.tokens = tokens  # its uncached prompt tokens on this replica
        self.work = work  # tokens to prefill before its first token (queued + its own)


class _Replica:
    """What this policy learned about one replica."""

    __slots__ = ("log_offset", "pending", "queued", "unmatched_ttft")

    def __init__(self) -> None:
        # Keyed by the request object (identity hash): the router passes the
        # same RouteRequest to on_dispatch and on_complete.
        self.pending: dict[RouteRequest, _Pending] = {}
        self.queued = 0  # sum of pending tokens
        # ln(this replica's seconds per prefill token / the fleet's): 0 until
        # its own samples say otherwise.
        self.log_offset = 0.0
        # A TTFT that matched no pending request by time (it came with the
        # completion): the next on_complete on this replica pairs with it.
        self.unmatched_ttft: float | None = None

    def take(self, request: RouteRequest) -> _Pending | None:
        p = self.pending.pop(request, None)
        if p is not None:
            self.queued -= p.tokens
        return p


def _number(policy: str, name: str, value: object, low: float, strict: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (value <= low if strict else value < low)
    ):
        op = ">" if strict else ">="
        raise TypeError(f"{policy}: {name} must be a finite number {op} {low:g}, got {value!r}")
    return float(value)


class PredictedTtft(BasePolicy):
    name = "predicted_ttft"
    summary = "least predicted TTFT: (queued + uncached prompt tokens) / learned prefill rate"

    def __init__(
        self,
        *,
        epsilon: float = DEFAULT_EPSILON,
        prior_tokens_per_s: float = DEFAULT_PRIOR_TOKENS_PER_S,
        alpha: float = DEFAULT_ALPHA,
        replica_alpha: float = DEFAULT_REPLICA_ALPHA,
        clip: float = DEFAULT_CLIP,
        min_sample_tokens: int = DEFAULT_MIN_SAMPLE_TOKENS,
        capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        slack_tokens: int = DEFAULT_SLACK_TOKENS,
        uncached_weight: float = DEFAULT_UNCACHED_WEIGHT,
        **params: object,
    ) -> None:
        super().__init__(**params)  # type: ignore[arg-type]
        self.uncached_weight = _number(self.name, "uncached_weight", uncached_weight, 1.0, False)
        self.epsilon = check_epsilon(self.name, epsilon)
        prior = _number(self.name, "prior_tokens_per_s", prior_tokens_per_s, 0.0, True)
        self.prior_log_spt = -math.log(prior)
        self.alpha = _number(self.name, "alpha", alpha, 0.0, True)
        self.replica_alpha = _number(self.name, "replica_alpha", replica_alpha, 0.0, True)
        for label, a in (("alpha", alpha), ("replica_alpha", replica_alpha)):
            if a > 1.0:
                raise TypeError(f"{self.name}: {label} must be in (0, 1], got {a!r}")
        self.log_clip = math.log(_number(self.name, "clip", clip, 1.0, True))
        for label, v in (
            ("min_sample_tokens", min_sample_tokens),
            ("slack_tokens", slack_tokens),
            ("capacity_blocks", capacity_blocks),
            ("max_blocks", max_blocks),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TypeError(f"{self.name}: {label} must be an integer >= 1, got {v!r}")
        self.min_sample_tokens = min_sample_tokens
        self.slack_tokens = slack_tokens
        self.index = PrefixIndex(capacity_blocks, max_blocks)
        self._replicas: dict[str, _Replica] = {}
        # ln(seconds per prefill token) over all samples; None until the first.
        self._fleet_log_spt: float | None = None
        self._median: float | None = None  # of the replicas' offsets, until one moves
        # The last choose()'s uncached tokens per candidate, reused by the
        # on_dispatch that follows it for the same request.
        self._last: tuple[RouteRequest | None, dict[str, int]] = (None, {})

    # -- state -------------------------------------------------------------

    def on_membership(self, names: frozenset[str]) -> None:
        self.index.forget(names)
        for gone in [r for r in self._replicas if r not in names]:
            del self._replicas[gone]
        self._median = None

    def _state(self, replica: str) -> _Replica:
        st = self._replicas.get(replica)
        if st is None:
            st = self._replicas[replica] = _Replica()
            self._median = None
        return st

    def _median_offset(self) -> float:
        # The fleet's rate is an average over every sample, which a slow
        # replica pulls by its share of them (1/3 of ln 2 with three replicas
        # sampled alike); the median replica is what "typical" means.
        if self._median is None:
            offsets = sorted(st.log_offset for st in self._replicas.values())
            k = len(offsets)
            if k == 0:
                self._median = 0.0
            else:
                self._median = (
                    offsets[k // 2] if k % 2 else 0.5 * (offsets[k // 2 - 1] + offsets[k // 2])
                )
        return self._median

    def fleet_log_spt(self) -> float:
        """ln(seconds per prefill token) of the fleet's median replica, else the prior."""
        if self._fleet_log_spt is None:
            return self.prior_log_spt
        return self._fleet_log_spt + self._median_offset()

    def seconds_per_token(self, replica: str) -> float:
        """The prefill cost of one token on ``replica`` that predictions use: the
        median replica's, moved by this replica's offset from it beyond
        RATE_DEADBAND."""
        return math.exp(self._log_spt(self._replicas.get(replica), self.fleet_log_spt()))

    def _log_spt(self, st: _Replica | None, fleet: float) -> float:
        d = 0.0 if st is None else st.log_offset - self._median_offset()
        if abs(d) <= _LOG_DEADBAND:
            return fleet
        return fleet + d - _LOG_DEADBAND if d > 0 else fleet + d + _LOG_DEADBAND

    def queued_tokens(self, replica: str) -> int:
        """Prefill tokens this gateway sent to ``replica`` that have no first token yet."""
        st = self._replicas.get(replica)
        return 0 if st is None else st.queued

    def _uncached(self, request: RouteRequest, names: set[str]) -> dict[str, int]:
        prompt = request.prompt_tokens
        hashes = request.block_hashes
        if not hashes or prompt <= 0:
            return {name: max(0, prompt) for name in names}
        depths = self.index.match_depths(hashes, names)
        return {name: max(0, prompt - depths.get(name, 0) * BLOCK_TOKENS) for name in names}

    # -- the choice --------------------------------------------------------

    def choose(
        self,
        request: RouteRequest,
        candidates: Sequence[LoadView],
        fleet: FleetView,
        now: float,
    ) -> Decision:
        n = len(candidates)
        if n == 0:
            return NO_CANDIDATE
        self.sync_fleet(fleet)
        total = sum([c.outstanding_tokens for c in candidates]) + request.cost_tokens
        bound = load_bound_tokens(total, n, self.epsilon)
        pool = [c for c in candidates if c.outstanding_tokens < bound] or list(candidates)
        uncached = self._uncached(request, {c.name for c in pool})
        self._last = (request, uncached)
        fleet_log_spt = self.fleet_log_spt()
        preds: list[float] = []
        for c in pool:
            st = self._replicas.get(c.name)
            queued = 0 if st is None else st.queued
            log_spt = self._log_spt(st, fleet_log_spt)
            w = c.weight
            preds.append(
                (queued + self.uncached_weight * uncached[c.name]) * math.exp(log_spt) / w
                if w > 0
                else INF
            )
        best = min(preds)
        slack = self.slack_tokens * math.exp(fleet_log_spt)
        ties = [i for i, p in enumerate(preds) if p <= best + slack]
        if len(ties) > 1:
            qs = signals.queue_depths([pool[i] for i in ties], now)
            ties = [ties[j] for j in argmin_ties(qs)]
            if len(ties) > 1:
                ties = [ties[j] for j in argmin_ties([preds[i] for i in ties])]
        i = ties[0] if len(ties) == 1 else ties[int(self.rng.random() * len(ties))]
        chosen = pool[i]
        own = uncached[chosen.name]
        queued = self.queued_tokens(chosen.name)
        spt = math.exp(self._log_spt(self._replicas.get(chosen.name), fleet_log_spt))
        w = chosen.weight
        return Decision(
            chosen.name,
            "ttft_hit" if own < request.prompt_tokens else "ttft_miss",
            {
                "cost_s": preds[i],
                "predicted_ttft_s": (queued + own) * spt / w if w > 0 else INF,
                "uncached_tokens": float(own),
                "queued_tokens": float(queued),
                "token_bound": float(bound),
            },
        )

    # -- feedback ----------------------------------------------------------

    def on_dispatch(self, request: RouteRequest, replica: str, now: float) -> None:
        if not self.is_member(replica):
            return
        last_req, uncached = self._last
        own = uncached.get(replica) if last_req is request else None
        if own is None:
            own = self._uncached(request, {replica})[replica]
        self._last = (None, {})
        hashes = request.block_hashes
        if hashes:
            self.index.insert(replica, hashes)
        st = self._state(replica)
        st.take(request)  # the same request sent twice: count it once
        if len(st.pending) >= MAX_PENDING_PER_REPLICA:
            st.take(next(iter(st.pending)))
        st.pending[request] = _Pending(now, own, st.queued + own)
        st.queued += own

    def observe(self, replica: str, ttft_s: float | None, tpot_s: float | None, now: float) -> None:
        if ttft_s is None or not self.is_member(replica) or not ttft_s >= 0:
            return
        st = self._replicas.get(replica)
        if st is None:
            return
        sent_at = now - ttft_s
        tolerance = max(MATCH_FLOOR_S, MATCH_SHARE * ttft_s)
        best: RouteRequest | None = None
        best_err = tolerance
        for req, pending in st.pending.items():
            err = abs(pending.sent - sent_at)
            if err <= best_err:
                best, best_err = req, err
        p = st.take(best) if best is not None else None
        if p is None:
            st.unmatched_ttft = ttft_s
            return
        self._learn(st, p.work, ttft_s)

    def on_complete(
        self, request: RouteRequest, replica: str, outcome: Outcome, now: float
    ) -> None:
        st = self._replicas.get(replica)
        if st is None or not self.is_member(replica):
            return
        p = st.take(request)
        ttft, st.unmatched_ttft = st.unmatched_ttft, None
        if p is not None and ttft is not None and outcome is Outcome.OK:
            self._learn(st, p.work, ttft)

    def _learn(self, st: _Replica, work: int, ttft_s: float) -> None:
        if work < self.min_sample_tokens or ttft_s <= 0:
            return
        sample = math.log(ttft_s / work)
        fleet = self._fleet_log_spt
        if fleet is None:
            # The fleet's first sample replaces the prior outright: a prior
            # 10x off would otherwise take ~20 clipped steps to unlearn.
            self._fleet_log_spt = sample
            return
        clip = self.log_clip
        # The fleet learns every sample as it is, fast; the replica learns,
        # slowly, what the fleet's rate does not explain.
        self._fleet_log_spt = fleet + self.alpha * max(-clip, min(clip, sample - fleet))
        excess = sample - fleet - st.log_offset
        st.log_offset += self.replica_alpha * max(-clip, min(clip, excess))
        self._median = None

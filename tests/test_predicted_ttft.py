"""predicted_ttft and the token-counted load bound: exact picks, worked out by hand.

The policy's prior is 10,000 tokens/s (1e-4 s a token) until a TTFT is seen,
so every expected cost below is tokens x 1e-4 s. Prompts are built from
whole 64-token prefix blocks (256 characters each, policies/prefix.py).
"""

from __future__ import annotations

import math
import random
import sys

import pytest

from policies import registry
from policies.base import RouteRequest
from policies.load import Outcome, load_bound_tokens
from policies.predicted_ttft import PredictedTtft
from policies.prefix import BLOCK_CHARS, BLOCK_TOKENS
from policies.prefix_affinity import PrefixAffinity
from router.load import ReplicaLoad, dispatch
from tests.fakes import Fleet, choose, loads_with, route

SPT = 1e-4  # the prior: seconds per prefill token


def blocks(tag: str, n: int) -> str:
    """``n`` full prefix blocks of text that no other tag shares."""
    unit = (tag + " ") * (BLOCK_CHARS // (len(tag) + 1) + 1)
    return "".join(f"{k:04d}" + unit[: BLOCK_CHARS - 4] for k in range(n))


def request(text: str, output: int = 0) -> RouteRequest:
    return RouteRequest(
        "m",
        prompt_text=text,
        prompt_tokens=len(text) // BLOCK_CHARS * BLOCK_TOKENS,
        expected_output_tokens=output,
    )


def policy(**params: object) -> PredictedTtft:
    return PredictedTtft(rng=random.Random(0), **params)  # type: ignore[arg-type]


# -- the token bound -----------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "n", "eps", "bound"),
    [
        (100, 4, 0.5, 38),  # ceil(1.5 x 100 / 4) = ceil(37.5)
        (50, 5, 0.1, 11),  # 1.1 x 50 / 5 is 11.000000000000002 in floats: still 11
        (0, 4, 0.5, 1),  # nothing anywhere: an empty replica is below the bound
        (7, 1, 0.0, 7),
        (10, 0, 0.5, 0),
        (10, 3, math.inf, sys.maxsize),
    ],
)
def test_load_bound_tokens_by_hand(total: int, n: int, eps: float, bound: int) -> None:
    assert load_bound_tokens(total, n, eps) == bound


# -- predicted_ttft: the choice ------------------------------------------------


def test_cached_prefix_wins_with_the_hand_computed_cost() -> None:
    p = policy()
    loads = loads_with(0, 0)
    doc = blocks("doc", 8)  # 512 tokens
    d0, t0 = route(p, loads, request(doc))
    assert d0.reason == "ttft_miss" and d0.inputs["uncached_tokens"] == 512
    t0.close(Outcome.OK)
    p.on_complete(request(doc), d0.replica, Outcome.OK, 0.0)  # not the same object: no-op
    holder = d0.replica
    # The same 8 blocks + 2 new ones: 128 uncached tokens on the holder, 640 elsewhere.
    d, _ = route(p, loads, request(doc + blocks("tail", 2)), now=1.0)
    assert d.replica == holder and d.reason == "ttft_hit"
    queued = 512  # the first request's prefill: no first token seen yet
    assert d.inputs["uncached_tokens"] == 128
    assert d.inputs["queued_tokens"] == queued
    assert d.inputs["predicted_ttft_s"] == pytest.approx((queued + 128) * SPT)
    assert d.inputs["cost_s"] == pytest.approx((queued + 4 * 128) * SPT)
    # The other replica's cost was 4 x 640 x 1e-4 = 0.256 s > 0.1024 s.


def test_queued_prefill_outweighs_a_cache_hit() -> None:
    p = policy()
    loads = loads_with(0, 0)
    doc = blocks("doc", 4)  # 256 tokens
    d0, _ = route(p, loads, request(doc))
    holder = d0.replica
    other = next(c.name for c in loads if c.name != holder)
    # 3,000 tokens of somebody else's prefill are now queued on the holder.
    big = request(blocks("big", 47))  # 3,008 tokens, no shared prefix
    ticket = dispatch(next(c for c in loads if c.name == holder), big.cost_tokens)
    p.on_dispatch(big, holder, 0.0)
    assert p.queued_tokens(holder) == 256 + 3008
    d, _ = route(p, loads, request(doc + blocks("q", 1)), now=0.5)
    # Holder: (3264 + 4 x 64) x 1e-4 = 0.352 s; other: (0 + 4 x 320) x 1e-4 = 0.128 s.
    assert d.replica == other and d.reason == "ttft_miss"
    assert d.inputs["cost_s"] == pytest.approx(4 * 320 * SPT)
    ticket.close(Outcome.OK)


def test_costs_within_one_chunk_go_to_the_shorter_queue() -> None:
    p = policy()
    loads = loads_with(3, 0)  # r0 has three decoding requests (not ours to count)
    doc = blocks("doc", 2)
    # Teach the index that r0 holds doc's first block: 64 cached tokens there.
    p.index.insert("r0", request(doc).block_hashes[:1])
    d = choose(p, request(doc), loads)
    # r0 costs 4 x 64 x 1e-4, r1 4 x 128 x 1e-4: 256 tokens apart, under the
    # 512-token slack, so the queue decides: r1 (0) over r0 (3).
    assert d.replica == "r1"
    strict = policy(slack_tokens=1)
    strict.index.insert("r0", request(doc).block_hashes[:1])
    assert choose(strict, request(doc), loads).replica == "r0"


def test_the_token_bound_keeps_a_hot_prefix_off_a_full_holder() -> None:
    p = policy()
    loads = [ReplicaLoad("r0"), ReplicaLoad("r1"), ReplicaLoad("r2"), ReplicaLoad("r3")]
    doc = blocks("hot", 16)  # 1,024 tokens
    p.index.insert("r0", request(doc).block_hashes)
    dispatch(loads[0], 3000)  # r0 holds the prefix and 3,000 outstanding tokens
    req = request(doc, output=100)
    # bound = ceil(1.5 x (3000 + 1124) / 4) = 1547 <= 3000: r0 is not compared.
    assert load_bound_tokens(3000 + req.cost_tokens, 4, 0.5) == 1547
    d = choose(p, req, loads)
    assert d.replica != "r0" and d.inputs["token_bound"] == 1547
    unbounded = policy(epsilon=math.inf)
    unbounded.index.insert("r0", request(doc).block_hashes)
    assert choose(unbounded, req, loads).replica == "r0"


def test_zero_weight_is_never_chosen_over_a_live_replica() -> None:
    p = policy()
    loads = loads_with(0, 5)
    loads[0].weight = 0.0
    assert choose(p, request(blocks("x", 2)), loads).replica == "r1"


# -- predicted_ttft: what it learns --------------------------------------------


def test_first_token_takes_the_request_off_the_queue_and_teaches_the_rate() -> None:
    p = policy()
    loads = loads_with(0)
    req = request(blocks("a", 16))  # 1,024 tokens
    route(p, loads, req, now=10.0)
    assert p.queued_tokens("r0") == 1024
    p.observe("r0", 0.2048, None, 10.2048)  # first token: sent at 10.0, matched
    assert p.queued_tokens("r0") == 0
    # The fleet's first sample replaces the prior: 0.2048 s / 1024 tokens.
    assert p.seconds_per_token("r0") == pytest.approx(2e-4)
    p.on_complete(req, "r0", Outcome.OK, 11.0)  # already off the queue: nothing changes
    assert p.queued_tokens("r0") == 0


def test_an_outlier_moves_the_rate_by_at_most_alpha_ln_clip() -> None:
    """The fleet's rate moves by alpha x ln 3, the replica's offset from it by
    replica_alpha x ln 3; alone, r0 is the fleet's median replica, so both count."""
    p = policy()
    loads = loads_with(0)
    first = request(blocks("a", 16))
    route(p, loads, first, now=0.0)
    p.observe("r0", 0.1024, None, 0.1024)  # 1e-4 s a token
    stalled = request(blocks("b", 16))
    route(p, loads, stalled, now=1.0)
    p.observe("r0", 10.24, None, 11.24)  # 100x slower: clipped to 3x
    assert p.seconds_per_token("r0") == pytest.approx(1e-4 * 3 ** (0.1 + 0.01))


def test_a_ttft_reported_with_the_completion_pairs_with_that_request() -> None:
    """The gateway calls observe at the end of a request, then on_complete."""
    p = policy()
    loads = loads_with(0)
    req = request(blocks("a", 8))  # 512 tokens
    _, ticket = route(p, loads, req, now=0.0)
    p.observe("r0", 0.0256, 0.01, 3.0)  # sent at 2.97 by time: matches nothing
    assert p.queued_tokens("r0") == 512
    ticket.close(Outcome.OK)
    p.on_complete(req, "r0", Outcome.OK, 3.0)
    assert p.queued_tokens("r0") == 0
    assert p.seconds_per_token("r0") == pytest.approx(0.0256 / 512)


def test_a_failed_request_leaves_the_queue_and_teaches_nothing() -> None:
    p = policy()
    loads = loads_with(0)
    req = request(blocks("a", 8))
    route(p, loads, req)
    p.on_complete(req, "r0", Outcome.UPSTREAM_RESET, 1.0)
    assert p.queued_tokens("r0") == 0
    assert p.seconds_per_token("r0") == pytest.approx(SPT)


def test_a_slow_replica_is_learned_and_avoided() -> None:
    """r0 takes 2x as long per token as r1 and r2: it is learned to cost 2 / 1.3 x
    as much (the median replica is a fast one; the dead band comes off). Its
    offset moves 1% of the way a sample: 600 samples each is 99.8% of it."""
    p = policy()
    loads = loads_with(0, 0, 0)
    choose(p, request(blocks("z", 1)), loads)  # membership seen
    now = 0.0
    order = random.Random(1)
    rates = [("r0", 2e-4), ("r1", 1e-4), ("r2", 1e-4)]
    for k in range(600):
        req = request(blocks(f"u{k}", 8))  # 512 tokens, nothing shared
        # In an order that varies, as TTFTs arrive: in a fixed one, r1 would
        # always learn just after r0 had pulled the fleet's rate up.
        order.shuffle(rates)
        for name, spt in rates:
            load = next(c for c in loads if c.name == name)
            t = dispatch(load, req.cost_tokens)
            p.on_dispatch(req, name, now)
            p.observe(name, 512 * spt, None, now + 512 * spt)
            t.close(Outcome.OK)
            p.on_complete(req, name, Outcome.OK, now + 1.0)
        now += 2.0
    assert p.seconds_per_token("r1") == pytest.approx(1e-4, rel=0.01)
    # Within 4%: the fleet's rate moves 10% a sample, so when r0 answers it
    # has mostly heard from the fast replicas since r0's last sample, and
    # r0's offset takes up that difference too (~3% here).
    assert p.seconds_per_token("r0") == pytest.approx(2e-4 / 1.3, rel=0.04)
    # 2,048 tokens queued on r1 and r2, 1,024 on r0: r0 is predicted slower
    # ((1024 + 4 x 512) x 1.54e-4 = 0.47 s vs (2048 + 4 x 512) x 1e-4 = 0.41 s).
    for name, n_blocks in (("r0", 16), ("r1", 32), ("r2", 32)):
        p.on_dispatch(request(blocks(f"q{name}", n_blocks)), name, now)
    d = choose(p, request(blocks("n", 8)), loads, now)
    assert d.replica in ("r1", "r2")
    assert d.inputs["cost_s"] == pytest.approx((2048 + 4 * 512) * 1e-4, rel=0.01)


def test_noise_on_identical_replicas_never_sets_them_apart() -> None:
    """Four replicas of one speed whose TTFTs scatter by a factor e^0.5 (a
    burst's queueing): the choice must stay on tokens and queues alone. With
    each replica's rate learned at 0.1 a sample (this policy until 2026-11),
    two of them differed by round 8; offsets learned at 0.01 stay within the
    1.3x dead band."""
    p = policy()
    loads = loads_with(0, 0, 0, 0)
    choose(p, request(blocks("z", 1)), loads)  # membership seen
    noise = random.Random(3)
    names = ["r0", "r1", "r2", "r3"]
    now = 0.0
    for k in range(500):
        req = request(blocks(f"u{k}", 8))  # 512 tokens
        noise.shuffle(names)
        for name in names:
            ttft = 512 * 1e-4 * math.exp(noise.gauss(0.0, 0.5))
            p.on_dispatch(req, name, now)
            p.observe(name, ttft, None, now + ttft)
        now += 2.0
        rates = {p.seconds_per_token(name) for name in names}
        assert len(rates) == 1, (k, rates)


def test_rejects_bad_parameters() -> None:
    for bad in (
        {"prior_tokens_per_s": 0},
        {"alpha": 0},
        {"alpha": 1.5},
        {"replica_alpha": 0},
        {"replica_alpha": 2},
        {"clip": 1.0},
        {"uncached_weight": 0.5},
        {"slack_tokens": 0},
        {"min_sample_tokens": True},
        {"epsilon": -1},
    ):
        with pytest.raises(ValueError, match="predicted_ttft"):
            registry.create("predicted_ttft", bad)


# -- prefix_affinity's token bound -----------------------------------------------


def test_prefix_affinity_token_bound_moves_a_hit_off_a_token_heavy_holder() -> None:
    loads = [ReplicaLoad(f"r{i}") for i in range(4)]
    doc = request(blocks("hot", 16), output=100)
    dispatch(loads[0], 3000)  # one request in flight on r0: under the request bound
    picks = {}
    for bound in ("requests", "tokens", "both"):
        p = PrefixAffinity(rng=random.Random(0), bound=bound)
        p.index.insert("r0", doc.block_hashes)
        picks[bound] = p.choose(doc, loads, Fleet.of(loads), 0.0)
    # load_bound(1, 4, 0.5) = ceil(1.5 x 2 / 4) = 1: r0 (1 in flight) is at it.
    assert picks["requests"].reason == "prefix_overloaded"
    # By tokens alone: bound = ceil(1.5 x (3000 + 1124) / 4) = 1547 < 3000.
    assert picks["tokens"].reason == "prefix_overloaded"
    assert picks["tokens"].replica != "r0"
    with pytest.raises(ValueError, match="bound"):
        registry.create("prefix_affinity", {"bound": "bytes"})

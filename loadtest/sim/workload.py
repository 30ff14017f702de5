"""Workloads for the policy simulator, as light arrival records.

The simulator reads the same named workloads and traces as the load
generator (loadtest/workloads/, ``--workload NAME|PATH``), converted here
into :class:`SimArrival` records. A trace arrives at its own timestamps,
rescaled to the asked rate (``arrivals="trace"``), unless Poisson arrivals
are asked for; prompt text is kept only as a lazy source
of prefix-block hashes, so a policy or a service model that never asks for
hashes never pays for them. Two built-ins add what theory checks and scale
runs need and text-based workloads cannot give cheaply:

- ``exp``: Poisson arrivals, fixed 100-token prompts and outputs, no text
  (the queueing-theory workload: with ``--service exp`` the lengths do not
  matter; 10^6 requests cost no text at all).
- ``system-prompt``: every request opens with the SAME 2,000-token system
  prompt, then 50-400 unique tokens, as block hashes only: the workload that
  makes first-block affinity (or affinity without a load term) collapse onto
  one replica.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from loadtest.workloads import Conversation, load_workload
from loadtest.workloads.catalog import trace_of
from loadtest.workloads.traces import native_rate
from policies.prefix import BLOCK_TOKENS, chat_prompt_text

BUILTIN: dict[str, str] = {
    "exp": "Poisson arrivals, fixed 100-token prompt and output, no text (theory, scale)",
    "system-prompt": "every request shares one 2,000-token system prompt + unique tail "
    "(hashes only)",
}
_MASK = (1 << 64) - 1


class SimTurn:
    """One request of a conversation: lengths, and where its block hashes come from."""

    __slots__ = ("hashes", "output_tokens", "prompt_tokens", "text", "think_s")

    def __init__(
        self,
        prompt_tokens: int,
        output_tokens: int,
        *,
        text: str | None = None,
        hashes: tuple[int, ...] | None = None,
        think_s: float = 0.0,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.text = text
        # Precomputed prefix-block hashes (synthetic workloads); None:
        # RouteRequest hashes prompt_text() when a policy first asks.
        self.hashes = hashes
        self.think_s = think_s

    def prompt_text(self) -> str:
        """The text the gateway would hash for this turn (chat-formatted)."""
        if self.text is None:
            return ""
        return chat_prompt_text([{"role": "user", "content": self.text}])


class SimArrival:
    """A conversation: first turn at ``t``; later turns after the previous answer."""

    __slots__ = ("domain", "id", "t", "turns")

    def __init__(self, id: str, t: float, turns: list[SimTurn], domain: str | None = None) -> None:
        self.id = id
        self.t = t
        self.turns = turns
        self.domain = domain


def from_conversations(convs: Iterator[Conversation]) -> Iterator[SimArrival]:
    for c in convs:
        turns = [
            SimTurn(
                t.prompt_tokens, max(1, t.output_tokens), text=t.prompt_text, think_s=t.think_time_s
            )
            for t in c.turns
        ]
        yield SimArrival(c.id, c.arrival_s, turns, c.domain)


def _synth(key: int, start: int, n: int) -> tuple[int, ...]:
    """Chained-looking block hashes for synthetic prompts: unique per (key, index)."""
    return tuple(((key << 20) | (start + j)) * 0x9E3779B97F4A7C15 & _MASK for j in range(n))


def _exp(seed: int, requests: int, rate: float) -> Iterator[SimArrival]:
    rng = random.Random(f"exp:{seed}")
    expo = rng.expovariate
    t = 0.0
    for i in range(requests):
        t += expo(rate)
        yield SimArrival(str(i), t, [SimTurn(100, 100, hashes=())])


def _system_prompt(seed: int, requests: int, rate: float) -> Iterator[SimArrival]:
    rng = random.Random(f"system-prompt:{seed}")
    system_blocks = 2000 // BLOCK_TOKENS
    system = _synth(1, 0, system_blocks)
    t = 0.0
    for i in range(requests):
        t += rng.expovariate(rate)
        tail = rng.randint(50, 400)
        own = _synth(1000 + i, system_blocks, tail // BLOCK_TOKENS)
        turn = SimTurn(
            system_blocks * BLOCK_TOKENS + tail, rng.randint(50, 300), hashes=system + own
        )
        yield SimArrival(str(i), t, [turn])


ARRIVALS = ("trace", "poisson")


def trace_rate(name: str, requests: int) -> float | None:
    """Requests per second of a trace's first ``requests`` requests at its own
    timestamps (speed 1); None for a workload without timestamps of its own."""
    trace = trace_of(name)
    if trace is None:
        return None
    return native_rate(trace[1], requests)


def arrival_mode(name: str, arrivals: str | None) -> str:
    """``trace`` for a trace unless told ``poisson``; ``poisson`` for everything else."""
    is_trace = name not in BUILTIN and trace_of(name) is not None
    if arrivals is None:
        return "trace" if is_trace else "poisson"
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, not {arrivals!r}")
    if arrivals == "trace" and not is_trace:
        raise ValueError(f"workload {name!r} has no timestamps of its own: use --arrivals poisson")
    return arrivals


def open_workload(
    name: str,
    *,
    seed: int,
    requests: int,
    rate: float | None = None,
    speed: float | None = None,
    arrivals: str | None = None,
) -> Iterator[SimArrival]:
    """Arrivals of a built-in or a loadtest.workloads workload.

    ``arrivals="trace"`` (a trace's default) replays the trace's own
    timestamps divided by ``speed``, or, given ``rate`` instead, by the
    speed that makes the run's requests arrive at ``rate`` per second on
    average (bursts and lulls kept, only rescaled), as ``dp-router loadtest
    --speed`` does. ``arrivals="poisson"`` (the default for everything else)
    resamples them as Poisson arrivals at ``rate``. For multi-turn workloads
    ``rate`` is conversations per second (the later turns follow their answers).
    """
    mode = arrival_mode(name, arrivals)
    if mode == "trace":
        if speed is None:
            if rate is None or rate <= 0:
                raise ValueError("trace replay needs a speed or an arrival rate > 0")
            native = trace_rate(name, requests)
            assert native is not None
            speed = rate / native
        if speed <= 0:
            raise ValueError("--speed must be > 0")
        return from_conversations(
            load_workload(name, seed=seed, requests=requests, rate=None, speed=speed)
        )
    if rate is None or rate <= 0:
        raise ValueError("the simulator needs an arrival rate > 0 (--rate or --load)")
    if name == "exp":
        return _exp(seed, requests, rate)
    if name == "system-prompt":
        return _system_prompt(seed, requests, rate)
    return from_conversations(load_workload(name, seed=seed, requests=requests, rate=rate))

"""The shape of a workload, shared by the load generator and the simulator.

A workload is an iterator of :class:`Conversation` objects in arrival order.
A single request is a one-turn conversation. Each turn's ``prompt_text`` is
the WHOLE prompt of that turn (previous context + new message), so the prefix
blocks a multi-turn session shares are real and policies/prefix.py sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.prefix import block_hashes, chat_prompt_text


@dataclass(frozen=True, slots=True)
class Turn:
    prompt_text: str
    prompt_tokens: int
    output_tokens: int
    # Wait after the previous turn's response completed (user think time).
    think_time_s: float = 0.0

    def messages(self) -> list[dict[str, str]]:
        """The chat messages the load generator sends for this turn."""
        return [{"role": "user", "content": self.prompt_text}]

    def block_hashes(self) -> tuple[int, ...]:
        """Prefix hashes exactly as the gateway computes them for ``messages()``."""
        return block_hashes(chat_prompt_text(self.messages()))


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    arrival_s: float  # first turn's offset from the start of the run
    turns: tuple[Turn, ...]
    domain: str | None = None  # MoE expert-popularity domain, if any

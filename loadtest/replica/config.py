"""What defines one simulated replica: :class:`SimReplicaConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from loadtest.replica.faults import check_status

MetricsFlavour = Literal["vllm", "sglang"]

# Prompt + output tokens beyond this are refused with vLLM's 400; 128k is a
# common long-context setting (Llama 3.1).
DEFAULT_MAX_MODEL_LEN = 131_072


@dataclass
class SimReplicaConfig:
    """Everything that defines one simulated replica.

    ``models`` are the names served (the first is the one in metric labels,
    like vLLM's ``--served-model-name`` list). ``exit_on_die`` is set by the
    CLI only: a ``die`` fault then really exits the process. With ``engine``
    set, tokens are timed by the engine model (continuous batching, KV cache,
    prefix reuse, MoE experts) and ``token_interval_s``, ``ttft_s``,
    ``prefill_tokens_per_s`` and ``max_running`` are ignored.

    This dataclass defaults to the paced model (``engine=None``): it is the
    in-process test double, where exact, fast timing is the point. The
    ``dp-router replica`` command defaults to the engine model
    (loadtest.engine.DEFAULT_REPLICA_PRESET); ``--paced`` asks for this one.
    """

    name: str = "replica"
    models: tuple[str, ...] = ("sim-model",)
    token_interval_s: float = 0.01
    ttft_s: float = 0.0
    prefill_tokens_per_s: float = 0.0  # paced model: uncached prompt adds to TTFT
    default_max_tokens: int = 16
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    metrics: MetricsFlavour = "vllm"
    not_ready_for_s: float = 0.0
    flap_period_s: float = 0.0
    max_running: int | None = None
    api_key: str | None = None
    speed: float = 1.0
    status: int | None = None  # force every /v1 answer to this status
    drain: bool = False
    exit_on_die: bool = False
    # The engine model instead of the paced one (see server.make_model): a
    # preset of loadtest.engine.preset ("llama2-7b", "llama2-7b+moe", ...).
    engine: str | None = None
    engine_tp: int | None = None  # None: the smallest TP degree the preset fits on
    engine_pp: int = 1
    engine_interconnect: str = "nvlink"
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a replica serves at least one model")
        if self.metrics not in ("vllm", "sglang"):
            raise ValueError(f"metrics flavour must be vllm or sglang, not {self.metrics!r}")
        if not 1 <= self.default_max_tokens <= self.max_model_len:
            raise ValueError("default_max_tokens must be in 1..max_model_len")
        if self.token_interval_s < 0 or self.ttft_s < 0:
            raise ValueError("token_interval_s and ttft_s must be >= 0")
        if self.not_ready_for_s < 0 or self.flap_period_s < 0:
            raise ValueError("not_ready_for_s and flap_period_s must be >= 0")
        if self.speed <= 0:
            raise ValueError("speed must be > 0")
        if self.status is not None:
            check_status(self.status)

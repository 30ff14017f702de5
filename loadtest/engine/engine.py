"""A discrete model of one continuous-batching LLM engine (vLLM-like), pure.

What it models, because routing quality depends on it:

- continuous batching: up to ``max_num_seqs`` sequences run together; each
  iteration schedules at most ``max_num_batched_tokens`` tokens, running
  sequences first (decodes and unfinished prefill chunks, in admission order),
  then new ones from a FIFO waiting queue; a prompt is prefilled in chunks of
  at most ``prefill_chunk`` tokens per iteration (vLLM V1's chunked prefill);
- a paged KV cache of ``kv_capacity_tokens`` tokens in ``block_size``-token
  blocks, with prefix caching: computed prompt blocks are kept, keyed by their
  chained prefix hash, shared by reference count and evicted LRU once
  unreferenced, so a prompt whose prefix is cached skips that prefill;
- preemption by recompute when the KV cache is full: the most recently
  admitted running sequence goes back to the head of the waiting queue and
  loses all KV that is not in the prefix cache (vLLM's default);
- iteration time from a measured profile (loadtest/engine/profiles.py) in the
  iteration's token count, plus attention as KV bytes read / HBM bandwidth,
  times the MoE slowdown (loadtest/engine/moe.py), plus tensor-parallel all-reduce
  and the pipeline-parallel bubble.

Pure: no I/O, no clock, no asyncio. Time comes in as ``now`` and durations go
out in ``StepResult``; randomness (MoE routing only) from the injected
``random.Random``. The policy simulator and the live simulated replica
(loadtest/replica/engine_model.py) drive the same object.

Prefix-cache granularity: the gateway hashes prompts in blocks of
``policies.prefix.BLOCK_TOKENS`` (64) tokens, and the engine caches at exactly
that granularity: one cache entry = one prefix block = 64 tokens = 4 engine
blocks of 16 tokens (``block_size`` must divide 64). KV capacity and
allocation are counted in engine blocks; only full prompt prefix blocks are
cached. Output tokens are not cached: the engine never sees the text of what
it generated, so it cannot know their hashes. A real vLLM caches generated
blocks and hits on them when the client sends the exact reply back; our
workloads send a synthetic reply instead, so a returning session hits on its
previous prompt and recomputes the previous answer, in both worlds.

Admission (vLLM V0's watermark): a waiting request starts only if 1% of
the KV blocks stay free after its first chunk, so a full cache does not admit
a request in one step and preempt it in the next (it cut preemptions 3x in
an overloaded closed-loop run). ``add_request`` refuses (RequestRefused, a
ValueError, counted in ``rejected``) what could never run: more tokens than
the whole KV cache, or than ``max_model_len`` when set; vLLM answers those
with a 400.

Prefix-cache counters, in tokens: ``prefix_queries`` / ``prefix_hits`` at a
request's first admission (the hit rate routing can change), and
``readmit_queries`` / ``readmit_hits`` when a preempted request comes back
(it mostly finds its own blocks: counting those as hits made the policy that
preempts most look best). vLLM keeps the same split (``PrefixCacheStats``:
``queries``/``hits`` vs ``preempted_queries``/``preempted_hits``).

Not modelled: speculative decoding, prefill/decode disaggregation, swap-out
preemption, CPU overheads, per-request sampling cost.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from loadtest.engine.moe import ExpertRouter, MoEConfig
from loadtest.engine.profiles import DEFAULT_MODEL, MODELS, IterationProfile, ModelSpec, isotonic
from policies.prefix import BLOCK_TOKENS

GIB = 1 << 30
# H100 SXM HBM3 bandwidth: NVIDIA's data-sheet figure (3.35 TB/s), not measured here.
H100_HBM_BYTES_PER_S = 3.35e12
H100_MEMORY_BYTES = 80e9
# vLLM's default gpu_memory_utilization.
GPU_MEMORY_UTILIZATION = 0.9
# Activations, CUDA graphs and the allocator's slack per GPU. Chosen so that
# Llama-2-7B on one H100 leaves ~56 GB of KV = ~107k tokens, the defaults
# table's figure (Llama-2-70B on TP4 then gets ~427k tokens vs the table's
# ~450k: within its rounding).
ACTIVATION_RESERVE_BYTES = 2.5e9
# A deployment whose KV cache holds less than this is refused as "does not
# fit": it could not even run one full iteration of max_num_batched_tokens.
MIN_KV_TOKENS = 4096

# Share of a step spent in tensor-parallel all-reduce, by interconnect and TP
# degree: PCIe Gen5 ~8% at TP2, 25% at TP4, 38% at TP8; NVLink 2-9%. Typical
# figures for 7B-70B models, not measured here: change them with --engine-opt
# allreduce_share=... when you have your own.
ALLREDUCE_SHARE: dict[str, dict[int, float]] = {
    "nvlink": {1: 0.0, 2: 0.02, 4: 0.05, 8: 0.09},
    "pcie5": {1: 0.0, 2: 0.08, 4: 0.25, 8: 0.38},
}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an Engine needs; build one with :func:`preset`."""

    profile: IterationProfile
    kv_capacity_tokens: int
    kv_bytes_per_token: int  # whole model; each of the tp x pp GPUs holds 1/(tp*pp)
    name: str = "custom"
    tp: int = 1
    pp: int = 1
    interconnect: str = "nvlink"
    allreduce_share: float = 0.0
    # Microbatches in flight through the pipeline (GPipe bubble (pp-1)/(m+pp-1)).
    pp_microbatches: int = 4
    hbm_bytes_per_s: float = H100_HBM_BYTES_PER_S
    max_num_seqs: int = 128  # vLLM's default max batch
    max_num_batched_tokens: int = 4096  # Vidur/vLLM chunked-prefill budget
    prefill_chunk: int = 512  # per request per iteration (long_prefill_token_threshold)
    block_size: int = 16  # vLLM's default KV block
    prefix_caching: bool = True
    # Longest prompt + output accepted (vLLM's max_model_len; Llama-2 is 4096).
    # None = bounded by the KV cache only: the workloads replay traces whose
    # prompts exceed Llama-2's window, and the compute model does not care.
    max_model_len: int | None = None
    # Admit a waiting request only if this share of KV blocks stays free after
    # its first chunk (vLLM V0's watermark=0.01): without it, a full cache
    # admits a request in one step and preempts it in the next.
    admission_watermark: float = 0.01
    moe: MoEConfig | None = None
    # The MoE presets' expert time per step (``profile`` is then everything
    # else); None: ``moe``, if set, stretches ``moe.moe_share`` of ``profile``.
    moe_profile: IterationProfile | None = None

    def __post_init__(self) -> None:
        if BLOCK_TOKENS % self.block_size:
            raise ValueError(f"block_size must divide the prefix block ({BLOCK_TOKENS} tokens)")
        if self.kv_capacity_tokens < BLOCK_TOKENS:
            raise ValueError("kv_capacity_tokens is smaller than one prefix block")
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.prefill_chunk) < 1:
            raise ValueError("scheduler limits must be >= 1")
        if not 0 <= self.allreduce_share < 1:
            raise ValueError("allreduce_share must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class MoEVariant:
    """How a ``+moe`` preset turns a dense model into a mixture of experts.

    Each layer's MLP becomes ``config.num_experts`` experts of 1/``granularity``
    of the dense MLP's size, ``config.top_k`` of them per token; attention
    (and so the KV footprint) is the dense model's. Weights grow to
    ``params + mlp_params * (experts / granularity - 1)``; the active MLP
    compute per token is ``top_k / granularity`` dense MLPs.
    """

    config: MoEConfig
    granularity: int  # expert size = dense MLP / granularity


MOE_VARIANTS: dict[str, MoEVariant] = {
    # Mixtral-8x7B-like: 8 experts the size of the dense MLP, top-2. On
    # Llama-3-8B: 47.5B weights (Mixtral 8x7B: 46.7B), 13B active.
    "moe": MoEVariant(MoEConfig(num_experts=8, top_k=2), granularity=1),
    # DeepSeek-V3-like: 256 fine-grained experts (1/8 of the dense MLP), top-8
    # (one dense MLP's compute), spread over 8 expert-parallel ranks.
    "moe256": MoEVariant(MoEConfig(num_experts=256, top_k=8, ep_ranks=8), granularity=8),
}
DEFAULT_PRESET = DEFAULT_MODEL
# The simulated replica's default: the default model's MoE variant, so a
# replica started with no flags also reports per-expert counters.
DEFAULT_REPLICA_PRESET = f"{DEFAULT_MODEL}+moe"


def active_experts(tokens: float, experts: int, top_k: int) -> float:
    """Expected distinct experts a step of ``tokens`` tokens touches (uniform routing).

    A decode step of one token loads top_k experts' weights, not all of them:
    E * (1 - (1 - k/E)^T).
    """
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def moe_profile(mlp: IterationProfile, variant: MoEVariant) -> IterationProfile:
    """The experts' time per step, as a function of the step's token count.

    Each touched expert runs a GEMM of its share of the T * k routed tokens,
    costed as the dense MLP at that token count divided by the granularity
    (a smaller expert loads and multiplies 1/g of the weights); with expert
    parallelism the ranks run their experts at once, so one rank's share
    counts. Small steps are bound on loading the touched experts' weights,
    large ones on the active FLOPs (k / g dense MLPs per token).
    """
    cfg = variant.config
    e, k = cfg.num_experts, cfg.top_k
    ranks = cfg.ep_ranks or 1
    ys: list[float] = []
    for t in mlp.tokens:
        a = active_experts(t, e, k)
        ys.append(a / ranks / variant.granularity * mlp.time_s(t * k / a))
    return IterationProfile(mlp.tokens, tuple(isotonic(ys)))


def _fits(spec: ModelSpec, params: float, gpus: int) -> tuple[int, float, float]:
    """(KV tokens, weight bytes per GPU, usable bytes per GPU) on ``gpus`` H100s."""
    weights_per_gpu = params * spec.weight_bytes / gpus
    usable = H100_MEMORY_BYTES * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_BYTES
    free_per_gpu = usable - weights_per_gpu
    kv_tokens = int(free_per_gpu * gpus // spec.kv_bytes_per_token) if free_per_gpu > 0 else 0
    return kv_tokens, weights_per_gpu, usable


def preset(
    name: str = DEFAULT_PRESET,
    tp: int | None = None,
    pp: int = 1,
    interconnect: str = "nvlink",
    **overrides: Any,
) -> EngineConfig:
    """An EngineConfig for a profiled model on H100s with TP x PP GPUs.

    ``name`` is a model in ``loadtest.engine.profiles.MODELS`` ("llama3-8b",
    the default; "llama2-7b", "llama2-70b"), optionally suffixed "+moe" or
    "+moe256" (:data:`MOE_VARIANTS`: the same attention, the MLP as experts,
    weights and step times from the experts' size and active FLOPs).
    Per-GPU weights shrink with tp * pp, so the KV cache grows; compute comes
    from the profile's measured TP rows (not a division by TP); all-reduce
    adds its share for the interconnect. ``tp=None`` (the default) takes the
    smallest TP degree the model fits on. A model that does not fit, or leaves less than
    MIN_KV_TOKENS of KV cache, raises ValueError. ``overrides`` replace any
    EngineConfig field (e.g. ``kv_capacity_tokens=20_000``, ``max_num_seqs=256``,
    ``moe=MoEConfig(...)``). docs/simulator.md says how far to trust each preset.
    """
    base, _, variant_name = name.partition("+")
    spec = MODELS.get(base)
    if spec is None:
        raise ValueError(f"unknown engine preset {name!r}; known: {', '.join(sorted(MODELS))}")
    if interconnect not in ALLREDUCE_SHARE:
        raise ValueError(f"interconnect must be one of {sorted(ALLREDUCE_SHARE)}")
    if pp < 1 or spec.layers % pp:
        raise ValueError(f"pp must divide the layer count ({spec.layers})")
    variant: MoEVariant | None = None
    if variant_name:
        variant = MOE_VARIANTS.get(variant_name)
        if variant is None:
            raise ValueError(
                f"unknown preset variant {variant_name!r} (known: {', '.join(MOE_VARIANTS)})"
            )
    params = spec.params
    if variant is not None:
        cfg_moe = variant.config
        params += spec.mlp_params * (cfg_moe.num_experts / variant.granularity - 1)
    degrees = sorted(ALLREDUCE_SHARE[interconnect])
    if tp is None:
        tp = next((d for d in degrees if _fits(spec, params, d * pp)[0] >= MIN_KV_TOKENS), None)
        if tp is None:
            raise ValueError(f"{name} does not fit on {degrees[-1] * pp} x H100-80GB at any TP")
    if tp not in ALLREDUCE_SHARE[interconnect]:
        raise ValueError(f"tp must be one of {degrees}")
    gpus = tp * pp
    kv_tokens, weights_per_gpu, usable = _fits(spec, params, gpus)
    if kv_tokens < MIN_KV_TOKENS:
        raise ValueError(
            f"{name} does not fit on {gpus} x H100-80GB (TP{tp} PP{pp}): weights take "
            f"{weights_per_gpu / GIB:.1f} GiB per GPU of {usable / GIB:.1f} GiB usable, "
            f"leaving KV for {max(kv_tokens, 0)} tokens (< {MIN_KV_TOKENS}); "
            "use a higher TP or PP degree"
        )
    if variant is None:
        profile, experts = spec.profile(tp), None
    else:
        dense_rest, mlp = spec.split_profile(tp)
        # Expert-parallel ranks hold whole experts: their GEMMs are TP1's.
        expert_mlp = spec.split_profile(1)[1] if variant.config.ep_ranks else mlp
        profile, experts = dense_rest, moe_profile(expert_mlp, variant)
    cfg = EngineConfig(
        profile=profile,
        kv_capacity_tokens=kv_tokens,
        kv_bytes_per_token=spec.kv_bytes_per_token,
        name=name,
        tp=tp,
        pp=pp,
        interconnect=interconnect,
        allreduce_share=ALLREDUCE_SHARE[interconnect][tp],
        moe=variant.config if variant else None,
        moe_profile=experts,
    )
    return replace(cfg, **overrides) if overrides else cfg


class RequestRefused(ValueError):
    """A request that could never run on this engine (vLLM's 400)."""


@dataclass(frozen=True, slots=True)
class EngineRequest:
    id: str
    prompt_tokens: int
    max_tokens: int  # output tokens to generate (>= 1)
    # policies.prefix.block_hashes of the prompt text: hash i covers prompt
    # tokens [64 i, 64 i + 64). May be empty (no prefix caching for it).
    block_hashes: tuple[int, ...] = ()
    domain: str | None = None


@dataclass(slots=True)
class StepResult:
    duration_s: float
    # New output tokens per request at the end of the step; a request's first
    # entry is its first token.
    emitted: dict[str, int] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    tokens: int = 0  # tokens computed in this iteration
    batch: int = 0  # sequences scheduled in this iteration


class _Seq:
    __slots__ = (
        "admitted",
        "computed",
        "domain",
        "hashes",
        "id",
        "max_out",
        "n_hash",
        "out",
        "private",
        "prompt",
        "shared",
        "step_n",
    )

    def __init__(self, req: EngineRequest) -> None:
        self.id = req.id
        self.prompt = req.prompt_tokens
        self.max_out = req.max_tokens
        self.hashes = req.block_hashes
        # Only prefix blocks lying entirely inside the prompt are cacheable.
        self.n_hash = min(len(req.block_hashes), req.prompt_tokens // BLOCK_TOKENS)
        self.domain = req.domain
        self.out = 0  # output tokens emitted so far
        self.computed = 0  # tokens whose KV exists (shared prefix + private)
        self.shared = 0  # leading prefix blocks held by reference in the cache
        self.private = 0  # engine blocks held privately
        self.step_n = 0  # tokens scheduled in the current step
        self.admitted = False  # admitted once already (a later admission follows a preemption)


class Engine:
    """One engine replica. Drive it: ``add_request``, then ``step`` while ``has_work``."""

    def __init__(self, config: EngineConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._bs = config.block_size
        self._bpp = BLOCK_TOKENS // config.block_size  # engine blocks per prefix block
        self._total_blocks = config.kv_capacity_tokens // config.block_size
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._seqs: dict[str, _Seq] = {}
        self._private_total = 0
        # Prefix cache: hash -> reference count; unreferenced entries also sit
        # in the LRU (oldest first).
        self._refs: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._moe = ExpertRouter(config.moe, rng) if config.moe else None
        # Per-GPU bytes of KV per token (each TP rank holds its heads' share;
        # PP stages run one after another, so they add up to the whole model).
        self._attn_s_per_token = config.kv_bytes_per_token / config.tp / config.hbm_bytes_per_s
        self._overhead = 1.0 / (1.0 - config.allreduce_share)
        # Prefix-cache lookups at a request's FIRST admission, in tokens: the
        # hit rate routing can win (vLLM's exported prefix_cache_queries/hits).
        self.prefix_queries = 0
        self.prefix_hits = 0
        # Lookups when a preempted request is admitted again: mostly its own
        # blocks, so they say nothing about routing (vLLM's preempted_*).
        self.readmit_queries = 0
        self.readmit_hits = 0
        self.preemptions = 0
        self.rejected = 0  # requests refused by add_request (never fit)
        self.now = 0.0

    # -- public API ---------------------------------------------------------

    def refusal(self, prompt_tokens: int, max_tokens: int) -> str | None:
        """Why a request of these lengths could never run here (None: it can).

        vLLM answers such a request with a 400 before queueing it; callers do
        the same (the simulator counts it as rejected, the replica answers 400).
        """
        if prompt_tokens < 1 or max_tokens < 1:
            return "prompt_tokens and max_tokens must be >= 1"
        limit = self.config.max_model_len
        if limit is not None and prompt_tokens + max_tokens > limit:
            return (
                f"request of {prompt_tokens} prompt + {max_tokens} output tokens "
                f"exceeds max_model_len {limit}"
            )
        if prompt_tokens + max_tokens > self.config.kv_capacity_tokens:
            return (
                f"request needs {prompt_tokens + max_tokens} tokens of KV; "
                f"the engine holds {self.config.kv_capacity_tokens}"
            )
        return None

    def add_request(self, req: EngineRequest, now: float) -> None:
        """Queue a request (FIFO). Raises RequestRefused if it could never fit (:meth:`refusal`)."""
        if req.id in self._seqs:
            raise ValueError(f"duplicate request id {req.id!r}")
        why = self.refusal(req.prompt_tokens, req.max_tokens)
        if why is not None:
            self.rejected += 1
            raise RequestRefused(why)
        self.now = now
        seq = _Seq(req)
        self._seqs[req.id] = seq
        self._waiting.append(seq)

    def abort(self, req_id: str) -> None:
        """Drop a request wherever it is and free its KV. Unknown ids are ignored."""
        seq = self._seqs.pop(req_id, None)
        if seq is None:
            return
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._free(seq)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def kv_usage(self) -> float:
        """Share of KV blocks held by live sequences (cached-but-unreferenced blocks are free)."""
        referenced = (len(self._refs) - len(self._lru)) * self._bpp
        return (self._private_total + referenced) / self._total_blocks

    def stats(self) -> dict[str, Any]:
        moe = self._moe
        return {
            "running": len(self._running),
            "waiting": len(self._waiting),
            "kv_usage": self.kv_usage(),
            "kv_cached_blocks": len(self._refs) * self._bpp,
            "prefix_queries": self.prefix_queries,
            "prefix_hits": self.prefix_hits,
            "readmit_queries": self.readmit_queries,
            "readmit_hits": self.readmit_hits,
            "preemptions": self.preemptions,
            "rejected": self.rejected,
            "expert_tokens": list(moe.expert_tokens) if moe else [],
            "expert_overflow": list(moe.expert_overflow) if moe else [],
        }

    def step(self, now: float) -> StepResult:
        """Schedule and run one iteration starting at ``now``; return what it did.

        Call only while ``has_work()``. Emissions, finishes and preemptions take
        effect at the end of the step (``now + duration_s``).
        """
        self.now = now
        cfg = self.config
        bs = self._bs
        budget = budget_start = cfg.max_num_batched_tokens
        chunk = cfg.prefill_chunk
        running = self._running
        sched: list[_Seq] = []
        preempted: list[str] = []
        kv_read = 0  # context tokens before this step, summed over the batch

        # 1. Running sequences, oldest first; preempt from the newest end when
        #    the KV cache cannot hold the next tokens. (Hot loop: kept flat.)
        i = 0
        n_running = len(running)
        while i < n_running and budget > 0:
            seq = running[i]
            n = seq.prompt + seq.out - seq.computed
            if n > 1:  # prefill (or recompute) chunk; a decode is n == 1
                if n > chunk:
                    n = chunk
                if n > budget:
                    n = budget
            need = (seq.computed + n - seq.shared * BLOCK_TOKENS + bs - 1) // bs - seq.private
            if need > 0:
                if not self._reserve(need):
                    fitted = False
                    while len(running) - 1 > i:
                        victim = running.pop()
                        self._preempt(victim)
                        preempted.append(victim.id)
                        if self._reserve(need):
                            fitted = True
                            break
                    n_running = len(running)
                    if not fitted:
                        running.pop(i)
                        self._preempt(seq)
                        preempted.append(seq.id)
                        n_running -= 1
                        continue
                seq.private += need
                self._private_total += need
            seq.step_n = n
            sched.append(seq)
            kv_read += seq.computed
            budget -= n
            i += 1

        # 2. Admit from the waiting queue (not in a step that had to preempt).
        waiting = self._waiting
        watermark = int(cfg.admission_watermark * self._total_blocks)
        while waiting and budget > 0 and len(running) < cfg.max_num_seqs and not preempted:
            seq = waiting[0]
            target = seq.prompt + seq.out
            hit = self._acquire_prefix(seq, target)
            n = min(target - seq.computed, chunk, budget)
            need = -(-(seq.computed + n - seq.shared * BLOCK_TOKENS) // bs)
            if not self._reserve(need + watermark):
                self._release_prefix(seq)
                seq.computed = 0
                break
            waiting.popleft()
            seq.private = need
            self._private_total += need
            running.append(seq)
            if seq.admitted:
                self.readmit_queries += target
                self.readmit_hits += hit
            else:
                seq.admitted = True
                self.prefix_queries += target
                self.prefix_hits += hit
            seq.step_n = n
            sched.append(seq)
            kv_read += seq.computed
            budget -= n

        self.preemptions += len(preempted)
        result = StepResult(0.0, preempted=preempted)
        if not sched:
            return result

        # 3. Cost of the iteration.
        # Attention reads each scheduled sequence's whole context once.
        tokens = budget_start - budget
        kv_read += tokens
        domains: dict[str | None, int] | None = None
        if self._moe is not None:
            domains = {}
            for seq in sched:
                domains[seq.domain] = domains.get(seq.domain, 0) + seq.step_n
        result.duration_s = self._duration(tokens, kv_read, len(sched), domains)
        result.tokens = tokens
        result.batch = len(sched)

        # 4. Apply: KV grows, full prompt blocks enter the prefix cache,
        #    sequences that caught up emit a token.
        emitted = result.emitted
        finished = result.finished
        caching = cfg.prefix_caching
        for seq in sched:
            computed = seq.computed + seq.step_n
            seq.computed = computed
            if caching and seq.shared < seq.n_hash:
                self._register_blocks(seq)
            if computed == seq.prompt + seq.out:
                out = seq.out + 1
                seq.out = out
                emitted[seq.id] = 1
                if out >= seq.max_out:
                    finished.append(seq.id)
        for rid in finished:
            seq = self._seqs.pop(rid)
            running.remove(seq)
            self._free(seq)
        return result

    def check_invariants(self) -> None:
        """Raise AssertionError if the KV bookkeeping is inconsistent (for tests)."""
        seqs = list(self._running) + list(self._waiting)
        assert len(seqs) == len(self._seqs) == len({id(s) for s in seqs})
        assert self._private_total == sum(s.private for s in seqs)
        assert all(s.private == 0 and s.shared == 0 for s in self._waiting)
        expected_refs: dict[int, int] = {}
        for s in self._running:
            assert 0 <= s.shared <= s.n_hash
            assert s.computed <= s.prompt + s.out
            assert s.private == -(-(s.computed - s.shared * BLOCK_TOKENS) // self._bs)
            for h in s.hashes[: s.shared]:
                expected_refs[h] = expected_refs.get(h, 0) + 1
        for h, r in self._refs.items():
            assert r == expected_refs.get(h, 0), "reference count"
            assert (h in self._lru) == (r == 0), "LRU holds exactly the unreferenced entries"
        assert len(self._lru) <= len(self._refs)
        assert 0 <= self._free_blocks() <= self._total_blocks

    # -- cost model ---------------------------------------------------------

    def _duration(
        self, tokens: int, kv_read: int, batch: int, domains: dict[str | None, int] | None
    ) -> float:
        cfg = self.config
        pp = cfg.pp
        m = min(cfg.pp_microbatches, batch) if pp > 1 else 1
        linear = cfg.profile.time_s(tokens / m)
        if self._moe is not None and domains is not None:
            assert cfg.moe is not None
            factor = self._moe.route(domains)
            if cfg.moe_profile is not None:
                linear += cfg.moe_profile.time_s(tokens / m) * factor
            else:
                linear *= 1.0 + cfg.moe.moe_share * (factor - 1.0)
        one = linear + kv_read / m * self._attn_s_per_token
        if pp > 1:
            # GPipe schedule: m microbatches through pp stages of 1/pp of the
            # layers each take (m + pp - 1) stage slots; the idle share of the
            # pipeline is the bubble (pp - 1) / (m + pp - 1).
            one = (m + pp - 1) * one / pp
        return one * self._overhead

    # -- KV cache -----------------------------------------------------------

    def _free_blocks(self) -> int:
        return self._total_blocks - self._private_total - len(self._refs) * self._bpp

    def _reserve(self, need: int) -> bool:
        """Make ``need`` blocks free, evicting LRU cached blocks; False if impossible."""
        free = self._free_blocks()
        lru = self._lru
        refs = self._refs
        while free < need and lru:
            h, _ = lru.popitem(last=False)
            del refs[h]
            free += self._bpp
        return free >= need

    def _acquire_prefix(self, seq: _Seq, target: int) -> int:
        """Reference the cached leading prefix blocks of ``seq``; return hit tokens."""
        if not self.config.prefix_caching:
            return 0
        refs = self._refs
        hashes = seq.hashes
        m = 0
        n_hash = seq.n_hash
        while m < n_hash and hashes[m] in refs:
            m += 1
        # At least one token must be computed to produce logits (vLLM does the same).
        if m * BLOCK_TOKENS >= target:
            m = (target - 1) // BLOCK_TOKENS
        lru = self._lru
        for h in hashes[:m]:
            r = refs[h]
            if r == 0:
                del lru[h]
            refs[h] = r + 1
        seq.shared = m
        seq.computed = m * BLOCK_TOKENS
        return seq.computed

    def _release_prefix(self, seq: _Seq) -> None:
        # Tail blocks first, so LRU eviction takes a prefix's tail before its
        # head (a head without its tail still hits; a tail without its head
        # cannot, as the hashes are chained).
        refs = self._refs
        lru = self._lru
        for h in reversed(seq.hashes[: seq.shared]):
            r = refs[h] - 1
            refs[h] = r
            if r == 0:
                lru[h] = None
        seq.shared = 0

    def _register_blocks(self, seq: _Seq) -> None:
        """Move newly completed full prompt blocks from private KV into the cache."""
        refs = self._refs
        lru = self._lru
        s = seq.shared
        limit = min(seq.n_hash, seq.computed // BLOCK_TOKENS)
        if s >= limit:
            return
        hashes = seq.hashes
        while s < limit:
            h = hashes[s]
            r = refs.get(h)
            if r is None:
                refs[h] = 1
            else:
                # Another sequence computed the same block meanwhile: share
                # theirs and drop our copy.
                if r == 0:
                    del lru[h]
                refs[h] = r + 1
            s += 1
        moved = (s - seq.shared) * self._bpp
        seq.shared = s
        seq.private -= moved
        self._private_total -= moved

    def _free(self, seq: _Seq) -> None:
        self._private_total -= seq.private
        seq.private = 0
        self._release_prefix(seq)

    def _preempt(self, seq: _Seq) -> None:
        """Recompute-style preemption: drop the KV, requeue at the head."""
        self._free(seq)
        seq.computed = 0
        self._waiting.appendleft(seq)


def saturated_throughput(
    cfg: EngineConfig, turns: Iterable[tuple[int, int, str | None]], seed: int
) -> float | None:
    """Requests per second one engine sustains on ``turns`` (prompt tokens,
    output tokens, MoE domain), all queued at once and run offline to the
    end, nothing cached: the rate between the 10th and 90th percent of
    completions, which leaves out the ramp-up and the last stragglers.
    Turns the engine would refuse (larger than its KV cache) are left out,
    as a run leaves them out; None when none fits.
    """
    eng = Engine(cfg, random.Random(seed))
    k = 0
    for prompt, output, domain in turns:
        if eng.refusal(prompt, output) is None:
            eng.add_request(EngineRequest(f"c{k}", prompt, output, (), domain), 0.0)
            k += 1
    if k == 0:
        return None
    now = 0.0
    done: list[float] = []
    while eng.has_work():
        res = eng.step(now)
        now += res.duration_s
        done.extend(now for _ in res.finished)
    lo, hi = int(0.1 * len(done)), int(0.9 * len(done))
    return (hi - lo) / (done[hi - 1] - done[lo]) if hi - 1 > lo else len(done) / now

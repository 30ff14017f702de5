"""The simulated replica, driven over real loopback sockets.

Each test starts its own replica in the test's event loop (``run_replica``),
except the CLI tests, which run ``python -m router replica`` as a process.
No timed upper bounds except "configured timeout + >= 0.5 s slack".
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest import procs
from loadtest.engine import DEFAULT_REPLICA_PRESET
from loadtest.replica import SimReplicaConfig, SimReplicaState, run_replica
from loadtest.replica.cli import build_parser, configs_from_args, main
from loadtest.replica.faults import FaultError, parse_fault
from loadtest.replica.metrics import orca_header
from loadtest.replica.model import Job, ModelLoad
from loadtest.replica.openai import Chunks, Generation, chunk
from loadtest.replica.paced import PacedModel
from policies.prefix import block_hashes, chat_prompt_text, estimate_tokens

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "hello"}]}

Replica = tuple[str, SimReplicaState]


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    async with run_replica(SimReplicaConfig(name="r0", token_interval_s=0.001)) as r:
        yield r


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n"), text[-50:]
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e]


async def eventually(cond: Callable[[], Awaitable[bool] | bool], timeout: float = 1.5) -> None:
    """Poll ``cond`` (sync or async) until true; the timeout is the bound under
    test + slack."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = cond()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def stats(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(f"{url}/_sim/stats") as r:
        data: dict[str, int] = await r.json()
        return data


# -- the OpenAI surface -------------------------------------------------------


async def test_streaming_chat_format_and_deterministic_tokens(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, state = replica
    body = {**CHAT, "stream": True, "max_tokens": 5, "stream_options": {"include_usage": True}}
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [c["choices"][0]["delta"]["content"] for c in chunks[:5]]
    assert tokens == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 "]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:5]] == [None] * 4 + ["length"]
    usage = chunks[5]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5
    # What the client received is byte for byte what the replica says it sent.
    rec = state.requests[-1]
    assert rec.resp_sha256 == hashlib.sha256(raw).hexdigest()
    assert rec.outcome == "ok" and rec.chunks == 5
    assert await stats(http, url) == {
        "started": 1,
        "completed": 1,
        "aborted": 0,
        "errors": 0,
        "health_checks": 0,
        "in_progress": 0,
    }


async def test_streaming_completion_without_usage(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, _ = replica
    body = {"prompt": "abc", "stream": True, "max_tokens": 3}
    async with http.post(f"{url}/v1/completions", json=body) as r:
        events = sse_events(await r.read())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["t0 ", "t1 ", "t2 "]
    assert all(c["object"] == "text_completion" for c in chunks)


async def test_non_streaming_usage_and_lengths(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, _ = replica
    prompt = "x" * 400  # 100 tokens at 4 chars per token
    async with http.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4}) as r:
        data = await r.json()
    assert data["choices"][0]["text"] == "t0 t1 t2 t3 "
    assert data["usage"] == {"prompt_tokens": 100, "completion_tokens": 4, "total_tokens": 104}
    body = {**CHAT, "max_completion_tokens": 2}
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        data = await r.json()
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "t0 t1 "}
    async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
        data = await r.json()
    assert data["usage"]["completion_tokens"] == 16  # the configured default


async def test_bad_requests_are_openai_errors(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, _ = replica
    cases: list[tuple[Any, int]] = [
        ({**CHAT, "model": "nope"}, 404),
        ({**CHAT, "max_tokens": 0}, 400),
        ({**CHAT, "stream": "yes"}, 400),
        ({"model": "sim-model"}, 400),
    ]
    for body, status in cases:
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            assert r.status == status
            assert set((await r.json())["error"]) >= {"message", "type", "code"}
    async with http.post(f"{url}/v1/chat/completions", data=b"{not json") as r:
        assert r.status == 400
    async with http.post(f"{url}/v1/chat/completions", data=b"[" * 100_000) as r:
        assert r.status == 400
    huge = {**CHAT, "max_tokens": 131_072}  # + the prompt: over the context length
    async with http.post(f"{url}/v1/chat/completions", json=huge) as r:
        assert r.status == 400
        assert "maximum context length is 131072" in (await r.json())["error"]["message"]
    assert (await stats(http, url))["errors"] == 7


async def test_models_and_embeddings(replica: Replica, http: aiohttp.ClientSession) -> None:
    url, _ = replica
    async with http.get(f"{url}/v1/models") as r:
        data = await r.json()
    assert data["object"] == "list"
    assert data["data"][0]["id"] == "sim-model"
    assert data["data"][0]["owned_by"] == "vllm"
    body = {"model": "sim-model", "input": ["a", "b"]}
    async with http.post(f"{url}/v1/embeddings", json=body) as r:
        data = await r.json()
    vectors = [d["embedding"] for d in data["data"]]
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    async with http.post(f"{url}/v1/embeddings", json=body) as r:
        assert [d["embedding"] for d in (await r.json())["data"]] == vectors


# -- per-request faults -------------------------------------------------------


def test_parse_fault_grammar() -> None:
    f = parse_fault(" chunks=5 ; after=die;chunk_interval=0.05;gzip=1 ")
    assert (f.chunks, f.after, f.chunk_interval, f.gzip) == (5, "die", 0.05, True)
    assert parse_fault(None) == parse_fault("")
    for bad in ("status=200", "chunks=-1", "after=explode", "bogus=1", "gzip=maybe", "delay"):
        with pytest.raises(FaultError):
            parse_fault(bad)


async def test_unknown_fault_key_is_rejected(replica: Replica, http: aiohttp.ClientSession) -> None:
    url, _ = replica
    hdr = {"x-sim-fault": "stauts=503"}
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=hdr) as r:
        assert r.status == 400
        assert "stauts" in (await r.json())["error"]["message"]


async def test_status_knob(replica: Replica, http: aiohttp.ClientSession) -> None:
    url, _ = replica
    hdr = {"x-sim-fault": "status=503"}
    body = {**CHAT, "stream": True}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=hdr) as r:
        assert r.status == 503
        err = (await r.json())["error"]
        assert err["code"] == 503 and "x-dp-draining" not in r.headers
    s = await stats(http, url)
    assert (s["errors"], s["completed"], s["in_progress"]) == (1, 0, 0)


async def test_chunks_then_finish(replica: Replica, http: aiohttp.ClientSession) -> None:
    url, _ = replica
    hdr = {"x-sim-fault": "chunks=3;after=finish"}
    body = {**CHAT, "stream": True, "max_tokens": 10}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=hdr) as r:
        events = sse_events(await r.read())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["t0 ", "t1 ", "t2 ", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chunks_then_hang_until_client_leaves(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, state = replica
    hdr = {"x-sim-fault": "chunks=2;after=hang"}
    body = {**CHAT, "stream": True, "max_tokens": 10}
    got: list[bytes] = []
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=hdr) as r:
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.5):
                async for line in r.content:
                    if line.strip():
                        got.append(line)
        r.close()  # the client gives up: the replica must notice
    assert len(got) == 2
    assert (await stats(http, url))["in_progress"] in (0, 1)

    async def aborted() -> bool:
        return (await stats(http, url))["aborted"] == 1

    await eventually(aborted, timeout=1.5)  # "within 1 s" + 0.5 s slack
    assert state.model.load().running == 0
    assert state.requests[-1].outcome == "aborted"


async def test_hang_before_headers_counts_abort_on_client_timeout(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, state = replica
    hdr = {"x-sim-fault": "hang_before_headers=1"}
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=hdr, timeout=timeout):
            pass

    async def aborted() -> bool:
        return (await stats(http, url))["aborted"] == 1

    await eventually(aborted, timeout=1.5)
    assert state.requests[-1].status is None


async def test_client_disconnect_mid_stream_is_aborted_and_frees_the_model(
    http: aiohttp.ClientSession,
) -> None:
    model = PacedModel(0.05, max_running=1)
    async with run_replica(SimReplicaConfig(), model=model) as (url, state):
        body = {**CHAT, "stream": True, "max_tokens": 100}
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            n = 0
            async for line in r.content:
                n += bool(line.strip())
                if n == 3:
                    break
            r.close()

        async def aborted() -> bool:
            return (await stats(http, url))["aborted"] == 1

        await eventually(aborted)
        assert model.load().running == 0
        assert state.requests[-1].chunks < 10  # generation stopped, not run to the end


async def test_die_in_process_cuts_the_stream(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, state = replica
    hdr = {"x-sim-fault": "chunks=2;after=die"}
    body = {**CHAT, "stream": True, "max_tokens": 10}
    got: list[bytes] = []
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=hdr) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in r.content:
                if line.strip():
                    got.append(line)
    assert len(got) == 2 and b"[DONE]" not in b"".join(got)
    s = await stats(http, url)
    assert (s["errors"], s["aborted"], s["completed"]) == (1, 0, 0)
    assert state.requests[-1].outcome == "died"


async def test_chunk_interval_paces_tokens(replica: Replica, http: aiohttp.ClientSession) -> None:
    url, _ = replica
    hdr = {"x-sim-fault": "chunk_interval=0.05"}
    body = {**CHAT, "stream": True, "max_tokens": 5}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=hdr) as r:
        await r.read()
    assert loop.time() - t0 >= 4 * 0.05  # a lower bound only: never flaky


async def test_drain_marker(replica: Replica, http: aiohttp.ClientSession) -> None:
    url, _ = replica
    hdr = {"x-sim-fault": "drain_marker=1"}
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=hdr) as r:
        assert r.status == 503
        assert r.headers["x-dp-draining"] == "1"
        assert (await r.json())["error"]["code"] == "draining"


async def test_gzip_non_streaming_and_streaming(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, _ = replica
    hdr = {"x-sim-fault": "gzip=1"}
    async with http.post(
        f"{url}/v1/completions", json={"prompt": "p", "max_tokens": 2}, headers=hdr
    ) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert (await r.json())["choices"][0]["text"] == "t0 t1 "
    async with http.post(
        f"{url}/v1/completions",
        json={"prompt": "p", "max_tokens": 3, "stream": True},
        headers=hdr,
        auto_decompress=False,
    ) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        events = sse_events(gzip.decompress(await r.read()))
    assert events[-1] == "[DONE]" and len(events) == 4


async def test_hop_headers_and_request_echo(replica: Replica, http: aiohttp.ClientSession) -> None:
    url, state = replica
    hdr = {"x-sim-fault": "hop_headers=1", "x-request-id": "abc-123", "X-Custom": "v"}
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=hdr) as r:
        assert r.status == 200
        assert r.headers["Connection"] == "X-Hop"
        assert r.headers["Keep-Alive"] == "timeout=5"
        assert r.headers["Upgrade"] == "h2c"
        assert r.headers["Proxy-Authenticate"] == "x"
        assert r.headers["x-request-id"] == "abc-123"
        assert (await r.json())["id"] == "chatcmpl-abc-123"
    async with http.get(f"{url}/_sim/requests") as r:
        records = await r.json()
    assert records[-1]["id"] == "abc-123"
    assert records[-1]["headers"]["X-Custom"] == "v"
    assert records[-1]["body_len"] == len(json.dumps(CHAT))
    assert state.requests[-1].path == "/v1/chat/completions"
    async with http.post(f"{url}/_sim/reset") as r:
        assert r.status == 200
    assert (await stats(http, url))["started"] == 0
    assert not state.requests


# -- process knobs --------------------------------------------------------------


async def test_not_ready_for(http: aiohttp.ClientSession) -> None:
    async with run_replica(SimReplicaConfig(not_ready_for_s=30)) as (url, _):
        async with http.get(f"{url}/health") as r:
            assert r.status == 200
        async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503
        async with http.post(f"{url}/_sim/config", json={"not_ready_for": 0}) as r:
            assert (await r.json())["not_ready_for"] == 0
        async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200


async def test_flap_period_with_a_hand_driven_clock(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, state = replica
    t0 = state.clock()  # the replica is already ready at t0 (not_ready_for 0)
    now = [t0]
    state.clock = lambda: now[0]
    async with http.post(f"{url}/_sim/config", json={"flap_period": 2}) as r:
        assert r.status == 200
    seen = []
    for t in (0.5, 2.5, 4.5, 6.5):
        now[0] = t0 + t
        async with http.get(f"{url}/health") as r:
            h = r.status
        async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
            seen.append((h, r.status))
    assert seen == [(200, 200), (503, 503), (200, 200), (503, 503)]


async def test_runtime_status_drain_and_speed(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, state = replica
    async with http.post(f"{url}/_sim/config", json={"status": 500}) as r:
        assert (await r.json())["status"] == 500
    async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 500
    cfg = {"status": None, "drain": True, "speed": 3}
    async with http.post(f"{url}/_sim/config", json=cfg) as r:
        assert r.status == 200
    async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
        assert r.status == 503 and r.headers["x-dp-draining"] == "1"
    assert state.speed == 3.0
    for bad in ({"speed": 0}, {"status": 200}, {"drain": 1}, {"nope": 1}):
        async with http.post(f"{url}/_sim/config", json=bad) as r:
            assert r.status == 400, bad
    assert state.drain  # a rejected update changed nothing


async def test_api_key(http: aiohttp.ClientSession) -> None:
    async with run_replica(SimReplicaConfig(api_key="sekret")) as (url, _):
        async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 401
        bad = {"Authorization": "Bearer wrong"}
        async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=bad) as r:
            assert r.status == 401
        good = {"Authorization": "Bearer sekret"}
        async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=good) as r:
            assert r.status == 200
        async with http.get(f"{url}/v1/models") as r:
            assert r.status == 401
        assert (await stats(http, url))["errors"] == 2  # the two refused generations
        for path in ("/health", "/metrics", "/_sim/stats"):
            async with http.get(f"{url}{path}") as r:
                assert r.status == 200, path


# -- load reporting ---------------------------------------------------------------


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_vllm_metrics_parse_and_move_with_load(http: aiohttp.ClientSession) -> None:
    model = PacedModel(0.05, max_running=1)
    async with run_replica(SimReplicaConfig(), model=model) as (url, _):
        body = {**CHAT, "messages": [{"role": "user", "content": "y" * 600}], "max_tokens": 40}
        tasks = [
            asyncio.create_task(http.post(f"{url}/v1/chat/completions", json=body))
            for _ in range(3)
        ]

        async def queued() -> bool:
            return model.load().waiting == 2

        await eventually(queued)
        async with http.get(f"{url}/metrics") as r:
            fams = families(await r.text())
        running = fams["vllm:num_requests_running"].samples[0]
        assert running.labels == {"model_name": "sim-model", "engine": "0"}
        assert running.value == 1
        assert fams["vllm:num_requests_waiting"].samples[0].value == 2
        assert fams["vllm:kv_cache_usage_perc"].samples[0].value == 1.0
        assert fams["vllm:prefix_cache_queries"].type == "counter"
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        async def idle() -> bool:
            return model.load().running == 0 and model.load().waiting == 0

        await eventually(idle)
        # The same prompt again hits the prefix cache.
        async with http.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 1}):
            pass
        async with http.get(f"{url}/metrics") as r:
            fams = families(await r.text())
        hits = fams["vllm:prefix_cache_hits"].samples[0]
        assert hits.name == "vllm:prefix_cache_hits_total" and hits.value > 0


class ExpertModel(PacedModel):
    def load(self) -> ModelLoad:
        base = super().load()
        base.expert_tokens = [10, 30, 5]
        base.expert_overflow = [0, 4, 0]
        return base


async def test_sglang_metrics_and_expert_counters(http: aiohttp.ClientSession) -> None:
    cfg = SimReplicaConfig(metrics="sglang", models=("m-a", "m-b"))
    async with (
        run_replica(cfg, model=ExpertModel(0.0)) as (url, _),
        http.get(f"{url}/metrics") as r,
    ):
        fams = families(await r.text())
    for name in (
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:cache_hit_rate",
    ):
        assert fams[name].samples[0].labels == {"model_name": "m-a"}
    assert "vllm:num_requests_running" not in fams
    experts = {s.labels["expert"]: s.value for s in fams["dp_sim:expert_tokens"].samples}
    assert experts == {"0": 10, "1": 30, "2": 5}
    overflow = {s.labels["expert"]: s.value for s in fams["dp_sim:expert_overflow"].samples}
    assert overflow["1"] == 4


async def test_orca_header_both_formats(replica: Replica, http: aiohttp.ClientSession) -> None:
    url, _ = replica
    for fmt in ("TEXT", "JSON"):
        hdr = {"endpoint-load-metrics-format": fmt}
        async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=hdr) as r:
            value = r.headers["endpoint-load-metrics"]
        if fmt == "TEXT":
            assert value.startswith("TEXT named_metrics.kv_cache_usage_perc=")
            pairs = dict(p.split("=") for p in value.removeprefix("TEXT ").split(", "))
            assert float(pairs["named_metrics.num_requests_waiting"]) == 0.0
        else:
            report = json.loads(value.removeprefix("JSON "))
            assert set(report["named_metrics"]) >= {"kv_cache_usage_perc", "num_requests_waiting"}
    async with http.post(f"{url}/v1/chat/completions", json=CHAT) as r:
        assert "endpoint-load-metrics" not in r.headers
    assert orca_header("BIN", ModelLoad(0, 0, 0.0)) is None


class RecordingModel(PacedModel):
    """Keeps the jobs it was given; refuses prompts that contain "REFUSE"."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.jobs: list[Job] = []

    async def generate(self, job: Job) -> AsyncIterator[int]:
        self.jobs.append(job)
        if "REFUSE" in job.prompt_text:
            raise ValueError("prompt too long for the KV cache")
        async for n in super().generate(job):
            yield n


async def test_model_sees_parsed_job_and_domain(http: aiohttp.ClientSession) -> None:
    model = RecordingModel()
    async with run_replica(SimReplicaConfig(), model=model) as (url, _):
        body = {**CHAT, "messages": [{"role": "user", "content": "z" * 1000}], "max_tokens": 2}
        hdr = {"x-sim-domain": "code", "x-request-id": "j1"}
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=hdr) as r:
            assert r.status == 200
    job = model.jobs[0]
    assert (job.request_id, job.domain, job.max_tokens) == ("j1", "code", 2)
    assert job.prompt_tokens == estimate_tokens(len(job.prompt_text))
    assert job.block_hashes == block_hashes(chat_prompt_text(body["messages"]))
    assert len(job.block_hashes) == 3  # 1000 chars + role markers = 3 full blocks


async def test_model_refusal_is_an_error_before_or_in_band(
    http: aiohttp.ClientSession,
) -> None:
    async with run_replica(SimReplicaConfig(), model=RecordingModel()) as (url, state):
        body = {**CHAT, "messages": [{"role": "user", "content": "REFUSE"}]}
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            assert r.status == 400
            assert "KV cache" in (await r.json())["error"]["message"]
        async with http.post(f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status == 200  # headers went out before the engine refused
            events = sse_events(await r.read())
        assert json.loads(events[0])["error"]["code"] == 400
        assert events[-1] == "[DONE]"
        s = await stats(http, url)
        assert (s["errors"], s["in_progress"]) == (2, 0)
        assert state.requests[-1].status == 200


async def test_repeated_request_headers_are_joined(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, state = replica
    hdrs = [("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "5.6.7.8")]
    async with http.post(f"{url}/v1/chat/completions", json=CHAT, headers=hdrs) as r:
        assert r.status == 200
    rec = state.requests[-1]
    assert rec.headers["X-Forwarded-For"] == "1.2.3.4, 5.6.7.8"
    assert rec.peer is not None and rec.peer.startswith("127.0.0.1:")


async def test_engine_model_from_config(http: aiohttp.ClientSession) -> None:
    cfg = SimReplicaConfig(engine="llama2-7b", metrics="vllm")
    async with run_replica(cfg) as (url, _):
        body = {**CHAT, "stream": True, "max_tokens": 8}
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            events = sse_events(await r.read())
        assert events[-1] == "[DONE]" and len(events) == 9
        async with http.get(f"{url}/metrics") as r:
            assert "vllm:kv_cache_usage_perc" in families(await r.text())


# -- the paced model -----------------------------------------------------------


async def test_paced_model_fifo_queue_and_cancel() -> None:
    model = PacedModel(0.0, max_running=1)
    job = Job("a", "", 0, (), max_tokens=3)
    first = model.generate(job)
    assert await anext(first) == 1
    assert model.load().running == 1

    order: list[str] = []

    async def run(name: str) -> None:
        async for _ in model.generate(Job(name, "", 0, (), max_tokens=1)):
            order.append(name)

    b = asyncio.create_task(run("b"))
    c = asyncio.create_task(run("c"))
    d = asyncio.create_task(run("d"))
    await eventually(lambda: model.load().waiting == 3)
    c.cancel()  # a waiter that leaves the queue must not take or leak a slot
    await eventually(lambda: model.load().waiting == 2)
    assert model.load().running == 1
    await first.aclose()
    await asyncio.gather(b, d)
    assert order == ["b", "d"]
    assert model.load() == ModelLoad(running=0, waiting=0, kv_usage=0.0)


# -- the CLI, as a process ------------------------------------------------------------


async def start_cli(*args: str) -> tuple[procs.Child, list[int]]:
    """``dp-router replica ARGS`` as a process; its ports, from its ready lines."""
    child = await procs.spawn(
        "replica", procs.dp_router("replica", *args), stdout_pipe=True, cwd=ROOT
    )
    # Interpreter start-up on a busy 2-core machine.
    return child, await child.ready_ports(args.count("--port"), timeout=10)


async def test_cli_serves_several_ports_in_one_process(http: aiohttp.ClientSession) -> None:
    child, ports = await start_cli("--port", "0", "--port", "0", "--metrics", "sglang")
    try:
        assert len(set(ports)) == 2
        for port in ports:
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert "sglang:num_running_reqs" in await r.text()
        # A request that never ends must not hold up a clean shutdown.
        hanging = asyncio.create_task(
            http.post(
                f"http://127.0.0.1:{ports[0]}/v1/chat/completions",
                json=CHAT,
                headers={"x-sim-fault": "hang_before_headers=1"},
            )
        )

        async def hanging_arrived() -> bool:
            return (await stats(http, f"http://127.0.0.1:{ports[0]}"))["in_progress"] == 1

        await eventually(hanging_arrived, timeout=5)
    finally:
        child.send(signal.SIGTERM)
        # 2 x SHUTDOWN_TIMEOUT_S (0.5 s) for the hanging handler, plus slack.
        async with asyncio.timeout(5):
            rc = await child.proc.wait()
        await child.stop()
    assert rc == 0
    with pytest.raises(aiohttp.ClientError):
        await hanging


async def test_cli_die_exits_the_process(http: aiohttp.ClientSession) -> None:
    child, (port,) = await start_cli("--port", "0", "--token-interval", "0.001")
    try:
        hdr = {"x-sim-fault": "chunks=5;after=die"}
        body = {**CHAT, "stream": True, "max_tokens": 20}
        got = []
        async with http.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=hdr
        ) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                async for line in r.content:
                    if line.strip():
                        got.append(line)
        assert len(got) == 5
        async with asyncio.timeout(5):
            assert await child.proc.wait() == 1
    finally:
        await child.stop()


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "0", "--engine", "no-such-model"]) == 2
    assert main(["--port", "0", "--engine-opt", "novalue"]) == 2
    assert main(["--port", "0", "--metrics", "vllm", "--speed", "0"]) == 2
    assert "dp-router replica:" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("rid", ["chatcmpl-r-1", 'cmpl-odd"" id'])
def test_chunk_template_matches_full_serialization(kind: str, rid: str) -> None:
    gen = Generation(kind, "m", True, False, 50, "p", 1)  # type: ignore[arg-type]
    chunks = Chunks(gen, rid, 1234)
    for i in (0, 1, 7, 49):
        for finish in (None, "length"):
            assert chunks.event(i, finish) == chunk(gen, rid, 1234, i, finish)


async def test_reset_keeps_requests_in_flight_counted(
    replica: Replica, http: aiohttp.ClientSession
) -> None:
    url, _ = replica
    hdr = {"x-sim-fault": "hang_before_headers=1"}
    task = asyncio.create_task(http.post(f"{url}/v1/chat/completions", json=CHAT, headers=hdr))

    async def started() -> bool:
        return (await stats(http, url))["in_progress"] == 1

    await eventually(started)
    async with http.post(f"{url}/_sim/reset"):
        pass
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def settled() -> bool:
        s = await stats(http, url)
        return (s["started"], s["aborted"], s["in_progress"]) == (1, 1, 0)

    await eventually(settled)


# -- the default engine model -----------------------------------------------------


def test_cli_default_is_the_engine_model_and_paced_flags_select_pacing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def engine_of(*argv: str) -> str | None:
        return configs_from_args(build_parser().parse_args(["--port", "0", *argv]))[0].engine

    assert engine_of() == DEFAULT_REPLICA_PRESET == "llama3-8b+moe"
    assert engine_of("--paced") is None
    assert engine_of("--token-interval", "0.001") is None  # a paced flag asks for pacing
    assert engine_of("--engine", "llama2-7b", "--token-interval", "0.001") == "llama2-7b"
    assert main(["--port", "0", "--paced", "--engine", "llama3-8b"]) == 2
    assert "exclude each other" in capsys.readouterr().err


async def test_engine_replica_refuses_what_its_kv_cache_cannot_hold(
    http: aiohttp.ClientSession,
) -> None:
    cfg = SimReplicaConfig(engine="llama3-8b", engine_overrides={"kv_capacity_tokens": 4096})
    async with run_replica(cfg) as (url, _):
        for stream in (False, True):
            body = {**CHAT, "max_tokens": 5000, "stream": stream}
            async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                assert r.status == 400  # before any header, streaming or not
                err = (await r.json())["error"]
            assert err["type"] == "BadRequestError" and err["code"] == 400
            assert "tokens of KV" in err["message"]
        async with http.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 4}) as r:
            assert r.status == 200  # and it goes on serving
        s = await stats(http, url)
        assert (s["errors"], s["completed"], s["in_progress"]) == (2, 1, 0)


async def test_default_engine_replica_hits_the_cached_follow_up_and_counts_experts(
    http: aiohttp.ClientSession,
) -> None:
    """The realistic default: a follow-up turn finds its context cached (it skips
    that prefill), and the MoE variant reports per-expert counters."""
    async with run_replica(SimReplicaConfig(engine=DEFAULT_REPLICA_PRESET)) as (url, _):
        context = "lorem ipsum dolor sit amet " * 400  # ~2,700 tokens
        for content in (context, context + "and one more question"):
            body = {**CHAT, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
            async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                assert r.status == 200
        async with http.get(f"{url}/metrics") as r:
            got = families(await r.text())

    def values(name: str) -> list[float]:
        return [s.value for s in got[name].samples]

    (hits,), (queries,) = values("vllm:prefix_cache_hits"), values("vllm:prefix_cache_queries")
    assert hits >= estimate_tokens(len(context)) - 2 * 64  # the whole context but its tail block
    assert queries == pytest.approx(2 * estimate_tokens(len(context)), rel=0.02)
    assert values("dp_sim:prefix_cache_preempted_queries") == [0.0]
    assert len(values("dp_sim:expert_tokens")) == 8 and sum(values("dp_sim:expert_tokens")) > 0

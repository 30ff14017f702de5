"""The load generator against real simulated replicas on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys

import aiohttp
import pytest

from loadtest import loadgen
from loadtest.loadgen import LoadConfig, base_url, run_load, scrape_prefix_counters
from loadtest.replica import SimReplicaConfig, run_replica
from loadtest.workloads import Conversation, Turn
from policies.prefix import BLOCK_TOKENS, chat_prompt_text, estimate_tokens

FAST = SimReplicaConfig(name="fast", token_interval_s=0.001)


def chats(n: int, turns: int = 2, out: int = 5) -> list[Conversation]:
    return [
        Conversation(
            id=f"c{i}",
            arrival_s=0.01 * i,
            turns=tuple(
                Turn(prompt_text=f"hello {i} " * (t + 1), prompt_tokens=4, output_tokens=out + t)
                for t in range(turns)
            ),
        )
        for i in range(n)
    ]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_base_url_forms() -> None:
    for url in ("http://h:1", "http://h:1/", "http://h:1/v1", "http://h:1/v1/"):
        assert base_url(url) == "http://h:1"


def test_config_rejects_ambiguous_loops() -> None:
    with pytest.raises(ValueError):
        LoadConfig(target="http://x", rate=1.0, concurrency=2, requests=1)
    with pytest.raises(ValueError):
        LoadConfig(target="http://x", concurrency=2)  # no bound on the run


async def test_streaming_closed_loop_measures_every_turn() -> None:
    async with run_replica(FAST) as (url, state):
        cfg = LoadConfig(target=url, concurrency=2, requests=6)
        result = await run_load(cfg, chats(3), label="s")
        stats = state.stats.as_json()
    assert (result.requests, result.ok, result.errors) == (6, 6, {})
    assert stats["completed"] == 6
    # Each turn asked for 5 + t tokens and the replica honours max_tokens.
    assert sorted(r.output_tokens for r in result.records) == [5, 5, 5, 6, 6, 6]
    for rec in result.records:
        assert rec.ttft_s is not None and 0 < rec.ttft_s <= rec.e2e_s
        assert rec.tpot_s is not None
    assert result.ttft.count == 6 and result.tpot.count == 6
    assert result.extra["model"] == "sim-model"  # discovered from /v1/models
    # Sessions are announced to the gateway, one id per conversation.
    assert {r.headers.get("x-session-id") for r in state.requests} == {"c0", "c1", "c2"}


async def test_non_streaming_open_loop_reads_usage() -> None:
    async with run_replica(FAST) as (url, _):
        cfg = LoadConfig(target=url, rate=100.0, requests=4, stream=False)
        result = await run_load(cfg, chats(2, out=7))
    assert result.ok == 4
    assert sorted(r.output_tokens for r in result.records) == [7, 7, 8, 8]
    assert result.ttft.count == 0  # no TTFT without a stream
    assert result.e2e.count == 4


async def test_error_kinds_are_classified() -> None:
    async with run_replica(FAST) as (url, state):
        state.apply_config({"status": 503})
        cfg = LoadConfig(target=url, concurrency=1, requests=2, model="sim-model")
        http = await run_load(cfg, chats(1))
        state.apply_config({"status": None})
        cut = LoadConfig(
            target=url,
            concurrency=1,
            requests=1,
            model="sim-model",
            headers={"x-sim-fault": "chunks=2;after=die"},
        )
        truncated = await run_load(cut, chats(1, out=10))
    assert http.errors == {"http_503": 2} and http.ok == 0
    assert truncated.errors == {"truncated": 1}
    down = LoadConfig(
        target=f"http://127.0.0.1:{closed_port()}",
        requests=1,
        concurrency=1,
        model="m",
        timeout_s=2.0,
    )
    refused = await run_load(down, chats(1))
    assert refused.errors == {"connect": 1}


async def test_request_budget_stops_mid_conversation() -> None:
    async with run_replica(FAST) as (url, _):
        cfg = LoadConfig(target=url, rate=50.0, requests=3)
        result = await run_load(cfg, chats(2, turns=3))
    assert result.requests == 3


async def test_prefix_counters_scrape() -> None:
    """The scrape sums vLLM's prefix-cache counters, in tokens, over every replica."""
    prompt = "the same long prompt " * 40
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    tokens = estimate_tokens(len(chat_prompt_text(body["messages"])))
    async with (
        run_replica(FAST) as (url_a, _),
        run_replica(FAST) as (url_b, _),
        aiohttp.ClientSession() as session,
    ):
        urls = [url_a + "/metrics", url_b + "/metrics"]
        assert await scrape_prefix_counters(session, urls) == (0.0, 0.0)
        for _ in range(2):  # the second time, the prompt's full blocks are cached
            async with session.post(url_a + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
        queries, hits = await scrape_prefix_counters(session, urls) or (0.0, 0.0)
        assert queries == 2 * tokens
        assert hits == tokens // BLOCK_TOKENS * BLOCK_TOKENS
        # A replica that does not answer is left out, not counted as zero.
        dead = f"http://127.0.0.1:{closed_port()}/metrics"
        assert await scrape_prefix_counters(session, [dead]) is None


def test_cli_writes_json_and_summary(tmp_path, capsys) -> None:
    argv = [sys.executable, "-m", "router", "replica", "--port", "0", "--token-interval", "0.001"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("ready"), line
            port = int(line.split()[1])
            code = loadgen.main(
                [
                    "--target",
                    f"http://127.0.0.1:{port}",
                    "--concurrency",
                    "2",
                    "--requests",
                    "4",
                    "--json",
                    "--out",
                    str(tmp_path),
                    "--label",
                    "cli",
                ]
            )
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["label"] == "cli" and printed["ok"] == 4
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["requests"] == 4
    assert "| TTFT" in (tmp_path / "summary.md").read_text()


def test_time_bounded_workload_continues_across_batches(monkeypatch) -> None:
    monkeypatch.setattr(loadgen, "WORKLOAD_BATCH", 5)
    stream = loadgen.conversations("alpaca", seed=1, requests=None, rate=10.0)
    convs = list(itertools.islice(stream, 12))
    ids = [c.id for c in convs]
    assert len(set(ids)) == 12  # later batches get unique ids
    arrivals = [c.arrival_s for c in convs]
    assert arrivals == sorted(arrivals)  # and arrival times keep increasing


def test_unknown_workload_fails_before_the_run(capsys) -> None:
    code = loadgen.main(["--target", "http://127.0.0.1:9", "--workload", "nope", "--requests", "1"])
    assert code == 2
    assert "unknown workload" in capsys.readouterr().err


def test_open_loop_without_timestamps_is_refused(capsys) -> None:
    # A synthetic workload with no --rate would arrive all at t=0: refuse it.
    code = loadgen.main(["--target", "http://127.0.0.1:9", "--workload", "chat", "--duration", "1"])
    assert code == 2
    assert "--rate or --concurrency" in capsys.readouterr().err


async def test_think_time_past_the_deadline_ends_the_conversation() -> None:
    conv = Conversation(
        "long",
        0.0,
        (Turn("a", 1, 2), Turn("b", 1, 2, think_time_s=30.0)),
    )
    async with run_replica(FAST) as (url, _):
        cfg = LoadConfig(target=url, rate=1.0, duration_s=1.0)
        result = await asyncio.wait_for(run_load(cfg, [conv]), 1.0 + 5.0)
    assert result.requests == 1


def test_compare_saved_runs(tmp_path, capsys) -> None:
    from loadtest.report import RequestRecord, summarize, write_results

    for label in ("round_robin", "queue_depth"):
        rec = RequestRecord("c", 0, 0.0, 0.5, ttft_s=0.1, output_tokens=3, replica="r1")
        write_results([summarize([rec], wall_s=1.0, label=label)], tmp_path / label)
    code = loadgen.main(
        ["--compare", str(tmp_path / "round_robin"), str(tmp_path / "queue_depth" / "results.json")]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "round_robin" in lines[2] and "queue_depth" in lines[3]
    assert loadgen.main(["--compare", str(tmp_path / "missing")]) == 2


def test_header_flag_reaches_the_server(capsys) -> None:
    argv = [sys.executable, "-m", "router", "replica", "--port", "0", "--token-interval", "0"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline().split()[1])
            code = loadgen.main(
                [
                    "--target",
                    f"http://127.0.0.1:{port}",
                    "--concurrency",
                    "1",
                    "--requests",
                    "2",
                    "--header",
                    "x-sim-fault: status=429",
                    "--json",
                ]
            )
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    assert code == 1  # nothing succeeded
    assert json.loads(capsys.readouterr().out)["errors"] == {"http_429": 2}
    assert loadgen.main(["--target", "http://x", "--requests", "1", "--header", "bad"]) == 2


async def test_prefix_hit_rate_and_domain_header() -> None:
    # Turn 2 repeats turn 1's prompt and extends it: its leading blocks are cached.
    first = "a long shared context " * 60
    conv = Conversation(
        "c0",
        0.0,
        (Turn(first, 330, 2), Turn(first + " and more", 332, 2)),
        domain="code",
    )
    async with run_replica(FAST) as (url, state):
        cfg = LoadConfig(target=url, concurrency=1, requests=2, replica_metrics=[url + "/metrics"])
        result = await run_load(cfg, [conv])
        domains = {r.headers.get("x-sim-domain") for r in state.requests}
    assert result.ok == 2
    assert result.prefix_hit_rate is not None and 0 < result.prefix_hit_rate < 1
    assert domains == {"code"}

"""Sticky sessions through a real gateway, with the in-memory store (the
embedded default): pins hold, move for a reason that is reported, never past
the load bound, and bad keys are the client's error (docs/sessions.md)."""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Any

import aiohttp

from router.replicas import AdminState
from tests.harness import admin, base, chat_body, gateway, gateway_config, replicas


async def _post(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, str | None, str | None, Any]:
    payload = {**chat_body(), **body}
    async with session.post(url + "/v1/chat/completions", json=payload, headers=headers) as r:
        data = await r.json()
        return r.status, r.headers.get("X-Dp-Replica"), r.headers.get("X-Dp-Session"), data


async def test_a_session_stays_on_its_replica_and_says_so() -> None:
    async with replicas(3) as urls, gateway(gateway_config(urls)) as gw:
        async with aiohttp.ClientSession() as s:
            placed: dict[str, str] = {}
            for turn in range(4):
                for i in range(12):
                    status, replica, how, _ = await _post(
                        s, base(gw), {"X-Session-ID": f"conv-{i}"}
                    )
                    assert status == 200
                    assert replica is not None
                    if turn == 0:
                        assert how == "new"
                        placed[f"conv-{i}"] = replica
                    else:
                        assert how == "hit"
                        assert replica == placed[f"conv-{i}"]
            # Sessions are spread by the policy, not piled on one replica.
            assert len(set(placed.values())) > 1
            # No session: no header.
            status, _, how, _ = await _post(s, base(gw))
            assert status == 200 and how is None
            metrics = await (await s.get(admin(gw) + "/metrics")).text()
            assert 'dp_router_session_requests_total{result="hit"} 36.0' in metrics
            assert 'dp_router_session_requests_total{result="new"} 12.0' in metrics


async def test_a_draining_replica_loses_its_sessions_with_the_reason() -> None:
    async with replicas(2) as urls, gateway(gateway_config(urls)) as gw:
        async with aiohttp.ClientSession() as s:
            headers = {"X-Session-ID": "moving"}
            _, first, _, _ = await _post(s, base(gw), headers)
            assert first is not None
            gw.registry.update(first, admin=AdminState.DRAINING)
            _, second, how, _ = await _post(s, base(gw), headers)
            assert second != first
            assert how == "repinned:drained"
            # The new pin holds, even once the old replica is back.
            gw.registry.update(first, admin=AdminState.ACTIVE)
            _, third, how, _ = await _post(s, base(gw), headers)
            assert (third, how) == (second, "hit")
            view = await (await s.get(admin(gw) + "/admin/sessions/moving")).json()
            assert view["replica"] == second
            assert view["store"] == "memory"
            assert 0 < view["ttl_s"] <= 3600
            assert view["pinned_replica"]["routable"] is True
            metrics = await (await s.get(admin(gw) + "/metrics")).text()
            assert 'dp_router_session_repins_total{reason="drained"} 1.0' in metrics


async def test_body_fields_can_name_the_session() -> None:
    async with replicas(3) as urls:
        cfg = gateway_config(
            urls, sessions={"sources": ["header:x-session-id", "body:prompt_cache_key"]}
        )
        async with gateway(cfg) as gw, aiohttp.ClientSession() as s:
            seen = set()
            for _ in range(5):
                status, replica, how, _ = await _post(s, base(gw), prompt_cache_key="tenant-7")
                assert status == 200
                seen.add(replica)
            assert len(seen) == 1 and how == "hit"
            # `user` is not a configured source here: no session.
            _, _, how, _ = await _post(s, base(gw), user="alice")
            assert how is None


async def test_bad_session_keys_are_the_clients_error() -> None:
    async with replicas(1) as urls:
        cfg = gateway_config(urls, sessions={"sources": ["header:x-session-id", "body:user"]})
        async with gateway(cfg) as gw, aiohttp.ClientSession() as s:
            status, _, _, data = await _post(s, base(gw), {"X-Session-ID": "x" * 300})
            assert status == 400
            assert data["error"]["code"] == "invalid_session_key"
            assert "256" in data["error"]["message"]
            status, _, _, data = await _post(s, base(gw), user=["not", "a", "string"])
            assert status == 400
            assert data["error"]["code"] == "invalid_session_key"
            metrics = await (await s.get(admin(gw) + "/metrics")).text()
            assert 'dp_router_errors_total{reason="invalid_session_key"} 2.0' in metrics


async def test_a_hot_session_never_pushes_its_replica_past_the_load_bound() -> None:
    """M18: 3 replicas, 80% of requests on 3 session keys, epsilon 0.25. At
    every assignment the chosen replica holds at most
    ceil((1 + eps) * (total + 1) / n); most turns of a hot key stay sticky,
    and the moves are counted as `overloaded`."""
    async with replicas(3, token_interval_s=0.01) as urls:
        cfg = gateway_config(
            urls, routing={"load_bound_epsilon": 0.25, "session_load_floor": 0, "seed": 3}
        )
        async with gateway(cfg) as gw:
            violations: list[tuple[int, int]] = []
            original = gw.router.decide

            def checked(request: Any, pin: Any, snapshot: Any, now: float, **kw: Any) -> Any:
                routed = original(request, pin, snapshot, now, **kw)
                if hasattr(routed, "replica"):
                    total = sum(r.load.in_flight for r in snapshot)
                    bound = math.ceil(1.25 * (total + 1) / 3)
                    held = routed.replica.load.in_flight
                    if held + 1 > bound:
                        violations.append((held + 1, bound))
                return routed

            gw.router.decide = checked  # type: ignore[method-assign]
            hot = [f"hot-{i}" for i in range(3)]
            results: list[tuple[str, str | None, str | None]] = []

            async def client(s: aiohttp.ClientSession, n: int) -> None:
                for j in range(n):
                    key = hot[j % 3] if j % 5 else f"cold-{n}-{j}"
                    status, replica, how, _ = await _post(
                        s, base(gw), {"X-Session-ID": key}, max_tokens=20
                    )
                    assert status == 200
                    results.append((key, replica, how))

            async with aiohttp.ClientSession() as s:
                await asyncio.gather(*(client(s, 12) for _ in range(30)))
            assert not violations
            hot_turns = [(k, how) for k, _, how in results if k.startswith("hot")]
            hits = sum(1 for _, how in hot_turns if how == "hit")
            assert hits / len(hot_turns) >= 0.7
            reasons = collections.Counter(how for _, how in hot_turns)
            assert reasons["repinned:overloaded"] >= 1
            async with aiohttp.ClientSession() as s:
                metrics = await (await s.get(admin(gw) + "/metrics")).text()
            assert 'dp_router_session_repins_total{reason="overloaded"}' in metrics


async def test_admin_session_view_needs_the_token() -> None:
    async with replicas(1) as urls:
        cfg = gateway_config(urls, admin={"token": "sekrit"})
        async with gateway(cfg) as gw, aiohttp.ClientSession() as s:
            async with s.get(admin(gw) + "/admin/sessions/abc") as r:
                assert r.status == 401
            auth = {"Authorization": "Bearer sekrit"}
            async with s.get(admin(gw) + "/admin/sessions/abc", headers=auth) as r:
                view = await r.json()
                assert r.status == 200
                assert view["replica"] is None
            async with s.get(admin(gw) + "/admin/sessions/abc?source=body:nope", headers=auth) as r:
                assert r.status == 400


async def test_sessions_can_be_turned_off() -> None:
    async with replicas(2) as urls:
        cfg = gateway_config(urls, sessions={"enabled": False})
        async with gateway(cfg) as gw, aiohttp.ClientSession() as s:
            status, _, how, _ = await _post(s, base(gw), {"X-Session-ID": "a"})
            assert status == 200 and how is None


async def test_a_retry_moves_the_attempt_not_the_session() -> None:
    """One 503 from the pinned replica: the request is retried elsewhere, but
    the session's pin (and its KV cache) stays where it was."""
    async with replicas(2) as urls, gateway(gateway_config(urls)) as gw:
        async with aiohttp.ClientSession() as s:
            headers = {"X-Session-ID": "steady"}
            _, home, how, _ = await _post(s, base(gw), headers)
            assert how == "new"
            async with s.post(f"http://{home}/_sim/config", json={"status": 503}) as r:
                assert r.status == 200
            status, other, how, _ = await _post(s, base(gw), headers)
            async with s.post(f"http://{home}/_sim/config", json={"status": None}) as r:
                assert r.status == 200
            assert status == 200 and other != home
            assert how == "repinned:failed"
            _, again, how, _ = await _post(s, base(gw), headers)
            assert (again, how) == (home, "hit")

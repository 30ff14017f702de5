"""M35/M50: hostile bodies get a 400 in OpenAI shape and never reach a replica."""

from __future__ import annotations

import json

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.errors import GatewayError
from router.request_info import parse_body, summarize
from tests.harness import MODEL, base, gateway, gateway_config, replicas, stats

HOSTILE = [
    b"",
    b"{",
    b'{"model": "sim-model", "messages": [',
    b"[1, 2, 3]",
    b'"just a string"',
    b'{"model": ["sim-model"], "messages": []}',
    b'{"model": 7, "messages": []}',
    b'{"model": "sim-model", "stream": "yes", "messages": []}',
    b'{"model": "sim-model", "max_tokens": -1, "messages": []}',
    b'{"model": "sim-model", "max_tokens": "10", "messages": []}',
    b'{"model": "sim-model", "messages": "hi"}',
    b'{"model": "sim-model", "messages": [1]}',
    b'{"model": "sim-model", "messages": [], "x": "\xff\xfe"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
]


async def test_hostile_bodies_are_400_and_never_forwarded(
    client: aiohttp.ClientSession,
) -> None:
    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        for body in HOSTILE:
            async with client.post(
                base(gw) + "/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 400, body[:60]
                err = (await resp.json())["error"]
                assert err["type"] == "invalid_request_error"
                assert "Traceback" not in err["message"]
        assert (await stats(client, urls[0]))["started"] == 0
        # and the gateway still serves
        async with client.post(
            base(gw) + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        ) as resp:
            assert resp.status == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "model": json_values | st.just(MODEL),
        "stream": json_values,
        "max_tokens": json_values,
        "messages": json_values,
        "prompt": json_values,
        "input": json_values,
    },
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    endpoint=st.sampled_from(["chat", "completions", "embeddings"]),
    body=st.one_of(request_like.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)),
)
def test_parser_fuzz_only_documented_errors(endpoint: str, body: bytes) -> None:
    """Parsing raises nothing but GatewayError(400), and is deterministic."""
    try:
        first = summarize(endpoint, parse_body(body))
    except GatewayError as exc:
        assert exc.kind.status == 400
        return
    second = summarize(endpoint, parse_body(body))
    assert (first.model, first.stream, first.max_tokens, first.prompt_tokens) == (
        second.model,
        second.stream,
        second.max_tokens,
        second.prompt_tokens,
    )
    assert isinstance(first.model, str) and first.model
    assert isinstance(first.stream, bool)


async def test_unknown_paths_and_methods_are_openai_shaped(
    client: aiohttp.ClientSession,
) -> None:
    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        async with client.get(base(gw) + "/v1/chat/completions") as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "POST"
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
        async with client.post(base(gw) + "/v2/anything", json={}) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        async with client.get(base(gw) + "/v1/models") as resp:
            assert resp.status == 200
        assert (await stats(client, urls[0]))["started"] == 0

"""What routing reads from each endpoint's body, and the 400s for the rest."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import GatewayError
from router.request_info import ENDPOINTS, parse_body, summarize, summarize_form


@pytest.mark.parametrize(
    ("endpoint", "body", "stream", "text_has"),
    [
        (
            "chat",
            {"messages": [{"role": "user", "content": "hi there"}], "stream": True},
            True,
            "hi there",
        ),
        ("completions", {"prompt": ["a", "b"]}, False, "a"),
        ("embeddings", {"input": "vector me", "stream": True}, False, "vector me"),
        (
            "responses",
            {"input": "tell me", "instructions": "be brief", "stream": True},
            True,
            "be brief",
        ),
        (
            "responses",
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "q"}]}]},
            False,
            "q",
        ),
        ("rerank", {"query": "which", "documents": ["x", "y"]}, False, "which"),
        ("score", {"text_1": "a cat", "text_2": ["a dog"]}, False, "a dog"),
        ("tokenize", {"prompt": "count me"}, False, "count me"),
        ("tokenize", {"messages": [{"role": "user", "content": "count"}]}, False, "count"),
        ("detokenize", {"tokens": [1, 2, 3]}, False, ""),
    ],
)
def test_each_endpoint_yields_model_stream_and_prompt(
    endpoint: str, body: dict, stream: bool, text_has: str
) -> None:
    summary = summarize(endpoint, {"model": "m", **body})
    assert summary.model == "m"
    assert summary.stream is stream
    assert text_has in summary.prompt_text
    assert summary.prompt_tokens == -(-len(summary.prompt_text) // 4)


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("responses", {"input": 7}),
        ("responses", {"input": "x", "instructions": ["no"]}),
        ("rerank", {"query": "q"}),
        ("rerank", {"documents": ["d"]}),
        ("score", {"text_1": "a"}),
        ("tokenize", {}),
        ("detokenize", {"tokens": "1 2 3"}),
        ("chat", {"messages": "hi"}),
    ],
)
def test_malformed_bodies_are_400(endpoint: str, body: dict) -> None:
    with pytest.raises(GatewayError) as info:
        summarize(endpoint, {"model": "m", **body})
    assert info.value.status == 400


def test_responses_take_max_output_tokens() -> None:
    s = summarize("responses", {"model": "m", "input": "x", "max_output_tokens": 40})
    assert s.max_tokens == 40


def test_every_route_kind_is_known() -> None:
    kinds = set(ENDPOINTS.values())
    assert kinds == {
        "chat",
        "completions",
        "embeddings",
        "responses",
        "rerank",
        "score",
        "tokenize",
        "detokenize",
        "audio",
    }
    for kind in kinds - {"audio"}:
        with pytest.raises(GatewayError):
            summarize(kind, parse_body(b'{"model": 1}'))


def form(fields: dict[str, bytes], boundary: str = "XyZ") -> tuple[bytes, str]:
    parts = []
    for name, value in fields.items():
        disposition = f'form-data; name="{name}"'
        if name == "file":
            disposition += '; filename="a.wav"'
        parts.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_multipart_reads_model_and_stream_and_skips_the_file() -> None:
    audio = b"RIFF" + bytes(range(256)) * 400 + b'name="model"\r\n\r\nevil'
    body, ctype = form({"file": audio, "model": b"whisper-1", "stream": b"true"})
    s = summarize_form(body, ctype)
    assert (s.model, s.stream, s.prompt_text) == ("whisper-1", True, "")
    body, ctype = form({"model": b"whisper-1", "file": audio}, boundary="----b0undary")
    assert summarize_form(body, f'{ctype.split(";")[0]}; boundary="----b0undary"').model == (
        "whisper-1"
    )


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"{}", "application/json"),
        (b"--x\r\n\r\n", "multipart/form-data"),  # no boundary
        (form({"file": b"abc"})[0], form({})[1]),  # no model field
        (form({"model": b"\xff\xfe"})[0], form({})[1]),  # not UTF-8
        (form({"model": b"m" * 300})[0], form({})[1]),  # too long for a model name
    ],
)
def test_multipart_without_a_usable_model_is_400(body: bytes, ctype: str) -> None:
    with pytest.raises(GatewayError) as info:
        summarize_form(body, ctype)
    assert info.value.status == 400


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.recursive(
            st.none()
            | st.booleans()
            | st.floats(allow_nan=False, allow_infinity=False)
            # orjson reads integers beyond 64 bits as floats (documented)
            | st.integers(min_value=-(2**63), max_value=2**63 - 1)
            | st.text(),
            lambda children: st.lists(children) | st.dictionaries(st.text(), children),
            max_leaves=8,
        ).map(lambda v: json.dumps({"v": v}).encode()),
        st.binary(max_size=40).map(lambda b: b"{" + b),
    ),
    st.sampled_from([b"", b" ", b"\n\t ", b"x", b"{}", b"\x00"]),
)
def test_parse_body_agrees_with_json_loads(body: bytes, tail: bytes) -> None:
    """orjson, then the json module for what orjson refuses: the gateway
    accepts and refuses what json.loads does, and reads the same values."""
    body += tail

    def outcome(parse: Callable[[bytes], object]) -> object:
        try:
            return ("ok", parse(body))
        except (ValueError, GatewayError, RecursionError):
            return ("refused",)

    expected = outcome(json.loads)
    if expected[0] == "ok" and not isinstance(expected[1], dict):
        expected = ("refused",)  # a JSON value that is not an object
    assert outcome(parse_body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": "\\ud800"}',
        b'\xef\xbb\xbf{"a": 1}',
        '{"a": 1}'.encode("utf-16"),
    ],
)
def test_parse_body_accepts_what_json_loads_accepts_beyond_rfc_8259(body: bytes) -> None:
    """orjson refuses these; the json module, as before orjson, reads them."""
    assert parse_body(body) == json.loads(body) or body == b'{"a": NaN}'


def test_deep_nesting_is_named() -> None:
    with pytest.raises(GatewayError) as info:
        parse_body(b'{"a":' * 2000 + b"1" + b"}" * 2000)
    assert "nested too deeply" in info.value.message

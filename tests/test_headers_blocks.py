"""The data path's one-pass header blocks say exactly what the pair lists
they replace say, once rendered (router/headers.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.headers import (
    HOP_BY_HOP,
    client_response_block,
    client_response_headers,
    render_fields,
    upstream_request_block,
    upstream_request_headers,
)
from router.http_server import _FRAMING_FIELDS
from router.upstream import _OWN_FIELDS

names = st.sampled_from(
    [
        *HOP_BY_HOP,
        b"x-a",
        b"content-type",
        b"authorization",
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-request-id",
        b"x-dp-replica",
        b"endpoint-load-metrics",
    ]
) | st.from_regex(rb"\A[a-z][a-z0-9-]{0,10}\Z")
values = st.from_regex(rb"\A[ -~]{0,20}\Z")
pairs = st.lists(st.tuples(names, values), max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    headers=pairs,
    api_key=st.sampled_from(["", "upstream-key"]),
    extra=st.sampled_from([None, (b"endpoint-load-metrics-format", b"TEXT")]),
)
def test_request_block_is_the_rendered_list(headers, api_key, extra) -> None:
    kwargs = dict(
        request_id="r-1",
        forwarded_for="10.0.0.1",
        forwarded_proto=b"http",
        api_key=api_key,
        extra=extra,
    )
    listed = upstream_request_headers(headers, **kwargs)
    rendered = render_fields(listed, _OWN_FIELDS, "request")
    # The parser's collected Connection values strip exactly what a scan does.
    collected = [v for n, v in headers if n == b"connection"] or None
    assert upstream_request_block(headers, connection=collected, **kwargs) == rendered


@settings(max_examples=200, deadline=None)
@given(
    headers=pairs,
    replica=st.sampled_from([None, b"a"]),
    session=st.sampled_from([None, "hit", "repinned:overloaded"]),
)
def test_response_block_is_the_rendered_list(headers, replica, session) -> None:
    kwargs = dict(request_id="r-1", replica=replica, session=session)
    listed = client_response_headers(headers, **kwargs)
    rendered = render_fields(listed, _FRAMING_FIELDS, "response")
    collected = [v for n, v in headers if n == b"connection"] or None
    assert client_response_block(headers, connection=collected, **kwargs) == rendered


@pytest.mark.parametrize("bad", [(b"x-a", b"1\r\nx-b: 2"), (b"x-a", b"\n"), (b"x-a\r", b"1")])
def test_render_fields_refuses_cr_and_lf(bad) -> None:
    """The general path checks; the data path's blocks take fields the parsers
    (llhttp) already refused CR, LF and NUL in (tests/test_http_server.py,
    tests/test_upstream.py) and add only the gateway's own values."""
    with pytest.raises(ValueError):
        render_fields([bad], _OWN_FIELDS, "request")

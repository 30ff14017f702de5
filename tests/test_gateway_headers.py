"""M50: the hop-by-hop filter never lets a banned header through."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from router.headers import HOP_BY_HOP, client_response_headers, upstream_request_headers

names = st.sampled_from(
    [
        *HOP_BY_HOP,
        "X-A",
        "x-b",
        "Content-Type",
        "Authorization",
        "Host",
        "Content-Length",
        "X-Forwarded-For",
        "traceparent",
    ]
) | st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,10}\Z")
values = st.from_regex(r"\A[ -~]{0,20}\Z")


@settings(max_examples=400, deadline=None)
@given(pairs=st.lists(st.tuples(names, values), max_size=12), listed=st.lists(names, max_size=3))
def test_filter_strips_hop_by_hop_and_connection_listed(pairs, listed) -> None:
    raw: CIMultiDict[str] = CIMultiDict(pairs)
    if listed:
        raw.add("Connection", ", ".join(listed))
    banned = set(HOP_BY_HOP) | {n.lower() for n in listed}
    for value in raw.getall("Connection", ()):
        banned |= {t.strip().lower() for t in value.split(",") if t.strip()}
    proxy = CIMultiDictProxy(raw)
    up = upstream_request_headers(
        proxy, request_id="r", forwarded_for="127.0.0.1", forwarded_proto="http", api_key=""
    )
    down = client_response_headers(proxy, request_id="r", replica="a")
    for out in (up, down):
        assert not {k.lower() for k in out} & (
            banned - {"x-request-id", "x-dp-replica", "x-forwarded-for", "x-forwarded-proto"}
        )
    assert "host" not in {k.lower() for k in up}
    assert up["X-Forwarded-For"] == "127.0.0.1"

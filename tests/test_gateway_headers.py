"""M50: the hop-by-hop filter never lets a banned header through."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router.headers import (
    HOP_BY_HOP,
    ForwardedFor,
    client_response_headers,
    request_id_from,
    upstream_request_headers,
)

names = st.sampled_from(
    [
        *HOP_BY_HOP,
        b"x-a",
        b"x-b",
        b"content-type",
        b"authorization",
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-request-id",
        b"traceparent",
    ]
) | st.from_regex(rb"\A[a-z][a-z0-9-]{0,10}\Z")
values = st.from_regex(rb"\A[ -~]{0,20}\Z")


@settings(max_examples=1000, deadline=None)
@given(pairs=st.lists(st.tuples(names, values), max_size=12), listed=st.lists(names, max_size=3))
def test_filter_strips_hop_by_hop_and_connection_listed(pairs, listed) -> None:
    raw = list(pairs)
    if listed:
        raw.append((b"connection", b", ".join(listed)))
    banned = set(HOP_BY_HOP)
    for name, value in raw:
        if name == b"connection":
            banned |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    up = upstream_request_headers(
        raw, request_id="r", forwarded_for="127.0.0.1", forwarded_proto=b"http", api_key=""
    )
    down = client_response_headers(raw, request_id="r", replica=b"a")
    ours = {b"x-request-id", b"x-dp-replica", b"x-forwarded-for", b"x-forwarded-proto"}
    for out in (up, down):
        assert not {k for k, _ in out} & (banned - ours)
        assert [v for k, v in out if k == b"x-request-id"] == [b"r"]  # one id, ours
    assert b"host" not in {k for k, _ in up} and b"content-length" not in {k for k, _ in up}
    assert [v for k, v in up if k == b"x-forwarded-for"] == [b"127.0.0.1"]
    # Everything else passes through, in order.
    kept = [(k, v) for k, v in raw if k not in banned | ours | {b"host", b"content-length"}]
    assert [(k, v) for k, v in up if k not in ours] == kept


def test_api_key_replaces_the_clients_authorization() -> None:
    up = upstream_request_headers(
        [(b"authorization", b"Bearer client"), (b"x-a", b"1")],
        request_id="r",
        forwarded_for="10.0.0.1",
        forwarded_proto=b"http",
        api_key="upstream-key",
    )
    assert [v for k, v in up if k == b"authorization"] == [b"Bearer upstream-key"]


def test_request_ids_are_tokens_or_fresh() -> None:
    assert request_id_from(b"abc-123.x:y") == "abc-123.x:y"
    for bad in (b"a\nFAKE log", b"", b"x" * 200, b"sp ace", None):
        fresh = request_id_from(bad)
        assert fresh != (bad or b"").decode("latin-1") and "\n" not in fresh
    assert request_id_from(None) != request_id_from(None)


def test_forwarded_for_trusts_only_configured_proxies() -> None:
    rule = ForwardedFor(["10.0.0.0/8"])
    assert rule.value("10.1.2.3", b"1.2.3.4") == "1.2.3.4, 10.1.2.3"
    assert rule.value("192.168.1.1", b"1.2.3.4") == "192.168.1.1"
    assert ForwardedFor([]).value("10.1.2.3", b"1.2.3.4") == "10.1.2.3"

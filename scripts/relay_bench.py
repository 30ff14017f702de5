"""Micro-benchmark of the data-path engine (router.http_server + router.upstream).

Not a test: numbers on a shared machine are noisy; compare the phases of one
run, never runs with each other. Three processes on loopback, all on uvloop:

- an upstream: a raw asyncio protocol answering each request with a small
  OpenAI-like JSON body (or, for the streaming phase, SSE chunks);
- the relay: ``start_server`` + ``UpstreamPool`` with a trivial handler
  (forward the body, relay the answer), no routing or metrics;
- the client (this process): keep-alive connections sending requests back to
  back.

Each server reports its own CPU (``time.process_time``) on ``GET /__cpu``, so
the printed CPU per request is that process's alone. Phases: (a) client ->
upstream directly, (b) client -> relay -> upstream, (c) streams through the
relay, CPU per relayed chunk.

    .venv/bin/python scripts/relay_bench.py --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import httptools

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from router.http_server import Exchange, Request, ServerLimits, start_server
from router.upstream import RelayResult, UpstreamPool

HOST = "127.0.0.1"
ANSWER = (
    b'{"id":"cmpl-1","object":"chat.completion","model":"m","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}'
)
REQUEST_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"})


# -- the upstream ---------------------------------------------------------------


class Upstream(asyncio.Protocol):
    """Answers every request at once; ``/stream`` gets SSE chunks spaced out
    so that each is its own TCP segment, as a token stream's are."""

    def __init__(self, chunks: int, interval_s: float) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.chunks = chunks
        self.interval_s = interval_s
        self.streaming: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        if self.url == b"/__cpu":
            body = b"%.6f" % time.process_time()
        elif self.url.startswith(b"/stream"):
            self.streaming = asyncio.ensure_future(self.stream())
            return
        else:
            body = ANSWER
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (len(body), body)
        )

    async def stream(self) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        event = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
        framed = b"%x\r\n%b\r\n" % (len(event), event)
        for _ in range(self.chunks):
            await asyncio.sleep(self.interval_s)
            transport.write(framed)
        transport.write(b"0\r\n\r\n")


async def serve_upstream(port: int, chunks: int, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(chunks, interval_s), HOST, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# -- the relay ------------------------------------------------------------------


async def serve_relay(port: int, upstream_port: int) -> None:
    pool = UpstreamPool(keepalive_timeout_s=30.0, max_idle_per_host=256)
    loop = asyncio.get_running_loop()

    async def handler(request: Request, exchange: Exchange) -> None:
        if request.path == "/__cpu":
            exchange.respond(200, [], b"%.6f" % time.process_time())
            return
        headers = [(k, v) for k, v in request.headers if k not in HOP]
        response = await pool.request(
            HOST,
            upstream_port,
            request.method,
            request.path,
            headers,
            request.body,
            connect_timeout_s=2.0,
        )
        try:
            await response.head(loop.time() + 10.0)
            out = [(k, v) for k, v in response.headers if k not in HOP]
            exchange.start(response.status, out, content_length=response.content_length)
            result = await response.relay(exchange, idle_timeout_s=10.0)
            if result is not RelayResult.COMPLETE and not exchange.ended:
                exchange.abort()
        finally:
            response.release()

    server = await start_server(handler, HOST, port, limits=ServerLimits())
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.shutdown(1.0)
        await pool.close()


# -- the client -----------------------------------------------------------------


class Client(asyncio.Protocol):
    """One keep-alive connection sending requests back to back."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.count = 0
        self.body_events = 0
        self.running = True
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body_events += 1

    def on_message_complete(self) -> None:
        self.count += 1
        assert self.transport is not None
        if self.running:
            self.transport.write(self.request)
        elif not self.stopped.done():
            self.stopped.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)


def request_bytes(path: str) -> bytes:
    head = b"POST %b HTTP/1.1\r\nHost: bench\r\ncontent-type: application/json\r\n" % path.encode()
    return head + b"content-length: %d\r\n\r\n%b" % (len(REQUEST_BODY), REQUEST_BODY)


async def cpu_of(port: int) -> float:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /__cpu HTTP/1.1\r\nHost: bench\r\n\r\n")
    raw = await reader.readuntil(b"\r\n\r\n")
    length = int(raw.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    writer.close()
    return float(body)


async def load(port: int, path: str, connections: int, duration_s: float) -> tuple[int, int, float]:
    loop = asyncio.get_running_loop()
    request = request_bytes(path)
    clients: list[Client] = []
    for _ in range(connections):
        _t, client = await loop.create_connection(lambda: Client(request), HOST, port)
        clients.append(client)
    t0 = loop.time()
    await asyncio.sleep(duration_s)
    for client in clients:
        client.running = False
    await asyncio.wait([c.stopped for c in clients], timeout=10)
    elapsed = loop.time() - t0
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    return sum(c.count for c in clients), sum(c.body_events for c in clients), elapsed


WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{REQUEST_BODY.decode()}'
"""


async def load_wrk(
    port: int, path: str, connections: int, duration_s: float, cpus: list[int]
) -> tuple[int, int, float]:
    """wrk, a C client, keeps the relay saturated where a Python client cannot."""
    import re
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    try:
        proc = await asyncio.create_subprocess_exec(
            "taskset",
            "-c",
            ",".join(map(str, cpus)),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration_s:g}s",
            "-s",
            script.name,
            f"http://{HOST}:{port}{path}",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
    finally:
        os.unlink(script.name)
    text = out.decode()
    match = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
    if match is None or "Non-2xx" in text or "Socket errors" in text:
        raise RuntimeError(f"wrk failed:\n{text}")
    elapsed = float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)
    return int(match.group(1)), 0, elapsed


async def phase(
    name: str,
    port: int,
    cpu_ports: dict[str, int],
    path: str,
    connections: int,
    duration_s: float,
    wrk_cpus: list[int] | None = None,
) -> None:
    await load(port, path, connections, min(1.0, duration_s / 5))  # warm up pools and caches
    before = {role: await cpu_of(p) for role, p in cpu_ports.items()}
    client_cpu0 = time.process_time()
    if wrk_cpus is not None:
        requests, chunks, elapsed = await load_wrk(port, path, connections, duration_s, wrk_cpus)
    else:
        requests, chunks, elapsed = await load(port, path, connections, duration_s)
    client_cpu = time.process_time() - client_cpu0
    after = {role: await cpu_of(p) for role, p in cpu_ports.items()}
    parts = [f"{name}: {requests / elapsed:,.0f} req/s ({requests} in {elapsed:.1f} s)"]
    for role in cpu_ports:
        used = after[role] - before[role]
        line = f"{role} {used / requests * 1e6:.1f} us/req"
        if path.startswith("/stream"):
            line += f", {used / max(chunks, 1) * 1e6:.1f} us/chunk ({chunks} chunks read)"
        parts.append(line)
    if wrk_cpus is None:
        parts.append(f"client {client_cpu / requests * 1e6:.1f} us/req")
    else:
        parts.append("client wrk")
    print("  " + "; ".join(parts), flush=True)


def spawn(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def main_client(args: argparse.Namespace) -> None:
    up_port, relay_port = free_port(), free_port()
    pin_flag = ["--no-pin"] if args.no_pin else []
    procs = [
        spawn("--upstream", str(up_port), "--chunks", str(args.chunks), *pin_flag),
        spawn("--relay", str(relay_port), str(up_port), *pin_flag),
    ]
    try:
        print(
            f"{args.connections} keep-alive connections, {args.duration:g} s per phase, "
            f"pid {os.getpid()}",
            flush=True,
        )
        wrk_cpus = None
        if args.wrk:
            cpus = sorted(os.sched_getaffinity(0))
            wrk_cpus = cpus[1:] if len(cpus) > 1 and not args.no_pin else cpus
        client = "wrk -t1" if args.wrk else "python client"
        await phase(
            f"(a) direct, {client}",
            up_port,
            {"upstream": up_port},
            "/v1/chat",
            args.connections,
            args.duration,
            wrk_cpus,
        )
        await phase(
            f"(b) relay,  {client}",
            relay_port,
            {"relay": relay_port, "upstream": up_port},
            "/v1/chat",
            args.connections,
            args.duration,
            wrk_cpus,
        )
        await phase(
            f"(c) relay, {args.streams} streams of {args.chunks} chunks",
            relay_port,
            {"relay": relay_port},
            "/stream",
            args.streams,
            args.duration,
        )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=50, help="SSE chunks per stream")
    parser.add_argument(
        "--wrk", action="store_true", help="load phases (a) and (b) with wrk instead of Python"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin the relay to CPU 0")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--relay", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    # The relay alone on CPU 0, the load on the others (as the peer bench
    # pins the router under test), so its CPU time is not inflated by sharing.
    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) > 1 and not args.no_pin
    if args.upstream is not None:
        if pin:
            os.sched_setaffinity(0, cpus[1:])
        uvloop.run(serve_upstream(args.upstream, args.chunks, 0.005))
    elif args.relay is not None:
        if pin:
            os.sched_setaffinity(0, cpus[:1])
        uvloop.run(serve_relay(*args.relay))
    else:
        if pin:
            os.sched_setaffinity(0, cpus[1:])
        uvloop.run(main_client(args))


if __name__ == "__main__":
    main()

"""``dp-router top``: a live terminal view of one gateway, from its admin API.

Every second it reads GET /admin/replicas and GET /admin/experts (and the
open /metrics for reported waiting / running when the replica view lacks
them) and redraws one table: per replica its state, health, requests in
flight from this gateway, the replica's own waiting / running and KV usage,
the age of its last load report, its TTFT EWMA, and its experts' imbalance,
routing slowdown, overflow and hot experts; then the fleet's experts.

Plain ANSI (home + clear, colour only on a terminal), the standard library's
HTTP client: nothing to install. ``--once`` prints one frame without
escapes and exits (scripts, tests): 0 on success, 1 if the gateway cannot
be reached, 2 if the token is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from router.metrics import PREFIX

CLEAR = "\x1b[H\x1b[2J"
RED, YELLOW, DIM, RESET = "\x1b[31m", "\x1b[33m", "\x1b[2m", "\x1b[0m"
# Imbalance at which the MoE layers run at half speed or worse with moe_share
# 0.6 (step 1.6x): shown in yellow; twice that in red.
IMBALANCE_WARN = 2.0
IMBALANCE_BAD = 4.0
HTTP_TIMEOUT_S = 2.0


class Unauthorized(Exception):
    """The admin API refused the token."""


def fetch(url: str, token: str, timeout: float = HTTP_TIMEOUT_S) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return bytes(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise Unauthorized(url) from None
        raise


def fetch_json(url: str, token: str) -> Any:
    return json.loads(fetch(url, token))


def reported_gauges(metrics_text: str) -> dict[str, dict[str, float]]:
    """replica -> {"waiting": x, "running": y} from the gateway's /metrics."""
    wanted = {
        f"{PREFIX}_replica_reported_waiting": "waiting",
        f"{PREFIX}_replica_reported_running": "running",
    }
    out: dict[str, dict[str, float]] = {}
    for line in metrics_text.splitlines():
        name, brace, rest = line.partition("{")
        field = wanted.get(name)
        if field is None or not brace:
            continue
        labels, _, value = rest.partition("} ")
        for part in labels.split(","):
            key, _, quoted = part.partition("=")
            if key == "replica":
                with contextlib.suppress(ValueError):
                    out.setdefault(quoted.strip('"'), {})[field] = float(value)
    return out


def snapshot(admin: str, token: str) -> dict[str, Any]:
    """Everything one frame shows, read from the admin listener."""
    replicas = fetch_json(admin + "/admin/replicas", token)
    try:
        experts = fetch_json(admin + "/admin/experts", token)
    except urllib.error.HTTPError:
        experts = None  # an older gateway without /admin/experts
    reported: dict[str, dict[str, float]] = {}
    rows = replicas.get("replicas", [])
    if any("reported_waiting" not in r for r in rows):
        try:
            reported = reported_gauges(fetch(admin + "/metrics", "").decode("utf-8", "replace"))
        except (OSError, urllib.error.URLError):
            reported = {}
    return {"replicas": replicas, "experts": experts, "reported": reported}


def _num(x: Any, fmt: str, missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def _paint(text: str, colour: str, on: bool) -> str:
    return f"{colour}{text}{RESET}" if on and colour else text


def render(admin: str, data: Mapping[str, Any], *, colour: bool, clock: str) -> str:
    """One frame as text."""
    replicas = data["replicas"]
    experts = data.get("experts") or {}
    reported = data.get("reported") or {}
    by_name = {e["replica"]: e for e in experts.get("replicas", [])}
    lines = [
        f"dp-router top  {admin}  policy {replicas.get('policy', '?')}  "
        f"fleet v{replicas.get('fleet_version', '?')}  {clock}",
        "",
    ]
    cols = (
        ("REPLICA", 16, "<"),
        ("STATE", 9, "<"),
        ("HEALTH", 9, "<"),
        ("INFL", 5, ">"),
        ("WAIT", 6, ">"),
        ("RUN", 6, ">"),
        ("KV", 5, ">"),
        ("AGE", 6, ">"),
        ("TTFT", 7, ">"),
        ("IMB", 6, ">"),
        ("SLOW", 5, ">"),
        ("OVFL", 6, ">"),
    )
    lines.append(" ".join(f"{h:{a}{w}}" for h, w, a in cols) + "  HOT (expert:load x mean)")
    for r in replicas.get("replicas", []):
        name = r.get("name", "?")
        e = by_name.get(name, {})
        rep = reported.get(name, {})
        waiting = r.get("reported_waiting", rep.get("waiting"))
        running = r.get("reported_running", rep.get("running"))
        kv = r.get("kv_usage")
        age = r.get("report_age_s")
        ttft = r.get("ttft_ewma_s", r.get("ttft_s"))
        imb = e.get("imbalance")
        health = r.get("health", "?")
        if r.get("ejected"):
            health = "ejected"
        cells = [
            name[:16],
            str(r.get("state", "?")),
            health,
            str(r.get("in_flight", "-")),
            _num(waiting, ".0f"),
            _num(running, ".0f"),
            "-" if kv is None else f"{100 * kv:.0f}%",
            _num(age, ".1f"),
            _num(ttft, ".3f"),
            _num(imb, ".2f"),
            _num(e.get("slowdown"), ".2f"),
            "-" if e.get("overflow_rate") is None else f"{100 * e['overflow_rate']:.1f}%",
        ]
        text = [f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, cols, strict=True)]
        if health not in ("healthy",):
            text[2] = _paint(text[2], RED, colour)
        if imb is not None and imb >= IMBALANCE_WARN:
            text[9] = _paint(text[9], RED if imb >= IMBALANCE_BAD else YELLOW, colour)
        hot = " ".join(f"{h['expert']}:{h['load']:.1f}x" for h in e.get("hot", []))
        lines.append(" ".join(text) + "  " + hot)
    fleet: Sequence[Mapping[str, Any]] = experts.get("fleet", []) if experts else []
    if experts is None:
        lines += ["", _paint("experts: this gateway has no /admin/experts", DIM, colour)]
    elif not fleet:
        lines += ["", _paint("experts: no per-expert reports", DIM, colour)]
    for f in fleet:
        hot = " ".join(f"{h['expert']}:{h['load']:.1f}x" for h in f.get("hot", []))
        lines.append("")
        lines.append(
            f"fleet: {f['experts']} experts over {f['replicas']} replicas, "
            f"imbalance {_num(f.get('imbalance'), '.2f')}, hot {hot or '-'}"
        )
    rejected = (experts or {}).get("rejected") or {}
    if rejected:
        lines.append(
            _paint(
                "expert samples rejected: "
                + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())),
                YELLOW,
                colour,
            )
        )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dp-router top", description="Live view of a gateway's replicas and experts."
    )
    p.add_argument(
        "--admin", default="http://127.0.0.1:8081", help="the gateway's admin listener URL"
    )
    p.add_argument(
        "--token",
        default=os.environ.get("DP_ROUTER_ADMIN_TOKEN", ""),
        help="admin token (default: $DP_ROUTER_ADMIN_TOKEN)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 0


def _run(args: argparse.Namespace) -> int:
    admin = args.admin.rstrip("/")
    colour = not args.once and sys.stdout.isatty()
    while True:
        clock = time.strftime("%H:%M:%S")
        try:
            frame = render(admin, snapshot(admin, args.token), colour=colour, clock=clock)
        except Unauthorized:
            print("dp-router top: the admin token is missing or wrong", file=sys.stderr)
            return 2
        except (OSError, ValueError) as exc:  # URLError, refused, timeout, bad JSON
            if args.once:
                print(f"dp-router top: cannot read {admin}: {exc}", file=sys.stderr)
                return 1
            frame = f"dp-router top  {admin}  {clock}\n\ncannot read the admin API: {exc}\n"
        if args.once:
            sys.stdout.write(frame)
            return 0
        sys.stdout.write(CLEAR + frame)
        sys.stdout.flush()
        time.sleep(args.interval)

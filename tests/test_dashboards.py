"""config/alerts.yml and config/grafana-dashboard.json use only metrics that exist.

A renamed metric silently empties a panel and mutes an alert; this test
fails instead. Every ``dp_router_*`` name in either file must be a sample
name a running gateway exposes on /metrics (histograms resolved through
``_bucket`` / ``_sum`` / ``_count``, counters through ``_total``), or one
declared in router/metrics.py that only some roles expose (the supervisor's
per-worker families).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from router.experts import ExpertSample
from tests.harness import MODEL, admin, base, chat_body, gateway, gateway_config, replicas

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "config" / "alerts.yml"
DASHBOARD = REPO / "config" / "grafana-dashboard.json"
NAME = re.compile(r"\bdp_router_[a-z0-9_]+\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": (),
    "untyped": (),
}


def exposed_names(text: str) -> set[str]:
    """Every sample name the exposition can contain, from its TYPE lines."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            names.update(name + s for s in SUFFIXES.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def declared_names() -> set[str]:
    source = (REPO / "router" / "metrics.py").read_text()
    return {"dp_router_" + m for m in re.findall(r'f"\{PREFIX\}_([a-z0-9_]+)"', source)}


def dashboard_exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [v for k, v in node.items() if k in ("expr", "definition") and isinstance(v, str)]
        for k, v in node.items():
            if k != "expr":
                out += dashboard_exprs(v)
        return out
    if isinstance(node, list):
        return [e for item in node for e in dashboard_exprs(item)]
    return []


def used_names() -> dict[str, set[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        "alerts.yml": set(NAME.findall(ALERTS.read_text())),
        "grafana-dashboard.json": {n for e in dashboard_exprs(dashboard) for n in NAME.findall(e)},
    }


def test_alert_rules_are_complete() -> None:
    """No YAML library here (not a dependency): the rule file is read as lines."""
    text = ALERTS.read_text()
    assert "\t" not in text
    rules = text.count("- alert: ")
    assert rules >= 8
    for key in ("expr: ", "for: ", "severity: ", "summary: ", "description: "):
        assert text.count(key) == rules, key
    for needed in ("DpRouterHotExpert", "DpRouterExpertOverflowRising", "ReportsStale"):
        assert needed in text
    blocks = text.split("- alert: ")[1:]
    assert all(NAME.search(b.split("annotations:")[0]) for b in blocks)


def test_dashboard_is_a_grafana_dashboard() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 30
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for topic in ("requests", "first token", "replicas", "retries", "sessions", "expert"):
        assert topic in titles


async def test_every_metric_they_use_exists(client: aiohttp.ClientSession) -> None:
    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        async with client.post(base(gw) + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            await resp.read()
        name = next(iter(gw.registry)).name
        now = asyncio.get_running_loop().time() - 1.0
        gw.experts.record(name, [ExpertSample(None, (0.0, 0.0), (0.0, 0.0))], now)
        gw.experts.record(name, [ExpertSample(None, (90.0, 30.0), (1.0, 0.0))], now + 1)
        async with client.get(admin(gw) + "/metrics") as resp:
            text = await resp.text()
    known = exposed_names(text) | declared_names()
    assert "dp_router_expert_imbalance" in known and MODEL in text
    missing = {f: sorted(names - known) for f, names in used_names().items() if names - known}
    assert missing == {}

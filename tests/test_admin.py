"""The admin listener: loopback by default, a constant-time token, the fleet view."""

from __future__ import annotations

import ast
import ipaddress
from pathlib import Path

import aiohttp

from router import config
from router.replicas import AdminState
from tests.harness import admin, gateway, gateway_config, replicas

TOKEN = "adm1n-s3cret"


async def test_binds_loopback_by_default() -> None:
    """No admin host configured: every socket the admin listener bound is loopback."""
    async with replicas(1) as urls:
        cfg = config.from_dict(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "admin": {"port": 0},
                "health": {"enabled": False},
                "replicas": [{"url": urls[0], "models": ["m"]}],
            }
        )
        async with gateway(cfg) as gw:
            assert gw.admin_runner is not None
            bound = [addr[0] for addr in gw.admin_runner.addresses]
            assert bound and all(ipaddress.ip_address(host).is_loopback for host in bound)


async def test_token_is_required_and_checked(client: aiohttp.ClientSession) -> None:
    async with replicas(1) as urls:
        async with gateway(gateway_config(urls, admin={"token": TOKEN})) as gw:
            url = admin(gw) + "/admin/replicas"
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "Bearer " + TOKEN + "x"},  # different length
                {"Authorization": TOKEN},  # no scheme
            ):
                async with client.get(url, headers=headers) as resp:
                    assert resp.status == 401
                    body = await resp.json()
                    assert body["error"]["code"] == "unauthorized"
                    assert TOKEN not in await resp.text()
            async with client.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200
            # Metrics and probes stay open for scrapers and orchestrators.
            async with client.get(admin(gw) + "/metrics") as resp:
                assert resp.status == 200


async def test_admin_routes_are_not_on_the_data_listener(client: aiohttp.ClientSession) -> None:
    from tests.harness import base

    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        async with client.get(base(gw) + "/admin/replicas") as resp:
            assert resp.status == 404


async def test_replicas_view_shows_each_replicas_status(client: aiohttp.ClientSession) -> None:
    async with replicas(2) as urls, gateway(gateway_config(urls)) as gw:
        name = urls[1].removeprefix("http://")
        gw.registry.update(name, admin=AdminState.DRAINING)
        async with client.get(admin(gw) + "/admin/replicas") as resp:
            view = await resp.json()
        assert view["policy"] == "queue_depth"
        assert view["fleet_version"] == gw.registry.snapshot.version
        by_name = {r["name"]: r for r in view["replicas"]}
        assert by_name[name]["state"] == "draining" and not by_name[name]["routable"]
        other = by_name[urls[0].removeprefix("http://")]
        assert other["routable"] and other["health"] == "healthy"
        assert all("url" not in r for r in view["replicas"])  # the URL never leaves


def test_token_comparison_is_constant_time() -> None:
    """The admin token is compared with hmac.compare_digest, nowhere with ==."""
    source = (Path(__file__).parent.parent / "router" / "admin.py").read_text()
    tree = ast.parse(source)
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "compare_digest"
    ]
    assert calls
    compares_token = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare)
        and any(isinstance(x, ast.Name) and x.id in ("token", "expected") for x in ast.walk(n))
    ]
    assert not compares_token

"""``dp-router top --once`` against a real gateway on loopback.

``top`` is a blocking command-line client (urllib), so it runs in a thread
here while the gateway serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from router import top
from router.experts import ExpertSample
from tests.harness import REPO, admin, free_port, gateway, gateway_config, replicas

TOKEN = "t0p-s3cret"


async def test_one_frame_shows_replicas_and_experts(capsys: pytest.CaptureFixture[str]) -> None:
    async with replicas(2) as urls, gateway(gateway_config(urls, admin={"token": TOKEN})) as gw:
        hot = next(iter(gw.registry)).name
        now = asyncio.get_running_loop().time()
        gw.experts.record(hot, [ExpertSample(None, (0.0,) * 4)], now - 1.0)
        gw.experts.record(hot, [ExpertSample(None, (3000.0, 1000.0, 1000.0, 1000.0))], now)
        url = admin(gw)
        code = await asyncio.to_thread(top.main, ["--admin", url, "--token", TOKEN, "--once"])
        out = capsys.readouterr().out
        assert code == 0
        lines = out.splitlines()
        assert lines[0].startswith(f"dp-router top  {url}  policy ")
        header = next(ln for ln in lines if ln.startswith("REPLICA"))
        for column in ("STATE", "HEALTH", "INFL", "WAIT", "RUN", "KV", "AGE", "TTFT", "IMB"):
            assert column in header
        rows = {
            ln.split()[0]: ln for ln in lines if ln.split() and ln.split()[0] in urls[0] + urls[1]
        }
        assert len(rows) == 2
        hot_row = rows[hot]
        assert "active" in hot_row and "healthy" in hot_row
        assert "2.00" in hot_row and "1.60" in hot_row  # imbalance, slowdown
        assert "0:2.0x" in hot_row  # the hot expert
        assert "\x1b[" not in out  # --once: no escapes
        assert any(ln.startswith("fleet: 4 experts over 1 replicas") for ln in lines)

        # The wrong token: exit 2 and a one-line reason, no traceback.
        code = await asyncio.to_thread(top.main, ["--admin", url, "--token", "nope", "--once"])
        err = capsys.readouterr().err
        assert code == 2 and "token" in err and "Traceback" not in err


async def test_unreachable_gateway_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = await asyncio.to_thread(top.main, ["--admin", url, "--once"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot read" in err


async def test_the_command_is_registered() -> None:
    """The ``dp-router top`` entry point itself, as a process."""
    async with replicas(1) as urls, gateway(gateway_config(urls)) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router",
            "top",
            "--admin",
            admin(gw),
            "--once",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20.0)
    assert proc.returncode == 0, err.decode()
    assert b"REPLICA" in out and b"experts: no per-expert reports" in out

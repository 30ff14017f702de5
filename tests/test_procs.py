"""The process harness (loadtest/procs.py) and the one gateway config writer."""

from __future__ import annotations

import signal
import sys
import tomllib
from pathlib import Path

import pytest

from loadtest import bench, demo, faults, procs
from router import config
from tests import harness

# A child that prints a ready line and then ignores SIGTERM: only SIGKILL stops it.
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready 1', flush=True); time.sleep(60)"
)


def test_gateway_toml_renders_each_value_type() -> None:
    text = procs.gateway_toml(
        [{"url": "http://127.0.0.1:1", "name": 'r"1', "models": ["m"], "weight": 2.5}],
        port=8000,
        admin_port=8001,
        comment="generated",
        server={"access_log": False},
        routing={"policy": "p2c", "seed": 3},
    )
    assert text == (
        "# generated\n"
        '\n[server]\nhost = "127.0.0.1"\nport = 8000\naccess_log = false\n'
        '\n[admin]\nhost = "127.0.0.1"\nport = 8001\n'
        '\n[routing]\npolicy = "p2c"\nseed = 3\n'
        '\n[[replicas]]\nurl = "http://127.0.0.1:1"\nname = "r\\"1"\nmodels = ["m"]\n'
        "weight = 2.5\n"
    )
    assert tomllib.loads(text)["replicas"][0]["name"] == 'r"1'
    with pytest.raises(TypeError):
        procs.gateway_toml([{"url": None}], port=1, admin_port=2)


@pytest.mark.parametrize("tool", ["demo", "bench", "faults", "tests"])
def test_every_tool_writes_a_config_the_gateway_accepts(tool: str) -> None:
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    if tool == "demo":
        text = demo.gateway_config("round_robin", 7, 18000, 18001, urls)
    elif tool == "bench":
        text = bench._gateway_config(urls[0], 18000, 18001, "p2c", access_log=False)
        urls = urls[:1]
    elif tool == "faults":
        text = faults.gateway_toml(18000, 18001, urls)
    else:
        text = harness.toml_config(urls, 18000, 18001, server={"shutdown_delay_s": 1.0})
    cfg = config.from_dict(tomllib.loads(text), env={})
    assert (cfg.server.host, cfg.server.port, cfg.admin.port) == ("127.0.0.1", 18000, 18001)
    assert [r.url for r in cfg.replicas] == urls


async def test_replicas_report_their_ports_answer_and_stop_gracefully(tmp_path: Path) -> None:
    argv = procs.dp_router("replica", "--port", "0", "--port", "0")
    child = await procs.spawn("replicas", argv, log=tmp_path / "r.log", stdout_pipe=True)
    try:
        ports = await child.ready_ports(2, timeout=harness.PROCESS_START_S)
        assert len(set(ports)) == 2
        for port in ports:
            await child.wait_http(f"http://127.0.0.1:{port}/health", timeout=5)
        assert child.cpu_seconds() > 0
    finally:
        await child.stop()
    assert child.proc.returncode == 0  # SIGTERM: a clean exit, not a kill
    await child.stop()  # idempotent


async def test_a_child_that_ignores_sigterm_is_killed_and_reaped() -> None:
    child = await procs.spawn("stubborn", [sys.executable, "-c", STUBBORN], stdout_pipe=True)
    assert await child.ready_ports(1, timeout=harness.PROCESS_START_S) == [1]
    await child.stop(timeout=0.5)
    assert child.proc.returncode == -signal.SIGKILL
    assert not child.running


async def test_a_stopped_child_still_stops() -> None:
    argv = [sys.executable, "-c", "import time; print('ready 1', flush=True); time.sleep(60)"]
    child = await procs.spawn("frozen", argv, stdout_pipe=True)
    await child.ready_ports(1, timeout=harness.PROCESS_START_S)
    child.send(signal.SIGSTOP)
    await child.stop(timeout=5)
    assert child.proc.returncode == -signal.SIGTERM  # it got SIGCONT, then acted on SIGTERM


async def test_a_child_that_dies_at_start_says_why(tmp_path: Path) -> None:
    crash = "import sys; sys.stderr.write('boom: no such model\\n'); sys.exit(3)"
    log = tmp_path / "crash.log"
    child = await procs.spawn("crasher", [sys.executable, "-c", crash], log=log, stdout_pipe=True)
    with pytest.raises(procs.StartError, match=r"(?s)exited with 3.*boom: no such model"):
        await child.ready_ports(1, timeout=harness.PROCESS_START_S)
    child = await procs.spawn("crasher", [sys.executable, "-c", crash], log=log)
    (port,) = procs.free_ports(1)
    with pytest.raises(procs.StartError, match="exited with 3"):
        await child.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=harness.PROCESS_START_S)


async def test_nothing_listening_is_a_start_error_after_the_timeout() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    child = await procs.spawn("silent", argv)
    (port,) = procs.free_ports(1)
    try:
        with pytest.raises(procs.StartError, match="not ready"):
            await child.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=0.3)
    finally:
        await child.stop()

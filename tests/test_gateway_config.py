"""Config validation and the CLI's handling of bad configs (no tracebacks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router import config
from tests.harness import REPO


def test_minimal_config_defaults() -> None:
    cfg = config.from_dict({"replicas": [{"url": "http://127.0.0.1:9000/"}]}, env={})
    (rep,) = cfg.replicas
    assert rep.name == "127.0.0.1:9000"
    assert rep.url == "http://127.0.0.1:9000"
    assert rep.models is None  # discovered
    assert cfg.admin.host == "127.0.0.1"
    assert cfg.routing.policy == "queue_depth"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"replicas": []}, "replicas"),
        ({"replicas": [{"url": "file:///etc/passwd"}]}, "replicas[0].url"),
        ({"replicas": [{"url": "http://a:1"}, {"url": "http://a:1"}]}, "replicas[1].name"),
        ({"replicas": [{"url": "http://a:1", "wieght": 2}]}, "replicas[0].wieght"),
        ({"replicas": [{"url": "http://a:1", "models": []}]}, "replicas[0].models"),
        ({"server": {"port": "80"}, "replicas": [{"url": "http://a:1"}]}, "server.port"),
        ({"server": {"port": 70000}, "replicas": [{"url": "http://a:1"}]}, "server.port"),
        (
            {"upstream": {"idle_timeout_s": -1}, "replicas": [{"url": "http://a:1"}]},
            "upstream.idle_timeout_s",
        ),
        (
            {"upstream": {"idle_timeout": 1}, "replicas": [{"url": "http://a:1"}]},
            "upstream.idle_timeout",
        ),
        ({"routing": {"policy": "nope"}, "replicas": [{"url": "http://a:1"}]}, "routing.policy"),
        (
            {"server": {"trusted_proxies": ["x"]}, "replicas": [{"url": "http://a:1"}]},
            "server.trusted_proxies[0]",
        ),
        ({"nonsense": {}, "replicas": [{"url": "http://a:1"}]}, "nonsense"),
        # Both go out in headers that are not scanned per request.
        ({"replicas": [{"url": "http://a:1", "api_key": "k\r\nx: y"}]}, "replicas[0].api_key"),
        ({"replicas": [{"url": "http://a:1", "name": "a\x00b"}]}, "replicas[0].name"),
        (
            {"admission": {"reject_status": 500}, "replicas": [{"url": "http://a:1"}]},
            "admission.reject_status",
        ),
    ],
)
def test_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(data, env={})
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_env_overrides() -> None:
    cfg = config.from_dict(
        {"replicas": [{"url": "http://a:1"}]},
        env={"DP_ROUTER_PORT": "9999", "DP_ROUTER_ADMIN_TOKEN": "t0k", "DP_ROUTER_HOST": "::1"},
    )
    assert cfg.server.port == 9999
    assert cfg.server.host == "::1"
    assert cfg.admin.token == "t0k"


def test_example_configs_are_valid() -> None:
    for path in sorted((REPO / "config").glob("*.toml")):
        config.load(path, env={})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_reports_key_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstream]\nconnect_timeout_s = "soon"\n[[replicas]]\nurl = "http://a:1"\n')
    proc = _cli("check-config", str(bad))
    assert proc.returncode == 2
    assert "upstream.connect_timeout_s: expected a number" in proc.stderr
    assert "Traceback" not in proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    proc = _cli("check-config", str(broken))
    assert proc.returncode == 2 and "invalid TOML" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = _cli("check-config", str(REPO / "config" / "example.toml"))
    assert ok.returncode == 0, ok.stderr


def test_serve_with_bad_flags_exits_cleanly() -> None:
    proc = _cli("serve", "--replica", "ftp://x", "--port", "0")
    assert proc.returncode == 2
    assert "replicas[0].url" in proc.stderr and "Traceback" not in proc.stderr


def test_policies_command_lists_name_and_summary() -> None:
    proc = _cli("policies")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("queue_depth: ") for line in lines)
    assert all(": " in line for line in lines)


def test_check_config_refuses_what_serve_refuses(tmp_path: Path) -> None:
    """An admin listener off loopback needs a token: check-config says so too."""
    open_admin = tmp_path / "open-admin.toml"
    open_admin.write_text('[admin]\nhost = "0.0.0.0"\n[[replicas]]\nurl = "http://a:1"\n')
    proc = _cli("check-config", str(open_admin))
    assert proc.returncode == 2
    assert "admin.token: required when admin.host is not loopback" in proc.stderr
    served = _cli("serve", "--config", str(open_admin))
    assert served.returncode == 2 and "admin.token" in served.stderr
    with_token = tmp_path / "with-token.toml"
    with_token.write_text(
        '[admin]\nhost = "0.0.0.0"\ntoken = "s3cret"\n[[replicas]]\nurl = "http://a:1"\n'
    )
    assert _cli("check-config", str(with_token)).returncode == 0


def test_one_load_bound_epsilon() -> None:
    """The policies' own bound takes [routing] load_bound_epsilon; a second
    epsilon in the policy's params is refused rather than silently winning."""
    cfg = config.from_dict(
        {
            "routing": {"policy": "prefix_affinity", "load_bound_epsilon": 0.25},
            "replicas": [{"url": "http://a:1"}],
        }
    )
    assert cfg.routing.load_bound_epsilon == 0.25
    params = config.policy_params("prefix_affinity", dict(cfg.routing.params), 0.25)
    assert params["epsilon"] == 0.25
    assert "epsilon" not in config.policy_params("queue_depth", {}, 0.25)
    with pytest.raises(config.ConfigError, match="load_bound_epsilon"):
        config.from_dict(
            {
                "routing": {"policy": "prefix_affinity", "params": {"epsilon": 1.0}},
                "replicas": [{"url": "http://a:1"}],
            }
        )

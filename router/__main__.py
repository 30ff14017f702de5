"""The ``dp-router`` command: one entry, subcommands loaded on demand.

Each subcommand lives in its own module as ``main(argv) -> int``; this file
only dispatches, so the gateway's start-up does not import the simulator and
the load tools do not import the gateway.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). The module's ``main(argv)`` parses the rest.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("router.cli", "run the gateway"),
    "check-config": ("router.cli", "validate a config file and exit"),
    "policies": ("router.cli", "list routing policies"),
    "top": ("router.cli", "live view of a gateway's replicas and experts (admin API)"),
    "replica": ("loadtest.replica.cli", "run simulated replica(s)"),
    "loadtest": ("loadtest.loadgen", "drive load at an OpenAI-compatible endpoint"),
    "simulate": ("loadtest.sim.cli", "discrete-event policy simulator"),
    "bench": ("loadtest.bench", "gateway overhead benchmark against a direct connection"),
    "bench-sessions": (
        "loadtest.session_bench",
        "latency sticky sessions add, in memory and in Redis",
    ),
    "demo": ("loadtest.demo", "gateway + simulated fleet + load, with a report"),
    "faults": ("loadtest.faults", "what clients see when a replica is killed or frozen under load"),
    "faults-redis": (
        "loadtest.redis_faults",
        "sticky sessions through a Redis outage (killed, frozen, stalling), full length",
    ),
    "compare-live": ("loadtest.live_compare", "gateway policies vs sglang-router, one live fleet"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dp-router COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"dp-router: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if module.__name__ == "router.cli":
        return int(module.main([name, *rest]))
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())

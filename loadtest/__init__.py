"""Load-testing tools: simulated replica, workloads, load generator, simulator."""

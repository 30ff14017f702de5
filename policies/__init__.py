"""Routing policies: pure objects, no I/O, no clock reads, injected RNG.

A policy is ``choose(request, candidates, fleet, now) -> Decision``; see base.py.
The registry (registry.py) maps config names to classes.
"""

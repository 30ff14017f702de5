"""Replica load telemetry: what each replica says about its own load.

Three sources, configurable per replica (docs/load-report.md): a scrape of
its Prometheus metrics (``scrape``), reports it pushes (``push``, ``report``),
and the ORCA ``endpoint-load-metrics`` response header (``orca``). Each
turns what it read into a :class:`Reading`, recorded in one place
(``reading.record``) on the replica's live load counters. ``source`` runs
the scrapes and the push listener for the app (:func:`load_telemetry`);
``share`` carries the supervisor's readings to ``--workers`` processes.
"""

from router.telemetry.orca import ORCA_REQUEST_HEADER, ORCA_RESPONSE_HEADER, on_load_header
from router.telemetry.reading import Reading, Source, record
from router.telemetry.source import ExpertSink, Plan, Telemetry, load_telemetry, plan_for

__all__ = [
    "ORCA_REQUEST_HEADER",
    "ORCA_RESPONSE_HEADER",
    "ExpertSink",
    "Plan",
    "Reading",
    "Source",
    "Telemetry",
    "load_telemetry",
    "on_load_header",
    "plan_for",
    "record",
]

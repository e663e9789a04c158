"""Prometheus metrics of the queue, shared by the API's /metrics and the operator's."""

from __future__ import annotations

from prometheus_client import Gauge

QUEUED = Gauge("gristmill_queue_jobs", "Jobs due and waiting, by tag", ["tag"])
RUNNING = Gauge("gristmill_running_jobs", "Jobs running, by tag", ["tag"])
OLDEST = Gauge("gristmill_queue_oldest_job_age_seconds", "Age of the oldest due job", ["tag"])


def observe_queue(depth: dict[str, dict[str, float]]) -> None:
    """Set the gauges from `queue.queue_depth`; tags that emptied read 0, not their last value."""
    for (tag,) in list(QUEUED._metrics):
        for gauge in (QUEUED, RUNNING, OLDEST):
            gauge.labels(tag).set(0)
    for tag, values in depth.items():
        QUEUED.labels(tag).set(values["queued"])
        RUNNING.labels(tag).set(values["running"])
        OLDEST.labels(tag).set(values["oldest_queued_s"])

"""Prometheus metrics of the operator: the queue per tag, replicas per WorkerGroup."""

from __future__ import annotations

from prometheus_client import Gauge

QUEUED = Gauge("gristmill_queue_jobs", "Jobs due and waiting, by tag", ["tag"])
RUNNING = Gauge("gristmill_running_jobs", "Jobs running, by tag", ["tag"])
OLDEST = Gauge("gristmill_queue_oldest_job_age_seconds", "Age of the oldest due job", ["tag"])
DESIRED = Gauge("gristmill_workergroup_desired_replicas", "Replicas the autoscaler wants",
                ["namespace", "group"])
ACTUAL = Gauge("gristmill_workergroup_replicas", "Replicas of the group's Deployment",
               ["namespace", "group"])


def observe_queue(depth: dict[str, dict[str, float]]) -> None:
    for tag in list(QUEUED._metrics):  # tags that emptied read 0, not their last value
        QUEUED.labels(*tag).set(0)
        RUNNING.labels(*tag).set(0)
        OLDEST.labels(*tag).set(0)
    for tag, values in depth.items():
        QUEUED.labels(tag).set(values["queued"])
        RUNNING.labels(tag).set(values["running"])
        OLDEST.labels(tag).set(values["oldest_queued_s"])


def observe_group(namespace: str, group: str, desired: int, actual: int) -> None:
    DESIRED.labels(namespace, group).set(desired)
    ACTUAL.labels(namespace, group).set(actual)

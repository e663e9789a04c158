"""Prometheus metrics of the operator: replicas per WorkerGroup (the queue's are in
gristmill.metrics, shared with the API)."""

from __future__ import annotations

from prometheus_client import Gauge

DESIRED = Gauge("gristmill_workergroup_desired_replicas", "Replicas the autoscaler wants",
                ["namespace", "group"])
ACTUAL = Gauge("gristmill_workergroup_replicas", "Replicas of the group's Deployment",
               ["namespace", "group"])


def observe_group(namespace: str, group: str, desired: int, actual: int) -> None:
    DESIRED.labels(namespace, group).set(desired)
    ACTUAL.labels(namespace, group).set(actual)

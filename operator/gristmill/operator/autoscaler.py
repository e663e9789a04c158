"""The autoscaling loop's memory and its one query per loop (no kopf here).

The group loop (groups.py) asks `Autoscaler.decide_for` for each autoscaled
WorkerGroup; the queue depth of all tags is read at most once per period and
shared, so a hundred groups cost one query, not a hundred connections (KEDA
opens one per ScaledObject).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psycopg

from gristmill.metrics import observe_queue
from gristmill.operator.scaling import (
    Decision,
    Demand,
    GroupShape,
    ScalingState,
    decide,
    share_demand,
)
from gristmill.spec import WorkerGroup
from gristmill.store import queue, workers


@dataclass
class Autoscaler:
    period_s: float = 5.0
    states: dict[str, ScalingState] = field(default_factory=dict)
    groups: dict[str, GroupShape] = field(default_factory=dict)
    _depth: dict[str, Demand] = field(default_factory=dict)
    _read_at: float = float("-inf")

    async def depth(self, conn: psycopg.AsyncConnection) -> dict[str, Demand]:
        if time.monotonic() - self._read_at >= self.period_s:
            raw = await queue.queue_depth(conn)
            self._depth = {tag: Demand(int(d["queued"]), int(d["running"]))
                           for tag, d in raw.items()}
            self._read_at = time.monotonic()
            observe_queue(raw)
        return self._depth

    async def decide_for(self, conn: psycopg.AsyncConnection, key: str, group: WorkerGroup,
                         current: int, now: float | None = None) -> tuple[Decision, Demand]:
        """Replicas for one group (key: namespace/name) and the demand it was given."""
        autoscaling = group.spec.autoscaling
        self.groups[key] = GroupShape(key, tuple(group.spec.tags),
                                      autoscaling.maxReplicas * group.spec.concurrency)
        demand = share_demand(list(self.groups.values()), await self.depth(conn))[key]
        decision = decide(autoscaling, group.spec.concurrency, current, demand,
                          self.states.get(key, ScalingState()),
                          time.monotonic() if now is None else now)
        self.states[key] = decision.state
        return decision, demand

    def forget(self, key: str) -> None:
        self.states.pop(key, None)
        self.groups.pop(key, None)


async def deletion_costs(conn: psycopg.AsyncConnection, pod_names: list[str]) -> dict[str, int]:
    """controller.kubernetes.io/pod-deletion-cost per pod: its running jobs, so that the
    ReplicaSet removes idle workers first when replicas go down."""
    running = await workers.running_jobs_by_host(conn, pod_names)
    return {pod: running.get(pod, 0) for pod in pod_names}

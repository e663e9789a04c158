"""Autoscaling policies replayed on job-arrival traces, side by side.

    python bench/autoscale.py

A discrete-time simulator (1 s steps, seeded) of worker groups: jobs arrive
per tag into FIFO queues, ready pods take them up to their concurrency, new
pods count as worker-seconds from creation but serve only after a start-up
delay. Three policies on the same traces:

- gristmill: `gristmill.operator.scaling.decide` every 5 s (HPA-style rules,
  wake from zero in one loop, scale to zero after the idle timeout); scale-in
  removes idle pods first (pod-deletion-cost) and busy ones drain, finishing
  their jobs.
- keda: KEDA's defaults: the metric polled every 30 s, the HPA evaluated every
  15 s with its defaults (tolerance 0.1, scale-up +100 % or +4 pods per 15 s,
  scale-down window 300 s), 0 <-> 1 by KEDA after 300 s cooldown. Scale-in
  deletes the newest pods, busy or not: their jobs start over.
- windmill: our reading of Windmill's documented autoscaling: every 30 s, up
  by a fifth of (max - min) when jobs wait or occupancy > 75 %, down by as
  much when occupancy < 25 %, at most one change per 60 s. Scale-in as keda.

Printed per trace: worker-seconds, queue wait p50/p99/max, scale events.
"""

from __future__ import annotations

import argparse
import math
import random
from collections import deque
from dataclasses import dataclass, field

from common import percentile

from gristmill.operator.scaling import Demand, ScalingState, decide
from gristmill.spec.autoscaling import Autoscaling


@dataclass
class Group:
    name: str
    tags: tuple[str, ...]
    concurrency: int
    min_replicas: int
    max_replicas: int
    startup_s: float


@dataclass
class Pod:
    ready_at: float
    created: float
    jobs: list[list[float]] = field(default_factory=list)  # [end, arrival, duration]
    draining: bool = False


@dataclass
class Job:
    arrival: float
    tag: str
    duration: float


# ---- traces -----------------------------------------------------------------------------------

def poisson(rng: random.Random, rate_at, duration_s: int, tag: str, mean_job_s: float,
            ) -> list[Job]:
    jobs = []
    for second in range(duration_s):
        for _ in range(_poisson_count(rng, rate_at(second))):
            jobs.append(Job(second + rng.random(), tag, rng.expovariate(1 / mean_job_s)))
    return jobs


def _poisson_count(rng: random.Random, rate: float) -> int:
    if rate <= 0:
        return 0
    if rate > 30:
        return max(0, round(rng.gauss(rate, math.sqrt(rate))))
    limit, product, count = math.exp(-rate), rng.random(), 0
    while product > limit:
        product *= rng.random()
        count += 1
    return count


DEFAULT = Group("default", ("default",), 4, 2, 50, 20)
GPU = Group("gpu", ("gpu",), 1, 0, 4, 60)


def traces(seed: int) -> dict[str, tuple[list[Group], list[Job], int]]:
    rng = random.Random(seed)
    steady = poisson(rng, lambda s: 5, 1800, "default", 2.0)
    burst = poisson(rng, lambda s: 1, 1800, "default", 2.0) + [
        Job(120 + 60 * i / 10000, "default", rng.expovariate(1 / 2.0)) for i in range(10000)]
    diurnal = poisson(rng, lambda s: 4 + 4 * math.sin(2 * math.pi * s / 7200), 7200,
                      "default", 2.0)
    mixed = poisson(rng, lambda s: 3, 3600, "default", 2.0) + [
        Job(start + rng.random() * 10, "gpu", rng.uniform(40, 80))
        for start in range(60, 3600, 600) for _ in range(12)]
    return {
        "steady 5 jobs/s": ([DEFAULT], steady, 1800),
        "burst: 10,000 jobs in one minute": ([DEFAULT], burst, 1800),
        "diurnal (a day in 2 h)": ([DEFAULT], diurnal, 7200),
        "mixed tags (default + gpu bursts)": ([DEFAULT, GPU], mixed, 3600),
    }


# ---- policies -----------------------------------------------------------------------------------

class GristmillPolicy:
    period = 5
    drains = True

    def __init__(self, group: Group):
        self.group = group
        self.autoscaling = Autoscaling(minReplicas=group.min_replicas,
                                       maxReplicas=group.max_replicas,
                                       scaleToZero={"enabled": group.min_replicas == 0,
                                                    "idleTimeout": "120s"})
        self.state = ScalingState()

    def desired(self, now: float, current: int, demand: Demand) -> int:
        decision = decide(self.autoscaling, self.group.concurrency, current, demand,
                          self.state, now)
        self.state = decision.state
        return decision.replicas


class KedaPolicy:
    period = 15  # the HPA's sync period
    drains = False
    poll_s = 30
    cooldown_s = 300

    def __init__(self, group: Group):
        self.group = group
        self.hpa = Autoscaling(minReplicas=max(1, group.min_replicas),
                               maxReplicas=group.max_replicas)
        self.state = ScalingState()
        self.metric = Demand()
        self.polled_at = -math.inf
        self.last_active = 0.0

    def desired(self, now: float, current: int, demand: Demand) -> int:
        if now - self.polled_at >= self.poll_s:
            self.metric, self.polled_at = demand, now
            if demand.total > 0:
                self.last_active = now
        if current == 0:
            return 1 if self.metric.total > 0 else 0
        if self.group.min_replicas == 0 and self.metric.total == 0 \
                and now - self.last_active >= self.cooldown_s:
            return 0
        decision = decide(self.hpa, self.group.concurrency, current, self.metric, self.state, now)
        self.state = decision.state
        return decision.replicas


class WindmillPolicy:
    period = 30
    drains = False
    cooldown_s = 60

    def __init__(self, group: Group):
        self.group = group
        self.step = max(1, math.ceil((group.max_replicas - group.min_replicas) / 5))
        self.changed_at = -math.inf

    def desired(self, now: float, current: int, demand: Demand) -> int:
        if now - self.changed_at < self.cooldown_s:
            return current
        slots = current * self.group.concurrency
        occupancy = demand.running / slots if slots else 1.0
        target = current
        if demand.queued > 0 or occupancy > 0.75:
            target = min(self.group.max_replicas, current + self.step)
        elif occupancy < 0.25:
            target = max(self.group.min_replicas, current - self.step)
        if target != current:
            self.changed_at = now
        return target


# ---- the simulation -------------------------------------------------------------------------------

@dataclass
class Result:
    worker_seconds: float
    waits: list[float]
    scale_events: int


def simulate(groups: list[Group], jobs: list[Job], duration_s: int, policy_cls,
             seed: int) -> Result:
    rng = random.Random(seed)
    arrivals = deque(sorted(jobs, key=lambda j: j.arrival))
    queues: dict[str, deque] = {tag: deque() for g in groups for tag in g.tags}
    pods: dict[str, list[Pod]] = {g.name: [Pod(0, 0) for _ in range(g.min_replicas)]
                                  for g in groups}
    policies = {g.name: policy_cls(g) for g in groups}
    worker_seconds, waits, events = 0.0, [], 0
    end = duration_s
    now = 0
    while now < end or any(queues.values()) or any(p.jobs for ps in pods.values() for p in ps):
        while arrivals and arrivals[0].arrival <= now:
            job = arrivals.popleft()
            queues[job.tag].append([job.arrival, job.duration])
        for group in groups:
            group_pods = pods[group.name]
            for pod in group_pods:
                pod.jobs = [j for j in pod.jobs if j[0] > now]
            group_pods[:] = [p for p in group_pods if not (p.draining and not p.jobs)]
            for pod in group_pods:
                if pod.ready_at > now or pod.draining:
                    continue
                while len(pod.jobs) < group.concurrency:
                    tag = min((t for t in group.tags if queues[t]),
                              key=lambda t: queues[t][0][0], default=None)
                    if tag is None:
                        break
                    arrival, duration = queues[tag].popleft()
                    waits.append(now - arrival)
                    pod.jobs.append([now + duration, arrival, duration])
            worker_seconds += len(group_pods)
            if now % policies[group.name].period == 0:
                queued = sum(len(queues[t]) for t in group.tags)
                running = sum(len(p.jobs) for p in group_pods)
                serving = [p for p in group_pods if not p.draining]
                desired = policies[group.name].desired(now, len(serving), Demand(queued, running))
                if desired != len(serving):
                    events += 1
                _resize(group, group_pods, serving, desired, now, rng,
                        policies[group.name].drains, queues)
        now += 1
        if now > duration_s * 4:
            break  # a policy that never catches up: stop and report what happened
    return Result(worker_seconds, waits, events)


def _resize(group: Group, group_pods: list[Pod], serving: list[Pod], desired: int, now: float,
            rng: random.Random, drains: bool, queues: dict[str, deque]) -> None:
    if desired > len(serving):
        for _ in range(desired - len(serving)):
            group_pods.append(Pod(now + group.startup_s * rng.uniform(0.8, 1.2), now))
        return
    surplus = len(serving) - desired
    if drains:  # idle pods go first (pod-deletion-cost); busy ones finish their jobs
        for pod in sorted(serving, key=lambda p: len(p.jobs))[:surplus]:
            pod.draining = True
        return
    for pod in sorted(serving, key=lambda p: -p.created)[:surplus]:  # newest first, busy or not
        for _, arrival, duration in pod.jobs:
            queues[group.tags[0]].appendleft([arrival, duration])  # killed: starts over
        group_pods.remove(pod)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    policies = {"gristmill": GristmillPolicy, "keda": KedaPolicy, "windmill": WindmillPolicy}
    for name, (groups, jobs, duration) in traces(args.seed).items():
        print(f"\n{name}: {len(jobs)} jobs, groups " + ", ".join(
            f"{g.name} {g.min_replicas}-{g.max_replicas}x{g.concurrency} "
            f"(start-up {g.startup_s:.0f}s)" for g in groups))
        print(f"  {'policy':<10} {'worker-s':>10} {'wait p50':>9} {'p99':>8} {'max':>8} "
              f"{'events':>7}")
        for policy_name, policy in policies.items():
            result = simulate(groups, jobs, duration, policy, args.seed)
            print(f"  {policy_name:<10} {result.worker_seconds:>10.0f} "
                  f"{percentile(result.waits, 50):>8.1f}s {percentile(result.waits, 99):>7.1f}s "
                  f"{max(result.waits):>7.1f}s {result.scale_events:>7}")


if __name__ == "__main__":
    main()

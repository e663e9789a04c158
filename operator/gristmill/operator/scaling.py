"""The autoscaling policy of WorkerGroups, as pure functions (no kopf, no I/O).

Per loop the operator reads queued (due) and running jobs per tag in one
query, shares each tag's demand among the groups serving it, and asks
`decide` for each group's replicas. The rules follow the HPA's (tolerance,
stabilization windows, rate policies) with two additions an HPA lacks: a
group at zero wakes in the same loop as its first due job (no window, no rate
limit), and scales to zero only after its tags were idle for `idleTimeout`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gristmill.spec.autoscaling import Autoscaling, ScalingRules
from gristmill.spec.quantities import parse_duration


@dataclass(frozen=True)
class Demand:
    queued: int = 0  # due jobs waiting
    running: int = 0

    @property
    def total(self) -> int:
        return self.queued + self.running


@dataclass(frozen=True)
class GroupShape:
    name: str
    tags: tuple[str, ...]
    capacity: int  # maxReplicas x concurrency: its share of a tag it serves with others


def share_demand(groups: Sequence[GroupShape], by_tag: Mapping[str, Demand]
                 ) -> dict[str, Demand]:
    """Each tag's demand split among the groups serving it, in proportion to their capacity.

    A group serving a tag alone gets all of it; two groups of 4x8 and 50x2
    slots serving one tag get 24% and 76% of its jobs. Fractions are rounded
    up, so no job goes unserved for rounding.
    """
    shares: dict[str, Demand] = {group.name: Demand() for group in groups}
    for tag, demand in by_tag.items():
        serving = [g for g in groups if tag in g.tags]
        total = sum(g.capacity for g in serving)
        for group in serving:
            part = group.capacity / total if total else 1 / len(serving)
            current = shares[group.name]
            shares[group.name] = Demand(current.queued + math.ceil(demand.queued * part),
                                        current.running + math.ceil(demand.running * part))
    return shares


@dataclass(frozen=True)
class ScalingState:
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, replicas)
    changes: tuple[tuple[float, int], ...] = ()  # (time, replicas added or removed)
    last_busy: float | None = None  # the last loop with any queued or running job


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str  # a condition reason: ScaledUp, ScaledDown, WokeFromZero, ScaledToZero, ...
    message: str
    state: ScalingState = field(default_factory=ScalingState)


def _rate_limit(rules: ScalingRules, current: int, changes: Sequence[tuple[float, int]],
                now: float, up: bool) -> int | None:
    """The furthest the policies let replicas go from `current` now; None when disabled."""
    if rules.selectPolicy == "Disabled":
        return None
    limits = []
    for policy in rules.policies:
        period = parse_duration(policy.period)
        moved = sum(delta for at, delta in changes if now - at < period and (delta > 0) == up)
        start = current - moved  # replicas at the start of the period
        if policy.type == "Pods":
            limits.append(start + policy.value if up else start - policy.value)
        elif up:
            limits.append(math.ceil(start * (1 + policy.value / 100)))
        else:
            limits.append(math.floor(start * (1 - policy.value / 100)))
    pick_most = rules.selectPolicy == "Max"
    if up:
        return max(limits) if pick_most else min(limits)
    return min(limits) if pick_most else max(limits)


def decide(autoscaling: Autoscaling, concurrency: int, current: int, demand: Demand,
           state: ScalingState, now: float) -> Decision:
    """Replicas for one group now, why, and the state to pass to the next call."""
    a = autoscaling
    target = a.targetJobsPerWorker or concurrency
    last_busy = now if demand.total > 0 else state.last_busy
    if last_busy is None:
        last_busy = now  # a group never seen busy counts as busy since we started watching
    windows = (parse_duration(a.behavior.scaleUp.stabilizationWindow),
               parse_duration(a.behavior.scaleDown.stabilizationWindow))
    horizon = max([*windows, *(parse_duration(p.period) for rules in
                               (a.behavior.scaleUp, a.behavior.scaleDown)
                               for p in rules.policies)])
    changes = tuple((at, d) for at, d in state.changes if now - at < horizon)

    def done(replicas: int, reason: str, message: str,
             recommendations: tuple[tuple[float, int], ...]) -> Decision:
        moved = changes + (((now, replicas - current),) if replicas != current else ())
        return Decision(replicas, reason, message,
                        ScalingState(recommendations, moved, last_busy))

    if current == 0:
        if demand.queued >= a.activation:
            wake = min(a.maxReplicas, max(a.minReplicas, 1, math.ceil(demand.total / target)))
            return done(wake, "WokeFromZero", f"{demand.queued} job(s) waiting", ((now, wake),))
        if a.minReplicas == 0 or a.scaleToZero.enabled:
            return done(0, "Idle", "no work below the activation threshold", ())
    idle_for = now - last_busy
    if demand.total == 0 and a.scaleToZero.enabled \
            and idle_for >= parse_duration(a.scaleToZero.idleTimeout):
        return done(0, "ScaledToZero", f"idle for {idle_for:.0f}s", ())

    raw = math.ceil(demand.total / target)
    floor = a.minReplicas if demand.total > 0 or not a.scaleToZero.enabled else max(
        a.minReplicas, 1)
    recommendation = min(a.maxReplicas, max(floor, raw))
    # As the HPA: the load per current worker against the target, within the tolerance.
    if current > 0 and raw > 0 and abs(demand.total / (current * target) - 1) <= a.tolerance:
        recommendation = min(a.maxReplicas, max(floor, current))
    recent = tuple((at, r) for at, r in state.recommendations if now - at < horizon)
    recommendations = recent + ((now, recommendation),)
    up_window, down_window = windows
    lowest_recent = min(r for at, r in recommendations if now - at <= up_window)
    highest_recent = max(r for at, r in recommendations if now - at <= down_window)

    desired, reason, message = current, "Steady", f"{demand.total} job(s) for {current} worker(s)"
    if recommendation > current:
        desired = max(current, lowest_recent)
        limit = _rate_limit(a.behavior.scaleUp, current, changes, now, up=True)
        if limit is not None and desired > limit:
            desired, reason = max(current, limit), "RateLimited"
            message = f"wanted {recommendation}, scale-up policies allow {desired} now"
        elif desired > current:
            reason = "AtMaxReplicas" if raw > a.maxReplicas else "ScaledUp"
            message = f"{demand.queued} queued + {demand.running} running jobs, {target} per worker"
        if limit is None:
            desired, reason, message = current, "ScaleUpDisabled", "scaleUp.selectPolicy: Disabled"
    elif recommendation < current:
        desired = min(current, highest_recent)
        limit = _rate_limit(a.behavior.scaleDown, current, changes, now, up=False)
        if limit is None:
            desired, reason, message = current, "ScaleDownDisabled", \
                "scaleDown.selectPolicy: Disabled"
        elif desired < limit:
            desired, reason = min(current, limit), "RateLimited"
            message = f"wanted {recommendation}, scale-down policies allow {desired} now"
        elif desired < current:
            reason = "ScaledDown"
            message = f"{demand.total} job(s) need {recommendation} worker(s)"
        else:
            reason = "StabilizingScaleDown"
            message = f"{recommendation} would do; waiting out the {down_window:.0f}s window"
    elif raw != recommendation and raw > a.maxReplicas:
        reason, message = "AtMaxReplicas", f"{raw} worker(s) wanted, maxReplicas is " \
                                           f"{a.maxReplicas}"
    elif raw != current and recommendation == current:
        reason, message = "WithinTolerance", f"{raw} vs {current}: within the tolerance"
    return done(desired, reason, message, recommendations)


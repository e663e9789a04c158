"""The autoscaling policy, pure: bursts, flapping, bounds, scale to zero and back, sharing."""

from __future__ import annotations

import pydantic
import pytest

from gristmill.operator.scaling import Demand, GroupShape, ScalingState, decide, share_demand
from gristmill.spec.autoscaling import Autoscaling


def policy(**fields) -> Autoscaling:
    return Autoscaling.model_validate({"maxReplicas": 50, **fields})


def run(a: Autoscaling, trace, concurrency: int = 4, start: int = 1, period: float = 5):
    """Feed (queued, running) samples every `period` seconds; return the replicas chosen."""
    state, current, chosen = ScalingState(), start, []
    for i, (queued, running) in enumerate(trace):
        decision = decide(a, concurrency, current, Demand(queued, running), state, i * period)
        state, current = decision.state, decision.replicas
        chosen.append((current, decision.reason))
    return chosen


def test_burst_scales_up_fast_within_the_rate_policies():
    chosen = run(policy(), [(400, 0)] * 6, concurrency=4)
    replicas = [r for r, _ in chosen]
    # HPA defaults: +100% or +4 pods per 15 s, whichever is more; loops every 5 s.
    assert replicas[0] == 5  # 1 -> max(2, 5)
    assert replicas == sorted(replicas) and replicas[-1] <= 50
    assert chosen[1][1] == "RateLimited"
    assert max(replicas) > 5


def test_scale_down_waits_for_the_stabilization_window():
    a = policy(behavior={"scaleDown": {"stabilizationWindow": "60s",
                                       "policies": [{"type": "Percent", "value": 100}]}})
    trace = [(0, 40)] * 2 + [(0, 4)] * 20
    chosen = run(a, trace, concurrency=4, start=10)
    replicas = [r for r, _ in chosen]
    assert replicas[:2] == [10, 10]
    assert all(r == 10 for r in replicas[2:13])  # 60 s of higher recommendations remembered
    assert replicas[-1] == 1
    assert "StabilizingScaleDown" in {reason for _, reason in chosen}


def test_flapping_input_does_not_flap_replicas():
    trace = [(0, 40), (0, 4)] * 20
    replicas = [r for r, _ in run(policy(), trace, concurrency=4, start=10)]
    assert len(set(replicas)) == 1


def test_tolerance_ignores_small_noise():
    chosen = run(policy(), [(0, 43)], concurrency=4, start=10)  # 43 / 40 jobs: +7.5 %
    assert chosen == [(10, "WithinTolerance")]


def test_min_and_max_bound_the_replicas():
    assert run(policy(minReplicas=3, maxReplicas=6), [(1000, 0)] * 10)[-1] == (
        6, "AtMaxReplicas")
    assert run(policy(minReplicas=3, behavior={"scaleDown": {
        "stabilizationWindow": "0s", "policies": [{"type": "Percent", "value": 100}]}}),
        [(0, 1)] * 5, start=8)[-1][0] == 3


def test_scale_to_zero_after_the_idle_timeout_only_and_back_at_once():
    a = policy(minReplicas=1, scaleToZero={"enabled": True, "idleTimeout": "60s"},
               activation=2)
    trace = [(0, 3)] + [(0, 0)] * 15 + [(1, 0)] * 2 + [(5, 0)]
    chosen = run(a, trace, concurrency=4, start=1)
    replicas = [r for r, _ in chosen]
    assert replicas[:12] == [1] * 12  # idle, but not for 60 s yet
    assert chosen[12] == (0, "ScaledToZero")
    assert replicas[16:18] == [0, 0]  # 1 queued job is below activation
    assert chosen[18] == (2, "WokeFromZero")  # first workers in the same loop


def test_rate_policies_pods_percent_and_select():
    fast = policy(behavior={"scaleUp": {"stabilizationWindow": "0s", "selectPolicy": "Min",
                                        "policies": [{"type": "Pods", "value": 2},
                                                     {"type": "Percent", "value": 300}]}})
    assert [r for r, _ in run(fast, [(200, 0)] * 3, start=2)] == [4, 4, 4]
    slowest = policy(behavior={"scaleUp": {"stabilizationWindow": "0s", "selectPolicy": "Max",
                                           "policies": [{"type": "Pods", "value": 2},
                                                        {"type": "Percent", "value": 300}]}})
    assert run(slowest, [(200, 0)], start=2)[0][0] == 8
    frozen = policy(behavior={"scaleUp": {"stabilizationWindow": "0s",
                                          "selectPolicy": "Disabled", "policies": []}})
    assert run(frozen, [(200, 0)], start=2)[0] == (2, "ScaleUpDisabled")


def test_several_groups_share_a_tag_by_capacity():
    groups = [GroupShape("small", ("python",), capacity=50 * 2),
              GroupShape("big", ("python", "gpu"), capacity=4 * 8)]
    shares = share_demand(groups, {"python": Demand(132, 0), "gpu": Demand(3, 1)})
    assert shares["small"] == Demand(100, 0)
    assert shares["big"] == Demand(32 + 3, 1)


def test_model_validation():
    with pytest.raises(pydantic.ValidationError, match=r"minReplicas \(5\) must not exceed "
                                                         r"maxReplicas \(4\)"):
        Autoscaling.model_validate({"minReplicas": 5, "maxReplicas": 4})
    with pytest.raises(pydantic.ValidationError, match="period"):
        Autoscaling.model_validate({"maxReplicas": 4, "behavior": {"scaleUp": {
            "stabilizationWindow": "0s", "policies": [{"type": "Pods", "value": 1,
                                                       "period": "soon"}]}}})

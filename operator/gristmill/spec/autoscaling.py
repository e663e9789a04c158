"""`spec.autoscaling` of a WorkerGroup, with the HPA's defaults where the HPA has one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gristmill.spec.base import KubernetesModel
from gristmill.spec.quantities import Duration


class ScalingPolicy(KubernetesModel):
    type: Literal["Pods", "Percent"] = Field(description="Pods: a number of pods; Percent: a "
                                                         "percentage of the current replicas.")
    value: int = Field(ge=1, description="How many pods, or what percentage, per period.")
    period: Duration = Field("15s", description="The window the change is counted over.")


class ScalingRules(KubernetesModel):
    stabilizationWindow: Duration = Field(
        description="Recommendations of this long are considered: scale-up takes their "
                    "lowest, scale-down their highest, so short spikes and dips are ignored.")
    policies: list[ScalingPolicy] = Field(description="How fast replicas may change.")
    selectPolicy: Literal["Max", "Min", "Disabled"] = Field(
        "Max", description="Max: the policy allowing the most change; Min: the least; "
                           "Disabled: no change in this direction.")


def _scale_up() -> ScalingRules:
    return ScalingRules(stabilizationWindow="0s", policies=[
        ScalingPolicy(type="Percent", value=100, period="15s"),
        ScalingPolicy(type="Pods", value=4, period="15s")])


def _scale_down() -> ScalingRules:
    return ScalingRules(stabilizationWindow="300s", policies=[
        ScalingPolicy(type="Percent", value=100, period="15s")])


class Behavior(KubernetesModel):
    scaleUp: ScalingRules = Field(default_factory=_scale_up,
                                  description="Default: no window, +100% or +4 pods per 15s.")
    scaleDown: ScalingRules = Field(default_factory=_scale_down,
                                    description="Default: 300s window, -100% per 15s.")


class ScaleToZero(KubernetesModel):
    enabled: bool = Field(False, description="Go to zero workers when the tags are idle.")
    idleTimeout: Duration = Field("5m", description="No queued or running job for this long.")


class Autoscaling(KubernetesModel):
    enabled: bool = Field(True, description="false: spec.replicas (or an HPA/KEDA through "
                                            "the scale subresource) decides.")
    minReplicas: int = Field(1, ge=0, le=10000, description="Fewest workers while busy.")
    maxReplicas: int = Field(ge=1, le=10000, description="Most workers.")
    targetJobsPerWorker: int | None = Field(
        None, ge=1, description="Queued + running jobs one worker should carry (default: "
                                "its concurrency).")
    behavior: Behavior = Field(default_factory=Behavior, description="Rates and windows.")
    scaleToZero: ScaleToZero = Field(default_factory=ScaleToZero,
                                     description="Scaling to zero when idle.")
    activation: int = Field(1, ge=1, description="Due queued jobs that wake a group at zero.")
    tolerance: float = Field(0.1, ge=0, le=1, description="Relative change too small to act "
                                                          "on, as the HPA's.")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"minReplicas ({self.minReplicas}) must not exceed maxReplicas "
                             f"({self.maxReplicas})")
        return self

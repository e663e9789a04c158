"""Kubernetes object metadata, as much of it as Gristmill reads."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ObjectMeta(BaseModel):
    # Objects read back from the API server carry uid, resourceVersion, managedFields...
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63,
                      description="Lower-case letters, digits and '-'.")
    namespace: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63,
                           description="The tenant the object belongs to.")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

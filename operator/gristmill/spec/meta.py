"""Kubernetes object metadata, as much of it as Gristmill reads."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A DNS label: the API server alone would allow dots and 253 characters (a subdomain), but
# names become labels, parts of other objects' names and references in Flows.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
NAME_RULE = "lower-case letters, digits and '-' (no dots)"
_NAME_SCHEMA = {"pattern": NAME_PATTERN, "maxLength": 63}


def check_name(name: str, what: str = "name") -> str:
    if len(name) > 63:
        raise ValueError(f"at most 63 characters in a {what}")
    if not re.fullmatch(NAME_PATTERN, name, re.ASCII):
        raise ValueError(f"{name!r}: {NAME_RULE}, starting and ending with a letter or digit")
    return name


class ObjectMeta(BaseModel):
    # Objects read back from the API server carry uid, resourceVersion, managedFields...
    model_config = ConfigDict(extra="allow")

    name: str = Field(json_schema_extra=_NAME_SCHEMA,
                      description="Lower-case letters, digits and '-'.")
    namespace: str = Field("default", json_schema_extra=_NAME_SCHEMA,
                           description="The tenant the object belongs to.")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_a_label(cls, name: str) -> str:
        return check_name(name)

    @field_validator("namespace")
    @classmethod
    def _namespace_is_a_label(cls, namespace: str) -> str:
        return check_name(namespace, "namespace")

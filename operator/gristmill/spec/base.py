"""The base of every model of a custom resource's fields."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class KubernetesModel(BaseModel):
    """Unknown fields are an error; `null` in a field that cannot be null counts as absent
    (so it gets its default, or is reported missing), as the API server prunes it before
    defaulting: `timeout: null` is the default 15m on both sides."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(value is None for value in data.values()):
            return {key: value for key, value in data.items()
                    if value is not None or not _prunes_null(cls, key)}
        return data


def _prunes_null(model: type[BaseModel], key: str) -> bool:
    field = model.model_fields.get(key)
    if field is None:
        return False  # unknown: left for the unknown-field error
    annotation = field.annotation
    nullable = annotation is None or (
        typing.get_origin(annotation) in (typing.Union, types.UnionType)
        and type(None) in typing.get_args(annotation))
    return not nullable

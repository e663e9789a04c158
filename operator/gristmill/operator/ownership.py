"""Server-side apply: who owns which field of the objects the operator makes.

The operator's field manager owns everything it sets on a WorkerGroup's objects; the
autoscaler's owns an autoscaled Deployment's replicas. Apply (rather than a patch)
means a field one of them stops setting is removed, and neither can silently undo the
other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OPERATOR_FIELD_MANAGER = "gristmill-operator"
AUTOSCALER_FIELD_MANAGER = "gristmill-autoscaler"
APPLY_PATCH = "application/apply-patch+yaml"


def server_side_apply(patch: Callable[..., Any], obj: dict[str, Any], manager: str) -> Any:
    """Apply `obj` (created if missing) with the `patch_*` call of its kind (namespaced or
    not); force, as controllers do: these fields are ours by design."""
    meta = obj["metadata"]
    where = (meta["name"], meta["namespace"]) if "namespace" in meta else (meta["name"],)
    return patch(*where, obj, field_manager=manager, force=True, _content_type=APPLY_PATCH)

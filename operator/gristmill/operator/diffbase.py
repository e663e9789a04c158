"""kopf's memory of what it last handled, without a copy of the spec.

kopf keeps the "essence" of the last handled object in an annotation, to tell real
changes from noise. Annotations are limited to 256 KiB together, and a Script's code can
be larger; `kubectl apply` already spends one copy on its own annotation. Our handlers
only need to know that the spec changed, not how, so the essence holds the spec's
digest instead of the spec: a few dozen bytes whatever the code.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import kopf


class SpecDigestDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        essence = dict(super().build(body=body, extra_fields=extra_fields))
        if "spec" in essence:
            canonical = json.dumps(essence["spec"], sort_keys=True, separators=(",", ":"))
            essence["spec"] = {"sha256": hashlib.sha256(canonical.encode()).hexdigest()}
        return kopf.BodyEssence(essence)

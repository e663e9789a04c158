"""Values of every duration and quantity field, with the verdict both the models and the API
server must give: one table for pydantic, for the CRD's schema offline
(test_crd_agreement.py) and for a real kube-apiserver.

Every verdict here was checked against kube-apiserver 1.37.2 with the generated CRDs
(dry-run creates, JSON bodies as below, so a float stays a float):

    python3 tests/crd_cases.py https://127.0.0.1:6443 TOKEN   # prints any disagreement

Values are JSON values: what YAML gives after kubectl's conversion (kubectl, Helm and
Argo CD turn `1.0` and `1e3` into whole numbers before sending; Python clients do not).
"""

from __future__ import annotations

import copy
import json
import re
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

ABSENT = object()  # the field left out

DURATIONS = [
    (90, True), (0, True), (1.0, True), (1500.0, True), (9007199254740991.0, True),
    (2**63 - 1, True), ("90", True), ("0", True), ("90s", True), ("250ms", True),
    ("1h30m", True), ("1.5s", True), ("1.5", True), ("2d", True), ("1m1m", True),
    ("1d2h3m4s5ms", True), ("0s", True), ("9" * 64, True),
    (0.5, False), (1.5, False), (-1, False), (-1.0, False), (9007199254740992.0, False),
    (1e300, False), (2**63, False), (True, False), ([90], False), ({"s": 90}, False),
    ("", False), ("-1s", False), ("5 minutes", False), ("90 s", False), (" 90s", False),
    ("90s\n", False), ("1x", False), ("s", False), ("1e3", False), ("1.s", False),
    (".5s", False), ("\u0661s", False), ("9" * 65, False), ("1.5e3s", False),
]
BYTES = [
    (536870912, True), (0, True), (1000, True), (1.0, True), (1e3, True), ("512Mi", True),
    ("1Gi", True), ("100M", True), ("1e3", True), ("1E3", True), ("1e+3", True),
    ("1.5Gi", True), (".5Gi", True), ("1.", True), ("0", True), ("1E", True), ("1Ei", True),
    ("1k", True), ("1000", True), ("9" * 32, True), ("1e99999", True),
    (0.5, False), (-1, False), (2**63, False), (True, False), ({"Mi": 1}, False),
    ("", False), ("1K", False), ("1KB", False), ("1MB", False), ("512mi", False),
    ("500m", False), ("1u", False), ("1n", False), ("-1Mi", False), ("1e-3", False),
    ("1 Gi", False), ("Mi", False), ("1.5.5", False), ("1Gi\n", False),
    ("\u0661Mi", False), ("9" * 33, False), ("1Ki1", False),
]
CPUS = [
    (1, True), (2, True), (1.0, True), ("1", True), ("0.5", True), ("500m", True),
    (".5", True), ("2.5", True), ("0.001", True), ("0.5m", True), ("1.", True),
    ("100", True), ("0.0001", True), ("9" * 32, True),
    (0, False), (0.5, False), (-1, False), (0.0, False), (2**63, False), (True, False),
    ("0", False), ("0m", False), ("0.0", False), (".", False), ("", False), ("1e3", False),
    ("1k", False), ("-1", False), ("1 m", False), ("m", False), ("500M", False),
    ("1Mi", False), ("1\n", False), ("\u0661", False), ("1" * 33, False),
]

_WORKER_GROUP_SPEC = {"tags": ["python"], "autoscaling": {
    "maxReplicas": 5,
    "behavior": {"scaleUp": {"stabilizationWindow": "0s",
                             "policies": [{"type": "Pods", "value": 4, "period": "15s"}]},
                 "scaleDown": {"stabilizationWindow": "300s",
                               "policies": [{"type": "Percent", "value": 100}]}},
    "scaleToZero": {"enabled": True, "idleTimeout": "5m"}}}
BASES = {
    "Script": {"language": "bash", "code": "echo hi"},
    "Flow": {"steps": [{"id": "a", "script": "s", "retry": {}, "suspend": {}}]},
    "FlowInline": {"steps": [{"id": "a", "inline": {"language": "bash", "code": "echo"}}]},
    "WorkerGroup": _WORKER_GROUP_SPEC,
}


@dataclass(frozen=True)
class Field:
    kind: str
    path: str  # below the object: spec.resources.cpu, spec.steps[0].timeout
    values: list[tuple[Any, bool]]
    required: bool = False  # null (pruned) is then a missing field
    base: str | None = None  # BASES key, default the kind

    @property
    def id(self) -> str:
        return f"{self.kind}.{self.path}"

    def document(self, value: Any) -> dict[str, Any]:
        spec = copy.deepcopy(BASES[self.base or self.kind])
        doc = {"apiVersion": "gristmill.io/v1alpha1", "kind": self.kind,
               "metadata": {"name": "agreement", "namespace": "default"}, "spec": spec}
        *parents, last = _parts(self.path)
        node: Any = doc
        for part in parents:
            if isinstance(part, str) and part not in node:
                node[part] = {}
            node = node[part]
        if value is ABSENT:
            node.pop(last, None)
        else:
            node[last] = value
        return doc

    def expected(self, value: Any, accepted: bool) -> bool:
        return not self.required if value is None else accepted


def _parts(path: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]


FIELDS = [
    Field("Script", "spec.timeout", DURATIONS),
    Field("Script", "spec.retryBackoff.initialDelay", DURATIONS),
    Field("Script", "spec.retryBackoff.maxDelay", DURATIONS),
    Field("Script", "spec.resources.memory", BYTES),
    Field("Script", "spec.resources.cpu", CPUS),
    Field("Script", "spec.resources.maxOutput", BYTES),
    Field("Script", "spec.resources.maxFileSize", BYTES),
    Field("Script", "spec.resources.disk", BYTES),
    Field("Flow", "spec.timeout", DURATIONS),
    Field("Flow", "spec.steps[0].timeout", DURATIONS),
    Field("Flow", "spec.steps[0].sleep", DURATIONS),
    Field("Flow", "spec.steps[0].retry.delay", DURATIONS),
    Field("Flow", "spec.steps[0].retry.maxDelay", DURATIONS),
    Field("Flow", "spec.steps[0].suspend.timeout", DURATIONS),
    Field("Flow", "spec.steps[0].inline.timeout", DURATIONS, base="FlowInline"),
    Field("Flow", "spec.steps[0].inline.resources.cpu", CPUS, base="FlowInline"),
    Field("Flow", "spec.steps[0].inline.resources.memory", BYTES, base="FlowInline"),
    Field("WorkerGroup", "spec.autoscaling.behavior.scaleUp.stabilizationWindow", DURATIONS,
          required=True),
    Field("WorkerGroup", "spec.autoscaling.behavior.scaleDown.stabilizationWindow",
          DURATIONS, required=True),
    Field("WorkerGroup", "spec.autoscaling.behavior.scaleUp.policies[0].period", DURATIONS),
    Field("WorkerGroup", "spec.autoscaling.behavior.scaleDown.policies[0].period", DURATIONS),
    Field("WorkerGroup", "spec.autoscaling.scaleToZero.idleTimeout", DURATIONS),
]
PLURALS = {"Script": "scripts", "Flow": "flows", "WorkerGroup": "workergroups"}


def api_server_verdict(url: str, token: str, field: Field, value: Any) -> tuple[bool, str]:
    """(accepted, message) of a dry-run create on a real API server."""
    document = field.document(value)
    request = urllib.request.Request(
        f"{url}/apis/gristmill.io/v1alpha1/namespaces/default/{PLURALS[field.kind]}"
        f"?dryRun=All", data=json.dumps(document).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    context = ssl._create_unverified_context()  # a test server's self-signed certificate
    try:
        with urllib.request.urlopen(request, context=context, timeout=30):
            return True, ""
    except urllib.error.HTTPError as exc:
        return False, json.load(exc).get("message", "")


def main(url: str, token: str) -> int:
    checked = disagreements = 0
    for field in FIELDS:
        for value, accepted in [*field.values, (None, True)]:
            verdict, message = api_server_verdict(url, token, field, value)
            checked += 1
            where = field.path.removeprefix("spec.")
            if verdict != field.expected(value, accepted) or \
                    (not verdict and where.rsplit(".", 1)[-1] not in message):
                disagreements += 1
                print(f"{field.id} = {value!r}: expected "
                      f"{'accepted' if field.expected(value, accepted) else 'refused'}, "
                      f"server {'accepted' if verdict else 'refused'}: {message[:300]}")
    print(f"{checked} values checked, {disagreements} disagreements")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

"""Which Secrets a namespace's process-executor workers may read (pure functions).

Process-executor workers read the Secrets their jobs declare through the Kubernetes API
with their own ServiceAccount. The operator keeps one Role per namespace,
`gristmill-script-secrets`, that allows `get` on exactly the Secrets the namespace's
Scripts declare (resourceNames), and one RoleBinding of it to the ServiceAccounts of the
namespace's process-executor WorkerGroups and to the operator itself (which checks that
the Secrets exist, for the Scripts' status, with metadata-only reads). An empty
resourceNames list would allow every Secret: when no Script declares one, both go.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from gristmill import labels
from gristmill.operator.deployment import job_runner_name
from gristmill.operator.reconcile import condition
from gristmill.spec.script import MAX_SECRET_NAME, SECRET_NAME_PATTERN

SECRETS_ROLE = "gristmill-script-secrets"
_SECRET_NAME = re.compile(SECRET_NAME_PATTERN)


def _named(name: Any) -> str | None:
    return name if isinstance(name, str) and len(name) <= MAX_SECRET_NAME and \
        _SECRET_NAME.match(name) else None


def declared_secrets(spec: Any, required_only: bool = False) -> set[str]:
    """The Secrets a Script's spec (as the API server holds it) names; read leniently, as
    an invalid Script's names are refused by its own validation, not here."""
    if not isinstance(spec, dict):
        return set()
    names: set[str] = set()
    for var in spec.get("env") or []:
        ref = ((var.get("valueFrom") or {}).get("secretKeyRef") or {}) \
            if isinstance(var, dict) else {}
        if isinstance(ref, dict) and (name := _named(ref.get("name"))) and \
                not (required_only and ref.get("optional")):
            names.add(name)
    for source in spec.get("envFrom") or []:
        ref = (source.get("secretRef") or {}) if isinstance(source, dict) else {}
        if isinstance(ref, dict) and (name := _named(ref.get("name"))) and \
                not (required_only and ref.get("optional")):
            names.add(name)
    return names


def namespace_secrets(scripts: Iterable[dict[str, Any]]) -> list[str]:
    """The union of what the Scripts (not being deleted) declare."""
    names: set[str] = set()
    for script in scripts:
        if not (script.get("metadata") or {}).get("deletionTimestamp"):
            names |= declared_secrets(script.get("spec"))
    return sorted(names)


def worker_accounts(groups: Iterable[dict[str, Any]]) -> list[str]:
    """The ServiceAccounts of the process-executor WorkerGroups (deployment.py)."""
    accounts = set()
    for group in groups:
        meta, spec = group.get("metadata") or {}, group.get("spec") or {}
        if meta.get("deletionTimestamp") or spec.get("executor", "process") != "process":
            continue
        accounts.add(spec.get("serviceAccountName") or job_runner_name(meta["name"]))
    return sorted(accounts)


def _metadata(namespace: str) -> dict[str, Any]:
    return {"name": SECRETS_ROLE, "namespace": namespace,
            "labels": {labels.PART_OF: "gristmill", labels.MANAGED_BY: "gristmill-operator"}}


def secrets_role(namespace: str, secrets: list[str]) -> dict[str, Any]:
    if not secrets:
        raise ValueError("a Role with empty resourceNames allows every Secret: delete it")
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _metadata(namespace),
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                       "resourceNames": secrets}]}


def secrets_role_binding(namespace: str, accounts: list[str], operator_user: str | None
                         ) -> dict[str, Any]:
    subjects: list[dict[str, Any]] = [{"kind": "ServiceAccount", "name": account,
                                       "namespace": namespace} for account in accounts]
    if operator_user:
        subjects.append({"kind": "User", "apiGroup": "rbac.authorization.k8s.io",
                         "name": operator_user})
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _metadata(namespace),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": SECRETS_ROLE},
            "subjects": subjects}


def secrets_conditions(conditions: list[dict[str, Any]], missing: list[str],
                       unknown: str | None, namespace: str, generation: int | None,
                       previous: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A stored Script's conditions with SecretsAvailable: True, False (SecretNotFound,
    naming them; Ready turns False too, so `kubectl get` and Argo CD show it) or Unknown
    (not checked yet: the operator's read right may not have reached the API server)."""
    if missing:
        names = ", ".join(f"{namespace}/{name}" for name in missing)
        message = (f"Secret {names} not found: create it or mark the reference optional; "
                   f"runs fail until then")
        found = condition("SecretsAvailable", "False", "SecretNotFound", message, generation,
                          previous)
        ready = condition("Ready", "False", "SecretNotFound", message, generation, previous)
        others = [c for c in conditions if c.get("type") not in ("Ready", "SecretsAvailable")]
        return [ready, found, *others]
    if unknown:
        found = condition("SecretsAvailable", "Unknown", "NotChecked", unknown, generation,
                          previous)
    else:
        found = condition("SecretsAvailable", "True", "SecretsFound",
                          "every Secret the Script needs exists", generation, previous)
    return [*(c for c in conditions if c.get("type") != "SecretsAvailable"), found]

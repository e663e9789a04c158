"""What an install or upgrade does before Gristmill starts (`gristmill setup`, the chart's
pre-install/pre-upgrade hook Job; Argo CD runs it as a PreSync hook).

- The CustomResourceDefinitions, server-side applied: Helm installs a chart's crds/ on the
  first install only and never upgrades them, so without this step a new field of a new
  version would be refused (or pruned) by the API server.
- The bundled database's Secret, made once with a random password and kept from then
  on: rendering it in the chart needs Helm's `lookup`, which `helm template` and Argo CD
  answer with nothing, so every render made a new password that no longer matched the
  data directory.
- The worker-token signing key's Secret (key `keys`), made once and kept from then on, for
  the same reason: the API checks worker tokens with it and the operator signs them, and a
  key that changed on every render would void every token.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from gristmill.dispatch import tokens
from gristmill.operator.ownership import server_side_apply
from gristmill.spec.crds import KINDS, crd

log = logging.getLogger("gristmill.setup")

FIELD_MANAGER = "gristmill-setup"
ESTABLISHED_S = 60.0


def apply_crds(api: client.ApiextensionsV1Api, timeout_s: float = ESTABLISHED_S) -> list[str]:
    """Apply every CRD and wait until the API server serves each; returns their names."""
    names = []
    for kind in KINDS:
        definition = crd(kind)
        server_side_apply(api.patch_custom_resource_definition, definition, FIELD_MANAGER)
        names.append(definition["metadata"]["name"])
    deadline = time.monotonic() + timeout_s
    for name in names:
        while not _established(api.read_custom_resource_definition(name)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} was applied but is not Established after "
                                   f"{timeout_s:.0f} s: see `kubectl describe crd {name}`")
            time.sleep(0.5)
        log.info("CRD %s applied and established", name)
    return names


def _established(definition: client.V1CustomResourceDefinition) -> bool:
    conditions = (definition.status and definition.status.conditions) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


@dataclass(frozen=True)
class BundledDatabase:
    namespace: str
    secret: str  # holds `url` (what Gristmill reads) and `password` (what PostgreSQL reads)
    host: str  # the bundled PostgreSQL's Service
    user: str = "gristmill"
    database: str = "gristmill"


def ensure_database_secret(core: client.CoreV1Api, db: BundledDatabase) -> bool:
    """Create the bundled database's Secret unless it exists; True if it was created.

    An existing Secret is never changed: PostgreSQL reads the password only when it first
    creates its data, so a new password would lock everything out of the old data.
    """
    try:
        current = core.read_namespaced_secret(db.secret, db.namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
    else:
        if not (current.data or {}).get("password"):
            raise RuntimeError(f"Secret {db.namespace}/{db.secret} exists without the key "
                               f"`password`: delete it (a new install) or add the password "
                               f"the database was created with")
        log.info("Secret %s/%s exists: its password is kept", db.namespace, db.secret)
        return False
    password = secrets.token_urlsafe(24)
    url = f"postgresql://{db.user}:{quote(password, safe='')}@{db.host}:5432/{db.database}"
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=db.secret, namespace=db.namespace, labels={
            "app.kubernetes.io/part-of": "gristmill",
            "app.kubernetes.io/managed-by": FIELD_MANAGER}),
        type="Opaque",
        data={"url": _b64(url), "password": _b64(password)})
    try:
        core.create_namespaced_secret(db.namespace, body)
    except ApiException as exc:
        if exc.status == 409:  # made meanwhile by another run of this step: that one holds
            return False
        raise
    log.info("Secret %s/%s created with a new random password", db.namespace, db.secret)
    return True


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def ensure_worker_token_key(core: client.CoreV1Api, namespace: str, secret: str) -> bool:
    """Create the worker-token signing key's Secret (key `keys`, one new key) unless it
    exists; True if it was created. An existing one is never changed: a key is rotated by
    hand (add the new one first, comma-separated; drop the old once the operator re-issued
    every token), and only its format is checked here."""
    try:
        current = core.read_namespaced_secret(secret, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
    else:
        text = (current.data or {}).get("keys")
        if not text:
            raise RuntimeError(f"Secret {namespace}/{secret} exists without the key `keys`: "
                               f"delete it (a new key is made; the operator re-issues every "
                               f"worker token) or add the signing keys under `keys`")
        try:
            tokens.parse_keys(base64.b64decode(text).decode())
        except ValueError as exc:
            raise RuntimeError(f"Secret {namespace}/{secret}, key `keys`: {exc}") from None
        log.info("Secret %s/%s exists: its worker-token keys are kept", namespace, secret)
        return False
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=secret, namespace=namespace, labels={
            "app.kubernetes.io/part-of": "gristmill",
            "app.kubernetes.io/managed-by": FIELD_MANAGER}),
        type="Opaque",
        data={"keys": _b64(tokens.new_key())})
    try:
        core.create_namespaced_secret(namespace, body)
    except ApiException as exc:
        if exc.status == 409:  # made meanwhile by another run of this step: that one holds
            return False
        raise
    log.info("Secret %s/%s created with a new worker-token signing key", namespace, secret)
    return True

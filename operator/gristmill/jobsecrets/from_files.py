"""Secrets for `gristmill dev`, which has no cluster: Kubernetes Secret manifests in local
files (`kind: Secret`, `data` base64-encoded and/or `stringData`), the same ones
`kubectl apply` would take. They are read again for each job that needs them, so an edit
counts at once, and held in memory only: never in the database.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from gristmill.jobsecrets.resolve import SecretProblem

MAX_FILE_BYTES = 16 << 20
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def _files(paths: Iterable[str | Path]) -> list[Path]:
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*")
                            if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        else:
            found.append(path)
    return found


def _secret(source: Path, document: Any) -> tuple[tuple[str, str], dict[str, bytes]] | None:
    """((namespace, name), data) of one document, or None when it is not a Secret."""
    if not isinstance(document, dict) or document.get("kind") != "Secret":
        return None
    meta = document.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or len(name) > 253 or not _NAME.match(name):
        raise SecretProblem(f"{source}: a Secret needs metadata.name, a DNS-1123 subdomain "
                            f"such as db-creds")
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or not _NAME.match(namespace):
        raise SecretProblem(f"{source}: Secret {name}: metadata.namespace must be a "
                            f"namespace name such as team-a")
    data: dict[str, bytes] = {}
    for field, decode in (("data", _base64), ("stringData", _utf8)):
        entries = document.get(field) or {}
        if not isinstance(entries, dict):
            raise SecretProblem(f"{source}: Secret {namespace}/{name}: {field} must map keys "
                                f"to values")
        for key, value in entries.items():
            if not isinstance(key, str) or len(key) > 253 or not _KEY.match(key):
                raise SecretProblem(f"{source}: Secret {namespace}/{name}: key {key!r} must "
                                    f"match [-._a-zA-Z0-9]+")
            if not isinstance(value, str):
                raise SecretProblem(f"{source}: Secret {namespace}/{name}: {field}.{key} "
                                    f"must be a string (quote it)")
            try:
                data[key] = decode(value)  # stringData wins, as in the API server
            except ValueError:
                raise SecretProblem(f"{source}: Secret {namespace}/{name}: data.{key} is not "
                                    f"base64; put plain text under stringData") from None
    return (namespace, name), data


def _base64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", errors="surrogateescape")


def load_secrets(paths: Iterable[str | Path]) -> dict[tuple[str, str], dict[str, bytes]]:
    """Every Secret in the files, by (namespace, name); SecretProblem names a bad file."""
    secrets: dict[tuple[str, str], dict[str, bytes]] = {}
    for source in _files(paths):
        try:
            if source.stat().st_size > MAX_FILE_BYTES:
                raise SecretProblem(f"{source}: larger than {MAX_FILE_BYTES >> 20} MiB")
            documents = list(yaml.safe_load_all(source.read_text()))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SecretProblem(f"cannot read the Secrets in {source}: "
                                f"{str(exc).splitlines()[0]}") from None
        for document in documents:
            found = _secret(source, document)
            if found is not None:
                secrets[found[0]] = found[1]
    return secrets


class FileSecrets:
    def __init__(self, paths: Iterable[str | Path]):
        self.paths = list(paths)

    def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        return load_secrets(self.paths).get((namespace, name))

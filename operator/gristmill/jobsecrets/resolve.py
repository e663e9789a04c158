"""A job's Secret references turned into its environment, read fresh for each job.

What the process executor's worker does before it starts a job (the pod executor's
kubelet does the same for a job pod): `envFrom` first, in order, then `env`, which wins,
as in a Pod. A missing Secret or key fails the job, unless its reference is optional.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from gristmill.sandbox.base import SecretEnvFrom, SecretKeyRef

MAX_VALUE_BYTES = 1 << 20  # what the API server holds in one Secret


class SecretProblem(RuntimeError):
    """A Secret the job needs cannot be had; the message says which and what to do."""


class SecretReader(Protocol):
    def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        """The Secret's data, or None when it does not exist; SecretProblem when it cannot
        be read (refused, unreachable)."""


def not_found(namespace: str, name: str) -> str:
    return (f"Secret {namespace}/{name} not found: create it or mark the reference "
            f"optional")


@dataclass(frozen=True)
class ResolvedSecrets:
    env: dict[str, str]
    values: list[str]  # what the job's log, result and error are masked for


def _text(namespace: str, name: str, key: str, value: bytes) -> str:
    """A value as an environment variable can hold it."""
    if b"\x00" in value:
        raise SecretProblem(f"Secret {namespace}/{name}, key {key}: the value holds a NUL "
                            f"byte, which no environment variable can; store it base64 "
                            f"encoded and decode it in the Script")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise SecretProblem(f"Secret {namespace}/{name}, key {key}: the value is not UTF-8 "
                            f"text; store it base64 encoded and decode it in the "
                            f"Script") from None


def resolve(namespace: str, env_from: tuple[SecretEnvFrom, ...],
            env: tuple[SecretKeyRef, ...], reader: SecretReader) -> ResolvedSecrets:
    cache: dict[str, Mapping[str, bytes] | None] = {}  # this job's reads only

    def data(name: str) -> Mapping[str, bytes] | None:
        if name not in cache:
            cache[name] = reader.read(namespace, name)
        return cache[name]

    resolved: dict[str, str] = {}
    for source in env_from:
        found = data(source.secret)
        if found is None:
            if source.optional:
                continue
            raise SecretProblem(not_found(namespace, source.secret))
        for key, value in found.items():
            resolved[source.prefix + key] = _text(namespace, source.secret, key, value)
    for ref in env:
        found = data(ref.secret)
        if found is None or ref.key not in found:
            if ref.optional:
                continue
            raise SecretProblem(not_found(namespace, ref.secret) if found is None else
                                f"Secret {namespace}/{ref.secret} has no key {ref.key}: add "
                                f"it or mark the reference optional")
        resolved[ref.env_name] = _text(namespace, ref.secret, ref.key, found[ref.key])
    return ResolvedSecrets(resolved, list(resolved.values()))

"""A job's Secrets, read by the worker when the job starts (process executor).

The pod executor's job pods reference their Secrets themselves (the kubelet reads
them; the worker never does): such an executor says so with `resolves_secret_refs`.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from gristmill.jobsecrets.masking import Masker
from gristmill.jobsecrets.resolve import SecretProblem, SecretReader, resolve
from gristmill.sandbox.base import Executor, JobRequest

NO_SECRETS = Masker(())


async def with_secrets(request: JobRequest, namespace: str, executor: Executor,
                       reader: SecretReader | None) -> tuple[JobRequest, Masker]:
    """The request with its Secrets' values in its env, and the masker of those values;
    SecretProblem when one it needs cannot be read."""
    if not request.reads_secrets or getattr(executor, "resolves_secret_refs", False):
        return request, NO_SECRETS
    if reader is None:
        raise SecretProblem("the job declares Secrets and this worker has no source of them: "
                            "run it with the Kubernetes API reachable, or give "
                            "`gristmill dev --secrets FILE`")
    resolved = await asyncio.to_thread(resolve, namespace, request.secret_env_from,
                                       request.secret_env, reader)
    # The Script's plain values and the job's own GRISTMILL_* variables win, as `env` wins
    # over `envFrom` in a Pod (names are unique within `env`).
    return (replace(request, env={**resolved.env, **request.env}, secret_env=(),
                    secret_env_from=()), Masker(resolved.values))

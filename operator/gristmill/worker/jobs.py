"""From a stored Script version to what the executor runs: limits, env, input order."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any

from gristmill.flows import catalog
from gristmill.sandbox.base import JobRequest, Limits, SecretEnvFrom, SecretKeyRef
from gristmill.spec import ScriptSpec, apply_defaults, parse_cpu, parse_duration, parse_memory
from gristmill.worker.retry import backoff_delay


@dataclass(frozen=True)
class JobPlan:
    """Everything about running one Script version that does not depend on the input."""

    spec: ScriptSpec
    input_schema: dict[str, Any]
    limits: Limits
    env: dict[str, str]
    secret_env: tuple[SecretKeyRef, ...] = ()
    secret_env_from: tuple[SecretEnvFrom, ...] = ()

    def request(self, job_id: uuid.UUID, job_input: dict[str, Any],
                timeout_s: float | None = None, job_env: dict[str, str] | None = None
                ) -> JobRequest:
        limits = self.limits if timeout_s is None else replace(self.limits, timeout_s=timeout_s)
        return JobRequest(
            job_id=str(job_id),
            language=self.spec.language,
            code=self.spec.code,
            input=apply_defaults(self.input_schema, job_input),
            input_order=tuple(self.input_schema.get("properties", {})),
            requirements=tuple(self.spec.requirements),
            env={**self.env, **(job_env or {})},
            network=self.spec.sandbox.network,
            limits=limits,
            secret_env=self.secret_env,
            secret_env_from=self.secret_env_from,
        )

    def retry_delay(self, attempt: int) -> float:
        backoff = self.spec.retryBackoff
        return backoff_delay(attempt, parse_duration(backoff.initialDelay),
                             parse_duration(backoff.maxDelay))


def plan_job(version: str, stored_spec: dict[str, Any]) -> JobPlan:
    # The same parsed version the flow engine uses: one validation per process.
    script = catalog.script_version(version, stored_spec)
    spec = script.spec
    resources = spec.resources
    limits = Limits(
        timeout_s=parse_duration(spec.timeout),
        memory_bytes=parse_memory(resources.memory),
        cpu_cores=parse_cpu(resources.cpu),
        max_processes=resources.maxProcesses,
        max_output_bytes=parse_memory(resources.maxOutput),
        max_file_bytes=parse_memory(resources.maxFileSize),
        disk_bytes=parse_memory(resources.disk),
    )
    env = {var.name: var.value for var in spec.env if var.valueFrom is None}
    secret_env = tuple(SecretKeyRef(var.name, ref.name, ref.key, ref.optional)
                       for var in spec.env if var.valueFrom
                       for ref in [var.valueFrom.secretKeyRef])
    secret_env_from = tuple(SecretEnvFrom(source.secretRef.name, source.prefix or "",
                                          source.secretRef.optional)
                            for source in spec.envFrom)
    return JobPlan(spec=spec, input_schema=script.input_schema, limits=limits, env=env,
                   secret_env=secret_env, secret_env_from=secret_env_from)

"""The Script custom resource: code in one language, its inputs, limits and sandbox."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, Field, PrivateAttr, field_validator, model_validator

from gristmill.spec import python_inputs
from gristmill.spec.base import KubernetesModel
from gristmill.spec.meta import ObjectMeta
from gristmill.spec.quantities import CpuQuantity, Duration, MemoryQuantity
from gristmill.spec.status import ScriptStatus
from gristmill.values import ValueProblem, check_json

MAX_CODE_LENGTH = 1 << 20  # characters (1 MiB of ASCII): larger programs belong in an image
# Python code longer than this is parsed in a child process with a memory cap (parsing
# costs ~400 bytes per byte of code: 1 MiB took 0.4-0.5 GB); shorter code, in process.
PARSE_IN_PROCESS_LIMIT = 64 * 1024
PARSE_MEMORY_BYTES = 1 << 30
CODE_CHECK_TIMEOUT_S = 30.0
MAX_SCHEMA_DEPTH = 32  # nesting of an input JSON Schema

_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\s*"
                          r"((===?|~=|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+\s*,?\s*)*$")


def content_hash(model: BaseModel) -> str:
    """sha256 of the canonical JSON of a spec, defaults included: the version id."""
    canonical = json.dumps(model.model_dump(mode="json", by_alias=True), sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class RetryBackoff(KubernetesModel):
    initialDelay: Duration = Field("1s", description="Delay before the first retry.")
    maxDelay: Duration = Field("5m", description="Upper bound; delays double up to it, "
                                                 "with jitter.")


class Resources(KubernetesModel):
    memory: MemoryQuantity = Field("512Mi", description="Memory limit of one run.")
    cpu: CpuQuantity = Field("1", description="CPU cores; in the process sandbox, CPU time "
                                              "is capped at timeout x cores.")
    maxProcesses: int = Field(64, ge=1, le=65536, description="Processes and threads at once.")
    maxOutput: MemoryQuantity = Field("10Mi", description="stdout and stderr together; a run "
                                                          "that prints more is stopped.")
    maxFileSize: MemoryQuantity = Field("100Mi", description="Largest file a run may write.")
    disk: MemoryQuantity = Field("256Mi", description="Space for /work and /tmp together; in "
                                                      "the process sandbox a tmpfs (memory) "
                                                      "that also holds at most one file or "
                                                      "directory per 8 KiB of it.")


class Sandbox(KubernetesModel):
    network: bool = Field(False, description="Let the run reach the network.")


ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# As Kubernetes checks them: a Secret's name is a DNS-1123 subdomain, its keys are
# [-._a-zA-Z0-9]+ (both at most 253 characters).
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
MAX_SECRET_NAME = 253


class EnvVar(KubernetesModel):
    name: str = Field(pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str = Field("", description="Its value.")


class SecretKeySelector(KubernetesModel):
    name: str = Field(max_length=MAX_SECRET_NAME, pattern=SECRET_NAME_PATTERN,
                      description="The Secret, in the Script's namespace.")
    key: str = Field(max_length=MAX_SECRET_NAME, pattern=SECRET_KEY_PATTERN,
                     description="The key whose value the variable gets.")
    optional: bool = Field(False, description="Run without the variable when the Secret or "
                                              "the key is missing (default: the run fails).")


class EnvVarSource(KubernetesModel):
    secretKeyRef: SecretKeySelector = Field(description="A key of a Secret.")


class ScriptEnvVar(EnvVar):
    """A variable of a run: a value, or a key of a Secret (as in a Pod's container)."""

    valueFrom: EnvVarSource | None = Field(None, description="Where the value comes from; "
                                                             "`value` must then be empty.")

    @model_validator(mode="after")
    def _one_source(self) -> ScriptEnvVar:
        if self.valueFrom is not None and self.value:
            raise ValueError(f"{self.name}: give `value` or `valueFrom`, not both")
        return self


class SecretEnvSource(KubernetesModel):
    name: str = Field(max_length=MAX_SECRET_NAME, pattern=SECRET_NAME_PATTERN,
                      description="The Secret, in the Script's namespace.")
    optional: bool = Field(False, description="Run without its variables when the Secret is "
                                              "missing (default: the run fails).")


class EnvFromSource(KubernetesModel):
    secretRef: SecretEnvSource = Field(description="Every key of this Secret becomes a "
                                                   "variable.")
    prefix: str | None = Field(None, pattern=ENV_NAME_PATTERN,
                               description="Put before each key to make the variable's name.")


class ScriptSpec(KubernetesModel):
    language: Literal["python", "bash"] = Field(description="The language of `code`.")
    code: str = Field(min_length=1, max_length=MAX_CODE_LENGTH,
                      description="The program, at most 1 MiB (1,048,576 characters). Python: "
                                  "a main(...) function whose parameters are the inputs.")
    description: str | None = Field(None, description="What the Script does.")
    requirements: list[str] = Field(default_factory=list,
                                    description="pip requirements (Python only), installed "
                                                "from wheels into a cached environment.")
    tag: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
                            description="Routes runs to the WorkerGroups serving it "
                                        "(default: the language).")
    timeout: Duration = Field("15m", description="Wall-clock limit of one attempt.")
    retries: int = Field(0, ge=0, le=100, description="Attempts after a failure.")
    retryBackoff: RetryBackoff = Field(default_factory=RetryBackoff,
                                       description="Exponential backoff between attempts.")
    concurrencyLimit: int | None = Field(None, ge=1, description="Runs of this Script at once.")
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")
    resources: Resources = Field(default_factory=Resources, description="Limits of one run.")
    sandbox: Sandbox = Field(default_factory=Sandbox, description="Sandbox options.")
    env: list[ScriptEnvVar] = Field(default_factory=list,
                                    description="Environment of the run: nothing else "
                                                "reaches it. A value, or a key of a Secret "
                                                "in the Script's namespace (valueFrom).")
    envFrom: list[EnvFromSource] = Field(default_factory=list,
                                         description="Secrets whose every key becomes a "
                                                     "variable; `env` wins over them.")
    input: dict[str, Any] | None = Field(None, description="JSON Schema of the input; inferred "
                                                           "from main() for Python when absent.")
    _inferred_input: dict[str, Any] | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        check_storable(data)
        return data

    @field_validator("requirements")
    @classmethod
    def _requirements_look_right(cls, requirements: list[str]) -> list[str]:
        for requirement in requirements:
            if not _REQUIREMENT.match(requirement.strip()):
                raise ValueError(f"{requirement!r} is not a pip requirement such as "
                                 f"'requests==2.32.3'")
        return requirements

    @field_validator("input", mode="before")
    @classmethod
    def _input_is_shallow(cls, schema: Any) -> Any:
        check_schema_depth(schema)
        return schema

    @field_validator("input")
    @classmethod
    def _input_is_a_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        if schema.get("type") != "object":
            raise ValueError("the input schema must have type: object")
        return schema

    @model_validator(mode="after")
    def _code_is_runnable(self) -> ScriptSpec:
        names = [var.name for var in self.env]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"env: {', '.join(duplicates)} given more than once")
        if self.language == "python":
            self._inferred_input = _check_python(self.code)
        else:
            if self.requirements:
                raise ValueError("requirements are for Python Scripts; install tools for bash "
                                 "in the worker image")
            _check_bash(self.code)
        return self

    @property
    def effective_tag(self) -> str:
        return self.tag or self.language

    def secret_names(self, required_only: bool = False) -> list[str]:
        """The Secrets the Script's runs read (those it cannot run without)."""
        names = {var.valueFrom.secretKeyRef.name for var in self.env if var.valueFrom
                 and not (required_only and var.valueFrom.secretKeyRef.optional)}
        names |= {source.secretRef.name for source in self.envFrom
                  if not (required_only and source.secretRef.optional)}
        return sorted(names)

    def input_schema(self) -> dict[str, Any]:
        if self.input is not None:
            return self.input
        if self.language == "python":
            if self._inferred_input is None:
                self._inferred_input = _check_python(self.code)
            return self._inferred_input
        # A bash Script that declares no inputs takes any object as environment variables.
        return {"type": "object", "properties": {}, "additionalProperties": True}

    def content_hash(self) -> str:
        return content_hash(self)


def check_storable(data: Any) -> None:
    """Refuse what PostgreSQL's jsonb cannot store (NUL, NaN, over-deep nesting), naming the
    field, so a spec applied through Kubernetes fails its check, not its database write."""
    try:
        check_json(data, "")
    except ValueProblem as exc:
        raise ValueError(f"{exc.where.lstrip('.') or 'spec'}: {exc.reason}") from None


def check_schema_depth(schema: Any) -> None:
    """An input schema nested deeper than any real one is refused before jsonschema reads it
    (it recurses: a schema 10,000 levels deep was a RecursionError)."""
    try:
        check_json(schema, "schema", max_depth=MAX_SCHEMA_DEPTH)
    except ValueProblem as exc:
        raise ValueError(exc.reason) from None


def _check_python(code: str) -> dict[str, Any]:
    """The input schema inferred from main; ValueError("code: ...") when the code does not
    parse or has no main."""
    if len(code) <= PARSE_IN_PROCESS_LIMIT:
        try:
            return python_inputs.check_code(code)
        except ValueError as exc:
            raise ValueError(f"code: {exc}") from None
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", python_inputs.__file__, str(PARSE_MEMORY_BYTES)],
            input=code, capture_output=True, text=True, timeout=CODE_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"code: parsing it took longer than {CODE_CHECK_TIMEOUT_S:g} s; "
                         f"make the Script smaller") from None
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = {"error": "memory"}  # the child died: out of memory, most likely
    if answer.get("error") == "memory":
        raise ValueError(f"code: parsing it needs more than {PARSE_MEMORY_BYTES >> 20} MiB "
                         f"of memory; make the Script smaller")
    if "error" in answer:
        raise ValueError(f"code: {answer['error']}")
    return answer["schema"]


def _check_bash(code: str) -> None:
    bash = shutil.which("bash")
    if bash is None:
        return
    if "\x00" in code:
        raise ValueError("code: contains a NUL character, which bash cannot read")
    try:
        result = subprocess.run([bash, "-n"], input=code, capture_output=True, text=True,
                                timeout=CODE_CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"code: bash -n took longer than {CODE_CHECK_TIMEOUT_S:g} s to read "
                         f"it; make the Script smaller") from None
    if result.returncode < 0:
        raise ValueError(f"code: bash -n crashed reading it (signal {-result.returncode}); "
                         f"nest command substitutions less deeply")
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[0] if result.stderr.strip() else "invalid"
        raise ValueError(f"code: bash syntax error: {message.replace('bash: ', '')}")


class Script(KubernetesModel):
    apiVersion: Literal["gristmill.io/v1alpha1"] = "gristmill.io/v1alpha1"
    kind: Literal["Script"] = "Script"
    metadata: ObjectMeta
    spec: ScriptSpec
    status: ScriptStatus | None = Field(None, exclude=True)

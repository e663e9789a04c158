"""The Script custom resource: code in one language, its inputs, limits and sandbox."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gristmill.spec.meta import ObjectMeta
from gristmill.spec.python_inputs import find_main, infer_input_schema
from gristmill.spec.quantities import CpuQuantity, Duration, MemoryQuantity

_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?\s*"
                          r"((===?|~=|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+\s*,?\s*)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def content_hash(model: BaseModel) -> str:
    """sha256 of the canonical JSON of a spec, defaults included: the version id."""
    canonical = json.dumps(model.model_dump(mode="json", by_alias=True), sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class RetryBackoff(_Strict):
    initialDelay: Duration = Field("1s", description="Delay before the first retry.")
    maxDelay: Duration = Field("5m", description="Upper bound; delays double up to it, "
                                                 "with jitter.")


class Resources(_Strict):
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


class Sandbox(_Strict):
    network: bool = Field(False, description="Let the run reach the network.")


class EnvVar(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Variable name.")
    value: str = Field("", description="Its value.")


class ScriptSpec(_Strict):
    language: Literal["python", "bash"] = Field(description="The language of `code`.")
    code: str = Field(min_length=1, description="The program. Python: a main(...) function "
                                                "whose parameters are the inputs.")
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
    env: list[EnvVar] = Field(default_factory=list, description="Environment of the run: "
                                                                "nothing else reaches it.")
    input: dict[str, Any] | None = Field(None, description="JSON Schema of the input; inferred "
                                                           "from main() for Python when absent.")

    @field_validator("requirements")
    @classmethod
    def _requirements_look_right(cls, requirements: list[str]) -> list[str]:
        for requirement in requirements:
            if not _REQUIREMENT.match(requirement.strip()):
                raise ValueError(f"{requirement!r} is not a pip requirement such as "
                                 f"'requests==2.32.3'")
        return requirements

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
            _check_python(self.code)
        else:
            if self.requirements:
                raise ValueError("requirements are for Python Scripts; install tools for bash "
                                 "in the worker image")
            _check_bash(self.code)
        return self

    @property
    def effective_tag(self) -> str:
        return self.tag or self.language

    def input_schema(self) -> dict[str, Any]:
        if self.input is not None:
            return self.input
        if self.language == "python":
            return infer_input_schema(self.code)
        # A bash Script that declares no inputs takes any object as environment variables.
        return {"type": "object", "properties": {}, "additionalProperties": True}

    def content_hash(self) -> str:
        return content_hash(self)


def _check_python(code: str) -> None:
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise ValueError(f"code: Python syntax error at line {exc.lineno}: {exc.msg}") from None
    if find_main(tree) is None:
        raise ValueError("code: define a function main(...) whose parameters are the "
                         "Script's inputs")


def _check_bash(code: str) -> None:
    bash = shutil.which("bash")
    if bash is None:
        return
    result = subprocess.run([bash, "-n"], input=code, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[0] if result.stderr.strip() else "invalid"
        raise ValueError(f"code: bash syntax error: {message.replace('bash: ', '')}")


class Script(_Strict):
    apiVersion: Literal["gristmill.io/v1alpha1"] = "gristmill.io/v1alpha1"
    kind: Literal["Script"] = "Script"
    metadata: ObjectMeta
    spec: ScriptSpec
    status: dict[str, Any] | None = Field(None, exclude=True)

"""The custom resources' models: the single source of truth for manifests and CRDs."""

from gristmill.spec.flow import Flow, FlowSpec, Step
from gristmill.spec.inputs import InputError, apply_defaults, check_input
from gristmill.spec.manifests import (
    KINDS,
    LoadResult,
    ManifestError,
    load_manifest_text,
    load_manifests,
)
from gristmill.spec.meta import ObjectMeta
from gristmill.spec.python_inputs import infer_input_schema
from gristmill.spec.quantities import parse_cpu, parse_duration, parse_memory
from gristmill.spec.script import EnvVar, Script, ScriptSpec, content_hash
from gristmill.spec.workergroup import WorkerGroup, WorkerGroupSpec

KINDS.update({"Script": Script, "Flow": Flow, "WorkerGroup": WorkerGroup})

__all__ = [
    "EnvVar", "Flow", "FlowSpec", "InputError", "KINDS", "LoadResult", "ManifestError",
    "ObjectMeta", "Script", "ScriptSpec", "Step", "apply_defaults", "check_input",
    "content_hash", "infer_input_schema", "load_manifest_text", "load_manifests", "parse_cpu",
    "parse_duration", "parse_memory", "WorkerGroup", "WorkerGroupSpec",
]

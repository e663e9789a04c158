"""Parsed Script and Flow versions by content hash: a version never changes, so each
process parses it once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from gristmill.flows.plan import FlowPlan
from gristmill.spec import FlowSpec, ScriptSpec
from gristmill.store import flows as flow_store
from gristmill.store import scripts as script_store


@dataclass(frozen=True)
class ScriptVersion:
    version: str
    spec: ScriptSpec
    input_schema: dict[str, Any]


_scripts: dict[str, ScriptVersion] = {}
_flows: dict[str, FlowPlan] = {}


def script_version(version: str, stored_spec: dict[str, Any]) -> ScriptVersion:
    if version not in _scripts:
        spec = ScriptSpec.model_validate(stored_spec)
        _scripts[version] = ScriptVersion(version, spec, spec.input_schema())
    return _scripts[version]


def cached_script_version(version: str) -> ScriptVersion | None:
    """A version this process has already read, or None (versions never change)."""
    return _scripts.get(version)


async def load_script_version(conn: psycopg.AsyncConnection, version: str) -> ScriptVersion:
    if version not in _scripts:
        stored = await script_store.get_versions(conn, [version])
        script_version(version, stored[version])
    return _scripts[version]


async def load_flow_plan(conn: psycopg.AsyncConnection, version: str) -> FlowPlan:
    if version not in _flows:
        stored = await flow_store.get_version(conn, version)
        _flows[version] = FlowPlan.build(FlowSpec.model_validate(stored), version)
    return _flows[version]

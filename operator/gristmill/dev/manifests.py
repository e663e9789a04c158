"""Applying manifest files to the database without a cluster (`gristmill dev`, `apply`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from gristmill.flows.apply import apply_flow, flow_problems
from gristmill.spec import Flow, ManifestError, Script, load_manifests
from gristmill.store import flows as flow_store
from gristmill.store import scripts as script_store

Key = tuple[str, str, str]  # kind, namespace, name


@dataclass
class ApplyReport:
    applied: list[str] = field(default_factory=list)  # "Script default/hello version abc"
    deleted: list[str] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)
    names: set[Key] = field(default_factory=set)  # what is loaded now

    def lines(self) -> list[str]:
        return ([f"applied {line}" for line in self.applied]
                + [f"deleted {line}" for line in self.deleted]
                + [f"error: {error}" for error in self.errors])


def _key(resource: Script | Flow) -> Key:
    return resource.kind, resource.metadata.namespace, resource.metadata.name


async def apply_manifests(
    conn: psycopg.AsyncConnection, paths: Iterable[str | Path],
    previously: set[Key] | None = None,
) -> ApplyReport:
    """Load manifests and store the valid ones in one transaction.

    Scripts go first, then Flows, which must find their Scripts and sub-flows.
    A file with an error contributes nothing; a Flow whose Scripts are missing
    is refused. What was loaded before (`previously`) and is gone from the files
    now is deleted, unless a file failed to load: it may hold it, and the last
    good version stays.
    """
    loaded = load_manifests(paths)
    report = ApplyReport(errors=list(loaded.errors))
    scripts = [r for r in loaded.resources if isinstance(r, Script)]
    flows = [r for r in loaded.resources if isinstance(r, Flow)]
    async with conn.transaction():
        for script in scripts:
            version, moved = await script_store.apply(conn, script)
            report.names.add(_key(script))
            if moved:
                report.applied.append(f"Script {script.metadata.namespace}/"
                                      f"{script.metadata.name} version {version[:12]}")
        pending = {(f.metadata.namespace, f.metadata.name): f.spec for f in flows}
        for flow in flows:
            namespace = flow.metadata.namespace
            same_namespace = {name: spec for (ns, name), spec in pending.items() if ns == namespace}
            problems = await flow_problems(conn, flow, same_namespace)
            if problems:
                report.errors += [ManifestError(loaded.source_of(flow), problem, "Flow",
                                                flow.metadata.name, "spec.steps")
                                  for problem in problems]
                continue
            version, moved = await apply_flow(conn, flow)
            report.names.add(_key(flow))
            if moved:
                report.applied.append(f"Flow {namespace}/{flow.metadata.name} "
                                      f"version {version[:12]}")
        for key in sorted((previously or set()) - report.names):
            if report.errors:
                report.names.add(key)  # a broken file may hold it: keep the last good version
                continue
            kind, namespace, name = key
            store = script_store if kind == "Script" else flow_store
            if await store.delete(conn, namespace, name):
                report.deleted.append(f"{kind} {namespace}/{name}")
    return report


async def apply_paths(database_url: str, paths: Iterable[str | Path]) -> ApplyReport:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        return await apply_manifests(conn, paths)

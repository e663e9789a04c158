"""Applying manifest files to the database without a cluster (`gristmill dev`, `apply`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from gristmill.spec import ManifestError, Script, load_manifests
from gristmill.store import scripts as script_store


@dataclass
class ApplyReport:
    applied: list[str] = field(default_factory=list)  # "ns/name version (changed|unchanged)"
    deleted: list[str] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)
    names: set[tuple[str, str]] = field(default_factory=set)  # (namespace, name) now loaded

    def lines(self) -> list[str]:
        return ([f"applied Script {line}" for line in self.applied]
                + [f"deleted Script {name}" for name in self.deleted]
                + [f"error: {error}" for error in self.errors])


async def apply_manifests(
    conn: psycopg.AsyncConnection, paths: Iterable[str | Path],
    previously: set[tuple[str, str]] | None = None,
) -> ApplyReport:
    """Load manifests and store the valid ones in one transaction.

    A file with an error contributes nothing (its error is reported); Scripts
    that were loaded before (`previously`) and are gone from the files now are
    deleted, except those of files that failed to load, which keep their last
    good version.
    """
    loaded = load_manifests(paths)
    report = ApplyReport(errors=list(loaded.errors))
    async with conn.transaction():
        for resource in loaded.resources:
            if not isinstance(resource, Script):
                continue
            version, moved = await script_store.apply(conn, resource)
            key = (resource.metadata.namespace, resource.metadata.name)
            report.names.add(key)
            if moved:
                report.applied.append(f"{key[0]}/{key[1]} version {version[:12]}")
        failed_files = {str(error.path) for error in loaded.errors}
        for key in sorted((previously or set()) - report.names):
            if failed_files:
                report.names.add(key)  # a broken file may hold it: keep the last good version
                continue
            if await script_store.delete(conn, *key):
                report.deleted.append(f"{key[0]}/{key[1]}")
    return report


async def apply_paths(database_url: str, paths: Iterable[str | Path]) -> ApplyReport:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        return await apply_manifests(conn, paths)

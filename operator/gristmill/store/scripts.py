"""Script versions, stored by content hash; a name points at its current version."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from gristmill.spec import Script
from gristmill.store import queries


async def put_version(conn: psycopg.AsyncConnection, version: str, spec: dict[str, Any]) -> None:
    await conn.execute(queries.PUT_SCRIPT_VERSION, [version, Jsonb(spec)])


async def put(
    conn: psycopg.AsyncConnection, namespace: str, name: str, version: str, spec: dict[str, Any]
) -> bool:
    """Store a version and point `namespace/name` at it; True when the name moved."""
    await put_version(conn, version, spec)
    cur = await conn.execute(queries.PUT_SCRIPT, [namespace, name, version])
    return cur.rowcount > 0


async def delete(conn: psycopg.AsyncConnection, namespace: str, name: str) -> bool:
    """Stop new runs of a Script; its versions stay for the runs that pinned them."""
    cur = await conn.execute(queries.DELETE_SCRIPT, [namespace, name])
    return cur.rowcount > 0


async def get(
    conn: psycopg.AsyncConnection, namespace: str, name: str
) -> tuple[str, dict[str, Any]] | None:
    """The current (version, spec) of a Script, or None."""
    cur = await conn.execute(queries.GET_SCRIPT, [namespace, name])
    return await cur.fetchone()


async def get_versions(
    conn: psycopg.AsyncConnection, versions: Sequence[str]
) -> dict[str, dict[str, Any]]:
    cur = await conn.execute(queries.GET_SCRIPT_VERSIONS, [list(versions)])
    return {version: spec for version, spec in await cur.fetchall()}


async def list_all(conn: psycopg.AsyncConnection, namespace: str | None = None) -> list[tuple]:
    cur = await conn.execute(queries.LIST_SCRIPTS, {"namespace": namespace})
    return list(await cur.fetchall())


async def apply(conn: psycopg.AsyncConnection, script: Script) -> tuple[str, bool]:
    """Store a validated Script manifest; return (version, whether the name moved)."""
    version = script.spec.content_hash()
    moved = await put(conn, script.metadata.namespace, script.metadata.name, version,
                      script.spec.model_dump(mode="json", by_alias=True))
    return version, moved

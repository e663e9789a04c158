"""Schema migrations: numbered SQL files applied in order, once, under a lock.

Safe to run from several processes at once (every worker and the API call it on
start): an advisory lock serialises them and each file is applied in its own
transaction together with its row in `schema_migrations`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import psycopg

from gristmill.store.maintenance import ensure_partitions

# Any constant works; it only has to be the same in every process.
_MIGRATION_LOCK = 0x6772_6973_746D  # "gristm"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    folder = resources.files("gristmill.store") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: psycopg.AsyncConnection) -> list[Migration]:
    """Apply the migrations this database lacks; return the ones applied now."""
    applied_now = []
    await conn.set_autocommit(True)
    await conn.execute("SELECT pg_advisory_lock(%s)", [_MIGRATION_LOCK])
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in await cur.fetchall()}
        for migration in available_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    [migration.version, migration.name],
                )
            applied_now.append(migration)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", [_MIGRATION_LOCK])
    return applied_now


async def migrate_url(url: str) -> list[Migration]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        applied = await migrate(conn)
        await ensure_partitions(conn)
        return applied

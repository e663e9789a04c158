"""The audit trail: a row for every change a caller makes (who, what, which run, when, from
where), written in the transaction of the change itself, so a change cannot commit
without its row nor a row without its change; and read back a keyset page at a time.

Partitioned by day like the job history and dropped with it by retention
(store/maintenance.py)."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from gristmill.store import pages, queries


class AuditAction(enum.StrEnum):
    """What a caller did. Schedule and webhook changes join when they exist (and widen the
    table's audit_action_known constraint in their migration)."""

    SUBMIT = "submit"
    CANCEL = "cancel"
    APPROVE = "approve"
    REJECT = "reject"
    RESTART = "restart"


class Actor(Protocol):
    """Who acted, as the API's authentication saw them (api/identity.Caller is one)."""

    username: str
    uid: str
    groups: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: dt.datetime
    namespace: str
    username: str
    uid: str
    groups: tuple[str, ...]
    action: AuditAction
    run_id: uuid.UUID | None
    target: str | None
    source: str
    detail: dict[str, Any]

    @property
    def position(self) -> pages.Before:
        return pages.Before(self.at, self.id)


@dataclass(frozen=True)
class AuditQuery:
    namespace: str
    actions: frozenset[AuditAction] = frozenset()  # empty: every action
    user: str | None = None
    run_id: uuid.UUID | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    before: pages.Before | None = None
    limit: int = 50


async def record(conn: psycopg.AsyncConnection, actor: Actor, action: AuditAction,
                 namespace: str, run_id: uuid.UUID | None, target: str | None,
                 detail: Mapping[str, Any] | None = None) -> None:
    """Add the row of a change; call it inside the change's own transaction."""
    await conn.execute(queries.RECORD_AUDIT, [
        namespace, actor.username, actor.uid, list(actor.groups), str(action), run_id, target,
        actor.source, Jsonb(dict(detail or {}))])


async def record_many(conn: psycopg.AsyncConnection, actor: Actor, action: AuditAction,
                      namespace: str, run_ids: Sequence[uuid.UUID], target: str | None,
                      details: Sequence[Mapping[str, Any]]) -> None:
    """The rows of one change to many runs (one per run, so each run's trail has its own),
    in one statement; inside the change's own transaction."""
    await conn.execute(queries.RECORD_AUDIT_MANY, [
        namespace, actor.username, actor.uid, list(actor.groups), str(action), target,
        actor.source, list(run_ids), [Jsonb(dict(d)) for d in details]])


_BOUNDS = {"since": queries.LIST_AUDIT_WHERE_SINCE, "until": queries.LIST_AUDIT_WHERE_UNTIL,
           "before": queries.LIST_AUDIT_WHERE_BEFORE}


def statement(query: AuditQuery) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {"namespace": query.namespace, "limit": query.limit}
    fragments = pages.bounds(query.since, query.until, query.before, _BOUNDS, params)
    if query.actions:
        fragments.append(queries.LIST_AUDIT_WHERE_ACTIONS)
        params["actions"] = sorted(str(a) for a in query.actions)
    if query.user is not None:
        fragments.append(queries.LIST_AUDIT_WHERE_USER)
        params["user"] = query.user
    if query.run_id is not None:
        fragments.append(queries.LIST_AUDIT_WHERE_RUN)
        params["run"] = query.run_id
    return pages.compose(queries.LIST_AUDIT, fragments), params


async def list_entries(conn: psycopg.AsyncConnection, query: AuditQuery) -> list[AuditEntry]:
    sql, params = statement(query)
    cur = await conn.execute(sql, params)
    return [AuditEntry(entry_id, at, namespace, username, uid, tuple(groups),
                       AuditAction(action), run_id, target, source, detail)
            for entry_id, at, namespace, username, uid, groups, action, run_id, target, source,
            detail in await cur.fetchall()]

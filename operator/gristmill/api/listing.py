"""The listings: a namespace's runs (GET /api/v1/namespaces/{ns}/runs) and its audit trail
(GET /api/v1/namespaces/{ns}/audit), filtered by query parameters and paged by an opaque
cursor. Each answers {"items": [...], "next": CURSOR or null}; a filter that is wrong is
a 400 naming it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from gristmill.api import cursor, params, run_labels
from gristmill.api.database import Database
from gristmill.api.runs import RunError
from gristmill.spec import parse_duration
from gristmill.store import audit, run_listing
from gristmill.store.run_listing import RunKind, RunStatus
from gristmill.values import ValueProblem, check_time, text_problem

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_USERNAME = 512
_TIME_EXAMPLE = "an RFC 3339 time such as 2026-12-01T09:00:00Z, or a duration ago such as 1h"

T = TypeVar("T")

RUNS_PARAMS = {"script", "flow", "kind", "status", "since", "until", "label", "limit", "cursor"}
AUDIT_PARAMS = {"action", "user", "run", "since", "until", "limit", "cursor"}


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:60] + "...")


def _check_known(request: web.Request, known: set[str]) -> None:
    unknown = set(request.query) - known
    if unknown:
        raise RunError(400, f"unknown query parameter(s) {', '.join(sorted(map(_shown, unknown)))}"
                            f"; this listing takes {', '.join(sorted(known))}")


def _single(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise RunError(400, f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def _choices(request: web.Request, name: str, parse: Callable[[str], T], allowed: str
             ) -> frozenset[T]:
    """A parameter given as a comma list, repeated, or both (status=failed,cancelled)."""
    chosen = set()
    for value in request.query.getall(name, []):
        for part in value.split(","):
            try:
                chosen.add(parse(part.strip()))
            except ValueError:
                raise RunError(400, f"{name} {_shown(part)} is not one of {allowed}") from None
    return frozenset(chosen)


def _enum_choices(request: web.Request, name: str, kind: type[T]) -> frozenset[T]:
    return _choices(request, name, kind, ", ".join(str(member) for member in kind))


def time_param(request: web.Request, name: str, now: dt.datetime) -> dt.datetime | None:
    """An RFC 3339 time, or a duration before now (1h, 30m, 7d)."""
    text = _single(request, name)
    if text is None:
        return None
    try:
        return now - dt.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueProblem(name, f"{_shown(text)} is not {_TIME_EXAMPLE}") from None
    return check_time(when, name)


def _time_range(request: web.Request) -> tuple[dt.datetime | None, dt.datetime | None]:
    now = dt.datetime.now(dt.UTC)
    since, until = time_param(request, "since", now), time_param(request, "until", now)
    if since is not None and until is not None and since >= until:
        raise RunError(400, f"since ({since.isoformat()}) must be before until "
                            f"({until.isoformat()})")
    return since, until


def _limit(request: web.Request) -> int:
    text = _single(request, "limit")
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit() and len(text) <= 3
            and 1 <= int(text) <= MAX_LIMIT):
        raise RunError(400, f"limit must be a whole number from 1 to {MAX_LIMIT}, not "
                            f"{_shown(text)}")
    return int(text)


def _query_name(request: web.Request, name: str) -> str | None:
    value = _single(request, name)
    if value is not None and not params.is_name(value):
        raise RunError(400, f"{name} {_shown(value)} is not a valid {name} name: lower-case "
                            f"letters, digits and '-'")
    return value


def _labels(request: web.Request) -> dict[str, str]:
    labels: dict[str, str] = {}
    for text in request.query.getall("label", []):
        key, value = run_labels.parse_selector(text)
        if labels.get(key, value) != value:
            raise RunError(400, f"label {key!r} is given with two values; a run has one")
        labels[key] = value
    return labels


def _page(items: list[Any], limit: int, present: Callable[[Any], dict[str, Any]],
          digest: str) -> web.Response:
    """The answer: up to `limit` items (one more was read to know whether more follow)."""
    shown = items[:limit]
    following = cursor.encode(shown[-1].position, digest) if len(items) > limit else None
    return web.json_response({"items": [present(item) for item in shown], "next": following})


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- runs ----------------------------------------------------------------------------------

def runs_query(request: web.Request, namespace: str) -> tuple[run_listing.RunQuery, str]:
    """The checked query of a run listing request, and its digest (for the cursor)."""
    _check_known(request, RUNS_PARAMS)
    script, flow = _query_name(request, "script"), _query_name(request, "flow")
    kinds = _enum_choices(request, "kind", RunKind) or frozenset(RunKind)
    if script and flow:
        raise RunError(400, "give script or flow, not both: a run is of one of them")
    if script or flow:
        kind = RunKind.SCRIPT if script else RunKind.FLOW
        if kind not in kinds:
            raise RunError(400, f"kind={','.join(sorted(kinds))} contradicts "
                                f"{kind}={script or flow}: leave kind out")
        kinds = frozenset({kind})
    statuses = _enum_choices(request, "status", RunStatus) or frozenset(RunStatus)
    since, until = _time_range(request)
    labels = _labels(request)
    digest = cursor.query_digest(namespace=namespace, kinds=sorted(kinds), name=script or flow,
                                 statuses=sorted(statuses), since=_iso(since),
                                 until=_iso(until), labels=labels)
    text = _single(request, "cursor")
    before = cursor.decode(text, digest, uuid.UUID) if text is not None else None
    query = run_listing.RunQuery(namespace=namespace, kinds=kinds, name=script or flow,
                                 statuses=statuses, since=since, until=until, labels=labels,
                                 before=before, limit=_limit(request))
    return query, digest


def present_run_summary(run: run_listing.RunSummary) -> dict[str, Any]:
    return {
        "id": str(run.id),
        "kind": str(run.kind),
        "namespace": run.namespace,
        "name": run.name,
        "status": str(run.status),
        "labels": run.labels,
        "createdAt": _iso(run.created_at),
        "startedAt": _iso(run.started_at),
        "finishedAt": _iso(run.finished_at),
        "durationMs": (round((run.finished_at - run.started_at).total_seconds() * 1000, 1)
                       if run.started_at and run.finished_at else None),
    }


def _one_more(query: T) -> T:
    return dataclasses.replace(query, limit=query.limit + 1)


async def list_runs(request: web.Request, db: Database) -> web.Response:
    namespace = params.name(request, "namespace")
    # Authorization goes here: `list` on `runs` in `namespace`.
    query, digest = runs_query(request, namespace)
    found = await db.read(lambda conn: run_listing.list_runs(conn, _one_more(query)))
    return _page(found, query.limit, present_run_summary, digest)


# --- audit ---------------------------------------------------------------------------------

def _run_param(request: web.Request) -> uuid.UUID | None:
    text = _single(request, "run")
    if text is None:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        raise RunError(400, f"run {_shown(text)} is not a run id (a UUID such as "
                            f"3f2b8c4e-1d2a-4b6e-9f10-2a3b4c5d6e7f)") from None


def _user_param(request: web.Request) -> str | None:
    user = _single(request, "user")
    if user is None:
        return None
    problem = text_problem(user)
    if problem or not user or len(user) > MAX_USERNAME:
        raise ValueProblem("user", problem or f"must be a username of 1 to {MAX_USERNAME} "
                                              f"characters, such as jane@example.com")
    return user


def audit_query(request: web.Request, namespace: str) -> tuple[audit.AuditQuery, str]:
    _check_known(request, AUDIT_PARAMS)
    actions = _enum_choices(request, "action", audit.AuditAction)
    user, run_id = _user_param(request), _run_param(request)
    since, until = _time_range(request)
    digest = cursor.query_digest(namespace=namespace, actions=sorted(actions), user=user,
                                 run=run_id, since=_iso(since), until=_iso(until))
    text = _single(request, "cursor")
    before = cursor.decode(text, digest, _audit_id) if text is not None else None
    query = audit.AuditQuery(namespace=namespace, actions=actions, user=user, run_id=run_id,
                             since=since, until=until, before=before, limit=_limit(request))
    return query, digest


def _audit_id(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise ValueError(text)
    return int(text)


def present_audit_entry(entry: audit.AuditEntry) -> dict[str, Any]:
    return {
        "id": str(entry.id),
        "at": entry.at.isoformat(),
        "namespace": entry.namespace,
        "user": {"username": entry.username, "uid": entry.uid, "groups": list(entry.groups)},
        "action": str(entry.action),
        "run": str(entry.run_id) if entry.run_id else None,
        "target": entry.target,
        "source": entry.source,
        "detail": entry.detail,
    }


async def list_audit(request: web.Request, db: Database) -> web.Response:
    namespace = params.name(request, "namespace")
    # Authorization goes here: `list` on `audit` in `namespace`.
    query, digest = audit_query(request, namespace)
    found = await db.read(lambda conn: audit.list_entries(conn, _one_more(query)))
    return _page(found, query.limit, present_audit_entry, digest)


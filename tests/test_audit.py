"""The audit trail against a real PostgreSQL: every change through the API writes exactly
one row naming who, what, which run and from where, in the change's own transaction (a
refused change writes none, a replayed Idempotency-Key none); the listing filters and
pages; retention drops the audit's day partitions like the history's."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from gristmill.auth.authn import DEV_GROUPS, DEV_USERNAME
from gristmill.store import audit, maintenance
from gristmill.store.audit import AuditAction
from tests.apikit import apply_examples
from tests.flowkit import apply_yaml
from tests.listingkit import USER_HEADER, api_with_callers, copy_definitions

GATED = """
apiVersion: gristmill.io/v1alpha1
kind: Flow
metadata: {name: gated}
spec:
  steps:
    - {id: gate, suspend: {timeout: 1h}}
"""
JANE = {USER_HEADER: "jane@example.com:team-a,approvers"}


@pytest.fixture
async def api(database_url, db):
    await apply_examples(database_url)
    await apply_yaml(db, GATED)
    await copy_definitions(db, "team-b")
    async with api_with_callers(database_url) as api:
        yield api


async def _rows(db) -> list[tuple]:
    cur = await db.execute("SELECT action, namespace, username, groups, run_id::text, target,"
                           " source, detail FROM audit ORDER BY id")
    return list(await cur.fetchall())


async def _suspended(api, run_id: str) -> None:
    run = await api.ok("GET", f"/api/v1/runs/{run_id}")
    assert run["steps"][0]["status"] == "suspended", run


async def test_each_change_writes_one_row_saying_who_what_which_run_and_from_where(api, db):
    script_run = await api.submit("hello", headers=JANE)
    assert await _rows(db) == [("submit", "default", "jane@example.com",
                                ["team-a", "approvers"], script_run, "hello", "127.0.0.1",
                                {"kind": "script"})]
    await api.ok("POST", f"/api/v1/runs/{script_run}/cancel", headers=JANE)
    approved = await api.submit("gated", kind="flows")  # no caller named: the stand-in one
    await _suspended(api, approved)
    await api.ok("POST", f"/api/v1/runs/{approved}/approve", {}, headers=JANE)
    restarted = (await api.ok("POST", f"/api/v1/runs/{approved}/restart",
                              {"fromStep": "gate"}, headers=JANE))["id"]
    await _suspended(api, restarted)
    await api.ok("POST", f"/api/v1/runs/{restarted}/reject", {"step": "gate"}, headers=JANE)
    their_run = await api.submit("hello", namespace="team-b",
                                 headers={USER_HEADER: "bob"})

    rows = await _rows(db)
    assert [(r[0], r[4]) for r in rows] == [
        ("submit", script_run), ("cancel", script_run), ("submit", approved),
        ("approve", approved), ("restart", approved), ("reject", restarted),
        ("submit", their_run)]
    assert rows[1][5:] == ("hello", "127.0.0.1", {"status": "cancelled"})
    assert rows[2][2:4] == (DEV_USERNAME, list(DEV_GROUPS))  # the local token's caller
    assert rows[2][5:] == ("gated", "127.0.0.1", {"kind": "flow"})
    assert rows[3][7] == {"step": "gate"}
    assert rows[4][7] == {"fromStep": "gate", "newRun": restarted}
    assert rows[5][7] == {"step": "gate"}
    assert {r[1] for r in rows} == {"default", "team-b"}
    assert rows[6][1:3] == ("team-b", "bob")

    page = await api.audit()
    assert [entry["action"] for entry in page["items"]] == [
        "reject", "restart", "approve", "submit", "cancel", "submit"]  # newest first
    entry = page["items"][-1]
    assert entry["user"] == {"username": "jane@example.com", "uid": "",
                             "groups": ["team-a", "approvers"]}
    assert (entry["run"], entry["target"], entry["source"]) == (script_run, "hello",
                                                                 "127.0.0.1")
    assert [e["run"] for e in (await api.audit(namespace="team-b"))["items"]] == [their_run]


async def test_a_replayed_idempotent_submit_writes_no_second_row(api, db):
    key = {"Idempotency-Key": str(uuid.uuid4()), **JANE}
    first = await api.submit("hello", {"input": {"name": "x"}}, headers=key)
    again = await api.submit("hello", {"input": {"name": "x"}}, headers=key)
    assert first == again
    assert [(r[0], r[4]) for r in await _rows(db)] == [("submit", first)]


async def test_a_refused_change_writes_no_row(api, db):
    finished = await api.submit("hello")
    await api.ok("POST", f"/api/v1/runs/{finished}/cancel")
    before = await _rows(db)
    refused = [
        ("POST", "/api/v1/namespaces/default/scripts/hello/runs", {"input": {"name": 3}}, 400),
        ("POST", "/api/v1/namespaces/default/scripts/missing/runs", {}, 404),
        ("POST", "/api/v1/namespaces/default/flows/gated/runs", {"input": [1]}, 400),
        ("POST", f"/api/v1/runs/{uuid.uuid4()}/cancel", {}, 404),
        ("POST", f"/api/v1/runs/{finished}/cancel", {}, 409),  # it ended already
        ("POST", f"/api/v1/runs/{finished}/approve", {}, 404),  # not a flow run
        ("POST", f"/api/v1/runs/{uuid.uuid4()}/restart", {"fromStep": "gate"}, 404),
    ]
    for method, path, body, status in refused:
        got, answer = await api.call(method, path, body, headers=JANE)
        assert got == status, (path, answer)
    run_id = await api.submit("gated", kind="flows")
    await _suspended(api, run_id)
    got, _ = await api.call("POST", f"/api/v1/runs/{run_id}/approve", {"step": "nope"})
    assert got == 409  # no such step waits
    assert await _rows(db) == before + [
        ("submit", "default", DEV_USERNAME, list(DEV_GROUPS), run_id, "gated", "127.0.0.1",
         {"kind": "flow"})]


async def test_the_listing_filters_and_pages(api, db):
    runs = [await api.submit("hello", headers={USER_HEADER: user})
            for user in ("jane", "bob", "jane", "carol")]
    await api.ok("POST", f"/api/v1/runs/{runs[0]}/cancel", headers={USER_HEADER: "bob"})
    middle = dt.datetime.now(dt.UTC)
    await api.ok("POST", f"/api/v1/runs/{runs[1]}/cancel", headers={USER_HEADER: "carol"})

    def actions(page):
        return [(e["action"], e["user"]["username"], e["run"]) for e in page["items"]]
    assert actions(await api.audit(user="jane")) == [("submit", "jane", runs[2]),
                                                     ("submit", "jane", runs[0])]
    assert actions(await api.audit(action="cancel")) == [("cancel", "carol", runs[1]),
                                                         ("cancel", "bob", runs[0])]
    assert actions(await api.audit(action="cancel,submit", user="bob")) == [
        ("cancel", "bob", runs[0]), ("submit", "bob", runs[1])]
    assert actions(await api.audit(run=runs[0])) == [("cancel", "bob", runs[0]),
                                                     ("submit", "jane", runs[0])]
    assert actions(await api.audit(since=middle.isoformat())) == [("cancel", "carol", runs[1])]
    assert len((await api.audit(until=middle.isoformat()))["items"]) == 5
    assert (await api.audit(since="1d", action="approve"))["items"] == []

    seen, cursor = [], None
    while True:
        page = await api.audit(limit=2, **({"cursor": cursor} if cursor else {}))
        seen += [e["id"] for e in page["items"]]
        await api.submit("hello")  # arrives between pages; newer, so not on a later page
        cursor = page["next"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 6
    assert seen == sorted(seen, key=int, reverse=True)


@pytest.mark.parametrize("query, words", [
    ({"action": "delete"}, "action 'delete' is not one of submit, cancel, approve"),
    ({"run": "42"}, "is not a run id"),
    ({"user": ""}, "user: must be a username"),
    ({"user": "x\x00"}, "NUL"),
    ({"since": "soon"}, "RFC 3339"),
    ({"limit": "1000"}, "from 1 to 500"),
    ({"cursor": "abc"}, "cursor is not one this API gave"),
    ({"status": "failed"}, "unknown query parameter(s) 'status'"),
])
async def test_a_bad_audit_filter_is_a_400(api, query, words):
    status, answer = await api.call("GET", "/api/v1/namespaces/default/audit", params=query)
    assert status == 400 and words in answer["error"], answer


async def test_a_runs_cursor_is_no_audit_cursor(api):
    for _ in range(2):
        await api.submit("hello")
    cursor = (await api.runs(limit=1))["next"]
    status, answer = await api.call("GET", "/api/v1/namespaces/default/audit",
                                    params={"cursor": cursor})
    assert status == 400 and "cursor" in answer["error"]


async def test_housekeeping_makes_audit_partitions_ahead_and_drops_them_past_retention(db):
    from gristmill.housekeeping import housekeep

    now = dt.datetime.now(dt.UTC)

    class Actor:
        username, uid, groups, source = "jane", "", ("a",), "10.0.0.1"

    async with db.transaction():
        await audit.record(db, Actor(), AuditAction.SUBMIT, "default", uuid.uuid4(), "hello")
    cur = await db.execute("SELECT tableoid::regclass::text FROM audit")
    assert (await cur.fetchone())[0] == f"audit_p{now:%Y%m%d}"

    done = await housekeep(db, dt.timedelta(days=30), now)
    week = (now + dt.timedelta(days=7)).date()
    cur = await db.execute("SELECT to_regclass(%s)", [f"audit_p{week:%Y%m%d}"])
    assert (await cur.fetchone())[0] is not None
    assert not [name for name in done.dropped if name.startswith("audit_")]

    later = now + dt.timedelta(days=32)
    done = await housekeep(db, dt.timedelta(days=30), later)
    assert f"audit_p{now:%Y%m%d}" in done.dropped
    assert (await audit.list_entries(db, audit.AuditQuery("default"))) == []
    # A row a skewed clock put in the default partition ages out too.
    await db.execute("INSERT INTO audit (at, namespace, username, action) "
                     "VALUES (now() - interval '400 days', 'default', 'x', 'cancel')")
    await maintenance.purge_default_partitions(db, now - dt.timedelta(days=30))
    cur = await db.execute("SELECT count(*) FROM audit_default")
    assert (await cur.fetchone())[0] == 0

"""Batch submits (POST .../runs:batch): up to 1,000 runs in one transaction, all or none,
in order; each entry checked like a single submit, the one at fault named by its index;
the same permission, audit trail and Idempotency-Key as a single submit. And the single
submit's fewer round trips: a version remembered by the API is never one an apply replaced."""

from __future__ import annotations

import json
import uuid

import pytest

from gristmill.store import audit, queue
from gristmill.store.audit import AuditAction, AuditQuery
from tests import apikit
from tests.apikit import api_in_process, apply_examples, raw_request
from tests.flowkit import apply_yaml

BATCH = "/api/v1/namespaces/default/scripts/hello/runs:batch"
SINGLE = "/api/v1/namespaces/default/scripts/hello/runs"
FLOW_BATCH = "/api/v1/namespaces/default/flows/process-orders/runs:batch"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def api(database_url):
    await apply_examples(database_url)
    async with api_in_process(apikit.settings(database_url)) as url, apikit.session() as s:
        async def call(path, body, headers=None):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            status, response_headers, raw = await raw_request(
                s, "POST", url + path, data, {**JSON, **(headers or {})})
            return status, response_headers, json.loads(raw)
        yield call


async def count(db, sql: str, *args) -> int:
    cur = await db.execute(sql, list(args))
    return (await cur.fetchone())[0]


async def test_a_batch_of_1000_lands_in_order_with_distinct_ids_and_is_claimable(api, db):
    runs = [{"input": {"name": f"n{i}"}, "labels": {"batch": "b1"}, "priority": i % 3}
            for i in range(1000)]
    status, _, answer = await api(BATCH, {"runs": runs})
    assert status == 201, answer
    ids = [run["id"] for run in answer["runs"]]
    assert len(ids) == len(set(ids)) == 1000
    assert all(run == {"id": run["id"], "kind": "script", "status": "queued"}
               for run in answer["runs"])
    cur = await db.execute("SELECT id::text, input, labels, priority FROM jobs "
                           "WHERE id = ANY (%s::uuid[])", [ids])
    stored = {row[0]: row[1:] for row in await cur.fetchall()}
    assert [stored[i] for i in ids] == [({"name": f"n{i}"}, {"batch": "b1"}, i % 3)
                                        for i in range(1000)]
    claimed = []
    async with db.transaction():
        claimed = await queue.claim(db, "w1", ["python"], 1000)
    assert {str(job.id) for job in claimed} == set(ids)
    assert {job.input["name"] for job in claimed} == {f"n{i}" for i in range(1000)}
    # One audit row per run, each with who submitted it, as a single submit writes.
    rows = await audit.list_entries(db, AuditQuery("default", frozenset({AuditAction.SUBMIT}),
                                                   limit=2000))
    assert sorted(str(row.run_id) for row in rows) == sorted(ids)
    assert {(row.target, row.detail["kind"], row.detail["batch"]) for row in rows} == {
        ("hello", "script", 1000)}


async def test_1001_runs_or_none_are_refused(api, db):
    for runs in ([{}] * 1001, [], None, {"input": {}}):
        status, _, answer = await api(BATCH, {"runs": runs})
        assert status == 400 and "1 to 1000 runs" in answer["error"], answer
    status, _, answer = await api(BATCH, {"input": {}})
    assert status == 400 and "unknown field" in answer["error"], answer
    assert await count(db, "SELECT count(*) FROM jobs") == 0


@pytest.mark.parametrize("entry, words", [
    ({"input": {"name": 3}}, "input does not match Script default/hello"),
    ({"priority": 101}, "priority must be an integer"),
    ({"labels": {"bad key!": "x"}}, "labels"),
    ({"scheduledFor": "tomorrow"}, "ISO 8601"),
    ({"inptu": {}}, "unknown field"),
    ("hello", "must be a JSON object"),
])
async def test_a_bad_entry_at_index_7_refuses_the_whole_batch_naming_it(api, db, entry,
                                                                         words):
    runs = [{"input": {"name": "fine"}}] * 7 + [entry] + [{"input": {"name": "fine"}}] * 5
    status, _, answer = await api(BATCH, {"runs": runs})
    assert status == 400, answer
    assert "runs[7]" in answer.get("field", "") + answer["error"], answer
    assert words in answer["error"], answer
    assert await count(db, "SELECT count(*) FROM jobs") == 0
    assert await count(db, "SELECT count(*) FROM audit") == 0


async def test_an_unknown_script_or_flow_is_a_404_and_makes_nothing(api, db):
    status, _, answer = await api("/api/v1/namespaces/default/scripts/nope/runs:batch",
                                  {"runs": [{}]})
    assert status == 404 and "Script default/nope not found" in answer["error"], answer
    status, _, answer = await api("/api/v1/namespaces/default/flows/nope/runs:batch",
                                  {"runs": [{}]})
    assert status == 404 and "Flow default/nope not found" in answer["error"], answer
    assert await count(db, "SELECT count(*) FROM audit") == 0


async def test_a_flow_batch_starts_every_run_or_none(api, db):
    status, _, answer = await api(FLOW_BATCH, {"runs": [
        {"input": {"batch": f"b{i}", "count": 1}, "labels": {"n": str(i)}} for i in range(5)]})
    assert status == 201, answer
    ids = [run["id"] for run in answer["runs"]]
    assert [run["kind"] for run in answer["runs"]] == ["flow"] * 5
    cur = await db.execute("SELECT id::text, input->>'batch', submitted_by FROM flow_runs "
                           "WHERE id = ANY (%s::uuid[])", [ids])
    rows = {row[0]: row[1:] for row in await cur.fetchall()}
    assert [rows[i][0] for i in ids] == [f"b{i}" for i in range(5)]
    assert await count(db, "SELECT count(*) FROM audit WHERE action = 'submit'") == 5
    # The fourth run's input is wrong: no run of the batch starts, the message names it.
    status, _, answer = await api(FLOW_BATCH, {"runs": [
        {"input": {"batch": "ok"}}] * 3 + [{"input": {"batch": 42}}]})
    assert status == 400 and answer["error"].startswith("runs[3]: input does not match"), \
        answer
    assert await count(db, "SELECT count(*) FROM flow_runs") == 5
    status, _, answer = await api(FLOW_BATCH, {"runs": [{"scheduledFor": "2030-01-01T00:00:00Z"}]})
    assert status == 400 and "runs[0]: unknown field" in answer["error"], answer


async def test_an_idempotent_replay_returns_the_same_ids_and_makes_no_runs(api, db):
    key = str(uuid.uuid4())
    body = {"runs": [{"input": {"name": f"k{i}"}} for i in range(20)]}
    status, headers, first = await api(BATCH, body, {"Idempotency-Key": key})
    assert status == 201 and "Idempotent-Replayed" not in headers
    status, headers, again = await api(BATCH, body, {"Idempotency-Key": key})
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    assert again == first
    assert await count(db, "SELECT count(*) FROM jobs") == 20
    assert await count(db, "SELECT count(*) FROM audit") == 20
    status, _, answer = await api(BATCH, {"runs": body["runs"][:5]}, {"Idempotency-Key": key})
    assert status == 422 and "different request body" in answer["error"]
    # The key is the batch route's own: the same key on the single submit is a new request.
    status, _, single = await api(SINGLE, {}, {"Idempotency-Key": key})
    assert status == 201 and single["id"] not in {run["id"] for run in first["runs"]}


HOSTILE = [
    ("NUL in a nested input value", b'{"runs": [{}, {"input": {"items": ["a\\u0000b"]}}]}',
     400, "runs[1].input.items[0]", "NUL character"),
    ("NUL in a label", b'{"runs": [{"labels": {"a": "\\u0000"}}]}', 400, None, "runs[0]"),
    ("NaN", b'{"runs": [{"input": {"name": NaN}}]}', 400, None, "NaN"),
    ("deep nesting", b'{"runs": [{"input": {"x": ' + b"[" * 100_000 + b"]" * 100_000
     + b"}}]}", 400, None, "nested"),
    ("a huge integer", b'{"runs": [{"priority": 1' + b"0" * 400 + b"}]}", 400, None,
     "as strings"),
    ("a boolean priority", b'{"runs": [{}, {}, {"priority": true}]}', 400, None,
     "runs[2]: priority"),
    ("year 10000", b'{"runs": [{"scheduledFor": "10000-01-01T00:00:00Z"}]}', 400,
     "runs[0].scheduledFor", "ISO 8601"),
    ("an oversize body", b'{"runs": [{"input": {"x": "' + b"a" * (5 << 20) + b'"}}]}', 413,
     None, "larger than"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
async def test_hostile_values_are_refused_with_what_is_wrong(api, db, case):
    _, body, status, field, words = case
    got, _, answer = await api(BATCH, body)
    assert got == status, answer
    assert words in answer["error"], answer
    if field is not None:
        assert answer["field"] == field, answer
    assert await count(db, "SELECT count(*) FROM jobs") == 0


async def test_a_batch_of_1000_modest_inputs_fits_the_body_limit(api, db):
    runs = [{"input": {"name": "x" * 2000}, "labels": {"team": "payments"}}] * 1000
    body = json.dumps({"runs": runs}).encode()
    assert len(body) > 1 << 20  # past a single submit's 1 MiB, within the batch's 4 MiB
    status, _, answer = await api(BATCH, body)
    assert status == 201, answer
    status, _, answer = await api(SINGLE, {"input": {"name": "x" * (1 << 20)}})
    assert status == 413 and "larger than 1048576 bytes" in answer["error"], answer


async def test_a_submit_after_an_apply_runs_the_new_version_never_the_remembered_one(api, db):
    status, _, first = await api(SINGLE, {"input": {"name": "a"}})  # remembered from here
    assert status == 201
    await api(SINGLE, {"input": {"name": "b"}})
    await apply_yaml(db, """
        apiVersion: gristmill.io/v1alpha1
        kind: Script
        metadata: {name: hello, namespace: default}
        spec: {language: python, code: "def main(name: int = 1): return name"}
        """)
    # The new version takes an int: the remembered one's input is refused now...
    status, _, answer = await api(SINGLE, {"input": {"name": "c"}})
    assert status == 400 and "input does not match" in answer["error"], answer
    status, _, answer = await api(BATCH, {"runs": [{"input": {"name": 5}}] * 3})
    assert status == 201, answer
    status, _, single = await api(SINGLE, {"input": {"name": 6}})
    assert status == 201, single
    cur = await db.execute("SELECT hash FROM scripts WHERE namespace = 'default' AND "
                           "name = 'hello'")
    (current,) = await cur.fetchone()
    cur = await db.execute("SELECT id::text, script_hash FROM jobs")
    versions = dict(await cur.fetchall())
    new = [run["id"] for run in answer["runs"]] + [single["id"]]
    assert {versions[i] for i in new} == {current}
    assert versions[first["id"]] != current
    assert await count(db, "SELECT count(*) FROM audit") == len(versions)
    # What the remembered version refuses, the current one may take.
    await apply_yaml(db, """
        apiVersion: gristmill.io/v1alpha1
        kind: Script
        metadata: {name: hello, namespace: default}
        spec: {language: python, code: "def main(name: str = 'z'): return name"}
        """)
    status, _, answer = await api(SINGLE, {"input": {"name": "str again"}})
    assert status == 201, answer
    status, _, answer = await api(BATCH, {"runs": [{"input": {"name": "s"}}]})
    assert status == 201, answer
    # ... and a deleted Script is a 404, not a run of the version the API remembered.
    await db.execute("DELETE FROM scripts WHERE namespace = 'default' AND name = 'hello'")
    status, _, answer = await api(SINGLE, {})
    assert status == 404, answer
    status, _, answer = await api(BATCH, {"runs": [{}]})
    assert status == 404, answer
    assert await count(db, "SELECT count(*) FROM audit") == len(versions) + 2

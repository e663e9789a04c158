"""GET /api/v1/namespaces/{ns}/runs against a real PostgreSQL: Script runs (queued, running
and finished) and Flow runs side by side, every filter, keyset pages that neither repeat
nor skip a run while runs arrive and finish, namespaces kept apart, and every mistake a
400 that says what is wrong."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json

import pytest

from tests.apikit import apply_examples
from tests.listingkit import api_with_callers, copy_definitions, finish_jobs

FLOW = "process-orders"


@pytest.fixture
async def api(database_url, db):
    await apply_examples(database_url)
    await copy_definitions(db, "team-b")
    async with api_with_callers(database_url) as api:
        yield api


async def _ids(api, **params) -> list[str]:
    return [run["id"] for run in (await api.runs(**params))["items"]]


async def test_script_and_flow_runs_live_and_finished_newest_first(api, db):
    queued = await api.submit("hello", {"input": {"name": "a"}})
    succeeded = await api.submit("hello")
    failed = await api.submit("word-count", {"input": {"text": "x"}})
    flow_run = await api.submit(FLOW, {"input": {"batch": "b1"}}, kind="flows")
    await finish_jobs(db, {succeeded: "succeeded", failed: "failed"})

    page = await api.runs()
    assert page["next"] is None
    by_id = {run["id"]: run for run in page["items"]}
    # The flow's step job (fetch) is part of its run, not a run of its own.
    assert list(by_id) == [flow_run, failed, succeeded, queued]
    assert [by_id[i]["status"] for i in by_id] == ["running", "failed", "succeeded", "queued"]
    assert by_id[flow_run]["kind"] == "flow" and by_id[flow_run]["name"] == FLOW
    assert by_id[failed]["name"] == "word-count" and by_id[failed]["kind"] == "script"
    assert by_id[succeeded]["finishedAt"] and by_id[succeeded]["durationMs"] is not None
    assert by_id[queued]["finishedAt"] is None and by_id[queued]["startedAt"] is None
    created = [dt.datetime.fromisoformat(run["createdAt"]) for run in page["items"]]
    assert created == sorted(created, reverse=True)
    cur = await db.execute("SELECT count(*) FROM job_history WHERE flow_run_id IS NULL")
    assert (await cur.fetchone())[0] == 2  # two of them come from the history


async def test_every_filter(api, db):
    hello_paid = await api.submit("hello", {"labels": {"team": "payments", "tier": "gold"}})
    hello_plain = await api.submit("hello")
    words = await api.submit("word-count", {"input": {"text": "a b"},
                                            "labels": {"team": "payments"}})
    await asyncio.sleep(0.01)
    middle = dt.datetime.now(dt.UTC)
    await asyncio.sleep(0.01)
    flow_run = await api.submit(FLOW, {"input": {"batch": "b"},
                                       "labels": {"example.com/team": "ops"}}, kind="flows")
    cancelled = await api.submit("hello")
    await api.ok("POST", f"/api/v1/runs/{cancelled}/cancel")
    await finish_jobs(db, {hello_plain: "failed", words: "succeeded"})

    assert await _ids(api, script="hello") == [cancelled, hello_plain, hello_paid]
    assert await _ids(api, flow=FLOW) == [flow_run]
    assert await _ids(api, kind="flow") == [flow_run]
    assert await _ids(api, kind="script") == [cancelled, words, hello_plain, hello_paid]
    assert await _ids(api, status="failed") == [hello_plain]
    assert await _ids(api, status="queued,running") == [flow_run, hello_paid]
    assert await _ids(api, status=["failed", "cancelled"]) == [cancelled, hello_plain]
    assert await _ids(api, script="hello", status="queued") == [hello_paid]
    assert await _ids(api, label="team=payments") == [words, hello_paid]
    assert await _ids(api, label=["team=payments", "tier=gold"]) == [hello_paid]
    assert await _ids(api, label="example.com/team=ops") == [flow_run]
    assert await _ids(api, label="team=nobody") == []
    assert await _ids(api, since=middle.isoformat()) == [cancelled, flow_run]
    assert await _ids(api, until=middle.isoformat()) == [words, hello_plain, hello_paid]
    assert await _ids(api, since="1h", script="hello", status="failed") == [hello_plain]
    assert await _ids(api, until="1h") == []  # everything here is younger than an hour
    shown = (await api.runs(label="tier=gold"))["items"][0]
    assert shown["labels"] == {"team": "payments", "tier": "gold"}
    run = await api.ok("GET", f"/api/v1/runs/{flow_run}")
    assert run["labels"] == {"example.com/team": "ops"}


async def test_pages_neither_repeat_nor_skip_while_runs_arrive_and_finish(api, db):
    before = [await api.submit("hello", {"input": {"name": str(i)}}) for i in range(23)]
    before += [await api.submit(FLOW, {"input": {"batch": str(i)}}, kind="flows")
               for i in range(3)]
    expected = list(reversed(before))
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = await api.runs(**params)
        seen += [run["id"] for run in page["items"]]
        pages += 1
        # Between pages: new runs arrive, and some of those not yet read finish (and so
        # move from the queue to the history).
        await api.submit("hello")
        unread = [i for i in expected if i not in seen and i in before[:23]]
        if unread:
            await finish_jobs(db, {unread[0]: "succeeded"})
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == expected
    assert pages == 7  # 26 runs, 4 a page: the last page has 2 and says there is no next
    everything = await api.runs(limit=500)
    assert len(everything["items"]) == 26 + pages and everything["next"] is None


async def test_an_exact_last_page_has_no_next(api):
    for _ in range(4):
        await api.submit("hello")
    first = await api.runs(limit=2)
    second = await api.runs(limit=2, cursor=first["next"])
    assert len(second["items"]) == 2 and second["next"] is None


async def test_namespaces_are_kept_apart(api):
    mine = await api.submit("hello")
    theirs = await api.submit("hello", namespace="team-b")
    their_flow = await api.submit(FLOW, {"input": {"batch": "x"}}, namespace="team-b",
                                  kind="flows")
    assert await _ids(api) == [mine]
    assert await _ids(api, namespace="team-b") == [their_flow, theirs]
    assert await _ids(api, namespace="team-c") == []
    await api.submit("hello")
    cursor = (await api.runs(limit=1))["next"]
    status, answer = await api.call("GET", "/api/v1/namespaces/team-b/runs",
                                    params={"cursor": cursor})
    assert status == 400 and "another namespace" in answer["error"]


def _tampered(cursor: str) -> str:
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    payload, checksum = raw[:-8], raw[-8:]
    fields = json.loads(payload)
    fields["at"] = "2020-01-01T00:00:00+00:00"
    changed = json.dumps(fields, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(changed + checksum).rstrip(b"=").decode()


BAD = [
    # (what, query, words in the message)
    ("an unknown status", {"status": "done"}, "status 'done' is not one of queued, running"),
    ("an unknown status in a list", {"status": "failed,oops"}, "'oops'"),
    ("an unknown kind", {"kind": "job"}, "kind 'job' is not one of script, flow"),
    ("a script name that is no name", {"script": "Hello World"}, "not a valid script name"),
    ("a NUL in a flow name", {"flow": "a\x00b"}, "not a valid flow name"),
    ("both script and flow", {"script": "hello", "flow": FLOW}, "not both"),
    ("a kind that contradicts the name", {"flow": FLOW, "kind": "script"}, "contradicts"),
    ("a limit of 0", {"limit": "0"}, "limit must be a whole number from 1 to 500"),
    ("a limit over 500", {"limit": "501"}, "from 1 to 500"),
    ("a limit that is no number", {"limit": "ten"}, "not 'ten'"),
    ("a limit given twice", [("limit", "5"), ("limit", "6")], "limit is given 2 times"),
    ("a since that is no time", {"since": "yesterday"}, "RFC 3339 time"),
    ("a since out of range", {"since": "0001-01-01T00:00:00"}, "out of range"),
    ("since after until", {"since": "1h", "until": "2h"}, "must be before until"),
    ("a label without a value", {"label": "team"}, "is not KEY=VALUE"),
    ("a label key with a space", {"label": "my team=x"}, "label key 'my team'"),
    ("a label with a bad prefix", {"label": "Example.COM/team=x"}, "DNS subdomain"),
    ("a label value too long", {"label": "team=" + "x" * 64}, "value of label 'team'"),
    ("one label with two values", [("label", "a=1"), ("label", "a=2")], "two values"),
    ("an unknown parameter", {"stauts": "failed"}, "unknown query parameter(s) 'stauts'"),
    ("a cursor that is not base64", {"cursor": "!!!"}, "cursor is not one this API gave"),
    ("a cursor cut short", {"cursor": "eyJhdCI6"}, "cut short or changed"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
async def test_a_bad_filter_is_a_400_that_says_what_is_wrong(api, case):
    _, query, words = case
    status, answer = await api.call("GET", "/api/v1/namespaces/default/runs", params=query)
    assert status == 400, answer
    assert words in answer["error"], answer


async def test_a_changed_or_foreign_cursor_is_refused(api):
    for _ in range(3):
        await api.submit("hello")
    cursor = (await api.runs(limit=1))["next"]
    status, answer = await api.call("GET", "/api/v1/namespaces/default/runs",
                                    params={"cursor": _tampered(cursor)})
    assert status == 400 and "cut short or changed" in answer["error"]
    status, answer = await api.call("GET", "/api/v1/namespaces/default/runs",
                                    params={"cursor": cursor, "status": "queued"})
    assert status == 400 and "other filters" in answer["error"]
    # A different page size is the same listing: the cursor goes on.
    assert len((await api.runs(limit=5, cursor=cursor))["items"]) == 2


@pytest.mark.parametrize("labels, words", [
    (["team"], "must be an object of strings"),
    ({"team": 1}, "must be a string"),
    ({f"k{i}": "v" for i in range(33)}, "at most 32"),
    ({"-team": "x"}, "label key '-team'"),
    ({"team": "a b"}, "value of label 'team'"),
    ({"team": "a\x00"}, "NUL character"),
])
async def test_labels_on_submit_are_checked(api, labels, words):
    status, answer = await api.call("POST", "/api/v1/namespaces/default/scripts/hello/runs",
                                    {"labels": labels})
    assert status == 400 and words in answer["error"], answer
    assert await _ids(api) == []


async def test_an_unknown_namespace_or_bad_one_in_the_path(api):
    assert (await api.runs(namespace="nowhere"))["items"] == []
    status, answer = await api.call("GET", "/api/v1/namespaces/Bad_NS/runs")
    assert status == 400 and "not a valid name" in answer["error"]


@pytest.mark.parametrize("fields", [
    {"at": "2026-12-01T00:00:00+00:00", "id": 5, "q": "x"},
    {"at": 5, "id": "3f2b8c4e-1d2a-4b6e-9f10-2a3b4c5d6e7f", "q": "x"},
    {"at": "2026-12-01T00:00:00+00:00", "id": {"a": 1}, "q": "x"},
    ["not", "an", "object"],
])
async def test_a_well_formed_cursor_of_nonsense_is_a_400(api, fields):
    from gristmill.api import cursor as cursors

    payload = json.dumps(fields).encode()
    forged = base64.urlsafe_b64encode(payload + cursors._checksum(payload)).decode()
    status, answer = await api.call("GET", "/api/v1/namespaces/default/runs",
                                    params={"cursor": forged})
    assert status == 400 and "cursor" in answer["error"], answer

"""Hostile values at the API's door: every one is a 4xx naming what is wrong, none a 500,
and none reaches a statement that could fail for other jobs."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from gristmill.store import queue
from tests import apikit
from tests.apikit import api_in_process, apply_examples, raw_request

SCRIPT = "/api/v1/namespaces/default/scripts/hello/runs"
FLOW = "/api/v1/namespaces/default/flows/process-orders/runs"
RUN = f"/api/v1/runs/{uuid.uuid4()}"  # stands for a real run: the API says 404 before
# anything else for a run that does not exist, so the cases ask about one that does
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def api(database_url):
    await apply_examples(database_url)
    async with api_in_process(apikit.settings(database_url)) as url, apikit.session() as s:
        # Scheduled far ahead: no test that claims jobs sees it.
        async with s.post(url + SCRIPT, json={"scheduledFor": "2999-01-01T00:00:00Z"}
                          ) as response:
            run = f"/api/v1/runs/{(await response.json())['id']}"

        async def call(method, path, body=None, headers=JSON):
            path = path.replace(RUN, run)
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            status, response_headers, raw = await raw_request(s, method, url + path, data,
                                                              headers)
            return status, response_headers, raw
        yield call


CASES = [
    # (what, method, path, body, headers, status, field, words in the message)
    ("NUL in a nested input value", "POST", SCRIPT,
     b'{"input": {"items": [1, 2, 3, "a\\u0000b"]}}', JSON, 400, "input.items[3]",
     "NUL character"),
    ("NUL in a key", "POST", SCRIPT, b'{"input": {"a\\u0000": 1}}', JSON, 400, None, "NUL"),
    ("NaN", "POST", SCRIPT, b'{"input": {"name": NaN}}', JSON, 400, None, "NaN"),
    ("Infinity", "POST", FLOW, b'{"input": {"count": -Infinity}}', JSON, 400, None, "Infinity"),
    ("a float too large for a double", "POST", SCRIPT, b'{"input": {"x": 1e400}}', JSON, 400,
     "input.x", "Infinity"),
    ("a lone surrogate", "POST", SCRIPT, b'{"input": {"name": "\\ud800"}}', JSON, 400,
     "input.name", "surrogate"),
    ("invalid UTF-8", "POST", SCRIPT, b'{"input": {"name": "\xff\xfe"}}', JSON, 400,
     "request body", "UTF-8"),
    ("deep nesting", "POST", SCRIPT, b'{"input": {"x": ' + b"[" * 100_000 + b"]" * 100_000
     + b"}}", JSON, 400, None, "nested"),
    ("a huge integer", "POST", SCRIPT, b'{"input": {"n": 1' + b"0" * 400 + b"}}", JSON, 400,
     "input.n", "as strings"),
    ("an unknown charset", "POST", SCRIPT, b'{"input": {}}',
     {"Content-Type": "application/json; charset=klingon"}, 415, None, "UTF-8"),
    ("a charset that is not UTF-8", "POST", SCRIPT, b'{"input": {}}',
     {"Content-Type": "application/json; charset=latin-1"}, 415, None, "UTF-8"),
    ("a body that is not JSON", "POST", SCRIPT, b"name=world",
     {"Content-Type": "application/x-www-form-urlencoded"}, 415, None, "application/json"),
    ("broken JSON", "POST", SCRIPT, b'{"input": ', JSON, 400, "request body", "not valid JSON"),
    ("a body that is an array", "POST", SCRIPT, b"[]", JSON, 400, None, "JSON object"),
    ("an oversize body", "POST", SCRIPT, b'{"input": {"x": "' + b"a" * (2 << 20) + b'"}}', JSON,
     413, None, "larger than"),
    ("year 1 at +14:00", "POST", SCRIPT, {"scheduledFor": "0001-01-01T00:00:00+14:00"}, JSON,
     400, "scheduledFor", "out of range"),
    ("year 10000", "POST", SCRIPT, {"scheduledFor": "10000-01-01T00:00:00Z"}, JSON, 400,
     "scheduledFor", "ISO 8601"),
    ("year 9999", "POST", SCRIPT, {"scheduledFor": "9999-12-31T23:59:59Z"}, JSON, 400,
     "scheduledFor", "out of range"),
    ("a number for a time", "POST", SCRIPT, {"scheduledFor": 3}, JSON, 400, "scheduledFor",
     "ISO 8601"),
    ("a boolean priority", "POST", SCRIPT, {"priority": True}, JSON, 400, None, "priority"),
    ("an unknown field", "POST", FLOW, {"input": {}, "scheduledFor": "2030-01-01T00:00:00Z"},
     JSON, 400, None, "unknown field"),
    ("NUL in the namespace", "POST", "/api/v1/namespaces/a%00b/scripts/hello/runs", {}, JSON,
     400, None, "not a valid name"),
    ("NUL in the name", "POST", "/api/v1/namespaces/default/flows/x%00/runs", {}, JSON, 400,
     None, "not a valid name"),
    ("a huge name", "POST", f"/api/v1/namespaces/default/scripts/{'a' * 5000}/runs", {}, JSON,
     400, None, "at most 63"),
    ("NUL in a run id", "GET", "/api/v1/runs/%00", None, {}, 400, None, "not a run id"),
    ("a huge after", "GET", f"{RUN}/logs?after={'9' * 5000}", None, {}, 400, None,
     "sequence number"),
    ("after past bigint", "GET", f"{RUN}/logs?after={2**63}", None, {}, 400, None,
     "sequence number"),
    ("a negative after", "GET", f"{RUN}/logs?after=-1", None, {}, 400, None, "sequence number"),
    ("a follow that is not a flag", "GET", f"{RUN}/logs?follow=perhaps", None, {}, 400, None,
     "true or false"),
    ("NUL in a namespace filter", "GET", "/api/v1/scripts?namespace=%00", None, {}, 400, None,
     "namespace"),
    ("NUL in the step approved", "POST", f"{RUN}/approve", b'{"step": "\\u0000"}', JSON, 400,
     "step", "NUL"),
    ("a name of who approves", "POST", f"{RUN}/approve", {"by": "cfo@example.com"}, JSON, 400,
     "by", "credentials"),
    ("a step that is not a string", "POST", f"{RUN}/restart", {"fromStep": ["a"]}, JSON, 400,
     None, "fromStep"),
    ("an Idempotency-Key with control characters", "POST", SCRIPT, {},
     {**JSON, "Idempotency-Key": "a\tb"}, 400, None, "Idempotency-Key"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_a_hostile_request_is_refused_with_what_is_wrong(api, case):
    _, method, path, body, headers, status, field, words = case
    got, response_headers, raw = await api(method, path, body, headers)
    assert response_headers["Content-Type"].startswith("application/json"), raw[:200]
    answer = json.loads(raw)
    assert got == status, answer
    assert words in answer["error"], answer
    if field is not None:
        assert answer["field"] == field, answer


async def test_a_refused_time_never_reaches_the_queue(api, db):
    for when in ("0001-01-01T00:00:00+14:00", "10000-01-01T00:00:00Z", "1969-12-31T23:59:59Z"):
        status, _, _ = await api("POST", SCRIPT, {"scheduledFor": when})
        assert status == 400
    status, _, raw = await api("POST", SCRIPT, {"scheduledFor": "2000-01-01T00:00:00+14:00"})
    assert status == 201, raw
    # The claim that the year-1 run used to wedge for every worker still works.
    async with db.transaction():
        claimed = await queue.claim(db, "w1", ["python"], 10)
    assert [str(job.id) for job in claimed] == [json.loads(raw)["id"]]


async def test_a_good_submit_and_an_empty_body_still_work(api):
    status, _, raw = await api("POST", SCRIPT, b"", {})
    assert status == 201, raw
    status, _, raw = await api("POST", SCRIPT, {"input": {"name": "w\u00f6rld \U0001f600"}},
                               {"Content-Type": "application/json; charset=UTF-8"})
    assert status == 201, raw
    status, _, raw = await api("GET", f"/api/v1/runs/{json.loads(raw)['id']}", None, {})
    assert json.loads(raw)["input"] == {"name": "w\u00f6rld \U0001f600"}


async def test_unknown_paths_and_methods_answer_json(api):
    status, headers, raw = await api("GET", "/api/v1/nothing", None, {})
    assert status == 404 and "openapi.json" in json.loads(raw)["error"]
    status, headers, raw = await api("DELETE", SCRIPT, None, {})
    assert status == 405 and headers["Allow"] == "POST" and "allowed: POST" in json.loads(
        raw)["error"]


async def test_an_unexpected_error_is_a_logged_json_500(api, monkeypatch, caplog):
    async def broken(conn, run_id):
        raise RuntimeError("a bug")
    monkeypatch.setattr("gristmill.api.app.get_run", broken)
    with caplog.at_level(logging.ERROR, logger="gristmill.api"):
        status, _, raw = await api("GET", RUN, None, {})
    answer = json.loads(raw)
    assert status == 500 and "reference" in answer["error"]
    (record,) = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    reference = answer["error"].split("reference ")[1].split(",")[0]
    assert reference in record.getMessage()
    assert record.exc_info and "a bug" in str(record.exc_info[1])

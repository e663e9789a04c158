"""Idempotency-Key on submits: a repeated request gets the first response and makes no
second run, whatever the timing."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from gristmill.store import idempotency
from tests import apikit
from tests.apikit import api_in_process, apply_examples, raw_request
from tests.flowkit import apply_yaml

SCRIPT = "/api/v1/namespaces/{ns}/scripts/{name}/runs"
HELLO = SCRIPT.format(ns="default", name="hello")
FLOW = "/api/v1/namespaces/default/flows/process-orders/runs"


@pytest.fixture
async def api(database_url, db):
    await apply_examples(database_url)
    await apply_yaml(db, """
        apiVersion: gristmill.io/v1alpha1
        kind: Script
        metadata: {name: hello, namespace: team-b}
        spec: {language: python, code: "def main(name: str = 'b'): return name"}
        """)
    async with api_in_process(apikit.settings(database_url)) as url, apikit.session() as s:
        async def submit(body, key, path=HELLO):
            headers = {"Content-Type": "application/json"}
            if key is not None:
                headers["Idempotency-Key"] = key
            status, response_headers, raw = await raw_request(
                s, "POST", url + path, json.dumps(body).encode(), headers)
            return status, response_headers, json.loads(raw)
        yield submit


async def runs_of(db, name: str) -> int:
    cur = await db.execute("SELECT count(*) FROM jobs WHERE script_name = %s", [name])
    return (await cur.fetchone())[0]


async def test_the_same_key_and_body_get_the_first_response_and_no_second_run(api, db):
    key = str(uuid.uuid4())
    first = await api({"input": {"name": "a"}, "priority": 3}, key)
    # The same request written differently (key order, spacing) is the same request.
    again = await api({"priority": 3, "input": {"name": "a"}}, key)
    assert first[0] == again[0] == 201
    assert again[2] == first[2]
    assert "Idempotent-Replayed" not in first[1] and again[1]["Idempotent-Replayed"] == "true"
    assert await runs_of(db, "hello") == 1
    without_key = await api({"input": {"name": "a"}, "priority": 3}, None)
    assert without_key[0] == 201 and without_key[2]["id"] != first[2]["id"]
    assert await runs_of(db, "hello") == 2


async def test_the_same_key_with_another_body_is_a_422(api, db):
    key = "order-42"
    assert (await api({"input": {"name": "a"}}, key))[0] == 201
    status, _, answer = await api({"input": {"name": "b"}}, key)
    assert status == 422 and "different request body" in answer["error"]
    assert await runs_of(db, "hello") == 1


async def test_a_key_belongs_to_its_namespace_and_route(api, db):
    key = '"shared-key"'  # the draft's structured-field form
    ids = {
        (await api({}, key))[2]["id"],
        (await api({}, key, SCRIPT.format(ns="team-b", name="hello")))[2]["id"],
        (await api({}, key, SCRIPT.format(ns="default", name="word-count")))[0],
        (await api({"input": {"batch": "b"}}, key, FLOW))[2]["id"],
    }
    assert len(ids) == 4
    assert (await api({}, "shared-key"))[2]["id"] in ids  # quoted or bare: the same key


async def test_concurrent_requests_with_one_key_make_one_run(api, db):
    key = str(uuid.uuid4())
    answers = await asyncio.gather(*(api({"input": {"name": "x"}}, key) for _ in range(20)))
    made = {answer["id"] for status, _, answer in answers if status == 201}
    busy = [(status, headers) for status, headers, _ in answers if status != 201]
    assert len(made) == 1, answers
    assert all(status == 409 and headers["Retry-After"] == "1" for status, headers in busy)
    assert await runs_of(db, "hello") == 1
    status, _, answer = await api({"input": {"name": "x"}}, key)  # once served: the response
    assert status == 201 and answer["id"] in made


async def test_a_refused_submit_keeps_no_key(api, db):
    key = str(uuid.uuid4())
    status, _, _ = await api({"input": {"name": 3}}, key)
    assert status == 400
    cur = await db.execute("SELECT count(*) FROM idempotency_keys")
    assert (await cur.fetchone())[0] == 0
    status, _, _ = await api({"input": {"name": "fixed"}}, key)
    assert status == 201


async def test_keys_expire_after_a_day_and_retention_deletes_them(api, db):
    old, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    first = (await api({}, old))[2]
    await api({}, fresh)
    await db.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
                     "WHERE key = %s", [old])
    # An expired key is a new request: a new run (and the row is taken over).
    status, _, answer = await api({"input": {"name": "other body"}}, old)
    assert status == 201 and answer["id"] != first["id"]
    await db.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
                     "WHERE key = %s", [old])
    assert await idempotency.delete_expired(db) == 1
    cur = await db.execute("SELECT key FROM idempotency_keys")
    assert [row[0] for row in await cur.fetchall()] == [fresh]

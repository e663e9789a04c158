"""What the operator writes to `status` fits the CRDs' status schemas and the status models:
the API server would refuse a status that does not (a message too long, a bad reason) and
silently drop a field the schema lacks. Printer columns and the Argo CD health check read it.
"""

from __future__ import annotations

import asyncio

import pytest
from crdkit import path_of, validator_of
from k8s_emulator import emulated_cluster
from pydantic import ValidationError
from test_chart import _argocd_health
from test_operator_kopf import GROUP, get, manifest, running_operator, wait_for
from test_operator_reconcile import body

from gristmill.operator.reconcile import invalid_message, reconcile_flow, reconcile_script
from gristmill.spec import Script
from gristmill.spec.status import (
    MAX_MESSAGE_LENGTH,
    FlowStatus,
    ScriptStatus,
    WorkerGroupStatus,
)

STATUS_MODELS = {"Script": ScriptStatus, "Flow": FlowStatus, "WorkerGroup": WorkerGroupStatus}
PLURALS = {"Script": "scripts", "Flow": "flows", "WorkerGroup": "workergroups"}


def status_problems(kind: str, status: dict) -> list[str]:
    """Why the API server would refuse or cut `status`, and why the model refuses it."""
    problems = [f"{path_of(e) or 'status'}: {e.message}"
                for e in validator_of(kind, "status").iter_errors(status)]
    try:
        STATUS_MODELS[kind].model_validate(status)
    except ValidationError as exc:
        problems += [f"model: {e['loc']}: {e['msg']}" for e in exc.errors()]
    return problems


PYTHON = {"language": "python", "code": "def main(x: int = 1):\n    return x\n"}
# Unknown fields with long names: each is named in the Invalid message, which is then
# longer than a condition may be.
HUGE_MISTAKE = {**PYTHON, **{f"field{i}{'x' * 4000}": 1 for i in range(12)}}


async def test_what_reconcile_writes_fits_the_status_schema(db):
    raw = invalid_message(_errors_of(HUGE_MISTAKE), Script, body("Script", "s", HUGE_MISTAKE))
    assert len(raw) > MAX_MESSAGE_LENGTH  # the case is real
    written = {
        "a ready Script": await reconcile_script(db, body("Script", "double", PYTHON)),
        "an invalid Script": await reconcile_script(db, body(
            "Script", "broken", {"language": "python", "code": "def main(:\n"})),
        "a huge mistake": await reconcile_script(db, body("Script", "huge", HUGE_MISTAKE)),
        "a Flow waiting": await reconcile_flow(db, body(
            "Flow", "waits", {"steps": [{"id": "a", "script": "nope"}]})),
        "an invalid Flow": await reconcile_flow(db, body(
            "Flow", "bad", {"steps": [{"id": "a", "script": "double",
                                       "input": {"x": "results.zzz"}}]})),
        "a ready Flow": await reconcile_flow(db, body(
            "Flow", "fine", {"steps": [{"id": "a", "script": "double"}]})),
    }
    for what, result in written.items():
        kind = "Flow" if "Flow" in what else "Script"
        assert status_problems(kind, result.status) == [], what
    huge = written["a huge mistake"].status["conditions"][0]["message"]
    assert len(huge) <= MAX_MESSAGE_LENGTH and huge.endswith(f"({len(raw):,} characters)")


def _errors_of(spec: dict) -> ValidationError:
    try:
        Script.model_validate({**body("Script", "s", spec)})
    except ValidationError as exc:
        return exc
    raise AssertionError("the spec was valid")


async def _settled(session) -> None:
    """Until kopf has listed Scripts: kmock 0.8 replays an object created during kopf's
    first listing as a stale ADDED event and kopf then never reconciles it (seen here on
    a loaded machine), so a canary Script must turn Ready first, or another one is tried."""
    for attempt in range(5):
        name = f"canary-{attempt}"
        await session.post(f"{GROUP}/scripts", json=manifest("Script", name, PYTHON))

        async def ready(name=name):
            obj = await get(session, f"{GROUP}/scripts/{name}")
            return (obj.get("status") or {}).get("conditions")
        try:
            await wait_for(ready, timeout=10)
            return
        except AssertionError:
            continue
    raise AssertionError("kopf reconciled none of 5 canary Scripts")


@pytest.mark.timeout(180)
async def test_what_the_operator_writes_through_kopf_fits(db, database_url, tmp_path):
    """kopf, the WorkerGroup loop and the autoscaler, for real against the emulator."""
    from gristmill.store import queue

    async with emulated_cluster(database_url, tmp_path) as cluster, running_operator():
        session = cluster.session
        await _settled(session)
        # The autoscaled group is Ready before it has work: the loop then writes its Scaled
        # condition beside Ready. (kmock ignores the resourceVersion precondition the loop
        # sends, so a Scaled written over a status read before Ready would drop Ready;
        # the API server answers 409 and the loop writes again a period later.)
        auto = manifest("WorkerGroup", "auto", {"tags": ["python"], "concurrency": 2,
                                               "autoscaling": {"maxReplicas": 10}})
        await session.post(f"{GROUP}/workergroups", json=auto)

        async def auto_ready():
            obj = await get(session, f"{GROUP}/workergroups/auto")
            return (obj.get("status") or {}).get("conditions")
        await wait_for(auto_ready)
        await asyncio.sleep(1.5)  # a loop period (GRISTMILL_AUTOSCALE_INTERVAL=1) after it
        await queue.enqueue(db, [queue.NewJob(namespace="team-a", tag="python", kind="noop")
                                 for _ in range(6)])
        objects = [
            manifest("Script", "hello", PYTHON),
            manifest("Script", "broken", {"language": "python", "code": "def main(:\n"}),
            manifest("Flow", "uses-hello", {"steps": [{"id": "a", "script": "hello"}]}),
            manifest("Flow", "waits", {"steps": [{"id": "a", "script": "nope"}]}),
            manifest("WorkerGroup", "invalid", {"tags": ["python"], "concurrency": 0}),
        ]
        for obj in objects:
            await session.post(f"{GROUP}/{PLURALS[obj['kind']]}", json=obj)
        objects.append(auto)
        seen: dict[str, dict] = {}

        async def all_reported():
            for obj in objects:
                name = obj["metadata"]["name"]
                seen[name] = await get(session, f"{GROUP}/{PLURALS[obj['kind']]}/{name}")
            conditions = {name: {c["type"]: c["status"] for c in
                                 (o.get("status") or {}).get("conditions") or []}
                          for name, o in seen.items()}
            done = all("Ready" in c for c in conditions.values()) and \
                "Scaled" in conditions["auto"] and conditions["uses-hello"]["Ready"] == "True"
            return dict(seen) if done else None
        try:
            found = await wait_for(all_reported, timeout=60)
        except AssertionError:
            statuses = {name: obj.get("status") for name, obj in seen.items()}
            raise AssertionError(f"not all reported: {statuses}") from None

    for name, obj in found.items():
        assert status_problems(obj["kind"], obj["status"]) == [], name
    auto_status = found["auto"]["status"]
    assert auto_status["desiredReplicas"] == 3 and auto_status["queuedJobs"] == 6
    assert "lastScaleTime" in auto_status
    health = {name: _argocd_health(obj)["status"] for name, obj in found.items()}
    assert health == {"hello": "Healthy", "broken": "Degraded", "uses-hello": "Healthy",
                      "waits": "Progressing", "auto": "Healthy", "invalid": "Degraded"}

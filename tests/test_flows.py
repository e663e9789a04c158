"""Flows end to end: real Postgres, real workers, real sandboxed jobs."""

from __future__ import annotations

import asyncio
import os
import textwrap
from pathlib import Path

import pytest
from flowkit import (
    apply_yaml,
    completions,
    run_flow,
    running_workers,
    script,
    start_flow,
    step_statuses,
    wait_run,
    wait_step,
)

from gristmill.flows import engine
from gristmill.flows.engine import FlowError
from gristmill.store import flows as flow_store

SCRIPTS = (
    script("add", """
        def main(a: int, b: int = 0) -> int:
            return a + b
    """)
    + script("echo", """
        def main(value=None):
            return value
    """)
    + script("boom", """
        def main(message: str = "boom"):
            raise RuntimeError(message)
    """)
    + script("flaky", """
        import os

        def main(value: int) -> int:
            if int(os.environ["GRISTMILL_ATTEMPT"]) < 2:
                raise ConnectionError("first attempt fails")
            return value
    """)
    + script("slow", """
        import time

        def main(seconds: float = 0.5, value=None):
            time.sleep(seconds)
            return value
    """)
)


def flow(name: str, spec: str) -> str:
    return (f"---\napiVersion: gristmill.io/v1alpha1\nkind: Flow\nmetadata:\n  name: {name}\n"
            f"spec:\n{textwrap.indent(textwrap.dedent(spec).strip(), '  ')}\n")


@pytest.fixture
async def flows_db(db):
    await apply_yaml(db, SCRIPTS)
    return db


async def test_sequential_steps_pass_results_along(flows_db, database_url):
    await apply_yaml(flows_db, flow("chain", """
        input:
          type: object
          properties: {x: {type: integer}}
          required: [x]
        steps:
          - id: first
            script: add
            input: {a: flow_input.x, b: "1"}
          - id: second
            script: add
            input: {a: results.first, b: "10"}
        output: "{'first': results.first, 'second': results.second}"
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "chain", {"x": 5})
    assert run.status == "succeeded", run.error
    assert run.result == {"first": 6, "second": 16}


async def test_branch_one_takes_the_first_true_branch_or_the_default(flows_db, database_url):
    await apply_yaml(flows_db, flow("route", """
        steps:
          - id: pick
            branchOne:
              branches:
                - when: "flow_input.n > 10"
                  steps: [{id: big, script: echo, input: {value: "'big'"}}]
                - when: "flow_input.n > 5"
                  steps: [{id: medium, script: echo, input: {value: "'medium'"}}]
              default: [{id: small, script: echo, input: {value: "'small'"}}]
    """))
    async with running_workers(database_url):
        results = [(await run_flow(flows_db, "route", {"n": n})).result for n in (20, 7, 1)]
    assert results == ["big", "medium", "small"]


async def test_branch_all_parallel_and_sequential(flows_db, database_url):
    await apply_yaml(flows_db, flow("fan", """
        steps:
          - id: both
            branchAll:
              parallel: true
              branches:
                - steps: [{id: left, script: slow, input: {seconds: "0.5", value: "1"}}]
                - steps: [{id: right, script: slow, input: {seconds: "0.5", value: "2"}}]
          - id: ordered
            branchAll:
              parallel: false
              branches:
                - steps: [{id: one, script: echo, input: {value: "results.both[0]"}}]
                - steps: [{id: two, script: echo, input: {value: "results.both[1]"}}]
    """))
    async with running_workers(database_url, concurrency=4):
        run = await run_flow(flows_db, "fan")
    assert run.status == "succeeded", run.error
    assert run.result == [1, 2]
    rows = {r["path"]: r for r in await flow_store.run_steps(flows_db, run.id)}
    # The parallel branches overlapped in time; the sequential ones did not.
    assert rows["left"]["started_at"] < rows["right"]["finished_at"]
    assert rows["right"]["started_at"] < rows["left"]["finished_at"]
    assert rows["one"]["finished_at"] <= rows["two"]["started_at"]


async def test_for_each_respects_parallelism_and_keeps_order(flows_db, database_url):
    await apply_yaml(flows_db, flow("loop", """
        steps:
          - id: each
            forEach: "flow_input.items"
            parallelism: 3
            steps:
              - id: work
                script: slow
                input: {seconds: "0.2", value: "iter.value * 10 + iter.index"}
    """))
    async with running_workers(database_url, concurrency=8):
        run = await run_flow(flows_db, "loop", {"items": list(range(9))})
    assert run.status == "succeeded", run.error
    assert run.result == [i * 10 + i for i in range(9)]
    cur = await flows_db.execute(
        "SELECT started_at, finished_at FROM job_history WHERE flow_run_id = %s", [run.id])
    spans = await cur.fetchall()
    most_at_once = max(sum(1 for s, f in spans if s <= start < f) for start, _ in spans)
    assert 1 < most_at_once <= 3


async def test_retry_succeeds_on_the_second_attempt(flows_db, database_url):
    await apply_yaml(flows_db, flow("retrying", """
        steps:
          - id: call
            script: flaky
            input: {value: "42"}
            retry: {attempts: 3, backoff: constant, delay: 100ms}
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "retrying")
    assert run.status == "succeeded" and run.result == 42
    (step,) = await flow_store.run_steps(flows_db, run.id)
    assert step["attempts"] == 2


async def test_on_failure_handler_gets_the_error_and_step(flows_db, database_url):
    await apply_yaml(flows_db, flow("failing", """
        steps:
          - id: fine
            script: echo
            input: {value: "1"}
          - id: broken
            script: boom
            input: {message: "'disk full'"}
          - id: never
            script: echo
        onFailure:
          id: report
          script: echo
          input: {value: "error.step + ': ' + error.message"}
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "failing")
    assert run.status == "failed"
    assert run.error["step"] == "broken" and "disk full" in run.error["message"]
    rows = {r["path"]: r for r in await flow_store.run_steps(flows_db, run.id)}
    assert "never" not in rows
    assert rows["report"]["status"] == "succeeded"
    assert rows["report"]["result"].startswith("broken: RuntimeError: disk full")


async def test_skip_continue_on_error_and_stop_when(flows_db, database_url):
    await apply_yaml(flows_db, flow("controls", """
        steps:
          - id: skipped
            script: boom
            skipWhen: "flow_input.skip"
          - id: tolerated
            script: boom
            continueOnError: true
          - id: check
            script: echo
            input: {value: "has(results.tolerated.error)"}
            stopWhen: "results.check == true"
          - id: unreachable
            script: boom
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "controls", {"skip": True})
    assert run.status == "succeeded", run.error
    assert run.result is True
    assert await step_statuses(flows_db, run.id) == {
        "skipped": "skipped", "tolerated": "failed", "check": "succeeded"}


async def test_sleep_delays_a_step(flows_db, database_url):
    await apply_yaml(flows_db, flow("napping", """
        steps:
          - id: first
            script: echo
          - id: later
            script: echo
            sleep: 1s
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "napping")
    assert run.status == "succeeded"
    rows = {r["path"]: r for r in await flow_store.run_steps(flows_db, run.id)}
    cur = await flows_db.execute(
        "SELECT step_path, started_at FROM job_history WHERE flow_run_id = %s", [run.id])
    started = dict(await cur.fetchall())
    assert (started["later"] - rows["first"]["finished_at"]).total_seconds() >= 1.0


async def test_suspend_waits_for_approval_or_rejection(flows_db, database_url):
    await apply_yaml(flows_db, flow("gated", """
        steps:
          - id: prepare
            script: echo
            input: {value: "'plan'"}
            suspend: {timeout: 1h}
          - id: apply
            script: echo
            input: {value: "results.prepare + ' applied'"}
    """))
    async with running_workers(database_url):
        approved = await start_flow(flows_db, "gated")
        rejected = await start_flow(flows_db, "gated")
        await wait_step(flows_db, approved, "prepare", "suspended")
        await wait_step(flows_db, rejected, "prepare", "suspended")
        async with flows_db.transaction():
            await engine.decide(flows_db, approved, True, "alice")
            await engine.decide(flows_db, rejected, False, "bob")
        run_a = await wait_run(flows_db, approved)
        run_r = await wait_run(flows_db, rejected)
    assert run_a.status == "succeeded" and run_a.result == "plan applied"
    assert run_r.status == "failed" and "rejected by bob" in run_r.error["message"]
    with pytest.raises(FlowError, match="nothing waits for approval"):
        async with flows_db.transaction():
            await engine.decide(flows_db, approved, True, "alice")


async def test_suspend_times_out(flows_db, database_url):
    await apply_yaml(flows_db, flow("impatient", """
        steps:
          - id: gate
            suspend: {timeout: 500ms}
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "impatient")
    assert run.status == "failed" and "not approved within 500ms" in run.error["message"]


async def test_sub_flows(flows_db, database_url):
    await apply_yaml(flows_db, flow("child", """
        input: {type: object, properties: {n: {type: integer}}, required: [n]}
        steps:
          - {id: double, script: add, input: {a: flow_input.n, b: flow_input.n}}
    """) + flow("parent", """
        steps:
          - {id: call, flow: child, input: {n: "21"}}
          - {id: bad, flow: child, input: {n: "'not a number'"}, continueOnError: true}
        output: "results.call"
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "parent")
    assert run.status == "succeeded", run.error
    assert run.result == 42
    rows = {r["path"]: r for r in await flow_store.run_steps(flows_db, run.id)}
    assert "does not match Flow child" in rows["bad"]["error"]["message"]
    child = await flow_store.get_run(flows_db, rows["call"]["child_run_id"])
    assert child.parent_run_id == run.id and child.status == "succeeded"


async def test_cancel_stops_running_steps_and_starts_nothing(flows_db, database_url):
    await apply_yaml(flows_db, flow("long", """
        steps:
          - {id: wait, script: slow, input: {seconds: "30"}}
          - {id: after, script: echo}
    """))
    async with running_workers(database_url):
        run_id = await start_flow(flows_db, "long")
        await wait_step(flows_db, run_id, "wait", "running")
        await asyncio.sleep(0.5)  # let the job start in its sandbox
        async with flows_db.transaction():
            await engine.cancel_run(flows_db, run_id, "test")
        run = await wait_run(flows_db, run_id)
        cur = await flows_db.execute(
            "SELECT count(*) FROM jobs WHERE flow_run_id = %s", [run_id])
        for _ in range(100):
            if (await cur.fetchone())[0] == 0:
                break
            await asyncio.sleep(0.1)
            cur = await flows_db.execute(
                "SELECT count(*) FROM jobs WHERE flow_run_id = %s", [run_id])
    assert run.status == "cancelled"
    cur = await flows_db.execute(
        "SELECT status FROM job_history WHERE flow_run_id = %s", [run_id])
    assert [r[0] for r in await cur.fetchall()] == ["cancelled"]
    assert "after" not in await step_statuses(flows_db, run_id)


async def test_restart_from_the_failed_step_reuses_earlier_results(flows_db, database_url):
    await apply_yaml(flows_db, script("calc", """
        def main(x: int) -> int:
            raise ValueError("bug")
    """) + flow("resumable", """
        steps:
          - {id: fetch, script: echo, input: {value: "7"}}
          - {id: compute, script: calc, input: {x: results.fetch}}
          - {id: finish, script: add, input: {a: results.compute, b: "1"}}
    """))
    async with running_workers(database_url):
        failed = await run_flow(flows_db, "resumable")
        assert failed.status == "failed" and failed.error["step"] == "compute"
        # The bug is fixed; the run restarts from the step that failed.
        await apply_yaml(flows_db, script("calc", """
            def main(x: int) -> int:
                return x * 2
        """))
        async with flows_db.transaction():
            with pytest.raises(FlowError, match="top-level step"):
                await engine.restart_run(flows_db, failed.id, "nope")
            with pytest.raises(FlowError, match="did not succeed"):
                await engine.restart_run(flows_db, failed.id, "finish")
            restarted = await engine.restart_run(flows_db, failed.id, "compute")
        run = await wait_run(flows_db, restarted.id)
    assert run.status == "succeeded" and run.result == 15
    assert run.restarted_from == failed.id
    # fetch's result was reused, not run again.
    assert await completions(flows_db, run.id) == {"compute": 1, "finish": 1}
    assert (await step_statuses(flows_db, run.id))["fetch"] == "succeeded"


async def test_a_run_keeps_the_versions_it_started_with(flows_db, database_url):
    await apply_yaml(flows_db, script("version", "def main():\n    return 'v1'\n")
                     + flow("pinned", """
        steps:
          - {id: gate, suspend: {timeout: 1h}}
          - {id: which, script: version}
    """))
    async with running_workers(database_url):
        run_id = await start_flow(flows_db, "pinned")
        await wait_step(flows_db, run_id, "gate", "suspended")
        await apply_yaml(flows_db, script("version", "def main():\n    return 'v2'\n"))
        async with flows_db.transaction():
            await engine.decide(flows_db, run_id, True, "test")
        old = await wait_run(flows_db, run_id)
        new_id = await start_flow(flows_db, "pinned")
        await wait_step(flows_db, new_id, "gate", "suspended")
        async with flows_db.transaction():
            await engine.decide(flows_db, new_id, True, "test")
        new = await wait_run(flows_db, new_id)
    assert old.result == "v1" and new.result == "v2"


async def test_flow_concurrency_limit_queues_extra_runs(flows_db, database_url):
    await apply_yaml(flows_db, flow("single", """
        concurrency: 1
        steps:
          - {id: gate, suspend: {timeout: 1h}}
    """))
    async with running_workers(database_url):
        first = await start_flow(flows_db, "single")
        second = await start_flow(flows_db, "single")
        assert (await flow_store.get_run(flows_db, second)).status == "queued"
        await wait_step(flows_db, first, "gate", "suspended")
        async with flows_db.transaction():
            await engine.decide(flows_db, first, True, "test")
        await wait_run(flows_db, first)
        await wait_step(flows_db, second, "gate", "suspended")
        async with flows_db.transaction():
            await engine.decide(flows_db, second, True, "test")
        assert (await wait_run(flows_db, second)).status == "succeeded"


async def test_flow_timeout(flows_db, database_url):
    await apply_yaml(flows_db, flow("bounded", """
        timeout: 1s
        steps:
          - {id: wait, script: slow, input: {seconds: "30"}}
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "bounded")
    assert run.status == "failed" and "timed out after 1s" in run.error["message"]


async def test_expression_errors_at_run_time_fail_the_step_clearly(flows_db, database_url):
    await apply_yaml(flows_db, flow("typo", """
        steps:
          - {id: first, script: echo, input: {value: "{'a': 1}"}}
          - {id: second, script: echo, input: {value: "results.first.b + 1"}}
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "typo")
    assert run.status == "failed"
    assert run.error["step"] == "second"
    assert "input.value" in run.error["message"] and "'b'" in run.error["message"]


async def test_submit_refuses_bad_input(flows_db):
    await apply_yaml(flows_db, flow("typed", """
        input: {type: object, properties: {n: {type: integer}}, required: [n]}
        steps: [{id: s, script: echo}]
    """))
    with pytest.raises(FlowError, match="n"):
        async with flows_db.transaction():
            await engine.submit_flow_run(flows_db, "default", "typed", {"n": "x"})
    with pytest.raises(FlowError, match="not found"):
        async with flows_db.transaction():
            await engine.submit_flow_run(flows_db, "default", "missing", {})


async def test_apply_refuses_missing_scripts_and_sub_flow_cycles(db):
    from gristmill.dev.manifests import apply_manifests

    await apply_yaml(db, SCRIPTS)
    manifests = (flow("a", "steps: [{id: call, flow: b}]")
                 + flow("b", "steps: [{id: back, flow: a}]")
                 + flow("lonely", "steps: [{id: s, script: missing}]"))
    path = Path(f"/tmp/gristmill-test-{os.getpid()}.yaml")
    path.write_text(manifests)
    try:
        report = await apply_manifests(db, [path])
    finally:
        path.unlink()
    messages = [str(e) for e in report.errors]
    assert any("sub-flow cycle: a -> b -> a" in m for m in messages), messages
    assert any("Flow 'lonely'" in m and "Script 'missing' does not exist" in m
               for m in messages), messages
    assert await flow_store.get(db, "default", "lonely") is None

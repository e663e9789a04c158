"""Flow expressions: loop variables, and a budget no expression can get past.

The hostile expression here (`flow_input.xs.map(a, ...map(b, ...))` over a
4.9 KB input) held the API's event loop for 67-73 s before the budget; now it
is stopped in a child process and fails its step, while the API answers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import aiohttp
import pytest
from flowkit import apply_yaml, run_flow, running_workers, script, start_flow, wait_run
from test_flows import SCRIPTS, flow

from gristmill.api.server import serve
from gristmill.flows.evaluator import Budget, Evaluator, context_units
from gristmill.spec.expressions import ExpressionError, analyse, compile_expression
from tests import apikit

HOSTILE = "flow_input.xs.map(a, flow_input.xs.map(b, flow_input.xs.map(c, a * b * c)))"
BIG_INPUT = {"xs": list(range(1000))}  # 4.9 KB of JSON


def test_loop_variables_are_scoped_to_their_macro():
    for expression in ("flow_input.xs.filter(x, x > 1)", "flow_input.xs.map(x, x * 2)",
                       "flow_input.xs.all(x, x > 0)", "flow_input.xs.exists(x, x == 2)",
                       "flow_input.xs.exists_one(x, x == 2)",
                       "flow_input.xs.map(x, flow_input.xs.filter(y, y < x))",
                       "results.a.map(r, r.id + results.b)"):
        compile_expression(expression)
    assert analyse("results.a.map(r, r.id + results.b)").steps == {"a", "b"}
    # Real mistakes stay mistakes, a loop variable outside its macro included.
    for expression, unknown in (("flow_input.xs.map(x, x) + [x]", "x"),
                                ("flow_input.xs.filter(x, x > y)", "y"), ("z + 1", "z")):
        with pytest.raises(ExpressionError, match=f"unknown variable\\(s\\) {unknown};"):
            compile_expression(expression)


def test_results_in_strings_are_not_references():
    assert analyse("'results.nope' + results[\"real\"].x").steps == {"real"}


def test_long_expressions_are_refused_before_the_library_sees_them():
    # 16,000 chained `+` crashed the process (SIGSEGV) inside the CEL library.
    with pytest.raises(ExpressionError, match="the limit is 4,096"):
        compile_expression("1" + "+1" * 16000)


def test_context_units_stop_counting_at_the_limit():
    assert context_units({"a": [1, 2, 3]}, 100) == 5
    assert context_units({"a": list(range(10**6))}, 100) == 101
    assert context_units({"s": "x" * 2560}, 100) == 12


async def test_cheap_expressions_run_inline_costly_ones_guarded():
    evaluator = Evaluator(Budget(seconds=2))
    try:
        small = {"flow_input": {"a": 2}}
        assert evaluator.is_cheap(compile_expression("flow_input.a + 1"), small)
        assert not evaluator.is_cheap(compile_expression("[1].map(x, x)"), small)
        assert not evaluator.is_cheap(compile_expression("flow_input.a"),
                                      {"flow_input": {"a": list(range(100_000))}})
        assert await evaluator.evaluate("flow_input.a + 1", small) == 3
        assert await evaluator.evaluate("[1, 2, 3].filter(x, x > 1).map(x, x * 10)",
                                        {}) == [20, 30]
        # Values JSON cannot hold are failures, not poison for the database.
        with pytest.raises(ExpressionError, match="is NaN"):
            await evaluator.evaluate("[0.0].map(x, x / 0.0)", {})
        with pytest.raises(ExpressionError, match="is NaN"):
            await evaluator.evaluate("0.0 / 0.0", {})
        assert await evaluator.evaluate("[timestamp('2026-01-02T03:04:05Z')].map(t, t)",
                                        {}) == ["2026-01-02T03:04:05Z"]
    finally:
        evaluator.close()


async def test_a_runaway_expression_is_stopped_and_the_next_one_runs():
    evaluator = Evaluator(Budget(seconds=0.5, children=1))
    try:
        with pytest.raises(ExpressionError, match=r"was stopped after 0.5 s"):
            await evaluator.evaluate(HOSTILE, {"flow_input": BIG_INPUT})
        # The only child was killed; a new one answers the next request.
        assert await evaluator.evaluate("flow_input.xs.map(x, x)[2]",
                                        {"flow_input": BIG_INPUT}) == 2
    finally:
        evaluator.close()


async def test_an_expression_that_eats_memory_is_stopped():
    evaluator = Evaluator(Budget(seconds=20, memory_bytes=256 << 20))
    try:
        # Each item is a copy of a 1 MB string: about 1.3 GB in all.
        with pytest.raises(ExpressionError, match="needed more memory|was stopped"):
            await evaluator.evaluate("flow_input.xs.map(x, flow_input.s + flow_input.s)",
                                     {"flow_input": {"xs": list(range(600)),
                                                     "s": "x" * 1_000_000}})
    finally:
        evaluator.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_api_keeps_answering_while_a_hostile_expression_is_stopped(flows_db,
                                                                           database_url):
    await apply_yaml(flows_db, flow("hostile", f"""
        steps:
          - id: explode
            script: echo
            input: {{value: "{HOSTILE}"}}
    """) + flow("friendly", """
        steps:
          - {id: one, script: echo, input: {value: "flow_input.xs.filter(x, x < 3)"}}
    """))
    port = _free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(apikit.settings(database_url), "127.0.0.1", port, stop))
    base = f"http://127.0.0.1:{port}"
    try:
        async with apikit.session() as http:
            for _ in range(100):
                try:
                    async with http.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            submit = asyncio.create_task(http.post(
                f"{base}/api/v1/namespaces/default/flows/hostile/runs",
                data=json.dumps({"input": BIG_INPUT}),
                headers={"Content-Type": "application/json"}))
            answered_meanwhile = 0
            while not submit.done():
                async with http.get(f"{base}/healthz") as response:
                    if response.status == 200 and not submit.done():
                        answered_meanwhile += 1
                await asyncio.sleep(0.02)
            response = await submit
            assert response.status == 201, await response.text()
            hostile_id = (await response.json())["id"]
            # The loop served /healthz while the expression ran (it blocked 67 s before).
            assert answered_meanwhile > 0
            async with http.post(f"{base}/api/v1/namespaces/default/flows/friendly/runs",
                                 json={"input": BIG_INPUT}) as response:
                assert response.status == 201, await response.text()
                friendly_id = (await response.json())["id"]
    finally:
        stop.set()
        await server
    async with running_workers(database_url):
        hostile = await wait_run(flows_db, uuid.UUID(hostile_id))
        friendly = await wait_run(flows_db, uuid.UUID(friendly_id))
    assert hostile.status == "failed"
    message = hostile.error["message"]
    assert message.startswith("step explode input.value: 'flow_input.xs.map(a, ")
    assert "was stopped" in message and hostile.error["step"] == "explode"
    assert friendly.status == "succeeded" and friendly.result == [0, 1, 2]


async def test_a_hostile_expression_after_a_job_fails_that_step_only(flows_db, database_url):
    """The worker evaluates the next step's input when a job ends: the budget holds there
    too, and the worker goes on finishing other runs."""
    await apply_yaml(flows_db, script("numbers", """
        def main(n: int = 1000) -> list:
            return list(range(n))
    """) + flow("late", f"""
        steps:
          - {{id: make, script: numbers}}
          - id: blow
            script: echo
            input: {{value: "{HOSTILE.replace('flow_input.xs', 'results.make')}"}}
    """) + flow("plain", """
        steps:
          - {id: make, script: numbers, input: {n: "3"}}
          - {id: sum, script: echo, input: {value: "results.make.map(x, x * 2)"}}
    """))
    async with running_workers(database_url, concurrency=2):
        late_id, plain_id = await start_flow(flows_db, "late"), await start_flow(flows_db, "plain")
        late, plain = await wait_run(flows_db, late_id), await wait_run(flows_db, plain_id)
    assert late.status == "failed" and late.error["step"] == "blow"
    assert "step blow input.value: 'results.make.map(a, " in late.error["message"]
    assert "was stopped" in late.error["message"]  # by its time or its memory
    assert plain.status == "succeeded" and plain.result == [0, 2, 4], plain.error


async def test_loop_variables_in_a_running_flow(flows_db, database_url):
    await apply_yaml(flows_db, flow("loops", """
        steps:
          - id: pick
            script: echo
            input: {value: "flow_input.xs.filter(x, x > 1).map(x, x * 2)"}
          - id: check
            script: echo
            input:
              value: >-
                [results.pick.all(v, v > 2), results.pick.exists(v, v == 6),
                 results.pick.exists_one(v, v > 5)]
            skipWhen: "results.pick.exists(v, v > 100)"
        output: "{'pick': results.pick, 'check': results.check}"
    """))
    async with running_workers(database_url):
        run = await run_flow(flows_db, "loops", {"xs": [1, 2, 3]})
    assert run.status == "succeeded", run.error
    assert run.result == {"pick": [4, 6], "check": [True, True, True]}


@pytest.fixture
async def flows_db(db):
    await apply_yaml(db, SCRIPTS)
    return db


async def test_one_advance_has_a_budget_for_all_its_expressions(flows_db, database_url,
                                                                monkeypatch):
    """A forEach starting ten iterations at once whose inputs each run out of time: the
    advance stops evaluating when its total budget is spent, not after ten budgets."""
    from gristmill.flows import engine
    monkeypatch.setattr(engine, "EXPRESSIONS_PER_ADVANCE_S", 1.5)
    await apply_yaml(flows_db, flow("many", f"""
        steps:
          - id: each
            forEach: "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"
            parallelism: 10
            steps:
              - id: blow
                script: echo
                continueOnError: true
                input: {{value: "{HOSTILE}"}}
    """))
    run = await wait_run(flows_db, await start_flow(flows_db, "many", BIG_INPUT))
    assert run.status == "succeeded", run.error
    messages = [item["error"]["message"] for item in run.result]
    stopped = sum("was stopped" in m for m in messages)  # by time (1 s, then 0.5 s) or memory
    skipped = sum("not evaluated: this advance of the flow already spent 1.5 s" in m
                  for m in messages)
    assert stopped + skipped == 10 and skipped >= 7, messages

"""Flow overhead and fan-out, beside Prefect when it is installed.

    python bench/flow_overhead.py [--fanout-items 10000] [--prefect-python PATH]

With one worker (concurrency 1), wall time from submit to result of
  - a flow of 40 sequential trivial steps (each a sandboxed Python job), and
  - a flow of 10 sequential steps that each sleep 0.5 s;
the same two workloads as Prefect flows of tasks, run locally by the Python
given with --prefect-python (a virtualenv with `pip install prefect`);
then a forEach over --fanout-items items with parallelism 100 on one worker
process of concurrency 8: items per second; and what one CEL evaluation costs:
the library alone, the evaluator's inline path, its guarded path (a child
process reached from a thread), and how long a runaway expression runs before
it is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import psycopg
from common import throwaway_postgres

from gristmill.flows import engine
from gristmill.flows.apply import apply_flow
from gristmill.flows.evaluator import Evaluator
from gristmill.sandbox.process import ProcessExecutor
from gristmill.spec import Flow, Script, load_manifest_text
from gristmill.spec.expressions import ExpressionError, compile_expression
from gristmill.store import flows as flow_store
from gristmill.store import scripts as script_store
from gristmill.worker.loop import Worker, WorkerConfig

SCRIPTS = """
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: inc}
spec:
  language: python
  code: |
    def main(x: int = 0) -> int:
        return x + 1
---
apiVersion: gristmill.io/v1alpha1
kind: Script
metadata: {name: nap}
spec:
  language: python
  code: |
    import time

    def main(x: int = 0) -> int:
        time.sleep(0.5)
        return x + 1
"""


def chain(name: str, script: str, length: int) -> str:
    steps = "".join(
        f"\n    - {{id: s{i}, script: {script}, input: {{x: "
        f"'{'results.s' + str(i - 1) if i else '0'}'}}}}" for i in range(length))
    return (f"---\napiVersion: gristmill.io/v1alpha1\nkind: Flow\nmetadata: {{name: {name}}}\n"
            f"spec:\n  steps:{steps}\n")


FANOUT = """
---
apiVersion: gristmill.io/v1alpha1
kind: Flow
metadata: {name: fanout}
spec:
  steps:
    - id: each
      forEach: flow_input.items
      parallelism: 100
      steps:
        - {id: work, script: inc, input: {x: iter.value}}
  output: size(results.each)
"""

PREFECT = textwrap.dedent("""
    import json, time
    from prefect import flow, task

    @task
    def inc(x: int) -> int:
        return x + 1

    @task
    def nap(x: int) -> int:
        time.sleep(0.5)
        return x + 1

    @flow
    def light():
        x = 0
        for _ in range(40):
            x = inc(x)
        return x

    @flow
    def long():
        x = 0
        for _ in range(10):
            x = nap(x)
        return x

    light()  # warm up the local server and imports
    timings = {}
    for name, f in (("light", light), ("long", long)):
        started = time.perf_counter()
        f()
        timings[name] = time.perf_counter() - started
    print(json.dumps(timings))
""")


async def apply(conn: psycopg.AsyncConnection, text: str) -> None:
    loaded = load_manifest_text(text)
    assert not loaded.errors, loaded.errors
    for resource in loaded.resources:
        if isinstance(resource, Script):
            await script_store.apply(conn, resource)
    for resource in loaded.resources:
        if isinstance(resource, Flow):
            await apply_flow(conn, resource)


async def run_flow(conn: psycopg.AsyncConnection, name: str, flow_input: dict) -> tuple[float, object]:
    started = time.perf_counter()
    async with conn.transaction():
        run = await engine.submit_flow_run(conn, "default", name, flow_input)
    while True:
        current = await flow_store.get_run(conn, run.id)
        if current.status not in ("queued", "running"):
            assert current.status == "succeeded", current.error
            return time.perf_counter() - started, current.result
        await asyncio.sleep(0.005)


async def with_worker(url: str, concurrency: int, body):
    stop = asyncio.Event()
    worker = Worker(WorkerConfig(url, ["python"], concurrency=concurrency), ProcessExecutor())
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(0.5)
    try:
        return await body()
    finally:
        stop.set()
        await task


def prefect_timings(python: str) -> dict[str, float] | None:
    try:
        done = subprocess.run([python, "-c", PREFECT], capture_output=True, text=True,
                              timeout=900, env={
                                  "PREFECT_LOGGING_LEVEL": "ERROR",
                                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                  "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
                                  "PATH": f"{Path(python).parent}:/usr/bin:/bin",
                                  "HOME": "/tmp/prefect-home"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"prefect did not run: {exc}")
        return None
    if done.returncode != 0:
        print(f"prefect failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


async def expression_costs() -> dict[str, float]:
    """Microseconds per evaluation of a typical step input, median of 5 rounds of 2,000."""
    context = {"flow_input": {"batch": "b-42", "count": 4}, "results": {"fetch": [1, 2, 3]},
               "env": {}}
    typical = compile_expression("{'batch': flow_input.batch, 'n': size(results.fetch)}")
    looping = compile_expression("results.fetch.map(x, x * 2)")
    evaluator = Evaluator()

    async def per_call(call) -> float:
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(2000):
                await call()
            rounds.append((time.perf_counter() - started) / 2000 * 1e6)
        return sorted(rounds)[2]

    async def library():
        typical.program.execute(context)

    async def inline():
        await evaluator.evaluate(typical, context)

    async def guarded():
        await evaluator.evaluate(looping, context)

    try:
        await guarded()  # start a child
        costs = {"library": await per_call(library), "inline": await per_call(inline),
                 "guarded": await per_call(guarded)}
        hostile = "flow_input.xs.map(a, flow_input.xs.map(b, a * b))"
        started = time.perf_counter()
        with contextlib.suppress(ExpressionError):
            await evaluator.evaluate(hostile, {"flow_input": {"xs": list(range(1000))}})
        costs["stopped_after_s"] = time.perf_counter() - started
    finally:
        evaluator.close()
    return costs


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fanout-items", type=int, default=10000)
    parser.add_argument("--prefect-python", help="a Python with prefect installed")
    args = parser.parse_args()
    async with (throwaway_postgres(f"bench_{uuid.uuid4().hex[:6]}") as (_, url),
                await psycopg.AsyncConnection.connect(url, autocommit=True) as conn):
            await apply(conn, SCRIPTS + chain("light", "inc", 40) + chain("long", "nap", 10)
                        + FANOUT)

            async def sequential():
                await run_flow(conn, "light", {})  # warm up
                light, result = await run_flow(conn, "light", {})
                assert result == 40
                long, result = await run_flow(conn, "long", {})
                assert result == 10
                return light, long

            light, long = await with_worker(url, 1, sequential)

            async def fanout():
                return await run_flow(conn, "fanout", {"items": list(range(args.fanout_items))})

            fan_time, fan_result = await with_worker(url, 8, fanout)
            assert fan_result == args.fanout_items
    print("one worker, concurrency 1, every step a sandboxed Python job:")
    print(f"  gristmill 40 sequential light steps     {light:6.2f} s")
    print(f"  gristmill 10 sequential 0.5 s steps     {long:6.2f} s  (5.00 s of sleeping)")
    if args.prefect_python:
        timings = prefect_timings(args.prefect_python)
        if timings:
            print(f"  prefect   40 sequential light tasks     {timings['light']:6.2f} s  "
                  f"(prefect/gristmill {timings['light'] / light:.2f})")
            print(f"  prefect   10 sequential 0.5 s tasks     {timings['long']:6.2f} s  "
                  f"(prefect/gristmill {timings['long'] / long:.2f})")
    print(f"forEach over {args.fanout_items} items, parallelism 100, one worker of "
          f"concurrency 8: {fan_time:.1f} s, {args.fanout_items / fan_time:.0f} items/s")
    costs = await expression_costs()
    print("one CEL evaluation (median of 5 x 2,000):")
    print(f"  the cel library alone                   {costs['library']:6.1f} us")
    print(f"  evaluator, inline (no macro, small)     {costs['inline']:6.1f} us")
    print(f"  evaluator, guarded (child via thread)   {costs['guarded']:6.1f} us")
    print(f"  a runaway nested map over 1,000 items stopped after {costs['stopped_after_s']:.2f} s"
          f" (it ran 67 s in the API's event loop before)")


if __name__ == "__main__":
    asyncio.run(main())

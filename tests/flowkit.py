"""Helpers for tests that run real flows: apply manifests, run workers, wait for runs."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import textwrap
import uuid
from typing import Any

import psycopg

from gristmill.flows import engine
from gristmill.flows.apply import apply_flow, flow_problems
from gristmill.sandbox.process import ProcessExecutor
from gristmill.spec import Flow, Script, load_manifest_text
from gristmill.store import flows as flow_store
from gristmill.store import scripts as script_store
from gristmill.worker.loop import Worker, WorkerConfig

FINAL = ("succeeded", "failed", "cancelled")


async def apply_yaml(db: psycopg.AsyncConnection, text: str) -> None:
    """Apply Scripts then Flows from YAML; a problem fails the test with its message."""
    loaded = load_manifest_text(textwrap.dedent(text), source="<test>")
    assert not loaded.errors, [str(e) for e in loaded.errors]
    async with db.transaction():
        for resource in loaded.resources:
            if isinstance(resource, Script):
                await script_store.apply(db, resource)
        flows = [r for r in loaded.resources if isinstance(r, Flow)]
        pending = {f.metadata.name: f.spec for f in flows}
        for flow in flows:
            problems = await flow_problems(db, flow, pending)
            assert not problems, problems
            await apply_flow(db, flow)


async def apply_yaml_at(database_url: str, text: str) -> None:
    """apply_yaml on a connection of its own."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as db:
        await apply_yaml(db, text)


@contextlib.asynccontextmanager
async def running_workers(database_url: str, count: int = 1, concurrency: int = 4,
                          tags: tuple[str, ...] = ("python", "bash"), lease_s: float = 30):
    stop = asyncio.Event()
    workers = [Worker(WorkerConfig(database_url, list(tags), concurrency=concurrency,
                                   lease=dt.timedelta(seconds=lease_s), poll_interval=0.2,
                                   grace_period=5), ProcessExecutor())
               for _ in range(count)]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        yield workers
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def start_flow(db: psycopg.AsyncConnection, name: str, flow_input: dict | None = None
                     ) -> uuid.UUID:
    async with db.transaction():
        run = await engine.submit_flow_run(db, "default", name, flow_input or {})
    return run.id


async def wait_run(db: psycopg.AsyncConnection, run_id: uuid.UUID, timeout: float = 60
                   ) -> flow_store.FlowRun:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        run = await flow_store.get_run(db, run_id)
        if run.status in FINAL:
            return run
        assert asyncio.get_running_loop().time() < deadline, f"run still {run.status}"
        await asyncio.sleep(0.05)


async def wait_step(db: psycopg.AsyncConnection, run_id: uuid.UUID, path: str, status: str,
                    timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = await flow_store.get_steps(db, run_id, [path])
        if path in rows and rows[path].status == status:
            return
        assert asyncio.get_running_loop().time() < deadline, f"step {path} never {status}"
        await asyncio.sleep(0.05)


async def run_flow(db, name: str, flow_input: dict | None = None, timeout: float = 60
                   ) -> flow_store.FlowRun:
    return await wait_run(db, await start_flow(db, name, flow_input), timeout)


async def step_statuses(db: psycopg.AsyncConnection, run_id: uuid.UUID) -> dict[str, str]:
    return {row["path"]: row["status"] for row in await flow_store.run_steps(db, run_id)}


async def completions(db: psycopg.AsyncConnection, run_id: uuid.UUID) -> dict[str, int]:
    """How many times each step's job completed successfully, from history."""
    cur = await db.execute(
        "SELECT step_path, count(*) FROM job_history WHERE flow_run_id = %s AND kind = 'script'"
        " AND status = 'succeeded' GROUP BY step_path", [run_id])
    return dict(await cur.fetchall())


def script(name: str, code: str, **spec: Any) -> str:
    """A Python Script manifest as YAML text."""
    extra = "".join(f"\n  {key}: {value}" for key, value in spec.items())
    body = textwrap.indent(textwrap.dedent(code).strip(), "    ")
    return (f"---\napiVersion: gristmill.io/v1alpha1\nkind: Script\nmetadata:\n  name: {name}\n"
            f"spec:\n  language: python{extra}\n  code: |\n{body}\n")

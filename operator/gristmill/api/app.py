"""The HTTP API (aiohttp): submit runs, read them back, follow logs, cancel, metrics.

Routes:
  POST /api/v1/namespaces/{ns}/scripts/{name}/runs   {"input": {...}}  -> 201 {"id", "status"}
  POST /api/v1/namespaces/{ns}/flows/{name}/runs     {"input": {...}}  -> 201 {"id", "status"}
  GET  /api/v1/runs/{id}                             status, result, error, timings (and the
                                                     tree of steps of a flow run)
  GET  /api/v1/runs/{id}/logs[?follow=1]             the log as text (follow streams it)
  POST /api/v1/runs/{id}/cancel
  POST /api/v1/runs/{id}/approve | /reject           {"step": PATH?, "by": NAME?}
  POST /api/v1/runs/{id}/restart                     {"fromStep": STEP_ID} -> 201 the new run
  GET  /api/v1/scripts, /api/v1/flows [?namespace=NS]
  GET  /healthz, /metrics
A mistake in a request gets a 4xx with {"error": "what is wrong and how to fix it"}.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from gristmill.api import runs
from gristmill.api.runs import RunError, get_run, parse_run_id
from gristmill.flows import engine as flow_engine
from gristmill.flows.engine import FlowError
from gristmill.metrics import observe_queue
from gristmill.store import flows as flow_store
from gristmill.store import logs, queue
from gristmill.store import scripts as script_store

FINAL_STATUSES = {"succeeded", "failed", "cancelled"}
LOG_POLL_S = 0.2

POOL = web.AppKey("pool", AsyncConnectionPool)


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except (RunError, FlowError) as exc:
        return web.json_response({"error": exc.message}, status=exc.status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except json.JSONDecodeError as exc:
        raise RunError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RunError(400, "the request body must be a JSON object such as {\"input\": {}}")
    return body


def _submitter(submit):
    async def handler(request: web.Request) -> web.Response:
        body = await _json_body(request)
        ns, name = request.match_info["namespace"], request.match_info["name"]
        async with request.app[POOL].connection() as conn:
            run = await submit(conn, ns, name, body)
        return web.json_response(run, status=201)
    return handler


submit_script = _submitter(runs.submit_script_run)
submit_flow = _submitter(runs.submit_flow_run)


async def show_run(request: web.Request) -> web.Response:
    run_id = parse_run_id(request.match_info["id"])
    async with request.app[POOL].connection() as conn:
        return web.json_response(await get_run(conn, run_id))


async def cancel_run(request: web.Request) -> web.Response:
    run_id = parse_run_id(request.match_info["id"])
    async with request.app[POOL].connection() as conn:
        state = await runs.cancel_run(conn, run_id)
    return web.json_response({"id": str(run_id), "status": state})


async def _decide(request: web.Request, approve: bool) -> web.Response:
    run_id = parse_run_id(request.match_info["id"])
    body = await _json_body(request)
    runs.check_body(body, {"step", "by"})
    async with request.app[POOL].connection() as conn, conn.transaction():
        path = await flow_engine.decide(conn, run_id, approve, str(body.get("by", "api")),
                                        body.get("step"))
    return web.json_response({"id": str(run_id), "step": path,
                              "decision": "approved" if approve else "rejected"})


async def approve_run(request: web.Request) -> web.Response:
    return await _decide(request, True)


async def reject_run(request: web.Request) -> web.Response:
    return await _decide(request, False)


async def restart_run(request: web.Request) -> web.Response:
    run_id = parse_run_id(request.match_info["id"])
    body = await _json_body(request)
    runs.check_body(body, {"fromStep"})
    if not isinstance(body.get("fromStep"), str):
        raise RunError(400, "name the step to restart from: {\"fromStep\": \"STEP_ID\"}")
    async with request.app[POOL].connection() as conn, conn.transaction():
        run = await flow_engine.restart_run(conn, run_id, body["fromStep"])
    return web.json_response({"id": str(run.id), "kind": "flow", "status": run.status,
                              "restartedFrom": str(run_id)}, status=201)


async def run_logs(request: web.Request) -> web.StreamResponse:
    run_id = parse_run_id(request.match_info["id"])
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    try:
        after = int(request.query.get("after", "0"))
    except ValueError as exc:
        raise RunError(400, "after must be a log sequence number (an integer)") from exc
    pool = request.app[POOL]
    async with pool.connection() as conn:
        run = await get_run(conn, run_id)  # 404 for an unknown run
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    if run["kind"] == "flow":
        await _write_flow_logs(pool, run, response)
        await response.write_eof()
        return response
    while True:
        async with pool.connection() as conn:
            # Read the status first: logs are stored before a job is seen finished.
            finished = (await get_run(conn, run_id))["status"] in FINAL_STATUSES
            entries = await logs.read(conn, run_id, after)
        for seq, chunk in entries:
            await response.write(chunk.encode())
            after = seq
        if entries:
            continue
        if not follow or finished:
            break
        await asyncio.sleep(LOG_POLL_S)
    await response.write_eof()
    return response


async def _write_flow_logs(pool: AsyncConnectionPool, run: dict[str, Any],
                           response: web.StreamResponse) -> None:
    """A flow run's log: the log of each step's job in turn, under the step's path."""
    paths = {}

    def walk(steps: list[dict[str, Any]]) -> None:
        for step in steps:
            if step["job"]:
                paths[step["job"]] = step["path"]
            walk(step["steps"])
    walk(run["steps"])
    async with pool.connection() as conn:
        for job_id, path in paths.items():
            await response.write(f"=== step {path} (job {job_id})\n".encode())
            after = 0
            while entries := await logs.read(conn, job_id, after):
                for seq, chunk in entries:
                    await response.write(chunk.encode())
                    after = seq


def _listing(rows: list[tuple]) -> list[dict[str, Any]]:
    return [{"namespace": ns, "name": name, "version": version, "updatedAt": updated.isoformat()}
            for ns, name, version, updated in rows]


async def list_scripts(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        rows = await script_store.list_all(conn, request.query.get("namespace"))
    return web.json_response(_listing(rows))


async def list_flows(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        rows = await flow_store.list_all(conn, request.query.get("namespace"))
    return web.json_response(_listing(rows))


async def healthz(request: web.Request) -> web.Response:
    try:
        async with request.app[POOL].connection(timeout=2) as conn:
            await conn.execute("SELECT 1")
    except (psycopg.Error, TimeoutError) as exc:
        return web.json_response({"status": "database unreachable", "error": str(exc)}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    async with request.app[POOL].connection() as conn:
        observe_queue(await queue.queue_depth(conn))
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(database_url: str, pool_size: int = 8) -> web.Application:
    app = web.Application(middlewares=[_errors])

    async def open_pool(app: web.Application):
        pool = AsyncConnectionPool(database_url, min_size=1, max_size=pool_size, open=False,
                                   kwargs={"autocommit": True})
        await pool.open(wait=True, timeout=30)
        app[POOL] = pool
        yield
        await pool.close()

    app.cleanup_ctx.append(open_pool)
    app.router.add_post("/api/v1/namespaces/{namespace}/scripts/{name}/runs", submit_script)
    app.router.add_post("/api/v1/namespaces/{namespace}/flows/{name}/runs", submit_flow)
    app.router.add_get("/api/v1/runs/{id}", show_run)
    app.router.add_get("/api/v1/runs/{id}/logs", run_logs)
    app.router.add_post("/api/v1/runs/{id}/cancel", cancel_run)
    app.router.add_post("/api/v1/runs/{id}/approve", approve_run)
    app.router.add_post("/api/v1/runs/{id}/reject", reject_run)
    app.router.add_post("/api/v1/runs/{id}/restart", restart_run)
    app.router.add_get("/api/v1/scripts", list_scripts)
    app.router.add_get("/api/v1/flows", list_flows)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app

"""The HTTP API (aiohttp): submit runs, read them back, follow logs, cancel, metrics.

Every route is in ROUTES, with what a caller needs to call it (api/access.py), and
documented in /api/v1/openapi.json (api/openapi.py; a test keeps the two equal). A
mistake in a request gets a 4xx with {"error": "what is wrong and how to fix it"}; a
database (or, for credentials, a Kubernetes API server) that is away for longer than a
retry can hide gets a 503 with Retry-After; nothing a request sends gets a 500.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gristmill.api import idempotency, identity, listing, openapi, params, run_labels, runs
from gristmill.api.access import (
    GATE,
    WORKER_GRANT,
    Access,
    AccessSettings,
    Authenticated,
    Gate,
    InNamespace,
    Listing,
    Metrics,
    OnRun,
    Open,
    WorkerToken,
    access_middleware,
)
from gristmill.api.crosssite import SiteSettings, add_security_headers, site_middleware
from gristmill.api.database import Database
from gristmill.api.errors import errors_middleware
from gristmill.api.identity import caller_of
from gristmill.api.log_follow import JobWatch, client_gone, stream_job_log
from gristmill.api.reviewers import make_reviewers
from gristmill.api.runs import RunError, SubmitRequest, get_run
from gristmill.dispatch.hub import Dispatcher, DispatchSettings
from gristmill.flows import engine as flow_engine
from gristmill.metrics import observe_queue
from gristmill.store import audit, logs, queue, run_listing
from gristmill.store import flows as flow_store
from gristmill.store import scripts as script_store
from gristmill.store.audit import AuditAction
from gristmill.values import ValueProblem


@dataclass(frozen=True)
class ApiSettings:
    database_url: str
    pool_size: int = 8
    database_retry_s: float = 5.0  # how long a request rides out a database restart
    follow_fallback_s: float = 30.0  # a followed log is re-read this often without a wake-up
    max_body_bytes: int = params.MAX_BODY_BYTES
    max_batch_body_bytes: int = params.MAX_BATCH_BODY_BYTES  # a batch of up to 1,000 runs
    access: AccessSettings = field(default_factory=AccessSettings)
    site: SiteSettings = field(default_factory=SiteSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)


DATABASE = web.AppKey("database", Database)
WATCH = web.AppKey("watch", JobWatch)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SETTINGS = web.AppKey("settings", ApiSettings)
VERSIONS = web.AppKey("versions", runs.CurrentVersions)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _database(request: web.Request) -> Database:
    return request.app[DATABASE]


async def _audit(request: web.Request, conn: psycopg.AsyncConnection, action: AuditAction,
                 run_id: uuid.UUID, detail: dict[str, Any] | None = None) -> None:
    """The audit row of a change to a run, in the change's own transaction (`conn`)."""
    ref = await run_listing.locate_run(conn, run_id)
    if ref is None:  # the change found the run, so this cannot be: refuse rather than guess
        raise RunError(404, f"run {run_id} not found")
    await audit.record(conn, identity.caller_of(request), action, ref.namespace, run_id,
                       ref.name, detail)


# --- submits -------------------------------------------------------------------------------

MAX_BATCH_RUNS = 1000


def _submit_request(body: dict[str, Any], scheduled: bool) -> SubmitRequest:
    allowed = {"input", "priority", "labels"} | ({"scheduledFor"} if scheduled else set())
    params.check_fields(body, allowed)
    run_input = body.get("input", {})
    if not isinstance(run_input, dict):
        raise RunError(400, "input must be a JSON object such as {\"name\": \"world\"}")
    priority = body.get("priority")
    if "priority" in body and (not isinstance(priority, int) or isinstance(priority, bool)
                               or not -100 <= priority <= 100):
        raise RunError(400, "priority must be an integer from -100 to 100")
    labels = run_labels.check_labels(body["labels"]) if "labels" in body else {}
    return SubmitRequest(input=run_input, priority=priority, labels=labels,
                         scheduled_for=params.scheduled_for(body) if scheduled else None)


def _batch_requests(body: dict[str, Any], scheduled: bool) -> list[SubmitRequest]:
    """The entries of a batch, each checked as a single submit's body; the first one at
    fault refuses the batch, named by its index (runs[7])."""
    params.check_fields(body, {"runs"})
    entries = body.get("runs")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_BATCH_RUNS:
        got = f"{len(entries)} entries" if isinstance(entries, list) else "no list"
        raise RunError(400, f"runs must be a list of 1 to {MAX_BATCH_RUNS} runs, such as "
                            f"{{\"runs\": [{{\"input\": {{}}}}]}} (got {got}); send more "
                            f"runs in several batches")
    requests = []
    for index, entry in enumerate(entries):
        where = f"runs[{index}]"
        if not isinstance(entry, dict):
            raise RunError(400, f"{where}: each run must be a JSON object such as "
                                f"{{\"input\": {{}}}}")
        try:
            requests.append(_submit_request(entry, scheduled))
        except RunError as exc:
            raise RunError(exc.status, f"{where}: {exc.message}") from None
        except ValueProblem as exc:
            raise ValueProblem(f"{where}.{exc.where}", exc.reason) from None
    return requests


def _submitter(kind: str, submit, batch: bool = False) -> Handler:
    """The handler of a submit (`batch`: of a list of runs, all made in one transaction,
    or none). One audit row per run, in the runs' own transaction."""
    async def handler(request: web.Request) -> web.Response:
        namespace, name = params.name(request, "namespace"), params.name(request, "name")
        key = idempotency.key_of(request)
        settings = request.app[SETTINGS]
        body = await params.json_body(
            request, settings.max_batch_body_bytes if batch else settings.max_body_bytes)
        caller = caller_of(request)
        scheduled = kind == "scripts"
        submit_requests = [dataclasses.replace(r, submitted_by=caller.username) for r in (
            _batch_requests(body, scheduled) if batch else [_submit_request(body, scheduled)])]
        route = f"{kind}/{name}/runs" + (":batch" if batch else "")
        run_kind = "script" if kind == "scripts" else "flow"
        detail: dict[str, Any] = {"kind": run_kind}
        if batch:
            detail["batch"] = len(submit_requests)

        async def work(conn: psycopg.AsyncConnection) -> idempotency.Answer:
            async def record(run_ids: list[uuid.UUID]) -> None:
                # Here, not around submit_once: a replayed key makes no run and no row.
                await audit.record_many(conn, caller, AuditAction.SUBMIT, namespace,
                                        run_ids, name, [detail] * len(run_ids))

            async def make_runs() -> dict[str, Any]:
                made = await submit(conn, namespace, name, submit_requests,
                                    request.app[VERSIONS], record, batch=batch)
                return {"runs": made} if batch else made[0]
            if key is None:
                return idempotency.Answer(201, await make_runs())
            return await idempotency.submit_once(conn, namespace, route, key,
                                                 idempotency.fingerprint(body), make_runs)

        # With a key, a submit whose COMMIT was cut off is safe to repeat: the repeat
        # finds the key if the first one was committed. Pipelined: BEGIN, the audit rows,
        # the insert (with its NOTIFY) and COMMIT take two round trips.
        answer = await _database(request).write(work, repeatable_commit=key is not None,
                                                pipeline=True)
        headers = {idempotency.REPLAYED_HEADER: "true"} if answer.replayed else None
        return web.json_response(answer.body, status=answer.status, headers=headers)
    return handler


submit_script = _submitter("scripts", runs.submit_script_runs)
submit_flow = _submitter("flows", runs.submit_flow_runs)
submit_script_batch = _submitter("scripts", runs.submit_script_runs, batch=True)
submit_flow_batch = _submitter("flows", runs.submit_flow_runs, batch=True)


# --- runs ----------------------------------------------------------------------------------

async def show_run(request: web.Request) -> web.Response:
    run_id = params.run_id(request)
    return web.json_response(await _database(request).read(lambda conn: get_run(conn, run_id)))


async def cancel_run(request: web.Request) -> web.Response:
    run_id = params.run_id(request)

    async def work(conn: psycopg.AsyncConnection) -> str:
        state = await runs.cancel_run(conn, run_id)
        await _audit(request, conn, AuditAction.CANCEL, run_id, {"status": state})
        return state
    state = await _database(request).write(work)
    return web.json_response({"id": str(run_id), "status": state})


async def _decide(request: web.Request, approve: bool) -> web.Response:
    run_id = params.run_id(request)
    body = await params.json_body(request)
    if "by" in body:
        raise ValueProblem("by", "who decides is taken from your credentials, not from the "
                                 "request: leave it out")
    params.check_fields(body, {"step"})
    step = params.text_field(body, "step")
    caller = caller_of(request)

    async def work(conn: psycopg.AsyncConnection) -> str:
        path = await flow_engine.decide(conn, run_id, approve, caller.username, step,
                                        caller.groups)
        await _audit(request, conn, AuditAction.APPROVE if approve else AuditAction.REJECT,
                     run_id, {"step": path})
        return path
    path = await _database(request).write(work)
    return web.json_response({"id": str(run_id), "step": path,
                              "decision": "approved" if approve else "rejected"})


async def approve_run(request: web.Request) -> web.Response:
    return await _decide(request, True)


async def reject_run(request: web.Request) -> web.Response:
    return await _decide(request, False)


async def restart_run(request: web.Request) -> web.Response:
    run_id = params.run_id(request)
    body = await params.json_body(request)
    params.check_fields(body, {"fromStep"})
    from_step = params.text_field(body, "fromStep")
    if from_step is None:
        raise RunError(400, "name the step to restart from: {\"fromStep\": \"STEP_ID\"}")
    restarted_by = caller_of(request).username

    async def work(conn: psycopg.AsyncConnection) -> flow_store.FlowRun:
        run = await flow_engine.restart_run(conn, run_id, from_step, restarted_by)
        await _audit(request, conn, AuditAction.RESTART, run_id,
                     {"fromStep": from_step, "newRun": str(run.id)})
        return run
    run = await _database(request).write(work)
    return web.json_response({"id": str(run.id), "kind": "flow", "status": run.status,
                              "restartedFrom": str(run_id)}, status=201)


# --- logs ----------------------------------------------------------------------------------

async def run_logs(request: web.Request) -> web.StreamResponse:
    run_id = params.run_id(request)
    follow = params.query_flag(request, "follow")
    after = params.query_seq(request, "after")
    db = _database(request)
    run = await db.read(lambda conn: get_run(conn, run_id))  # 404 for an unknown run
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    try:
        if run["kind"] == "flow":
            await _write_flow_logs(db, run, response)
        else:
            await stream_job_log(request, response, db, request.app[WATCH], run_id, after,
                                 follow, request.app[SETTINGS].follow_fallback_s)
        if not client_gone(request):
            await response.write_eof()
    except (ConnectionResetError, ConnectionAbortedError):
        pass  # the client left; nothing more to send
    return response


async def _write_flow_logs(db: Database, run: dict[str, Any],
                           response: web.StreamResponse) -> None:
    """A flow run's log: the log of each step's job in turn, under the step's path."""
    paths = {}

    def walk(steps: list[dict[str, Any]]) -> None:
        for step in steps:
            if step["job"]:
                paths[step["job"]] = step["path"]
            walk(step["steps"])
    walk(run["steps"])
    for job_id, path in paths.items():
        await response.write(f"=== step {path} (job {job_id})\n".encode())
        after = 0
        while True:  # a connection per batch: none is held while a slow client reads
            entries = await db.read(lambda conn, after=after, job_id=job_id:
                                    logs.read(conn, job_id, after))
            if not entries:
                break
            for seq, chunk in entries:
                await response.write(chunk.encode())
                after = seq


# --- listings ------------------------------------------------------------------------------

async def list_runs(request: web.Request) -> web.Response:
    return await listing.list_runs(request, _database(request))


async def list_audit(request: web.Request) -> web.Response:
    return await listing.list_audit(request, _database(request))


# --- definitions, health, metrics --------------------------------------------------------

def _listing(rows: list[tuple]) -> list[dict[str, Any]]:
    return [{"namespace": ns, "name": name, "version": version, "updatedAt": updated.isoformat()}
            for ns, name, version, updated in rows]


async def list_scripts(request: web.Request) -> web.Response:
    namespace = params.query_name(request, "namespace")
    rows = await _database(request).read(lambda conn: script_store.list_all(conn, namespace))
    return web.json_response(_listing(rows))


async def list_flows(request: web.Request) -> web.Response:
    namespace = params.query_name(request, "namespace")
    rows = await _database(request).read(lambda conn: flow_store.list_all(conn, namespace))
    return web.json_response(_listing(rows))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves requests. It does not ask the database, so a database
    outage takes the API out of service (readiness) without restarting it."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database answers and log notifications are heard."""
    problem = await _database(request).ping()
    dispatcher = request.app[DISPATCHER]
    listening = request.app[WATCH].listening.is_set() and (
        not dispatcher.enabled or dispatcher.listening.is_set())
    body = {"status": "ok" if problem is None else "database unreachable",
            "database": problem or "ok",
            "notifications": "listening" if listening else "reconnecting"}
    if dispatcher.enabled:
        body["workers"] = len(dispatcher.sessions)
    if problem is not None:
        return web.json_response(body, status=503, headers={"Retry-After": "2"})
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    observe_queue(await _database(request).read(queue.queue_depth))
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def connect_worker(request: web.Request) -> web.StreamResponse:
    """The dispatcher's WebSocket: a WorkerGroup's worker gets its jobs here."""
    dispatcher = request.app[DISPATCHER]
    return await dispatcher.serve(request, request[WORKER_GRANT])


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


# (method, path, handler, what the caller needs): the whole API; api/openapi.py documents
# each route, README ("Who may do what") each permission.
ROUTES: list[tuple[str, str, Handler, Access]] = [
    ("POST", "/api/v1/namespaces/{namespace}/scripts/{name}/runs", submit_script,
     InNamespace("create", "scripts", "runs")),
    ("POST", "/api/v1/namespaces/{namespace}/flows/{name}/runs", submit_flow,
     InNamespace("create", "flows", "runs")),
    ("POST", "/api/v1/namespaces/{namespace}/scripts/{name}/runs:batch", submit_script_batch,
     InNamespace("create", "scripts", "runs")),
    ("POST", "/api/v1/namespaces/{namespace}/flows/{name}/runs:batch", submit_flow_batch,
     InNamespace("create", "flows", "runs")),
    ("GET", "/api/v1/namespaces/{namespace}/runs", list_runs, InNamespace("list", "runs")),
    ("GET", "/api/v1/namespaces/{namespace}/audit", list_audit, InNamespace("list", "audit")),
    ("GET", "/api/v1/runs/{id}", show_run, OnRun("get")),
    ("GET", "/api/v1/runs/{id}/logs", run_logs, OnRun("get")),
    ("POST", "/api/v1/runs/{id}/cancel", cancel_run, OnRun("update", "cancel")),
    ("POST", "/api/v1/runs/{id}/approve", approve_run, OnRun("update", "approval")),
    ("POST", "/api/v1/runs/{id}/reject", reject_run, OnRun("update", "approval")),
    ("POST", "/api/v1/runs/{id}/restart", restart_run, OnRun("update", "restart")),
    ("GET", "/api/v1/scripts", list_scripts, Listing("scripts")),
    ("GET", "/api/v1/flows", list_flows, Listing("flows")),
    ("GET", "/api/v1/workers/connect", connect_worker, WorkerToken()),
    ("GET", "/api/v1/openapi.json", openapi_document, Authenticated()),
    ("GET", "/healthz", healthz, Open()),
    ("GET", "/readyz", readyz, Open()),
    ("GET", "/metrics", metrics, Metrics()),
]


def create_app(settings: ApiSettings | str) -> web.Application:
    if isinstance(settings, str):
        settings = ApiSettings(database_url=settings)
    app = web.Application(middlewares=[errors_middleware(max(
        settings.max_body_bytes, settings.max_batch_body_bytes)),
                                       site_middleware(settings.site), access_middleware],
                          client_max_size=max(settings.max_body_bytes,
                                              settings.max_batch_body_bytes))
    app[SETTINGS] = settings
    app[VERSIONS] = runs.CurrentVersions()
    app.on_response_prepare.append(add_security_headers)

    async def resources(app: web.Application):
        # First: an API that cannot check credentials must not start (and says why).
        authenticator, authorizer, close_reviewers = make_reviewers(settings.access)
        app[GATE] = Gate(authenticator, authorizer, lambda: app[DATABASE],
                         {(method, path): access for method, path, _, access in ROUTES},
                         settings.access.metrics_need_auth, settings.dispatch.token_keys)
        database = Database(settings.database_url, settings.pool_size,
                            settings.database_retry_s)
        watch = JobWatch(settings.database_url)
        dispatcher = Dispatcher(settings.dispatch, settings.database_url)
        await database.open()
        watch.start()
        if dispatcher.enabled:
            await dispatcher.start()
        app[DATABASE], app[WATCH], app[DISPATCHER] = database, watch, dispatcher
        yield
        if dispatcher.enabled:
            await dispatcher.stop()
        await watch.stop()
        await database.close()
        close_reviewers()

    app.cleanup_ctx.append(resources)

    async def close_worker_connections(app: web.Application) -> None:
        # Before aiohttp waits for open requests: a worker's WebSocket never ends by itself.
        if DISPATCHER in app:
            await app[DISPATCHER].close_sessions()

    app.on_shutdown.append(close_worker_connections)
    for method, path, handler, _ in ROUTES:
        app.router.add_route(method, path, handler)
    return app

"""The flow engine: advances flow runs as their jobs end, inside the ending transaction.

Every entry point runs in the caller's transaction and locks the flow run it
touches (`SELECT ... FOR UPDATE`), so a job's completion and everything that
follows from it (the next step, a branch, loop iterations, the failure
handler, the run's end, the parent flow's step) commit together or not at
all: a crash leaves either "not done" (the job runs again) or "done and the
next step queued", never a lost or doubled step.

Delays (step `sleep`, `suspend` timeouts, the flow `timeout`) are timer jobs:
delayed jobs of kind "timer" on the control tag, which any worker completes
when due; their completion comes back here like any other.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from gristmill.flows import catalog
from gristmill.flows.evaluator import evaluator
from gristmill.flows.plan import ON_FAILURE, FlowPlan, Indices, parse_path, step_path
from gristmill.spec import InputError, check_input, parse_duration
from gristmill.spec.expressions import ExpressionError, referenced_steps
from gristmill.spec.flow import Suspend
from gristmill.store import flows as flow_store
from gristmill.store import ids, queue
from gristmill.store import scripts as script_store
from gristmill.store.flows import FlowRun, StepRow

CONTROL_TAG = "_control"
ACTIVE = ("sleeping", "running", "suspended")
# Each evaluation has its own budget (1 s); one advance (a job's end and all that follows
# in its transaction: a forEach starting 100 iterations, say) has this much in all.
EXPRESSIONS_PER_ADVANCE_S = 5.0


class FlowError(Exception):
    """A request about a flow run that cannot be honoured; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _error(kind: str, message: str, step: str | None = None, **extra: Any) -> dict[str, Any]:
    error = {"kind": kind, "message": message, **extra}
    if step:
        error["step"] = step
    return error


@dataclass
class Effects:
    """What one advance does, shared by the runs it touches (a parent and its sub-flows):
    jobs to enqueue and to cancel at the end, and the next moves to make.

    Moves are queued, not nested calls, so a forEach of ten thousand skipped
    iterations is a loop, not ten thousand stack frames.
    """

    jobs: list[queue.NewJob] = field(default_factory=list)
    cancel_jobs: list[uuid.UUID] = field(default_factory=list)
    expression_seconds: float = 0.0  # spent evaluating, against EXPRESSIONS_PER_ADVANCE_S
    moves: deque[tuple[RunEngine, Callable[..., Awaitable[None]], tuple]] = field(
        default_factory=deque)

    async def make_moves(self) -> None:
        while self.moves:
            engine, move, args = self.moves.popleft()
            if engine.run.status == "running":  # a run that ended makes no more moves
                await move(*args)


@dataclass
class RunEngine:
    """Advances one locked flow run."""

    conn: psycopg.AsyncConnection
    run: FlowRun
    plan: FlowPlan
    effects: Effects = field(default_factory=Effects)

    def later(self, move: Callable[..., Awaitable[None]], *args: Any) -> None:
        self.effects.moves.append((self, move, args))

    # ---- expression context --------------------------------------------------------

    async def context(self, step_id: str | None, indices: Indices,
                      reads: frozenset[str] = frozenset()) -> dict[str, Any]:
        ctx: dict[str, Any] = {
            "flow_input": self.run.input,
            "env": {var.name: var.value for var in self.plan.spec.env},
        }
        paths = {}
        for ref in reads:
            depth = self.plan.steps[ref].depth
            paths[step_path(ref, indices[:depth])] = ref
        rows = await flow_store.get_steps(self.conn, self.run.id, list(paths)) if paths else {}
        ctx["results"] = {
            row.step_id: row.result for row in rows.values()
            if row.status in ("succeeded", "skipped", "failed")
            and not (row.status == "failed" and not self.plan.steps[row.step_id].step.continueOnError)
        }
        loop = self.plan.innermost_loop(step_id) if step_id else None
        if loop is not None:
            loop_path = step_path(loop, indices[: self.plan.steps[loop].depth])
            index = indices[self.plan.steps[loop].depth]
            item = await flow_store.iteration_item(self.conn, self.run.id, loop_path, index)
            ctx["iter"] = {"value": item, "index": index}
        if self.run.failure_handled and self.run.error:
            ctx["error"] = self.run.error
        return ctx

    async def _evaluate(self, step_id: str, indices: Indices, what: str, expression: str,
                        extra_reads: frozenset[str] = frozenset()) -> Any:
        info = self.plan.steps[step_id]
        ctx = await self.context(step_id, indices, info.reads | extra_reads)
        try:
            return await self._timed_evaluation(expression, ctx)
        except ExpressionError as exc:
            raise StepFailure(_error("expression", f"step {step_id} {what}: {exc}",
                                     step_id)) from None

    async def _timed_evaluation(self, expression: str, ctx: dict[str, Any]) -> Any:
        remaining = EXPRESSIONS_PER_ADVANCE_S - self.effects.expression_seconds
        if remaining <= 0:
            raise ExpressionError(f"not evaluated: this advance of the flow already spent "
                                  f"{EXPRESSIONS_PER_ADVANCE_S:g} s on expressions (their "
                                  f"budget); make the expressions cheaper")
        started = time.monotonic()
        try:
            return await evaluator.evaluate(expression, ctx, seconds=remaining)
        finally:
            self.effects.expression_seconds += time.monotonic() - started

    # ---- starting steps ----------------------------------------------------------------

    async def start_step(self, step_id: str, indices: Indices) -> None:
        step = self.plan.steps[step_id].step
        path = step_path(step_id, indices)
        try:
            if step.skipWhen and await self._evaluate(step_id, indices, "skipWhen",
                                                      step.skipWhen) is True:
                await self._save(StepRow(path, step_id, "skipped"))
                self.later(self.after_step, step_id, indices, None, True)
                return
            if step.sleep:
                timer = self._timer(parse_duration(step.sleep), "sleep", path)
                await self._save(StepRow(path, step_id, "sleeping", state={"timer": str(timer)}))
                return
            await self.begin_action(step_id, indices)
        except StepFailure as failure:
            await self.step_failed(step_id, indices, failure.error)

    async def begin_action(self, step_id: str, indices: Indices) -> None:
        step = self.plan.steps[step_id].step
        path = step_path(step_id, indices)
        action = step.action
        if action in ("script", "inline"):
            await self._start_job(step_id, indices)
        elif action == "branchOne":
            chosen = len(step.branchOne.branches)  # the default block
            for i, branch in enumerate(step.branchOne.branches):
                if await self._evaluate(step_id, indices, f"branch {i} when", branch.when) is True:
                    chosen = i
                    break
            first = self.plan.first_of(step_id, chosen)
            await self._save(StepRow(path, step_id, "running", state={"branch": chosen}))
            if first is None:
                self.later(self.after_step, step_id, indices, None)
            else:
                self.later(self.start_step, first, indices)
        elif action == "branchAll":
            count = len(step.branchAll.branches)
            await self._save(StepRow(path, step_id, "running",
                                     state={"done": 0, "results": [None] * count}))
            for block in range(count if step.branchAll.parallel else 1):
                self.later(self.start_step, self.plan.first_of(step_id, block), indices)
        elif action == "forEach":
            items = await self._evaluate(step_id, indices, "forEach", step.forEach)
            if not isinstance(items, list):
                raise StepFailure(_error("expression", f"step {step_id} forEach: "
                                         f"{step.forEach!r} gave {type(items).__name__}, "
                                         f"not a list", step_id))
            started = min(step.parallelism, len(items))
            await self._save(StepRow(path, step_id, "running",
                                     state={"count": len(items), "started": started, "done": 0}))
            if not items:
                self.later(self.after_step, step_id, indices, [])
                return
            await flow_store.insert_iterations(self.conn, self.run.id, path, items)
            first = self.plan.first_of(step_id, 0)
            for i in range(started):
                self.later(self.start_step, first, (*indices, i))
        elif action == "flow":
            await self._start_subflow(step_id, indices)
        else:  # an approval gate: nothing runs, it only suspends
            await self._save(StepRow(path, step_id, "running"))
            self.later(self.after_step, step_id, indices, None)

    async def _step_input(self, step_id: str, indices: Indices) -> dict[str, Any]:
        step = self.plan.steps[step_id].step
        if not step.input and self.plan.steps[step_id].section == ON_FAILURE:
            return {"error": self.run.error, "step": (self.run.error or {}).get("step")}
        return {arg: await self._evaluate(step_id, indices, f"input.{arg}", expression)
                for arg, expression in step.input.items()}

    async def _start_job(self, step_id: str, indices: Indices) -> None:
        step = self.plan.steps[step_id].step
        path = step_path(step_id, indices)
        if step.script:
            version = self.run.pins["scripts"].get(step.script)
            name = step.script
        else:
            version, name = step.inline.content_hash(), f"{self.run.flow_name}.{step_id}"
        script = await catalog.load_script_version(self.conn, version)
        job_input = await self._step_input(step_id, indices)
        try:
            check_input(script.input_schema, job_input)
        except InputError as exc:
            raise StepFailure(_error("input", f"step {step_id}: the input does not match "
                                     f"Script {name}: {exc}", step_id)) from None
        retry = step.retry.model_dump(mode="json") if step.retry else None
        limit = script.spec.concurrencyLimit
        job = queue.NewJob(
            namespace=self.run.namespace, tag=script.spec.effective_tag, kind="script",
            input=job_input, script_name=name, script_hash=version, priority=self.run.priority,
            max_attempts=step.retry.attempts if step.retry else script.spec.retries + 1,
            concurrency_key=f"script:{self.run.namespace}/{name}" if limit else None,
            concurrency_limit=limit, flow_run_id=self.run.id, step_path=path,
            retry_policy=retry, timeout_s=parse_duration(step.timeout) if step.timeout else None,
        )
        self.effects.jobs.append(job)
        await self._save(StepRow(path, step_id, "running", job_id=job.id))

    async def _start_subflow(self, step_id: str, indices: Indices) -> None:
        step = self.plan.steps[step_id].step
        version = self.run.pins["flows"][step.flow]
        child_plan = await catalog.load_flow_plan(self.conn, version)
        child_input = await self._step_input(step_id, indices)
        try:
            check_input(child_plan.spec.input, child_input)
        except InputError as exc:
            raise StepFailure(_error("input", f"step {step_id}: the input does not match "
                                     f"Flow {step.flow}: {exc}", step_id)) from None
        child = _new_run(self.run.namespace, step.flow, version, child_input,
                         self.run.priority, self.run.pins, status="running",
                         parent=(self.run.id, step_path(step_id, indices)),
                         submitted_by=self.run.submitted_by)  # its gates guard the same run
        await flow_store.insert_run(self.conn, child)
        await self._save(StepRow(step_path(step_id, indices), step_id, "running",
                                 child_run_id=child.id))
        await RunEngine(self.conn, child, child_plan, self.effects).start()

    def _timer(self, delay_s: float, timer: str, path: str | None) -> uuid.UUID:
        job = queue.NewJob(
            namespace=self.run.namespace, tag=CONTROL_TAG, kind="timer", input={"timer": timer},
            scheduled_for=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay_s),
            flow_run_id=self.run.id, step_path=path,
        )
        self.effects.jobs.append(job)
        return job.id

    # ---- steps ending ------------------------------------------------------------------

    async def after_step(self, step_id: str, indices: Indices, result: Any,
                         skipped: bool = False, approval: dict[str, Any] | None = None,
                         failed: dict[str, Any] | None = None) -> None:
        """A step's work is done (or it was skipped, or it failed with continueOnError).
        `approval`: a suspended step was approved (who, when), kept in its state."""
        step = self.plan.steps[step_id].step
        path = step_path(step_id, indices)
        if step.suspend and not skipped and approval is None and failed is None:
            timer = self._timer(parse_duration(step.suspend.timeout), "suspend", path)
            await self._save(StepRow(path, step_id, "suspended", result=result,
                                     state={"timer": str(timer)}))
            return
        if not skipped:
            await self._save(StepRow(path, step_id, "failed" if failed else "succeeded",
                                     result=result, error=failed,
                                     state={"approval": approval} if approval else None))
        try:
            if step.stopWhen and not skipped and await self._evaluate(
                    step_id, indices, "stopWhen", step.stopWhen,
                    frozenset({step_id})) is True:
                await self.finish("succeeded", result=result)
                return
        except StepFailure as failure:
            await self.step_failed(step_id, indices, failure.error)
            return
        following = self.plan.next_step(step_id)
        if following is not None:
            self.later(self.start_step, following, indices)
        else:
            self.later(self.block_done, step_id, indices, result)

    async def block_done(self, last_step: str, indices: Indices, result: Any) -> None:
        info = self.plan.steps[last_step]
        if info.parent is None:
            if info.section == ON_FAILURE:
                await self.finish("failed", error=self.run.error)
            else:
                await self._finish_with_output(result)
            return
        container = self.plan.steps[info.parent].step
        outer = self.plan.container_indices(last_step, indices)
        path = step_path(container.id, outer)
        row = (await flow_store.get_steps(self.conn, self.run.id, [path])).get(path)
        if row is None or row.status != "running":
            return  # the container already ended (a sibling failed, the run stopped)
        state = row.state
        if container.branchOne:
            self.later(self.after_step, container.id, outer, result)
        elif container.branchAll:
            state["results"][info.block] = result
            state["done"] += 1
            await self._save(StepRow(path, container.id, "running", state=state))
            if state["done"] == len(container.branchAll.branches):
                self.later(self.after_step, container.id, outer, state["results"])
            elif not container.branchAll.parallel:
                self.later(self.start_step, self.plan.first_of(container.id, state["done"]),
                           outer)
        else:  # forEach: one iteration done, maybe the next one starts
            await flow_store.set_iteration_result(self.conn, self.run.id, path, indices[-1],
                                                  result)
            state["done"] += 1
            if state["started"] < state["count"]:
                self.later(self.start_step, self.plan.first_of(container.id, 0),
                           (*outer, state["started"]))
                state["started"] += 1
            await self._save(StepRow(path, container.id, "running", state=state))
            if state["done"] == state["count"]:
                results = await flow_store.iteration_results(self.conn, self.run.id, path)
                self.later(self.after_step, container.id, outer, results)

    async def step_failed(self, step_id: str, indices: Indices, error: dict[str, Any]) -> None:
        info = self.plan.steps[step_id]
        path = step_path(step_id, indices)
        error = {**error, "step": error.get("step", step_id)}
        if info.step.continueOnError:
            self.later(self.after_step, step_id, indices, {"error": error}, False, False, error)
            return
        await self._save(StepRow(path, step_id, "failed", error=error))
        if info.parent is None:
            await self.flow_failed(error)
            return
        outer = self.plan.container_indices(step_id, indices)
        container_path = step_path(info.parent, outer)
        row = (await flow_store.get_steps(self.conn, self.run.id, [container_path])
               ).get(container_path)
        if row is None or row.status != "running":
            return
        await self._cancel_inside(info.parent, outer)
        self.later(self.step_failed, info.parent, outer, error)

    async def flow_failed(self, error: dict[str, Any]) -> None:
        handler = self.plan.spec.onFailure
        if handler and not self.run.failure_handled:
            self.run.failure_handled, self.run.error = True, error
            await flow_store.mark_failure_handled(self.conn, self.run.id, error)
            await self._cancel_active_jobs()
            self.later(self.start_step, handler.id, ())
            return
        if self.run.failure_handled and error.get("step") == (handler.id if handler else None):
            # The handler failed too: the run fails with the original error, noting this one.
            error = {**(self.run.error or {}), "onFailureError": error}
        elif self.run.failure_handled:
            error = self.run.error or error
        await self.finish("failed", error=error)

    async def _finish_with_output(self, last_result: Any) -> None:
        output = self.plan.spec.output
        if output is None:
            await self.finish("succeeded", result=last_result)
            return
        ctx = await self.context(None, (), frozenset(referenced_steps(output)))
        try:
            result = await self._timed_evaluation(output, ctx)
        except ExpressionError as exc:
            await self.finish("failed", error=_error("expression", f"output: {exc}"))
            return
        await self.finish("succeeded", result=result)

    # ---- the run as a whole ------------------------------------------------------------

    async def start(self, from_step: str | None = None) -> None:
        """Arm the flow's timeout and start at the first step (or `from_step`, a restart)."""
        if self.plan.spec.timeout:
            self._timer(parse_duration(self.plan.spec.timeout), "flow_timeout", None)
        self.later(self.start_step, from_step or self.plan.top_level()[0], ())

    async def finish(self, status: str, result: Any = None,
                     error: dict[str, Any] | None = None) -> None:
        self.run.status = status
        await flow_store.mark_finished(self.conn, self.run.id, status, result, error)
        await self._cancel_active_jobs()
        for child in await flow_store.active_children(self.conn, self.run.id):
            await cancel_run(self.conn, child, "the parent flow run ended", engine=self)
        if self.run.parent_run_id:
            await _report_to_parent(self, status, result, error)
        await _start_waiting_run(self)

    async def _cancel_active_jobs(self) -> None:
        self.effects.cancel_jobs.extend(
            job_id for job_id, _ in await queue.active_jobs_of_flow_run(self.conn, self.run.id))
        self.effects.jobs[:] = [j for j in self.effects.jobs if j.flow_run_id != self.run.id]

    async def _cancel_inside(self, container: str, indices: Indices) -> None:
        """Stop the work still going on inside a container that failed."""
        inside = self.plan.descendants(container)

        def within(path: str | None) -> bool:
            if path is None:
                return False
            step_id, step_indices = parse_path(path)
            return step_id in inside and step_indices[: len(indices)] == indices

        effects = self.effects
        effects.jobs[:] = [j for j in effects.jobs
                           if not (j.flow_run_id == self.run.id and within(j.step_path))]
        for job_id, path in await queue.active_jobs_of_flow_run(self.conn, self.run.id):
            if within(path):
                effects.cancel_jobs.append(job_id)

    async def _save(self, row: StepRow) -> None:
        await flow_store.save_step(self.conn, self.run.id, row)

    async def flush(self) -> list[queue.EndedJob]:
        """Make the queued moves, then enqueue the jobs they created and cancel those they
        stopped; return the queued jobs that cancelling ended."""
        effects = self.effects
        await effects.make_moves()
        await queue.enqueue(self.conn, effects.jobs)
        effects.jobs.clear()
        ended: list[queue.EndedJob] = []
        if effects.cancel_jobs:
            cancellation = await queue.cancel(self.conn, effects.cancel_jobs,
                                              "the flow run moved on")
            ended = cancellation.ended
            effects.cancel_jobs.clear()
        return ended


class StepFailure(Exception):
    def __init__(self, error: dict[str, Any]):
        super().__init__(error["message"])
        self.error = error


def _new_run(namespace: str, name: str, version: str, run_input: dict[str, Any], priority: int,
             pins: dict[str, Any], status: str, parent: tuple[uuid.UUID, str] | None = None,
             restarted_from: uuid.UUID | None = None, submitted_by: str | None = None,
             labels: dict[str, str] | None = None) -> FlowRun:
    return FlowRun(
        id=ids.new_id(), namespace=namespace, flow_name=name, flow_hash=version,
        submitted_by=submitted_by,
        status=status, input=run_input, result=None, error=None, priority=priority, pins=pins,
        parent_run_id=parent[0] if parent else None, parent_path=parent[1] if parent else None,
        restarted_from=restarted_from, failure_handled=False, created_at=None, started_at=None,
        finished_at=None, labels=labels or {},
    )


async def _engine_for(conn: psycopg.AsyncConnection, run_id: uuid.UUID,
                      shared: RunEngine | None = None) -> RunEngine | None:
    run = await flow_store.get_run(conn, run_id, lock=True)
    if run is None:
        return None
    plan = await catalog.load_flow_plan(conn, run.flow_hash)
    if shared is not None:
        return RunEngine(conn, run, plan, shared.effects)
    return RunEngine(conn, run, plan)


async def _report_to_parent(child: RunEngine, status: str, result: Any,
                            error: dict[str, Any] | None) -> None:
    parent = await _engine_for(child.conn, child.run.parent_run_id, shared=child)
    if parent is None or parent.run.status != "running":
        return
    step_id, indices = parse_path(child.run.parent_path)
    path = child.run.parent_path
    row = (await flow_store.get_steps(child.conn, parent.run.id, [path])).get(path)
    if row is None or row.status != "running" or row.child_run_id != child.run.id:
        return
    if status == "succeeded":
        parent.later(parent.after_step, step_id, indices, result)
    else:
        message = (error or {}).get("message", status)
        parent.later(parent.step_failed, step_id, indices, _error(
            "subflow", f"sub-flow {child.run.flow_name} run {child.run.id} {status}: {message}",
            step_id, run=str(child.run.id)))


async def _start_waiting_run(engine: RunEngine) -> None:
    """A run of a flow with a concurrency limit ended: let the next waiting one start."""
    if engine.plan.spec.concurrency is None:
        return
    waiting = await flow_store.next_waiting_run(engine.conn, engine.run.namespace,
                                                engine.run.flow_name)
    if waiting is None:
        return
    successor = await _engine_for(engine.conn, waiting, shared=engine)
    await flow_store.mark_started(engine.conn, waiting)
    successor.run.status = "running"
    await successor.start()


# ---- entry points -----------------------------------------------------------------------------

async def resolve_pins(conn: psycopg.AsyncConnection, namespace: str, spec_plan: FlowPlan,
                       pins: dict[str, dict[str, str]] | None = None,
                       seen: tuple[str, ...] = ()) -> dict[str, dict[str, str]]:
    """The current version of every Script and sub-flow a run will use, recursively."""
    pins = pins or {"scripts": {}, "flows": {}}
    for name in sorted(spec_plan.spec.script_names()):
        if name not in pins["scripts"]:
            found = await script_store.get(conn, namespace, name)
            if found is None:
                raise FlowError(409, f"Script {namespace}/{name} used by the flow does not exist "
                                     f"(any more): apply it, then submit again")
            pins["scripts"][name] = found[0]
    for name in sorted(spec_plan.spec.flow_names()):
        if name in seen:
            raise FlowError(409, f"sub-flow cycle: {' -> '.join((*seen, name))}")
        if name not in pins["flows"]:
            found = await flow_store.get(conn, namespace, name)
            if found is None:
                raise FlowError(409, f"Flow {namespace}/{name} used as a sub-flow does not exist")
            pins["flows"][name] = found[0]
            child = await catalog.load_flow_plan(conn, found[0])
            await resolve_pins(conn, namespace, child, pins, (*seen, name))
    return pins


async def submit_flow_run(conn: psycopg.AsyncConnection, namespace: str, name: str,
                          run_input: dict[str, Any], priority: int | None = None,
                          submitted_by: str | None = None,
                          labels: dict[str, str] | None = None) -> FlowRun:
    """Create and start (or queue, past the flow's concurrency) a run; commit to make it stick."""
    found = await flow_store.get(conn, namespace, name)
    if found is None:
        raise FlowError(404, f"Flow {namespace}/{name} not found: apply its manifest "
                             f"(gristmill dev loads it from the paths you give it)")
    plan = await catalog.load_flow_plan(conn, found[0])
    try:
        check_input(plan.spec.input, run_input)
    except InputError as exc:
        raise FlowError(400, f"input does not match Flow {namespace}/{name}: {exc}") from None
    pins = await resolve_pins(conn, namespace, plan, seen=(name,))
    status = "running"
    if plan.spec.concurrency is not None:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                           [f"flow:{namespace}/{name}"])
        if await flow_store.running_count(conn, namespace, name) >= plan.spec.concurrency:
            status = "queued"
    run = _new_run(namespace, name, found[0], run_input,
                   plan.spec.priority if priority is None else priority, pins, status,
                   submitted_by=submitted_by, labels=labels)
    await flow_store.insert_run(conn, run)
    if status == "running":
        engine = RunEngine(conn, run, plan)
        await engine.start()
        await _flush(engine)
    return run


async def _flush(engine: RunEngine) -> None:
    ended = await engine.flush()
    if ended:
        await on_jobs_ended(engine.conn, ended)


async def on_jobs_ended(conn: psycopg.AsyncConnection, ended: list[queue.EndedJob]) -> None:
    """Advance the flow runs whose jobs ended (the worker calls this in its finish commit)."""
    by_run: dict[uuid.UUID, list[queue.EndedJob]] = {}
    for job in ended:
        if job.flow_run_id is not None and job.status != "requeued":
            by_run.setdefault(job.flow_run_id, []).append(job)
    for run_id in sorted(by_run):  # a fixed lock order
        engine = await _engine_for(conn, run_id)
        if engine is None:
            continue
        for job in by_run[run_id]:
            if engine.run.status != "running":
                break
            await _job_ended(engine, job)
            await engine.effects.make_moves()  # the next job sees what this one changed
        await _flush(engine)


async def _job_ended(engine: RunEngine, job: queue.EndedJob) -> None:
    if job.kind == "timer" and job.input.get("timer") == "flow_timeout":
        timeout = engine.plan.spec.timeout
        await engine.flow_failed(_error("timeout", f"the flow run timed out after {timeout}"))
        return
    if job.step_path is None:
        return
    step_id, indices = parse_path(job.step_path)
    row = (await flow_store.get_steps(engine.conn, engine.run.id, [job.step_path])
           ).get(job.step_path)
    if row is None or row.status not in ACTIVE:
        return  # stale: the step already moved on
    if job.kind == "timer":
        if job.status != "succeeded" or row.state.get("timer") != str(job.id):
            return
        if job.input["timer"] == "sleep" and row.status == "sleeping":
            try:
                await engine.begin_action(step_id, indices)
            except StepFailure as failure:
                await engine.step_failed(step_id, indices, failure.error)
        elif job.input["timer"] == "suspend" and row.status == "suspended":
            timeout = engine.plan.steps[step_id].step.suspend.timeout
            await engine.step_failed(step_id, indices, _error(
                "suspend_timeout", f"step {step_id} was not approved within {timeout}", step_id))
        return
    if row.job_id != job.id:
        return
    if job.status == "succeeded":
        await engine.after_step(step_id, indices, job.result)
    else:
        error = job.error or _error(job.status, f"the job {job.status}")
        await engine.step_failed(step_id, indices, {**error, "step": step_id,
                                                    "attempts": job.attempts})


async def fail_stuck_runs(conn: psycopg.AsyncConnection, ended: list[queue.EndedJob],
                          error: dict[str, Any]) -> None:
    """The last resort when advancing a run raises even for a plain failure (a bug, or a
    version this release cannot read): the run and the runs above it fail with `error`
    and their other jobs are cancelled, without the engine, so nothing waits forever."""
    pending = sorted({job.flow_run_id for job in ended if job.flow_run_id is not None})
    while pending:
        run = await flow_store.get_run(conn, pending.pop(), lock=True)
        if run is None or run.status not in ("queued", "running"):
            continue
        await flow_store.mark_finished(conn, run.id, "failed", None, error)
        jobs = [job_id for job_id, _ in await queue.active_jobs_of_flow_run(conn, run.id)]
        if jobs:
            await queue.cancel(conn, jobs, "the flow run failed")
        if run.parent_run_id is not None:
            pending.append(run.parent_run_id)


async def cancel_run(conn: psycopg.AsyncConnection, run_id: uuid.UUID, reason: str,
                     engine: RunEngine | None = None) -> str:
    """Cancel a run and its sub-flows: running steps are cancelled, nothing new starts."""
    target = await _engine_for(conn, run_id, shared=engine)
    if target is None:
        raise FlowError(404, f"flow run {run_id} not found")
    if target.run.status not in ("queued", "running"):
        raise FlowError(409, f"flow run {run_id} already ended ({target.run.status}); "
                             f"nothing to cancel")
    await target.finish("cancelled", error=_error("cancelled", reason))
    if engine is None:
        await _flush(target)
    return "cancelled"


def _check_decider(run: FlowRun, step_id: str, suspend: Suspend, who: str,
                   groups: Sequence[str]) -> None:
    """The step's own rule on who decides (on top of RBAC, which the API checked)."""
    if suspend.forbidSubmitter and run.submitted_by is not None and who == run.submitted_by:
        raise FlowError(403, f"{who} started flow run {run.id}, and step {step_id} may not be "
                             f"decided by the run's submitter (suspend.forbidSubmitter): "
                             f"ask someone else to approve or reject it")
    rule = suspend.approvers
    if rule is not None and who not in rule.users and not set(groups) & set(rule.groups):
        allowed = ([f"users {', '.join(rule.users)}"] if rule.users else []) + (
            [f"members of {', '.join(rule.groups)}"] if rule.groups else [])
        raise FlowError(403, f"step {step_id} of flow run {run.id} may be decided only by "
                             f"{' or '.join(allowed)} (suspend.approvers); you are {who}"
                             f"{' in ' + ', '.join(groups) if groups else ' in no group'}")


async def decide(conn: psycopg.AsyncConnection, run_id: uuid.UUID, approve: bool, who: str,
                 path: str | None = None, groups: Sequence[str] = ()) -> str:
    """Approve or reject a suspended step as `who` (in `groups`); returns the step path.
    The decision and who made it are kept in the step's state."""
    engine = await _engine_for(conn, run_id)
    if engine is None:
        raise FlowError(404, f"flow run {run_id} not found")
    cur = await conn.execute(
        "SELECT path FROM flow_steps WHERE run_id = %s AND status = 'suspended' ORDER BY path",
        [run_id])
    suspended = [row[0] for row in await cur.fetchall()]
    if path is None:
        if len(suspended) != 1:
            raise FlowError(409, f"flow run {run_id} has {len(suspended)} suspended steps"
                                 + (f" ({', '.join(suspended)}): name one with --step"
                                    if suspended else ": nothing waits for approval"))
        path = suspended[0]
    elif path not in suspended:
        raise FlowError(409, f"step {path} of flow run {run_id} is not waiting for approval "
                             f"(waiting: {', '.join(suspended) or 'none'})")
    step_id, indices = parse_path(path)
    _check_decider(engine.run, step_id, engine.plan.steps[step_id].step.suspend, who, groups)
    row = (await flow_store.get_steps(conn, run_id, [path]))[path]
    engine.effects.cancel_jobs.append(uuid.UUID(row.state["timer"]))
    decision = {"by": who, "groups": list(groups), "at": dt.datetime.now(dt.UTC).isoformat()}
    if approve:
        await engine.after_step(step_id, indices, row.result, approval=decision)
    else:
        await engine.step_failed(step_id, indices, _error(
            "rejected", f"step {step_id} was rejected by {who}", step_id, by=who,
            groups=list(groups), at=decision["at"]))
    await _flush(engine)
    return path


async def restart_run(conn: psycopg.AsyncConnection, run_id: uuid.UUID, from_step: str,
                      restarted_by: str | None = None) -> FlowRun:
    """A new run of the same Flow version and input that reuses the results of the steps
    before `from_step` (a top-level step) and runs from there. Whoever restarts it is
    the new run's submitter.

    Scripts are resolved anew, so a Script fixed since the failure runs fixed: the usual
    reason to restart from the failed step.
    """
    old = await flow_store.get_run(conn, run_id)
    if old is None:
        raise FlowError(404, f"flow run {run_id} not found")
    if old.status in ("queued", "running"):
        raise FlowError(409, f"flow run {run_id} is still {old.status}; cancel it first")
    plan = await catalog.load_flow_plan(conn, old.flow_hash)
    top = plan.top_level()
    if from_step not in top:
        raise FlowError(400, f"cannot restart from {from_step!r}: name a top-level step "
                             f"({', '.join(top)})")
    earlier = top[: top.index(from_step)]
    rows = await flow_store.get_steps(conn, run_id, earlier)
    unfinished = [s for s in earlier if rows.get(s) is None
                  or rows[s].status not in ("succeeded", "skipped")
                  and not (rows[s].status == "failed" and plan.steps[s].step.continueOnError)]
    if unfinished:
        raise FlowError(409, f"cannot restart from {from_step!r}: earlier step(s) "
                             f"{', '.join(unfinished)} did not succeed in run {run_id}")
    pins = await resolve_pins(conn, old.namespace, plan, seen=(old.flow_name,))
    run = _new_run(old.namespace, old.flow_name, old.flow_hash, old.input, old.priority,
                   pins, "running", restarted_from=old.id, submitted_by=restarted_by,
                   labels=old.labels)
    await flow_store.insert_run(conn, run)
    await flow_store.copy_steps(conn, run.id, old.id, earlier)
    engine = RunEngine(conn, run, plan)
    await engine.start(from_step)
    await _flush(engine)
    return run

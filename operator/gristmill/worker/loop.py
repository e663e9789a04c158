"""The worker: claim jobs in batches, run them sandboxed, ship logs, finish in batches.

One process holds a pool of three connections (claims, finishes, heartbeats and
logs) and one that LISTENs (wake-ups and cancellations), whatever its
concurrency. Claims and completions are batched, so a burst of short jobs costs
a few transactions per hundred jobs, not two per job.

Nothing a job returns and nothing the database does stops it for good:
- every loop retries transient database errors with a backoff, and the pool and
  the LISTEN connection reconnect on their own after a restart;
- a result the database cannot hold fails that one job, and a batch of
  outcomes that fails is finished one outcome at a time, so one bad outcome
  never holds up the others;
- the loops are supervised: one that dies for another reason (a bug) stops the
  worker loudly, handing its jobs back, and the process exits non-zero for its
  supervisor (Kubernetes, `gristmill dev`) to restart; a loop that stalls
  fails the liveness probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gristmill import values
from gristmill.flows import engine as flow_engine
from gristmill.jobsecrets.masking import masked_outcome
from gristmill.jobsecrets.resolve import SecretProblem, SecretReader
from gristmill.sandbox.base import Executor, JobOutcome, failure
from gristmill.store import connections, logs, queue, workers
from gristmill.store import scripts as script_store
from gristmill.worker.jobs import JobPlan, plan_job
from gristmill.worker.liveness import Liveness, serve_probe
from gristmill.worker.retry import retry_delay as compute_retry_delay
from gristmill.worker.secret_env import with_secrets

log = logging.getLogger("gristmill.worker")

# How long finished outcomes wait for company before they are written together.
FINISH_COALESCE_S = 0.002
MIN_CLAIM_GAP_S = 0.05  # a due job another worker holds locked: do not spin on it
LOG_FLUSH_INTERVAL_S = 0.2
# On the way out: how long cancelled jobs may take to stop, and how long to keep trying
# the last writes (hand back, outcomes, logs) while the database is away.
STOP_JOBS_S = 5.0
LAST_WRITES_S = 5.0
MAX_ERROR_TEXT = 4000
MAX_TRACEBACK_TEXT = 64 * 1024
MAX_ERROR_JSON = 128 * 1024

T = TypeVar("T")


class WorkerCrashed(RuntimeError):
    """A loop of the worker died of an error it cannot heal; the process should exit
    non-zero so that its supervisor starts a fresh one."""


@dataclass
class WorkerConfig:
    database_url: str
    tags: list[str]  # ["*"] serves every tag
    concurrency: int = 4
    lease: dt.timedelta = dt.timedelta(seconds=30)
    poll_interval: float = 30.0  # the longest an idle worker goes without a claim
    grace_period: float = 30.0
    stall_after: float = 60.0  # liveness: a loop without success this long is stalled
    health_port: int | None = None  # serve GET /healthz here
    health_host: str = "0.0.0.0"
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )


@dataclass
class _Running:
    job: queue.ClaimedJob
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    handing_back: bool = False
    task: asyncio.Task | None = None


def _job_env(job: queue.ClaimedJob) -> dict[str, str]:
    """What a job may know about itself (as Windmill's WM_JOB_ID and friends)."""
    env = {"GRISTMILL_JOB_ID": str(job.id), "GRISTMILL_ATTEMPT": str(job.attempt),
           "GRISTMILL_NAMESPACE": job.namespace}
    if job.flow_run_id:
        env["GRISTMILL_FLOW_RUN_ID"] = str(job.flow_run_id)
        env["GRISTMILL_STEP"] = job.step_path or ""
    return env


def storable_outcome(outcome: JobOutcome) -> JobOutcome:
    """The outcome, unless the database cannot hold it: a result it cannot store makes the
    job fail saying why; an error is cleaned (errors are shown, never computed on)."""
    if outcome.ok:
        try:
            values.check_json(outcome.result, "result")
        except values.ValueProblem as problem:
            return failure("result", f"the job returned a value that cannot be stored: "
                                     f"{problem.message}")
        return outcome
    return JobOutcome(ok=False, error=storable_error(outcome.error))


def storable_error(error: Any) -> dict[str, Any]:
    """An error as stored and shown: JSON the database holds, of a bounded size."""
    if not isinstance(error, dict):
        error = {"kind": "unknown", "message": str(error) if error else "the job failed"}
    try:
        values.check_json(error, "error")
        if len(values.dumps(error)) <= MAX_ERROR_JSON:
            return error
    except values.ValueProblem:
        pass
    kept: dict[str, Any] = {
        "kind": values.clean_text(str(error.get("kind", "unknown")))[:40],
        "message": values.clean_text(str(error.get("message", "the job failed")))[:MAX_ERROR_TEXT],
    }
    if "traceback" in error:
        kept["traceback"] = values.clean_text(str(error["traceback"]))[:MAX_TRACEBACK_TEXT]
    return kept


async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Until one of `events` is set (or the timeout passes)."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Worker:
    def __init__(self, config: WorkerConfig, executor: Executor,
                 secrets: SecretReader | None = None):
        self.config = config
        self.executor = executor
        self.secrets = secrets  # where the process executor's jobs' Secrets are read
        self.id = config.worker_id
        self.liveness = Liveness(config.stall_after)
        self._running: dict[uuid.UUID, _Running] = {}
        self._plans: dict[str, JobPlan] = {}  # by script version
        self._unrunnable: dict[str, str] = {}  # script version -> why it cannot be planned
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._outcomes: list[queue.Outcome] = []
        self._outcomes_ready = asyncio.Event()
        self._log_buffer: dict[uuid.UUID, list[str]] = defaultdict(list)
        self._log_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._heartbeating_since: float | None = None
        self.jobs_finished = 0

    # ---- lifecycle ---------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain within the grace period.

        Raises WorkerCrashed, after handing back what it can, when a loop died.
        """
        self._pool = connections.pool(self.config.database_url, size=3, name=f"worker-{self.id}")
        await self._pool.open()  # without waiting: the database may not be up yet
        probe = None
        try:
            if self.config.health_port is not None:
                probe = await serve_probe(self.liveness, self.config.health_host,
                                          self.config.health_port)
            if await self._register(stop):
                await self._serve(stop)
        finally:
            if probe is not None:
                await probe.cleanup()
            await self._pool.close()

    async def _register(self, stop: asyncio.Event) -> bool:
        """Record this worker, waiting for the database if it is away; False if told to
        stop first."""
        backoff = connections.Backoff(cap=10)
        while not stop.is_set():
            try:
                await self._db(lambda conn: workers.register(
                    conn, self.id, self.config.tags, self.config.concurrency))
                return True
            except connections.TRANSIENT_ERRORS as exc:
                log.warning("cannot register with the database yet (%s); retrying", exc)
                await _wait_any(stop, timeout=backoff.next_delay())
        return False

    async def _serve(self, stop: asyncio.Event) -> None:
        log.info("worker %s serving tags %s with concurrency %d",
                 self.id, ",".join(self.config.tags), self.config.concurrency)
        loops = {
            "listen": self._listen(),
            "heartbeat": self._heartbeat(),
            "finish": self._finish_loop(),
            "logs": self._log_loop(),
            "claim": self._claim_loop(),
        }
        tasks = {asyncio.create_task(coro, name=f"worker-{name}"): name
                 for name, coro in loops.items()}
        told_to_stop = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([told_to_stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        told_to_stop.cancel()
        died = [task for task in done if task in tasks]
        for task in died:
            error = None if task.cancelled() else task.exception()
            log.critical("worker loop %r died (%s); stopping this worker so that it is "
                         "restarted", tasks[task], error or "it returned", exc_info=error)
        self._stopping.set()
        self._wakeup.set()
        claim = next(task for task, name in tasks.items() if name == "claim")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(claim), STOP_JOBS_S)
        # A worker that crashed gives its jobs back at once; one told to stop lets them finish.
        await self._drain(grace_period=0 if died else self.config.grace_period)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._last_writes()
        if died:
            raise WorkerCrashed(f"worker loop {tasks[died[0]]!r} died: {died[0].exception()}")
        log.info("worker %s stopped after %d jobs", self.id, self.jobs_finished)

    async def _drain(self, grace_period: float) -> None:
        """Let running jobs finish within the grace period; hand back the rest."""
        pending = [r.task for r in self._running.values() if r.task]
        if pending and grace_period > 0:
            log.info("waiting up to %gs for %d running jobs", grace_period, len(pending))
            await asyncio.wait(pending, timeout=grace_period)
        leftovers = [r for r in self._running.values() if r.task and not r.task.done()]
        for running in leftovers:
            running.handing_back = True
            running.cancel.set()
        if not leftovers:
            return
        stopping = [r.task for r in leftovers]
        _, stuck = await asyncio.wait(stopping, timeout=STOP_JOBS_S)
        for task in stuck:  # an executor that ignores its cancel event
            task.cancel()
        ids = [r.job.id for r in leftovers]
        await self._last_write("the logs of the jobs handed back", self._flush_logs)
        returned = await self._last_write(
            "the hand-back", lambda: self._db(lambda conn: queue.hand_back(conn, self.id, ids)))
        if returned is not None:
            log.warning("handed back %d unfinished jobs to the queue", len(returned))
        for job_id in ids:
            self._running.pop(job_id, None)

    async def _last_writes(self) -> None:
        """Outcomes and logs still buffered, then deregistration, while the database lets us."""
        await self._last_write("the last outcomes", self._flush_all_outcomes)
        await self._last_write("the last logs", self._flush_logs)
        await self._last_write("deregistration",
                               lambda: self._db(lambda conn: workers.deregister(conn, self.id)))

    async def _flush_all_outcomes(self) -> None:
        while self._outcomes:
            await self._flush_outcomes()

    async def _last_write(self, what: str, write: Callable[[], Awaitable[T]]) -> T | None:
        """One of the writes on the way out, retried for LAST_WRITES_S while the database is
        away; a failure is logged, never raised: the way out must go on."""
        deadline = time.monotonic() + LAST_WRITES_S
        backoff = connections.Backoff()
        while True:
            try:
                return await write()
            except connections.TRANSIENT_ERRORS as exc:
                if time.monotonic() < deadline:
                    await asyncio.sleep(backoff.next_delay())
                    continue
                log.error("gave up on %s: the database stayed away (%s); running jobs return "
                          "to the queue when this worker's lease runs out", what, exc)
            except Exception:
                log.exception("%s failed", what)
            return None

    # ---- the database ----------------------------------------------------------

    async def _db(self, work: Callable[[Any], Awaitable[T]]) -> T:
        async with self._pool.connection() as conn:
            return await work(conn)

    # ---- claiming ------------------------------------------------------------

    async def _claim_loop(self) -> None:
        backoff = connections.Backoff()
        while not self._stopping.is_set():
            free = self.config.concurrency - len(self._running)
            if free <= 0:
                self.liveness.claiming = False
                self._slot_freed.clear()
                await _wait_any(self._slot_freed, self._stopping)
                continue
            self.liveness.claiming = True
            self._wakeup.clear()
            try:
                claimed, due_in = await self._claim(free)
            except connections.TRANSIENT_ERRORS as exc:
                self.liveness.failed("claim", exc)
                log.error("claim failed, retrying: %s", exc)
                await _wait_any(self._stopping, timeout=backoff.next_delay())
                continue
            backoff.reset()
            self.liveness.ok("claim")
            for job in claimed:
                self._start(job)
            if len(claimed) < free:
                # Nothing more is due: sleep until the next queued job is (a delayed run,
                # a retry, a timer) or a wake-up comes, polling only as a last resort.
                wait = self.config.poll_interval if due_in is None else min(
                    self.config.poll_interval, max(due_in, MIN_CLAIM_GAP_S))
                await _wait_any(self._wakeup, self._stopping, timeout=wait)

    async def _claim(self, limit: int) -> tuple[list[queue.ClaimedJob], float | None]:
        """Jobs claimed and, when fewer than `limit`, the seconds until the next is due."""
        # Every worker also completes the flow engine's timers.
        tags = [*self.config.tags, flow_engine.CONTROL_TAG]
        due_in = None
        async with self._pool.connection() as conn:
            async with conn.transaction():
                claimed = await queue.claim(conn, self.id, tags, limit)
            if len(claimed) < limit:
                due_in = await queue.next_due(conn, tags)
            missing = {j.script_hash for j in claimed if j.script_hash
                       and j.script_hash not in self._plans and j.script_hash not in self._unrunnable}
            if missing:
                specs = await script_store.get_versions(conn, sorted(missing))
                for version in missing:
                    self._plan(version, specs.get(version))
        return claimed, due_in

    def _plan(self, version: str, stored_spec: dict[str, Any] | None) -> None:
        if stored_spec is None:
            self._unrunnable[version] = f"Script version {version[:12]} is not in the database"
            return
        try:
            self._plans[version] = plan_job(version, stored_spec)
        except Exception as exc:  # a version stored by another release of Gristmill, say
            log.exception("Script version %s cannot be run", version)
            self._unrunnable[version] = (f"Script version {version[:12]} cannot be run by this "
                                         f"worker ({values.clean_text(str(exc))[:500]}); apply "
                                         f"the Script again")

    def _start(self, job: queue.ClaimedJob) -> None:
        running = _Running(job)
        self._running[job.id] = running
        if job.kind in ("noop", "timer"):
            # No code to run: a due timer, or the queue's own cost (benchmarks).
            self._report(running, JobOutcome(ok=True, result=job.input))
            return
        if job.input_problem:
            self._report(running, failure("input", f"the job's input cannot be read: "
                                                   f"{job.input_problem}"))
            return
        if job.script_hash in self._unrunnable or job.script_hash not in self._plans:
            reason = self._unrunnable.get(job.script_hash, "the job names no Script version")
            self._report(running, failure("setup", reason))
            return
        running.task = asyncio.create_task(self._execute(running), name=f"job-{job.id}")

    # ---- executing -------------------------------------------------------------

    async def _execute(self, running: _Running) -> None:
        job = running.job
        try:
            plan = self._plans[job.script_hash]
            request = plan.request(job.id, job.input, timeout_s=job.timeout_s,
                                   job_env=_job_env(job))
            self._log(job.id, f"[gristmill] attempt {job.attempt}/{job.max_attempts} on {self.id}\n")
            request, masker = await with_secrets(request, job.namespace, self.executor,
                                                 self.secrets)
            output = masker.stream(lambda text: self._log(job.id, text))
            outcome = await self.executor.run(request, output.feed, running.cancel)
            output.flush()
            outcome = masked_outcome(masker, outcome)
        except SecretProblem as exc:
            outcome = failure("setup", str(exc))
        except Exception as exc:  # a bug or an environment problem, never the job's fault
            log.exception("job %s could not be run", job.id)
            outcome = failure("setup", f"{exc}")
        if running.handing_back:
            return
        self._report(running, outcome)

    def _report(self, running: _Running, outcome: JobOutcome) -> None:
        job = running.job
        outcome = storable_outcome(outcome)
        if outcome.ok:
            result = queue.Outcome(job.id, job.attempt, "succeeded", result=outcome.result)
        else:
            error = outcome.error
            cancelled = error.get("kind") == "cancelled"
            retry_delay = None
            if not cancelled and job.attempt < job.max_attempts:
                retry_delay = self._retry_delay(job)
                self._log(job.id, f"[gristmill] attempt {job.attempt} failed "
                                  f"({error.get('message')}); retrying in {retry_delay:.1f}s\n")
            result = queue.Outcome(job.id, job.attempt, "cancelled" if cancelled else "failed",
                                   error=error, retry_delay=retry_delay)
        if not self._outcomes:
            self.liveness.oldest_unfinished = time.monotonic()
        self._outcomes.append(result)
        self._outcomes_ready.set()

    def _retry_delay(self, job: queue.ClaimedJob) -> float:
        if job.retry_policy:
            return compute_retry_delay(job.retry_policy, job.attempt)
        plan = self._plans.get(job.script_hash)
        return plan.retry_delay(job.attempt) if plan else 1.0

    # ---- finishing ---------------------------------------------------------------

    async def _finish_loop(self) -> None:
        backoff = connections.Backoff()
        while True:
            await self._outcomes_ready.wait()
            await asyncio.sleep(FINISH_COALESCE_S)
            try:
                await self._flush_outcomes()
                backoff.reset()
            except connections.TRANSIENT_ERRORS as exc:
                log.error("finishing jobs failed, retrying: %s", exc)
                await asyncio.sleep(backoff.next_delay())

    async def _flush_outcomes(self) -> None:
        self._outcomes_ready.clear()
        batch, self._outcomes = self._outcomes, []
        if not batch:
            return
        try:
            # A job's logs are stored before it is seen finished, so a follower gets them all.
            if any(o.job_id in self._log_buffer for o in batch):
                await self._flush_logs()
            ended = await self._finish(batch)
        except BaseException:
            self._outcomes[:0] = batch
            self._outcomes_ready.set()
            raise
        self.liveness.oldest_unfinished = time.monotonic() if self._outcomes else None
        if any(job.status == "requeued" for job in ended):
            self._wakeup.set()  # a retry: learn when it is due
        applied = {job.id for job in ended}
        for outcome in batch:
            self._running.pop(outcome.job_id, None)
            if outcome.job_id not in applied:
                log.warning("job %s was no longer ours when it finished (reaped?)",
                            outcome.job_id)
        self.jobs_finished += len(batch)
        self._slot_freed.set()

    async def _finish_together(self, batch: list[queue.Outcome]) -> list[queue.EndedJob]:
        """Record outcomes and advance their flows, in one commit."""
        async with self._pool.connection() as conn, conn.transaction():
            ended = await queue.finish(conn, self.id, batch)
            await flow_engine.on_jobs_ended(conn, ended)
        return ended

    async def _finish(self, batch: list[queue.Outcome]) -> list[queue.EndedJob]:
        """Finish a batch; when the batch fails for a reason other than the database being
        away, finish each outcome alone so one bad outcome holds up no other."""
        try:
            return await self._finish_together(batch)
        except connections.TRANSIENT_ERRORS:
            raise
        except Exception:
            if len(batch) > 1:
                log.exception("finishing %d jobs together failed; finishing them one by one",
                              len(batch))
        ended: list[queue.EndedJob] = []
        for outcome in batch:
            ended += await self._finish_alone(outcome)
        return ended

    async def _finish_alone(self, outcome: queue.Outcome) -> list[queue.EndedJob]:
        try:
            return await self._finish_together([outcome])
        except connections.TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            log.exception("job %s: its outcome could not be recorded; failing the job",
                          outcome.job_id)
            reason = values.clean_text(f"{type(exc).__name__}: {exc}")[:MAX_ERROR_TEXT]
        failed = queue.Outcome(outcome.job_id, outcome.attempt, "failed", error={
            "kind": "internal",
            "message": f"Gristmill could not record this job's outcome ({reason}); the job "
                       f"failed instead. Please report this with the worker's log."})
        try:
            return await self._finish_together([failed])
        except connections.TRANSIENT_ERRORS:
            raise
        except Exception:
            # Not even a plain failure can be recorded: advancing its flow run fails.
            log.exception("job %s: its flow run cannot advance; failing the run",
                          outcome.job_id)
        async with self._pool.connection() as conn, conn.transaction():
            ended = await queue.finish(conn, self.id, [failed])
            await flow_engine.fail_stuck_runs(conn, ended, failed.error)
        return ended

    # ---- logs ------------------------------------------------------------------

    def _log(self, job_id: uuid.UUID, text: str) -> None:
        self._log_buffer[job_id].append(values.clean_text(text))

    async def _log_loop(self) -> None:
        backoff = connections.Backoff()
        while True:
            await asyncio.sleep(LOG_FLUSH_INTERVAL_S)
            try:
                await self._flush_logs()
                backoff.reset()
            except connections.TRANSIENT_ERRORS as exc:
                log.error("shipping logs failed, retrying: %s", exc)
                await asyncio.sleep(backoff.next_delay())

    async def _flush_logs(self) -> None:
        async with self._log_lock:
            if not self._log_buffer:
                return
            buffered, self._log_buffer = self._log_buffer, defaultdict(list)
            try:
                await self._db(lambda conn: logs.append(
                    conn, [(job_id, "".join(parts)) for job_id, parts in buffered.items()]))
            except BaseException:
                for job_id, parts in buffered.items():  # kept, in order, for the next try
                    self._log_buffer[job_id][:0] = parts
                raise

    # ---- heartbeats, cancellation, reaping ------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.config.lease.total_seconds() / 3
        while True:
            try:
                await self._beat()
            except connections.TRANSIENT_ERRORS as exc:
                self._heartbeating_since = None
                self.liveness.failed("heartbeat", exc)
                log.error("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    async def _beat(self) -> None:
        async with self._pool.connection() as conn:
            beat = await workers.heartbeat(conn, self.id)
            if not beat.registered:
                # Forgotten while away (a long outage): register again; jobs that were
                # reaped meanwhile are no longer ours, and their outcomes will not count.
                log.warning("worker %s was no longer registered; registering again", self.id)
                await workers.register(conn, self.id, self.config.tags, self.config.concurrency)
            for job_id in beat.cancel:
                self._cancel(job_id)
            now = time.monotonic()
            if self._heartbeating_since is None:
                self._heartbeating_since = now
            # Judge other workers dead only after beating for a whole lease ourselves: after
            # an outage, every live worker's last beat is old until it reconnects too.
            if now - self._heartbeating_since >= self.config.lease.total_seconds():
                async with conn.transaction():
                    reaped = await queue.reap(conn, self.config.lease)
                    await flow_engine.on_jobs_ended(conn, reaped)
                if reaped:
                    log.warning("reaped jobs of lost workers: %s", [job.id for job in reaped])
        self.liveness.ok("heartbeat")

    def _cancel(self, job_id: uuid.UUID) -> None:
        running = self._running.get(job_id)
        if running and not running.cancel.is_set():
            self._log(job_id, "[gristmill] cancel requested\n")
            running.cancel.set()

    async def _listen(self) -> None:
        """Wake-ups and cancellations, over one connection that reconnects when it breaks."""
        tags = {*self.config.tags, flow_engine.CONTROL_TAG}
        backoff = connections.Backoff(cap=10)
        while True:
            try:
                async with await connections.connect(self.config.database_url) as conn:
                    await queue.listen(conn)
                    backoff.reset()
                    self.liveness.listening(True)
                    self._wakeup.set()  # what was queued while we were away
                    async for note in conn.notifies():
                        if note.channel == queue.CANCEL_CHANNEL:
                            with contextlib.suppress(ValueError):
                                self._cancel(uuid.UUID(note.payload))
                        elif note.payload == "*" or "*" in tags or note.payload in tags:
                            self._wakeup.set()
            except connections.TRANSIENT_ERRORS as exc:
                self.liveness.listening(False)
                self.liveness.failed("listen", exc)
                delay = backoff.next_delay()
                log.error("LISTEN connection lost (%s); reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)

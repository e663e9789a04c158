"""The worker: claim jobs in batches, run them sandboxed, ship logs, finish in batches.

Its jobs come through a link (worker/links.py): the API's dispatcher over one WebSocket
(what WorkerGroup pods do: no database credentials) or the database itself (`gristmill
dev`, benchmarks). Claims and completions are batched, so a burst of short jobs costs a
few round trips per hundred jobs, not two per job. Jobs that run no code (flow timers,
no-op jobs) take no slot: `concurrency` counts sandboxed processes (or job pods).

Nothing a job returns and nothing the database does stops it for good:
- every loop retries when the database or the API is away (LINK_ERRORS) with a
  backoff, and the link reconnects on its own after a restart;
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
from gristmill.jobsecrets.masking import masked_outcome
from gristmill.jobsecrets.resolve import SecretProblem, SecretReader
from gristmill.sandbox.base import Executor, JobOutcome, failure
from gristmill.store import connections, queue
from gristmill.worker.jobs import JobPlan, plan_job
from gristmill.worker.links import LINK_ERRORS, DirectLink, Identity, QueueLink, wait_any
from gristmill.worker.liveness import Liveness, serve_probe
from gristmill.worker.outcomes import storable_outcome
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
# Jobs that run no code, held at once beside the slots (they wait only for their finish).
MAX_CHEAP_JOBS = 256
CHEAP_KINDS = ("noop", "timer")

T = TypeVar("T")


class WorkerCrashed(RuntimeError):
    """A loop of the worker died of an error it cannot heal; the process should exit
    non-zero so that its supervisor starts a fresh one."""


@dataclass
class WorkerConfig:
    database_url: str | None  # a worker on the database; or:
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
    server: str | None = None  # a worker of the API's dispatcher (with `token`)
    token: str | None = None


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
        self._slot_freed = asyncio.Event()
        self._outcomes: list[queue.Outcome] = []
        self._outcomes_ready = asyncio.Event()
        self._log_buffer: dict[uuid.UUID, list[str]] = defaultdict(list)
        self._log_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.jobs_finished = 0
        self.link = self._make_link()

    def _make_link(self) -> QueueLink:
        config = self.config
        identity = Identity(config.worker_id, config.tags, config.concurrency)
        if config.server:
            from gristmill.worker.dispatch_link import DispatcherLink
            return DispatcherLink(identity, config.server, config.token or "", self.liveness,
                                  self._cancel, running=lambda: list(self._running))
        if not config.database_url:
            raise ValueError("a worker needs a database URL or a dispatcher (--server)")
        return DirectLink(identity, config.database_url, config.lease, config.poll_interval,
                          self.liveness, self._cancel)

    # ---- lifecycle ---------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain within the grace period.

        Raises WorkerCrashed, after handing back what it can, when a loop died.
        """
        await self.link.open()
        # The link's own loops (LISTEN, or the connection to the API) run until the last
        # writes on the way out are done.
        link_tasks = {asyncio.create_task(coro, name=f"worker-{name}"): name
                      for name, coro in self.link.loops().items()}
        probe = None
        try:
            if self.config.health_port is not None:
                probe = await serve_probe(self.liveness, self.config.health_host,
                                          self.config.health_port)
            if await self._register(stop, list(link_tasks)):
                await self._serve(stop, link_tasks)
        finally:
            for task in link_tasks:
                task.cancel()
            await asyncio.gather(*link_tasks, return_exceptions=True)
            if probe is not None:
                await probe.cleanup()
            await self.link.close()

    async def _register(self, stop: asyncio.Event, connecting: list[asyncio.Task]) -> bool:
        """Record this worker, waiting for the database (or the API) if it is away; False
        if told to stop first."""
        backoff = connections.Backoff(cap=10)
        while not stop.is_set():
            try:
                await self.link.register()
                return True
            except LINK_ERRORS as exc:
                log.warning("cannot register yet (%s); retrying", exc)
                await wait_any(stop, timeout=backoff.next_delay())
            for task in connecting:
                if task.done():  # the link's own loop died: a bug, say so
                    task.result()
        return False

    async def _serve(self, stop: asyncio.Event, link_tasks: dict[asyncio.Task, str]) -> None:
        log.info("worker %s serving tags %s with concurrency %d",
                 self.link.worker_id, ",".join(self.config.tags), self.config.concurrency)
        loops = {
            "heartbeat": self._heartbeat(),
            "finish": self._finish_loop(),
            "logs": self._log_loop(),
            "claim": self._claim_loop(),
        }
        tasks = {asyncio.create_task(coro, name=f"worker-{name}"): name
                 for name, coro in loops.items()}
        told_to_stop = asyncio.ensure_future(stop.wait())
        supervised = {**tasks, **link_tasks}
        done, _ = await asyncio.wait([told_to_stop, *supervised],
                                     return_when=asyncio.FIRST_COMPLETED)
        told_to_stop.cancel()
        died = [task for task in done if task in supervised]
        for task in died:
            error = None if task.cancelled() else task.exception()
            log.critical("worker loop %r died (%s); stopping this worker so that it is "
                         "restarted", supervised[task], error or "it returned", exc_info=error)
        self._stopping.set()
        self.link.wake()
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
            reason = "it returned" if died[0].cancelled() else died[0].exception()
            raise WorkerCrashed(f"worker loop {supervised[died[0]]!r} died: {reason}")
        log.info("worker %s stopped after %d jobs", self.link.worker_id, self.jobs_finished)

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
            "the hand-back", lambda: self.link.hand_back(ids))
        if returned is not None:
            log.warning("handed back %d unfinished jobs to the queue", len(returned))
        for job_id in ids:
            self._running.pop(job_id, None)

    async def _last_writes(self) -> None:
        """Outcomes and logs still buffered, then deregistration, while the database lets us."""
        await self._last_write("the last outcomes", self._flush_all_outcomes)
        await self._last_write("the last logs", self._flush_logs)
        await self._last_write("deregistration", self.link.deregister)

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
            except LINK_ERRORS as exc:
                if time.monotonic() < deadline:
                    await asyncio.sleep(backoff.next_delay())
                    continue
                log.error("gave up on %s: the database (or the API) stayed away (%s); running "
                          "jobs return to the queue when this worker's lease runs out", what, exc)
            except Exception:
                log.exception("%s failed", what)
            return None

    # ---- claiming ------------------------------------------------------------

    def _free_slots(self) -> int:
        """How many jobs to claim: the slots no running process (or job pod) holds, within
        a bound on the jobs held at once (finished ones wait for their outcome's write)."""
        executing = sum(1 for r in self._running.values() if r.task and not r.task.done())
        held_bound = self.config.concurrency + MAX_CHEAP_JOBS - len(self._running)
        return min(self.config.concurrency - executing, held_bound)

    async def _claim_loop(self) -> None:
        backoff = connections.Backoff()
        while not self._stopping.is_set():
            free = self._free_slots()
            if free <= 0:
                self.liveness.claiming = False
                self._slot_freed.clear()
                await wait_any(self._slot_freed, self._stopping)
                continue
            self.liveness.claiming = True
            try:
                claimed, wait = await self.link.claim(free)
                await self._plan_versions(claimed)
            except LINK_ERRORS as exc:
                self.liveness.failed("claim", exc)
                log.error("claim failed, retrying: %s", exc)
                await wait_any(self._stopping, timeout=backoff.next_delay())
                continue
            backoff.reset()
            self.liveness.ok("claim")
            for job in claimed:
                self._start(job)
            if len(claimed) < free and wait:
                # Nothing more is due: sleep until the next queued job is (a delayed run,
                # a retry, a timer) or a wake-up comes, polling only as a last resort.
                await self.link.wait_for_work(max(wait, MIN_CLAIM_GAP_S), self._stopping)

    async def _plan_versions(self, claimed: list[queue.ClaimedJob]) -> None:
        """Plan the Script versions of `claimed` this worker has not seen yet."""
        missing = {j.script_hash for j in claimed if j.script_hash
                   and j.script_hash not in self._plans and j.script_hash not in self._unrunnable}
        if missing:
            specs = await self.link.script_specs(sorted(missing))
            for version in missing:
                self._plan(version, specs.get(version))

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
        if job.kind in CHEAP_KINDS:
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
        self._slot_freed.set()  # its process is gone: the slot is free before the write

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
            except LINK_ERRORS as exc:
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
            ended = await self.link.finish(batch)
        except BaseException:
            self._outcomes[:0] = batch
            self._outcomes_ready.set()
            raise
        self.liveness.oldest_unfinished = time.monotonic() if self._outcomes else None
        if any(job.status == "requeued" for job in ended):
            self.link.wake()  # a retry: learn when it is due
        applied = {job.id for job in ended}
        for outcome in batch:
            self._running.pop(outcome.job_id, None)
            if outcome.job_id not in applied:
                log.warning("job %s was no longer ours when it finished (reaped?)",
                            outcome.job_id)
        self.jobs_finished += len(batch)
        self._slot_freed.set()

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
            except LINK_ERRORS as exc:
                log.error("shipping logs failed, retrying: %s", exc)
                await asyncio.sleep(backoff.next_delay())

    async def _flush_logs(self) -> None:
        async with self._log_lock:
            if not self._log_buffer:
                return
            buffered, self._log_buffer = self._log_buffer, defaultdict(list)
            try:
                await self.link.append_logs(
                    [(job_id, "".join(parts)) for job_id, parts in buffered.items()])
            except BaseException:
                for job_id, parts in buffered.items():  # kept, in order, for the next try
                    self._log_buffer[job_id][:0] = parts
                raise

    # ---- heartbeats, cancellation, reaping ------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.config.lease.total_seconds() / 3
        while True:
            try:
                for job_id in await self.link.heartbeat():
                    self._cancel(job_id)
                self.liveness.ok("heartbeat")
            except LINK_ERRORS as exc:
                self.liveness.failed("heartbeat", exc)
                log.error("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    def _cancel(self, job_id: uuid.UUID) -> None:
        running = self._running.get(job_id)
        if running and not running.cancel.is_set():
            self._log(job_id, "[gristmill] cancel requested\n")
            running.cancel.set()

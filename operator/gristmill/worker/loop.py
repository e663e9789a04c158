"""The worker: claim jobs in batches, run them sandboxed, ship logs, finish in batches.

One process holds four connections: one that claims, one that finishes, one
for heartbeats and logs, and one that LISTENs (wake-ups and cancellations),
whatever its concurrency. Claims and completions are batched, so a burst of
short jobs costs a few transactions per hundred jobs, not two per job.
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
from dataclasses import dataclass, field

import psycopg

from gristmill.flows import engine as flow_engine
from gristmill.sandbox.base import Executor, JobOutcome
from gristmill.store import logs, maintenance, queue, workers
from gristmill.store import scripts as script_store
from gristmill.worker.jobs import JobPlan, plan_job
from gristmill.worker.retry import retry_delay as compute_retry_delay

log = logging.getLogger("gristmill.worker")

# How long finished outcomes wait for company before they are written together.
FINISH_COALESCE_S = 0.002
LOG_FLUSH_INTERVAL_S = 0.2
MAINTENANCE_INTERVAL_S = 3600


@dataclass
class WorkerConfig:
    database_url: str
    tags: list[str]  # ["*"] serves every tag
    concurrency: int = 4
    lease: dt.timedelta = dt.timedelta(seconds=30)
    poll_interval: float = 1.0
    grace_period: float = 30.0
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


class Worker:
    def __init__(self, config: WorkerConfig, executor: Executor):
        self.config = config
        self.executor = executor
        self.id = config.worker_id
        self._running: dict[uuid.UUID, _Running] = {}
        self._plans: dict[str, JobPlan] = {}  # by script version
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._outcomes: list[queue.Outcome] = []
        self._outcomes_ready = asyncio.Event()
        self._log_buffer: dict[uuid.UUID, list[str]] = defaultdict(list)
        self._log_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self.jobs_finished = 0

    # ---- lifecycle ---------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then drain within the grace period."""
        url = self.config.database_url
        connect = psycopg.AsyncConnection.connect
        async with (
            await connect(url, autocommit=True) as self._claim_conn,
            await connect(url, autocommit=True) as self._finish_conn,
            await connect(url, autocommit=True) as self._side_conn,
            await connect(url, autocommit=True) as self._listen_conn,
        ):
            await workers.register(self._side_conn, self.id, self.config.tags,
                                   self.config.concurrency)
            await self._listen_conn.execute(f"LISTEN {queue.JOBS_CHANNEL}")
            await self._listen_conn.execute(f"LISTEN {queue.CANCEL_CHANNEL}")
            log.info("worker %s serving tags %s with concurrency %d",
                     self.id, ",".join(self.config.tags), self.config.concurrency)
            background = [
                asyncio.create_task(self._listen(), name="listen"),
                asyncio.create_task(self._heartbeat(), name="heartbeat"),
                asyncio.create_task(self._finish_loop(), name="finish"),
                asyncio.create_task(self._log_loop(), name="logs"),
            ]
            claim_task = asyncio.create_task(self._claim_loop(), name="claim")
            await stop.wait()
            self._stopping.set()
            self._wakeup.set()
            await claim_task
            await self._drain()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._flush_logs()
            await self._flush_outcomes()
            await workers.deregister(self._side_conn, self.id)
            log.info("worker %s stopped after %d jobs", self.id, self.jobs_finished)

    async def _drain(self) -> None:
        """Let running jobs finish within the grace period; hand back the rest."""
        pending = [r.task for r in self._running.values() if r.task]
        if pending:
            log.info("waiting up to %gs for %d running jobs", self.config.grace_period,
                     len(pending))
            await asyncio.wait(pending, timeout=self.config.grace_period)
        leftovers = list(self._running.values())
        for running in leftovers:
            running.handing_back = True
            running.cancel.set()
        if leftovers:
            await asyncio.gather(*(r.task for r in leftovers if r.task), return_exceptions=True)
            await self._flush_logs()
            returned = await queue.hand_back(self._side_conn, self.id,
                                             [r.job.id for r in leftovers])
            log.warning("handed back %d unfinished jobs to the queue", len(returned))
        # Outcomes still buffered are written before the worker deregisters.
        while self._outcomes:
            await self._flush_outcomes()

    # ---- claiming ------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            free = self.config.concurrency - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._wakeup.clear()
            try:
                claimed = await self._claim(free)
            except psycopg.OperationalError as exc:
                log.error("claim failed, retrying: %s", exc)
                await asyncio.sleep(self.config.poll_interval)
                continue
            for job in claimed:
                self._start(job)
            if len(claimed) < free:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self.config.poll_interval)

    async def _claim(self, limit: int) -> list[queue.ClaimedJob]:
        # Every worker also completes the flow engine's timers.
        tags = [*self.config.tags, flow_engine.CONTROL_TAG]
        async with self._claim_conn.transaction():
            claimed = await queue.claim(self._claim_conn, self.id, tags, limit)
        missing = {j.script_hash for j in claimed if j.script_hash and j.script_hash not in self._plans}
        if missing:
            specs = await script_store.get_versions(self._claim_conn, sorted(missing))
            for version, spec in specs.items():
                self._plans[version] = plan_job(version, spec)
        return claimed

    def _start(self, job: queue.ClaimedJob) -> None:
        running = _Running(job)
        self._running[job.id] = running
        if job.kind in ("noop", "timer"):
            # No code to run: a due timer, or the queue's own cost (benchmarks).
            self._report(running, JobOutcome(ok=True, result=job.input))
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
            outcome = await self.executor.run(request, lambda text: self._log(job.id, text),
                                              running.cancel)
        except Exception as exc:  # a bug or an environment problem, never the job's fault
            log.exception("job %s could not be run", job.id)
            outcome = JobOutcome(ok=False, error={"kind": "setup", "message": f"{exc}"})
        if running.handing_back:
            return
        self._report(running, outcome)

    def _report(self, running: _Running, outcome: JobOutcome) -> None:
        job = running.job
        if outcome.ok:
            result = queue.Outcome(job.id, job.attempt, "succeeded", result=outcome.result)
        else:
            error = outcome.error or {"kind": "unknown", "message": "the job failed"}
            cancelled = error.get("kind") == "cancelled"
            retry_delay = None
            if not cancelled and job.attempt < job.max_attempts:
                retry_delay = (compute_retry_delay(job.retry_policy, job.attempt)
                               if job.retry_policy
                               else self._plans[job.script_hash].retry_delay(job.attempt))
                self._log(job.id, f"[gristmill] attempt {job.attempt} failed "
                                  f"({error.get('message')}); retrying in {retry_delay:.1f}s\n")
            result = queue.Outcome(job.id, job.attempt, "cancelled" if cancelled else "failed",
                                   error=error, retry_delay=retry_delay)
        self._outcomes.append(result)
        self._outcomes_ready.set()

    # ---- finishing ---------------------------------------------------------------

    async def _finish_loop(self) -> None:
        while True:
            await self._outcomes_ready.wait()
            await asyncio.sleep(FINISH_COALESCE_S)
            try:
                await self._flush_outcomes()
            except psycopg.OperationalError as exc:
                log.error("finishing jobs failed, retrying: %s", exc)
                await asyncio.sleep(self.config.poll_interval)

    async def _flush_outcomes(self) -> None:
        self._outcomes_ready.clear()
        batch, self._outcomes = self._outcomes, []
        if not batch:
            return
        try:
            # A job's logs are stored before it is seen finished, so a follower gets them all.
            if any(o.job_id in self._log_buffer for o in batch):
                await self._flush_logs()
            async with self._finish_conn.transaction():
                ended = await queue.finish(self._finish_conn, self.id, batch)
                # The flows these jobs belong to move on in the same commit.
                await flow_engine.on_jobs_ended(self._finish_conn, ended)
            applied = {job.id for job in ended}
        except BaseException:
            self._outcomes[:0] = batch
            self._outcomes_ready.set()
            raise
        for outcome in batch:
            self._running.pop(outcome.job_id, None)
            if outcome.job_id not in applied:
                log.warning("job %s was no longer ours when it finished (reaped?)",
                            outcome.job_id)
        self.jobs_finished += len(batch)
        self._slot_freed.set()

    # ---- logs ------------------------------------------------------------------

    def _log(self, job_id: uuid.UUID, text: str) -> None:
        self._log_buffer[job_id].append(text)

    async def _log_loop(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_INTERVAL_S)
            try:
                await self._flush_logs()
            except psycopg.OperationalError as exc:
                log.error("shipping logs failed, retrying: %s", exc)

    async def _flush_logs(self) -> None:
        async with self._log_lock:
            if not self._log_buffer:
                return
            buffered, self._log_buffer = self._log_buffer, defaultdict(list)
            await logs.append(self._side_conn,
                              [(job_id, "".join(parts)) for job_id, parts in buffered.items()])

    # ---- heartbeats, cancellation, reaping ------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.config.lease.total_seconds() / 3
        last_maintenance = 0.0
        while True:
            try:
                for job_id in await workers.heartbeat(self._side_conn, self.id):
                    self._cancel(job_id)
                async with self._side_conn.transaction():
                    reaped = await queue.reap(self._side_conn, self.config.lease)
                    await flow_engine.on_jobs_ended(self._side_conn, reaped)
                if reaped:
                    log.warning("reaped jobs of lost workers: %s", reaped)
                if time.monotonic() - last_maintenance > MAINTENANCE_INTERVAL_S:
                    await maintenance.ensure_partitions(self._side_conn)
                    await workers.forget_dead(self._side_conn, dt.timedelta(days=1))
                    last_maintenance = time.monotonic()
            except psycopg.OperationalError as exc:
                log.error("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    def _cancel(self, job_id: uuid.UUID) -> None:
        running = self._running.get(job_id)
        if running and not running.cancel.is_set():
            self._log(job_id, "[gristmill] cancel requested\n")
            running.cancel.set()

    async def _listen(self) -> None:
        tags = set(self.config.tags)
        async for note in self._listen_conn.notifies():
            if note.channel == queue.CANCEL_CHANNEL:
                with contextlib.suppress(ValueError):
                    self._cancel(uuid.UUID(note.payload))
            elif note.payload == "*" or "*" in tags or note.payload in tags:
                self._wakeup.set()

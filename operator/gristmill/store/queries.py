"""Every SQL statement Gristmill runs, named and side by side.

The schema lives in migrations/; the other layers call functions in store/,
never SQL.
"""

# Columns copied from `jobs` to `job_history` when a job ends.
_HISTORY_COLUMNS = (
    "id, namespace, kind, script_name, script_hash, tag, priority, status, input,"
    " result, error, attempts, worker_id, created_at, started_at, finished_at,"
    " flow_run_id, step_path, labels"
)
# What every statement that ends jobs returns, for the flow engine to advance on.
# Only a timer's input is read back (it says which timer): a job's own input never is.
_ENDED = ("id, status, flow_run_id, step_path, kind,"
          " CASE WHEN kind = 'timer' THEN input END AS input, result, error, attempts")


LISTEN_JOBS = "LISTEN gristmill_jobs"
LISTEN_CANCEL = "LISTEN gristmill_cancel"
NOTIFY_JOBS = "SELECT pg_notify('gristmill_jobs', tag) FROM unnest(%s::text[]) AS t(tag)"
NOTIFY_CANCEL = "SELECT pg_notify('gristmill_cancel', %s)"
NOTIFY_IDS = "SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS t(payload)"
LISTEN = "LISTEN {}"  # the channel, quoted as an identifier
PING = "SELECT 1"

# --- scripts -----------------------------------------------------------------

PUT_SCRIPT_VERSION = """
INSERT INTO script_versions (hash, spec) VALUES (%s, %s) ON CONFLICT (hash) DO NOTHING
"""

PUT_SCRIPT = """
INSERT INTO scripts (namespace, name, hash) VALUES (%s, %s, %s)
ON CONFLICT (namespace, name) DO UPDATE SET hash = excluded.hash, updated_at = now()
WHERE scripts.hash IS DISTINCT FROM excluded.hash
"""

DELETE_SCRIPT = "DELETE FROM scripts WHERE namespace = %s AND name = %s"

GET_SCRIPT = """
SELECT s.hash, v.spec FROM scripts s JOIN script_versions v USING (hash)
WHERE s.namespace = %s AND s.name = %s
"""

GET_SCRIPT_VERSIONS = "SELECT hash, spec FROM script_versions WHERE hash = ANY (%s)"

LIST_SCRIPTS = """
SELECT s.namespace, s.name, s.hash, s.updated_at FROM scripts s
WHERE %(namespace)s::text IS NULL OR s.namespace = %(namespace)s
ORDER BY s.namespace, s.name
"""

# --- the queue ---------------------------------------------------------------

# One statement: the insert, and one NOTIFY per tag of the rows it inserted (delivered at
# commit). {guard} is empty, or ENQUEUE_ONLY_CURRENT: then a Script job is inserted only
# while the version it pins is its Script's current one (in this statement's snapshot), so
# a caller that checked the input against a version it remembered never queues a version
# an apply has replaced. Answers the number of rows inserted.
ENQUEUE = """
WITH inserted AS (
    INSERT INTO jobs (id, namespace, kind, script_name, script_hash, tag, priority, input,
                      scheduled_for, max_attempts, concurrency_key, concurrency_limit,
                      flow_run_id, step_path, retry_policy, timeout_s, labels)
    SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[],
                         %s::text[], %s::smallint[], %s::jsonb[], %s::timestamptz[],
                         %s::int[], %s::text[], %s::int[], %s::uuid[], %s::text[],
                         %s::jsonb[], %s::float8[], %s::jsonb[])
        AS u (id, namespace, kind, script_name, script_hash, tag, priority, input,
              scheduled_for, max_attempts, concurrency_key, concurrency_limit, flow_run_id,
              step_path, retry_policy, timeout_s, labels){guard}
    RETURNING tag
), woken AS (
    SELECT pg_notify('gristmill_jobs', tag) FROM (SELECT DISTINCT tag FROM inserted) t
)
SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM woken)
"""

ENQUEUE_ONLY_CURRENT = """
    WHERE EXISTS (SELECT 1 FROM scripts s WHERE s.namespace = u.namespace
                  AND s.name = u.script_name AND s.hash = u.script_hash)"""

# The input comes back as text, parsed per job: a value Python cannot load fails that job,
# never the claim of every job beside it.
CLAIM = """
SELECT id, namespace, kind, script_name, script_hash, tag, priority, input::text AS input,
       attempt, max_attempts, created_at, scheduled_for, started_at, flow_run_id, step_path,
       retry_policy, timeout_s
FROM gristmill_claim_jobs(%s, %s, %s)
"""

CLAIM_FOR = """
SELECT id, namespace, kind, script_name, script_hash, tag, priority, input::text AS input,
       attempt, max_attempts, created_at, scheduled_for, started_at, flow_run_id, step_path,
       retry_policy, timeout_s, worker_id
FROM gristmill_claim_jobs_for(%s, %s, %s)
"""

# Seconds until the first queued job of these tags is due (negative: one is due now).
NEXT_DUE = """
SELECT extract(epoch FROM min(d.scheduled_for) - now())::float8
FROM unnest(%s::text[]) AS t(tag),
LATERAL (SELECT scheduled_for FROM jobs
         WHERE status = 'queued' AND tag = t.tag ORDER BY scheduled_for LIMIT 1) d
"""
# ...of any tag, for a worker that serves them all (gristmill dev: a small queue).
NEXT_DUE_ANY_TAG = """
SELECT extract(epoch FROM min(scheduled_for) - now())::float8 FROM jobs WHERE status = 'queued'
"""

# Requeue failed attempts that have attempts left (unless cancelled), then move
# every other finished attempt to history, in one statement. An outcome only
# applies while the job is still this worker's and still on that attempt: a
# worker that was presumed dead and reaped cannot finish the job a second time.
FINISH = f"""
WITH outcome AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(attempts)s::int[], %(statuses)s::text[],
                         %(results)s::jsonb[], %(errors)s::jsonb[], %(retry_delays)s::float8[])
        AS o(id, attempt, status, result, error, retry_delay)
), mine AS (
    SELECT j.*, o.status AS outcome_status, o.result AS outcome_result,
           o.error AS outcome_error, o.retry_delay
    FROM outcome o JOIN jobs j ON j.id = o.id AND j.attempt = o.attempt
    -- By primary key, never through jobs_running_by_worker (IS NOT DISTINCT FROM cannot use
    -- it): until a vacuum that index keeps an entry for every job the worker ran (about a
    -- million a minute at 5,000 jobs/s), and a plan that scans it per outcome would crawl.
    WHERE j.id = ANY (%(ids)s::uuid[]) AND j.worker_id IS NOT DISTINCT FROM %(worker)s
      AND j.status = 'running'
), requeued AS (
    UPDATE jobs j SET status = 'queued', worker_id = NULL, started_at = NULL,
                      scheduled_for = now() + make_interval(secs => m.retry_delay),
                      last_error = m.outcome_error
    FROM mine m
    WHERE j.id = m.id AND m.outcome_status = 'failed' AND m.retry_delay IS NOT NULL
      AND NOT m.cancel_requested
    RETURNING j.id
), done AS (
    DELETE FROM jobs j USING mine m
    WHERE j.id = m.id
      AND NOT (m.outcome_status = 'failed' AND m.retry_delay IS NOT NULL AND NOT m.cancel_requested)
    RETURNING m.*
), moved AS (
    INSERT INTO job_history ({_HISTORY_COLUMNS})
    SELECT id, namespace, kind, script_name, script_hash, tag, priority,
           CASE WHEN cancel_requested AND outcome_status = 'failed' THEN 'cancelled'
                ELSE outcome_status END,
           input, outcome_result, outcome_error, attempt, worker_id, created_at, started_at, now(),
           flow_run_id, step_path, labels
    FROM done
    RETURNING {_ENDED}
)
SELECT id, 'requeued' AS status, NULL::uuid, NULL, NULL, NULL::jsonb, NULL::jsonb, NULL::jsonb,
       NULL::int FROM requeued
UNION ALL SELECT {_ENDED} FROM moved
"""

# Jobs whose worker vanished or stopped heartbeating for longer than the lease:
# requeued while attempts remain, else failed.
REAP = f"""
WITH lost AS (
    SELECT j.id FROM jobs j LEFT JOIN workers w ON w.id = j.worker_id
    WHERE j.status = 'running' AND (w.id IS NULL OR w.heartbeat_at < now() - %(lease)s)
    FOR UPDATE OF j SKIP LOCKED
), requeued AS (
    UPDATE jobs j SET status = 'queued', worker_id = NULL, started_at = NULL,
                      scheduled_for = now(), last_error = %(error)s
    FROM lost WHERE j.id = lost.id AND j.attempt < j.max_attempts AND NOT j.cancel_requested
    RETURNING j.id
), failed AS (
    DELETE FROM jobs j USING lost
    WHERE j.id = lost.id AND NOT (j.attempt < j.max_attempts AND NOT j.cancel_requested)
    RETURNING j.*
), moved AS (
    INSERT INTO job_history ({_HISTORY_COLUMNS})
    SELECT id, namespace, kind, script_name, script_hash, tag, priority,
           CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END,
           input, NULL, %(error)s, attempt, worker_id, created_at, started_at, now(),
           flow_run_id, step_path, labels
    FROM failed
    RETURNING {_ENDED}
)
SELECT id, 'requeued' AS status, NULL::uuid, NULL, NULL, NULL::jsonb, NULL::jsonb, NULL::jsonb,
       NULL::int FROM requeued
UNION ALL SELECT {_ENDED} FROM moved
"""

# A stopping worker gives back jobs it has not finished; that attempt does not count.
HAND_BACK = """
UPDATE jobs SET status = 'queued', worker_id = NULL, started_at = NULL,
                attempt = attempt - 1, scheduled_for = now()
WHERE worker_id = %s AND status = 'running' AND id = ANY (%s)
RETURNING id, tag
"""

# A reconnecting worker's jobs except those it still runs (`<> ALL` of an empty array
# is true: all of them).
HAND_BACK_ALL_BUT = """
UPDATE jobs SET status = 'queued', worker_id = NULL, started_at = NULL,
                attempt = attempt - 1, scheduled_for = now()
WHERE worker_id = %s AND status = 'running' AND id <> ALL (%s)
RETURNING id, tag
"""

CANCEL_QUEUED = f"""
WITH gone AS (DELETE FROM jobs WHERE id = ANY (%(ids)s) AND status = 'queued' RETURNING *)
INSERT INTO job_history ({_HISTORY_COLUMNS})
SELECT id, namespace, kind, script_name, script_hash, tag, priority, 'cancelled', input,
       NULL, %(error)s, attempt, worker_id, created_at, started_at, now(), flow_run_id, step_path,
       labels
FROM gone
RETURNING {_ENDED}
"""

CANCEL_RUNNING = """
UPDATE jobs SET cancel_requested = true
WHERE id = ANY (%s) AND status = 'running' AND NOT cancel_requested RETURNING id
"""

ACTIVE_JOBS_OF_FLOW_RUN = "SELECT id, step_path FROM jobs WHERE flow_run_id = %s"

# Inputs come back as text and are parsed by queue.get_job: one that Python cannot load
# must not make the job unreadable.
GET_ACTIVE_JOB = """
SELECT id, namespace, kind, script_name, script_hash, tag, priority, status, input::text AS input,
       NULL::jsonb AS result, last_error AS error, attempt AS attempts, max_attempts, worker_id,
       created_at, scheduled_for, started_at, NULL::timestamptz AS finished_at, labels
FROM jobs WHERE id = %s
"""

GET_FINISHED_JOB = """
SELECT id, namespace, kind, script_name, script_hash, tag, priority, status, input::text AS input,
       result, error, attempts, NULL::int AS max_attempts, worker_id, created_at,
       NULL::timestamptz AS scheduled_for, started_at, finished_at, labels
FROM job_history WHERE id = %s
"""

QUEUE_DEPTH_BY_TAG = """
SELECT tag, count(*) FILTER (WHERE status = 'queued' AND scheduled_for <= now()) AS queued,
       count(*) FILTER (WHERE status = 'running') AS running,
       extract(epoch FROM now() - min(scheduled_for) FILTER (
           WHERE status = 'queued' AND scheduled_for <= now())) AS oldest_queued_s
FROM jobs GROUP BY tag
"""

# --- workers -----------------------------------------------------------------

REGISTER_WORKER = """
INSERT INTO workers (id, hostname, pid, tags, concurrency) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopping = false
"""

# Heartbeat renews the lease on all of a worker's jobs at once and reports
# whether the worker is still registered and which of its jobs someone asked to cancel.
HEARTBEAT = """
WITH beat AS (UPDATE workers SET heartbeat_at = now() WHERE id = %(worker)s RETURNING id)
SELECT EXISTS (SELECT 1 FROM beat) AS registered,
       ARRAY(SELECT j.id FROM jobs j
             WHERE j.worker_id = %(worker)s AND j.status = 'running' AND j.cancel_requested
            ) AS cancel
"""

# The same for every worker connected to one API replica, in one statement.
HEARTBEAT_MANY = """
WITH beat AS (UPDATE workers SET heartbeat_at = now() WHERE id = ANY (%(workers)s) RETURNING id),
cancel AS (SELECT j.worker_id, j.id FROM jobs j
           WHERE j.worker_id = ANY (%(workers)s) AND j.status = 'running' AND j.cancel_requested)
SELECT ARRAY(SELECT id FROM beat) AS registered,
       ARRAY(SELECT worker_id FROM cancel) AS cancel_workers,
       ARRAY(SELECT id FROM cancel) AS cancel_jobs
"""

DEREGISTER_WORKER = "DELETE FROM workers WHERE id = %s"

# Running jobs per worker host (in Kubernetes, the pod name), for pod-deletion-cost.
RUNNING_JOBS_BY_HOST = """
SELECT w.hostname, count(j.id) FROM workers w
LEFT JOIN jobs j ON j.worker_id = w.id AND j.status = 'running'
WHERE w.hostname = ANY (%s)
GROUP BY w.hostname
"""

FORGET_DEAD_WORKERS = """
DELETE FROM workers w WHERE w.heartbeat_at < now() - %s
AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.worker_id = w.id)
"""

# --- logs --------------------------------------------------------------------

# The chunks and the wake-up of their followers, in one statement (one commit).
APPEND_LOGS = """
WITH appended AS (
    INSERT INTO job_logs (job_id, chunk) SELECT * FROM unnest(%s::uuid[], %s::text[])
)
SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS t(payload)
"""

# The same for a worker that is not trusted with other workers' jobs (one connected to the
# API): only the chunks of jobs it runs are stored.
APPEND_LOGS_OF_WORKER = """
WITH chunk AS (
    SELECT * FROM unnest(%s::uuid[], %s::text[]) WITH ORDINALITY AS c(job_id, chunk, n)
), appended AS (
    INSERT INTO job_logs (job_id, chunk)
    SELECT c.job_id, c.chunk FROM chunk c
    JOIN jobs j ON j.id = c.job_id AND j.worker_id = %s AND j.status = 'running'
    ORDER BY c.n
)
SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS t(payload)
"""

# A followed log: the job's status and the chunks after a seq, in one statement, so one
# snapshot: if the job shows as ended, every chunk it stored (before ending) is here.
READ_FOLLOWED_LOG = """
SELECT (SELECT status FROM jobs WHERE id = %(id)s
        UNION ALL SELECT status FROM job_history WHERE id = %(id)s LIMIT 1),
       l.seq, l.chunk
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT seq, chunk FROM job_logs WHERE job_id = %(id)s AND seq > %(after)s
    ORDER BY seq LIMIT %(limit)s
) AS l ON true
"""

READ_LOGS = """
SELECT seq, chunk FROM job_logs WHERE job_id = %s AND seq > %s ORDER BY seq LIMIT %s
"""

# --- maintenance ---------------------------------------------------------------

ENSURE_PARTITIONS = "SELECT gristmill_ensure_partitions(%s, %s, %s)"
DROP_PARTITIONS_BEFORE = "SELECT gristmill_drop_partitions_before(%s, %s)"

# One housekeeper at a time, whatever the number of replicas (a session lock: each step
# commits on its own, so none holds locks that finishing workers wait for).
HOUSEKEEPING_LOCK = 0x6772_686B  # "grhk"
TRY_HOUSEKEEPING_LOCK = f"SELECT pg_try_advisory_lock({HOUSEKEEPING_LOCK})"
RELEASE_HOUSEKEEPING_LOCK = f"SELECT pg_advisory_unlock({HOUSEKEEPING_LOCK})"

# Rows a skewed clock put in the default partitions age out like the others.
PURGE_DEFAULT_HISTORY = "DELETE FROM job_history_default WHERE finished_at < %s"
PURGE_DEFAULT_LOGS = "DELETE FROM job_logs_default WHERE created_at < %s"

# A batch of finished top-level flow runs past retention (their steps, iterations and
# sub-flow runs go with them).
DELETE_EXPIRED_FLOW_RUNS = """
DELETE FROM flow_runs WHERE id IN (
    SELECT id FROM flow_runs
    WHERE parent_run_id IS NULL AND finished_at < %s
      AND status IN ('succeeded', 'failed', 'cancelled')
    LIMIT %s)
"""

# The first day still kept of the history (partitions are named <table>_pYYYYMMDD).
OLDEST_HISTORY_PARTITION = """
SELECT min(to_date(right(c.relname, 8), 'YYYYMMDD')) FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'job_history'::regclass AND c.relname ~ '^job_history_p[0-9]{8}$'
"""

# --- flows ---------------------------------------------------------------------

PUT_FLOW_VERSION = """
INSERT INTO flow_versions (hash, spec) VALUES (%s, %s) ON CONFLICT (hash) DO NOTHING
"""

PUT_FLOW = """
INSERT INTO flows (namespace, name, hash) VALUES (%s, %s, %s)
ON CONFLICT (namespace, name) DO UPDATE SET hash = excluded.hash, updated_at = now()
WHERE flows.hash IS DISTINCT FROM excluded.hash
"""

DELETE_FLOW = "DELETE FROM flows WHERE namespace = %s AND name = %s"

GET_FLOW = """
SELECT f.hash, v.spec FROM flows f JOIN flow_versions v USING (hash)
WHERE f.namespace = %s AND f.name = %s
"""

GET_FLOW_VERSION = "SELECT spec FROM flow_versions WHERE hash = %s"

LIST_FLOWS = """
SELECT f.namespace, f.name, f.hash, f.updated_at FROM flows f
WHERE %(namespace)s::text IS NULL OR f.namespace = %(namespace)s
ORDER BY f.namespace, f.name
"""

INSERT_FLOW_RUN = """
INSERT INTO flow_runs (id, namespace, flow_name, flow_hash, status, input, priority, pins,
                       parent_run_id, parent_path, restarted_from, submitted_by, labels,
                       started_at)
VALUES (%(id)s, %(namespace)s, %(flow_name)s, %(flow_hash)s, %(status)s, %(input)s,
        %(priority)s, %(pins)s, %(parent_run_id)s, %(parent_path)s, %(restarted_from)s,
        %(submitted_by)s, %(labels)s, CASE WHEN %(status)s = 'running' THEN now() END)
"""

GET_FLOW_RUN = "SELECT * FROM flow_runs WHERE id = %s"

# The namespace a run (a job, active or finished, or a flow run) belongs to: what the API
# authorizes a request by run id against.
RUN_NAMESPACE = """
SELECT namespace FROM jobs WHERE id = %(id)s
UNION ALL SELECT namespace FROM job_history WHERE id = %(id)s
UNION ALL SELECT namespace FROM flow_runs WHERE id = %(id)s
LIMIT 1
"""
LOCK_FLOW_RUN = "SELECT * FROM flow_runs WHERE id = %s FOR UPDATE"

COUNT_RUNNING_FLOW_RUNS = """
SELECT count(*) FROM flow_runs WHERE namespace = %s AND flow_name = %s AND status = 'running'
"""

NEXT_WAITING_FLOW_RUN = """
SELECT id FROM flow_runs WHERE namespace = %s AND flow_name = %s AND status = 'queued'
ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED
"""

START_FLOW_RUN = "UPDATE flow_runs SET status = 'running', started_at = now() WHERE id = %s"

FINISH_FLOW_RUN = """
UPDATE flow_runs SET status = %s, result = %s, error = %s, finished_at = now() WHERE id = %s
"""

MARK_FAILURE_HANDLED = "UPDATE flow_runs SET failure_handled = true, error = %s WHERE id = %s"

ACTIVE_CHILD_RUNS = """
SELECT id FROM flow_runs WHERE parent_run_id = %s AND status IN ('queued', 'running')
"""

SAVE_STEP = """
INSERT INTO flow_steps (run_id, path, step_id, status, result, error, job_id, child_run_id, state,
                        finished_at)
VALUES (%(run_id)s, %(path)s, %(step_id)s, %(status)s, %(result)s, %(error)s, %(job_id)s,
        %(child_run_id)s, %(state)s,
        CASE WHEN %(status)s IN ('succeeded', 'failed', 'skipped', 'cancelled') THEN now() END)
ON CONFLICT (run_id, path) DO UPDATE SET
    status = excluded.status, result = excluded.result, error = excluded.error,
    job_id = coalesce(excluded.job_id, flow_steps.job_id),
    child_run_id = coalesce(excluded.child_run_id, flow_steps.child_run_id),
    state = excluded.state,
    finished_at = excluded.finished_at
"""

GET_STEPS = """
SELECT path, step_id, status, result, error, job_id, child_run_id, state
FROM flow_steps WHERE run_id = %s AND path = ANY (%s)
"""

# Every step instance of a run with the attempts and timings of its job, for display.
RUN_STEPS = """
SELECT s.path, s.step_id, s.status, s.result, s.error, s.job_id, s.child_run_id,
       s.started_at, s.finished_at, coalesce(j.attempt, h.attempts) AS attempts,
       s.state -> 'approval' AS approval
FROM flow_steps s
LEFT JOIN jobs j ON j.id = s.job_id
LEFT JOIN job_history h ON h.id = s.job_id AND j.id IS NULL
WHERE s.run_id = %s
ORDER BY s.started_at, s.path
"""

COPY_STEPS = """
INSERT INTO flow_steps (run_id, path, step_id, status, result, error, job_id, child_run_id, state,
                        started_at, finished_at)
SELECT %s, path, step_id, status, result, error, job_id, child_run_id, state, started_at,
       finished_at
FROM flow_steps WHERE run_id = %s AND path = ANY (%s)
"""

INSERT_ITERATIONS = """
INSERT INTO flow_iterations (run_id, path, index, item)
SELECT %s, %s, i - 1, item FROM unnest(%s::jsonb[]) WITH ORDINALITY AS t(item, i)
"""

GET_ITERATION_ITEM = "SELECT item FROM flow_iterations WHERE run_id = %s AND path = %s AND index = %s"

SET_ITERATION_RESULT = """
UPDATE flow_iterations SET result = %s WHERE run_id = %s AND path = %s AND index = %s
"""

ITERATION_RESULTS = """
SELECT result FROM flow_iterations WHERE run_id = %s AND path = %s ORDER BY index
"""

# --- idempotency keys ------------------------------------------------------------

# One holder per key at a time, until its transaction ends: a concurrent duplicate
# learns the key is busy instead of racing it to a second run.
LOCK_IDEMPOTENCY_KEY = """
SELECT pg_try_advisory_xact_lock(hashtextextended(%s || '/' || %s || '/' || %s, 0))
"""

GET_IDEMPOTENCY_KEY = """
SELECT fingerprint, status, response FROM idempotency_keys
WHERE namespace = %s AND route = %s AND key = %s AND created_at > now() - %s
"""

# A row past its lifetime that retention has not deleted yet is replaced.
PUT_IDEMPOTENCY_KEY = """
INSERT INTO idempotency_keys (namespace, route, key, fingerprint, status, response)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (namespace, route, key) DO UPDATE SET
    fingerprint = excluded.fingerprint, status = excluded.status,
    response = excluded.response, created_at = now()
"""

DELETE_EXPIRED_IDEMPOTENCY_KEYS = "DELETE FROM idempotency_keys WHERE created_at <= now() - %s"

# --- run listing ---------------------------------------------------------------------

# Which table, and which kind of run, a run id names (for the audit row of a change).
LOCATE_RUN = """
SELECT 'script', namespace, script_name FROM jobs WHERE id = %(id)s
UNION ALL SELECT 'script', namespace, script_name FROM job_history WHERE id = %(id)s
UNION ALL SELECT 'flow', namespace, flow_name FROM flow_runs WHERE id = %(id)s
LIMIT 1
"""

# The listing is one UNION ALL of the branches its filters need (store/run_listing.py
# picks them), each newest first and cut at the page size, then merged. Every branch
# names its table `r`. The history and flow runs have a branch per status, the status a
# parameter: with it fixed, the index on (namespace, status, created_at, id) yields rows
# in the listing's order, each partition's scan stops after a page, and a page costs a
# few index probes however long the history is (with `status = ANY (...)`, or a status
# from a join, PostgreSQL 15 must sort every matching row instead).
# {conditions} is made only of the LIST_RUNS_WHERE_* fragments below, never of request
# text; {status} names a parameter (status_succeeded, ...); values are parameters.
LIST_RUNS_LIVE_SCRIPTS = """
SELECT 'script' AS kind, r.id, r.namespace, r.script_name AS name, r.status, r.labels,
       r.created_at, r.started_at, NULL::timestamptz AS finished_at
FROM jobs r
WHERE r.namespace = %(namespace)s AND r.flow_run_id IS NULL AND r.kind = 'script'
  AND r.status = ANY (%(live_statuses)s){conditions}
ORDER BY r.created_at DESC, r.id DESC LIMIT %(limit)s
"""

LIST_RUNS_FINISHED_SCRIPTS = """
SELECT 'script' AS kind, r.id, r.namespace, r.script_name AS name, r.status, r.labels,
       r.created_at, r.started_at, r.finished_at
FROM job_history r
WHERE r.namespace = %(namespace)s AND r.flow_run_id IS NULL AND r.kind = 'script'
  AND r.status = %({status})s{conditions}{finished_since}
ORDER BY r.created_at DESC, r.id DESC LIMIT %(limit)s
"""

LIST_RUNS_FLOWS = """
SELECT 'flow' AS kind, r.id, r.namespace, r.flow_name AS name, r.status, r.labels,
       r.created_at, r.started_at, r.finished_at
FROM flow_runs r
WHERE r.namespace = %(namespace)s AND r.parent_run_id IS NULL
  AND r.status = %({status})s{conditions}
ORDER BY r.created_at DESC, r.id DESC LIMIT %(limit)s
"""

LIST_RUNS = """
SELECT kind, id, namespace, name, status, labels, created_at, started_at, finished_at
FROM ({branches}) AS runs
ORDER BY created_at DESC, id DESC LIMIT %(limit)s
"""

LIST_RUNS_WHERE_SCRIPT = "\n      AND r.script_name = %(name)s"
LIST_RUNS_WHERE_FLOW = "\n      AND r.flow_name = %(name)s"
LIST_RUNS_WHERE_SINCE = "\n      AND r.created_at >= %(since)s"
LIST_RUNS_WHERE_UNTIL = "\n      AND r.created_at < %(until)s"
LIST_RUNS_WHERE_BEFORE = "\n      AND (r.created_at, r.id) < (%(before_at)s, %(before_id)s)"
# `<> '{}'` lets the partial GIN index (of labelled runs only) serve the containment.
LIST_RUNS_WHERE_LABELS = "\n      AND r.labels @> %(labels)s AND r.labels <> '{}'"
# A run finishes after it was created: this prunes the history's older day partitions.
LIST_RUNS_FINISHED_SINCE = "\n      AND r.finished_at >= %(since)s"

# --- audit -------------------------------------------------------------------------------

RECORD_AUDIT = """
INSERT INTO audit (namespace, username, uid, groups, action, run_id, target, source, detail)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""

# The rows of one change to many runs (a batch submit): one statement.
RECORD_AUDIT_MANY = """
INSERT INTO audit (namespace, username, uid, groups, action, run_id, target, source, detail)
SELECT %s, %s, %s, %s, %s, r.run_id, %s, %s, r.detail
FROM unnest(%s::uuid[], %s::jsonb[]) AS r (run_id, detail)
"""

# {conditions}: only the LIST_AUDIT_WHERE_* fragments, as for the run listing.
LIST_AUDIT = """
SELECT id, at, namespace, username, uid, groups, action, run_id, target, source, detail
FROM audit a
WHERE a.namespace = %(namespace)s{conditions}
ORDER BY a.at DESC, a.id DESC LIMIT %(limit)s
"""

LIST_AUDIT_WHERE_SINCE = "\n  AND a.at >= %(since)s"
LIST_AUDIT_WHERE_UNTIL = "\n  AND a.at < %(until)s"
LIST_AUDIT_WHERE_BEFORE = "\n  AND (a.at, a.id) < (%(before_at)s, %(before_id)s)"
LIST_AUDIT_WHERE_ACTIONS = "\n  AND a.action = ANY (%(actions)s)"
LIST_AUDIT_WHERE_USER = "\n  AND a.username = %(user)s"
LIST_AUDIT_WHERE_RUN = "\n  AND a.run_id = %(run)s"

PURGE_DEFAULT_AUDIT = "DELETE FROM audit_default WHERE at < %s"

-- Gristmill runtime schema, part 3: what is stored can be read back, and retention.
--
-- PostgreSQL's timestamps reach from 4713 BC to 294276 AD and Python's from year 1 to
-- 9999, so a job due in year 0 or 10000 could be stored but never claimed or shown:
-- every worker's claim failed on it. The API refuses such times; this constraint makes
-- sure no other path stores one. Jobs stored before it are moved out of the way first.

UPDATE jobs SET scheduled_for = now() WHERE scheduled_for < '1970-01-01 00:00:00+00';

WITH unreachable AS (
    DELETE FROM jobs WHERE scheduled_for >= '3000-01-01 00:00:00+00' RETURNING *
)
INSERT INTO job_history (id, namespace, kind, script_name, script_hash, tag, priority, status,
                         input, result, error, attempts, worker_id, created_at, started_at,
                         finished_at, flow_run_id, step_path)
SELECT id, namespace, kind, script_name, script_hash, tag, priority, 'failed', input, NULL,
       jsonb_build_object('kind', 'input', 'message',
                          'scheduledFor was after the year 2999; submit it again with a '
                          || 'time within range'),
       attempt, NULL, created_at, NULL, now(), flow_run_id, step_path
FROM unreachable;

ALTER TABLE jobs ADD CONSTRAINT jobs_scheduled_for_in_range
    CHECK (scheduled_for >= '1970-01-01 00:00:00+00' AND scheduled_for < '3000-01-01 00:00:00+00');

-- Retention deletes finished flow runs (they are not partitioned): a sub-flow's run goes
-- with its parent, and a restarted run outlives the run it restarted.
ALTER TABLE flow_runs
    DROP CONSTRAINT flow_runs_parent_run_id_fkey,
    ADD CONSTRAINT flow_runs_parent_run_id_fkey
        FOREIGN KEY (parent_run_id) REFERENCES flow_runs (id) ON DELETE CASCADE,
    DROP CONSTRAINT flow_runs_restarted_from_fkey,
    ADD CONSTRAINT flow_runs_restarted_from_fkey
        FOREIGN KEY (restarted_from) REFERENCES flow_runs (id) ON DELETE SET NULL;
CREATE INDEX flow_runs_finished ON flow_runs (finished_at) WHERE parent_run_id IS NULL;

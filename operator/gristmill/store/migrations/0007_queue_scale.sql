-- The queue at scale: fair share across namespaces, plans that stay custom, tables tuned
-- for churn.

-- Claims look queued jobs up per (tag, namespace): one namespace's burst is one queue
-- among others, not the front of the only one.
CREATE INDEX jobs_claimable_by_namespace ON jobs (tag, namespace, priority DESC, scheduled_for)
    WHERE status = 'queued';
DROP INDEX jobs_claimable;
-- When the next queued job of a tag is due (a delayed run, a retry's backoff, a timer):
-- idle workers sleep until then instead of polling.
CREATE INDEX jobs_queued_by_due_time ON jobs (tag, scheduled_for) WHERE status = 'queued';

-- Every job is inserted, updated twice (claimed, finished or requeued) and deleted within
-- seconds: leave room on each page for the new row versions and vacuum early and often,
-- so that the table and its indexes stay the size of the live queue.
ALTER TABLE jobs SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
                      autovacuum_vacuum_insert_scale_factor = 0.02,
                      autovacuum_analyze_scale_factor = 0.05, autovacuum_vacuum_cost_delay = 1);
-- A heartbeat per worker every few seconds, on a column no index holds: HOT updates.
ALTER TABLE workers SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.05);

-- Lease up to p_limit due jobs of p_tags, each queue ((tag, namespace) pair) an equal
-- share first: a namespace with 100,000 queued jobs and one with 1 both get claims at
-- once. Priority orders jobs within a queue. A second pass hands the shares queues left
-- unused to the queues with more. Concurrency limits as before: a job whose key is at its
-- limit is deferred by 250 ms.
--
-- jit off: the planner's row estimates for the queues grow with the table's dead rows, and
-- past jit_above_cost each claim would spend 20-40 ms compiling a plan that runs in 1 ms.
CREATE OR REPLACE FUNCTION gristmill_claim_jobs(p_worker text, p_tags text[], p_limit integer)
RETURNS SETOF jobs LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    cand record;
    running integer;
    queue_count integer;
    seen integer;
    claimed uuid[] := '{}';
    deferred uuid[] := '{}';
    key_budget jsonb := '{}';
BEGIN
    IF '*' = ANY (p_tags) THEN
        -- A worker that serves every tag (gristmill dev): the tags that have queued jobs.
        p_tags := ARRAY(SELECT DISTINCT tag FROM jobs WHERE status = 'queued');
    END IF;
    FOR pass IN 1..2 LOOP
        EXIT WHEN cardinality(claimed) >= p_limit;
        seen := 0;
        FOR cand IN
            -- The queues with queued jobs, found by skipping through the index one
            -- namespace at a time (a few probes, whatever the number of jobs).
            WITH RECURSIVE queue AS (
                SELECT t.tag, (SELECT min(j.namespace) FROM jobs j
                               WHERE j.status = 'queued' AND j.tag = t.tag) AS namespace
                FROM unnest(p_tags) AS t(tag)
                UNION ALL
                SELECT q.tag, (SELECT min(j.namespace) FROM jobs j
                               WHERE j.status = 'queued' AND j.tag = q.tag
                                 AND j.namespace > q.namespace)
                FROM queue q WHERE q.namespace IS NOT NULL
            ), shares AS (
                SELECT tag, namespace, count(*) OVER () AS queues FROM queue
                WHERE namespace IS NOT NULL
            )
            SELECT c.id, c.concurrency_key, c.concurrency_limit, s.queues
            FROM shares s,
            LATERAL (
                SELECT j.id, j.priority, j.scheduled_for, j.concurrency_key, j.concurrency_limit
                FROM jobs j
                WHERE j.status = 'queued' AND j.tag = s.tag AND j.namespace = s.namespace
                  AND j.scheduled_for <= now() AND j.id <> ALL (claimed) AND j.id <> ALL (deferred)
                ORDER BY j.priority DESC, j.scheduled_for
                LIMIT CASE WHEN pass = 1
                           THEN ceil((p_limit - cardinality(claimed))::numeric / s.queues)
                           ELSE p_limit - cardinality(claimed) END
                FOR UPDATE SKIP LOCKED
            ) c
            ORDER BY c.priority DESC, c.scheduled_for
        LOOP
            seen := seen + 1;
            queue_count := cand.queues;
            EXIT WHEN cardinality(claimed) >= p_limit;
            IF cand.concurrency_key IS NOT NULL THEN
                IF NOT key_budget ? cand.concurrency_key THEN
                    -- Serialise claimers of this key until commit, then count what runs.
                    PERFORM pg_advisory_xact_lock(hashtextextended(cand.concurrency_key, 0));
                    SELECT count(*) INTO running FROM jobs
                    WHERE concurrency_key = cand.concurrency_key AND status = 'running';
                    key_budget := key_budget || jsonb_build_object(
                        cand.concurrency_key, cand.concurrency_limit - running);
                END IF;
                IF (key_budget ->> cand.concurrency_key)::integer <= 0 THEN
                    deferred := deferred || cand.id;
                    CONTINUE;
                END IF;
                key_budget := jsonb_set(key_budget, ARRAY[cand.concurrency_key],
                    to_jsonb((key_budget ->> cand.concurrency_key)::integer - 1));
            END IF;
            claimed := claimed || cand.id;
        END LOOP;
        -- One queue (or none) had jobs: its share was everything, and a second pass finds
        -- nothing more.
        EXIT WHEN seen = 0 OR queue_count = 1;
    END LOOP;

    IF cardinality(deferred) > 0 THEN
        UPDATE jobs SET scheduled_for = now() + interval '250 milliseconds'
        WHERE id = ANY (deferred);
    END IF;

    -- EXECUTE: planned for this array each time. PL/pgSQL caches its statements' plans,
    -- and after five calls a generic plan, blind to the array's size, scans the table.
    RETURN QUERY EXECUTE
        'UPDATE jobs SET status = ''running'', worker_id = $1, started_at = now(),
                         attempt = attempt + 1
         WHERE id = ANY ($2) RETURNING *'
        USING p_worker, claimed;
END $$;

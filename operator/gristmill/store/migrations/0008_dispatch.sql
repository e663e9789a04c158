-- The dispatcher: one claim statement for every worker waiting on a tag set.
--
-- The claim function is split in two: gristmill_pick_jobs chooses and locks due jobs
-- (fair share per namespace, priorities, concurrency keys, as 0007 made it) and the
-- callers lease them. gristmill_claim_jobs leases them to one worker (a worker on the
-- database, `gristmill dev`); gristmill_claim_jobs_for leases them to several at once
-- (the API, for the workers waiting on it), each job to exactly one of them.

CREATE OR REPLACE FUNCTION gristmill_pick_jobs(p_tags text[], p_limit integer)
RETURNS uuid[] LANGUAGE plpgsql SET jit = off AS $$
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

    RETURN claimed;
END $$;

CREATE OR REPLACE FUNCTION gristmill_claim_jobs(p_worker text, p_tags text[], p_limit integer)
RETURNS SETOF jobs LANGUAGE plpgsql SET jit = off AS $$
BEGIN
    -- EXECUTE: planned for this array each time. PL/pgSQL caches its statements' plans,
    -- and after five calls a generic plan, blind to the array's size, scans the table.
    RETURN QUERY EXECUTE
        'UPDATE jobs SET status = ''running'', worker_id = $1, started_at = now(),
                         attempt = attempt + 1
         WHERE id = ANY ($2) RETURNING *'
        USING p_worker, gristmill_pick_jobs(p_tags, p_limit);
END $$;

-- Up to p_limits[i] jobs for p_workers[i]: the first waiting worker gets the first jobs
-- (in the order gristmill_pick_jobs chose them), and so on down the list.
CREATE OR REPLACE FUNCTION gristmill_claim_jobs_for(p_workers text[], p_limits integer[],
                                                    p_tags text[])
RETURNS SETOF jobs LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    total integer := (SELECT coalesce(sum(l), 0) FROM unnest(p_limits) AS l);
BEGIN
    RETURN QUERY EXECUTE
        'WITH picked AS (
             SELECT id, slot FROM unnest($3) WITH ORDINALITY AS p(id, slot)
         ), slots AS (
             SELECT w.worker, row_number() OVER (ORDER BY w.n, s) AS slot
             FROM unnest($1, $2) WITH ORDINALITY AS w(worker, lim, n),
                  generate_series(1, w.lim) AS s
         )
         UPDATE jobs j SET status = ''running'', worker_id = slots.worker,
                           started_at = now(), attempt = j.attempt + 1
         FROM picked JOIN slots USING (slot)
         WHERE j.id = picked.id RETURNING j.*'
        USING p_workers, p_limits, gristmill_pick_jobs(p_tags, total);
END $$;

-- Vacuum must never truncate the queue's table: truncating takes an ACCESS EXCLUSIVE lock
-- while it scans back over the empty tail pages, and every claim and finish waits behind
-- it (bench/queue_churn.py: completions stopped for 9 s at 5,000 jobs/s, 60-80 s with
-- PostgreSQL's default autovacuum_naptime). The queue refills those pages within seconds.
ALTER TABLE jobs SET (vacuum_truncate = false);

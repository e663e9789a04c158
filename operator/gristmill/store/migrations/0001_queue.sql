-- Gristmill runtime schema, part 1: script versions, the job queue, history, logs, workers.
--
-- The hot table `jobs` holds only queued and running jobs; a job that ends moves
-- to `job_history` (partitioned by day of `finished_at`) in the same statement,
-- so the queue stays small and retention is DROP TABLE of old partitions.

-- Content-addressed Script versions: a job pins the hash it was submitted with.
CREATE TABLE script_versions (
    hash        text PRIMARY KEY,
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The Script a name currently points to, per namespace (namespaces are tenants).
CREATE TABLE scripts (
    namespace   text NOT NULL,
    name        text NOT NULL,
    hash        text NOT NULL REFERENCES script_versions (hash),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);

CREATE TABLE workers (
    id            text PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    tags          text[] NOT NULL,
    concurrency   integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    stopping      boolean NOT NULL DEFAULT false
);

CREATE TABLE jobs (
    id                 uuid PRIMARY KEY,
    namespace          text NOT NULL,
    kind               text NOT NULL,               -- script | noop
    script_name        text,
    script_hash        text REFERENCES script_versions (hash),
    tag                text NOT NULL,
    priority           smallint NOT NULL DEFAULT 0,
    status             text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'running')),
    input              jsonb NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now(),
    scheduled_for      timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    attempt            integer NOT NULL DEFAULT 0,  -- attempts started so far
    max_attempts       integer NOT NULL DEFAULT 1,
    worker_id          text,
    cancel_requested   boolean NOT NULL DEFAULT false,
    concurrency_key    text,
    concurrency_limit  integer,
    last_error         jsonb
);

-- What claims read: queued jobs of a tag, best priority first, then oldest due.
CREATE INDEX jobs_claimable ON jobs (tag, priority DESC, scheduled_for) WHERE status = 'queued';
CREATE INDEX jobs_running_by_worker ON jobs (worker_id) WHERE status = 'running';
CREATE INDEX jobs_running_by_concurrency_key ON jobs (concurrency_key)
    WHERE status = 'running' AND concurrency_key IS NOT NULL;

CREATE TABLE job_history (
    id             uuid NOT NULL,
    namespace      text NOT NULL,
    kind           text NOT NULL,
    script_name    text,
    script_hash    text,
    tag            text NOT NULL,
    priority       smallint NOT NULL,
    status         text NOT NULL CHECK (status IN ('succeeded', 'failed', 'cancelled')),
    input          jsonb NOT NULL,
    result         jsonb,
    error          jsonb,
    attempts       integer NOT NULL,
    worker_id      text,
    created_at     timestamptz NOT NULL,
    started_at     timestamptz,
    finished_at    timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (finished_at);
CREATE INDEX job_history_id ON job_history (id);
-- Catches rows outside the pre-created day partitions (a skewed clock), so a
-- completion can never fail for want of a partition.
CREATE TABLE job_history_default PARTITION OF job_history DEFAULT;

CREATE SEQUENCE job_logs_seq;
CREATE TABLE job_logs (
    job_id      uuid NOT NULL,
    seq         bigint NOT NULL DEFAULT nextval('job_logs_seq'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    chunk       text NOT NULL
) PARTITION BY RANGE (created_at);
CREATE INDEX job_logs_by_job ON job_logs (job_id, seq);
CREATE TABLE job_logs_default PARTITION OF job_logs DEFAULT;

-- Day partitions named <table>_pYYYYMMDD, created ahead of time.
CREATE FUNCTION gristmill_ensure_partitions(p_table text, p_days_back integer, p_days_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    day date;
    created integer := 0;
    part text;
BEGIN
    -- Every worker calls this; one at a time, so two never create the same table.
    PERFORM pg_advisory_xact_lock(hashtext('gristmill_ensure_partitions'));
    FOR i IN -p_days_back .. p_days_ahead LOOP
        day := (now() AT TIME ZONE 'UTC')::date + i;
        part := format('%s_p%s', p_table, to_char(day, 'YYYYMMDD'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                part, p_table, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;

-- Retention: drop whole day partitions older than the cutoff (no DELETE, no vacuum).
CREATE FUNCTION gristmill_drop_partitions_before(p_table text, p_cutoff date)
RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
    part text;
BEGIN
    FOR part IN
        SELECT c.relname FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = p_table::regclass
          AND c.relname ~ ('^' || p_table || '_p[0-9]{8}$')
          AND to_date(right(c.relname, 8), 'YYYYMMDD') < p_cutoff
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', part);
        RETURN NEXT part;
    END LOOP;
END $$;

-- Claim up to p_limit due jobs of the given tags for a worker, in one round trip.
-- Per tag, the partial index yields rows in priority order; SKIP LOCKED lets
-- concurrent workers take different rows. Jobs over their concurrency limit are
-- pushed back briefly so they never block the head of the queue.
CREATE FUNCTION gristmill_claim_jobs(p_worker text, p_tags text[], p_limit integer)
RETURNS SETOF jobs LANGUAGE plpgsql AS $$
DECLARE
    cand record;
    running integer;
    claimed uuid[] := '{}';
    deferred uuid[] := '{}';
    key_budget jsonb := '{}';
BEGIN
    IF '*' = ANY (p_tags) THEN
        -- A worker that serves every tag (gristmill dev): the tags that have queued jobs.
        p_tags := ARRAY(SELECT DISTINCT tag FROM jobs WHERE status = 'queued');
    END IF;
    FOR cand IN
        SELECT c.id, c.concurrency_key, c.concurrency_limit
        FROM unnest(p_tags) AS t(tag),
        LATERAL (
            SELECT j.id, j.priority, j.scheduled_for, j.concurrency_key, j.concurrency_limit
            FROM jobs j
            WHERE j.status = 'queued' AND j.tag = t.tag AND j.scheduled_for <= now()
            ORDER BY j.priority DESC, j.scheduled_for
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        ) c
        ORDER BY c.priority DESC, c.scheduled_for
        LIMIT p_limit
    LOOP
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

    IF cardinality(deferred) > 0 THEN
        UPDATE jobs SET scheduled_for = now() + interval '250 milliseconds'
        WHERE id = ANY (deferred);
    END IF;

    RETURN QUERY
    UPDATE jobs SET status = 'running', worker_id = p_worker, started_at = now(),
                    attempt = attempt + 1
    WHERE id = ANY (claimed)
    RETURNING *;
END $$;

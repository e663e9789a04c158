-- Gristmill runtime schema, part 5: the audit trail, run labels, and the indexes of the
-- run listing (GET /api/v1/namespaces/{ns}/runs).

-- Every change a caller makes (submit, cancel, approve, reject, restart): who, what, which
-- run, when, from where. Written in the transaction of the change it records, so neither
-- commits without the other. Partitioned by day of `at` like job_history, so retention is
-- DROP TABLE of old partitions (housekeeping, store/maintenance.py).
CREATE SEQUENCE audit_seq;
CREATE TABLE audit (
    id         bigint NOT NULL DEFAULT nextval('audit_seq'),
    at         timestamptz NOT NULL DEFAULT now(),
    namespace  text NOT NULL,
    username   text NOT NULL,
    uid        text NOT NULL DEFAULT '',
    groups     text[] NOT NULL DEFAULT '{}',
    -- Schedule and webhook changes widen this list in their own migration.
    action     text NOT NULL CONSTRAINT audit_action_known
               CHECK (action IN ('submit', 'cancel', 'approve', 'reject', 'restart')),
    run_id     uuid,
    target     text,                          -- the Script or Flow name
    source     text NOT NULL DEFAULT '',      -- the client's address, as the API saw it
    -- A few facts of the change (a step, a new run's id), never a run's input.
    detail     jsonb NOT NULL DEFAULT '{}' CONSTRAINT audit_detail_small
               CHECK (octet_length(detail::text) <= 4096)
) PARTITION BY RANGE (at);
-- What the audit listing reads: a namespace's rows, newest first, a keyset page at a time;
-- and every row of one run.
CREATE INDEX audit_by_namespace ON audit (namespace, at DESC, id DESC);
CREATE INDEX audit_by_run ON audit (run_id, at DESC, id DESC) WHERE run_id IS NOT NULL;
CREATE TABLE audit_default PARTITION OF audit DEFAULT;

-- Labels of a run (Kubernetes-style key/value pairs given on submit), for filtering the
-- listing. Steps' jobs carry none: only the runs a caller submits are labelled.
ALTER TABLE jobs ADD COLUMN labels jsonb NOT NULL DEFAULT '{}';
ALTER TABLE job_history ADD COLUMN labels jsonb NOT NULL DEFAULT '{}';
ALTER TABLE flow_runs ADD COLUMN labels jsonb NOT NULL DEFAULT '{}';

-- The run listing shows top-level runs: Script runs (jobs of no flow, queued and running
-- in `jobs`, finished in `job_history`) and Flow runs of no parent, newest first by
-- (created_at, id). It reads each status with its own ordered index scan (a status
-- filter, or every status) and merges them, so a page costs a few index probes
-- whatever the table's size; a Script or Flow name narrows the probe to its own index.
--
-- `jobs` is the hot queue table: one index only (its queued and running rows are few),
-- so that claims and completions pay as little as possible for the listing.
CREATE INDEX jobs_runs_listed ON jobs (namespace, created_at DESC, id DESC)
    WHERE flow_run_id IS NULL;

CREATE INDEX job_history_runs_by_status ON job_history
    (namespace, status, created_at DESC, id DESC) WHERE flow_run_id IS NULL;
CREATE INDEX job_history_runs_by_script ON job_history
    (namespace, script_name, status, created_at DESC, id DESC) WHERE flow_run_id IS NULL;
CREATE INDEX job_history_runs_by_label ON job_history USING gin (labels jsonb_path_ops)
    WHERE flow_run_id IS NULL AND labels <> '{}';

CREATE INDEX flow_runs_listed_by_status ON flow_runs
    (namespace, status, created_at DESC, id DESC) WHERE parent_run_id IS NULL;
CREATE INDEX flow_runs_listed_by_flow ON flow_runs
    (namespace, flow_name, status, created_at DESC, id DESC) WHERE parent_run_id IS NULL;
CREATE INDEX flow_runs_listed_by_label ON flow_runs USING gin (labels jsonb_path_ops)
    WHERE parent_run_id IS NULL AND labels <> '{}';

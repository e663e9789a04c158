-- Gristmill runtime schema, part 2: flows.
--
-- A flow run's state is its `flow_runs` row (locked while it advances), one
-- `flow_steps` row per step instance (path = step id plus loop indices, e.g.
-- `resize[3]`), and `flow_iterations` for forEach items and their results.
-- Steps that run code are ordinary jobs carrying `flow_run_id` and `step_path`.

CREATE TABLE flow_versions (
    hash        text PRIMARY KEY,
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE flows (
    namespace   text NOT NULL,
    name        text NOT NULL,
    hash        text NOT NULL REFERENCES flow_versions (hash),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);

CREATE TABLE flow_runs (
    id              uuid PRIMARY KEY,
    namespace       text NOT NULL,
    flow_name       text NOT NULL,
    flow_hash       text NOT NULL REFERENCES flow_versions (hash),
    status          text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    input           jsonb NOT NULL,
    result          jsonb,
    error           jsonb,
    priority        smallint NOT NULL DEFAULT 0,
    -- Versions pinned when the run was submitted: {"scripts": {name: hash}, "flows": {name: hash}}.
    pins            jsonb NOT NULL,
    parent_run_id   uuid REFERENCES flow_runs (id),
    parent_path     text,
    restarted_from  uuid REFERENCES flow_runs (id),
    failure_handled boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz
);
CREATE INDEX flow_runs_waiting ON flow_runs (namespace, flow_name, created_at) WHERE status = 'queued';
CREATE INDEX flow_runs_active ON flow_runs (namespace, flow_name) WHERE status = 'running';
CREATE INDEX flow_runs_children ON flow_runs (parent_run_id) WHERE parent_run_id IS NOT NULL;

CREATE TABLE flow_steps (
    run_id       uuid NOT NULL REFERENCES flow_runs (id) ON DELETE CASCADE,
    path         text NOT NULL,
    step_id      text NOT NULL,
    status       text NOT NULL CHECK (status IN ('sleeping', 'running', 'suspended', 'succeeded',
                                                 'failed', 'skipped', 'cancelled')),
    result       jsonb,
    error        jsonb,
    job_id       uuid,
    child_run_id uuid,
    state        jsonb NOT NULL DEFAULT '{}',   -- container bookkeeping: counters, chosen branch
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    PRIMARY KEY (run_id, path)
);

CREATE TABLE flow_iterations (
    run_id      uuid NOT NULL REFERENCES flow_runs (id) ON DELETE CASCADE,
    path        text NOT NULL,       -- the forEach step instance
    index       integer NOT NULL,
    item        jsonb,
    result      jsonb,
    PRIMARY KEY (run_id, path, index)
);

ALTER TABLE jobs ADD COLUMN flow_run_id uuid, ADD COLUMN step_path text,
                 ADD COLUMN retry_policy jsonb, ADD COLUMN timeout_s double precision;
CREATE INDEX jobs_by_flow_run ON jobs (flow_run_id) WHERE flow_run_id IS NOT NULL;
ALTER TABLE job_history ADD COLUMN flow_run_id uuid, ADD COLUMN step_path text;

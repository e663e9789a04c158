-- Idempotency keys of submits (the Idempotency-Key header): a retried request with the
-- same key and body gets the first response back instead of making a second run.
-- Scoped to the namespace and the route (`scripts/NAME/runs`, `flows/NAME/runs`);
-- rows older than the key lifetime (24 h) are ignored and deleted by retention.
CREATE TABLE idempotency_keys (
    namespace    text NOT NULL,
    route        text NOT NULL,
    key          text NOT NULL,
    fingerprint  text NOT NULL,          -- sha256 of the request body, canonical JSON
    status       smallint NOT NULL,      -- the first response's HTTP status
    response     jsonb NOT NULL,         -- and its body
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, route, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);

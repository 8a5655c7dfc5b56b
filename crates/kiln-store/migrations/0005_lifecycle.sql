-- The sandbox lifecycle: snapshots of sandboxes, forks, auto-pause and auto-delete, and
-- the system team that owns the system templates.

-- Snapshots of sandboxes. A snapshot outlives its source sandbox (no foreign key to it)
-- and pins its template: its disk is a layer over the template build's disk.
CREATE TABLE snapshots (
    id               TEXT PRIMARY KEY,
    team_id          TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    sandbox_id       TEXT NOT NULL,
    template_id      TEXT NOT NULL REFERENCES templates (id),
    build_id         TEXT NOT NULL REFERENCES builds (id),
    name             TEXT,
    kind             TEXT NOT NULL DEFAULT 'mem+fs',
    status           TEXT NOT NULL CHECK (status IN ('creating', 'ready', 'failed', 'deleting')),
    error_message    TEXT,
    size_bytes       INTEGER NOT NULL DEFAULT 0,
    vcpu_count       INTEGER NOT NULL,
    memory_mib       INTEGER NOT NULL,
    disk_mib         INTEGER NOT NULL,
    -- A retried create with the same key (for the same sandbox) answers this snapshot.
    idempotency_key  TEXT,
    -- The process capturing it: after a crash, a `creating` snapshot whose runner is gone
    -- is failed.
    runner_pid       INTEGER,
    created_at       TEXT NOT NULL,
    ready_at         TEXT,
    UNIQUE (team_id, sandbox_id, idempotency_key)
);
CREATE INDEX snapshots_team ON snapshots (team_id, created_at);
CREATE INDEX snapshots_sandbox ON snapshots (sandbox_id, created_at);
CREATE INDEX snapshots_template ON snapshots (template_id);

-- Where a sandbox came from, and its timers. `pause_at` is set while it is active with a
-- timeout, `delete_at` while it is paused with an auto-delete window: stored deadlines, so
-- that they survive a restart.
ALTER TABLE sandboxes ADD COLUMN source_snapshot_id TEXT;
ALTER TABLE sandboxes ADD COLUMN timeout_seconds INTEGER;
ALTER TABLE sandboxes ADD COLUMN auto_delete_seconds INTEGER;
ALTER TABLE sandboxes ADD COLUMN pause_at TEXT;
ALTER TABLE sandboxes ADD COLUMN delete_at TEXT;
CREATE INDEX sandboxes_deadlines ON sandboxes (status) WHERE pause_at IS NOT NULL OR delete_at IS NOT NULL;

-- The owner of the system templates (`superserve/...`), visible to every team. Its id is
-- not a UUID, so no team created by kiln can have it.
INSERT INTO teams (id, name, created_at)
VALUES ('system', 'superserve/system', '1970-01-01T00:00:00+00:00');

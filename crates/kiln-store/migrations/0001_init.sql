-- kiln metadata, version 1.
--
-- Portable on purpose: TEXT ids (UUIDs), RFC 3339 TEXT timestamps, JSON as TEXT, statuses
-- as TEXT guarded by CHECK, so the same schema can be translated to PostgreSQL verbatim.

CREATE TABLE teams (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    team_id       TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    -- sha256 hex of the plaintext key; the key itself is never stored.
    key_hash      TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT
);
CREATE INDEX api_keys_team ON api_keys (team_id);

CREATE TABLE templates (
    id                TEXT PRIMARY KEY,
    team_id           TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name              TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('pending', 'building', 'ready', 'failed')),
    vcpu              INTEGER NOT NULL,
    memory_mib        INTEGER NOT NULL,
    disk_mib          INTEGER NOT NULL,
    build_spec        TEXT NOT NULL,
    size_bytes        INTEGER,
    error_message     TEXT,
    created_at        TEXT NOT NULL,
    built_at          TEXT,
    latest_build_id   TEXT,
    -- The build whose artifact sandboxes are started from (the last one that succeeded).
    current_build_id  TEXT,
    UNIQUE (team_id, name)
);

CREATE TABLE builds (
    id               TEXT PRIMARY KEY,
    template_id      TEXT NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    -- Denormalised from the template so per-team limits are one indexed count.
    team_id          TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    status           TEXT NOT NULL CHECK (status IN
                        ('pending', 'building', 'snapshotting', 'ready', 'failed', 'cancelled')),
    build_spec_hash  TEXT NOT NULL,
    image_digest     TEXT,
    error_message    TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finalized_at     TEXT
);
CREATE INDEX builds_template ON builds (template_id);
CREATE INDEX builds_team_status ON builds (team_id, status);
CREATE INDEX builds_status ON builds (status);

CREATE TABLE build_logs (
    build_id   TEXT NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    timestamp  TEXT NOT NULL,
    stream     TEXT NOT NULL CHECK (stream IN ('stdout', 'stderr', 'system')),
    text       TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);

CREATE TABLE sandboxes (
    id                 TEXT PRIMARY KEY,
    team_id            TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    template_id        TEXT NOT NULL REFERENCES templates (id),
    build_id           TEXT NOT NULL REFERENCES builds (id),
    name               TEXT NOT NULL,
    status             TEXT NOT NULL CHECK (status IN
                          ('starting', 'active', 'pausing', 'paused', 'resuming', 'migrating',
                           'failed', 'deleted')),
    vcpu_count         INTEGER NOT NULL,
    memory_mib         INTEGER NOT NULL,
    metadata           TEXT NOT NULL DEFAULT '{}',
    env                TEXT NOT NULL DEFAULT '{}',
    access_token_hash  TEXT NOT NULL,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);
CREATE INDEX sandboxes_team_status ON sandboxes (team_id, status);
CREATE INDEX sandboxes_template ON sandboxes (template_id);

-- Preview URLs (a sandbox's web ports reached from a browser).
--
-- A sandbox's policy: 'public' or 'private' serve published ports only (the engine gives
-- new sandboxes 'public' unless they choose), 'legacy_public' serves every listening
-- port. Sandboxes from before previews made no choice, and keep every port reachable.
ALTER TABLE sandboxes ADD COLUMN preview_access TEXT NOT NULL DEFAULT 'legacy_public'
    CHECK (preview_access IN ('legacy_public', 'public', 'private'));

-- Ports a sandbox published, and the generation of their tokens. Unpublishing keeps the
-- row (published = 0) and bumps the generation, and so does rotating: a token of an
-- earlier generation never opens the port again, even once it is published anew.
CREATE TABLE preview_ports (
    sandbox_id     TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    port           INTEGER NOT NULL CHECK (port BETWEEN 1024 AND 65535),
    access         TEXT NOT NULL CHECK (access IN ('public', 'private')),
    token_version  INTEGER NOT NULL DEFAULT 1,
    published      INTEGER NOT NULL DEFAULT 1,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, port)
);

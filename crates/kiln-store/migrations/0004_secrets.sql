-- Team secrets: values sealed with the secrets key (kiln_net::seal), never in clear.
CREATE TABLE secrets (
    id          TEXT PRIMARY KEY,
    team_id     TEXT NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    -- The auth shape (the wire's JSON) and the hosts (JSON list) the value may go to.
    auth        TEXT NOT NULL,
    hosts       TEXT NOT NULL,
    -- The catalog shortcut it was created from, if any (names its stand-ins' shape).
    provider    TEXT,
    -- `v1.<key id>.<nonce>.<ciphertext>`, bound to this row's id.
    sealed      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    UNIQUE (team_id, name)
);

-- A sandbox's secret bindings (JSON list: env key, secret, stand-in, state, auth, hosts),
-- changed only in the store's write transactions. Detached and revoked bindings stay, so
-- that their stand-ins are refused at egress.
ALTER TABLE sandboxes ADD COLUMN secrets TEXT NOT NULL DEFAULT '[]';

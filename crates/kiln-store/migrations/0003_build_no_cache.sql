-- A build asked to bypass the build cache (`force: true`, `kiln template build --no-cache`).
ALTER TABLE builds ADD COLUMN no_cache INTEGER NOT NULL DEFAULT 0;

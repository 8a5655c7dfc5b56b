-- The process running (or waiting to run) a build. A server that starts after a crash
-- fails only the builds whose runner is gone, not those a live CLI process is running.
ALTER TABLE builds ADD COLUMN runner_pid INTEGER;

#!/usr/bin/env bash
# The main job, from a fresh machine: set kiln up, serve Debian base images from a local
# registry (Docker Hub is out of reach on these hosts, so a local mirror of docker.io
# stands in for it), build the example templates, start a sandbox and show its live server
# answering from inside.
#
# State goes to KILN_HOME (default ~/.local/share/kiln). The registry keeps running for
# further builds; `scripts/test-registry.sh stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

install_debian_packages

log "building kiln and its guest agent"
cargo build --release --locked -q -p kiln-cli
KILN_AGENT_BIN="$(scripts/build-agent.sh)"
export KILN_AGENT_BIN
kiln="$(pwd)/target/release/kiln"

log "kiln setup: guest kernel, initramfs, accelerator"
"$kiln" setup

log "a local registry with Debian base images"
scripts/test-rootfs.sh
scripts/test-registry.sh start
# shellcheck disable=SC1091
source "$KILN_TEST_ASSETS/registry.env"
# The examples say `python:3.11` and `debian:bookworm`, as a user would; the local
# registry serves Debian bookworm images under those Docker Hub names (bookworm's python3
# is 3.11), and kiln is pointed at it as its docker.io mirror.
for pair in "kiln/python:latest library/python:3.11" "kiln/minbase:latest library/debian:bookworm"; do
    read -r src dst <<<"$pair"
    skopeo copy -q --all --src-tls-verify=false --dest-tls-verify=false \
        "docker://$KILN_TEST_REGISTRY/$src" "docker://$KILN_TEST_REGISTRY/$dst"
done
export KILN_REGISTRY_MIRRORS="docker.io=http://$KILN_TEST_REGISTRY"

log "validating examples/"
for f in examples/*.json; do "$kiln" validate "$f" >/dev/null && echo "  $f: valid"; done
echo "  examples/invalid/many-problems.json, as kiln reports it:"
"$kiln" validate examples/invalid/many-problems.json 2>&1 | sed 's/^/    /' || true

log "building the example templates"
"$kiln" template build -f examples/tools.wire.json
"$kiln" template build -f examples/hello-http.json
"$kiln" template ls

log "a sandbox from hello-http: its server was started at build time and is live at once"
id=$("$kiln" sandbox create hello-http --env VISITOR=quickstart)
echo "sandbox $id"
"$kiln" sandbox exec "$id" -- 'echo "whoami: $(id -un), cwd: $(pwd), VISITOR=$VISITOR"'
echo "GET http://127.0.0.1:8000/ from inside the sandbox:"
"$kiln" sandbox exec "$id" -- curl -fsS http://127.0.0.1:8000/
"$kiln" sandbox kill "$id" >/dev/null
log "done; next: $kiln sandbox create hello-http, then $kiln sandbox exec ID -- CMD"

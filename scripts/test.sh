#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (Debian packages, the
# static guest agent, the guest kernel, test base images and a local registry), then runs
# the format and lint checks and every test, VM tests included (they boot QEMU under TCG
# where there is no usable KVM). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

log "format"
cargo fmt --all --check

install_debian_packages

log "guest agent (static)"
KILN_AGENT_BIN="$(scripts/build-agent.sh)"
export KILN_AGENT_BIN

log "guest kernel and initramfs for the test state dir"
KILN_HOME="$KILN_TEST_ASSETS/state" cargo run --locked -q -p kiln-cli -- setup --no-packages

log "test base images and the local registry"
scripts/test-rootfs.sh
scripts/test-registry.sh start
trap 'scripts/test-registry.sh stop || true' EXIT

log "python SDK for the end-to-end test"
scripts/sdk-venv.sh >/dev/null
log "TypeScript SDK for the end-to-end test"
scripts/sdk-node.sh >/dev/null
log "Playwright for the console's browser test"
scripts/browser-venv.sh >/dev/null

log "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "test"
cargo test --workspace --locked

log "no VM left behind"
if pgrep -af 'qemu-system' | grep -F "$KILN_TEST_ASSETS"; then
    echo "qemu processes of the test suite are still running" >&2
    exit 1
fi

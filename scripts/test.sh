#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs, then runs format and
# lint checks and every test (VM tests included; they boot QEMU under TCG where there is no
# usable KVM). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

install_debian_packages

log "format"
cargo fmt --all --check

log "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "test"
cargo test --workspace --locked

#!/usr/bin/env bash
# Issue 8's benchmark, from a fresh machine: one command that sets up what it needs (as
# scripts/test.sh does: Debian packages, the static guest agent, the guest kernel in the
# test state dir, the local registry with the test images), builds kiln and the harness in
# release mode, and runs `kiln-bench` once. That one process measures everything side by
# side and computes every ratio within the run (the host is shared and noisy: compare
# ratios, not milliseconds).
#
#   scripts/bench.sh                 the full run (about 10-15 min on 2 cores under TCG)
#   scripts/bench.sh --quick         small sample counts, for trying it out
#   scripts/bench.sh --help          every option (sample counts, --out, --keep-state, ...)
#
# Results: target/kiln-bench/<UTC time>/bench.json and bench.md (also printed), and
# target/kiln-bench/latest pointing at them. docs/performance.md explains the figures.
#
# Every VM and server the harness starts is stopped on exit, error and Ctrl-C; the local
# registry is stopped at the end only if this script started it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

for a in "$@"; do
    case "$a" in
        -h|--help)
            cargo run --release --locked -q -p kiln-bench -- --help
            exit 0 ;;
    esac
done

install_debian_packages

log "guest agent (static)"
KILN_AGENT_BIN="$(scripts/build-agent.sh)"
export KILN_AGENT_BIN

log "kiln and kiln-bench (release)"
cargo build --release --locked -q -p kiln-cli -p kiln-bench
kiln="$(pwd)/target/release/kiln"

log "guest kernel and initramfs (test state dir)"
KILN_HOME="$KILN_TEST_ASSETS/state" "$kiln" setup --no-packages >/dev/null

log "local registry with the test images"
registry_was_up=false
if env_text="$(scripts/test-registry.sh env 2>/dev/null)"; then
    reg="$(sed -n 's/^KILN_TEST_REGISTRY=//p' <<<"$env_text")"
    if [ -n "$reg" ] && curl -fsS -o /dev/null -m 2 "http://$reg/v2/" 2>/dev/null; then
        registry_was_up=true
    fi
fi
scripts/test-registry.sh start >/dev/null
# shellcheck disable=SC1091
source "$KILN_TEST_ASSETS/registry.env"
export KILN_TEST_REGISTRY

out_given=false
for a in "$@"; do
    case "$a" in --out|--out=*) out_given=true ;; esac
done
args=("$@")
if ! $out_given; then
    out="target/kiln-bench/$(date -u +%Y%m%dT%H%M%SZ)"
    args=(--out "$out" "${args[@]}")
fi

bench_pid=""
cleanup() {
    local rc=$?
    if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
        kill -TERM "$bench_pid" 2>/dev/null || true
        wait "$bench_pid" 2>/dev/null || true
    fi
    if ! $registry_was_up; then
        scripts/test-registry.sh stop >/dev/null 2>&1 || true
    fi
    if pgrep -af 'qemu-system' | grep -F "$KILN_TEST_ASSETS/bench/"; then
        echo "bench.sh: QEMU processes of the benchmark are still running" >&2
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "kiln-bench ${args[*]}"
# In the background so that the traps run (and forward a TERM) while it works.
target/release/kiln-bench --kiln-bin "$kiln" "${args[@]}" &
bench_pid=$!
wait "$bench_pid"
bench_pid=""
if ! $out_given; then
    ln -sfn "$(basename "$out")" target/kiln-bench/latest
    log "results: $out/bench.json, $out/bench.md (target/kiln-bench/latest)"
fi

#!/usr/bin/env bash
# Build the kiln guest agent as a static glibc binary (there is no musl target here) and
# print its path. The explicit --target keeps crt-static away from proc-macros.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build -p kiln-agent --release --target x86_64-unknown-linux-gnu >&2
bin="$(pwd)/target/x86_64-unknown-linux-gnu/release/kiln-agent"
# Debug info makes it ~17 MB; the initramfs wants ~3 MB.
strip "$bin" 2>/dev/null || true
if ! file "$bin" | grep -Eq 'static-pie linked|statically linked'; then
  echo "build-agent.sh: $bin is not statically linked" >&2
  file "$bin" >&2
  exit 1
fi
echo "$bin"

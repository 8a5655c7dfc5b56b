#!/usr/bin/env bash
# Builds the small Debian root filesystems that kiln's tests and quickstart use as base
# images, from Debian packages (Docker Hub is out of reach on these machines).
#
#   scripts/test-rootfs.sh [NAME...]     NAME: minbase | python   (default: both)
#
# Each becomes $KILN_TEST_ASSETS/rootfs/NAME.tar (default /var/tmp/kiln-test-assets), built
# once and reused: the tarball is written under a temp name and renamed, so a killed run
# never leaves a half-built one behind.
set -euo pipefail

assets="${KILN_TEST_ASSETS:-/var/tmp/kiln-test-assets}"
suite="${KILN_TEST_SUITE:-bookworm}"
mkdir -p "$assets/rootfs"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need mmdebstrap; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
fi

build() {
    local name=$1 out="$assets/rootfs/$1.tar" include=""
    case "$name" in
        minbase) include="" ;;
        # python3 answers HTTP for the startCmd/readyCmd examples, curl probes readiness,
        # sudo serves `user: {sudo: true}` steps.
        python) include="python3-minimal,python3,curl,sudo" ;;
        *) echo "unknown rootfs $name" >&2; return 2 ;;
    esac
    # The package list is the cache key: change it and the tarball is rebuilt.
    local stamp="$assets/rootfs/$name.packages"
    if [ -f "$out" ] && [ -s "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$suite:$include" ]; then
        return 0
    fi
    echo "building rootfs $name ($suite) -> $out" >&2
    # mmdebstrap picks its output format from the extension: keep .tar last.
    local tmp="$assets/rootfs/.$name.$$.tar"
    # --variant=minbase keeps it small; apt lists and docs are dropped for size.
    mmdebstrap --quiet --variant=minbase ${include:+--include="$include"} \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        --format=tar "$suite" "$tmp"
    mv -f "$tmp" "$out"
    echo "$suite:$include" > "$stamp"
}

names=("$@")
[ ${#names[@]} -gt 0 ] || names=(minbase python)
for n in "${names[@]}"; do build "$n"; done

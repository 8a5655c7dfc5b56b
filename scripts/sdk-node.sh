#!/usr/bin/env bash
# Superserve's official TypeScript SDK, installed for the end-to-end test that drives
# `kiln serve` with it (crates/kiln-cli/tests/sdk_typescript.rs, tests/sdk/ts/scenario.mjs).
#
#   scripts/sdk-node.sh        install or reuse $KILN_TEST_ASSETS/sdk-node; prints its
#                              node_modules dir
#
# `npm ci` from tests/sdk/ts/package-lock.json into $KILN_TEST_ASSETS/sdk-node (package.json
# and the lock are copied there, so the repository tree stays clean). Idempotent: an install
# made from the same lock is reused without touching the network. Without node/npm it
# installs Debian's nodejs and npm (Node 18 there: the scenario then uses the `ws` package
# as the SDK's WebSocket).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

# The SDK version kiln's server is checked against. Bump it (and the lock) with the wire
# format: cd tests/sdk/ts && npm install --package-lock-only --save-exact @superserve/sdk@X
SDK_VERSION="0.8.1"

src="tests/sdk/ts"
dest="$KILN_TEST_ASSETS/sdk-node"
stamp="$dest/node_modules/.kiln-sdk-node-stamp"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    missing=()
    command -v node >/dev/null || missing+=(nodejs)
    command -v npm >/dev/null || missing+=(npm)
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# What the install was made from: the manifest, the lock and the Node major version.
want="$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -d' ' -f1) node-$(node -p 'process.versions.node.split(".")[0]')"

installed_version() {
    node -p 'require(process.argv[1]).version' \
        "$dest/node_modules/@superserve/sdk/package.json" 2>/dev/null || true
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && [ "$(installed_version)" = "$SDK_VERSION" ] && [ -d "$dest/node_modules/ws" ]; then
    echo "$dest/node_modules"
    exit 0
fi

log "installing @superserve/sdk@$SDK_VERSION into $dest (npm ci)"
mkdir -p "$dest"
cp "$src/package.json" "$src/package-lock.json" "$dest/"
# npm ci removes node_modules first: an install interrupted half-way has no stamp and is
# redone from scratch.
(cd "$dest" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >&2)
if [ "$(installed_version)" != "$SDK_VERSION" ]; then
    echo "sdk-node: @superserve/sdk $SDK_VERSION did not install into $dest" >&2
    exit 1
fi
echo "$want" >"$stamp"
echo "$dest/node_modules"

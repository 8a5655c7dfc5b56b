#!/usr/bin/env bash
# A Python virtualenv with Superserve's official SDK, for the end-to-end test that drives
# `kiln serve` with it (crates/kiln-cli/tests/sdk_python.rs, tests/sdk/python/scenario.py).
#
#   scripts/sdk-venv.sh        create or reuse $KILN_TEST_ASSETS/sdk-venv; prints its python
#
# Idempotent: a venv that already has the pinned SDK is reused without touching the
# network. Needs python3 with the venv module (Debian: python3-venv) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

# The SDK version kiln's server is checked against. Bump it with the wire format.
SDK_VERSION="0.11.4"

venv="$KILN_TEST_ASSETS/sdk-venv"
py="$venv/bin/python"
python="${KILN_PYTHON:-python3}"

installed_version() {
    "$py" -c 'import importlib.metadata as m; print(m.version("superserve"))' 2>/dev/null || true
}

if [ -x "$py" ] && [ "$(installed_version)" = "$SDK_VERSION" ] \
    && "$py" -c 'import superserve, websockets, httpx' 2>/dev/null; then
    echo "$py"
    exit 0
fi

if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "sdk-venv: $python has no venv/ensurepip module: install Debian's python3-venv" >&2
    exit 1
fi

log "creating $venv with superserve==$SDK_VERSION"
mkdir -p "$KILN_TEST_ASSETS"
# From scratch: a venv left half-installed by an interrupted run fails the check above.
rm -rf "$venv"
"$python" -m venv "$venv"
"$py" -m pip install -q --disable-pip-version-check "superserve==$SDK_VERSION" >&2
if [ "$(installed_version)" != "$SDK_VERSION" ] || ! "$py" -c 'import superserve, websockets, httpx'; then
    echo "sdk-venv: superserve $SDK_VERSION did not install into $venv" >&2
    exit 1
fi
echo "$py"

#!/usr/bin/env bash
# A Python virtualenv with Playwright, for the console's browser test
# (crates/kiln-cli/tests/console_browser.rs, tests/console/browser_test.py). The browser
# is Debian's chromium (scripts/lib.sh installs it): Playwright's own browser download is
# never used.
#
#   scripts/browser-venv.sh    create or reuse $KILN_TEST_ASSETS/browser-venv; prints its python
#
# Idempotent: a venv that already has the pinned Playwright is reused without the network.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

PLAYWRIGHT_VERSION="1.65.2"

venv="$KILN_TEST_ASSETS/browser-venv"
py="$venv/bin/python"
python="${KILN_PYTHON:-python3}"

installed_version() {
    "$py" -c 'import importlib.metadata as m; print(m.version("playwright"))' 2>/dev/null || true
}

if [ -x "$py" ] && [ "$(installed_version)" = "$PLAYWRIGHT_VERSION" ]; then
    echo "$py"
    exit 0
fi

if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "browser-venv: $python has no venv/ensurepip module: install Debian's python3-venv" >&2
    exit 1
fi

log "creating $venv with playwright==$PLAYWRIGHT_VERSION"
mkdir -p "$KILN_TEST_ASSETS"
rm -rf "$venv"
"$python" -m venv "$venv"
"$py" -m pip install -q --disable-pip-version-check "playwright==$PLAYWRIGHT_VERSION" >&2
if [ "$(installed_version)" != "$PLAYWRIGHT_VERSION" ]; then
    echo "browser-venv: playwright $PLAYWRIGHT_VERSION did not install into $venv" >&2
    exit 1
fi
echo "$py"

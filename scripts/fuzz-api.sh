#!/usr/bin/env bash
# Fuzzes kiln's HTTP API with schemathesis, against the server's own /openapi.json.
#
#   scripts/fuzz-api.sh [-n MAX_EXAMPLES] [--seed N] [--max-time SECS] [-- EXTRA st run ARGS]
#
# Builds the CLI, starts `kiln serve` on a fresh state dir (no kernel there: builds end
# at once with boot_failed, which is all the API needs), creates an API key for team
# `fuzz`, and runs schemathesis (pinned, in $KILN_TEST_ASSETS/schemathesis-venv) with
# the checks below. Data-plane operations are routed to a sandbox id that does not
# exist. Rate limiting is off. The server is stopped at the end, whatever happens; its
# log and schemathesis' reports are kept in $KILN_TEST_ASSETS/fuzz-api/<run>/.
# Exits non-zero when schemathesis reports a failure.
#
# Environment: ST_CHECKS overrides the checks; ST_WORKERS the number of workers (2).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

# The schemathesis version the API is checked with. Bump it deliberately: check names
# and CLI flags change between releases.
ST_VERSION="4.32.5"
CHECKS="${ST_CHECKS:-not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance}"
WORKERS="${ST_WORKERS:-2}"

max_examples=500
seed=""
max_time=""
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        -n | --max-examples) max_examples="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --max-time) max_time="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "fuzz-api: unknown argument $1" >&2; exit 2 ;;
    esac
done

# --- schemathesis, pinned, in its own venv ---------------------------------------------
venv="$KILN_TEST_ASSETS/schemathesis-venv"
st="$venv/bin/st"
python="${KILN_PYTHON:-python3}"
if ! { [ -x "$st" ] && [ "$("$st" --version 2>/dev/null)" = "st, version $ST_VERSION" ]; }; then
    if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
        echo "fuzz-api: $python has no venv/ensurepip module: install Debian's python3-venv" >&2
        exit 1
    fi
    log "creating $venv with schemathesis==$ST_VERSION"
    mkdir -p "$KILN_TEST_ASSETS"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$ST_VERSION" >&2
fi

# --- kiln serve on a fresh state dir ----------------------------------------------------
log "building kiln"
cargo build -q -p kiln-cli
kiln="$PWD/target/debug/kiln"

run_dir="$KILN_TEST_ASSETS/fuzz-api/$(date +%Y%m%d-%H%M%S)-$$"
state="$run_dir/state"
mkdir -p "$state"
server_log="$run_dir/serve.log"

# Nothing here may leave the machine: builds fail before any pull, and any stray HTTP
# client honouring the proxy variables is sent to a closed loopback port.
export KILN_HOME="$state"
unset KILN_CONFIG KILN_LISTEN KILN_URL KILN_API_KEY
unset KILN_REGISTRY_MIRRORS
export HTTPS_PROXY="http://127.0.0.1:9" HTTP_PROXY="http://127.0.0.1:9"
export NO_PROXY="127.0.0.1,localhost" no_proxy="127.0.0.1,localhost"
export KILN_RATE_LIMIT_PER_SEC=0
# Generous quotas: the fuzzer creates many templates.
export KILN_MAX_TEMPLATES=100000 KILN_MAX_CONCURRENT_BUILDS=100000 KILN_MAX_SANDBOXES=100000

key="$("$kiln" admin create-api-key --team fuzz)"

server_pid=""
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
trap stop_server EXIT

log "starting kiln serve (state $state)"
"$kiln" serve --listen 127.0.0.1:0 >/dev/null 2>"$server_log" &
server_pid=$!
url=""
for _ in $(seq 1 600); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "fuzz-api: kiln serve exited; log:" >&2
        tail -n 30 "$server_log" >&2
        exit 1
    fi
    url="$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$server_log" | head -n 1)"
    [ -n "$url" ] && curl -fsS "$url/health" >/dev/null 2>&1 && break
    url=""
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "fuzz-api: kiln serve did not come up; log:" >&2
    tail -n 30 "$server_log" >&2
    exit 1
fi
log "kiln serve at $url"

# --- schemathesis -----------------------------------------------------------------------
args=(
    run "$url/openapi.json"
    --url "$url"
    -H "X-API-Key: $key"
    -H "X-Superserve-Sandbox-Id: sbx-fuzz-does-not-exist"
    --checks "$CHECKS"
    --max-examples "$max_examples"
    --workers "$WORKERS"
    --request-timeout 30
    --suppress-health-check all
    --continue-on-failure
    --report junit,ndjson
    --report-dir "$run_dir/report"
)
[ -n "$seed" ] && args+=(--seed "$seed")
[ -n "$max_time" ] && args+=(--max-time "$max_time")

log "schemathesis $ST_VERSION: checks $CHECKS, up to $max_examples examples per operation"
status=0
"$st" "${args[@]}" "${extra[@]}" || status=$?

# What the server saw, from its own /metrics: requests by status.
metrics="$(curl -fsS "$url/metrics" 2>/dev/null || true)"
requests="$(printf '%s\n' "$metrics" \
    | awk '/^kiln_http_requests_total[{ ]/ { n += $NF } END { printf "%d", n }')"
by_status="$(printf '%s\n' "$metrics" | awk '/^kiln_http_requests_total[{ ]/ {
        match($0, /status="[0-9]+"/); s = substr($0, RSTART + 8, 3); n[s] += $NF }
    END { for (s in n) printf "%s:%d ", s, n[s] }')"
if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "fuzz-api: kiln serve died during the run; log: $server_log" >&2
    status=1
fi
stop_server
log "server handled ${requests:-?} requests (by status: ${by_status:-?}); log and reports in $run_dir"
exit "$status"

"""End-to-end scenario: Superserve's official Python SDK (superserve==0.11.4, unmodified)
against a running `kiln serve`.

Run by crates/kiln-cli/tests/sdk_python.rs with the venv of scripts/sdk-venv.sh. Only two
things of the SDK are redirected, both to the kiln server: the data-plane base URL (the
SDK derives it from its own domains) and the host of the exec WebSocket.

Environment:
  SUPERSERVE_API_KEY       an API key of the server (read by the SDK itself)
  SUPERSERVE_BASE_URL      http://HOST:PORT of `kiln serve` (read by the SDK itself)
  KILN_TEST_IMAGE_PYTHON   base image reference (python3 + curl + sudo) in the test registry
  KILN_MAX_TEMPLATES       the server's template limit; the scenario owns 2 templates when
                           it checks the limit, so it must be 2
  KILN_MAX_SANDBOXES       the server's sandbox limit; the scenario's two forks must reach it,
                           so it must be 2
  KILN_MAX_SNAPSHOTS       the server's snapshot limit; the scenario keeps one snapshot when
                           it checks the limit, so it must be 1
  KILN_SDK_UPSTREAM        http://127.0.0.1:PORT: an upstream the server lets sandboxes
                           reach (KILN_EGRESS_ALLOW_PRIVATE), answering every request with
                           `path=<path> authorization-sha256=<hex>`, for team secrets
  The server builds the system template superserve/base (KILN_SYSTEM_TEMPLATES=base) from
  the test registry's minbase image, for the create without a template.
  KILN_SDK_RUN_ID          optional suffix that keeps names unique (default: the pid)
  KILN_BROWSER_PYTHON      the python of scripts/browser-venv.sh (Playwright), which opens a
                           preview's signed URL in headless Chromium (preview_browser.py)
  KILN_CHROMIUM            the browser (default /usr/bin/chromium)

Every step asserts; a broken expectation prints `FAIL: ...` and exits 1 (after a
best-effort cleanup). Each step prints its duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import io
import os
import re
import subprocess
import sys
import time
import traceback
import zipfile
from typing import Any, Callable, Iterator, NoReturn
from urllib.parse import urlsplit

# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


class Failure(Exception):
    """A broken expectation."""


def fail(msg: str) -> NoReturn:
    raise Failure(msg)


def require_env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        print(f"FAIL: {name} is not set", flush=True)
        sys.exit(2)
    return value


BASE_URL = require_env("SUPERSERVE_BASE_URL").rstrip("/")
API_KEY = require_env("SUPERSERVE_API_KEY")
IMAGE = require_env("KILN_TEST_IMAGE_PYTHON")
BROWSER_PYTHON = require_env("KILN_BROWSER_PYTHON")
MAX_TEMPLATES = int(os.environ.get("KILN_MAX_TEMPLATES", "2"))
MAX_SANDBOXES = int(os.environ.get("KILN_MAX_SANDBOXES", "2"))
MAX_SNAPSHOTS = int(os.environ.get("KILN_MAX_SNAPSHOTS", "1"))
RUN_ID = os.environ.get("KILN_SDK_RUN_ID") or str(os.getpid())
UPSTREAM = require_env("KILN_SDK_UPSTREAM").rstrip("/")
# Never sent into a sandbox: only the server (and the upstream, through the egress proxy)
# gets it.
SECRET_VALUE = f"sk-live-sdk-{RUN_ID}-{os.urandom(8).hex()}"
SANDBOX_ID_HEADER = "X-Superserve-Sandbox-Id"

_base = urlsplit(BASE_URL)
if _base.scheme not in ("http", "https") or not _base.netloc:
    print(f"FAIL: SUPERSERVE_BASE_URL={BASE_URL!r} is not an http(s) URL", flush=True)
    sys.exit(2)
WS_BASE = f"{'wss' if _base.scheme == 'https' else 'ws'}://{_base.netloc}"

# ---------------------------------------------------------------------------------------
# Point the SDK's data plane at kiln (the only changes made to the SDK's behaviour)
# ---------------------------------------------------------------------------------------

import httpx  # noqa: E402
import websockets  # noqa: E402

import superserve._config as ss_config  # noqa: E402
import superserve.commands as ss_commands  # noqa: E402
import superserve.files as ss_files  # noqa: E402
from superserve._config import DataPlaneTarget  # noqa: E402


def kiln_data_plane_target(sandbox_id: str, sandbox_host: str) -> DataPlaneTarget:
    return DataPlaneTarget(url=BASE_URL, headers={SANDBOX_ID_HEADER: sandbox_id})


ss_config.data_plane_target = kiln_data_plane_target
ss_commands.data_plane_target = kiln_data_plane_target
ss_files.data_plane_target = kiln_data_plane_target

# commands.spawn dials wss://boxd-{id}.{sandbox_host}/exec/connect with
# `websockets.connect(uri, subprotocols=[...])` (it imports the module inside the call, so
# the module attribute is what it uses). Kiln serves it at ws://HOST:PORT/exec/connect
# with the sandbox named by header, like the rest of the data plane.
_ws_connect = websockets.connect
_ws_params = inspect.signature(_ws_connect).parameters
WS_HEADERS_KW = "additional_headers" if "additional_headers" in _ws_params else "extra_headers"
WS_DIALS: list[dict[str, Any]] = []


def kiln_ws_connect(uri: str, *args: Any, **kwargs: Any) -> Any:
    parts = urlsplit(uri)
    # netloc, not hostname: hostname lowercases, and an id is matched byte for byte.
    match = re.match(r"^boxd-([^.]+)\.", parts.netloc)
    if not match:
        return _ws_connect(uri, *args, **kwargs)
    headers = dict(kwargs.pop(WS_HEADERS_KW, None) or {})
    headers[SANDBOX_ID_HEADER] = match.group(1)
    kwargs[WS_HEADERS_KW] = headers
    target = f"{WS_BASE}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    WS_DIALS.append({"uri": uri, "target": target, "subprotocols": kwargs.get("subprotocols")})
    return _ws_connect(target, *args, **kwargs)


websockets.connect = kiln_ws_connect  # type: ignore[assignment]

from superserve import (  # noqa: E402
    AsyncSandbox,
    AuthenticationError,
    BuildError,
    ConflictError,
    BuildLogEvent,
    EnvStep,
    EnvStepValue,
    NetworkConfig,
    NotFoundError,
    PreviewAccess,
    Provider,
    RateLimitError,
    RunStep,
    Sandbox,
    SandboxError,
    SandboxStatus,
    Snapshot,
    SnapshotStatus,
    Secret,
    SecretAuthType,
    Template,
    TemplateBuildStatus,
    TemplateStatus,
    UserStep,
    UserStepValue,
    ValidationError,
    WorkdirStep,
)

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    say(f"-> {name}")
    started = time.monotonic()
    try:
        yield
    except Failure:
        raise
    except SandboxError as e:
        fail(
            f"{name}: {type(e).__name__}: {e} "
            f"(status_code={getattr(e, 'status_code', None)}, code={getattr(e, 'code', None)})"
        )
    except Exception as e:  # noqa: BLE001
        fail(f"{name}: unexpected {type(e).__name__}: {e}\n{traceback.format_exc()}")
    say(f"   ok: {name} ({time.monotonic() - started:.1f}s)")


def check(cond: bool, msg: str) -> None:
    if not cond:
        fail(msg)


def check_eq(actual: Any, expected: Any, what: str) -> None:
    if actual != expected:
        fail(f"{what}: expected {expected!r}, got {actual!r}")


def poll(what: str, timeout: float, probe: Callable[[], Any], interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    fail(f"{what}: not reached within {timeout:.0f}s (last probe: {last!r})")


def raw_get(path: str) -> str:
    """A plain request to the control plane, for diagnostics in failure messages."""
    try:
        r = httpx.get(f"{BASE_URL}{path}", headers={"X-API-Key": API_KEY}, timeout=10)
        return f"GET {path} -> {r.status_code} {r.text[:600]}"
    except Exception as e:  # noqa: BLE001
        return f"GET {path} -> {type(e).__name__}: {e}"


def name(kind: str) -> str:
    return f"sdk-{kind}-{RUN_ID}"


def upstream_answer(path: str, value: str) -> str:
    """What the upstream answers a request to `path` that carried `Bearer <value>`."""
    digest = hashlib.sha256(f"Bearer {value}".encode()).hexdigest()
    return f"path={path} authorization-sha256={digest}\n"


# The upstream is on the host's loopback: the guest's own addresses must not bypass the
# proxy for it.
VIA_PROXY = {"no_proxy": "", "NO_PROXY": ""}


# ---------------------------------------------------------------------------------------
# The scenario
# ---------------------------------------------------------------------------------------

cleanup: list[tuple[str, Callable[[], None]]] = []


def scenario() -> None:
    say(f"kiln at {BASE_URL}; image {IMAGE}; websockets {websockets.__version__} ({WS_HEADERS_KW})")
    with step("health"):
        r = httpx.get(f"{BASE_URL}/health", timeout=10)
        check_eq(r.status_code, 200, "GET /health status")

    with step("a wrong API key is refused (AuthenticationError)"):
        try:
            Template.list(api_key="not-a-kiln-key")
        except AuthenticationError as e:
            check_eq(e.status_code, 401, "status of a wrong key")
        else:
            fail("Template.list with a wrong API key succeeded")

    # -- templates: one that builds, one whose step fails, both queued up front so the
    #    two TCG builds overlap.
    with step("Template.create (web)"):
        web = Template.create(
            name=name("web"),
            from_=IMAGE,
            vcpu=1,
            memory_mib=384,
            disk_mib=1024,
            steps=[
                EnvStep(env=EnvStepValue(key="GREETING", value="hello")),
                RunStep(run="echo built > /opt/built.txt; echo run-step-stdout-marker"),
                UserStep(user=UserStepValue(name="app", sudo=True)),
                WorkdirStep(workdir="/srv/app"),
                RunStep(run='echo "$GREETING from $(id -un)" > index.html'),
            ],
            start_cmd="python3 -m http.server 8000 --bind 127.0.0.1",
            ready_cmd="curl -fsS http://127.0.0.1:8000/ >/dev/null",
        )
        cleanup.append(("delete template web", web.delete))
        check_eq(web.name, name("web"), "template name")
        check(bool(web.latest_build_id), f"no build id on the created template: {web!r}")
        check(
            web.status in (TemplateStatus.PENDING, TemplateStatus.BUILDING),
            f"new template status {web.status!r}",
        )
        check_eq((web.vcpu, web.memory_mib, web.disk_mib), (1, 384, 1024), "template resources")

    with step("Template.create (broken: run step exits 1)"):
        broken = Template.create(
            name=name("broken"),
            from_=IMAGE,
            memory_mib=384,
            disk_mib=1024,
            steps=[RunStep(run="echo about to fail; exit 1")],
        )
        cleanup.append(("delete template broken", broken.delete))

    with step(f"RateLimitError past the team's {MAX_TEMPLATES} templates"):
        check_eq(MAX_TEMPLATES, 2, "KILN_MAX_TEMPLATES (the scenario owns 2 templates here)")
        try:
            extra = Template.create(name=name("one-too-many"), from_=IMAGE, memory_mib=384, disk_mib=1024)
        except RateLimitError as e:
            check_eq(e.code, "too_many_templates", "RateLimitError.code")
            check_eq(e.status_code, 429, "RateLimitError.status_code")
        else:
            cleanup.append(("delete template one-too-many", extra.delete))
            fail(
                "a third template was accepted: the server does not enforce "
                f"KILN_MAX_TEMPLATES={MAX_TEMPLATES} (templates: "
                f"{[t.name for t in Template.list()]})"
            )

    with step("Template.list / connect"):
        names = {t.name for t in Template.list(name_prefix="sdk-")}
        check({name("web"), name("broken")} <= names, f"Template.list: {names}")
        again = Template.connect(name("web"))
        check_eq(again.id, web.id, "Template.connect(name).id")

    logs: list[BuildLogEvent] = []
    with step("web: wait_until_ready(on_log=...)"):
        info = web.wait_until_ready(on_log=logs.append, poll_interval_s=1.0)
        check_eq(info.status, TemplateStatus.READY, "template status after wait_until_ready")
        check(info.built_at is not None, f"built_at unset on a ready template: {info!r}")
        streams = sorted({e.stream.value for e in logs})
        say(f"   {len(logs)} log events, streams {streams}")
        for e in logs[:3] + logs[-3:]:
            say(f"   log: {e.stream.value}: {e.text!r} finished={e.finished} status={e.status}")
        if not logs:
            fail(
                "no build log events reached on_log (the SDK swallows SSE errors); "
                + raw_get(f"/templates/{web.id}/builds/{web.latest_build_id}/logs")
            )
        check(
            any(e.stream.value == "stdout" and "run-step-stdout-marker" in e.text for e in logs),
            "the run step's stdout line is not among the build logs",
        )
        check(any(e.stream.value == "system" for e in logs), "no system lines among the build logs")
        finished = [e for e in logs if e.finished]
        check(bool(finished), "the log stream ended without a finished event")
        check_eq(finished[-1].status, "ready", "status on the finished log event")
        builds = web.list_builds()
        check_eq([b.id for b in builds], [web.latest_build_id], "list_builds ids")
        build = web.get_build(web.latest_build_id)
        check_eq(build.status, TemplateBuildStatus.READY, "get_build status")
        check(build.build_spec_hash.startswith("sha256:"), f"build_spec_hash {build.build_spec_hash!r}")
        check(build.finalized_at is not None, "finalized_at unset on a ready build")

    with step("broken: wait_until_ready raises BuildError(step_failed)"):
        try:
            broken.wait_until_ready(poll_interval_s=1.0)
        except BuildError as e:
            say(f"   BuildError code={e.code} message={str(e)!r}")
            check_eq(e.code, "step_failed", "BuildError.code")
            check_eq(e.template_id, broken.id, "BuildError.template_id")
            check_eq(e.build_id, broken.latest_build_id, "BuildError.build_id")
        else:
            fail("a template whose run step exits 1 became ready")
        check_eq(broken.get_info().status, TemplateStatus.FAILED, "broken template status")

    with step("Sandbox.create from a template that is not ready (ConflictError)"):
        try:
            stray = Sandbox.create(name=name("stray"), from_template=broken)
        except ConflictError as e:
            say(f"   ConflictError code={e.code} message={str(e)!r}")
        else:
            cleanup.insert(0, ("kill stray sandbox", stray.kill))
            fail("a sandbox was created from a template whose build failed")

    # -- team secrets: the sandbox gets a stand-in, the upstream the value
    upstream_host = urlsplit(UPSTREAM).netloc
    with step("Provider.list / Secret.create / list / get"):
        providers = {p.name: p for p in Provider.list()}
        check({"openai", "anthropic", "github"} <= set(providers), f"providers: {list(providers)}")
        check_eq(providers["anthropic"].hosts, ["api.anthropic.com"], "anthropic's hosts")
        check(providers["openai"].token_shape.startswith("sk-"), f"{providers['openai']!r}")
        secret = Secret.create(
            name=name("upstream"), value=SECRET_VALUE, auth={"type": "bearer"}, hosts=[upstream_host]
        )
        cleanup.append(("delete secret", secret.delete))
        check_eq(secret.auth_type, SecretAuthType.BEARER, "auth_type")
        check_eq(secret.hosts, [upstream_host], "hosts")
        shortcut = Secret.create(name=name("anthropic"), value="sk-ant-unused", provider="anthropic")
        check_eq(
            (shortcut.provider_shortcut, shortcut.auth_type, shortcut.auth_config),
            ("anthropic", SecretAuthType.API_KEY, {"header": "x-api-key"}),
            "a provider shortcut's shape",
        )
        Secret.delete_by_name(shortcut.name)
        Secret.delete_by_name(shortcut.name)  # idempotent
        check(secret.name in [s.name for s in Secret.list()], "Secret.list")
        check_eq(Secret.get(secret.name).id, secret.id, "Secret.get")
        check(SECRET_VALUE not in repr(secret.get_info()), "the value came back")
        try:
            Secret.create(name=secret.name, value="x", provider="openai")
        except ConflictError:
            pass
        else:
            fail("a second secret of the same name was accepted")

    # -- a sandbox from the template
    metadata = {"suite": "sdk-e2e", "run": RUN_ID}
    with step("Sandbox.create"):
        sandbox = Sandbox.create(
            name=name("box"),
            from_template=web,
            env_vars={"KILN_SDK_VAR": "from-env-vars", "GREETING": "overridden"},
            metadata=metadata,
            secrets={"UPSTREAM_TOKEN": secret.name},
        )
        cleanup.insert(0, ("kill sandbox", sandbox.kill))
        check_eq(sandbox.name, name("box"), "sandbox name")
        check_eq(sandbox.status, SandboxStatus.ACTIVE, "status returned by Sandbox.create")
        check_eq(sandbox.metadata, metadata, "metadata returned by Sandbox.create")
        check_eq(
            [(b.env_key, b.secret_name) for b in sandbox.secrets or []],
            [("UPSTREAM_TOKEN", secret.name)],
            "secrets returned by Sandbox.create",
        )
        info = sandbox.get_info()
        check_eq(info.memory_mib, 384, "sandbox memory_mib (the template's)")
        check_eq(info.vcpu_count, 1, "sandbox vcpu_count (the template's)")

    with step("commands.run: env, user, workdir"):
        r = sandbox.commands.run("echo $KILN_SDK_VAR; echo $GREETING; id -un; pwd")
        check_eq(r.exit_code, 0, f"exit code (stderr {r.stderr!r})")
        check_eq(
            r.stdout.splitlines(),
            ["from-env-vars", "overridden", "app", "/srv/app"],
            "stdout of `echo $KILN_SDK_VAR; echo $GREETING; id -un; pwd`",
        )
        r = sandbox.commands.run("echo out; echo err >&2; cat /opt/built.txt", cwd="/tmp", env={"X": "1"})
        check_eq((r.stdout, r.stderr, r.exit_code), ("out\nbuilt\n", "err\n", 0), "stdout/stderr/exit")
        r = sandbox.commands.run("pwd; echo $X", cwd="/tmp", env={"X": "per-command"})
        check_eq(r.stdout, "/tmp\nper-command\n", "cwd and env of one command")
        r = sandbox.commands.run("sudo -n true && stat -c %U /srv/app")
        check_eq((r.stdout, r.exit_code), ("app\n", 0), "sudo for the template's user; workdir owner")

    def call_upstream(path: str, token: str = "$UPSTREAM_TOKEN") -> str:
        r = sandbox.commands.run(
            f'curl -sS -H "Authorization: Bearer {token}" {UPSTREAM}{path}', env=VIA_PROXY
        )
        check_eq(r.exit_code, 0, f"curl {path} ({r.stderr!r})")
        return r.stdout

    with step("secrets: a stand-in in the sandbox, the real value at the upstream"):
        stand_in = sandbox.commands.run("printenv UPSTREAM_TOKEN").stdout.strip()
        check(stand_in.startswith("kiln_sk_"), f"stand-in {stand_in!r}")
        check(stand_in != SECRET_VALUE, "the sandbox holds the value")
        check_eq(call_upstream("/sdk"), upstream_answer("/sdk", SECRET_VALUE), "what the upstream got")
        requests = [e for e in sandbox.get_network_log().events if e.kind == "request"]
        check(bool(requests), "no request row in the network log")
        check_eq(
            (requests[0].secret_id, requests[0].method, requests[0].path, requests[0].status),
            (secret.id, "GET", "/sdk", 200),
            "the request row",
        )
        audit = secret.get_audit(limit=10)
        check_eq(
            [(e.sandbox_id, e.sandbox_name, e.path, e.status) for e in audit],
            [(sandbox.id, sandbox.name, "/sdk", 200)],
            "Secret.get_audit",
        )
        check_eq(
            [(b.sandbox_id, b.env_key, b.status) for b in secret.get_sandboxes()],
            [(sandbox.id, "UPSTREAM_TOKEN", SandboxStatus.ACTIVE)],
            "Secret.get_sandboxes",
        )
        check(secret.get_info().last_used_at is not None, "last_used_at after a request")

    with step("secrets: rotate, detach (refused at once), attach, delete"):
        rotated = SECRET_VALUE + "-rotated"
        secret = secret.rotate(rotated)
        check_eq(call_upstream("/rotated"), upstream_answer("/rotated", rotated), "after rotate")
        sandbox.detach_secret("UPSTREAM_TOKEN")
        r = sandbox.commands.run(
            f"curl -s -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer {stand_in}' {UPSTREAM}/after",
            env=VIA_PROXY,
        )
        check_eq(r.stdout, "403", "a detached stand-in")
        check_eq(sandbox.commands.run("printenv UPSTREAM_TOKEN || echo unset").stdout.strip(), "unset", "env after detach")
        check_eq(sandbox.get_info().secrets, None, "bindings after detach")
        sandbox.attach_secret("UPSTREAM_TOKEN", secret.name)
        again = sandbox.commands.run("printenv UPSTREAM_TOKEN").stdout.strip()
        check(again.startswith("kiln_sk_") and again != stand_in, f"a new stand-in: {again!r}")
        check_eq(call_upstream("/again"), upstream_answer("/again", rotated), "after attach")
        secret.delete()
        cleanup[:] = [c for c in cleanup if c[0] != "delete secret"]
        info = sandbox.get_info()
        check_eq(
            [(b.env_key, b.revoked) for b in info.secrets or []],
            [("UPSTREAM_TOKEN", True)],
            "bindings once the secret is deleted",
        )
        r = sandbox.commands.run(
            f"curl -s -o /dev/null -w '%{{http_code}}' -H \"Authorization: Bearer $UPSTREAM_TOKEN\" {UPSTREAM}/deleted",
            env=VIA_PROXY,
        )
        check_eq(r.stdout, "403", "a stand-in of a deleted secret")

    with step("commands.run exit code"):
        r = sandbox.commands.run("exit 3")
        check_eq(r.exit_code, 3, "exit code of `exit 3`")

    with step("commands.run streaming (on_stdout / on_stderr)"):
        chunks: list[str] = []
        errs: list[str] = []
        r = sandbox.commands.run(
            "for i in 1 2 3; do echo line $i; sleep 0.2; done; echo oops >&2; exit 4",
            on_stdout=chunks.append,
            on_stderr=errs.append,
        )
        check_eq("".join(chunks), "line 1\nline 2\nline 3\n", "streamed stdout")
        check_eq("".join(errs), "oops\n", "streamed stderr")
        check_eq(r.stdout, "line 1\nline 2\nline 3\n", "result stdout of a streamed run")
        check_eq(r.exit_code, 4, "exit code of a streamed run")
        say(f"   {len(chunks)} stdout chunks")

    with step("files.write / files.read"):
        sandbox.files.write("/tmp/x.txt", "hello")
        check_eq(sandbox.files.read("/tmp/x.txt"), b"hello", "files.read after files.write")
        blob = bytes(range(256)) * 64
        sandbox.files.write("/tmp/blob.bin", blob)
        check_eq(sandbox.files.read("/tmp/blob.bin"), blob, "binary round trip")
        r = sandbox.commands.run("cat /tmp/x.txt; stat -c %s /tmp/blob.bin")
        check_eq(r.stdout, "hello" + f"{len(blob)}\n", "the written files seen by a command")
        check_eq(sandbox.files.read_text("/tmp/x.txt"), "hello", "files.read_text")
        try:
            sandbox.files.read("/tmp/no-such-file")
        except NotFoundError:
            pass
        else:
            fail("files.read of a missing file did not raise NotFoundError")

    with step("files.download_dir (zip)"):
        r = sandbox.commands.run(
            "mkdir -p /tmp/d/sub && printf a > /tmp/d/a.txt && printf b > /tmp/d/sub/b.txt"
        )
        check_eq(r.exit_code, 0, f"preparing /tmp/d ({r.stderr!r})")
        data = sandbox.files.download_dir("/tmp/d")
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            fail(f"download_dir did not return a zip: {data[:200]!r}")
        entries = sorted(n for n in zf.namelist() if not n.endswith("/"))
        check_eq(entries, ["d/a.txt", "d/sub/b.txt"], "zip file entries")
        check_eq(zf.read("d/sub/b.txt"), b"b", "zip entry content")
        check(zf.testzip() is None, "zip CRC check")

    with step("the start process answers"):
        r = sandbox.commands.run("curl -fsS http://127.0.0.1:8000/index.html")
        check_eq((r.stdout.strip(), r.exit_code), ("hello from app", 0), "curl of the start process")

    with step("preview URLs: a private port, its tokens, a signed URL in a browser"):
        preview_part(sandbox)

    with step("Sandbox.list(metadata=...)"):
        found = Sandbox.list(metadata={"run": RUN_ID})
        check_eq([s.id for s in found], [sandbox.id], "Sandbox.list(metadata={run})")
        check_eq(found[0].status, SandboxStatus.ACTIVE, "listed status")
        active = Sandbox.list(metadata={"run": RUN_ID}, status=["active", "paused"])
        check_eq([s.id for s in active], [sandbox.id], "Sandbox.list(status=[active, paused])")
        check_eq(Sandbox.list(metadata={"run": "no-such-run"}), [], "Sandbox.list of another run")

    with step("sandbox.update(metadata=...) / get_info"):
        sandbox.update(metadata={"suite": "sdk-e2e", "run": RUN_ID, "stage": "updated"})
        info = sandbox.get_info()
        check_eq(info.metadata.get("stage"), "updated", f"metadata after update ({info.metadata})")
        check_eq(info.status, SandboxStatus.ACTIVE, "status after update")

    with step("sandbox.update(network=...) / get_network_log: the host stays unreachable"):
        sandbox.update(network=NetworkConfig(allow_out=["127.0.0.0/8"], deny_out=["0.0.0.0/0"]))
        probe = (
            "python3 -c \"import socket; s = socket.create_connection(('10.0.2.100', 3128)); "
            "s.sendall(b'CONNECT 127.0.0.1:9 HTTP/1.1\\r\\n\\r\\n'); "
            "print(s.makefile('rb').readline().split(b'\\r')[0].decode())\""
        )
        r = sandbox.commands.run(probe)
        check_eq(r.stdout.strip(), "HTTP/1.1 403 Forbidden", f"CONNECT to the host ({r.stderr})")
        page = sandbox.get_network_log(verdict="blocked")
        check(len(page.events) >= 1, f"no blocked event in the network log: {page}")
        check_eq(page.events[0].host, "127.0.0.1", "blocked host")
        check("always blocked" in (page.events[0].match_rule or ""), f"rule: {page.events[0]}")
        sandbox.update(network=NetworkConfig(allow_out=[], deny_out=[]))

    with step("pause"):
        sandbox.commands.run("echo kept > /tmp/before-pause.txt")
        old_token = sandbox._access_token  # read only: to prove resume rotates it
        sandbox.pause()
        poll(
            "sandbox paused",
            120,
            lambda: sandbox.get_info().status == SandboxStatus.PAUSED,
        )
        listed = Sandbox.list(metadata={"run": RUN_ID}, status="paused")
        check_eq([s.id for s in listed], [sandbox.id], "Sandbox.list(status=paused)")

    with step("resume; the old access token is refused"):
        sandbox.resume()
        check_eq(sandbox.get_info().status, SandboxStatus.ACTIVE, "status after resume")
        check(sandbox._access_token != old_token, "resume did not rotate the access token")
        r = httpx.post(
            f"{BASE_URL}/exec",
            headers={SANDBOX_ID_HEADER: sandbox.id, "X-Access-Token": old_token},
            json={"command": "true"},
            timeout=30,
        )
        check_eq(r.status_code, 401, f"POST /exec with the pre-pause token ({r.text[:200]!r})")
        r = sandbox.commands.run("cat /tmp/before-pause.txt")
        check_eq((r.stdout, r.exit_code), ("kept\n", 0), "a file written before the pause")
        r = sandbox.commands.run("curl -fsS http://127.0.0.1:8000/index.html")
        check_eq(r.stdout.strip(), "hello from app", "the start process after resume")

    with step("pause(wait=True); commands.run resumes it transparently"):
        sandbox.pause(wait=True)
        check_eq(sandbox.get_info().status, SandboxStatus.PAUSED, "status after pause(wait=True)")
        r = sandbox.commands.run("cat /tmp/before-pause.txt")
        check_eq((r.stdout, r.exit_code), ("kept\n", 0), "commands.run on a paused sandbox")
        check_eq(sandbox.get_info().status, SandboxStatus.ACTIVE, "status after the auto-resume")

    with step("Sandbox.connect to a running sandbox shares its token"):
        other = Sandbox.connect(sandbox.id)
        check_eq(other.status, SandboxStatus.ACTIVE, "Sandbox.connect status")
        # activate on a running sandbox hands out its current token instead of rotating it,
        # so connecting never cuts off the other clients.
        check_eq(other._access_token, sandbox._access_token, "token after connect")
        check_eq(other.commands.run("echo connected").stdout, "connected\n", "run on a connected handle")
        r = sandbox.commands.run("echo first-handle")
        check_eq(r.stdout, "first-handle\n", "run on the first handle after connect")

    with step("AsyncSandbox.connect + commands.spawn (WebSocket)"):
        asyncio.run(spawn_part(sandbox.id))
        check(bool(WS_DIALS), "commands.spawn never dialled the WebSocket")
        say(f"   dialled {WS_DIALS[0]['target']} (SDK asked for {WS_DIALS[0]['uri']})")

    with step("Template.delete while a sandbox uses it (ConflictError)"):
        try:
            web.delete()
        except ConflictError as e:
            say(f"   ConflictError code={e.code} message={str(e)!r}")
        else:
            fail("a template was deleted while a sandbox made from it runs")

    with step("a spawned counter runs on after its client disconnects"):
        asyncio.run(spawn_and_leave(sandbox.id, COUNTER))
        first = counter(sandbox)
        poll("the counter advances", 60, lambda: counter(sandbox) > first)

    with step("sandbox.snapshot: memory and disk, the source runs on"):
        sandbox.files.write("/tmp/snap.txt", "at-snapshot")
        before_snapshot = counter(sandbox)
        snap = sandbox.snapshot(name=name("snap"))
        at_snapshot = counter(sandbox)
        check_eq(snap.status, SnapshotStatus.READY, "status after snapshot()")
        check_eq(snap.sandbox_id, sandbox.id, "snapshot.sandbox_id")
        check_eq(snap.template_id, web.id, "snapshot.template_id")
        check_eq(snap.kind, "mem+fs", "snapshot.kind")
        check(snap.size_bytes > 0, f"size_bytes {snap.size_bytes}")
        check_eq(snap.resources.memory_mib, 384, "snapshot.resources.memory_mib")
        check(snap.ready_at is not None, "ready_at unset on a ready snapshot")
        poll("the source's counter advances", 60, lambda: counter(sandbox) > at_snapshot)
        sandbox.files.write("/tmp/snap.txt", "after-snapshot")
        check_eq([s.id for s in sandbox.snapshots()], [snap.id], "sandbox.snapshots()")
        check_eq(Snapshot.get(snap.id).name, name("snap"), "Snapshot.get(id).name")
        cleanup.append(("delete snapshot", snap.delete))

    with step("sandbox.kill; GET of the killed sandbox is 404"):
        sandbox_id = sandbox.id
        sandbox.kill()
        cleanup[:] = [c for c in cleanup if c[0] != "kill sandbox"]
        check_eq(Sandbox.list(metadata={"run": RUN_ID}), [], "Sandbox.list after kill")
        r = httpx.get(f"{BASE_URL}/sandboxes/{sandbox_id}", headers={"X-API-Key": API_KEY}, timeout=10)
        check_eq(r.status_code, 404, f"GET a killed sandbox ({r.text[:200]})")
        check_eq([s.id for s in Snapshot.list(sandbox_id)], [snap.id], "a killed sandbox's snapshots")

    forks: list[Sandbox] = []
    with step("fork twice: the counter runs on in each, the file is the snapshot's"):
        forks.append(Sandbox.create(name=name("fork-a"), from_snapshot=snap))
        cleanup.insert(0, ("kill fork a", forks[0].kill))
        forks.append(Sandbox.create(name=name("fork-b"), from_snapshot=snap.id))
        cleanup.insert(0, ("kill fork b", forks[1].kill))
        for f in forks:
            info = f.get_info()
            check_eq(info.source_snapshot_id, snap.id, "source_snapshot_id")
            check_eq(info.status, SandboxStatus.ACTIVE, "a fork's status")
            n = counter(f)
            check(n >= before_snapshot, f"a fork's counter went back: {n} < {before_snapshot}")
            poll("a fork's counter advances", 60, lambda f=f, n=n: counter(f) > n)
            check_eq(f.files.read_text("/tmp/snap.txt"), "at-snapshot", "a fork's file")
            r = f.commands.run("curl -fsS http://127.0.0.1:8000/index.html")
            check_eq(r.stdout.strip(), "hello from app", "the start process in a fork")

    with step("the forks are independent"):
        forks[0].files.write("/tmp/snap.txt", "changed in a")
        check_eq(forks[1].files.read_text("/tmp/snap.txt"), "at-snapshot", "fork b's file")
        check_eq(forks[0].files.read_text("/tmp/snap.txt"), "changed in a", "fork a's file")

    with step(f"RateLimitError past the team's {MAX_SANDBOXES} sandboxes"):
        check_eq(MAX_SANDBOXES, 2, "KILN_MAX_SANDBOXES (the scenario runs 2 forks here)")
        try:
            extra_box = Sandbox.create(name=name("one-too-many"), from_snapshot=snap)
        except RateLimitError as e:
            check_eq(e.code, "too_many_sandboxes", "RateLimitError.code")
        else:
            cleanup.insert(0, ("kill sandbox one-too-many", extra_box.kill))
            fail(
                "a third sandbox was accepted: the server does not enforce "
                f"KILN_MAX_SANDBOXES={MAX_SANDBOXES}"
            )

    with step(f"RateLimitError past the team's {MAX_SNAPSHOTS} snapshot"):
        check_eq(MAX_SNAPSHOTS, 1, "KILN_MAX_SNAPSHOTS (the scenario keeps 1 snapshot here)")
        try:
            extra_snap = forks[0].snapshot(name=name("one-too-many"))
        except RateLimitError as e:
            check_eq(e.code, "too_many_snapshots", "RateLimitError.code")
            check_eq(e.status_code, 429, "RateLimitError.status_code")
        else:
            cleanup.insert(0, ("delete snapshot one-too-many", extra_snap.delete))
            fail(
                "a second snapshot was accepted: the server does not enforce "
                f"KILN_MAX_SNAPSHOTS={MAX_SNAPSHOTS}"
            )

    with step("Snapshot rename and delete; the forks run on"):
        renamed = snap.rename(name("renamed"))
        check_eq(renamed.name, name("renamed"), "renamed snapshot's name")
        snap.delete()
        cleanup[:] = [c for c in cleanup if c[0] != "delete snapshot"]
        try:
            Snapshot.get(snap.id)
        except NotFoundError:
            pass
        else:
            fail("Snapshot.get of a deleted snapshot succeeded")
        Snapshot.delete_by_id(snap.id)  # idempotent
        check(counter(forks[0]) > 0, "fork a after its snapshot was deleted")

    with step("auto-pause, then auto-delete, with second-scale values"):
        fork_b = forks[1]
        fork_b.update(timeout_seconds=2, auto_delete_seconds=4)
        info = fork_b.get_info()
        check_eq((info.timeout_seconds, info.auto_delete_seconds), (2, 4), "timers after update")
        paused = poll(
            "auto-paused",
            60,
            lambda: (i := fork_b.get_info()).status == SandboxStatus.PAUSED and i,
            interval=0.25,
        )
        check(paused.auto_delete_at is not None, f"auto_delete_at unset while paused: {paused!r}")

        def gone() -> bool:
            try:
                fork_b.get_info()
            except NotFoundError:
                return True
            return False

        poll("auto-deleted", 60, gone, interval=0.25)
        cleanup[:] = [c for c in cleanup if c[0] != "kill fork b"]

    with step("Sandbox.create without a template: the system template superserve/base"):
        base = Template.connect("superserve/base")
        check_eq(base.status, TemplateStatus.READY, "superserve/base status")
        quick = Sandbox.create(name=name("quickstart"))
        cleanup.insert(0, ("kill quickstart", quick.kill))
        r = httpx.get(f"{BASE_URL}/sandboxes/{quick.id}", headers={"X-API-Key": API_KEY}, timeout=10)
        check_eq(r.json().get("template_id"), base.id, "the quickstart sandbox's template")
        check_eq(quick.commands.run("echo quick").stdout, "quick\n", "a command in it")
        quick.kill()
        forks[0].kill()
        cleanup[:] = [c for c in cleanup if c[0] not in ("kill quickstart", "kill fork a")]

    with step("Template.delete"):
        web.delete()
        Template.delete_by_id(broken.id)
        cleanup.clear()
        names = {t.name for t in Template.list(name_prefix="sdk-")}
        check(not ({name("web"), name("broken")} & names), f"templates left: {names}")


def kiln_preview(sandbox_id: str, port: int) -> tuple[str, str]:
    """kiln's preview URL of a port (the default domain, on the server's own listener) and
    its host. The SDK's `get_preview_url` writes Superserve's hosts; the query of its
    signed URL is what carries the token."""
    host = f"{port}-{sandbox_id}.preview.localhost"
    return f"http://{host}:{_base.port}", host


def preview_get(sandbox_id: str, port: int, path: str = "/", headers: dict | None = None) -> httpx.Response:
    """A request to a preview URL, sent to the server's address with the preview host."""
    _, host = kiln_preview(sandbox_id, port)
    return httpx.get(f"{BASE_URL}{path}", headers={"Host": host, **(headers or {})}, timeout=60)


def preview_part(sandbox: Sandbox) -> None:
    # The SDK refuses what Superserve's edge refuses, before sending.
    for bad in (80, 49983, 70000):
        try:
            sandbox.publish_preview_port(bad)
        except ValidationError:
            pass
        else:
            fail(f"publish_preview_port({bad}) was accepted")
    ports = sandbox.list_preview_ports()
    check_eq(ports.preview_access, PreviewAccess.PUBLIC, "preview policy of a sandbox created without one")
    check_eq(ports.ports, [], "published ports of a new sandbox")
    check_eq(preview_get(sandbox.id, 8000).status_code, 404, "an unpublished port under a strict policy")

    p = sandbox.publish_preview_port(8000, access="private")
    check_eq((p.port, p.access, p.token_version), (8000, "private", 1), "publish_preview_port")
    check_eq(preview_get(sandbox.id, 8000).status_code, 401, "a private port without a token")
    tok = sandbox.get_preview_token(8000)
    check_eq((tok.port, tok.token_version, tok.access), (8000, 1, "private"), "get_preview_token")
    r = preview_get(sandbox.id, 8000, "/index.html", {tok.header: tok.token})
    check_eq((r.status_code, r.text.strip()), (200, "hello from app"), "the page with the header token")

    signed = sandbox.get_signed_preview_url(8000, expires_in_seconds=300)
    query = urlsplit(signed).query
    check(tok.query_param in query, f"signed URL {signed!r} lacks {tok.query_param}")
    url, _ = kiln_preview(sandbox.id, 8000)
    done = subprocess.run(
        [BROWSER_PYTHON, os.path.join(os.path.dirname(__file__), "preview_browser.py"),
         f"{url}/index.html?{query}", "hello from app"],
        capture_output=True, text=True, timeout=300,
    )
    for line in (done.stdout + done.stderr).splitlines():
        say(f"   {line}")
    check_eq(done.returncode, 0, "the browser on the signed URL")

    fresh = sandbox.rotate_preview_token(8000)
    check_eq(fresh.token_version, 2, "token_version after rotate_preview_token")
    r = preview_get(sandbox.id, 8000, "/index.html", {tok.header: tok.token})
    check_eq(r.status_code, 401, "the token from before the rotation")
    r = preview_get(sandbox.id, 8000, "/index.html", {fresh.header: fresh.token})
    check_eq(r.status_code, 200, "the rotated token")

    listed = sandbox.list_preview_ports()
    check_eq([(x.port, x.access, x.token_version) for x in listed.ports], [(8000, "private", 2)], "list_preview_ports")
    sandbox.unpublish_preview_port(8000)
    sandbox.unpublish_preview_port(8000)  # idempotent
    r = preview_get(sandbox.id, 8000, "/index.html", {fresh.header: fresh.token})
    check_eq(r.status_code, 404, "an unpublished port")

    sandbox.update(preview_access="private")
    check_eq(sandbox.get_info().preview_access, PreviewAccess.PRIVATE, "preview_access after update")
    check_eq(sandbox.publish_preview_port(8000).access, "private", "a new port under the private policy")
    sandbox.unpublish_preview_port(8000)


COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.2; done"


def counter(sb: Sandbox) -> int:
    r = sb.commands.run("cat /tmp/counter 2>/dev/null || echo 0")
    return int(r.stdout.strip() or "0")


async def spawn_and_leave(sandbox_id: str, command: str) -> None:
    """Spawns `command`, then drops the WebSocket without a kill (what a lost connection
    does): Superserve's docs say the process keeps running inside the sandbox."""
    sb = await AsyncSandbox.connect(sandbox_id)
    try:
        session = await sb.commands.spawn(command)
        await asyncio.sleep(0.5)
        session._reader.cancel()
        await session._ws.close()
    finally:
        await sb._close_http_client()


async def spawn_part(sandbox_id: str) -> None:
    sb = await AsyncSandbox.connect(sandbox_id)
    try:
        check_eq(sb.status, SandboxStatus.ACTIVE, "AsyncSandbox.connect status")
        r = await sb.commands.run("echo async-run")
        check_eq(r.stdout, "async-run\n", "AsyncSandbox commands.run")

        seen: list[str] = []
        session = await sb.commands.spawn("cat; echo done-after-eof >&2", on_stdout=seen.append)
        await session.stdin.write("hello over the socket\n")
        await session.stdin.write(b"second line\n")
        await session.stdin.close()
        result = await asyncio.wait_for(session.wait(), 60)
        check_eq(result.stdout, "hello over the socket\nsecond line\n", "spawned cat's stdout")
        check_eq(result.stderr, "done-after-eof\n", "spawned command's stderr")
        check_eq(result.exit_code, 0, "spawned cat's exit code")
        check_eq("".join(seen), result.stdout, "on_stdout of a spawned session")
        await session.close()

        session = await sb.commands.spawn("sleep 600")
        await asyncio.sleep(0.5)
        await session.kill()
        try:
            result = await asyncio.wait_for(session.wait(), 30)
        except asyncio.TimeoutError:
            fail("a spawned `sleep 600` did not end within 30s of kill()")
        say(f"   killed session ended: exit_code={result.exit_code} stderr={result.stderr!r}")
        check(result.exit_code != 0, f"a killed session exited 0: {result!r}")
        await session.close()
    finally:
        await sb._close_http_client()


def main() -> int:
    try:
        scenario()
    except Failure as e:
        print(f"FAIL: {e}", flush=True)
        code = 1
    except Exception as e:  # noqa: BLE001
        print(f"FAIL: unexpected {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
        code = 1
    else:
        say("PASS: the SDK scenario completed")
        return 0
    for what, undo in cleanup:
        try:
            undo()
            say(f"cleanup: {what}")
        except Exception as e:  # noqa: BLE001
            say(f"cleanup: {what} failed: {type(e).__name__}: {e}")
    return code


if __name__ == "__main__":
    sys.exit(main())

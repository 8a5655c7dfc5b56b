// End-to-end scenario: Superserve's official TypeScript SDK (@superserve/sdk 0.8.1,
// unmodified) against a running `kiln serve`.
//
// Run by crates/kiln-cli/tests/sdk_typescript.rs with the node_modules of
// scripts/sdk-node.sh (cwd there, or NODE_PATH; plain ESM, no build step). Only the SDK's
// data plane is redirected, both to the kiln server and both from outside the SDK:
//  - HTTP: the SDK sends /exec, /exec/stream and /files to https://<sandbox host> with
//    `X-Superserve-Sandbox-Id` (or to https://boxd-<id>.<sandbox host>); a wrapper of
//    globalThis.fetch sends them to kiln instead, the sandbox named by that header.
//  - WebSocket: commands.spawn dials wss://boxd-<id>.<sandbox host>/exec/connect with
//    `new WebSocket(url, protocols)` (the global); a subclass of the global WebSocket (Node
//    22+, or Node 20.10+ with --experimental-websocket) or else of the `ws` package dials
//    ws://<kiln>/exec/connect with `X-Superserve-Sandbox-Id` instead.
//
// Environment:
//   SUPERSERVE_API_KEY       an API key of the server (read by the SDK itself)
//   SUPERSERVE_BASE_URL      http://HOST:PORT of `kiln serve` (read by the SDK itself)
//   KILN_TEST_IMAGE_PYTHON   base image reference (python3 + curl + sudo) in the test registry
//   KILN_MAX_TEMPLATES       the server's template limit; the scenario owns 2 templates when
//                            it checks the limit, so it must be 2
//   KILN_MAX_SANDBOXES       the server's sandbox limit; the scenario's two sandboxes must
//                            reach it, so it must be 2
// The server builds the system template superserve/base (KILN_SYSTEM_TEMPLATES=base) for
// the create without a template. Snapshots are not in the TypeScript SDK (0.11.4): the
// Python scenario covers them.
//   KILN_SDK_RUN_ID          optional suffix that keeps names unique (default: the pid)
//   KILN_SDK_WEBSOCKET       `ws` to use the ws package even when Node has a global WebSocket
//
// Every step asserts; a broken expectation prints `FAIL: ...` and exits 1 (after a
// best-effort cleanup). Each step prints its duration.

import { existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { inflateRawSync } from "node:zlib";

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

class Failure extends Error {}

function fail(msg) {
  throw new Failure(msg);
}

function requireEnv(name) {
  const value = (process.env[name] ?? "").trim();
  if (!value) {
    console.log(`FAIL: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const BASE_URL = requireEnv("SUPERSERVE_BASE_URL").replace(/\/+$/, "");
const API_KEY = requireEnv("SUPERSERVE_API_KEY");
const IMAGE = requireEnv("KILN_TEST_IMAGE_PYTHON");
const MAX_TEMPLATES = Number(process.env.KILN_MAX_TEMPLATES ?? "2");
const MAX_SANDBOXES = Number(process.env.KILN_MAX_SANDBOXES ?? "2");
const RUN_ID = process.env.KILN_SDK_RUN_ID || String(process.pid);
const SANDBOX_ID_HEADER = "X-Superserve-Sandbox-Id";

let base;
try {
  base = new URL(BASE_URL);
} catch {
  base = undefined;
}
if (!base || !["http:", "https:"].includes(base.protocol)) {
  console.log(`FAIL: SUPERSERVE_BASE_URL=${JSON.stringify(BASE_URL)} is not an http(s) URL`);
  process.exit(2);
}
const WS_BASE = `${base.protocol === "https:" ? "wss" : "ws"}://${base.host}`;

// The SDK, resolved from the cwd / NODE_PATH (scripts/sdk-node.sh's node_modules), not from
// this file's directory (ESM resolves bare names from the importing file and ignores
// NODE_PATH).
const requireFromCwd = createRequire(`${process.cwd()}/`);
/** The directory and package.json of the installed package `name`. */
function findPackage(name) {
  let entry;
  try {
    entry = requireFromCwd.resolve(name, {
      paths: [process.cwd(), ...(process.env.NODE_PATH ?? "").split(":").filter(Boolean)],
    });
  } catch (e) {
    console.log(`FAIL: cannot find the package ${name} (${e.message}): run scripts/sdk-node.sh`);
    process.exit(2);
  }
  for (let dir = dirname(entry); dir !== dirname(dir); dir = dirname(dir)) {
    const manifest = join(dir, "package.json");
    if (existsSync(manifest)) {
      const pkg = JSON.parse(readFileSync(manifest, "utf8"));
      if (pkg.name === name) return { dir, pkg, entry };
    }
  }
  console.log(`FAIL: no package.json of ${name} above ${entry}`);
  process.exit(2);
}
// The ESM entry point (dist/index.js), as `import "@superserve/sdk"` would load it; the
// `require` one is a separate copy of the module.
const sdkPackage = findPackage("@superserve/sdk");
const ss = await import(pathToFileURL(join(sdkPackage.dir, sdkPackage.pkg.exports["."].import.default)).href);
const {
  AuthenticationError,
  BuildError,
  ConflictError,
  NotFoundError,
  RateLimitError,
  Sandbox,
  SandboxError,
  Template,
  resolveConfig,
} = ss;

// Where the SDK sends the data plane for this base URL (no override exists for it).
const SANDBOX_HOST = resolveConfig({ apiKey: API_KEY, baseUrl: BASE_URL }).sandboxHost;

// ---------------------------------------------------------------------------------------
// Point the SDK's data plane at kiln (the only changes made to the SDK's behaviour)
// ---------------------------------------------------------------------------------------

const realFetch = globalThis.fetch;
const DATA_PLANE = []; // "METHOD path" of each redirected request
const escapedHost = SANDBOX_HOST.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
// https://<host>/path (id in the header already) or https://boxd-<id>.<host>/path. Matched
// on the string: URL would lowercase the host, and an id is matched byte for byte.
const SHARED_HOST_RE = new RegExp(`^https://${escapedHost}(/.*)?$`, "i");
const BOXD_HOST_RE = new RegExp(`^https://boxd-([^./]+)\\.${escapedHost}(/.*)?$`, "i");

globalThis.fetch = function kilnFetch(input, init) {
  const url = typeof input === "string" ? input : input instanceof URL ? input.href : undefined;
  if (url === undefined || url.startsWith(`${BASE_URL}/`)) {
    return realFetch(input, init);
  }
  const shared = SHARED_HOST_RE.exec(url);
  const boxd = shared ? undefined : BOXD_HOST_RE.exec(url);
  if (!shared && !boxd) {
    return Promise.reject(new TypeError(`scenario: the SDK fetched an unexpected URL ${url}`));
  }
  const path = (shared ? shared[1] : boxd[2]) ?? "/";
  const headers = new Headers(init?.headers);
  if (boxd) headers.set(SANDBOX_ID_HEADER, boxd[1]);
  if (!headers.get(SANDBOX_ID_HEADER)) {
    return Promise.reject(new TypeError(`scenario: ${url} names no sandbox`));
  }
  DATA_PLANE.push(`${init?.method ?? "GET"} ${path.split("?")[0]}`);
  return realFetch(`${BASE_URL}${path}`, { ...init, headers });
};

// commands.spawn needs a global WebSocket: Node's own (undici: `new WebSocket(url,
// {protocols, headers})`) or the `ws` package (`new WebSocket(url, protocols, {headers})`).
let NativeWebSocket = globalThis.WebSocket;
let WS_IMPL = "global WebSocket";
if (typeof NativeWebSocket === "undefined" || process.env.KILN_SDK_WEBSOCKET === "ws") {
  const ws = findPackage("ws");
  NativeWebSocket = requireFromCwd(ws.entry);
  WS_IMPL = `ws ${ws.pkg.version}`;
}
const WS_IS_PACKAGE = WS_IMPL.startsWith("ws ");
const WS_DIALS = [];
const WS_RE = new RegExp(`^wss://boxd-([^./]+)\\.${escapedHost}(/.*)?$`, "i");

class KilnWebSocket extends NativeWebSocket {
  constructor(url, protocols) {
    const s = String(url);
    const m = WS_RE.exec(s);
    if (!m) throw new TypeError(`scenario: the SDK dialled an unexpected WebSocket URL ${s}`);
    const target = `${WS_BASE}${m[2] ?? "/"}`;
    const headers = { [SANDBOX_ID_HEADER]: m[1] };
    WS_DIALS.push({ url: s, target, protocols: (protocols ?? []).map((p) => p.replace(/^token\..*/, "token.…")) });
    if (WS_IS_PACKAGE) super(target, protocols, { headers });
    else super(target, { protocols, headers });
  }
}
globalThis.WebSocket = KilnWebSocket;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const T0 = performance.now();
const secs = (ms) => (ms / 1000).toFixed(1);

function say(msg) {
  console.log(`[${secs(performance.now() - T0).padStart(7)}s] ${msg}`);
}

function describe(e) {
  if (e instanceof SandboxError) {
    let s = `${e.name}: ${e.message} (statusCode=${e.statusCode}, code=${e.code})`;
    if (e.cause) s += `; cause: ${e.cause?.stack ?? e.cause}${e.cause?.cause ? ` <- ${e.cause.cause}` : ""}`;
    return s;
  }
  return `unexpected ${e?.stack ?? e}${e?.cause ? `; cause: ${e.cause}` : ""}`;
}

async function step(name, body) {
  say(`-> ${name}`);
  const started = performance.now();
  try {
    await body();
  } catch (e) {
    if (e instanceof Failure) throw e;
    fail(`${name}: ${describe(e)}`);
  }
  say(`   ok: ${name} (${secs(performance.now() - started)}s)`);
}

function check(cond, msg) {
  if (!cond) fail(msg);
}

/** JSON with object keys sorted: equal values show equal. */
function show(v) {
  return JSON.stringify(v, (_, x) => {
    if (x instanceof Uint8Array) return `<${x.length} bytes>`;
    if (x && typeof x === "object" && !Array.isArray(x)) {
      return Object.fromEntries(Object.keys(x).sort().map((k) => [k, x[k]]));
    }
    return x;
  });
}

function checkEq(actual, expected, what) {
  if (show(actual) !== show(expected)) fail(`${what}: expected ${show(expected)}, got ${show(actual)}`);
}

/** The error `promise` rejects with, which must be an instance of `cls`. */
async function expectError(promise, cls, what) {
  try {
    const v = await promise;
    return fail(`${what}: succeeded (${show(v)?.slice(0, 300)}) instead of raising ${cls.name}`);
  } catch (e) {
    if (e instanceof Failure) throw e;
    if (!(e instanceof cls)) fail(`${what}: expected ${cls.name}, got ${describe(e)}`);
    return e;
  }
}

async function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Failure(`${what}: not done within ${secs(ms)}s`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A plain request to kiln, outside the SDK. */
async function raw(method, path, headers = {}, body = undefined) {
  const res = await realFetch(`${BASE_URL}${path}`, {
    method,
    headers: { ...(body !== undefined ? { "Content-Type": "application/json" } : {}), ...headers },
    body: body !== undefined ? JSON.stringify(body) : undefined,
    signal: AbortSignal.timeout(30_000),
  });
  const text = await res.text();
  return { status: res.status, text };
}

async function rawGet(path) {
  try {
    const r = await raw("GET", path, { "X-API-Key": API_KEY });
    return `GET ${path} -> ${r.status} ${r.text.slice(0, 600)}`;
  } catch (e) {
    return `GET ${path} -> ${e}`;
  }
}

const name = (kind) => `ts-${kind}-${RUN_ID}`;
const text = (bytes) => new TextDecoder().decode(bytes);

// --- a small zip reader (stored and deflated entries), to check downloadDir

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** The entries of a zip archive: Map name -> bytes (directories map to null). */
function unzip(buf) {
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  let eocd = -1;
  for (let i = buf.length - 22; i >= Math.max(0, buf.length - 22 - 65535); i--) {
    if (dv.getUint32(i, true) === 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) throw new Error("no end-of-central-directory record");
  const count = dv.getUint16(eocd + 10, true);
  let p = dv.getUint32(eocd + 16, true);
  const out = new Map();
  for (let n = 0; n < count; n++) {
    if (dv.getUint32(p, true) !== 0x02014b50) throw new Error(`bad central directory entry at ${p}`);
    const method = dv.getUint16(p + 10, true);
    const crc = dv.getUint32(p + 16, true);
    const csize = dv.getUint32(p + 20, true);
    const usize = dv.getUint32(p + 24, true);
    const nameLen = dv.getUint16(p + 28, true);
    const extraLen = dv.getUint16(p + 30, true);
    const commentLen = dv.getUint16(p + 32, true);
    const local = dv.getUint32(p + 42, true);
    const entry = text(buf.subarray(p + 46, p + 46 + nameLen));
    p += 46 + nameLen + extraLen + commentLen;
    if (entry.endsWith("/")) {
      out.set(entry, null);
      continue;
    }
    if (dv.getUint32(local, true) !== 0x04034b50) throw new Error(`bad local header of ${entry}`);
    const start = local + 30 + dv.getUint16(local + 26, true) + dv.getUint16(local + 28, true);
    const data = buf.subarray(start, start + csize);
    let content;
    if (method === 0) content = data;
    else if (method === 8) content = new Uint8Array(inflateRawSync(data));
    else throw new Error(`${entry}: compression method ${method}`);
    if (content.length !== usize) throw new Error(`${entry}: ${content.length} bytes, header says ${usize}`);
    if (crc32(content) !== crc) throw new Error(`${entry}: CRC mismatch`);
    out.set(entry, content);
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------

const cleanup = []; // [what, async fn], run in order on failure

async function scenario() {
  say(
    `kiln at ${BASE_URL}; image ${IMAGE}; @superserve/sdk ${sdkPackage.pkg.version}; node ${process.version}; ` +
      `${WS_IMPL}; the SDK's data plane: https://${SANDBOX_HOST} -> ${BASE_URL}`,
  );
  checkEq(sdkPackage.pkg.version, "0.8.1", "@superserve/sdk version");

  await step("health", async () => {
    const r = await raw("GET", "/health");
    checkEq(r.status, 200, `GET /health status (${r.text.slice(0, 200)})`);
  });

  await step("a wrong API key is refused (AuthenticationError)", async () => {
    const e = await expectError(Template.list({ apiKey: "not-a-kiln-key" }), AuthenticationError, "Template.list with a wrong key");
    checkEq(e.statusCode, 401, "statusCode of a wrong key");
  });

  // -- templates: one that builds, one whose step fails, both queued up front so the two
  //    TCG builds overlap.
  let web;
  await step("Template.create (web)", async () => {
    web = await Template.create({
      name: name("web"),
      from: IMAGE,
      vcpu: 1,
      memoryMib: 384,
      diskMib: 1024,
      steps: [
        { env: { key: "GREETING", value: "hello" } },
        { run: "echo built > /opt/built.txt; echo run-step-stdout-marker" },
        { user: { name: "app", sudo: true } },
        { workdir: "/srv/app" },
        { run: 'echo "$GREETING from $(id -un)" > index.html' },
      ],
      startCmd: "python3 -m http.server 8000 --bind 127.0.0.1",
      readyCmd: "curl -fsS http://127.0.0.1:8000/ >/dev/null",
    });
    cleanup.push(["delete template web", () => web.delete()]);
    checkEq(web.name, name("web"), "template name");
    check(Boolean(web.latestBuildId), `no build id on the created template: ${show(web)}`);
    check(["pending", "building"].includes(web.status), `new template status ${web.status}`);
    checkEq([web.vcpu, web.memoryMib, web.diskMib], [1, 384, 1024], "template resources");
    check(Boolean(web.teamId), "teamId unset");
    check(web.createdAt instanceof Date && !Number.isNaN(web.createdAt.getTime()), `createdAt ${web.createdAt}`);
  });

  let broken;
  await step("Template.create (broken: run step exits 1)", async () => {
    broken = await Template.create({
      name: name("broken"),
      from: IMAGE,
      memoryMib: 384,
      diskMib: 1024,
      steps: [{ run: "echo about to fail; exit 1" }],
    });
    cleanup.push(["delete template broken", () => Template.deleteById(broken.id)]);
  });

  await step(`RateLimitError past the team's ${MAX_TEMPLATES} templates`, async () => {
    checkEq(MAX_TEMPLATES, 2, "KILN_MAX_TEMPLATES (the scenario owns 2 templates here)");
    let extra;
    try {
      extra = await Template.create({ name: name("one-too-many"), from: IMAGE, memoryMib: 384, diskMib: 1024 });
    } catch (e) {
      if (!(e instanceof RateLimitError)) fail(`the third template: expected RateLimitError, got ${describe(e)}`);
      checkEq(e.code, "too_many_templates", "RateLimitError.code");
      checkEq(e.statusCode, 429, "RateLimitError.statusCode");
      say(`   RateLimitError code=${e.code} message=${JSON.stringify(e.message)}`);
      return;
    }
    cleanup.push(["delete template one-too-many", () => extra.delete()]);
    const names = (await Template.list()).map((t) => t.name);
    fail(`a third template was accepted: the server does not enforce KILN_MAX_TEMPLATES=${MAX_TEMPLATES} (templates: ${names})`);
  });

  await step("Template.list / connect", async () => {
    const names = (await Template.list({ namePrefix: "ts-" })).map((t) => t.name).sort();
    checkEq(names, [name("broken"), name("web")].sort(), "Template.list({namePrefix})");
    checkEq(await Template.list({ namePrefix: "no-such-prefix-" }), [], "Template.list of another prefix");
    const again = await Template.connect(name("web"));
    checkEq(again.id, web.id, "Template.connect(name).id");
    checkEq(again.latestBuildId, web.latestBuildId, "Template.connect(name).latestBuildId");
    checkEq((await Template.connect(web.id)).name, name("web"), "Template.connect(id).name");
    await expectError(Template.connect("ts-no-such-template"), NotFoundError, "Template.connect of a missing name");
  });

  await step("web: waitUntilReady({onLog})", async () => {
    const logs = [];
    const info = await web.waitUntilReady({ onLog: (e) => logs.push(e), pollIntervalMs: 1000 });
    checkEq(info.status, "ready", "template status after waitUntilReady");
    check(info.builtAt instanceof Date, `builtAt unset on a ready template: ${show(info)}`);
    check(info.sizeBytes > 0, `sizeBytes of a ready template: ${info.sizeBytes}`);
    const streams = [...new Set(logs.map((e) => e.stream))].sort();
    say(`   ${logs.length} log events, streams ${streams}`);
    for (const e of [...logs.slice(0, 3), ...logs.slice(-3)]) {
      say(`   log: ${e.stream}: ${JSON.stringify(e.text)} finished=${e.finished} status=${e.status}`);
    }
    if (logs.length === 0) {
      fail(
        "no build log events reached onLog (the SDK swallows SSE errors); " +
          (await rawGet(`/templates/${web.id}/builds/${web.latestBuildId}/logs`)),
      );
    }
    check(logs.every((e) => e.timestamp instanceof Date && !Number.isNaN(e.timestamp.getTime())), "a log event without a valid timestamp");
    check(
      logs.some((e) => e.stream === "stdout" && e.text.includes("run-step-stdout-marker")),
      "the run step's stdout line is not among the build logs",
    );
    check(logs.some((e) => e.stream === "system"), "no system lines among the build logs");
    // waitUntilReady stops the log stream as soon as its poll sees `ready`, so the last
    // event may not have arrived; streamBuildLogs below reads the whole log.
    const builds = await web.listBuilds();
    checkEq(builds.map((b) => b.id), [web.latestBuildId], "listBuilds ids");
    checkEq((await web.listBuilds({ limit: 1 })).length, 1, "listBuilds({limit: 1}) length");
    const build = await web.getBuild(web.latestBuildId);
    checkEq(build.status, "ready", "getBuild status");
    checkEq(build.templateId, web.id, "getBuild templateId");
    check(build.buildSpecHash.startsWith("sha256:"), `buildSpecHash ${build.buildSpecHash}`);
    check(build.finalizedAt instanceof Date, "finalizedAt unset on a ready build");
    check(build.startedAt instanceof Date, "startedAt unset on a ready build");
  });

  await step("web: streamBuildLogs of a finished build", async () => {
    const events = [];
    await withTimeout(web.streamBuildLogs({ onEvent: (e) => events.push(e) }), 60_000, "streamBuildLogs");
    say(`   ${events.length} events`);
    check(events.some((e) => e.stream === "stdout" && e.text.includes("run-step-stdout-marker")), "the run step's line is not in the replayed log");
    const finished = events.filter((e) => e.finished);
    checkEq(finished.length, 1, "finished events in the replayed log");
    checkEq(events.at(-1).finished, true, "the replayed log's last event is the finished one");
    checkEq(finished[0].status, "ready", "status on the finished event");
  });

  await step("broken: waitUntilReady raises BuildError(step_failed)", async () => {
    const logs = [];
    const e = await expectError(
      broken.waitUntilReady({ pollIntervalMs: 1000, onLog: (l) => logs.push(l) }),
      BuildError,
      "waitUntilReady of a template whose run step exits 1",
    );
    say(`   BuildError code=${e.code} message=${JSON.stringify(e.message)}; ${logs.length} log events`);
    checkEq(e.code, "step_failed", "BuildError.code");
    checkEq(e.templateId, broken.id, "BuildError.templateId");
    checkEq(e.buildId, broken.latestBuildId, "BuildError.buildId");
    check(e.message.length > 0, "BuildError without a message");
    const info = await broken.getInfo();
    checkEq(info.status, "failed", "broken template status");
    check(/^step_failed: ./s.test(info.errorMessage ?? ""), `errorMessage of the broken template: ${info.errorMessage}`);
  });

  await step("broken: rebuild, cancelBuild, listBuilds newest first", async () => {
    // Cancelled at once: no third real build.
    const build = await broken.rebuild();
    checkEq(build.templateId, broken.id, "rebuild templateId");
    check(build.id !== broken.latestBuildId, "rebuild returned the failed build");
    check(["pending", "building"].includes(build.status), `status of a new build: ${build.status}`);
    check(build.buildSpecHash.startsWith("sha256:"), `buildSpecHash ${build.buildSpecHash}`);
    await broken.cancelBuild(build.id);
    let status;
    for (const deadline = performance.now() + 60_000; performance.now() < deadline; await sleep(500)) {
      status = (await broken.getBuild(build.id)).status;
      if (status !== "pending" && status !== "building") break;
    }
    checkEq(status, "cancelled", "status of a cancelled build");
    // The SDK takes listBuilds({limit: 1})[0] as the most recent build.
    checkEq((await broken.listBuilds()).map((b) => b.id), [build.id, broken.latestBuildId], "listBuilds (newest first)");
    checkEq((await broken.listBuilds({ limit: 1 })).map((b) => b.id), [build.id], "listBuilds({limit: 1})");
    const fresh = await Template.connect(broken.id);
    checkEq(fresh.latestBuildId, build.id, "latestBuildId after a rebuild");
    const e = await expectError(fresh.waitUntilReady({ pollIntervalMs: 500 }), ConflictError, "waitUntilReady of a cancelled build");
    checkEq(e.code, "cancelled", "ConflictError.code of waitUntilReady on a cancelled build");
    await broken.cancelBuild(build.id); // a finished build: 409, or a no-op
  });

  await step("Sandbox.create binding a team secret that does not exist (NotFoundError)", async () => {
    const e = await expectError(
      Sandbox.create({ name: name("secrets"), fromTemplate: web, secrets: { TOKEN: "no-such-secret" } }),
      SandboxError,
      "Sandbox.create with an unknown secret",
    );
    checkEq([e.name, e.statusCode, e.code], ["NotFoundError", 404, "not_found"], "Sandbox.create with an unknown secret");
  });

  await step("Sandbox.create from a template that is not ready (ConflictError)", async () => {
    let stray;
    try {
      stray = await Sandbox.create({ name: name("stray"), fromTemplate: broken });
    } catch (e) {
      if (!(e instanceof ConflictError)) fail(`expected ConflictError, got ${describe(e)}`);
      say(`   ConflictError code=${e.code} message=${JSON.stringify(e.message)}`);
      return;
    }
    cleanup.unshift(["kill stray sandbox", () => stray.kill()]);
    fail("a sandbox was created from a template whose build failed");
  });

  // -- a sandbox from the template
  const metadata = { suite: "sdk-e2e-ts", run: RUN_ID };
  let sandbox;
  await step("Sandbox.create", async () => {
    sandbox = await Sandbox.create({
      name: name("box"),
      fromTemplate: web,
      envVars: { KILN_SDK_VAR: "from-env-vars", GREETING: "overridden" },
      metadata,
    });
    cleanup.unshift(["kill sandbox", () => sandbox.kill()]);
    checkEq(sandbox.name, name("box"), "sandbox name");
    checkEq(sandbox.status, "active", "status returned by Sandbox.create");
    checkEq(sandbox.metadata, metadata, "metadata returned by Sandbox.create");
    const info = await sandbox.getInfo();
    checkEq(info.memoryMib, 384, "sandbox memoryMib (the template's)");
    checkEq(info.vcpuCount, 1, "sandbox vcpuCount (the template's)");
    checkEq(info.status, "active", "getInfo status");
  });

  let quick;
  await step("Sandbox.create without a template (superserve/base), with timers", async () => {
    quick = await Sandbox.create({ name: name("quickstart"), timeoutSeconds: 2, autoDeleteSeconds: 4 });
    cleanup.unshift(["kill quickstart", () => quick.kill()]);
    const base = await Template.connect("superserve/base");
    const r = await raw("GET", `/sandboxes/${quick.id}`, { "X-API-Key": API_KEY });
    checkEq(JSON.parse(r.text).template_id, base.id, "the quickstart sandbox's template");
    const info = await quick.getInfo();
    checkEq([info.timeoutSeconds, info.autoDeleteSeconds], [2, 4], "timers on create");
  });

  await step(`RateLimitError past the team's ${MAX_SANDBOXES} sandboxes`, async () => {
    checkEq(MAX_SANDBOXES, 2, "KILN_MAX_SANDBOXES (the scenario runs 2 sandboxes here)");
    let extra;
    try {
      extra = await Sandbox.create({ name: name("one-too-many"), fromTemplate: web });
    } catch (e) {
      if (!(e instanceof RateLimitError)) fail(`a second sandbox: expected RateLimitError, got ${describe(e)}`);
      checkEq(e.code, "too_many_sandboxes", "RateLimitError.code");
      return;
    }
    cleanup.unshift(["kill sandbox one-too-many", () => extra.kill()]);
    fail(`a third sandbox was accepted: the server does not enforce KILN_MAX_SANDBOXES=${MAX_SANDBOXES}`);
  });

  await step("auto-pause after timeoutSeconds, auto-delete after autoDeleteSeconds", async () => {
    let paused;
    for (let i = 0; i < 240 && !paused; i++) {
      const info = await quick.getInfo();
      if (info.status === "paused") paused = info;
      else await sleep(250);
    }
    if (!paused) fail("the sandbox was not auto-paused within 60s");
    check(paused.autoDeleteAt instanceof Date, `autoDeleteAt while paused: ${show(paused)}`);
    let gone = false;
    for (let i = 0; i < 240 && !gone; i++) {
      const r = await raw("GET", `/sandboxes/${quick.id}`, { "X-API-Key": API_KEY });
      gone = r.status === 404;
      if (!gone) await sleep(250);
    }
    check(gone, "the paused sandbox was not auto-deleted within 60s");
    await expectError(quick.getInfo(), NotFoundError, "getInfo of an auto-deleted sandbox");
    cleanup.splice(0, cleanup.length, ...cleanup.filter(([what]) => what !== "kill quickstart"));
  });

  await step("commands.run: env, user, workdir", async () => {
    let r = await sandbox.commands.run("echo $KILN_SDK_VAR; echo $GREETING; id -un; pwd");
    checkEq(r.exitCode, 0, `exit code (stderr ${JSON.stringify(r.stderr)})`);
    checkEq(r.stdout.split("\n"), ["from-env-vars", "overridden", "app", "/srv/app", ""], "stdout of `echo $KILN_SDK_VAR; echo $GREETING; id -un; pwd`");
    r = await sandbox.commands.run("echo out; echo err >&2; cat /opt/built.txt", { cwd: "/tmp", env: { X: "1" } });
    checkEq([r.stdout, r.stderr, r.exitCode], ["out\nbuilt\n", "err\n", 0], "stdout/stderr/exit");
    r = await sandbox.commands.run("pwd; echo $X", { cwd: "/tmp", env: { X: "per-command" } });
    checkEq(r.stdout, "/tmp\nper-command\n", "cwd and env of one command");
    r = await sandbox.commands.run("sudo -n true && stat -c %U /srv/app");
    checkEq([r.stdout, r.exitCode], ["app\n", 0], "sudo for the template's user; workdir owner");
  });

  await step("commands.run exit code", async () => {
    const r = await sandbox.commands.run("exit 3");
    checkEq(r.exitCode, 3, "exit code of `exit 3`");
  });

  await step("commands.run timeoutMs", async () => {
    const r = await sandbox.commands.run("sleep 30", { timeoutMs: 1000 });
    say(`   exitCode=${r.exitCode} stderr=${JSON.stringify(r.stderr)}`);
    checkEq(r.exitCode, 124, "exit code of a command past its timeout");
  });

  await step("commands.run streaming (onStdout / onStderr)", async () => {
    const chunks = [];
    const errs = [];
    const r = await sandbox.commands.run("for i in 1 2 3; do echo line $i; sleep 0.2; done; echo oops >&2; exit 4", {
      onStdout: (d) => chunks.push(d),
      onStderr: (d) => errs.push(d),
    });
    checkEq(chunks.join(""), "line 1\nline 2\nline 3\n", "streamed stdout");
    checkEq(errs.join(""), "oops\n", "streamed stderr");
    checkEq(r.stdout, "line 1\nline 2\nline 3\n", "result stdout of a streamed run");
    checkEq(r.stderr, "oops\n", "result stderr of a streamed run");
    checkEq(r.exitCode, 4, "exit code of a streamed run");
    say(`   ${chunks.length} stdout chunks`);
    check(chunks.length >= 2, `stdout arrived in ${chunks.length} chunk(s): not streamed`);
  });

  await step("files.write / files.read", async () => {
    await sandbox.files.write("/tmp/x.txt", "hello");
    checkEq(text(await sandbox.files.read("/tmp/x.txt")), "hello", "files.read after files.write");
    const blob = new Uint8Array(256 * 64).map((_, i) => i % 256);
    await sandbox.files.write("/tmp/blob.bin", blob);
    const back = await sandbox.files.read("/tmp/blob.bin");
    check(back instanceof Uint8Array, `files.read returned ${back?.constructor?.name}`);
    check(Buffer.from(back).equals(Buffer.from(blob)), `binary round trip: ${back.length} bytes back of ${blob.length}`);
    await sandbox.files.write("/tmp/nested/dir/y.txt", new Blob(["from a blob"]));
    const r = await sandbox.commands.run("cat /tmp/x.txt; stat -c %s /tmp/blob.bin; cat /tmp/nested/dir/y.txt");
    checkEq(r.stdout, `hello${blob.length}\nfrom a blob`, "the written files seen by a command");
    checkEq(await sandbox.files.readText("/tmp/x.txt"), "hello", "files.readText");
    await expectError(sandbox.files.read("/tmp/no-such-file"), NotFoundError, "files.read of a missing file");
  });

  await step("files.downloadDir (zip)", async () => {
    const r = await sandbox.commands.run("mkdir -p /tmp/d/sub && printf a > /tmp/d/a.txt && printf b > /tmp/d/sub/b.txt");
    checkEq(r.exitCode, 0, `preparing /tmp/d (${JSON.stringify(r.stderr)})`);
    const data = await sandbox.files.downloadDir("/tmp/d");
    let entries;
    try {
      entries = unzip(data);
    } catch (e) {
      fail(`downloadDir did not return a readable zip (${e.message}): ${JSON.stringify(text(data.subarray(0, 200)))}`);
    }
    const files = [...entries.keys()].filter((n) => !n.endsWith("/")).sort();
    checkEq(files, ["d/a.txt", "d/sub/b.txt"], "zip file entries");
    checkEq(text(entries.get("d/sub/b.txt")), "b", "zip entry content");
    checkEq(text(entries.get("d/a.txt")), "a", "zip entry content");
  });

  await step("the start process answers", async () => {
    const r = await sandbox.commands.run("curl -fsS http://127.0.0.1:8000/index.html");
    checkEq([r.stdout.trim(), r.exitCode], ["hello from app", 0], "curl of the start process");
  });

  await step("Sandbox.list({metadata})", async () => {
    const found = await Sandbox.list({ metadata: { run: RUN_ID } });
    checkEq(found.map((s) => s.id), [sandbox.id], "Sandbox.list({metadata: {run}})");
    checkEq(found[0].status, "active", "listed status");
    checkEq(found[0].metadata, metadata, "listed metadata");
    const both = await Sandbox.list({ metadata: { run: RUN_ID, suite: "sdk-e2e-ts" } });
    checkEq(both.map((s) => s.id), [sandbox.id], "Sandbox.list with two metadata keys");
    checkEq(await Sandbox.list({ metadata: { run: "no-such-run" } }), [], "Sandbox.list of another run");
    check((await Sandbox.list()).some((s) => s.id === sandbox.id), "Sandbox.list() without a filter misses the sandbox");
  });

  await step("sandbox.update({metadata}) / getInfo", async () => {
    await sandbox.update({ metadata: { ...metadata, stage: "updated" } });
    const info = await sandbox.getInfo();
    checkEq(info.metadata.stage, "updated", `metadata after update (${show(info.metadata)})`);
    checkEq(info.status, "active", "status after update");
  });

  let oldToken;
  await step("pause; Sandbox.updateById leaves it paused", async () => {
    await sandbox.commands.run("echo kept > /tmp/before-pause.txt");
    oldToken = sandbox._accessToken; // read only: to prove resume rotates it
    const started = performance.now();
    await sandbox.pause();
    say(`   pause() returned after ${secs(performance.now() - started)}s`);
    checkEq((await sandbox.getInfo()).status, "paused", "status once pause() returned");
    await Sandbox.updateById(sandbox.id, { metadata: { ...metadata, stage: "paused" } });
    const info = await sandbox.getInfo();
    checkEq([info.status, info.metadata.stage], ["paused", "paused"], "status and metadata after updateById");
    const listed = await Sandbox.list({ metadata: { run: RUN_ID } });
    checkEq(listed.map((s) => [s.id, s.status]), [[sandbox.id, "paused"]], "Sandbox.list of a paused sandbox");
  });

  await step("resume; the old access token is refused", async () => {
    await sandbox.resume();
    checkEq((await sandbox.getInfo()).status, "active", "status after resume");
    check(sandbox._accessToken !== oldToken, "resume did not rotate the access token");
    const r = await raw("POST", "/exec", { [SANDBOX_ID_HEADER]: sandbox.id, "X-Access-Token": oldToken }, { command: "true" });
    checkEq(r.status, 401, `POST /exec with the pre-pause token (${JSON.stringify(r.text.slice(0, 200))})`);
    let out = await sandbox.commands.run("cat /tmp/before-pause.txt");
    checkEq([out.stdout, out.exitCode], ["kept\n", 0], "a file written before the pause");
    out = await sandbox.commands.run("curl -fsS http://127.0.0.1:8000/index.html");
    checkEq(out.stdout.trim(), "hello from app", "the start process after resume");
  });

  await step("pause; commands.run resumes it transparently", async () => {
    await sandbox.pause();
    checkEq((await sandbox.getInfo()).status, "paused", "status after pause()");
    const r = await sandbox.commands.run("cat /tmp/before-pause.txt");
    checkEq([r.stdout, r.exitCode], ["kept\n", 0], "commands.run on a paused sandbox");
    checkEq((await sandbox.getInfo()).status, "active", "status after the auto-resume");
  });

  let other;
  await step("Sandbox.connect; the first handle recovers from the token rotation", async () => {
    other = await Sandbox.connect(sandbox.id);
    checkEq(other.status, "active", "Sandbox.connect status");
    checkEq(other.metadata.stage, "paused", "Sandbox.connect metadata");
    checkEq((await other.commands.run("echo connected")).stdout, "connected\n", "run on a connected handle");
    checkEq(text(await other.files.read("/tmp/x.txt")), "hello", "files.read on a connected handle");
    const r = await sandbox.commands.run("echo first-handle");
    checkEq(r.stdout, "first-handle\n", "run on the first handle after connect");
    await expectError(Sandbox.connect("00000000-0000-0000-0000-000000000000"), NotFoundError, "Sandbox.connect of a missing id");
  });

  await step("commands.spawn (WebSocket): stdin to cat, cwd, env", async () => {
    const seen = [];
    const session = await sandbox.commands.spawn("cat; echo done-after-eof >&2", { onStdout: (d) => seen.push(d) });
    session.stdin.write("hello over the socket\n");
    session.stdin.write(new TextEncoder().encode("second line\n"));
    session.stdin.close();
    let result = await withTimeout(session.wait(), 60_000, "the spawned cat");
    checkEq(result.stdout, "hello over the socket\nsecond line\n", "spawned cat's stdout");
    checkEq(result.stderr, "done-after-eof\n", "spawned command's stderr");
    checkEq(result.exitCode, 0, "spawned cat's exit code");
    checkEq(seen.join(""), result.stdout, "onStdout of a spawned session");
    await session.close();
    check(WS_DIALS.length > 0, "commands.spawn never dialled the WebSocket");
    say(`   dialled ${WS_DIALS[0].target} (the SDK asked for ${WS_DIALS[0].url}, subprotocols ${WS_DIALS[0].protocols})`);

    const errs = [];
    const s2 = await sandbox.commands.spawn("pwd; echo $Y; id -un; echo to-stderr >&2; exit 5", {
      cwd: "/tmp",
      env: { Y: "spawned" },
      onStderr: (d) => errs.push(d),
    });
    result = await withTimeout(s2.wait(), 60_000, "the spawned pwd");
    checkEq([result.stdout, result.stderr, result.exitCode], ["/tmp\nspawned\napp\n", "to-stderr\n", 5], "a spawned command's cwd/env/user/exit");
    checkEq(errs.join(""), "to-stderr\n", "onStderr of a spawned session");
  });

  await step("commands.spawn: kill()", async () => {
    const session = await sandbox.commands.spawn("sleep 600");
    await sleep(500);
    session.kill();
    const result = await withTimeout(session.wait(), 30_000, "a spawned `sleep 600` after kill()");
    say(`   killed session ended: exitCode=${result.exitCode} stderr=${JSON.stringify(result.stderr)}`);
    checkEq(result.exitCode, 128 + 15, "exit code of a SIGTERMed session");
    await session.close();
  });

  await step("commands.spawn on a paused sandbox resumes it", async () => {
    await sandbox.pause();
    const dials = WS_DIALS.length;
    const session = await sandbox.commands.spawn("cat /tmp/before-pause.txt");
    const result = await withTimeout(session.wait(), 60_000, "a session on a resumed sandbox");
    checkEq([result.stdout, result.exitCode], ["kept\n", 0], "a session on a resumed sandbox");
    checkEq(WS_DIALS.length - dials, 2, "dials (the first refused while paused, then after /activate)");
    checkEq((await sandbox.getInfo()).status, "active", "status after the spawn");
  });

  await step("Template.delete while a sandbox uses it (ConflictError)", async () => {
    const e = await expectError(web.delete(), ConflictError, "deleting a template a sandbox runs from");
    say(`   ConflictError code=${e.code} message=${JSON.stringify(e.message)}`);
  });

  await step("sandbox.kill", async () => {
    await sandbox.kill();
    cleanup.splice(0, cleanup.length, ...cleanup.filter(([what]) => what !== "kill sandbox"));
    checkEq(await Sandbox.list({ metadata: { run: RUN_ID } }), [], "Sandbox.list after kill");
    const r = await raw("GET", `/sandboxes/${sandbox.id}`, { "X-API-Key": API_KEY });
    checkEq(r.status, 404, `GET a killed sandbox (${r.text.slice(0, 200)})`);
    await sandbox.kill(); // idempotent
    await Sandbox.killById(sandbox.id); // idempotent
    await expectError(other.commands.run("true"), SandboxError, "commands.run on a killed sandbox");
  });

  await step("Template.delete", async () => {
    await web.delete();
    await Template.deleteById(broken.id);
    cleanup.length = 0;
    const names = (await Template.list({ namePrefix: "ts-" })).map((t) => t.name);
    checkEq(names, [], "templates left");
    await web.delete(); // idempotent
    await expectError(Template.connect(web.id), NotFoundError, "Template.connect of a deleted template");
  });

  const counts = {};
  for (const r of DATA_PLANE) counts[r] = (counts[r] ?? 0) + 1;
  say(`data plane requests redirected to kiln: ${show(counts)}; WebSocket dials: ${WS_DIALS.length}`);
}

async function main() {
  let code = 0;
  try {
    await scenario();
    say("PASS: the SDK scenario completed");
    return 0;
  } catch (e) {
    console.log(e instanceof Failure ? `FAIL: ${e.message}` : `FAIL: ${describe(e)}`);
    code = 1;
  }
  for (const [what, undo] of cleanup) {
    try {
      await undo();
      say(`cleanup: ${what}`);
    } catch (e) {
      say(`cleanup: ${what} failed: ${describe(e)}`);
    }
  }
  return code;
}

process.exitCode = await main();

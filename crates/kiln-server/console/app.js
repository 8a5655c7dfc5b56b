// kiln's web console: plain JavaScript, no build step. Every call is an API call with the
// key the user signed in with (kept in sessionStorage, sent as X-API-Key, never in a URL);
// the page itself holds nothing of the server's.
"use strict";

const KEY = "kiln.apiKey";
const main = document.getElementById("main");
const nav = document.getElementById("nav");
const errorBox = document.getElementById("error");

// What the current page started (streams, sockets, timers), stopped when it is left.
let cleanups = [];
function onLeave(fn) { cleanups.push(fn); }
function leave() { for (const fn of cleanups.splice(0)) { try { fn(); } catch (_) { /* gone */ } } }

// ---- DOM ---------------------------------------------------------------------------

// Elements from data only (never HTML strings), so nothing the API returns can inject.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function statusBadge(s) { return h("span", { class: `status status-${s}` }, s); }

function age(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function page(title, ...children) {
  main.replaceChildren(h("h1", {}, title), ...children.filter((c) => c !== null && c !== undefined));
  document.title = `${title} - kiln`;
}

function showError(e) {
  const code = e && e.code ? e.code : "error";
  const message = e && e.message ? e.message : String(e);
  errorBox.textContent = `${code}: ${message}`;
  errorBox.hidden = false;
}
function clearError() { errorBox.hidden = true; errorBox.textContent = ""; }

// A confirmation the user must give (an in-page dialog, reachable by its buttons).
function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    const yes = document.getElementById("confirm-yes");
    const no = document.getElementById("confirm-no");
    const done = (v) => { yes.onclick = no.onclick = null; dialog.close(); resolve(v); };
    yes.onclick = () => done(true);
    no.onclick = () => done(false);
    dialog.showModal();
  });
}

// ---- the API -----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

function apiKey() { return sessionStorage.getItem(KEY); }

async function call(method, path, { body, raw, headers, signal } = {}) {
  const init = { method, headers: { "X-API-Key": apiKey() || "", ...(headers || {}) }, signal };
  if (body !== undefined) {
    if (body instanceof Blob || typeof body === "string") init.body = body;
    else { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    let code = `http_${resp.status}`, message = resp.statusText;
    try { const e = (await resp.json()).error; code = e.code; message = e.message; } catch (_) { /* not JSON */ }
    // A 401 from /metrics means KILN_METRICS_TOKEN guards it, not that the key is bad.
    if (resp.status === 401 && path !== "/templates" && path !== "/metrics") signOut();
    throw new ApiError(resp.status, code, message);
  }
  if (raw) return resp;
  if (resp.status === 204 || resp.status === 202) return null;
  const type = resp.headers.get("content-type") || "";
  return type.startsWith("application/json") ? resp.json() : resp.text();
}

// A data-plane call for one sandbox, authorised by the team's key like any SDK script.
function dataCall(id, method, path, opts = {}) {
  return call(method, path, { ...opts, headers: { "X-Superserve-Sandbox-Id": id, ...(opts.headers || {}) } });
}

// Server-Sent Events over fetch (EventSource cannot send the key as a header).
async function sse(path, onEvent, signal) {
  const resp = await call("GET", path, { raw: true, signal, headers: { Accept: "text/event-stream" } });
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

const enc = (s) => encodeURIComponent(s);

// The routes this server has, from its OpenAPI document: optional features (snapshots,
// previews) show only where the server has them.
let routesCache = null;
function routes() {
  routesCache ||= call("GET", "/openapi.json").then((doc) => Object.keys(doc.paths || {}).filter((p) => doc.paths[p].get));
  return routesCache;
}

// ---- sign in -----------------------------------------------------------------------

function signOut() {
  leave();
  sessionStorage.removeItem(KEY);
  routesCache = null;
  nav.hidden = true;
  if (location.hash !== "") history.replaceState(null, "", location.pathname);
  signInPage();
}

function signInPage() {
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true });
  const form = h("form", { class: "signin", onsubmit: async (ev) => {
    ev.preventDefault();
    clearError();
    sessionStorage.setItem(KEY, input.value.trim());
    try {
      await call("GET", "/templates");
      render();
    } catch (e) {
      sessionStorage.removeItem(KEY);
      showError(e);
    }
  } },
  h("h1", {}, "Sign in to kiln"),
  h("label", { for: "api-key" }, "API key"),
  input,
  h("button", { type: "submit", class: "primary" }, "Sign in"),
  h("p", { class: "muted" }, "A team's key from ", h("code", {}, "kiln admin create-api-key"), ". It stays in this tab."));
  main.replaceChildren(form);
  document.title = "Sign in - kiln";
  input.focus();
}

// ---- overview ----------------------------------------------------------------------

// Prometheus text: {name: [{labels, value}]}.
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$/);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    (out[m[1]] ||= []).push({ labels, value: Number(m[4]) });
  }
  return out;
}

// A histogram's per-bucket counts as a small bar chart.
function histogram(metrics, name, label) {
  const buckets = (metrics[`${name}_bucket`] || []).filter((b) => b.labels.le !== "+Inf");
  const counts = buckets.map((b, i) => b.value - (i ? buckets[i - 1].value : 0));
  const max = Math.max(1, ...counts);
  const total = (metrics[`${name}_count`] || [{ value: 0 }])[0].value;
  const sum = (metrics[`${name}_sum`] || [{ value: 0 }])[0].value;
  const chart = h("div", { class: "chart", role: "img", "aria-label": `${label}: ${total} observations` });
  const labels = h("div", { class: "chart-labels" });
  counts.forEach((c, i) => {
    const bar = h("div", { class: "bar", title: `<= ${buckets[i].labels.le}s: ${c}` });
    bar.style.height = `${(100 * c) / max}%`;
    chart.append(bar);
    labels.append(h("span", {}, `${buckets[i].labels.le}s`));
  });
  return h("div", { class: "card" }, h("div", { class: "muted" }, label),
    h("div", {}, total ? `${total} · mean ${(sum / total).toFixed(2)} s` : "none yet"), chart, labels);
}

async function overviewPage() {
  page("Overview", h("p", { class: "muted" }, "Loading…"));
  const [templates, sandboxes, metricsText] = await Promise.all([
    call("GET", "/templates"), call("GET", "/sandboxes"),
    // Guarded by KILN_METRICS_TOKEN: the overview then goes without the host and the charts.
    call("GET", "/metrics").catch((e) => { if (e.status === 401) return ""; throw e; }),
  ]);
  const m = parseMetrics(metricsText);
  const one = (n) => (m[n] ? m[n][0].value : null);
  const count = (list, s) => list.filter((x) => x.status === s).length;
  const inFlight = templates.filter((t) => t.status === "building" || t.status === "pending");
  const failed = templates.filter((t) => t.status === "failed");
  const card = (label, big, small) => h("div", { class: "card" }, h("div", { class: "muted" }, label), h("div", { class: "big" }, big), small ? h("div", { class: "muted" }, small) : null);
  const live = sandboxes.filter((s) => !["failed", "deleted"].includes(s.status)).length;
  page("Overview",
    h("div", { class: "cards" },
      card("Templates", templates.length, `${count(templates, "ready")} ready · ${failed.length} failed`),
      card("Sandboxes", live, `${count(sandboxes, "active")} active · ${count(sandboxes, "paused")} paused`),
      card("Builds in flight", inFlight.length, inFlight.map((t) => t.name).join(", ")),
      card("Host capacity", `${one("kiln_host_cpus") ?? "?"} CPUs`,
        `${bytes(one("kiln_host_memory_available_bytes"))} free of ${bytes(one("kiln_host_memory_bytes"))} · ${one("kiln_build_slots") ?? "?"} build slots` +
        (one("kiln_team_sandbox_limit") !== null ? ` · ${one("kiln_team_sandbox_limit")} sandboxes per team` : ""))),
    h("h2", {}, "Recent failures"),
    failed.length ? h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Template"), h("th", {}, "Error"))),
      h("tbody", {}, failed.map((t) => h("tr", {}, h("td", {}, h("a", { href: `#/templates/${enc(t.name)}` }, t.name)), h("td", { class: "mono" }, t.error_message || "")))))
      : h("p", { class: "muted" }, "No failed template."),
    h("h2", {}, "Latency"),
    h("div", { class: "cards" },
      histogram(m, "kiln_sandbox_restore_seconds", "Sandbox create (restore) time"),
      histogram(m, "kiln_build_duration_seconds", "Build duration")));
}

// ---- templates ---------------------------------------------------------------------

async function templatesPage() {
  const [templates] = await Promise.all([call("GET", "/templates")]);
  const digests = {};
  await Promise.all(templates.filter((t) => t.latest_build_id).map(async (t) => {
    try { digests[t.id] = await call("GET", `/templates/${enc(t.id)}/builds/${enc(t.latest_build_id)}`); } catch (_) { /* gone */ }
  }));
  page("Templates",
    h("div", { class: "actions" }, h("a", { href: "#/templates/new" }, "New template")),
    templates.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Name", "Status", "Shape", "Base image digest", "Last build"].map((c) => h("th", {}, c)))),
      h("tbody", {}, templates.map((t) => {
        const b = digests[t.id];
        return h("tr", {},
          h("td", {}, h("a", { href: `#/templates/${enc(t.name)}` }, t.name)),
          h("td", {}, statusBadge(t.status)),
          h("td", {}, `${t.vcpu} vCPU · ${t.memory_mib} MiB · ${t.disk_mib} MiB disk`),
          h("td", { class: "mono" }, b && b.image_digest ? b.image_digest.slice(0, 19) : ""),
          h("td", {}, b ? h("span", {}, statusBadge(b.status), ` ${age(b.created_at)} ago`) : ""));
      })))
      : h("p", { class: "muted" }, "No template yet."));
}

function buildDuration(b) {
  if (!b.started_at) return "";
  const end = b.finalized_at ? Date.parse(b.finalized_at) : Date.now();
  return `${Math.round((end - Date.parse(b.started_at)) / 1000)} s`;
}

// A build's log, streamed live: each line tagged with its stream, then how it ended.
function buildLog(template, build, ctl) {
  const box = h("pre", { class: "log", "aria-label": "Build log", tabindex: "0" });
  const result = h("p", { "aria-live": "polite" });
  sse(`/templates/${enc(template.id)}/builds/${enc(build.id)}/logs`, (ev) => {
    if (ev.finished) {
      const err = ev.status === "ready" ? null : (ev.text || "").replace(/^build \w+: /, "");
      const code = err ? err.split(":")[0] : null;
      result.replaceChildren("Build ", statusBadge(ev.status || "finished"),
        code ? h("span", {}, " error code ", h("code", { class: "error-code" }, code), ` — ${err}`) : "");
      return;
    }
    const stream = ev.stream || "system";
    box.append(h("div", { class: `line ${stream}`, "data-stream": stream }, h("span", { class: "tag" }, stream), ev.text));
    box.scrollTop = box.scrollHeight;
  }, ctl.signal).catch((e) => { if (e.name !== "AbortError") showError(e); });
  return h("section", { "aria-label": `Log of build ${build.id}` }, box, result);
}

async function templatePage(name) {
  const t = await call("GET", `/templates/${enc(name)}`);
  const builds = await call("GET", `/templates/${enc(t.id)}/builds`);
  const latest = builds[0];
  const inFlight = latest && ["pending", "building", "snapshotting"].includes(latest.status);
  const logHolder = h("div", {});
  let logCtl = null;
  onLeave(() => logCtl && logCtl.abort());
  const showLog = (b) => {
    if (logCtl) logCtl.abort();
    logCtl = new AbortController();
    logHolder.replaceChildren(h("h2", {}, `Build ${b.id.slice(0, 8)}`), buildLog(t, b, logCtl));
  };
  const act = (fn) => async () => { clearError(); try { await fn(); } catch (e) { showError(e); } };
  page(t.name,
    h("p", {}, statusBadge(t.status), ` ${t.vcpu} vCPU · ${t.memory_mib} MiB · ${t.disk_mib} MiB disk`,
      t.size_bytes ? ` · snapshot ${bytes(t.size_bytes)}` : ""),
    t.error_message ? h("p", { class: "problems mono" }, t.error_message) : null,
    h("div", { class: "actions" },
      h("button", { class: "primary", disabled: t.status !== "ready", onclick: act(async () => {
        const s = await call("POST", "/sandboxes", { body: { name: `${t.name}-${Math.random().toString(16).slice(2, 8)}`, from_template: t.name } });
        location.hash = `#/sandboxes/${s.id}`;
      }) }, "Create sandbox"),
      h("button", { onclick: act(async () => { await call("POST", `/templates/${enc(t.id)}/builds`); render(); }) }, "Rebuild"),
      h("button", { disabled: !inFlight, onclick: act(async () => {
        await call("DELETE", `/templates/${enc(t.id)}/builds/${enc(latest.id)}`); render();
      }) }, "Cancel build"),
      h("a", { href: `#/templates/${enc(t.name)}/edit` }, "Edit spec"),
      h("button", { class: "danger", onclick: act(async () => {
        if (!(await confirmAction(`Delete template ${t.name}?`))) return;
        await call("DELETE", `/templates/${enc(t.id)}`); location.hash = "#/templates";
      }) }, "Delete")),
    h("h2", {}, "Spec"),
    h("pre", { "aria-label": "Spec" }, JSON.stringify(t.build_spec || {}, null, 2)),
    h("h2", {}, "Builds"),
    h("table", {}, h("thead", {}, h("tr", {}, ["Build", "Status", "Started", "Duration", "Error"].map((c) => h("th", {}, c)))),
      h("tbody", {}, builds.map((b) => h("tr", {},
        h("td", {}, h("button", { onclick: () => showLog(b), "aria-label": `Show log of build ${b.id.slice(0, 8)}` }, b.id.slice(0, 8))),
        h("td", {}, statusBadge(b.status)), h("td", {}, b.started_at ? `${age(b.started_at)} ago` : ""),
        h("td", {}, buildDuration(b)), h("td", { class: "mono" }, b.error_message || ""))))),
    logHolder);
  if (latest) showLog(latest);
  if (inFlight || t.status === "building") {
    const timer = setInterval(async () => {
      try {
        const now = await call("GET", `/templates/${enc(t.id)}`);
        if (now.status !== t.status) { clearInterval(timer); render(); }
      } catch (_) { /* shown on the next action */ }
    }, 2000);
    onLeave(() => clearInterval(timer));
  }
}

// The spec editor: checked as it is typed by the server (POST /validate, the messages of
// `kiln validate`), then built.
async function editorPage(name) {
  let initial = { name: "", build_spec: { from: "python:3.11", steps: [{ run: "echo hello" }] } };
  if (name) {
    const t = await call("GET", `/templates/${enc(name)}`);
    initial = { name: t.name, vcpu: t.vcpu, memory_mib: t.memory_mib, disk_mib: t.disk_mib, build_spec: t.build_spec };
  }
  const area = h("textarea", { id: "spec", spellcheck: "false" });
  area.value = JSON.stringify(initial, null, 2);
  const verdict = h("div", { id: "problems", "aria-live": "polite" });
  const build = h("button", { class: "primary", disabled: true }, "Build");
  let timer = null, seq = 0;
  const check = async () => {
    const mine = ++seq;
    try {
      const v = await call("POST", "/validate", { body: area.value, headers: { "Content-Type": "application/json" } });
      if (mine !== seq) return;
      build.disabled = !v.valid;
      verdict.replaceChildren(v.valid ? h("p", { class: "valid" }, "Valid")
        : h("ul", { class: "problems mono", "aria-label": "Problems" }, v.problems.map((p) => h("li", {}, p))));
    } catch (e) { showError(e); }
  };
  area.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(check, 250); });
  onLeave(() => clearTimeout(timer));
  build.addEventListener("click", async () => {
    clearError();
    try {
      const body = area.value;
      const doc = JSON.parse(body);
      if (name) {
        await call("POST", `/templates/${enc(name)}/builds`, { body, headers: { "Content-Type": "application/json" } });
        location.hash = `#/templates/${enc(name)}`;
      } else {
        await call("POST", "/templates", { body, headers: { "Content-Type": "application/json" } });
        location.hash = `#/templates/${enc(doc.name)}`;
      }
    } catch (e) { showError(e); }
  });
  page(name ? `Edit ${name}` : "New template",
    h("label", { for: "spec" }, "Spec (the body of POST /templates)"), area, verdict,
    h("div", { class: "actions" }, build));
  check();
}

// ---- sandboxes ---------------------------------------------------------------------

const SANDBOX_STATUSES = ["starting", "active", "pausing", "paused", "resuming", "failed", "deleted"];

async function templateNames() {
  const names = {};
  for (const t of await call("GET", "/templates")) names[t.id] = t.name;
  return names;
}

async function sandboxesPage(query) {
  const params = new URLSearchParams(query);
  const status = h("select", { id: "filter-status" }, h("option", { value: "" }, "any"),
    SANDBOX_STATUSES.map((s) => h("option", { value: s, selected: params.get("status") === s }, s)));
  const meta = h("input", { id: "filter-metadata", placeholder: "key=value,…", value: params.get("metadata") || "" });
  const apply = (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    if (status.value) q.set("status", status.value);
    if (meta.value.trim()) q.set("metadata", meta.value.trim());
    location.hash = `#/sandboxes${q.toString() ? `?${q}` : ""}`;
  };
  const api = new URLSearchParams();
  if (params.get("status")) api.set("status", params.get("status"));
  for (const kv of (params.get("metadata") || "").split(",").map((s) => s.trim()).filter(Boolean)) {
    const [k, ...v] = kv.split("=");
    api.set(`metadata.${k}`, v.join("="));
  }
  const [list, names] = await Promise.all([call("GET", `/sandboxes${api.toString() ? `?${api}` : ""}`), templateNames()]);
  page("Sandboxes",
    h("form", { class: "filters", onsubmit: apply },
      h("label", {}, "Status", status), h("label", {}, "Metadata", meta),
      h("button", { type: "submit" }, "Filter")),
    list.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Sandbox", "Status", "Template", "Node", "Age", "Metadata"].map((c) => h("th", {}, c)))),
      h("tbody", {}, list.map((s) => h("tr", {},
        h("td", {}, h("a", { href: `#/sandboxes/${s.id}` }, s.name || s.id), h("div", { class: "muted mono" }, s.id.slice(0, 8))),
        h("td", {}, statusBadge(s.status)),
        h("td", {}, names[s.template_id] || s.template_id || ""),
        h("td", {}, location.host),
        h("td", {}, age(s.created_at)),
        h("td", { class: "mono" }, Object.entries(s.metadata || {}).map(([k, v]) => `${k}=${v}`).join(", "))))))
      : h("p", { class: "muted" }, "No sandbox matches."));
}

// A table of whatever objects an optional endpoint lists (snapshots).
function genericTable(items) {
  const cols = [...new Set(items.flatMap((i) => Object.keys(i)))].slice(0, 6);
  const cell = (v) => (typeof v === "string" && /^https?:\/\//.test(v) ? h("a", { href: v, target: "_blank", rel: "noopener noreferrer" }, v)
    : typeof v === "object" && v !== null ? JSON.stringify(v) : v);
  return h("table", {}, h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, c)))),
    h("tbody", {}, items.map((i) => h("tr", {}, cols.map((c) => h("td", {}, cell(i[c])))))));
}

async function optionalSection(id, word, title) {
  const path = (await routes()).find((p) => p.startsWith("/sandboxes/{sandbox}/") && p.includes(word));
  if (!path) return null;
  const section = h("section", {}, h("h2", {}, title));
  try {
    const got = await call("GET", path.replace("{sandbox}", enc(id)));
    const items = Array.isArray(got) ? got : (got && (got.data || got.items || got[word + "s"])) || [];
    section.append(items.length ? genericTable(items) : h("p", { class: "muted" }, `No ${title.toLowerCase()}.`));
  } catch (e) { section.append(h("p", { class: "problems" }, `${e.code}: ${e.message}`)); }
  return section;
}

// Preview URLs: the policy, each published port with its URL (a private port's link
// mints a short-lived signed URL when clicked, never showing the token), publish and
// unpublish.
async function previewSection(id) {
  const path = (await routes()).find((p) => p.startsWith("/sandboxes/{sandbox}/") && p.includes("preview"));
  if (!path) return null;
  const base = `/sandboxes/${enc(id)}/preview-ports`;
  const section = h("section", { "aria-label": "Previews" }, h("h2", {}, "Previews"));
  const body = h("div", {});
  const open = (p) => async (ev) => {
    ev.preventDefault();
    clearError();
    // Opened at once (inside the click), pointed at the signed URL once it is minted.
    const w = window.open("about:blank", "_blank");
    if (w) w.opener = null;
    try {
      const t = await call("POST", `${base}/${p.port}/token`, { body: { expires_in_seconds: 300 } });
      const url = `${t.url}/?${encodeURIComponent(t.query_param)}=${encodeURIComponent(t.token)}`;
      if (w) w.location.href = url; else location.href = url;
    } catch (e) { if (w) w.close(); showError(e); }
  };
  const load = async () => {
    const list = await call("GET", base);
    body.replaceChildren(h("p", { class: "muted" }, `Policy: ${list.preview_access}`),
      list.ports.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Port", "Access", "URL", ""].map((c) => h("th", {}, c)))),
        h("tbody", {}, list.ports.map((p) => h("tr", {}, h("td", {}, String(p.port)), h("td", {}, p.access),
          h("td", { class: "mono" }, p.access === "public"
            ? h("a", { href: p.url, target: "_blank", rel: "noopener noreferrer" }, p.url)
            : h("a", { href: p.url, onclick: open(p), title: "Opens a signed URL valid for 5 minutes" }, p.url)),
          h("td", {}, h("button", { onclick: async () => {
            clearError();
            try { await call("DELETE", `${base}/${p.port}`); await load(); } catch (e) { showError(e); }
          } }, "Unpublish"))))))
        : h("p", { class: "muted" }, "No published port."));
  };
  const port = h("input", { id: "preview-port", "aria-label": "Preview port", type: "number", min: "1024", max: "65535", placeholder: "port", required: true });
  const access = h("select", { id: "preview-access", "aria-label": "Preview access" }, h("option", { value: "" }, "default access"),
    h("option", { value: "public" }, "public"), h("option", { value: "private" }, "private"));
  const form = h("form", { class: "actions", onsubmit: async (ev) => {
    ev.preventDefault();
    clearError();
    const req = { port: Number(port.value) };
    if (access.value) req.access = access.value;
    try { await call("POST", base, { body: req }); port.value = ""; await load(); } catch (e) { showError(e); }
  } }, port, access, h("button", { type: "submit" }, "Publish"));
  try { await load(); } catch (e) { body.replaceChildren(h("p", { class: "problems" }, `${e.code}: ${e.message}`)); }
  section.append(body, form);
  return section;
}

async function networkSection(id) {
  const log = await call("GET", `/sandboxes/${enc(id)}/network?limit=50`);
  return h("section", {}, h("h2", {}, "Network log"),
    log.data.length ? h("table", {}, h("thead", {}, h("tr", {}, ["Time", "Destination", "Verdict", "Rule", "Sent"].map((c) => h("th", {}, c)))),
      h("tbody", {}, log.data.map((e) => h("tr", {}, h("td", {}, `${age(e.ts)} ago`),
        h("td", { class: "mono" }, e.direction === "inbound"
          ? `preview :${e.dst_port} ${e.method || ""} ${e.path || ""} -> ${e.status}`
          : `${e.host || e.dst_ip || ""}:${e.dst_port || ""}`), h("td", {}, e.verdict),
        h("td", { class: "mono" }, e.match_rule || ""), h("td", {}, bytes(e.bytes_sent))))))
      : h("p", { class: "muted" }, "No connection yet."));
}

// A directory listing through the data plane (the files API has no listing).
async function listDir(id, dir) {
  const quoted = `'${dir.replace(/'/g, "'\\''")}'`;
  const r = await dataCall(id, "POST", "/exec", { body: { command: `find ${quoted} -mindepth 1 -maxdepth 1 -printf '%y\\t%s\\t%f\\n' | sort -k3` } });
  if (r.exit_code !== 0) throw new ApiError(0, "listing_failed", r.stderr.trim() || `exit code ${r.exit_code}`);
  return r.stdout.split("\n").filter(Boolean).map((l) => { const [kind, size, ...n] = l.split("\t"); return { kind, size: Number(size), name: n.join("\t") }; });
}

function fileBrowser(id) {
  let dir = "/root";
  const section = h("section", { "aria-label": "Files" }, h("h2", {}, "Files"));
  const body = h("div", {});
  const where = h("input", { id: "files-path", value: dir });
  const upload = h("input", { id: "upload-file", type: "file" });
  const join = (name) => `${dir.replace(/\/+$/, "")}/${name}`;
  const download = async (path, name) => {
    try {
      const resp = await dataCall(id, "GET", `/files?path=${enc(path)}`, { raw: true });
      const url = URL.createObjectURL(await resp.blob());
      const a = h("a", { href: url, download: name });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) { showError(e); }
  };
  const show = async () => {
    clearError();
    try {
      const entries = await listDir(id, dir);
      where.value = dir;
      body.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Size", ""].map((c) => h("th", {}, c)))),
        h("tbody", {},
          dir !== "/" ? h("tr", {}, h("td", {}, h("button", { onclick: () => { dir = dir.replace(/\/[^/]*\/?$/, "") || "/"; show(); } }, "..")), h("td", {}), h("td", {})) : null,
          entries.map((e) => h("tr", {},
            h("td", {}, e.kind === "d" ? h("button", { onclick: () => { dir = join(e.name); show(); } }, `${e.name}/`) : h("span", { class: "mono" }, e.name)),
            h("td", {}, e.kind === "f" ? bytes(e.size) : ""),
            h("td", {}, e.kind === "f" || e.kind === "d" ? h("button", { "aria-label": `Download ${e.name}`, onclick: () => download(join(e.name), e.kind === "d" ? `${e.name}.zip` : e.name) }, "Download") : ""))))));
    } catch (e) { body.replaceChildren(h("p", { class: "problems" }, `${e.code}: ${e.message}`)); }
  };
  section.append(
    h("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); dir = where.value || "/"; show(); } },
      h("label", {}, "Directory", where), h("button", { type: "submit" }, "Open")),
    h("div", { class: "filters" }, h("label", {}, "Upload file", upload),
      h("button", { type: "button", onclick: async () => {
        const f = upload.files[0];
        if (!f) return;
        try { await dataCall(id, "POST", `/files?path=${enc(join(f.name))}`, { body: f }); upload.value = ""; show(); } catch (e) { showError(e); }
      } }, "Upload")),
    body);
  show();
  return section;
}

// A terminal on a PTY session: /exec/connect with kiln's pty extension, authenticated
// like the SDKs (the sandbox's access token in a subprotocol), the sandbox named in
// another (a browser cannot set headers on a WebSocket).
async function terminalSection(id) {
  const holder = h("div", { id: "terminal" });
  const state = h("p", { class: "muted", "aria-live": "polite" }, "Connecting…");
  const section = h("section", {}, h("h2", {}, "Terminal"), holder, state);
  const { access_token: token } = await call("POST", `/sandboxes/${enc(id)}/activate`);
  const term = new window.Terminal({ cursorBlink: true, fontSize: 13, convertEol: false, scrollback: 2000 });
  const fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  requestAnimationFrame(() => {
    term.open(holder);
    term.textarea.setAttribute("aria-label", "Terminal");
    fit.fit();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/exec/connect`, ["superserve.exec.v1", `sandbox.${id}`, `token.${token}`]);
    ws.binaryType = "arraybuffer";
    const utf8 = new TextEncoder();
    const send = (bytes) => { const f = new Uint8Array(bytes.length + 1); f[0] = 0; f.set(bytes, 1); ws.send(f); };
    ws.onopen = () => {
      ws.send(JSON.stringify({ command: "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi", pty: { cols: term.cols, rows: term.rows } }));
      state.textContent = "Connected.";
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        const msg = JSON.parse(ev.data);
        if (msg.finished) state.textContent = msg.error ? `Ended: ${msg.error}` : `Exited with code ${msg.exit_code}.`;
        return;
      }
      const data = new Uint8Array(ev.data);
      if (data[0] === 1 || data[0] === 2) term.write(data.subarray(1));
    };
    ws.onclose = (ev) => { if (!state.textContent.startsWith("Exited") && !state.textContent.startsWith("Ended")) state.textContent = `Disconnected${ev.reason ? `: ${ev.reason}` : ""}.`; };
    term.onData((d) => { if (ws.readyState === 1) send(utf8.encode(d)); });
    term.onBinary((d) => { if (ws.readyState === 1) send(Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff)); });
    term.onResize(({ cols, rows }) => { if (ws.readyState === 1) ws.send(JSON.stringify({ type: "resize", cols, rows })); });
    const onWin = () => fit.fit();
    window.addEventListener("resize", onWin);
    onLeave(() => { window.removeEventListener("resize", onWin); ws.close(); term.dispose(); });
  });
  return section;
}

async function sandboxPage(id) {
  const [s, names] = await Promise.all([call("GET", `/sandboxes/${enc(id)}`), templateNames()]);
  const act = (fn) => async (ev) => {
    clearError();
    ev.target.disabled = true;
    try { await fn(); render(); } catch (e) { showError(e); ev.target.disabled = false; }
  };
  const row = (k, v) => [h("div", { class: "muted" }, k), h("div", {}, v)];
  page(s.name || s.id,
    h("div", { class: "grid2" },
      row("Status", statusBadge(s.status)), row("Id", h("span", { class: "mono" }, s.id)),
      row("Template", s.template_id ? h("a", { href: `#/templates/${enc(names[s.template_id] || s.template_id)}` }, names[s.template_id] || s.template_id) : ""),
      row("Shape", `${s.vcpu_count} vCPU · ${s.memory_mib} MiB`), row("Node", location.host),
      row("Age", age(s.created_at)),
      row("Metadata", Object.entries(s.metadata || {}).map(([k, v]) => `${k}=${v}`).join(", ")),
      row("Egress rules", s.network ? `allow ${(s.network.allow_out || []).join(", ") || "-"} · deny ${(s.network.deny_out || []).join(", ") || "-"}` : "none")),
    h("div", { class: "actions" },
      h("button", { disabled: s.status !== "active", onclick: act(() => call("POST", `/sandboxes/${enc(id)}/pause`)) }, "Pause"),
      h("button", { disabled: s.status !== "paused", onclick: act(() => call("POST", `/sandboxes/${enc(id)}/resume`)) }, "Resume"),
      h("button", { class: "danger", disabled: ["deleted", "failed"].includes(s.status), onclick: async () => {
        clearError();
        if (!(await confirmAction(`Kill sandbox ${s.name || s.id}? Everything in it is lost.`))) return;
        try { await call("DELETE", `/sandboxes/${enc(id)}`); location.hash = "#/sandboxes"; } catch (e) { showError(e); }
      } }, "Kill")));
  if (["deleted", "failed"].includes(s.status)) return;
  const sections = await Promise.all([
    optionalSection(id, "snapshot", "Snapshots"), previewSection(id), networkSection(id),
  ]);
  main.append(...sections.filter(Boolean));
  if (s.status === "active") main.append(fileBrowser(id), await terminalSection(id));
}

// ---- routing -----------------------------------------------------------------------

async function render() {
  leave();
  clearError();
  if (!apiKey()) { nav.hidden = true; signInPage(); return; }
  nav.hidden = false;
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of nav.querySelectorAll("a")) {
    const target = a.getAttribute("href").replace(/^#\/?/, "").split("/")[0];
    if ((parts[0] || "") === target) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  try {
    if (parts[0] === "templates" && parts[1] === "new") await editorPage(null);
    else if (parts[0] === "templates" && parts[2] === "edit") await editorPage(parts[1]);
    else if (parts[0] === "templates" && parts[1]) await templatePage(parts[1]);
    else if (parts[0] === "templates") await templatesPage();
    else if (parts[0] === "sandboxes" && parts[1]) await sandboxPage(parts[1]);
    else if (parts[0] === "sandboxes") await sandboxesPage(query || "");
    else await overviewPage();
  } catch (e) {
    showError(e);
    if (main.childElementCount === 0) page("Error", h("p", {}, "The page could not be loaded; the error is above."));
  }
}

document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", render);
render();

// Stowage dashboard: read-only views over the controller's Connect API
// (JSON), with the API token the user pastes. Everything shown is built
// with textContent: no HTML from the API is ever parsed.
"use strict";

const TOKEN_KEY = "stowage.token";
const REFRESH_MS = 3000;
const MAX_WATCHES = 8;

const $ = (id) => document.getElementById(id);

class APIError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function headers(contentType) {
  return {
    "Content-Type": contentType,
    "Connect-Protocol-Version": "1",
    "Authorization": "Bearer " + token(),
  };
}

// call makes a unary Connect call with JSON.
async function call(service, method, body) {
  const resp = await fetch("/stowage.v1." + service + "/" + method, {
    method: "POST", headers: headers("application/json"), body: JSON.stringify(body || {}),
    cache: "no-store", credentials: "omit",
  });
  const text = await resp.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (e) { data = { message: text }; }
  if (!resp.ok) {
    throw new APIError(data.code || "unknown", data.message || ("HTTP " + resp.status));
  }
  return data;
}

// all follows next_page_token through every page of a List call.
async function all(service, method, field, body) {
  const out = [];
  let pageToken = "";
  for (let i = 0; i < 20; i++) { // at most 20 pages of 500
    const data = await call(service, method, Object.assign({}, body || {}, { pageToken }));
    out.push(...(data[field] || []));
    pageToken = data.nextPageToken || "";
    if (!pageToken) break;
  }
  return out;
}

// envelope frames one Connect streaming message.
function envelope(obj) {
  const payload = new TextEncoder().encode(JSON.stringify(obj));
  const buf = new Uint8Array(5 + payload.length);
  new DataView(buf.buffer).setUint32(1, payload.length);
  buf.set(payload, 5);
  return buf;
}

// watch follows a server stream (JobService.WatchJob) and calls onMsg with
// each message; it resolves when the stream ends.
async function watch(service, method, body, onMsg, signal) {
  const resp = await fetch("/stowage.v1." + service + "/" + method, {
    method: "POST", headers: headers("application/connect+json"), body: envelope(body),
    cache: "no-store", credentials: "omit", signal,
  });
  if (!resp.ok || !resp.body) {
    let data = {};
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    throw new APIError(data.code || "unknown", data.message || ("HTTP " + resp.status));
  }
  const reader = resp.body.getReader();
  let buf = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (value) {
      const joined = new Uint8Array(buf.length + value.length);
      joined.set(buf);
      joined.set(value, buf.length);
      buf = joined;
    }
    while (buf.length >= 5) {
      const flags = buf[0];
      const len = new DataView(buf.buffer, buf.byteOffset).getUint32(1);
      if (buf.length < 5 + len) break;
      const msg = JSON.parse(new TextDecoder().decode(buf.subarray(5, 5 + len)) || "{}");
      buf = buf.slice(5 + len);
      if (flags & 0x02) { // end of stream
        if (msg.error) throw new APIError(msg.error.code || "unknown", msg.error.message || "stream failed");
        return;
      }
      onMsg(msg);
    }
    if (done) return;
  }
}

// ---- rendering helpers ----

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v; // CSSOM: allowed by the CSP, unlike a style attribute
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return e;
}

function enumName(v, prefix) {
  if (!v) return "-";
  const s = String(v).replace(prefix, "").toLowerCase().split("_");
  return s.map((w) => w.charAt(0).toUpperCase() + w.slice(1)).join("");
}

function stateCell(v, prefix, reason) {
  const name = enumName(v, prefix);
  let cls = "state-warn";
  if (/^(Up|Ready|Succeeded|BackedUp|CreatedOnPrimary)$/.test(name)) cls = "state-ok";
  if (/^(Failed|Error|Disconnected|ErrorInMaintenance|Cancelled|Removed)$/.test(name)) cls = "state-bad";
  const td = el("td", {}, el("span", { class: cls, text: name }));
  if (reason) td.append(el("div", { class: "muted", text: reason }));
  return td;
}

function bytes(n) {
  n = Number(n || 0);
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  if (s < 60) return s.toFixed(0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function fill(tableId, rows) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...rows);
  if (rows.length === 0) {
    const cols = $(tableId).tHead.rows[0].cells.length;
    body.append(el("tr", {}, el("td", { class: "muted", colspan: String(cols), text: "none" })));
  }
}

function capacityBar(st) {
  const cap = Number(st.capacityBytes || 0);
  if (cap <= 0) return el("span", { class: "muted", text: "not reported" });
  const used = cap - Number(st.availableBytes || 0);
  const frac = Math.min(1, Math.max(0, used / cap));
  const dis = Number(st.effectiveDisableThreshold || 0);
  const notify = Number(st.effectiveNotifyThreshold || 0);
  let cls = "used";
  if (dis && frac >= dis) cls += " bad";
  else if (notify && frac > notify) cls += " warn";
  const bar = el("div", { class: "bar", title: "notify " + (notify * 100).toFixed(0) + "%, disable " + (dis * 100).toFixed(0) + "%" },
    el("div", { class: cls, style: "width:" + (frac * 100).toFixed(1) + "%" }));
  for (const m of [notify, dis]) {
    if (m > 0 && m < 1) bar.append(el("div", { class: "mark", style: "left:" + (m * 100).toFixed(1) + "%" }));
  }
  return el("div", {}, bar, el("div", { class: "bar-label", text: bytes(used) + " of " + bytes(cap) + " (" + (frac * 100).toFixed(1) + "%)" }));
}

// ---- views ----

const state = { stores: {}, templates: {}, watching: new Map(), selectedJob: "", updates: {} };

async function loadStores() {
  const stores = await all("StoreService", "ListStores", "stores");
  state.stores = Object.fromEntries(stores.map((s) => [s.id, s]));
  fill("stores", stores.map((s) => el("tr", { "data-store": s.name },
    el("td", { text: s.name }),
    el("td", { text: enumName(s.role, "STORE_ROLE_") }),
    stateCell(s.state, "STORE_STATE_", s.stateReason),
    el("td", { text: s.provider || "-" }),
    el("td", { text: [s.scope?.zone, s.scope?.cluster, s.scope?.hostId].filter(Boolean).join("/") || "-" }),
    el("td", {}, ...(s.tags || []).map((t) => el("span", { class: "tag", text: t }))),
    el("td", {}, capacityBar(s)),
    el("td", { text: String((s.hostIds || []).length) }))));
}

async function loadHosts() {
  const hosts = await all("HostService", "ListHosts", "hosts");
  fill("hosts", hosts.map((h) => el("tr", { "data-host": h.id },
    el("td", { text: h.id }),
    el("td", { text: h.hostname || "-" }),
    stateCell(h.state, "HOST_STATE_", h.stateReason),
    el("td", { text: (h.zone || "-") + "/" + (h.cluster || "-") }),
    el("td", { text: ago(h.lastHeartbeat) }),
    el("td", { text: String(h.inFlightTasks || 0) }))));
}

async function loadTemplates() {
  const templates = await all("ImageService", "ListTemplates", "templates");
  state.templates = Object.fromEntries(templates.map((t) => [t.id, t]));
  const rows = [];
  for (const t of templates.slice(0, 50)) {
    let where = [];
    try {
      const got = await call("ImageService", "GetTemplate", { id: t.id });
      where = (got.stores || []).map((r) => (state.stores[r.storeId]?.name || r.storeId) + ": " + enumName(r.state, "OBJECT_STATE_"));
    } catch (e) {
      where = ["?"];
    }
    rows.push(el("tr", { "data-template": t.name },
      el("td", { text: t.name }),
      el("td", { text: enumName(t.format, "IMAGE_FORMAT_") }),
      el("td", { text: t.virtualSize ? bytes(t.virtualSize) : "-" }),
      el("td", { text: where.join(", ") || "nowhere yet" })));
  }
  fill("templates", rows);
}

// VOLUME_PAGE bounds what the volumes view reads: one page of volumes (and
// their snapshots), not the whole cloud, every few seconds.
const VOLUME_PAGE = 200;

async function loadVolumes() {
  const [page, snapshots] = await Promise.all([
    call("VolumeService", "ListVolumes", { pageSize: VOLUME_PAGE }),
    call("SnapshotService", "ListSnapshots", { pageSize: 1000 }),
  ]);
  const volumes = page.volumes || [];
  $("volumes-more").textContent = page.nextPageToken ? "Showing the first " + VOLUME_PAGE + " volumes (stowage volume list shows all)." : "";
  const snapsOf = {};
  for (const s of snapshots.snapshots || []) (snapsOf[s.volumeId] ||= []).push(s);
  fill("volumes", volumes.filter((v) => v.state !== "VOLUME_STATE_EXPUNGED").map((v) => {
    const chain = [];
    if (v.templateId) chain.push("template " + (state.templates[v.templateId]?.name || v.templateId) + (v.installMethod ? " (" + v.installMethod + ")" : ""));
    if (v.snapshotId) chain.push("from snapshot " + v.snapshotId);
    const snaps = snapsOf[v.id] || [];
    if (snaps.length) chain.push(snaps.length + " snapshot" + (snaps.length > 1 ? "s: " : ": ") + snaps.map((s) => s.name || s.id.slice(-8)).join(" → "));
    return el("tr", { "data-volume": v.name },
      el("td", { text: v.name }),
      stateCell(v.state, "VOLUME_STATE_", v.error),
      el("td", { text: state.stores[v.storeId]?.name || v.storeId || "-" }),
      el("td", { text: bytes(v.size) }),
      el("td", { text: enumName(v.format, "IMAGE_FORMAT_") }),
      el("td", { text: chain.join("; ") || "-" }));
  }));
}

const terminal = (s) => ["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"].includes(s);

function progressCell(j) {
  const p = j.progress || {};
  const total = Number(p.bytesTotal || 0);
  const done = Number(p.bytesDone || 0);
  const td = el("td", { class: "progress" });
  if (terminal(j.state)) {
    td.append(el("span", { class: "muted", text: j.result || j.error || "" }));
    return td;
  }
  const bar = el("progress", { max: String(total || 1), value: String(total ? done : 0) });
  td.append(bar, el("div", { class: "bar-label", text: (p.phase || "") + (total ? " " + bytes(done) + " of " + bytes(total) : "") +
    (p.bytesPerSecond ? " at " + bytes(p.bytesPerSecond) + "/s" : "") }));
  return td;
}

function jobRow(j) {
  const row = el("tr", { class: "clickable", "data-job": j.id, "data-state": enumName(j.state, "JOB_STATE_"),
      "data-done": String(j.progress?.bytesDone || 0), "data-updates": String(state.updates[j.id] || 0) },
    el("td", { class: "mono", text: j.id.slice(-12) }),
    el("td", { text: j.kind }),
    el("td", { class: "mono", text: (j.targetId || "").slice(-12) }),
    stateCell(j.state, "JOB_STATE_"),
    progressCell(j),
    el("td", { text: ago(j.updatedAt || j.createdAt) }));
  row.addEventListener("click", () => { state.selectedJob = j.id; showJob(j); });
  return row;
}

function showJob(j) {
  const box = $("job-detail");
  const plan = j.plan || {};
  const steps = (plan.steps || []).map((s) => el("li", {}, s.name + " on " + (s.hostId || "any host") + ": " + enumName(s.state, "JOB_STATE_") +
    (s.reason ? " — " + s.reason : "") + (s.error ? " — error: " + s.error : "")));
  const reasons = (plan.reasons || []).map((r) => el("li", { text: r }));
  box.replaceChildren(
    el("h3", { text: "Job " + j.id + " (" + j.kind + ")" }),
    el("div", { text: "State: " + enumName(j.state, "JOB_STATE_") + (j.error ? " — " + j.error : "") }),
    el("div", { text: "Strategy: " + (plan.strategy || "-") + (j.traceId ? "   Trace: " + j.traceId : "") }),
    el("h4", { text: "Steps" }), el("ul", {}, ...steps),
    el("h4", { text: "Why (the plan's reasons)" }), el("ul", { id: "job-reasons" }, ...reasons));
  box.hidden = false;
}

function replaceJob(j) {
  const old = document.querySelector('#jobs tr[data-job="' + CSS.escape(j.id) + '"]');
  if (old) old.replaceWith(jobRow(j));
  if (state.selectedJob === j.id) showJob(j);
}

function follow(j) {
  if (terminal(j.state) || state.watching.has(j.id) || state.watching.size >= MAX_WATCHES) return;
  const ctl = new AbortController();
  state.watching.set(j.id, ctl);
  watch("JobService", "WatchJob", { id: j.id }, (msg) => {
    state.updates[j.id] = (state.updates[j.id] || 0) + 1; // messages of the stream (data-updates)
    if (msg.job) replaceJob(msg.job);
  }, ctl.signal)
    .catch((e) => { if (e.name !== "AbortError") status("watch of job " + j.id + ": " + e.message); })
    .finally(() => state.watching.delete(j.id));
}

async function loadJobs() {
  const data = await call("JobService", "ListJobs", { limit: 20 });
  const jobs = data.jobs || [];
  fill("jobs", jobs.map(jobRow));
  jobs.forEach(follow);
  if (state.selectedJob) {
    const j = jobs.find((x) => x.id === state.selectedJob);
    if (j) showJob(j);
  }
}

function status(text) { $("status").textContent = text; }

let rounds = 0;

async function refresh() {
  try {
    await loadStores();
    // Templates (a GetTemplate each) and volumes change slowly: every
    // fifth round (15 s); jobs, stores and hosts every round (3 s).
    const slow = rounds++ % 5 === 0 ? loadTemplates().then(loadVolumes) : Promise.resolve();
    await Promise.all([loadHosts(), slow, loadJobs()]);
    status("updated " + new Date().toLocaleTimeString());
  } catch (e) {
    if (e.code === "unauthenticated" || e.code === "permission_denied") {
      logout(e.code === "unauthenticated" ? "The controller refused this token (unauthenticated)." : "This token may not read the cloud (permission denied).");
      return false;
    }
    status("error: " + e.message);
  }
  return true;
}

let timer = 0;

function logout(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  for (const ctl of state.watching.values()) ctl.abort();
  state.watching.clear();
  clearInterval(timer);
  rounds = 0;
  $("dash").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = why || "";
  status("");
}

async function open() {
  $("login").hidden = true;
  $("dash").hidden = false;
  $("logout").hidden = false;
  if (await refresh()) {
    clearInterval(timer);
    timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    open();
  });
  $("logout").addEventListener("click", () => logout(""));
  if (token()) open(); else logout("");
});

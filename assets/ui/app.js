// Crucible web UI: plain JavaScript, no build step, no external code.
//
// Live updates come only from the durable event stream (GET /api/events, read with
// fetch so the API token can travel in a header, resumed with Last-Event-ID after a
// disconnect). Every event carries the full record, so views update from events; the UI
// reads a record over HTTP only when it opens it. Nothing polls.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const TOKEN_KEY = "crucible.token";
const DRAFT_KEY = "crucible.draft";
const CURRENT_KEY = "crucible.current";
const PAGE_SIZE = 20;
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

// ---------------------------------------------------------------- small helpers

function announce(text) {
  const a = $("#announcer");
  a.textContent = "";
  // A fresh text node makes screen readers speak even a repeated message.
  setTimeout(() => { a.textContent = text; }, 30);
}

function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms} ms`;
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

function fmtKb(kb) {
  if (kb === null || kb === undefined) return "—";
  if (kb < 1024) return `${kb} KiB`;
  return `${(kb / 1024).toFixed(kb < 10240 ? 1 : 0)} MiB`;
}

function fmtLimits(l) {
  if (!l) return "—";
  return `${l.memory_mb} MiB, ${fmtMs(l.cpu_ms)} CPU, ${l.max_processes} processes`;
}

function fmtAge(secs) {
  if (secs === null || secs === undefined) return "—";
  if (secs < 90) return `${Math.round(secs)} s`;
  if (secs < 5400) return `${Math.round(secs / 60)} min`;
  return `${(secs / 3600).toFixed(1)} h`;
}

function randomKey() {
  // crypto.randomUUID needs a secure context; an appliance on http://host:8080 is not one.
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return "ui-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

async function copyText(text, button) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch (_) { /* fall back below */ }
  if (!ok) {
    const ta = el("textarea", { "aria-hidden": "true", class: "offscreen" });
    ta.value = text;
    document.body.append(ta);
    ta.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    ta.remove();
    button.focus();
  }
  if (!button.dataset.label) button.dataset.label = button.textContent;
  button.textContent = ok ? "Copied" : "Copy failed";
  announce(ok ? "Copied to the clipboard" : "Could not copy");
  clearTimeout(Number(button.dataset.timer));
  button.dataset.timer = String(setTimeout(() => { button.textContent = button.dataset.label; }, 1500));
}

// ---------------------------------------------------------------- API token

let tokenPrompt = null;

/** Ask for the token once; concurrent callers share the same dialog. */
function askToken(why) {
  if (tokenPrompt) return tokenPrompt;
  const dlg = $("#token-dialog");
  $("#token-why").textContent = why ||
    "This appliance asks for a bearer token (CRUCIBLE_API_TOKEN). It is kept in this tab's session storage only.";
  $("#token-input").value = sessionStorage.getItem(TOKEN_KEY) || "";
  tokenPrompt = new Promise((resolve) => {
    dlg.addEventListener("close", () => {
      tokenPrompt = null;
      const v = dlg.returnValue;
      if (v === "save" && $("#token-input").value.trim()) {
        sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
        updateTokenButton();
        resolve(true);
      } else {
        if (v === "forget") {
          sessionStorage.removeItem(TOKEN_KEY);
          updateTokenButton();
        }
        resolve(false);
      }
    }, { once: true });
  });
  dlg.returnValue = "";
  dlg.showModal();
  $("#token-input").focus();
  return tokenPrompt;
}

function updateTokenButton() {
  const has = !!sessionStorage.getItem(TOKEN_KEY);
  $("#token-button").textContent = has ? "API token ✓" : "API token";
  $("#token-button").setAttribute("aria-label", has ? "API token (set)" : "API token (not set)");
}

// ---------------------------------------------------------------- API client

class ApiError extends Error {
  constructor(code, message, status, retryAfter) {
    super(message);
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
  }
  describe() {
    const wait = this.retryAfter ? ` Try again in ${this.retryAfter} s.` : "";
    return `${this.message}${wait} (${this.code})`;
  }
}

function authHeaders(extra = {}) {
  const h = { ...extra };
  const t = sessionStorage.getItem(TOKEN_KEY);
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function api(method, path, body, extraHeaders = {}) {
  for (;;) {
    const init = { method, headers: authHeaders({ Accept: "application/json", ...extraHeaders }), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError("network", `Cannot reach the appliance: ${e.message}`, 0);
    }
    if (resp.status === 401) {
      const again = await askToken(sessionStorage.getItem(TOKEN_KEY)
        ? "The appliance refused this token. Enter the right one."
        : "This appliance asks for an API token (CRUCIBLE_API_TOKEN).");
      if (again) { stream.restart(); continue; }
      throw new ApiError("unauthorized", "The appliance needs an API token.", 401);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(err.code || `http_${resp.status}`, err.message || text || resp.statusText,
        resp.status, resp.headers.get("Retry-After"));
    }
    return data;
  }
}

// ---------------------------------------------------------------- records

/** Newest known version of each record the UI has seen. */
const records = new Map();
const recordListeners = new Set();

const MAX_RECORDS = 200;

function upsert(rec) {
  if (!rec || !rec.eval_id) return null;
  const old = records.get(rec.eval_id);
  if (old && (old.version || 0) > (rec.version || 0)) return old;
  records.set(rec.eval_id, rec);
  for (const f of recordListeners) f(rec, old);
  if (records.size > MAX_RECORDS) pruneRecords();
  return rec;
}

/** Keep what is on screen; a busy appliance must not grow an open tab without bound. */
function pruneRecords() {
  const keep = new Set([currentId, route.arg, ...hist.rows.map((r) => r.eval_id)]);
  for (const id of records.keys()) {
    if (!keep.has(id)) { records.delete(id); startedHere.delete(id); }
  }
}

/** Local arrival time of each evaluation's start (see progressText). */
const startedHere = new Map();

async function loadRecord(id) {
  return upsert(await api("GET", `/api/eval/${encodeURIComponent(id)}`));
}

// ---------------------------------------------------------------- event stream

const stream = {
  lastSeq: null,
  ctrl: null,
  backoff: 500,
  timer: null,
  readyResolve: null,
  ready: null,
  state: "connecting",

  start() {
    this.ready = new Promise((r) => { this.readyResolve = r; });
    this.connect();
  },

  /** Reconnect now (a new token, a visible tab again); `force` also drops a live stream. */
  restart(force) {
    if (this.state === "live" && !force) return;
    if (this.connecting && !force) return;
    clearTimeout(this.timer);
    if (this.ctrl) this.ctrl.abort();
    this.connect();
  },

  /** A hidden tab gives its connection back (browsers allow ~6 per host). */
  pause() {
    clearTimeout(this.timer);
    if (this.ctrl) this.ctrl.abort();
    this.ctrl = null;
    this.connecting = false;
    this.setState("paused", "paused");
  },

  setState(state, label) {
    this.state = state;
    const p = $("#stream-state");
    p.dataset.state = state;
    p.textContent = label;
  },

  /** Resolves once the stream is live (or after `ms`, so a submit never hangs on it). */
  waitReady(ms) {
    return Promise.race([this.ready, new Promise((r) => setTimeout(r, ms))]);
  },

  async connect() {
    const ctrl = new AbortController();
    this.ctrl = ctrl;
    this.connecting = true;
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (this.lastSeq !== null) headers["Last-Event-ID"] = String(this.lastSeq);
    let resp;
    try {
      resp = await fetch("/api/events", { headers, signal: ctrl.signal, cache: "no-store" });
    } catch (_) {
      if (ctrl.signal.aborted) return;
      this.connecting = false;
      this.retry();
      return;
    }
    this.connecting = false;
    if (ctrl.signal.aborted) return;
    if (resp.status === 401) {
      this.setState("token", "needs token");
      askToken("This appliance asks for an API token (CRUCIBLE_API_TOKEN).")
        .then((ok) => { if (ok) this.restart(); });
      return;
    }
    if (!resp.ok || !resp.body) {
      this.retry();
      return;
    }
    this.setState("live", "live");
    if (this.readyResolve) { this.readyResolve(); this.readyResolve = null; }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let pendingCr = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        // The backoff resets only once the server really streams (not on bare headers).
        this.backoff = 500;
        // A CR at a chunk's end may be the first half of CRLF: keep it for the next one.
        let chunk = (pendingCr ? "\r" : "") + value;
        pendingCr = chunk.endsWith("\r");
        if (pendingCr) chunk = chunk.slice(0, -1);
        buf += chunk.replace(/\r\n?/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          this.frame(block);
        }
      }
    } catch (_) {
      if (ctrl.signal.aborted) return;
    }
    if (ctrl.signal.aborted) return;
    this.retry();
  },

  frame(block) {
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) {
        // The greeting names where the stream starts; resume there if it drops before
        // any event.
        const m = /after (\d+)/.exec(line);
        if (m && this.lastSeq === null) this.lastSeq = Number(m[1]);
        continue;
      }
      const c = line.indexOf(":");
      const field = c < 0 ? line : line.slice(0, c);
      let v = c < 0 ? "" : line.slice(c + 1);
      if (v.startsWith(" ")) v = v.slice(1);
      if (field === "id") id = v;
      else if (field === "data") data.push(v);
    }
    if (id !== null && /^\d+$/.test(id)) this.lastSeq = Number(id);
    if (!data.length) return;
    let ev;
    try { ev = JSON.parse(data.join("\n")); } catch (_) { return; }
    // When it started by this browser's clock: elapsed time immune to clock skew.
    if (ev && ev.type === "evaluation:started" && !startedHere.has(ev.eval_id)) startedHere.set(ev.eval_id, Date.now());
    if (ev && ev.data) upsert(ev.data);
    onEvent(ev);
  },

  retry() {
    this.setState("offline", "reconnecting…");
    const d = this.backoff + Math.random() * 250;
    this.backoff = Math.min(this.backoff * 2, 15000);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), d);
  },
};

// ---------------------------------------------------------------- record panel

/** Render `rec` into `root` (a container holding one cloned #tpl-record). */
function renderRecord(root, rec) {
  let art = root.querySelector(".record");
  if (!art || art.dataset.evalId !== rec.eval_id) {
    root.replaceChildren($("#tpl-record").content.cloneNode(true));
    art = root.querySelector(".record");
    art.dataset.evalId = rec.eval_id;
    art.querySelector('[data-action="cancel"]').addEventListener("click", (e) => cancelEval(rec.eval_id, e.currentTarget));
    for (const b of art.querySelectorAll("button.copy")) {
      b.addEventListener("click", () => {
        const r = records.get(art.dataset.evalId) || {};
        copyText(b.dataset.copy === "stdout" ? r.output || "" : r.stderr || "", b);
      });
    }
  }
  const f = (name) => art.querySelector(`[data-field="${name}"]`);
  const status = rec.status || "queued";
  art.dataset.status = status;
  f("status").textContent = status;
  f("status").dataset.status = status;
  const link = f("permalink");
  link.textContent = rec.eval_id;
  link.href = `#/eval/${rec.eval_id}`;
  f("language").textContent = rec.language || "—";
  f("exit_code").textContent = rec.exit_code ?? "—";
  f("failure_reason").textContent = rec.failure_reason || "—";
  f("runtime").textContent = fmtMs(rec.runtime_ms);
  f("cpu").textContent = fmtMs(rec.cpu_ms);
  f("memory_peak").textContent = fmtKb(rec.memory_peak_kb);
  f("limits").textContent = fmtLimits(rec.limits);
  renderJudging(f, rec);
  f("created_at").textContent = fmtTime(rec.created_at);
  f("started_at").textContent = fmtTime(rec.started_at);
  f("completed_at").textContent = fmtTime(rec.completed_at);
  f("error").hidden = !rec.error;
  f("error").textContent = rec.error || "";
  f("truncated").hidden = !rec.output_truncated;
  if (f("stdout").textContent !== (rec.output || "")) f("stdout").textContent = rec.output || "";
  if (f("stderr").textContent !== (rec.stderr || "")) f("stderr").textContent = rec.stderr || "";
  const cancel = art.querySelector('[data-action="cancel"]');
  cancel.hidden = TERMINAL.has(status);
  const prog = f("progress");
  prog.dataset.status = status;
  if (status === "running" && rec.started_at) prog.dataset.since = rec.started_at;
  else delete prog.dataset.since;
  prog.textContent = progressText(rec);
}

// Compile step, tests and verdict (judged evaluations); hidden when there are none.
function renderJudging(f, rec) {
  const tests = rec.tests || [];
  f("verdict-box").hidden = !rec.verdict;
  f("verdict").textContent = rec.verdict || "";
  f("verdict").dataset.verdict = rec.verdict || "";
  f("score").textContent = rec.score ? `(${rec.score.passed} / ${rec.score.total} passed)` : "";
  const c = rec.compile;
  f("compile-box").hidden = !c;
  if (c) {
    f("compile-summary").textContent = c.cached
      ? "from the compile cache"
      : `exit ${c.exit_code ?? "—"}, ${fmtMs(c.runtime_ms)}, ${fmtKb(c.memory_peak_kb)}`;
    const text = [c.stdout, c.stderr].filter(Boolean).join("\n");
    if (f("compile-stderr").textContent !== text) f("compile-stderr").textContent = text;
  }
  f("tests-box").hidden = tests.length === 0;
  const rows = tests.map((t, i) => {
    const verdict = t.verdict || (rec.status === "running" ? "…" : "—");
    const shown = t.verdict && t.verdict !== "accepted" && t.verdict !== "skipped"
      ? (t.stdout || t.stderr || "") : "";
    return el("tr", {},
      el("td", { text: String(i + 1) }),
      el("td", { text: t.name || "" }),
      el("td", {}, el("span", { class: "verdict", "data-verdict": t.verdict || "", text: verdict })),
      el("td", { text: fmtMs(t.runtime_ms) }),
      el("td", { text: fmtMs(t.cpu_ms) }),
      el("td", { text: fmtKb(t.memory_peak_kb) }),
      el("td", { class: "out", text: shown }));
  });
  f("tests").replaceChildren(...rows);
}

function progressText(rec) {
  switch (rec.status) {
    case "queued": return "waiting for a worker";
    case "running": {
      const tests = rec.tests || [];
      const judged = tests.filter((t) => t.verdict).length;
      if (tests.length) return `test ${judged} of ${tests.length} judged`;
      // Seen starting here: this clock; opened while running: the server's start time.
      const here = startedHere.get(rec.eval_id);
      const t = here !== undefined ? here : Date.parse(rec.started_at);
      const secs = Number.isNaN(t) ? 0 : Math.max(0, (Date.now() - t) / 1000);
      return `running for ${secs.toFixed(1)} s`;
    }
    case "completed": return `done in ${fmtMs(rec.runtime_ms)}`;
    case "failed": return `failed${rec.failure_reason ? ` (${rec.failure_reason})` : ""} after ${fmtMs(rec.runtime_ms)}`;
    case "cancelled": return "cancelled";
    default: return rec.status || "";
  }
}

// One local clock for "running for N s": redraws text, asks the server nothing.
setInterval(() => {
  for (const p of document.querySelectorAll('.progress[data-since]')) {
    const art = p.closest(".record");
    const rec = art && records.get(art.dataset.evalId);
    if (rec && rec.status === "running") p.textContent = progressText(rec);
  }
}, 200);

async function cancelEval(id, button) {
  button.disabled = true;
  try {
    upsert(await api("POST", `/api/eval/${encodeURIComponent(id)}/cancel`));
    announce("Evaluation cancelled");
  } catch (e) {
    // 409: it finished first; the event stream shows how.
    if (e.status !== 409) alert(`Cannot cancel: ${e.describe ? e.describe() : e.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- views and routing

const views = ["run", "history", "eval", "health"];
let route = { view: "run", arg: null, query: new URLSearchParams() };

function parseHash() {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, q] = h.split("?");
  const parts = path.split("/").filter(Boolean);
  const view = views.includes(parts[0]) ? parts[0] : "run";
  let arg = null;
  try { arg = parts[1] ? decodeURIComponent(parts[1]) : null; } catch (_) { arg = parts[1]; }
  return { view, arg, query: new URLSearchParams(q || "") };
}

function show(next) {
  route = next;
  for (const v of views) $(`#view-${v}`).hidden = v !== route.view;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === route.view || (route.view === "eval" && a.dataset.nav === "history")) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const titles = { run: "Run", history: "History", eval: "Evaluation", health: "Health" };
  document.title = `${titles[route.view]} · Crucible`;
  if (route.view === "history") openHistory();
  if (route.view === "eval") openEval(route.arg);
  if (route.view === "health") refreshHealth();
  if (route.view === "run") restoreCurrent();
}

function onRouteChange(focus) {
  const before = route.view;
  show(parseHash());
  if (focus && route.view !== before) $(`#view-${route.view} h1`).focus({ preventScroll: false });
}

// ---------------------------------------------------------------- Run view

let currentId = sessionStorage.getItem(CURRENT_KEY);

function restoreCurrent() {
  if (!currentId) return;
  const rec = records.get(currentId);
  if (rec) renderRecord($("#run-result"), rec);
  else loadRecord(currentId).catch(() => {}); // the record listener draws it
}

async function submitRun(ev) {
  if (ev) ev.preventDefault();
  const btn = $("#run-button");
  if (btn.disabled) return;
  const err = $("#run-error");
  err.textContent = "";
  const code = $("#code").value;
  const timeout = Number($("#timeout").value);
  if (!code.trim()) { err.textContent = "Write some code first."; $("#code").focus(); return; }
  if (!(timeout > 0)) { err.textContent = "The timeout must be a positive number of seconds."; $("#timeout").focus(); return; }
  const body = { code, language: $("#language").value, timeout };
  const stdin = $("#stdin").value;
  if (stdin) body.stdin = stdin;
  btn.disabled = true;
  try {
    // Be on the live stream before the evaluation exists, so no event can slip past.
    await stream.waitReady(3000);
    const r = await api("POST", "/api/eval", body, { "Idempotency-Key": randomKey() });
    currentId = r.eval_id;
    sessionStorage.setItem(CURRENT_KEY, currentId);
    const placeholder = { eval_id: r.eval_id, status: r.status || "queued", language: body.language, version: 0, output: "", stderr: "" };
    renderRecord($("#run-result"), records.get(r.eval_id) || upsert(placeholder));
    announce("Evaluation queued");
    loadRecord(r.eval_id).catch(() => {});
  } catch (e) {
    err.textContent = e.describe ? e.describe() : e.message;
  } finally {
    btn.disabled = false;
  }
}

function setupEditor() {
  const code = $("#code");
  const draft = localStorage.getItem(DRAFT_KEY);
  if (draft !== null) code.value = draft;
  const lang = localStorage.getItem(`${DRAFT_KEY}.language`);
  if (lang) $("#language").value = lang;
  code.addEventListener("input", () => localStorage.setItem(DRAFT_KEY, code.value));
  $("#language").addEventListener("change", () => localStorage.setItem(`${DRAFT_KEY}.language`, $("#language").value));
  let escaped = false;
  code.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { escaped = true; return; }
    if (e.key === "Tab" && !e.shiftKey && !e.ctrlKey && !e.altKey && !e.metaKey && !escaped) {
      e.preventDefault();
      const s = code.selectionStart;
      code.setRangeText("    ", s, code.selectionEnd, "end");
      localStorage.setItem(DRAFT_KEY, code.value);
    }
    escaped = false;
  });
  $("#run-form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submitRun(e);
  });
  $("#run-form").addEventListener("submit", submitRun);
}

async function loadLanguages() {
  try {
    const h = await api("GET", "/health");
    const langs = (h.executor && h.executor.languages) || {};
    const names = Object.keys(langs);
    if (!names.length) return;
    const sel = $("#language");
    const keep = sel.value;
    sel.replaceChildren(...names.map((n) => {
      const ok = String(langs[n]).startsWith("available");
      return el("option", { value: n, disabled: !ok, title: langs[n], text: ok ? n : `${n} (unavailable)` });
    }));
    if (names.includes(keep)) sel.value = keep;
  } catch (_) { /* the defaults stay */ }
}

// ---------------------------------------------------------------- History view

const hist = { cursors: [null], page: 0, status: "", rows: [], next: null, loading: false, seq: 0, reload: null };

function openHistory() {
  const status = route.query.get("status") || "";
  if (status !== hist.status) { hist.status = status; hist.cursors = [null]; hist.page = 0; }
  $("#history-status").value = status;
  loadHistory();
}

/** Load the current page; only the newest request's answer is drawn. */
async function loadHistory() {
  const seq = ++hist.seq;
  clearTimeout(hist.reload);
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (hist.status) params.set("status", hist.status);
  const cursor = hist.cursors[hist.page];
  if (cursor) params.set("cursor", cursor);
  $("#history-error").textContent = "";
  hist.loading = true;
  hist.next = null;
  drawPaging();
  try {
    const page = await api("GET", `/api/evaluations?${params}`);
    if (seq !== hist.seq) return;
    // upsert keeps a newer version that an event brought while this was in flight.
    hist.rows = page.evaluations.map((r) => upsert(r) || r);
    hist.next = page.next_cursor;
    drawHistory();
  } catch (e) {
    if (seq !== hist.seq) return;
    $("#history-error").textContent = e.describe ? e.describe() : e.message;
  } finally {
    if (seq === hist.seq) { hist.loading = false; drawPaging(); }
  }
}

/** Reload the page soon (coalescing bursts of events). */
function scheduleHistoryReload() {
  clearTimeout(hist.reload);
  hist.reload = setTimeout(loadHistory, 300);
}

function historyRow(rec) {
  const status = el("span", { class: "badge", dataset: { status: rec.status }, text: rec.status });
  const link = el("a", { href: `#/eval/${rec.eval_id}`, text: rec.eval_id });
  return el("tr", { dataset: { evalId: rec.eval_id } },
    el("td", { "data-label": "Status" }, status),
    el("td", { class: "id", "data-label": "ID" }, link),
    el("td", { "data-label": "Language", text: rec.language }),
    el("td", { "data-label": "Created", text: fmtTime(rec.created_at) }),
    el("td", { class: "num", "data-label": "Runtime", text: fmtMs(rec.runtime_ms) }),
    el("td", { class: "num", "data-label": "Exit", text: rec.exit_code ?? "—" }));
}

function drawPaging() {
  $("#history-prev").disabled = hist.loading || hist.page === 0;
  $("#history-first").disabled = hist.loading || hist.page === 0;
  $("#history-next").disabled = hist.loading || !hist.next;
}

function drawHistory() {
  $("#history-rows").replaceChildren(...hist.rows.map(historyRow));
  $("#history-empty").hidden = hist.rows.length > 0;
  drawPaging();
}

function historyOnRecord(rec, old) {
  if (route.view !== "history") return;
  if (hist.loading) { scheduleHistoryReload(); return; }
  const i = hist.rows.findIndex((r) => r.eval_id === rec.eval_id);
  if (i >= 0) {
    if (hist.status && rec.status !== hist.status) {
      // It left the filtered status: drop it now, refill the page from the server.
      hist.rows.splice(i, 1);
      drawHistory();
      scheduleHistoryReload();
      return;
    }
    hist.rows[i] = rec;
    const tr = $(`#history-rows tr[data-eval-id="${CSS.escape(rec.eval_id)}"]`);
    if (tr) tr.replaceWith(historyRow(rec));
    return;
  }
  if (hist.page !== 0 || (old && old.status === rec.status)) return;
  if (hist.status && rec.status !== hist.status) return;
  if (!hist.status && rec.status === "queued" && !old) {
    // A new evaluation is the newest of all: it goes on top of the first page.
    hist.rows.unshift(rec);
    if (hist.rows.length > PAGE_SIZE) {
      hist.rows.pop();
      // The cursor is the last row's eval_id: the next page starts after the new last row.
      hist.next = hist.rows[hist.rows.length - 1].eval_id;
    }
    drawHistory();
    return;
  }
  // It entered the filtered status: where it belongs, only the server knows.
  scheduleHistoryReload();
}

function setupHistory() {
  $("#history-status").addEventListener("change", () => {
    const s = $("#history-status").value;
    location.hash = s ? `#/history?status=${encodeURIComponent(s)}` : "#/history";
  });
  $("#history-next").addEventListener("click", () => {
    if (!hist.next) return;
    hist.cursors[hist.page + 1] = hist.next;
    hist.page += 1;
    loadHistory();
  });
  $("#history-prev").addEventListener("click", () => {
    if (hist.page === 0) return;
    hist.page -= 1;
    loadHistory();
  });
  $("#history-first").addEventListener("click", () => {
    hist.page = 0;
    loadHistory();
  });
}

// ---------------------------------------------------------------- Detail view

async function openEval(id) {
  $("#eval-error").textContent = "";
  $("#eval-result").replaceChildren();
  $("#eval-source").hidden = true;
  $("#eval-title").textContent = "Evaluation";
  if (!id) { $("#eval-error").textContent = "No evaluation id in the address."; return; }
  try {
    const rec = await loadRecord(id);
    if (route.view === "eval" && route.arg === id) drawEval(records.get(id) || rec);
  } catch (e) {
    if (route.view !== "eval" || route.arg !== id) return;
    $("#eval-error").textContent = e.status === 404 ? `No evaluation with id ${id}.` : (e.describe ? e.describe() : e.message);
  }
}

function drawEval(rec) {
  $("#eval-title").textContent = `Evaluation ${rec.eval_id.slice(0, 8)}…`;
  renderRecord($("#eval-result"), rec);
  $("#eval-source").hidden = false;
  $("#eval-code").textContent = rec.code || "";
  $("#eval-stdin-box").hidden = !rec.stdin;
  $("#eval-stdin").textContent = rec.stdin || "";
  $("#eval-meta-box").hidden = !rec.metadata;
  $("#eval-meta").textContent = rec.metadata ? JSON.stringify(rec.metadata, null, 2) : "";
}

function setupEval() {
  $("#eval-rerun").addEventListener("click", () => {
    const rec = records.get(route.arg);
    if (!rec) return;
    $("#code").value = rec.code || "";
    localStorage.setItem(DRAFT_KEY, rec.code || "");
    if ([...$("#language").options].some((o) => o.value === rec.language)) $("#language").value = rec.language;
    if (rec.timeout) $("#timeout").value = rec.timeout;
    $("#stdin").value = rec.stdin || "";
    $("#stdin-box").open = !!rec.stdin;
    location.hash = "#/run";
    $("#code").focus();
  });
  $("#eval-code").previousElementSibling.querySelector(".copy").addEventListener("click", (e) => copyText($("#eval-code").textContent, e.currentTarget));
}

// ---------------------------------------------------------------- Health view

let healthAt = 0;
let healthTimer = null;

// Health is not an event (a sink reconnecting, an outbox growing older): while the view is
// on screen it is also refreshed every 15 s. Evaluations never are: they come as events.
setInterval(() => {
  if (route.view === "health" && document.visibilityState === "visible" && Date.now() - healthAt > 14000) refreshHealth();
}, 15000);

/** Refresh health now, or at most once a second while events arrive. */
function scheduleHealth() {
  if (route.view !== "health" || healthTimer) return;
  const wait = Math.max(0, 1000 - (Date.now() - healthAt));
  healthTimer = setTimeout(() => { healthTimer = null; refreshHealth(); }, wait);
}

function kv(pairs) {
  const dl = el("dl");
  for (const [k, v] of pairs) {
    if (v === undefined) continue;
    dl.append(el("dt", { text: k }), el("dd", { text: v === null ? "—" : String(v) }));
  }
  return dl;
}

function card(title, ok, body, wide) {
  const dot = el("span", { class: "dot", dataset: { ok: ok === null ? "" : String(!!ok) }, role: "img", "aria-label": ok === null ? "not configured" : ok ? "ok" : "not ok" });
  return el("section", { class: wide ? "card wide" : "card", "aria-label": title }, el("h2", {}, dot, title), body);
}

function flatPairs(obj) {
  const out = [];
  for (const [k, v] of Object.entries(obj || {})) {
    if (k === "ok") continue;
    out.push([k.replace(/_/g, " "), v !== null && typeof v === "object" ? JSON.stringify(v) : v]);
  }
  return out;
}

async function refreshHealth() {
  healthAt = Date.now();
  $("#health-error").textContent = "";
  let h;
  try {
    h = await api("GET", "/health");
  } catch (e) {
    $("#health-error").textContent = e.describe ? e.describe() : e.message;
    return;
  }
  const cards = [];
  cards.push(card(`Appliance: ${h.status}`, h.status === "ok", kv([
    ["node", h.node], ["version", h.version], ["uptime", fmtAge(h.uptime_secs)], ["shutting down", h.shutting_down ? "yes" : "no"],
  ])));
  const s = h.store || {};
  cards.push(card("Store (sled)", s.ok, kv([
    ["head seq", s.head_seq], ["oldest seq", s.oldest_seq], ["size on disk", s.size_on_disk_bytes != null ? `${(s.size_on_disk_bytes / 1048576).toFixed(1)} MiB` : null], ["last error", s.last_error],
  ])));
  const q = h.queue || {};
  cards.push(card("Queue", !q.paused, kv([
    ["depth", `${q.depth} of ${q.max_queued}`], ["running", `${q.running} of ${q.workers} workers`], ["paused", q.paused ? "yes" : "no"],
  ])));
  const x = h.executor || {};
  cards.push(card(`Executor: ${x.backend || "?"}`, x.ok, kv([
    ["state", x.detail], ...Object.entries(x.languages || {}).map(([k, v]) => [k, v]),
  ])));
  const up = (o) => (o ? (o.ok ?? o.connected ?? null) : null);
  cards.push(card("Redis", up(h.redis), h.redis ? kv(flatPairs(h.redis)) : el("p", { class: "muted", text: "Not configured (REDIS_URL)." })));
  cards.push(card("PostgreSQL", up(h.postgres), h.postgres ? kv(flatPairs(h.postgres)) : el("p", { class: "muted", text: "Not configured (DATABASE_URL)." })));
  const sinks = Object.values(h.sinks || {});
  const table = el("table", { class: "sinks" },
    el("caption", { class: "visually-hidden", text: "Outbox delivery per sink" }),
    el("thead", {}, el("tr", {}, ...["Sink", "State", "Backlog (lag)", "Cursor / head", "Oldest undelivered", "Delivered", "Retries", "Dead letters", "Last error"].map((t) => el("th", { scope: "col", text: t })))),
    el("tbody", {}, ...sinks.map((k) => el("tr", { dataset: { sink: k.name } },
      el("td", { text: k.name }),
      el("td", { text: k.ok ? "ok" : "failing" }),
      el("td", { text: `${k.backlog} events` }),
      el("td", { text: `${k.cursor} / ${k.head}` }),
      el("td", { text: fmtAge(k.oldest_undelivered_age_secs) }),
      el("td", { text: k.delivered }),
      el("td", { text: k.retries }),
      el("td", { text: k.dead_letters }),
      el("td", { text: k.last_error || "—" })))));
  cards.push(card("Outbox", sinks.every((k) => k.ok), sinks.length ? el("div", { class: "scroll-x" }, table) : el("p", { class: "muted", text: "No sinks configured: events stay in the local log." }), true));
  $("#health-body").replaceChildren(...cards);
  $("#health-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

// ---------------------------------------------------------------- wiring

function onEvent(_ev) {
  scheduleHealth();
}

recordListeners.add((rec, old) => {
  if (route.view === "run" && rec.eval_id === currentId) {
    renderRecord($("#run-result"), rec);
    if (old && old.status !== rec.status) announce(`Evaluation ${rec.status}`);
  }
  if (route.view === "eval" && rec.eval_id === route.arg && !$("#eval-source").hidden) {
    drawEval(rec);
    if (old && old.status !== rec.status) announce(`Evaluation ${rec.status}`);
  }
  historyOnRecord(rec, old);
});

document.addEventListener("DOMContentLoaded", () => {
  updateTokenButton();
  $("#token-button").addEventListener("click", async () => {
    if (await askToken()) { stream.restart(true); onRouteChange(false); }
  });
  $("#health-refresh").addEventListener("click", refreshHealth);
  for (const h of document.querySelectorAll(".view h1")) h.setAttribute("tabindex", "-1");
  setupEditor();
  setupHistory();
  setupEval();
  window.addEventListener("hashchange", () => {
    // Only "#/..." addresses are views; "#main" (the skip link) is not.
    if (location.hash === "" || location.hash.startsWith("#/")) onRouteChange(true);
  });
  $(".skip").addEventListener("click", (e) => { e.preventDefault(); $("#main").focus(); });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") stream.pause();
    else stream.restart();
  });
  stream.start();
  loadLanguages();
  onRouteChange(false);
});

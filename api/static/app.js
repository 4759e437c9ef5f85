// medtune dashboard: jobs list and a live job page, plain JS + SVG, nothing loaded from elsewhere.
"use strict";

const view = document.getElementById("view");
const problemBox = document.getElementById("problem");
let teardown = () => {};  // stops the current page's stream and timers

// --- helpers ------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  return el;
}

class ApiError extends Error {
  constructor(status, body) {
    super(describeProblem(status, body));
    this.status = status;
    this.body = body;
  }
}

// A problem+json body as a line a person can read: "409 job_not_ready (job_id): detail".
function describeProblem(status, body) {
  if (!body || typeof body !== "object") return `HTTP ${status}`;
  const head = [body.status || status, body.code || body.title].filter(Boolean).join(" ");
  const field = body.field ? ` (${body.field})` : "";
  let text = `${head}${field}: ${body.detail || body.title || "request failed"}`;
  const more = (body.errors || []).slice(1, 6);
  for (const e of more) text += `\n  ${e.field}: ${e.message}`;
  return text;
}

// With auth on, every call carries the key kept in this browser (see the header's key field).
const KEY_STORE = "medtune.apiKey";
function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }
function authHeaders() { return apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {}; }

async function api(path, options = {}) {
  const init = { ...options, headers: { Accept: "application/json", ...authHeaders() } };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(options.json);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = { detail: text.slice(0, 300) }; }
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function showProblem(error) {
  if (!error) { problemBox.hidden = true; problemBox.textContent = ""; return; }
  let text = error.message || String(error);
  if (error.status === 401) text += "\nEnter an API key (medtune keys create) in the key field above.";
  problemBox.textContent = text;
  problemBox.hidden = false;
}

function keyField() {
  const input = h("input", { type: "password", id: "api-key", placeholder: "API key (if auth is on)",
    autocomplete: "off", value: apiKey() });
  input.addEventListener("change", () => {
    const key = input.value.trim();
    if (key === apiKey()) return;
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    route();  // reconnect with the new key
  });
  return input;
}

// Server-Sent Events. EventSource reconnects by itself with Last-Event-ID, but cannot send an
// Authorization header; with a key set, the same protocol is spoken over fetch instead.
function openStream(url, handlers, onState) {
  if (!apiKey()) {
    const source = new EventSource(url);
    source.addEventListener("open", () => onState("connected"));
    for (const [name, fn] of Object.entries(handlers)) {
      source.addEventListener(name, (e) => fn(JSON.parse(e.data)));
    }
    source.addEventListener("error", () => onState(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting…"));
    return () => source.close();
  }
  let stopped = false, lastId = null, retry = 2000;
  const controller = new AbortController();
  async function run() {
    while (!stopped) {
      try {
        const headers = { Accept: "text/event-stream", ...authHeaders() };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const response = await fetch(url, { headers, signal: controller.signal });
        if (!response.ok) {
          const body = await response.json().catch(() => null);
          throw new ApiError(response.status, body);
        }
        onState("connected");
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value.replaceAll("\r\n", "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let event = "message", id = null;
            const data = [];
            for (const line of block.split("\n")) {
              const [field, ...rest] = line.split(":");
              const text = rest.join(":").replace(/^ /, "");
              if (field === "event") event = text;
              else if (field === "data") data.push(text);
              else if (field === "id") id = text;
              else if (field === "retry" && /^\d+$/.test(text)) retry = Number(text);
            }
            if (id !== null) lastId = id;
            if (data.length && handlers[event]) handlers[event](JSON.parse(data.join("\n")));
            if (event === "end") { stopped = true; return; }
          }
        }
      } catch (error) {
        if (stopped) return;
        if (error instanceof ApiError && error.status < 500) { onState("closed"); showProblem(error); return; }
      }
      if (stopped) return;
      onState("reconnecting…");
      await new Promise((resolve) => setTimeout(resolve, retry));
    }
  }
  run();
  return () => { stopped = true; controller.abort(); };
}

function when(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString();
}

function duration(seconds) {
  if (!isFinite(seconds) || seconds < 0) return "—";
  seconds = Math.round(seconds);
  const m = Math.floor(seconds / 60), s = seconds % 60;
  if (m >= 60) return `${Math.floor(m / 60)}h ${m % 60}m`;
  return m ? `${m}m ${s}s` : `${s}s`;
}

function num(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-2 || Math.abs(value) >= 1e6)) return value.toExponential(2);
  return Number.isInteger(value) ? String(value) : value.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
}

function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status);
}

function steps(job) {
  return job.steps_total ? `${job.steps_done} / ${job.steps_total}` : String(job.steps_done);
}

// --- router -------------------------------------------------------------------------------------

function route() {
  teardown();
  teardown = () => {};
  showProblem(null);
  const match = location.hash.match(/^#\/jobs\/([^/?#]+)/);
  if (match) jobPage(decodeURIComponent(match[1]));
  else jobsPage();
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("key-slot").replaceChildren(keyField());
  route();
});

// --- jobs list ----------------------------------------------------------------------------------

function jobsPage() {
  const body = h("tbody", { id: "jobs-body" });
  const more = h("button", { class: "secondary", hidden: true }, "Older jobs");
  const empty = h("p", { class: "muted", hidden: true }, "No jobs yet. Submit one with POST /jobs (see API docs).");
  view.replaceChildren(
    h("h1", {}, "Jobs"),
    h("div", { class: "card" },
      h("table", { id: "jobs-table" },
        h("thead", {}, h("tr", {},
          ["Job", "Status", "Stage", "Steps", "Model", "Created"].map((t) => h("th", {}, t)))),
        body),
      empty,
      h("div", { class: "row" }, more)));

  let cursor = null, pages = 1;
  async function load() {
    // Refresh every page shown so far, newest first.
    try {
      const rows = [];
      let next = null;
      for (let i = 0; i < pages; i++) {
        const query = new URLSearchParams({ limit: "25" });
        if (next) query.set("cursor", next);
        const page = await api(`/jobs?${query}`);
        rows.push(...page.data);
        next = page.next_cursor;
        if (!page.has_more) break;
      }
      cursor = next;
      body.replaceChildren(...rows.map(jobRow));
      empty.hidden = rows.length > 0;
      more.hidden = !cursor;
      showProblem(null);
    } catch (error) { showProblem(error); }
  }
  more.addEventListener("click", () => { pages += 1; load(); });
  load();
  const timer = setInterval(load, 3000);
  teardown = () => clearInterval(timer);
}

function jobRow(job) {
  const link = h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono" }, job.id);
  return h("tr", { "data-job-id": job.id },
    h("td", {}, link),
    h("td", {}, badge(job.status)),
    h("td", {}, job.stage || "—"),
    h("td", {}, steps(job)),
    h("td", {}, h("span", { class: "mono" }, job.base_model), " → ", h("b", {}, job.finetuned_model)),
    h("td", {}, when(job.created_at)));
}

// --- charts -------------------------------------------------------------------------------------

// A line chart of [step, value] points into an <svg>; data-points says how many it draws.
// `extra` series ({name, points}) share its axes; data-<name>-points counts each.
function drawChart(el, points, extra = []) {
  const W = 600, H = 190, L = 84, R = 10, T = 12, B = 30;
  el.setAttribute("viewBox", `0 0 ${W} ${H}`);
  el.dataset.points = String(points.length);
  for (const s of extra) el.dataset[`${s.name}Points`] = String(s.points.length);
  el.replaceChildren(
    svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  if (!points.length) {
    const t = svg("text", { x: L + 8, y: H / 2 });
    t.textContent = "waiting for the first step…";
    el.append(t);
    return;
  }
  const all = points.concat(...extra.map((s) => s.points));
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const line = (pts, cls) => svg("polyline", {
    class: cls, points: pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "),
  });
  el.append(line(points, "series-main"));
  for (const s of extra) {
    if (!s.points.length) continue;
    el.append(line(s.points, `series-${s.name}`));
    // A lone point draws no line: mark every measurement.
    for (const [x, y] of s.points) el.append(svg("circle", { class: `series-${s.name}`, cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 3.5 }));
  }
  const label = (x, y, text, anchor) => {
    const t = svg("text", { x, y, "text-anchor": anchor });
    t.textContent = text;
    el.append(t);
  };
  label(L - 6, T + 12, num(y1), "end");
  label(L - 4, H - B, num(y0), "end");
  label(L, H - 4, `step ${Math.min(...xs)}`, "start");
  label(W - R, H - 4, `step ${Math.max(...xs)}`, "end");
  const named = extra.filter((s) => s.points.length);
  if (named.length) {
    label(W - R, T + 12, ["training", ...named.map((s) => s.label)].join(" · "), "end");
  }
}

// --- job page -----------------------------------------------------------------------------------

function jobPage(jobId) {
  const details = h("dl", { id: "job-details" });
  const progress = h("div", { class: "progress" }, h("div", {}));
  const errorBox = h("div", { id: "job-error", class: "inline-problem", hidden: true });
  const notes = h("ul", { class: "notes", id: "job-notes" });
  const lossChart = svg("svg", { id: "loss-chart", class: "chart", "data-points": "0", "data-eval-points": "0" });
  const lrChart = svg("svg", { id: "lr-chart", class: "chart", "data-points": "0" });
  const lossNow = h("span", { class: "muted", id: "loss-now" });
  const lrNow = h("span", { class: "muted" });
  const dataset = h("div", { id: "dataset" }, h("p", { class: "muted" }, "Loading…"));
  const checkpointsBox = h("div", { id: "checkpoints" }, h("p", { class: "muted" }, "Loading…"));
  const artifacts = h("dl", { id: "artifacts" });
  const streamState = h("span", { class: "muted", id: "stream-state" }, "connecting…");

  view.replaceChildren(
    h("h1", {}, "Job ", h("span", { class: "mono" }, jobId), " ", h("span", { id: "job-status" })),
    h("div", { class: "grid" },
      h("section", { class: "card" }, h("h2", {}, "Details"), details, progress, errorBox,
        h("h2", { style: "margin-top:12px" }, "Notes"), notes),
      h("section", { class: "card" },
        h("div", { class: "chart-head" }, h("h2", {}, "Training loss"), lossNow), lossChart,
        h("div", { class: "chart-head" }, h("h2", {}, "Learning rate"), lrNow), lrChart,
        h("div", { class: "muted" }, "live stream: ", streamState)),
      h("section", { class: "card" }, h("h2", {}, "Dataset"), dataset),
      h("section", { class: "card" }, h("h2", {}, "Checkpoints"), checkpointsBox,
        h("h2", { style: "margin-top:12px" }, "Artifacts"), artifacts),
      chatCard(jobId)));

  const metrics = new Map();  // step -> metric row (a replayed step replaces itself)
  let job = null, drawPending = false, saveSteps = 0;

  function redraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      const rows = [...metrics.values()].sort((a, b) => a.step - b.step);
      const evalPoints = rows.filter((r) => r.eval_loss != null).map((r) => [r.step, r.eval_loss]);
      drawChart(lossChart, rows.filter((r) => r.loss !== null).map((r) => [r.step, r.loss]),
        [{ name: "eval", label: "eval (held out)", points: evalPoints }]);
      drawChart(lrChart, rows.filter((r) => r.learning_rate !== null).map((r) => [r.step, r.learning_rate]));
      const last = rows[rows.length - 1];
      const lastEval = evalPoints[evalPoints.length - 1];
      lossNow.textContent = (last ? `step ${last.step}: ${num(last.loss)}` : "")
        + (lastEval ? ` · eval ${num(lastEval[1])} (step ${lastEval[0]})` : "");
      lrNow.textContent = last ? num(last.learning_rate) : "";
      if (job) renderDetails();
    });
  }

  function eta() {
    if (!job || job.status !== "running" || !job.steps_total) return "—";
    const rows = [...metrics.values()].sort((a, b) => a.step - b.step).slice(-20);
    const latest = rows[rows.length - 1];
    // The worker's own figure leaves evaluation and checkpoint time out of the step time.
    if (latest && latest.eta_seconds != null) return duration(latest.eta_seconds);
    if (rows.length < 2) return "—";
    const first = rows[0], last = rows[rows.length - 1];
    const perStep = (Date.parse(last.created_at) - Date.parse(first.created_at)) / 1000 / (last.step - first.step);
    return duration(perStep * (job.steps_total - last.step));
  }

  function renderDetails() {
    const items = [
      ["Status", badge(job.status)], ["Stage", job.stage || "—"], ["Steps", steps(job)],
      ["ETA", eta()], ["Base model", job.base_model], ["Tuned model", job.finetuned_model],
      ["Engine", job.engine || "—"], ["Created", when(job.created_at)],
      ["Started", when(job.started_at)], ["Finished", when(job.finished_at)],
    ];
    details.replaceChildren(...items.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    document.getElementById("job-status").replaceChildren(badge(job.status));
    progress.firstChild.style.width = job.steps_total ? `${(100 * job.steps_done) / job.steps_total}%` : "0";
    errorBox.hidden = !job.error;
    errorBox.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    notes.replaceChildren(...(job.notes.length ? job.notes.map((n) => h("li", {}, n)) : [h("li", { class: "muted" }, "none")]));
    artifacts.replaceChildren(
      h("dt", {}, "Adapter"), h("dd", { class: "mono", id: "adapter-path" }, job.artifacts.adapter || "not exported yet"),
      h("dt", {}, "Folder"), h("dd", { class: "mono" }, job.artifacts.dir || "—"));
  }

  async function loadJob() {
    try {
      job = await api(`/jobs/${encodeURIComponent(jobId)}`);
      saveSteps = job.spec.training_config.save_steps || 0;
      renderDetails();
    } catch (error) { showProblem(error); }
  }

  async function loadDataset() {
    try {
      const d = await api(`/jobs/${encodeURIComponent(jobId)}/dataset`);
      dataset.replaceChildren(h("p", { class: "muted mono" }, d.dataset.name), statsTable(d.stats));
    } catch (error) {
      if (error.status === 409) {
        dataset.replaceChildren(h("p", { class: "muted", "data-state": "not-ready" },
          "Not ready: the statistics are stored once the data stage has run."));
      } else dataset.replaceChildren(h("p", { class: "inline-problem" }, error.message));
    }
  }

  async function loadCheckpoints() {
    try {
      const page = await api(`/jobs/${encodeURIComponent(jobId)}/checkpoints`);
      checkpointsBox.replaceChildren(page.data.length
        ? h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Step"), h("th", {}, "Loss"), h("th", {}, "Saved"))),
          h("tbody", {}, page.data.map((c) => h("tr", {}, h("td", {}, c.step), h("td", {}, num(c.loss)), h("td", {}, when(c.created_at))))))
        : h("p", { class: "muted" }, "none yet"));
    } catch (error) { checkpointsBox.replaceChildren(h("p", { class: "inline-problem" }, error.message)); }
  }

  function refreshAll() { loadJob(); loadDataset(); loadCheckpoints(); }

  const closeStream = openStream(`/jobs/${encodeURIComponent(jobId)}/events`, {
    metric(row) {
      metrics.set(row.step, row);
      if (job) { job.steps_done = Math.max(job.steps_done, row.step); }
      if (saveSteps && row.step % saveSteps === 0) loadCheckpoints();
      redraw();
    },
    status(state) {
      if (job && (state.status !== job.status || state.stage !== job.stage)) refreshAll();
      else if (job) { Object.assign(job, state); renderDetails(); }
    },
    end() {
      closeStream();
      streamState.textContent = "job finished; stream closed";
      refreshAll();
    },
  }, (state) => {
    if (streamState.textContent.startsWith("job finished")) return;
    streamState.textContent = state;
    if (state === "closed") loadJob();  // shows the problem (e.g. unknown job) if there is one
  });
  streamState.dataset.transport = apiKey() ? "fetch" : "eventsource";
  teardown = () => closeStream();
  drawChart(lossChart, []);
  drawChart(lrChart, []);
  refreshAll();
}

function statsTable(stats) {
  const rows = Object.entries(stats).map(([key, value]) => {
    const shown = value && typeof value === "object"
      ? Object.entries(value).map(([k, v]) => `${k}: ${num(v)}`).join(", ") || "—"
      : num(value);
    return h("tr", { "data-key": key }, h("th", {}, key.replaceAll("_", " ")), h("td", {}, shown));
  });
  return h("table", { id: "dataset-stats" }, h("tbody", {}, rows));
}

// --- chat ---------------------------------------------------------------------------------------

function chatCard(jobId) {
  const question = h("textarea", { id: "chat-question", placeholder: "Ask a medical question…" });
  const tuned = h("input", { type: "checkbox", id: "use-adapter", checked: true });
  const base = h("input", { type: "checkbox", id: "ask-base" });
  const maxTokens = h("input", { type: "number", id: "max-tokens", min: "1", max: "4096", value: "128" });
  const ask = h("button", { id: "chat-ask" }, "Ask");
  const answers = h("div", { class: "answers", id: "answers" });

  async function one(useAdapter) {
    const card = h("div", { class: "answer", "data-adapter": String(useAdapter) },
      h("b", {}, useAdapter ? "Tuned model" : "Base model"), h("div", { class: "text muted" }, "thinking…"));
    answers.append(card);
    try {
      const r = await api("/infer", {
        json: { job_id: jobId, question: question.value.trim(), use_adapter: useAdapter,
                max_new_tokens: Number(maxTokens.value) || 128 },
      });
      card.querySelector(".text").className = "text";
      card.querySelector(".text").textContent = r.answer;
      card.append(h("div", { class: "muted" },
        `${r.model} · ${r.finish_reason} · ${r.usage.completion_tokens} tokens · ${Math.round(r.latency_ms)} ms`));
      card.dataset.state = "answered";
    } catch (error) {
      card.querySelector(".text").className = "text inline-problem";
      card.querySelector(".text").textContent = error.message;
      card.dataset.state = "error";
    }
  }

  async function submit() {
    if (!question.value.trim()) return;
    if (!tuned.checked && !base.checked) tuned.checked = true;
    ask.disabled = true;
    answers.replaceChildren();
    const asks = [];
    if (tuned.checked) asks.push(one(true));
    if (base.checked) asks.push(one(false));
    await Promise.all(asks);
    ask.disabled = false;
  }

  ask.addEventListener("click", submit);
  question.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit();
  });
  return h("section", { class: "card wide" },
    h("h2", {}, "Ask the model"), question,
    h("div", { class: "row" },
      h("label", {}, tuned, " tuned model (use_adapter)"),
      h("label", {}, base, " base model"),
      h("label", {}, "max tokens ", maxTokens),
      ask, h("span", { class: "muted" }, "Ctrl+Enter")),
    answers);
}

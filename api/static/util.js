// Shared helpers of the dashboard's modules: DOM building, the API client, number formats.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, value);
  return el;
}

export class ApiError extends Error {
  constructor(status, body) {
    super(describeProblem(status, body));
    this.status = status;
    this.body = body;
  }
}

// A problem+json body as a line a person can read: "409 job_not_ready (job_id): detail".
export function describeProblem(status, body) {
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
export function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }
export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}
export function authHeaders() { return apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {}; }

export async function api(path, options = {}) {
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

const problemBox = () => document.getElementById("problem");

export function showProblem(error) {
  const box = problemBox();
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  let text = error.message || String(error);
  if (error.status === 401) text += "\nEnter an API key (medtune keys create) in the key field above.";
  box.textContent = text;
  box.hidden = false;
}

export function when(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString();
}

export function duration(seconds) {
  if (seconds === null || !isFinite(seconds) || seconds < 0) return "—";
  seconds = Math.round(seconds);
  const m = Math.floor(seconds / 60), s = seconds % 60;
  if (m >= 60) return `${Math.floor(m / 60)}h ${m % 60}m`;
  return m ? `${m}m ${s}s` : `${s}s`;
}

export function num(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-2 || Math.abs(value) >= 1e6)) return value.toExponential(2);
  return Number.isInteger(value) ? String(value) : value.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
}

export function percent(share) {
  return share === null || share === undefined ? "—" : `${(100 * share).toFixed(1).replace(/\.0$/, "")}%`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status);
}

export function steps(job) {
  return job.steps_total ? `${job.steps_done} / ${job.steps_total}` : String(job.steps_done);
}

export function label(key) {
  return key.replaceAll("_", " ");
}

// Any JSON value as something a person reads: no "[object Object]" anywhere.
export function readable(value) {
  if (value === null || value === undefined) return "—";
  if (Array.isArray(value)) {
    if (!value.length) return "none";
    if (value.every((v) => v && typeof v === "object" && !Array.isArray(v))) return recordsTable(value);
    return value.map((v) => (typeof v === "object" ? JSON.stringify(v) : num(v))).join(", ");
  }
  if (typeof value === "object") {
    const entries = Object.entries(value);
    if (!entries.length) return "none";
    return h("dl", { class: "mini" }, entries.flatMap(([k, v]) => [h("dt", {}, label(k)), h("dd", {}, readable(v))]));
  }
  if (typeof value === "boolean") return value ? "yes" : "no";
  return num(value);
}

// Rows of like objects as one table, a column per key.
export function recordsTable(rows) {
  const keys = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  return h("table", { class: "records" },
    h("thead", {}, h("tr", {}, keys.map((k) => h("th", {}, label(k))))),
    h("tbody", {}, rows.map((r) => h("tr", {}, keys.map((k) => h("td", {}, readable(r[k])))))));
}

// Seconds per step from the rows' own timestamps over the last `window` intervals, leaving out
// an interval far slower than the recent ones (an outage, a restart) and any that goes back
// a step (a resume): the same rule as the CLI's StepRate (cli/progress.py).
export function secondsPerStep(rows, window = 20) {
  const intervals = [];
  for (let i = 1; i < rows.length; i++) {
    const a = rows[i - 1], b = rows[i];
    const ds = b.step - a.step, dt = (Date.parse(b.created_at) - Date.parse(a.created_at)) / 1000;
    if (!(ds > 0) || !isFinite(dt)) continue;
    const usual = typical(intervals.slice(-window).map(([t, n]) => t / n));
    if (usual !== null && dt / ds > Math.max(5 * usual, usual + 5)) continue;
    intervals.push([Math.max(dt, 0), ds]);
  }
  // Judged again against the whole window: a slow first interval (the step-0 held-out loss
  // before training, a cold start) had no recent pace to be judged by.
  const recent = intervals.slice(-window);
  const usual = typical(recent.map(([t, k]) => t / k));
  const kept = recent.length < 3 ? recent : recent.filter(([t, k]) => t / k <= Math.max(5 * usual, usual + 5));
  const n = kept.reduce((sum, [, k]) => sum + k, 0);
  return n ? kept.reduce((sum, [t]) => sum + t, 0) / n : null;
}

// The recent pace: the median seconds per step (the fastest while there are fewer than 3).
function typical(perStep) {
  if (!perStep.length) return null;
  const sorted = [...perStep].sort((x, y) => x - y), mid = Math.floor(sorted.length / 2);
  if (sorted.length < 3) return sorted[0];
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export function etaSeconds(rows, total) {
  const perStep = secondsPerStep(rows);
  if (perStep === null || !total || !rows.length) return null;
  return Math.max(total - rows[rows.length - 1].step, 0) * perStep;
}

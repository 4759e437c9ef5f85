// The job page's cards that read a finished stage: dataset, evaluation, artifacts, notes.
import { api, apiKey, authHeaders, badge, bytes, h, label, num, percent, readable } from "./util.js";

// [key, label, value] rows as a two-column table; a row's data-key is the stats field it shows.
const kv = (rows) => h("table", { class: "kv" }, h("tbody", {}, rows.filter(([, , v]) => v !== undefined)
  .map(([key, text, v]) => h("tr", { "data-key": key }, h("th", {}, text), h("td", {}, v)))));

// --- dataset ------------------------------------------------------------------------------------

const SHOWN = new Set(["source", "format", "layout", "chat_template", "max_seq_length", "rows",
  "examples", "validation_examples", "dropped", "dropped_total", "tokens", "trained_tokens",
  "trained_token_share", "truncated", "truncation_rate", "length_p50", "length_p90", "length_p99",
  "length_max", "system_prompt", "sources", "gate", "validation", "by_source", "by_qtype", "kind",
  "share", "seed"]);

function counts(map) {
  const entries = Object.entries(map || {});
  if (!entries.length) return "none";
  return h("ul", { class: "counts" }, entries.map(([k, v]) => h("li", {}, h("span", { class: "mono" }, k), `: ${num(v)}`)));
}

// The summary of one prepared set (the training set, or a validation_dataset's own stats).
function summary(stats) {
  const sp = stats.system_prompt;
  const pairs = [
    ["source", "Read from", stats.source !== undefined ? h("span", { class: "mono" }, stats.source) : undefined],
    ["format", "Format", stats.format !== undefined ? `${stats.format} (${label(stats.layout || "—")} rows)` : undefined],
    ["chat_template", "Chat template", stats.chat_template],
    ["rows", "Rows read", stats.rows !== undefined ? num(stats.rows) : undefined],
    ["dropped", "Dropped", stats.dropped_total !== undefined ? (stats.dropped_total ? h("div", {}, `${num(stats.dropped_total)} rows`, counts(stats.dropped)) : "none") : undefined],
    ["examples", "Training examples", stats.examples !== undefined ? num(stats.examples) : undefined],
    ["validation_examples", "Validation examples", stats.validation_examples !== undefined ? num(stats.validation_examples) : undefined],
    ["tokens", "Tokens", stats.tokens !== undefined ? `${num(stats.tokens)}, of which trained ${num(stats.trained_tokens)} (${percent(stats.trained_token_share)})` : undefined],
    ["length", "Length (tokens)", stats.length_p50 !== undefined ? `median ${stats.length_p50}, p90 ${stats.length_p90}, p99 ${stats.length_p99}, longest ${stats.length_max}` + (stats.max_seq_length ? ` (max_seq_length ${stats.max_seq_length})` : "") : undefined],
    ["truncated", "Truncated", stats.truncated !== undefined ? `${num(stats.truncated)} examples (${percent(stats.truncation_rate)})` : undefined],
    ["system_prompt", "System prompt", sp ? `${sp.source === "job" ? "the job's for every row" : "a row's own where it has one"}: ${sp.row} from rows, ${sp.job} the job's, ${sp.none} none` : undefined],
    ["by_source", "By source", stats.by_source ? counts(stats.by_source) : undefined],
    ["by_qtype", "By question type", stats.by_qtype ? counts(stats.by_qtype) : undefined],
  ];
  // Whatever else a newer server stores is still shown, readably.
  for (const [key, value] of Object.entries(stats)) if (!SHOWN.has(key)) pairs.push([key, label(key), readable(value)]);
  return kv(pairs);
}

function sourceTable(src) {
  const rows = [
    ["Weight", src.weight !== undefined ? `${num(src.weight)} (${percent(src.share)} of the mix)` : undefined],
    ["Format", src.format !== undefined ? `${src.format} (${label(src.layout || "—")} rows)` : undefined],
    ["Rows read", num(src.rows)],
    ["Dropped", counts(src.dropped)],
    ["Cleaned", num(src.cleaned)],
    ["Taken", src.taken !== undefined ? `${num(src.taken)}${src.repeated ? ` (${num(src.repeated)} repeated)` : ""}` : undefined],
    ["Training examples", num(src.examples)],
    ["Validation examples", num(src.validation_examples)],
  ];
  const known = new Set(["index", "name", "weight", "share", "format", "layout", "rows", "dropped", "cleaned", "taken", "repeated", "examples", "validation_examples"]);
  for (const [key, value] of Object.entries(src)) if (!known.has(key)) rows.push([label(key), readable(value)]);
  return h("table", { class: "source", "data-source": String(src.index ?? "") },
    h("caption", {}, `Source ${(src.index ?? 0) + 1}: `, h("span", { class: "mono" }, src.name)),
    h("tbody", {}, rows.filter(([, v]) => v !== undefined).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
}

function gateView(gate) {
  if (!gate) return null;
  if (gate.passed) return h("p", { id: "gate", "data-passed": "true" }, badge("passed"), " every example passed the gate");
  return h("div", { id: "gate", "data-passed": "false" },
    h("p", {}, badge("failed"), ` ${gate.problem_count} problem${gate.problem_count === 1 ? "" : "s"}`
      + (gate.problem_count > gate.problems.length ? ` (first ${gate.problems.length} shown)` : "")),
    h("ul", { class: "problems" }, gate.problems.map((p) => h("li", {},
      h("b", { class: "mono" }, p.code), p.example_index !== null && p.example_index !== undefined ? ` (example ${p.example_index})` : "",
      `: ${p.detail}`))));
}

function validationView(v) {
  if (!v) return null;
  if (v.kind === "validation_share") {
    return h("p", { id: "validation" }, `${percent(v.share)} of the training data held out (seed ${v.seed}): ${num(v.examples)} examples`);
  }
  return h("div", { id: "validation" }, summary(v), gateView(v.gate));
}

export function datasetView(d) {
  const stats = d.stats;
  return h("div", { id: "dataset-stats" },
    h("h3", {}, "Training set"), summary(stats),
    stats.sources && stats.sources.length ? [h("h3", {}, `Sources (${stats.sources.length})`), stats.sources.map(sourceTable)] : null,
    h("h3", {}, "Gate"), gateView(stats.gate) || h("p", { class: "muted" }, "not run"),
    stats.validation ? [h("h3", {}, "Validation set"), validationView(stats.validation)] : null);
}

// --- evaluation ---------------------------------------------------------------------------------

const METRICS = ["rougeL", "rouge1", "rouge2", "meteor", "bleu"];
const GENERATION = [["stop_rate", "stopped at end of turn", percent], ["mean_tokens", "mean length (tokens)", num],
  ["loop_rate", "loops (8-word phrase 3+ times)", percent], ["repeated_4gram", "repeated 4-grams", percent]];

function interval(diff) {
  if (!diff) return [h("td", {}, "—"), h("td", {}, "—"), h("td", {}, "—")];
  const sign = (x) => (x > 0 ? "+" : "") + num(x);
  return [h("td", {}, sign(diff.difference)), h("td", {}, `${sign(diff.low)} … ${sign(diff.high)}`),
    h("td", { class: `verdict ${diff.verdict.replaceAll(" ", "-")}` }, diff.verdict)];
}

export function evaluationView(e) {
  const scores = METRICS.filter((m) => e.base[m] !== undefined && e.base[m] !== null).map((m) =>
    h("tr", { "data-metric": m }, h("th", {}, m), h("td", {}, num(e.base[m])), h("td", {}, num(e.tuned[m])), interval(e.difference?.[m])));
  const gen = e.generation ? GENERATION.map(([key, text, fmt]) =>
    h("tr", { "data-generation": key }, h("th", {}, text), h("td", {}, fmt(e.generation.base[key])), h("td", {}, fmt(e.generation.tuned[key])))) : [];
  const benches = (e.benchmarks || []).map((b) =>
    h("tr", { "data-benchmark": b.name }, h("th", {}, `${b.name} (${b.questions} questions)`),
      h("td", {}, percent(b.base_accuracy)), h("td", {}, percent(b.tuned_accuracy)), interval(b.difference)));
  const head = (first, more) => h("thead", {}, h("tr", {}, [first, "Base", "Tuned", ...more].map((t) => h("th", {}, t))));
  const answers = (e.answers || []).map((a, i) => h("details", { class: "qa" },
    h("summary", {}, `${i + 1}. ${a.question}`),
    h("div", { class: "side" },
      h("div", {}, h("b", {}, "Base"), h("p", {}, a.base), h("span", { class: "muted" }, `${a.base_tokens} tokens${a.base_stopped ? ", stopped" : ", hit the limit"}`)),
      h("div", {}, h("b", {}, "Tuned"), h("p", {}, a.tuned), h("span", { class: "muted" }, `${a.tuned_tokens} tokens${a.tuned_stopped ? ", stopped" : ", hit the limit"}`)),
      h("div", {}, h("b", {}, "Reference"), h("p", {}, a.reference)))));
  return h("div", { id: "evaluation-result" },
    h("p", { class: "muted" }, `${e.examples} held-out questions (of ${e.held_out_examples ?? "?"}), greedy, at most ${e.decoding?.max_new_tokens} new tokens; `
      + "intervals are 95% paired bootstrap over questions."),
    h("table", { id: "eval-scores" }, head("Score", ["Tuned − base", "95% interval", "Verdict"]), h("tbody", {}, scores)),
    gen.length ? h("table", { id: "eval-generation" }, head("How answers end", []), h("tbody", {}, gen)) : null,
    benches.length ? h("table", { id: "eval-benchmarks" }, head("Multiple choice", ["Tuned − base", "95% interval", "Verdict"]), h("tbody", {}, benches)) : null,
    e.meteor_note ? h("p", { class: "muted" }, e.meteor_note) : null,
    answers.length ? [h("h3", {}, "Answers side by side"), answers] : null);
}

// --- artifacts ----------------------------------------------------------------------------------

// A plain link downloads without a key; with one, the file is fetched with it and saved.
function downloadLink(url, file) {
  return h("a", { href: url, download: file, class: "download", onclick: async (event) => {
    if (!apiKey()) return;
    event.preventDefault();
    const response = await fetch(url, { headers: authHeaders() });
    if (!response.ok) return;
    const link = h("a", { href: URL.createObjectURL(await response.blob()), download: file });
    link.click();
    URL.revokeObjectURL(link.href);
  } }, "download");
}

function entryView(jobId, name, entry) {
  const head = h("h3", {}, name, " ", badge(entry.status === "ok" ? "succeeded" : entry.status === "failed" ? "failed" : "running"));
  if (entry.status === "failed") {
    return h("div", { class: "artifact", "data-entry": name }, head,
      h("p", { class: "inline-problem" }, `${entry.error?.code}: ${entry.error?.message}`));
  }
  if (entry.status !== "ok") return h("div", { class: "artifact", "data-entry": name }, head, h("p", { class: "muted" }, "exporting…"));
  const base = `/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(name)}/`;
  const files = h("table", { class: "files" },
    h("thead", {}, h("tr", {}, ["File", "Size", "sha256", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, (entry.files || []).map((f) => h("tr", { "data-file": f.file },
      h("td", { class: "mono" }, f.file), h("td", {}, bytes(f.bytes)),
      h("td", { class: "mono sha", title: f.sha256 }, f.sha256),
      h("td", {}, downloadLink(base + encodeURIComponent(f.file), f.file))))));
  const smoke = (entry.smoke_test || []).map((s) => h("li", {}, h("b", {}, s.question), " ", s.answer,
    h("span", { class: "muted" }, s.stopped ? " (stopped at end of turn)" : " (hit the token limit)")));
  return h("div", { class: "artifact", "data-entry": name }, head, files,
    smoke.length ? [h("p", { class: "muted" }, "Smoke test:"), h("ul", { class: "smoke" }, smoke)] : null);
}

export async function artifactsView(jobId) {
  try {
    const listing = await api(`/jobs/${encodeURIComponent(jobId)}/artifacts`);
    const entries = Object.entries(listing.formats).filter(([name]) => name !== "hub");
    const hub = listing.formats.hub;
    return h("div", {}, entries.map(([name, entry]) => entryView(jobId, name, entry)),
      hub ? h("p", { "data-entry": "hub" }, h("b", {}, "Hub: "), readable(hub)) : null);
  } catch (error) {
    if (error.status === 409) return h("p", { class: "muted", "data-state": "not-ready" }, "No exports yet: they are listed once the job has exported.");
    return h("p", { class: "inline-problem" }, error.message);
  }
}

// Notes repeated word for word (an export run twice) are shown once, with a count.
export function notesList(notes) {
  if (!notes.length) return [h("li", { class: "muted" }, "none")];
  const seen = new Map();
  for (const note of notes) seen.set(note, (seen.get(note) || 0) + 1);
  return [...seen].map(([note, n]) => h("li", {}, note, n > 1 ? h("span", { class: "muted" }, ` (${n} times)`) : null));
}

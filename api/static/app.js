// medtune dashboard: jobs list, a live job page and a new-job form; plain JS modules + SVG,
// nothing loaded from elsewhere.
import { artifactsView, datasetView, evaluationView, notesList } from "./cards.js";
import { axis, drawChart, series } from "./charts.js";
import { newJobPage } from "./newjob.js";
import { rewardsCard } from "./rewards.js";
import { openStream } from "./stream.js";
import {
  api, apiKey, badge, duration, etaSeconds, h, num, setApiKey, showProblem, steps, svg, when,
} from "./util.js";

const view = document.getElementById("view");
let teardown = () => {};  // stops the current page's stream and timers

function keyField() {
  const input = h("input", { type: "password", id: "api-key", placeholder: "API key (if auth is on)",
    autocomplete: "off", value: apiKey() });
  input.addEventListener("change", () => {
    const key = input.value.trim();
    if (key === apiKey()) return;
    setApiKey(key);
    route();  // reconnect with the new key
  });
  return input;
}

// --- router -------------------------------------------------------------------------------------

function route() {
  teardown();
  teardown = () => {};
  showProblem(null);
  const match = location.hash.match(/^#\/jobs\/([^/?#]+)/);
  if (location.hash === "#/new") newJobPage(view);
  else if (match) jobPage(decodeURIComponent(match[1]));
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
  const empty = h("p", { class: "muted", hidden: true }, "No jobs yet: create one under ", h("a", { href: "#/new" }, "New job"), ", or with POST /jobs (see API docs).");
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
  const tpsChart = svg("svg", { id: "tps-chart", class: "chart", "data-points": "0" });
  const memChart = svg("svg", { id: "memory-chart", class: "chart", "data-points": "0", "data-peak-points": "0" });
  const tpsNow = h("span", { class: "muted" });
  const memNow = h("span", { class: "muted" });
  const preference = rewardsCard();  // dpo / orpo jobs only
  const loading = () => h("p", { class: "muted" }, "Loading…");
  const dataset = h("div", { id: "dataset" }, loading());
  const evaluation = h("div", { id: "evaluation" }, loading());
  const checkpointsBox = h("div", { id: "checkpoints" }, loading());
  const artifacts = h("div", { id: "artifacts" }, loading());
  const streamState = h("span", { class: "muted", id: "stream-state" }, "connecting…");

  view.replaceChildren(
    h("h1", {}, "Job ", h("span", { class: "mono" }, jobId), " ", h("span", { id: "job-status" })),
    h("div", { class: "grid" },
      h("section", { class: "card" }, h("h2", {}, "Details"), details, progress, errorBox,
        h("h2", { style: "margin-top:12px" }, "Notes"), notes),
      h("section", { class: "card" },
        h("div", { class: "chart-head" }, h("h2", {}, "Loss"), lossNow), lossChart,
        h("div", { class: "chart-head" }, h("h2", {}, "Learning rate"), lrNow), lrChart,
        h("div", { class: "muted" }, "live stream: ", streamState)),
      h("section", { class: "card" },
        h("div", { class: "chart-head" }, h("h2", {}, "Tokens / s"), tpsNow), tpsChart,
        h("div", { class: "chart-head" }, h("h2", {}, "Memory (MB)"), memNow), memChart),
      preference.card,
      h("section", { class: "card" }, h("h2", {}, "Checkpoints"), checkpointsBox),
      h("section", { class: "card wide" }, h("h2", {}, "Dataset"), dataset),
      h("section", { class: "card wide" }, h("h2", {}, "Evaluation: base vs tuned"), evaluation),
      h("section", { class: "card wide" }, h("h2", {}, "Artifacts"), artifacts),
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
      drawChart(lrChart, series(rows, "learning_rate"));
      drawChart(tpsChart, series(rows, "tokens_per_second"));
      drawChart(memChart, series(rows, "memory_mb"),
        [{ name: "peak", label: "peak", points: series(rows, "peak_memory_mb") }], "in use");
      const last = rows[rows.length - 1];
      const lastEval = evalPoints[evalPoints.length - 1];
      lossNow.textContent = (last ? `step ${last.step}: ${num(last.loss)}` : "")
        + (lastEval ? ` · eval ${num(lastEval[1])} (step ${lastEval[0]})` : "");
      lrNow.textContent = last ? num(last.learning_rate) : "";
      tpsNow.textContent = last && last.tokens_per_second != null ? axis(last.tokens_per_second) : "";
      memNow.textContent = last && last.peak_memory_mb != null ? `peak ${axis(last.peak_memory_mb)}` : "";
      preference.draw(rows);
      if (job) renderDetails();
    });
  }

  function eta() {
    if (!job || job.status !== "running" || !job.steps_total) return "—";
    const rows = [...metrics.values()].sort((a, b) => a.step - b.step);
    // The rows' own pace, outages left out; before two rows, the worker's own figure.
    const seconds = etaSeconds(rows, job.steps_total);
    const latest = rows[rows.length - 1];
    return duration(seconds ?? (latest ? latest.eta_seconds : null));
  }

  // Why training ended, and whose weights the adapter holds (keep: best).
  function stopped(j) {
    if (!j.stop_reason) return "—";
    return j.kept_step ? `${j.stop_reason}; adapter from step ${j.kept_step}` : j.stop_reason;
  }

  // The job's MLflow and W&B runs; a store on the server's disk is named, not its path.
  function tracking(j) {
    const t = j.tracking || {};
    const parts = [];
    if (t.mlflow) {
      const remote = /^https?:/.test(t.mlflow.tracking_uri || "");
      parts.push(`MLflow run ${t.mlflow.run_id}${remote ? ` at ${t.mlflow.tracking_uri}` : " (server's store)"}`);
    }
    if (t.wandb) parts.push(`W&B run ${t.wandb.run_id}${t.wandb.url ? ` at ${t.wandb.url}` : ` (${t.wandb.mode})`}`);
    return parts.length ? parts.join("; ") : "TensorBoard only";
  }

  function renderDetails() {
    const items = [
      ["Status", badge(job.status)], ["Stage", job.stage || "—"], ["Steps", steps(job)],
      ["ETA", eta()], ["Base model", job.base_model], ["Tuned model", job.finetuned_model],
      ["Engine", job.engine || "—"], ["Created", when(job.created_at)],
      ["Started", when(job.started_at)], ["Finished", when(job.finished_at)],
      ["Stopped", stopped(job)], ["Tracking", tracking(job)],
    ];
    details.replaceChildren(...items.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    document.getElementById("job-status").replaceChildren(badge(job.status));
    progress.firstChild.style.width = job.steps_total ? `${(100 * job.steps_done) / job.steps_total}%` : "0";
    errorBox.hidden = !job.error;
    errorBox.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    notes.replaceChildren(...notesList(job.notes));
  }

  async function loadJob() {
    try {
      job = await api(`/jobs/${encodeURIComponent(jobId)}`);
      saveSteps = job.spec.training_config.save_steps || 0;
      const wasHidden = preference.card.hidden;
      preference.show(job.spec.training_config.method);
      if (wasHidden && !preference.card.hidden) redraw();  // rows that came before the job did
      renderDetails();
    } catch (error) { showProblem(error); }
  }

  async function loadDataset() {
    try {
      const d = await api(`/jobs/${encodeURIComponent(jobId)}/dataset`);
      dataset.replaceChildren(datasetView(d));
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

  async function loadEvaluation() {
    try {
      evaluation.replaceChildren(evaluationView(await api(`/jobs/${encodeURIComponent(jobId)}/evaluation`)));
    } catch (error) {
      evaluation.replaceChildren(error.status === 409
        ? h("p", { class: "muted", "data-state": "not-ready" }, "Not evaluated (yet): set evaluation_config.enabled with a validation split; the result shows once the job has run it.")
        : h("p", { class: "inline-problem" }, error.message));
    }
  }

  async function loadArtifacts() { artifacts.replaceChildren(await artifactsView(jobId)); }

  function refreshAll() { loadJob(); loadDataset(); loadCheckpoints(); loadEvaluation(); loadArtifacts(); }

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
  for (const chart of [lossChart, lrChart, tpsChart, memChart, ...preference.charts]) drawChart(chart, []);
  refreshAll();
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

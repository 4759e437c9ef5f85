// "New job": a spec in the recipe's config layout, checked and submitted through POST /jobs.
import { api, h, showProblem } from "./util.js";

// The recipe's four sections with its values, pointed at the embedded model and the shipped
// sample so it runs anywhere (README.md's job spec; tests/ui checks they stay the same).
export const RECIPE_EXAMPLE = {
  model_config: { base_model: "smollm2-135m-instruct", finetuned_model: "smollm2-medical",
    max_seq_length: 2048, dtype: null, load_in_4bit: true },
  lora_config: { r: 16, lora_alpha: 16, lora_dropout: 0, bias: "none",
    target_modules: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing: true, use_rslora: false, use_dora: false, loftq_config: null },
  training_dataset: { name: "sample:medical_qa", split: "train", input_field: "prompt" },
  training_config: { per_device_train_batch_size: 2, gradient_accumulation_steps: 4,
    warmup_steps: 5, max_steps: 0, num_train_epochs: 1, learning_rate: 2e-4,
    fp16: null, bf16: null, logging_steps: 1, optim: "adamw_8bit",
    weight_decay: 0.01, lr_scheduler_type: "linear", seed: 42, output_dir: "outputs" },
  hugging_face_username: null,
};

// Where a JSON.parse error points, as "line L column C".
function where(text, error) {
  const at = /position (\d+)/.exec(error.message);
  if (!at) return error.message;
  const before = text.slice(0, Number(at[1])).split("\n");
  return `line ${before.length} column ${before[before.length - 1].length + 1}: ${error.message}`;
}

export function newJobPage(view) {
  const editor = h("textarea", { id: "spec-editor", class: "mono", spellcheck: "false", rows: "28" },
    JSON.stringify(RECIPE_EXAMPLE, null, 2));
  const result = h("div", { id: "spec-result" });
  const submit = h("button", { id: "spec-submit" }, "Create job");
  const reset = h("button", { class: "secondary", id: "spec-reset" }, "Recipe example");

  function problems(error) {
    const body = error.body || {};
    const items = body.errors && body.errors.length ? body.errors
      : [{ field: body.field || "body", code: body.code, message: body.detail || error.message }];
    return h("div", { class: "inline-problem", "data-state": "invalid", "data-code": body.code || "" },
      h("p", {}, `${error.status} ${body.code || ""}: the API refused this spec`),
      h("ul", { class: "problems" }, items.map((e) => h("li", { "data-field": e.field },
        h("b", { class: "mono" }, e.field), e.code ? ` (${e.code})` : "", `: ${e.message}`))));
  }

  async function send() {
    showProblem(null);
    let spec;
    try { spec = JSON.parse(editor.value); } catch (error) {
      result.replaceChildren(h("p", { class: "inline-problem", "data-state": "invalid", "data-code": "invalid_json" },
        `Not JSON: ${where(editor.value, error)}`));
      return;
    }
    submit.disabled = true;
    try {
      const job = await api("/jobs", { json: spec });
      result.replaceChildren(h("p", { "data-state": "created" }, "Created ", h("a", { href: `#/jobs/${job.id}` }, job.id)));
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      result.replaceChildren(error.status ? problems(error) : h("p", { class: "inline-problem" }, error.message));
    } finally { submit.disabled = false; }
  }

  submit.addEventListener("click", send);
  reset.addEventListener("click", () => { editor.value = JSON.stringify(RECIPE_EXAMPLE, null, 2); result.replaceChildren(); });
  view.replaceChildren(
    h("h1", {}, "New job"),
    h("section", { class: "card" },
      h("p", { class: "muted" }, "The recipe's config layout, with its values; the API checks every field "
        + "(bounds, names, datasets, models) and names the one at fault. Field reference: ",
        h("a", { href: "/docs" }, "API docs"), " or ", h("a", { href: "/redoc" }, "ReDoc"), "."),
      editor, h("div", { class: "row" }, submit, reset), result));
}

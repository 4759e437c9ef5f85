// Preference jobs (training_config.method dpo / orpo): per step, the rewards of the chosen and the
// rejected answers, their margin and the share of pairs the chosen answer wins, with the
// held-out pairs' margin and accuracy. The card stays hidden for sft jobs.
import { drawChart, series } from "./charts.js";
import { h, num, svg } from "./util.js";

const PREFERENCE_METHODS = ["dpo", "orpo"];
const EVAL = "eval (held out)";

function chart(id, extra) {
  const attrs = { id, class: "chart", "data-points": "0" };
  for (const name of extra) attrs[`data-${name}-points`] = "0";
  return svg("svg", attrs);
}

export function rewardsCard() {
  const rewards = chart("rewards-chart", ["rejected"]);
  const margin = chart("margin-chart", ["eval"]);
  const accuracy = chart("accuracy-chart", ["eval"]);
  const rewardsNow = h("span", { class: "muted", id: "rewards-now" });
  const marginNow = h("span", { class: "muted", id: "margin-now" });
  const accuracyNow = h("span", { class: "muted", id: "accuracy-now" });
  const head = (title, now) => h("div", { class: "chart-head" }, h("h2", {}, title), now);
  const card = h("section", { class: "card", id: "preference-charts", hidden: true },
    head("Rewards: chosen vs rejected", rewardsNow), rewards,
    head("Reward margin", marginNow), margin,
    head("Reward accuracy", accuracyNow), accuracy);

  // The job's method decides whether the card shows (rows of an sft job have no rewards).
  function show(method) {
    card.hidden = !PREFERENCE_METHODS.includes(method);
    card.dataset.method = method || "";
  }

  function draw(rows) {
    if (card.hidden) return;
    const evalMargin = series(rows, "eval_rewards_margin");
    const evalAccuracy = series(rows, "eval_rewards_accuracy");
    drawChart(rewards, series(rows, "rewards_chosen"),
      [{ name: "rejected", label: "rejected", points: series(rows, "rewards_rejected") }], "chosen");
    drawChart(margin, series(rows, "rewards_margin"),
      [{ name: "eval", label: EVAL, points: evalMargin }]);
    drawChart(accuracy, series(rows, "rewards_accuracy"),
      [{ name: "eval", label: EVAL, points: evalAccuracy }]);
    const last = [...rows].reverse().find((r) => r.rewards_margin != null);
    const lastOf = (points) => points.length ? points[points.length - 1][1] : null;
    const withEval = (value, held) => (value == null ? "" : num(value))
      + (held == null ? "" : ` · eval ${num(held)}`);
    rewardsNow.textContent = last ? `${num(last.rewards_chosen)} vs ${num(last.rewards_rejected)}` : "";
    marginNow.textContent = withEval(last ? last.rewards_margin : null, lastOf(evalMargin));
    accuracyNow.textContent = withEval(last ? last.rewards_accuracy : null, lastOf(evalAccuracy));
  }

  return { card, show, draw, charts: [rewards, margin, accuracy] };
}

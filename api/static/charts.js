// Line charts in SVG: loss with eval loss, learning rate, tokens/s, memory; x is the step.
import { num, svg } from "./util.js";

// A line chart of [step, value] points into an <svg>; data-points says how many it draws.
// `extra` series ({name, label, points}) share its axes; data-<name>-points counts each.
export function drawChart(el, points, extra = [], mainLabel = "training") {
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
  const text = (x, y, content, anchor) => {
    const t = svg("text", { x, y, "text-anchor": anchor });
    t.textContent = content;
    el.append(t);
  };
  text(L - 6, T + 12, axis(y1), "end");
  text(L - 4, H - B, axis(y0), "end");
  text(L, H - 4, `step ${Math.min(...xs)}`, "start");
  text(W - R, H - 4, `step ${Math.max(...xs)}`, "end");
  const named = extra.filter((s) => s.points.length);
  if (named.length) text(W - R, T + 12, [mainLabel, ...named.map((s) => s.label)].join(" · "), "end");
}

// An axis label short enough to fit its margin: whole numbers from 100 up (memory, tokens/s).
export function axis(value) {
  return Math.abs(value) >= 100 ? String(Math.round(value)) : num(value);
}

// [step, value] pairs of one metric, rows without it left out.
export function series(rows, key) {
  return rows.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [r.step, r[key]]);
}

// slimtune dashboard: plain JavaScript, no build step. Every table and plot is drawn from
// the JSON the server hands out (/api/...), the same data the CLI writes.
"use strict";

const state = { info: null, store: null, selected: [] };
const COLORS = ["#2f6fdf", "#e0662f", "#2e9d57", "#9b4dca", "#c9a227", "#d2417b"];

// -- small helpers ---------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

async function api(path, options = {}) {
  if (options.method === "POST" && path.startsWith("/api/")) {  // a change to the store
    options = { ...options, headers: { ...(options.headers || {}), "x-slimtune-write": "1" } };
  }
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || `${path}: HTTP ${r.status}`);
  return body;
}

function showError(e) {
  const box = document.getElementById("error");
  box.textContent = String(e.message || e);
  box.hidden = false;
  setTimeout(() => (box.hidden = true), 8000);
}

const fmt = {
  pct: (v) => (v === null || v === undefined ? "-" : `${(100 * v).toFixed(1)}%`),
  num: (v, d = 3) => (v === null || v === undefined ? "-" : Number(v).toFixed(d)),
  int: (v) => (v === null || v === undefined ? "-" : Math.round(v).toLocaleString("en")),
  bytes: (v) => {
    if (v === null || v === undefined) return "-";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${v.toFixed(i ? 2 : 0)} ${units[i]}`;
  },
  secs: (v) => (v === null || v === undefined ? "-" : `${Number(v).toFixed(1)} s`),
};

const METRICS = [
  ["eval_accuracy", "accuracy", fmt.pct],
  ["eval_loss", "eval loss", fmt.num],
  ["final_train_loss", "final train loss", fmt.num],
  ["trainable_params", "trainable params", fmt.int],
  ["train_time_s", "train time", fmt.secs],
  ["tokens_per_s", "tokens/s", (v) => fmt.num(v, 1)],
  ["peak_memory_bytes", "peak memory", fmt.bytes],
  ["eval_latency_p50_ms", "decode latency p50 (ms)", (v) => fmt.num(v, 1)],
  ["delta_bytes", "delta on disk", fmt.bytes],
];

// -- plots: SVG drawn here -------------------------------------------------------------

function ticks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
  const mult = [1, 2, 5, 10].find((m) => (hi - lo) / (m * step) <= n) || 10;
  const s = mult * step;
  const out = [];
  for (let t = Math.ceil(lo / s) * s; t <= hi + 1e-12 && out.length < 20; t += s) out.push(+t.toPrecision(12));
  return out;
}

// an <svg> of the given size and attributes, and add(tag, attrs, text) to draw into it
function canvas(width, height, attrs) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  for (const [k, v] of Object.entries({ viewBox: `0 0 ${width} ${height}`, width: "100%", ...attrs })) svg.setAttribute(k, v);
  const add = (tag, a, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(a)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  return { svg, add };
}

// series: [{name, xs, ys}]; opts: {xLabel, yLabel, markX, markLabel}
function lineChart(series, opts = {}) {
  const W = opts.width || 520, H = opts.height || 240, L = 52, R = 12, T = 12, B = 36;
  const { svg, add } = canvas(W, H, { class: "chart" });
  const pts = series.flatMap((s) => s.xs.map((x, i) => [x, s.ys[i]])).filter((p) => p[1] !== null);
  if (!pts.length) {
    add("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data");
    return svg;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of ticks(y0, y1)) {
    add("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid" });
    add("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, +t.toPrecision(4));
  }
  for (const t of ticks(x0, x1)) {
    add("text", { x: sx(t), y: H - B + 14, "text-anchor": "middle" }, +t.toPrecision(6));
  }
  add("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" });
  add("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  if (opts.xLabel) add("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, opts.xLabel);
  if (opts.yLabel) add("text", { x: 12, y: T + (H - T - B) / 2, transform: `rotate(-90 12 ${T + (H - T - B) / 2})`, "text-anchor": "middle" }, opts.yLabel);
  if (opts.markX !== undefined && opts.markX !== null) {
    add("line", { x1: sx(opts.markX), x2: sx(opts.markX), y1: T, y2: H - B, stroke: "#c0392b", "stroke-dasharray": "4 3" });
    add("text", { x: sx(opts.markX) + 4, y: T + 10, fill: "#c0392b" }, opts.markLabel || "");
  }
  series.forEach((s, k) => {
    const d = s.xs
      .map((x, i) => [x, s.ys[i]])
      .filter((p) => p[1] !== null)
      .map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`)
      .join("");
    add("path", { d, fill: "none", stroke: s.color || COLORS[k % COLORS.length], "stroke-width": 2, "data-series": s.name });
  });
  const wrap = el("div", { class: "plot" }, svg);
  if (series.length > 1 || opts.legend) {
    wrap.prepend(el("div", { class: "legend" }, series.map((s, k) =>
      el("span", {}, el("i", { style: `background:${s.color || COLORS[k % COLORS.length]}` }), s.name))));
  }
  return wrap;
}

// parent -> child graph: one column per generation, one row per version in its column
function lineage(versions, tags) {
  const depth = {};
  const byId = Object.fromEntries(versions.map((v) => [v.id, v]));
  const d = (v) => (depth[v.id] ??= v.parent && byId[v.parent] ? d(byId[v.parent]) + 1 : 0);
  versions.forEach(d);
  const cols = {};
  versions.forEach((v) => (cols[depth[v.id]] ??= []).push(v));
  const pos = {};
  Object.entries(cols).forEach(([c, vs]) => vs.forEach((v, r) => (pos[v.id] = [40 + c * 120, 30 + r * 46])));
  const W = 40 + (Object.keys(cols).length) * 120, H = 30 + Math.max(...Object.values(cols).map((v) => v.length)) * 46;
  const { svg, add } = canvas(Math.max(W, 200), Math.max(H, 60), { id: "lineage-svg" });
  for (const v of versions) {
    if (v.parent && pos[v.parent]) {
      const [a, b] = [pos[v.parent], pos[v.id]];
      add("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], stroke: "#9aa3b5", "stroke-width": 1.5, "data-edge": `${v.parent}->${v.id}` });
    }
  }
  for (const v of versions) {
    const [x, y] = pos[v.id];
    const node = add("circle", { cx: x, cy: y, r: 14, fill: v.tags.length ? "#2f6fdf" : "#fff", stroke: "#2f6fdf", "stroke-width": 2, "data-node": v.id, style: "cursor:pointer" });
    node.addEventListener("click", () => (location.hash = `#version/${v.id}`));
    add("text", { x, y: y + 4, "text-anchor": "middle", fill: v.tags.length ? "#fff" : "#1d2330" }, v.id);
    if (v.tags.length) add("text", { x: x + 18, y: y - 10, fill: "#2f6fdf" }, v.tags.join(", "));
  }
  return svg;
}

// -- views -----------------------------------------------------------------------------

async function loadStore() {
  state.store = await api("/api/versions");
  return state.store;
}

function metricCell(v, key, f) {
  return el("td", { class: "num", "data-metric": key }, f(v.metrics[key]));
}

async function viewVersions() {
  const s = await loadStore();
  const table = document.getElementById("versions-table");
  table.replaceChildren(
    el("tr", {}, ["", "id", "tags", "method", "parent", "accuracy", "eval loss", "trainable", "train time", "size", "created", "note"].map((h) => el("th", {}, h))),
    ...s.versions.map((v) => el("tr", { "data-version": v.id },
      el("td", {}, el("input", { type: "checkbox", "data-select": v.id, checked: state.selected.includes(v.id), onchange: (e) => select(v.id, e.target.checked) })),
      el("td", {}, el("a", { href: `#version/${v.id}` }, v.id)),
      el("td", {}, v.tags.map((t) => el("span", { class: "tag" }, t))),
      el("td", {}, v.method),
      el("td", {}, v.parent || ""),
      metricCell(v, "eval_accuracy", fmt.pct),
      metricCell(v, "eval_loss", fmt.num),
      metricCell(v, "trainable_params", fmt.int),
      metricCell(v, "train_time_s", fmt.secs),
      el("td", { class: "num" }, fmt.bytes(v.bytes)),
      el("td", {}, (v.created || "").replace("T", " ").slice(0, 16)),
      el("td", {}, v.note || ""),
    )),
  );
  if (!s.versions.length) table.append(el("tr", {}, el("td", { colspan: 12, class: "note" }, "The store holds no version yet.")));
  document.getElementById("lineage").replaceChildren(s.versions.length ? lineage(s.versions, s.tags) : "");
  renderTags(s);
  document.getElementById("splits").replaceChildren(
    Object.keys(s.splits).length
      ? el("table", {}, Object.entries(s.splits).map(([n, arms]) => el("tr", { "data-split": n }, el("td", {}, n), el("td", {}, arms))))
      : el("div", { class: "note" }, "No split in the store (slimtune delta split NAME ARM=W,...)."),
  );
  updateCompare();
}

function renderTags(s) {
  const box = document.getElementById("tags");
  const names = Object.keys(s.tags).sort();
  box.replaceChildren(
    names.length ? el("table", { id: "tags-table" }, names.map((t) => el("tr", { "data-tag": t },
      el("td", {}, el("span", { class: "tag" }, t)),
      el("td", { "data-tag-version": t }, s.tags[t]),
      el("td", { class: "note" }, "history: " + (s.tag_history[t] || []).map((h) => h.version).join(" → ")),
      el("td", {}, state.info.writable ? el("button", { class: "secondary", "data-rollback": t, onclick: () => rollback(t) }, "roll back") : ""),
    ))) : el("div", { class: "note" }, "No tag yet."),
  );
  const actions = document.getElementById("tag-actions");
  if (!state.info.writable) {
    actions.replaceChildren(el("div", { class: "note", id: "readonly-note" },
      "Read-only: start with --allow-writes to move tags, roll back or remove versions."));
    return;
  }
  actions.replaceChildren(el("div", { class: "pg-controls" },
    el("input", { id: "tag-name", placeholder: "tag, e.g. prod", size: 12 }),
    el("select", { id: "tag-version" }, s.versions.map((v) => el("option", { value: v.id }, v.id))),
    el("button", { id: "tag-move", onclick: moveTag }, "Move tag"),
  ));
}

function select(id, on) {
  state.selected = state.selected.filter((x) => x !== id);
  if (on) state.selected.push(id);
  if (state.selected.length > 2) {
    const dropped = state.selected.shift();
    const box = document.querySelector(`[data-select="${dropped}"]`);
    if (box) box.checked = false;
  }
  updateCompare();
}

function updateCompare() {
  const b = document.getElementById("compare-btn");
  b.disabled = state.selected.length !== 2;
  b.onclick = () => (location.hash = `#compare/${state.selected[0]}/${state.selected[1]}`);
}

async function moveTag() {
  const name = document.getElementById("tag-name").value.trim();
  const version = document.getElementById("tag-version").value;
  if (!name) return showError("name the tag to move");
  const now = state.store.tags[name];
  if (!confirm(`Move tag ${name} ${now ? `from ${now} ` : ""}to ${version}?`)) return;
  try {
    await api("/api/tags", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ name, version }) });
    await viewVersions();
  } catch (e) { showError(e); }
}

async function rollback(tag) {
  if (!confirm(`Roll tag ${tag} back to the version it pointed at before?`)) return;
  try {
    await api(`/api/tags/${encodeURIComponent(tag)}/rollback`, { method: "POST" });
    await viewVersions();
  } catch (e) { showError(e); }
}

function kvTable(obj, id) {
  const rows = Object.entries(obj || {}).filter(([, v]) => v !== null && typeof v !== "object");
  return el("table", { id }, rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v)))));
}

function salfPanel(analysis, eof) {
  if (!analysis) return null;
  const spaces = analysis.spaces || [];
  const xs = spaces.map((s) => s.space);
  const gainXs = (analysis.gain || []).map((_, k) => k);
  return el("div", { class: "panel wide", "data-panel": "salf" },
    el("h2", {}, `SALF analysis: end of freezing at layer ${eof ?? analysis.freeze_below}`),
    el("div", { class: "note" }, analysis.reason || ""),
    el("div", { class: "row" },
      el("div", { class: "panel" }, el("h3", {}, "logit-lens loss per latent space"),
        lineChart([{ name: "loss", xs, ys: spaces.map((s) => s.loss) }, { name: "KL to final", xs, ys: spaces.map((s) => s.kl_to_final) }],
          { xLabel: "latent space (0 = embeddings)", yLabel: "nats", markX: eof ?? analysis.freeze_below, markLabel: "eof" })),
      el("div", { class: "panel" }, el("h3", {}, "expected gain G(k) of training above layer k"),
        lineChart([{ name: "G(k)", xs: gainXs, ys: analysis.gain }], { xLabel: "freeze below k", yLabel: "gain", markX: eof ?? analysis.freeze_below, markLabel: "eof" })),
    ),
    (analysis.costs || []).length ? el("div", {}, el("h3", {}, "cost of each cut"), el("table", { "data-table": "costs" },
      el("tr", {}, ["freeze below", "trainable params", "backward FLOPs share", "saved activations"].map((h) => el("th", {}, h))),
      analysis.costs.map((c) => el("tr", {}, el("td", {}, c.freeze_below), el("td", { class: "num" }, fmt.int(c.trainable_params)),
        el("td", { class: "num" }, fmt.pct(c.backward_flops_share)), el("td", { class: "num" }, fmt.bytes(c.activation_bytes)))))) : null,
  );
}

async function viewVersion(id) {
  const v = await api(`/api/versions/${encodeURIComponent(id)}`);
  const box = document.getElementById("view-version");
  const curve = v.curve && v.curve.step && v.curve.step.length
    ? lineChart([{ name: v.id, xs: v.curve.step, ys: v.curve.loss }], { xLabel: "step", yLabel: "training loss" })
    : el("div", { class: "note" }, "No loss curve recorded (a version from before curves were kept).");
  const af = v.auto_freeze || {};
  const run = v.run || {};
  box.replaceChildren(
    el("div", { class: "row" },
      el("div", { class: "panel" }, el("h2", {}, `${v.id} `, v.tags.map((t) => el("span", { class: "tag" }, t))),
        el("div", { class: "note" }, `${v.method} · parent ${v.parent || "none"} · ${fmt.bytes(v.bytes)} · ${v.created}`),
        v.note ? el("p", {}, v.note) : null,
        el("h3", {}, "metrics and cost"),
        el("table", { id: "version-metrics" }, METRICS.map(([k, label, f]) => el("tr", {}, el("th", {}, label), el("td", { "data-metric": k }, f((v.metrics || {})[k]))))),
        el("h3", {}, "method options"), kvTable(v.method_config, "version-config"),
        el("h3", {}, "base"), kvTable(v.base),
        state.info.writable ? el("p", {}, el("button", { class: "secondary", id: "rm-btn", onclick: () => removeVersion(v.id) }, `Remove ${v.id}`)) : null),
      el("div", { class: "panel" }, el("h2", {}, "training loss"), curve,
        run.files && run.files.length ? el("div", {}, el("h3", {}, `run folder ${run.folder}`),
          run.files.map((f) => el("img", { class: "plot", src: `/api/versions/${encodeURIComponent(v.id)}/run/${f}`, alt: f }))) : null,
        run.report ? el("details", {}, el("summary", {}, "report.md"), el("pre", {}, run.report)) : null),
    ),
    salfPanel(af.analysis, af.freeze_below),
  );
}

async function removeVersion(id) {
  if (!confirm(`Remove ${id} from the store? (refused while a tag, a split or a child uses it)`)) return;
  try {
    await api(`/api/versions/${encodeURIComponent(id)}/rm`, { method: "POST" });
    location.hash = "#versions";
  } catch (e) { showError(e); }
}

async function viewCompare(a, b) {
  const [A, B] = await Promise.all([a, b].map((id) => api(`/api/versions/${encodeURIComponent(id)}`)));
  const keys = new Set([...Object.keys(A.method_config || {}), ...Object.keys(B.method_config || {})]);
  const cfg = (x, k) => { const v = (x.method_config || {})[k]; return v === null || v === undefined ? "-" : String(v); };
  const curves = [A, B].filter((x) => x.curve && x.curve.step && x.curve.step.length)
    .map((x) => ({ name: x.id, xs: x.curve.step, ys: x.curve.loss }));
  document.getElementById("view-compare").replaceChildren(
    el("div", { class: "row" },
      el("div", { class: "panel" }, el("h2", {}, `${A.id} vs ${B.id}`),
        el("table", { id: "compare-table" },
          el("tr", {}, el("th", {}, ""), el("th", {}, A.id), el("th", {}, B.id)),
          el("tr", {}, el("th", {}, "method"), el("td", { "data-side": "A" }, A.method), el("td", { "data-side": "B" }, B.method)),
          METRICS.map(([k, label, f]) => el("tr", { "data-metric": k }, el("th", {}, label),
            el("td", { class: "num", "data-side": "A" }, f((A.metrics || {})[k])), el("td", { class: "num", "data-side": "B" }, f((B.metrics || {})[k])))),
          [...keys].sort().map((k) => el("tr", { "data-config": k, class: cfg(A, k) !== cfg(B, k) ? "differs" : "" }, el("th", {}, k),
            el("td", { "data-side": "A" }, cfg(A, k)), el("td", { "data-side": "B" }, cfg(B, k)))),
        )),
      el("div", { class: "panel" }, el("h2", {}, "training loss, overlaid"),
        curves.length ? lineChart(curves, { xLabel: "step", yLabel: "training loss", legend: true }) : el("div", { class: "note" }, "No loss curves recorded.")),
    ),
  );
}

async function viewAnalyses() {
  const { analyses } = await api("/api/analyses");
  const box = document.getElementById("view-analyses");
  const withRuns = (await loadStore()).versions;
  box.replaceChildren(
    el("div", { class: "note" }, state.info.runs
      ? `slimtune analyze outputs under ${state.info.runs}; the analyses of --freeze auto runs are on their version's page.`
      : "Start with --runs DIR to list the slimtune analyze outputs under DIR; the analyses of --freeze auto runs are on their version's page."),
    ...analyses.map((a) => el("div", { "data-analysis": a.path }, el("h3", {}, a.path), salfPanel(a, a.eof ?? a.freeze_below))),
  );
  if (!analyses.length && !withRuns.length) box.append(el("div", { class: "note" }, "Nothing to show yet."));
}

function abRow(r, kind) {
  const b = r.bootstrap || {};
  const points = r.metric === "accuracy" || r.metric === "exact_match";
  const scale = points ? 100 : 1;
  const num = (x) => (x === null || x === undefined ? "-" : `${x >= 0 ? "+" : ""}${(scale * x).toFixed(points ? 2 : 3)}`);
  const test = r.mcnemar ? `McNemar p = ${r.mcnemar.p_value.toPrecision(3)}` : r.fisher ? `Fisher p = ${r.fisher.p_value.toPrecision(3)}` : "bootstrap";
  const winner = r.winner === "A" ? r.A.ref : r.winner === "B" ? r.B.ref : "tie";
  return el("tr", { "data-ab": kind },
    el("td", {}, r.path || `split ${r.split}`), el("td", {}, r.A.ref), el("td", {}, r.B.ref), el("td", {}, r.metric),
    el("td", { class: "num", "data-diff": kind }, `${num(b.mean_diff)}${points ? " points" : ""} [${num(b.ci_low)}, ${num(b.ci_high)}]`),
    el("td", {}, test), el("td", {}, `${winner}${r.significant ? " (significant)" : ""}`));
}

async function viewAb() {
  const { offline, live } = await api("/api/ab");
  const head = el("tr", {}, ["source", "A", "B", "metric", "B - A [95% CI]", "test", "winner"].map((h) => el("th", {}, h)));
  document.getElementById("view-ab").replaceChildren(
    el("div", { class: "panel wide" }, el("h2", {}, "Offline (slimtune ab --output, under --runs)"),
      offline.length ? el("table", { id: "ab-offline" }, head.cloneNode(true), offline.map((r) => abRow(r, "offline"))) : el("div", { class: "note" }, "None found.")),
    el("div", { class: "panel wide" }, el("h2", {}, "Live traffic (the request log of slimtune serve --log)"),
      live.length ? el("table", { id: "ab-live" }, head.cloneNode(true), live.map((r) => (r.error ? el("tr", {}, el("td", { colspan: 7 }, `split ${r.split}: ${r.error}`)) : abRow(r, "live"))))
        : el("div", { class: "note" }, state.info.log ? "No split with outcomes in the log yet." : "No request log (start serve with --log FILE).")),
  );
}

let servingTimer = null;
let routeGeneration = 0;  // a view still loading when the user moved on must not act
async function viewServing(generation) {
  const draw = async () => {
    const s = await api("/api/serving");
    const rows = Object.entries(s.deltas);
    document.getElementById("view-serving").replaceChildren(el("div", { class: "panel wide" },
      el("h2", {}, "Live serving metrics per version"),
      !s.available ? el("div", { class: "note" }, "Not serving: slimtune dashboard loads no model (use slimtune serve).")
        : rows.length ? el("table", { id: "serving-table" },
          el("tr", {}, ["version", "requests", "errors", "tokens", "mean latency", "last tokens/s"].map((h) => el("th", {}, h))),
          rows.map(([d, r]) => el("tr", { "data-delta": d }, el("td", {}, d), el("td", { class: "num" }, fmt.int(r.requests || 0)),
            el("td", { class: "num" }, fmt.int(r.errors || 0)), el("td", { class: "num" }, fmt.int(r.tokens || 0)),
            el("td", { class: "num" }, r.latency_mean_s === null ? "-" : fmt.secs(r.latency_mean_s)), el("td", { class: "num" }, fmt.num(r.tokens_per_s, 1)))))
          : el("div", { class: "note" }, "No request answered yet."),
      el("div", { class: "note" }, "Refreshed every 2 s; Prometheus text at /metrics.")));
  };
  await draw();
  if (generation === routeGeneration) servingTimer = setInterval(() => draw().catch(showError), 2000);
}

async function viewPlayground() {
  const on = state.info.playground;
  document.getElementById("pg-off").hidden = on;
  document.getElementById("pg-on").hidden = !on;
  if (!on) return;
  const { data } = await api("/v1/models");
  for (const [id, pick] of [["pg-a", 0], ["pg-b", 1]]) {
    const sel = document.getElementById(id);
    const keep = sel.value;
    sel.replaceChildren(...data.map((m) => el("option", { value: m.id }, m.id)));
    sel.value = keep || (data[Math.min(pick + 1, data.length - 1)] || data[0]).id;
  }
  document.getElementById("pg-send").onclick = sendBoth;
}

async function ask(side) {
  const model = document.getElementById(`pg-${side}`).value;
  const out = document.getElementById(`pg-out-${side}`);
  const served = document.getElementById(`pg-served-${side}`);
  out.textContent = "…";
  served.textContent = "-";
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model,
        max_tokens: Number(document.getElementById("pg-max").value) || 32,
        messages: [{ role: "user", content: document.getElementById("pg-prompt").value }],
      }),
    });
    out.textContent = r.choices[0].message.content;
    served.textContent = r.slimtune.delta + (r.slimtune.arm ? ` (arm ${r.slimtune.arm})` : "");
  } catch (e) {
    out.textContent = `error: ${e.message}`;
  }
}

async function sendBoth() {
  await Promise.all([ask("a"), ask("b")]);
}

// -- routing ---------------------------------------------------------------------------

async function route() {
  clearInterval(servingTimer);
  const generation = ++routeGeneration;
  document.body.dataset.ready = "";
  let view = "versions", args = [];
  try {
    [view, ...args] = (location.hash.slice(1) || "versions").split("/").map(decodeURIComponent);
  } catch (e) { showError(`bad address: ${location.hash}`); }
  const views = { versions: viewVersions, version: viewVersion, compare: viewCompare, analyses: viewAnalyses, ab: viewAb, serving: viewServing, playground: viewPlayground };
  const show = views[view] ? view : "versions";
  document.querySelectorAll(".view").forEach((s) => s.classList.toggle("shown", s.id === `view-${show}`));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === show || (show === "version" && a.dataset.view === "versions") || (show === "compare" && a.dataset.view === "versions")));
  try {
    await (show === "serving" ? viewServing(generation) : views[show](...args));
    if (generation === routeGeneration) document.body.dataset.ready = show;  // tests wait for this
  } catch (e) { showError(e); }
}

async function start() {
  state.info = await api("/api/info");
  document.getElementById("info").textContent =
    `${state.info.model ? `model ${state.info.model} · ` : ""}store ${state.info.store} · ${state.info.writable ? "read-write" : "read-only"}`;
  window.addEventListener("hashchange", route);
  await route();
}

start().catch(showError);

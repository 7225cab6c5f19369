// The live page of shadowproxy's admin port. It reads the admin API (same origin) every second
// and draws what it reads. Every value goes into the page as text (textContent, attributes): a
// prediction or a label is never parsed as HTML.
"use strict";

(function () {
  const POLL_MS = 1000;
  const DRIFT_MS = 5000;
  const TOKEN_KEY = "shadowproxy.admin_token";
  const SVG = "http://www.w3.org/2000/svg";

  const state = {
    stats: null,
    verdict: null,
    history: [],
    capacity: 720,
    interval: 5,
    view: "window",
    drift: undefined, // undefined: not asked yet; null: no drift endpoint
    lastDrift: 0,
    rateDirty: false,
    failures: 0,
  };

  // -- small DOM helpers ---------------------------------------------------------------------
  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "text") node.textContent = String(v);
      else if (k === "cls") node.className = v;
      else node.setAttribute(k, String(v));
    }
    for (const child of children || []) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = String(v);
      else node.setAttribute(k, String(v));
    }
    return node;
  }

  function fill(box, ...nodes) { box.replaceChildren(...nodes); }

  function fmt(v, digits) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v !== "number") return String(v);
    if (!Number.isFinite(v)) return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    const d = digits === undefined ? 4 : digits;
    if (Math.abs(v) >= 1000) return v.toLocaleString("en-US", { maximumFractionDigits: 1 });
    return Number(v.toPrecision(d)).toString();
  }

  function pct(v) { return v === null || v === undefined ? "—" : fmt(v * 100, 3) + "%"; }

  function interval(iv) {
    if (!Array.isArray(iv)) return "—";
    return "[" + fmt(iv[0]) + ", " + (iv[1] === null ? "∞" : fmt(iv[1])) + "]";
  }

  function table(head, rows, opts) {
    const thead = el("thead", {}, [el("tr", {}, head.map((h) => el("th", { text: h, scope: "col" })))]);
    const body = el("tbody", {}, rows.map((row) => el("tr", (opts && opts.rowAttrs) ? opts.rowAttrs(row) : {},
      row.map((cell, i) => (cell instanceof Node ? cell : el(i === 0 ? "th" : "td", i === 0
        ? { text: cell, scope: "row" } : { text: cell }))))));
    return el("table", {}, [thead, body]);
  }

  // -- talking to the admin API ----------------------------------------------------------------
  async function getJSON(path) {
    const answer = await fetch(path, { cache: "no-store", credentials: "same-origin" });
    if (!answer.ok) throw new Error(path + ": HTTP " + answer.status);
    return answer.json();
  }

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  // -- verdict and gates -----------------------------------------------------------------------
  function renderVerdict(v) {
    const box = $("verdict");
    box.setAttribute("data-verdict", v.verdict);
    box.textContent = v.verdict === "insufficient_data" ? "insufficient data" : v.verdict;
    const gates = (v.gates || []).map((g) => {
      const status = g.passed === true ? "pass" : g.passed === false ? "fail" : "waiting";
      return el("div", { cls: "gate", "data-gate": g.name, "data-passed": String(g.passed) }, [
        el("div", { cls: "head" }, [
          el("span", { cls: "name", text: g.name }),
          el("span", { cls: "pill " + status, text: status }),
        ]),
        el("div", { cls: "figures" }, [
          el("span", { cls: "value", "data-value": JSON.stringify(g.value), text: "value " + fmt(g.value) }),
          el("span", { cls: "threshold", "data-value": JSON.stringify(g.threshold),
                       text: "threshold " + fmt(g.threshold) }),
          el("span", { cls: "interval", text: "95% interval " + interval(g.interval) }),
        ]),
        el("div", { cls: "reason", text: g.reason }),
      ]);
    });
    fill($("gates"), ...gates);
  }

  // -- the mirror funnel -----------------------------------------------------------------------
  const REASON_BLOCKS = [
    ["skipped_by_reason", "skipped", "not eligible"],
    ["dropped_by_reason", "dropped", "not sent"],
    ["errors_by_kind", "error", "sent, no answer"],
  ];

  function renderFunnel(s) {
    const m = s.mirror;
    const c = s.comparisons;
    const answered = m.sent - m.error;
    const stages = [
      ["sampled", "sampled", m.sampled, null],
      ["sent", "sent", m.sent, m.in_flight ? fmt(m.in_flight) + " in flight" : null],
      ["answered", "answered", answered, "sent − error"],
      ["compared", "compared", c.total, "predictions; " + fmt(c.candidate_error) + " candidate errors, " +
        fmt(c.unparseable) + " unparseable, " + fmt(c.too_large) + " too large"],
    ];
    const top = Math.max(m.sampled, 1);
    const rows = stages.map(([key, label, n, sub]) => {
      const bar = el("div", { cls: "bar" });
      bar.style.width = Math.min(100, (100 * n) / top) + "%";
      return el("div", { cls: "stage", "data-stage": key }, [
        el("span", { cls: "label", text: label }),
        el("div", { cls: "track" }, [bar]),
        el("span", { cls: "n", "data-value": n, text: fmt(n) }),
        sub ? el("span", { cls: "sub", text: sub }) : null,
      ]);
    });
    fill($("funnel"), ...rows);

    const tables = [];
    const lost = [];
    for (const [block, result, what] of REASON_BLOCKS) {
      const counts = m[block] || {};
      const rows = Object.keys(counts).map((reason) => {
        const n = counts[reason];
        if (n > 0) lost.push(result + ": " + reason + " " + fmt(n));
        return el("tr", { "data-reason": block + "." + reason }, [
          el("td", { text: reason }),
          el("td", { cls: "n " + (n > 0 ? "nonzero" : "zero"), "data-value": n, text: fmt(n) }),
        ]);
      });
      tables.push(el("h3", { text: result + " (" + what + "): " + fmt(m[result]) }));
      tables.push(el("table", { "data-block": block }, [
        el("thead", {}, [el("tr", {}, [el("th", { text: "reason" }), el("th", { text: "copies" })])]),
        el("tbody", {}, rows),
      ]));
    }
    fill($("reasons"), ...tables);

    const alert = $("alert");
    const missing = m.skipped + m.dropped + m.error;
    if (missing > 0) {
      fill(alert,
        el("span", { text: fmt(missing) + " of " + fmt(m.sampled) +
          " sampled copies never reached a comparison" }),
        el("ul", {}, lost.map((line) => el("li", { text: line }))));
      alert.hidden = false;
    } else {
      alert.hidden = true;
    }
  }

  // -- latency and comparison tables -----------------------------------------------------------
  const PCTS = ["p50", "p90", "p95", "p99", "p999"];

  function renderLatency(s) {
    const row = (name, block) => [name, ...PCTS.map((p) => fmt(block[p], 3))];
    const rows = [
      row("production", s.production.latency_ms),
      row("candidate", s.candidate.latency_ms),
    ];
    if (s.mirrored) {
      rows.push(row("pairs: prod.", s.mirrored.production_latency_ms));
      rows.push(row("pairs: cand.", s.mirrored.candidate_latency_ms));
    }
    if (s.latency_diff_ms) rows.push(row("cand. − prod.", s.latency_diff_ms));
    fill($("latency-table"), table(["", ...PCTS], rows),
      el("p", { cls: "note", text: "pairs: the mirrored requests both models answered, which the latency gate compares." }));
  }

  function renderComparison(s) {
    const c = s.comparisons;
    const parts = [
      table(["outcome", "count"], [
        ["agree", fmt(c.agree)], ["disagree", fmt(c.disagree)],
        ["disagreement rate", pct(c.disagreement_rate)],
        ["95% interval", "[" + pct(c.disagreement_rate_ci95[0]) + ", " + pct(c.disagreement_rate_ci95[1]) + "]"],
        ["candidate error", fmt(c.candidate_error)], ["unparseable", fmt(c.unparseable)],
        ["too large", fmt(c.too_large)],
      ]),
    ];
    const conf = s.confusion;
    if (conf && conf.labels && conf.labels.length) {
      parts.push(el("h3", { text: "Confusion: production (rows) against candidate (columns)" }));
      const head = el("tr", {}, [el("th", { text: "" }), ...conf.labels.map((l) => el("th", { text: l, scope: "col" }))]);
      const rows = conf.labels.map((label, i) => el("tr", {}, [
        el("th", { text: label, scope: "row" }),
        ...conf.matrix[i].map((n, j) => el("td", { text: fmt(n), cls: n === 0 ? "" : i === j ? "diag" : "off" })),
      ]));
      parts.push(el("table", { id: "confusion" }, [el("thead", {}, [head]), el("tbody", {}, rows)]));
    }
    // compare.kind "fields": {pointer: {compared, differ, noise_differ, noisy}}, the ten that differ most.
    const fields = s.fields && typeof s.fields === "object" ? Object.entries(s.fields) : [];
    const differing = fields.filter(([, f]) => f && f.compared > 0 && f.differ > 0)
      .sort((a, b) => b[1].differ / b[1].compared - a[1].differ / a[1].compared).slice(0, 10);
    if (differing.length) {
      parts.push(el("h3", { text: "Fields that differ most" }));
      parts.push(table(["field", "compared", "differing", "share", "noisy"], differing.map(([pointer, f]) => [
        pointer, fmt(f.compared), fmt(f.differ), pct(f.differ / f.compared), f.noisy ? "yes" : "no"])));
    }
    const diffs = s.differences || {};
    const used = Object.keys(diffs).filter((k) => diffs[k] && diffs[k].count > 0);
    if (used.length) {
      parts.push(el("h3", { text: "Differences per prediction" }));
      parts.push(table(["figure", "count", "mean", "p50", "p99"],
        used.map((k) => [k, fmt(diffs[k].count), fmt(diffs[k].mean), fmt(diffs[k].p50), fmt(diffs[k].p99)])));
    }
    fill($("comparison"), ...parts);
  }

  // Leaves of a JSON object as [path, value] (numbers, strings, booleans, null), depth-limited.
  function leaves(obj, prefix, out, depth) {
    for (const [k, v] of Object.entries(obj || {})) {
      const path = prefix ? prefix + "." + k : k;
      if (v !== null && typeof v === "object" && !Array.isArray(v)) {
        if (depth < 3) leaves(v, path, out, depth + 1);
      } else if (Array.isArray(v)) {
        if (v.length <= 4 && v.every((x) => x === null || typeof x !== "object")) out.push([path, interval(v)]);
      } else {
        out.push([path, fmt(v)]);
      }
    }
    return out;
  }

  // One column per member of `obj` (per candidate, per target), a row per leaf they have (only
  // the leaves `only` names, in its order, when given).
  function columns(obj, limit, only) {
    const names = Object.keys(obj);
    const values = names.map((n) => new Map(leaves(obj[n], "", [], 0)));
    let paths = [];
    for (const m of values) for (const p of m.keys()) if (!paths.includes(p)) paths.push(p);
    if (only) paths = only.filter((p) => paths.includes(p));
    const rows = paths.slice(0, limit).map((p) => [p, ...values.map((m) => (m.has(p) ? m.get(p) : "—"))]);
    return table(["", ...names], rows);
  }

  const LLM_ROWS = [
    "answers", "streams", "errors", "too_large", "ttft_ms.p50", "ttft_ms.p99", "inter_token_ms.p50",
    "inter_token_ms.p99", "tokens_per_s.p50", "output_tokens.total", "cost_usd.total", "cost_usd.per_request",
    "finish_reasons.stop", "finish_reasons.length", "finish_reasons.tool_calls", "finish_reasons.content_filter",
    "finish_reasons.other",
  ];
  const LLM_PAIR_ROWS = [
    "streamed", "production_ttft_ms.p50", "candidate_ttft_ms.p50", "production_ttft_ms.p99",
    "candidate_ttft_ms.p99", "similarity.mean", "similarity.p50", "tool_calls.compared",
    "tool_calls.agreement_rate",
  ];

  function renderExtras(s) {
    const cands = s.candidates;
    const hasCands = cands && typeof cands === "object" && !Array.isArray(cands) && Object.keys(cands).length;
    $("candidates-card").hidden = !hasCands;
    if (hasCands) fill($("candidates"), columns(cands, 80));

    const judge = s.judge;
    $("judge-card").hidden = !(judge && typeof judge === "object");
    if (judge && typeof judge === "object") {
      fill($("judge"), table(["figure", "value"], leaves(judge, "", [], 0).slice(0, 80)));
    }

    const llm = s.llm;
    const active = llm && ((llm.production && llm.production.answers) || (llm.candidate && llm.candidate.answers));
    $("llm-card").hidden = !active;
    if (active) {
      const sides = {};
      for (const k of Object.keys(llm)) if (llm[k] && typeof llm[k] === "object") sides[k] = llm[k];
      const parts = [columns(sides, 80, LLM_ROWS)];
      const pairs = llm.candidate && llm.candidate.pairs;
      if (pairs) {
        parts.push(el("h3", { text: "On the same mirrored requests" }));
        parts.push(table(["", "value"], leaves(pairs, "", [], 0).filter(([p]) => LLM_PAIR_ROWS.includes(p))
          .sort((a, b) => LLM_PAIR_ROWS.indexOf(a[0]) - LLM_PAIR_ROWS.indexOf(b[0]))));
      }
      fill($("llm"), ...parts);
    }

    const workers = s.workers;
    $("workers-card").hidden = !Array.isArray(workers);
    if (Array.isArray(workers)) {
      fill($("workers"), table(["worker", "pid", "requests", "sample rate"], workers.map((w, i) =>
        [String(i), fmt(w.pid), fmt(w.requests), fmt(w.sample_rate)])));
    }
  }

  function renderDrift(doc) {
    $("drift-card").hidden = !doc;
    if (!doc) return;
    const parts = [];
    if (doc.warming_up) {
      const w = doc.warmup || {};
      parts.push(el("p", { cls: "muted", text: "Learning the baseline: " + fmt(w.seen) + " of " + fmt(w.needed) }));
    }
    const rows = Object.entries(doc.features || {}).map(([name, f]) =>
      [name, f.status, fmt(f.psi), fmt(f.ks), fmt(f.count)]);
    if (doc.predictions) {
      const p = doc.predictions;
      rows.unshift(["predictions", p.status, fmt(p.psi), fmt(p.ks), fmt(p.count)]);
    }
    parts.push(el("p", {}, [el("span", { text: "Window " + fmt(doc.window) + " instances; " + fmt(doc.dropped) +
      " dropped, " + fmt(doc.unparseable) + " unparseable." })]));
    if (rows.length) parts.push(table(["feature", "status", "PSI", "KS", "count"], rows.slice(0, 100)));
    fill($("drift"), ...parts);
  }

  // -- charts (plain SVG) ----------------------------------------------------------------------
  function clock(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

  // series: [{cls, points: [[t, v or null]]}], bands: [{cls, points: [[t, lo, hi]]}]
  function drawChart(box, series, bands, opts) {
    // Drawn at the box's own width, one unit a pixel, so the text keeps its size on any screen.
    const W = Math.max(280, Math.round(box.clientWidth || 640)), H = W < 500 ? 180 : 220;
    const L = 56, R = 12, T = 10, B = 24;
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": opts.label });
    const ts = [];
    for (const s of series) for (const p of s.points) ts.push(p[0]);
    if (ts.length < 2) {
      root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty",
        text: "A point every " + state.interval + " s: the chart starts with the second one." }));
      fill(box, root);
      return;
    }
    const t0 = Math.min(...ts), t1 = Math.max(...ts);
    let top = 0;
    for (const s of series) for (const p of s.points) if (p[1] !== null) top = Math.max(top, p[1]);
    for (const b of bands) for (const p of b.points) if (p[2] !== null) top = Math.max(top, p[2]);
    if (opts.threshold !== undefined && opts.threshold !== null) top = Math.max(top, opts.threshold);
    if (opts.cap !== undefined) top = Math.min(top, opts.cap);
    if (!(top > 0)) top = opts.cap || 1;
    top *= 1.08;
    const x = (t) => L + ((t - t0) / Math.max(t1 - t0, 1e-9)) * (W - L - R);
    const y = (v) => T + (1 - Math.min(v, top) / top) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4;
      root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", text: opts.tick(v) }));
    }
    root.append(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
    root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    for (const [t, anchor] of [[t0, "start"], [(t0 + t1) / 2, "middle"], [t1, "end"]]) {
      root.append(svg("text", { x: x(t), y: H - 6, "text-anchor": anchor, text: clock(t) }));
    }
    for (const b of bands) {
      // One shape per run of points with a band; a lone point gets a bar of its own.
      const runs = [[]];
      for (const p of b.points) {
        if (p[1] === null || p[2] === null) { if (runs[runs.length - 1].length) runs.push([]); }
        else runs[runs.length - 1].push(p);
      }
      for (const pts of runs) {
        if (!pts.length) continue;
        if (pts.length === 1) {
          const [t, lo, hi] = pts[0];
          root.append(svg("rect", { x: x(t) - 3, y: y(hi), width: 6, height: Math.max(1, y(lo) - y(hi)),
            class: "band " + b.cls }));
          continue;
        }
        const upper = pts.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + "," + y(p[2]).toFixed(1));
        const lower = pts.slice().reverse().map((p) => "L" + x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1));
        root.append(svg("path", { d: upper.join("") + lower.join("") + "Z", class: "band " + b.cls }));
      }
    }
    if (opts.threshold !== undefined && opts.threshold !== null && opts.threshold <= top) {
      root.append(svg("line", { x1: L, x2: W - R, y1: y(opts.threshold), y2: y(opts.threshold),
        class: "s-threshold" }));
    }
    for (const s of series) {
      let d = "", pen = false;
      s.points.forEach(([t, v], i) => {
        if (v === null) { pen = false; return; }
        const next = s.points[i + 1];
        if (!pen && (!next || next[1] === null)) {  // a lone point: a dot, not an invisible line
          root.append(svg("circle", { cx: x(t), cy: y(v), r: 2.5, class: "dot " + s.cls }));
        }
        d += (pen ? "L" : "M") + x(t).toFixed(1) + "," + y(v).toFixed(1);
        pen = true;
      });
      if (d) root.append(svg("path", { d: d, class: s.cls }));
    }
    fill(box, root);
  }

  function legend(box, items) {
    fill(box, ...items.map(([cls, text]) => el("span", {}, [el("span", { cls: "sw " + cls }), text])));
  }

  function renderCharts() {
    const view = state.view;
    const pts = state.history;
    const lat = (series, q) => pts.map((p) => {
      const b = p[view].latency_ms[series];
      return [p.t, b.count > 0 ? b[q] : null];
    });
    drawChart($("latency-chart"), [
      { cls: "s-prod", points: lat("production", "p50") },
      { cls: "s-prod s-dash", points: lat("production", "p99") },
      { cls: "s-cand", points: lat("candidate", "p50") },
      { cls: "s-cand s-dash", points: lat("candidate", "p99") },
    ], [], { label: "latency percentiles over time", tick: (v) => fmt(v, 3) });
    legend($("latency-legend"), [
      ["c-prod", "production p50"], ["c-prod dash", "production p99"],
      ["c-cand", "candidate p50"], ["c-cand dash", "candidate p99"],
    ]);

    const rate = (key) => pts.map((p) => {
      const f = p[key];
      return [p.t, f.agree + f.disagree > 0 ? f.disagreement_rate : null];
    });
    const band = (key) => pts.map((p) => {
      const f = p[key];
      return f.agree + f.disagree > 0 ? [p.t, f.disagreement_rate_ci95[0], f.disagreement_rate_ci95[1]]
        : [p.t, null, null];
    });
    let threshold = null;
    for (const g of (state.verdict && state.verdict.gates) || []) {
      if (g.name === "max_disagreement_rate") threshold = g.threshold;
    }
    const cls = view === "window" ? "s-win" : "s-cum";
    drawChart($("disagreement-chart"), [{ cls: cls, points: rate(view) }], [{ cls: cls, points: band(view) }],
      { label: "disagreement rate over time", tick: (v) => fmt(v * 100, 3) + "%", threshold: threshold, cap: 1 });
    legend($("disagreement-legend"), [
      [view === "window" ? "c-win" : "c-cum", (view === "window" ? "per 5 s window" : "cumulative") +
        ": rate and 95% interval"],
      ["c-threshold dash", "gate threshold"],
    ]);
  }

  function setView(view) {
    state.view = view;
    for (const v of ["window", "cumulative"]) {
      const b = $("view-" + v);
      b.classList.toggle("on", v === view);
      b.setAttribute("aria-pressed", String(v === view));
    }
    renderCharts();
  }

  // -- the sample-rate control -----------------------------------------------------------------
  function showRate(rate) {
    $("rate-current").textContent = rate === null || rate === undefined ? "—" : String(rate);
    const input = $("rate-input");
    if (!state.rateDirty && document.activeElement !== input && rate !== null && rate !== undefined) {
      input.value = String(rate);
    }
  }

  function message(text, ok) {
    const box = $("rate-message");
    box.textContent = text;
    box.className = "message " + (ok ? "ok" : "err");
  }

  async function applyRate() {
    const typed = $("token-input").value;
    if (typed) sessionStorage.setItem(TOKEN_KEY, typed);
    $("token-input").value = "";
    $("token-input").placeholder = token() ? "kept for this tab" : "not needed without admin.token";
    const rate = Number($("rate-input").value);
    if ($("rate-input").value === "" || !Number.isFinite(rate) || rate < 0 || rate > 1) {
      message("The rate must be a number from 0 to 1.", false);
      return;
    }
    const headers = { "Content-Type": "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    try {
      const answer = await fetch("/shadow/sample_rate", {
        method: "PUT", headers: headers, body: JSON.stringify({ sample_rate: rate }), cache: "no-store",
      });
      let body = {};
      try { body = await answer.json(); } catch (e) { body = {}; }
      if (answer.ok) {
        state.rateDirty = false;
        message("Applied: the proxy now mirrors " + pct(body.sample_rate) + " of requests.", true);
        showRate(body.sample_rate);
      } else if (answer.status === 401) {
        message("Refused (401): the admin token is missing or wrong.", false);
      } else {
        message("Refused (" + answer.status + "): " + (body.error || "no reason given"), false);
      }
    } catch (e) {
      message("Could not reach the proxy: " + e.message, false);
    }
  }

  // -- the loop --------------------------------------------------------------------------------
  async function pollHistory() {
    const last = state.history.length ? state.history[state.history.length - 1].t : null;
    const doc = await getJSON("/shadow/history" + (last === null ? "" : "?since=" + last));
    state.interval = doc.interval_s;
    state.capacity = doc.capacity;
    if (doc.points.length) {
      state.history = state.history.concat(doc.points).slice(-state.capacity);
      return true;
    }
    return false;
  }

  async function pollDrift(now) {
    if (state.drift === null || now - state.lastDrift < DRIFT_MS) return;
    state.lastDrift = now;
    const doc = await getJSON("/shadow/drift");
    state.drift = doc;
    renderDrift(doc);
  }

  async function poll() {
    if (document.hidden) return;
    try {
      const [stats, verdict, rate] = await Promise.all([
        getJSON("/shadow/stats"), getJSON("/shadow/verdict"), getJSON("/shadow/sample_rate"),
      ]);
      state.stats = stats;
      state.verdict = verdict;
      renderVerdict(verdict);
      renderFunnel(stats);
      renderLatency(stats);
      renderComparison(stats);
      renderExtras(stats);
      showRate(rate.sample_rate);
      const now = Date.now();
      if (await pollHistory() || !$("latency-chart").firstChild) renderCharts();
      await pollDrift(now);
      state.failures = 0;
      const status = $("status");
      status.textContent = "updated " + new Date().toTimeString().slice(0, 8);
      status.classList.remove("stale");
    } catch (e) {
      state.failures += 1;
      const status = $("status");
      status.textContent = "no answer from the proxy (" + e.message + ")";
      status.classList.add("stale");
    }
  }

  async function loop() {
    const started = Date.now();
    await poll();
    setTimeout(loop, Math.max(100, POLL_MS - (Date.now() - started)));
  }

  async function start() {
    const info = await getJSON("/page/features.json").catch(() => ({}));
    if (!info.drift) state.drift = null;
    $("view-window").addEventListener("click", () => setView("window"));
    $("view-cumulative").addEventListener("click", () => setView("cumulative"));
    $("rate-apply").addEventListener("click", applyRate);
    $("rate-input").addEventListener("input", () => { state.rateDirty = true; });
    $("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("token-input").value = "";
      $("token-input").placeholder = "not needed without admin.token";
      message("Token forgotten.", true);
    });
    if (token()) $("token-input").placeholder = "kept for this tab";
    document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(renderCharts, 150);
    });
    loop();
  }

  document.addEventListener("DOMContentLoaded", start);
})();

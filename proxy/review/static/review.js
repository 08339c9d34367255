/* shadowproxy review page: list, sample, labels, summary; the Builds view's routing (its views
 * are builds.js's). Plain JS, no dependencies, offline.
 *
 * Rules kept throughout: data is only ever written with textContent / attributes (never
 * innerHTML), every call rides on the session cookie (credentials: "same-origin"), every POST
 * sends X-CSRF-Token, and nothing secret goes into a URL (the hash holds filters and ids only).
 */
"use strict";

(function () {
  const SVGNS = "http://www.w3.org/2000/svg";
  const PAGE = 200; // rows per list request
  const KEY_VERDICT = { a: "acceptable", r: "regression", n: "needs-look" };
  const FILTER_KEYS = ["sort", "model", "candidate", "output", "metric", "label",
    "min_severity", "max_severity", "since", "until"];
  const SEVERITY_CAP = 1e9;

  // ---------------------------------------------------------------- helpers

  const $ = (id) => document.getElementById(id);

  /** Build an element: h("td", {class: "x", title: "t"}, "text", child, ...). Text is escaped. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVGNS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "dataset") Object.assign(el.dataset, v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return el;
  }

  function fmtNum(x) {
    if (x === null || x === undefined) return "—";
    if (typeof x !== "number") return String(x);
    if (!isFinite(x)) return String(x);
    if (x === 0) return "0";
    const a = Math.abs(x);
    if (a >= SEVERITY_CAP) return (x < 0 ? "-" : "") + "1e9 (cap)";
    if (a >= 1e5 || a < 1e-3) return x.toExponential(2);
    if (Number.isInteger(x)) return String(x);
    return String(Number(x.toPrecision(4)));
  }

  function pct(x) {
    if (x === null || x === undefined) return "—";
    const v = x * 100;
    return (v >= 10 || v === 0 ? v.toFixed(0) : v < 0.1 ? v.toFixed(2) : v.toFixed(1)) + "%";
  }

  const pad2 = (n) => String(n).padStart(2, "0");

  function fmtTime(ts) {
    if (ts === null || ts === undefined) return "—";
    const d = new Date(ts * 1000);
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ` +
      `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  function fmtClock(ts) {
    const d = new Date(ts * 1000);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  }

  function ago(ts) {
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 60) return "just now";
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function isoUtc(ts) {
    return new Date(ts * 1000).toISOString().replace(".000Z", "Z");
  }

  /** A severity class by decade: the scale differs per metric, the decades read the same. */
  function sevClass(sev) {
    if (sev === null || sev === undefined) return "sev-none";
    if (sev <= 0) return "sev-zero";
    if (sev < 1e-3) return "sev-low";
    if (sev < 1e-1) return "sev-mid";
    if (sev < 10) return "sev-high";
    return "sev-severe";
  }

  function sevBadge(sev) {
    return h("span", { class: "sev " + sevClass(sev), title: sev === null ? "" : String(sev) },
      fmtNum(sev));
  }

  /** Severity over the verdict's own threshold (1 = at it), one scale for every metric; the
   * comparator's raw number beside it. Older samples without one show the raw number. */
  function normSevClass(norm) {
    if (norm <= 0) return "sev-zero";
    if (norm < 1) return "sev-low";
    if (norm < 3) return "sev-mid";
    if (norm < 10) return "sev-high";
    return "sev-severe";
  }

  function normSev(obj) {
    const norm = obj && obj.severity_norm;
    if (norm === null || norm === undefined) return sevBadge(obj ? obj.severity : null);
    const raw = obj.severity;
    return h("span", null,
      h("span", { class: "sev " + normSevClass(norm),
        title: `${norm} x its threshold; raw ${raw}` +
          (obj.noise_p !== undefined ? `; A/A p ${obj.noise_p}` : "") },
        fmtNum(norm) + "\u00d7"),
      " ", h("span", { class: "muted raw-sev", title: "the comparator's own severity" },
        fmtNum(raw)));
  }

  function labelBadge(label) {
    if (!label) return h("span", { class: "badge unlabelled" }, "unlabelled");
    const title = `${label.verdict} by ${label.by || "?"} at ${fmtTime(label.at)}` +
      (label.note ? ` — ${label.note}` : "");
    return h("span", { class: "badge verdict-" + label.verdict, title }, label.verdict);
  }

  /** An output's severity on one scale: normalized where known, else raw. */
  function sevKey(o) {
    return (o.severity_norm !== undefined ? o.severity_norm : o.severity) || 0;
  }

  /** The output a reviewer should look at first: flagged before not, then most severe. */
  function worstOutput(item) {
    const outs = (item.outputs || []).slice();
    outs.sort((a, b) => (b.flagged - a.flagged) || (sevKey(b) - sevKey(a)));
    return outs[0] || null;
  }

  function headlineText(out) {
    if (!out) return "";
    const v = out.scores ? out.scores[out.headline] : undefined;
    return out.headline ? `${out.headline} ${fmtNum(v)}` : "";
  }

  let toastTimer = 0;
  function toast(text, kind) {
    const t = $("toast");
    t.textContent = text;
    t.className = "toast " + (kind || "");
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, kind === "error" ? 6000 : 2200);
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  let csrf = "";

  async function api(path, opts) {
    opts = opts || {};
    const init = { method: opts.method || "GET", credentials: "same-origin",
      headers: { Accept: "application/json" }, cache: "no-store" };
    if (init.method !== "GET") {
      init.headers["X-CSRF-Token"] = csrf;
      if (opts.body !== undefined) {
        init.headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(opts.body);
      }
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "the admin plane did not answer (" + e.message + ")");
    }
    if (resp.status === 401 && !opts.allow401) {
      // The session ended (expired, logged out elsewhere): /review then serves the login form.
      location.replace("/review" + location.hash);
      throw new ApiError(401, "signed out");
    }
    let data = null;
    const ctype = resp.headers.get("Content-Type") || "";
    if (ctype.includes("json")) {
      try { data = await resp.json(); } catch (e) { data = null; }
    }
    if (!resp.ok) {
      const msg = (data && data.error) || `${resp.status} ${resp.statusText}`;
      throw new ApiError(resp.status, msg);
    }
    return { data, resp };
  }

  // ---------------------------------------------------------------- login page

  function initLogin(form) {
    const err = $("login-error");
    const button = $("login-submit");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      err.hidden = true;
      button.disabled = true;
      const token = $("login-token").value.trim();
      try {
        const resp = await fetch("/login", {
          method: "POST", credentials: "same-origin", cache: "no-store",
          headers: { "Content-Type": "application/json", Accept: "application/json" },
          body: JSON.stringify({ token }),
        });
        if (resp.ok) {
          $("login-token").value = "";
          if (location.pathname.endsWith("/review")) location.reload();
          else location.assign("/review");
          return;
        }
        let msg = resp.status === 401 ? "That token was not accepted." : `Sign-in failed (${resp.status}).`;
        try {
          const body = await resp.json();
          if (body && body.error && resp.status !== 401) msg += " " + body.error;
        } catch (e) { /* not JSON */ }
        err.textContent = msg;
        err.hidden = false;
      } catch (e) {
        err.textContent = "The admin plane did not answer: " + e.message;
        err.hidden = false;
      } finally {
        button.disabled = false;
      }
    });
  }

  // ---------------------------------------------------------------- state and routing

  const state = {
    me: null,
    view: "list",
    filters: { sort: "severity" },
    items: [], // loaded list rows, in list order
    total: 0,
    listGen: 0, // drops answers to superseded list requests
    listLoading: null, // promise of the page being fetched
    selected: 0, // index into items (the list's cursor)
    sampleId: null,
    sampleIndex: -1,
    sampleGen: 0,
    labelling: false,
    cache: new Map(), // id -> Promise<{sample, tensors}>
    summaryLoaded: false,
    buildsPath: "", // the Builds view's place: "" (every build), an id, or "diff/A/B"
  };

  function filtersToParams(f) {
    const p = new URLSearchParams();
    for (const k of FILTER_KEYS) {
      const v = f[k];
      if (v === undefined || v === null || v === "") continue;
      if (k === "sort" && v === "severity") continue;
      p.set(k, v);
    }
    return p;
  }

  function hashFor(view, id) {
    const q = filtersToParams(state.filters).toString();
    const path = view === "sample" ? "/sample/" + encodeURIComponent(id)
      : view === "builds" && state.buildsPath ? "/builds/" + state.buildsPath : "/" + view;
    return "#" + path + (q ? "?" + q : "");
  }

  function parseHash() {
    const raw = location.hash.replace(/^#/, "");
    const [path, query] = raw.split("?", 2);
    const params = new URLSearchParams(query || "");
    const filters = { sort: "severity" };
    for (const k of FILTER_KEYS) if (params.get(k)) filters[k] = params.get(k);
    if (filters.sort !== "time") filters.sort = "severity";
    const m = /^\/sample\/(.+)$/.exec(path || "");
    if (m) return { view: "sample", id: decodeURIComponent(m[1]), filters };
    if (path === "/summary") return { view: "summary", filters };
    // ids and "diff/A/B" stay URL-encoded here: builds.js decodes each part itself
    const b = /^\/builds(?:\/(.+))?$/.exec(path || "");
    if (b) return { view: "builds", sub: b[1] || "", filters };
    return { view: "list", filters };
  }

  function writeHash(push) {
    const hash = hashFor(state.view, state.sampleId);
    if (hash === location.hash) return;
    if (push) history.pushState(null, "", hash);
    else history.replaceState(null, "", hash);
  }

  function showView(view) {
    state.view = view;
    for (const v of ["list", "sample", "summary", "builds"]) $(v + "-view").hidden = v !== view;
    $("tab-list").classList.toggle("active", view === "list" || view === "sample");
    $("tab-summary").classList.toggle("active", view === "summary");
    $("tab-builds").classList.toggle("active", view === "builds");
    document.body.dataset.view = view;
  }

  function applyRoute() {
    const route = parseHash();
    const filtersChanged = JSON.stringify(route.filters) !== JSON.stringify(state.filters);
    state.filters = route.filters;
    fillFilterForm();
    if (filtersChanged || (!state.items.length && !state.listLoading)) loadList(true);
    if (route.view === "sample") {
      openSample(route.id, { push: null });
    } else if (route.view === "summary") {
      showView("summary");
      loadSummary(false);
    } else if (route.view === "builds" && Builds) {
      showBuilds(route.sub, null);
    } else {
      showView("list");
      highlightSelected(true);
    }
  }

  // ---------------------------------------------------------------- list view

  function fillFilterForm() {
    const form = $("filters");
    for (const k of FILTER_KEYS) {
      const el = form.elements[k];
      if (!el) continue;
      let v = state.filters[k] || "";
      if ((k === "since" || k === "until") && v) v = toLocalInput(Number(v));
      if (k === "sort" && !v) v = "severity";
      el.value = v;
    }
  }

  function toLocalInput(ts) {
    const d = new Date(ts * 1000);
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}T` +
      `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  function readFilterForm() {
    const form = $("filters");
    const f = {};
    for (const k of FILTER_KEYS) {
      const el = form.elements[k];
      if (!el) continue;
      let v = el.value.trim();
      if ((k === "since" || k === "until") && v) {
        const ms = new Date(v).getTime(); // datetime-local parses as local time
        v = isFinite(ms) ? String(Math.floor(ms / 1000)) : "";
      }
      if (v) f[k] = v;
    }
    if (!f.sort) f.sort = "severity";
    return f;
  }

  let filterTimer = 0;
  function onFiltersChanged(delay) {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      const f = readFilterForm();
      if (JSON.stringify(f) === JSON.stringify(state.filters)) return;
      state.filters = f;
      writeHash(false);
      loadList(true);
    }, delay);
  }

  function loadList(reset) {
    if (reset) {
      state.listGen += 1;
      state.items = [];
      state.total = 0;
      state.selected = 0;
      state.listLoading = null;
      clear($("samples-body"));
      $("list-count").textContent = "Loading…";
      $("load-more").hidden = true;
    }
    if (state.listLoading) return state.listLoading;
    const gen = state.listGen;
    const params = filtersToParams(state.filters);
    params.set("flagged", "1");
    params.set("sort", state.filters.sort || "severity");
    params.set("limit", String(PAGE));
    params.set("offset", String(state.items.length));
    $("list-error").hidden = true;
    const p = api("/api/samples?" + params.toString())
      .then(({ data, resp }) => {
        if (gen !== state.listGen) return;
        const rows = Array.isArray(data) ? data : [];
        const header = resp.headers.get("X-Total-Count");
        const start = state.items.length;
        state.items.push(...rows);
        state.total = header !== null ? Number(header) : state.items.length;
        appendRows(rows, start);
        updateListInfo(rows.length === 0);
        addDatalistValues(rows);
        if (reset || start === 0) highlightSelected(false);
      })
      .catch((e) => {
        if (gen !== state.listGen || e.status === 401) return;
        $("list-error").textContent = "Could not load samples: " + e.message;
        $("list-error").hidden = false;
        $("list-count").textContent = "";
      })
      .finally(() => { if (gen === state.listGen) state.listLoading = null; });
    state.listLoading = p;
    return p;
  }

  function hasMore() {
    return state.items.length < state.total;
  }

  function updateListInfo(lastWasEmpty) {
    const n = state.items.length;
    const total = state.total;
    const label = state.filters.sort === "time" ? "newest first" : "most severe first";
    $("list-count").textContent = total === 0
      ? "No flagged samples match."
      : `${n.toLocaleString()} of ${total.toLocaleString()} flagged samples, ${label}`;
    const more = hasMore() && !lastWasEmpty;
    $("load-more").hidden = !more;
    $("load-more").textContent = more
      ? `Load ${Math.min(PAGE, total - n).toLocaleString()} more` : "Load more";
    if (lastWasEmpty) state.total = n; // the store shrank under us (TTL): stop paging
  }

  function appendRows(rows, start) {
    const frag = document.createDocumentFragment();
    rows.forEach((item, i) => frag.appendChild(buildRow(item, start + i)));
    $("samples-body").appendChild(frag);
  }

  function buildRow(item, index) {
    const worst = worstOutput(item);
    const cand = [item.candidate || "?"];
    if (item.noise_floor) cand.push(" ", h("span", { class: "tag", title: "A/A noise floor twin" }, "A/A"));
    const tr = h("tr", { dataset: { index: String(index), id: item.id } },
      h("td", { class: "c-time", title: isoUtc(item.ts) }, fmtTime(item.ts)),
      h("td", null, cand),
      h("td", null, item.model || ""),
      h("td", { class: "c-out" }, worst
        ? [h("span", { class: "out-name" }, worst.output), " ",
          h("span", { class: "muted" }, worst.metric || ""), " ",
          h("span", { class: "mono" }, headlineText(worst))]
        : h("span", { class: "muted" }, item.outcome || "")),
      h("td", { class: "c-sev" }, normSev(item)),
      LLM && LLM.isLLMProtocol(item.protocol)
        // two lines more: the opening of both answers, read when the row comes into view
        ? h("td", { class: "c-reason llm-row", title: item.reason || "" },
          h("div", { class: "reason-line" }, item.reason || ""), LLM.listSnippet(item))
        : h("td", { class: "c-reason", title: item.reason || "" }, item.reason || ""),
      h("td", { class: "c-label" }, labelBadge(item.label)),
      h("td", { class: "c-rid mono", title: item.request_id || "" }, item.request_id || ""));
    return tr;
  }

  function rowAt(index) {
    return $("samples-body").children[index] || null;
  }

  function updateRowLabel(index) {
    const tr = rowAt(index);
    if (!tr) return;
    const cell = tr.querySelector(".c-label");
    clear(cell).appendChild(labelBadge(state.items[index].label));
  }

  function highlightSelected(scroll) {
    const body = $("samples-body");
    const old = body.querySelector("tr.selected");
    if (old) { old.classList.remove("selected"); old.removeAttribute("aria-selected"); }
    const tr = rowAt(state.selected);
    if (!tr) return;
    tr.classList.add("selected");
    tr.setAttribute("aria-selected", "true");
    if (scroll && state.view === "list") tr.scrollIntoView({ block: "nearest" });
  }

  async function moveSelection(delta) {
    let next = state.selected + delta;
    if (next >= state.items.length && hasMore()) await loadList(false);
    next = Math.max(0, Math.min(state.items.length - 1, next));
    if (next < 0) return;
    state.selected = next;
    highlightSelected(true);
    // keep a page ahead while walking down
    if (state.items.length - next < 20 && hasMore()) loadList(false);
  }

  const datalistSeen = { model: new Set(), candidate: new Set(), output: new Set(), metric: new Set() };
  function addDatalist(kind, value) {
    if (!value || datalistSeen[kind].has(value)) return;
    datalistSeen[kind].add(value);
    $("dl-" + kind).appendChild(h("option", { value }));
  }

  function addDatalistValues(rows) {
    for (const it of rows) {
      addDatalist("model", it.model);
      addDatalist("candidate", it.candidate);
      for (const o of it.outputs || []) {
        addDatalist("output", o.output);
        addDatalist("metric", o.metric);
      }
    }
  }

  // ---------------------------------------------------------------- sample view

  // The LLM view (review_llm.js, loaded first on the review page only): built on this file's
  // helpers, so it escapes and formats as the rest of the page does.
  const LLM = typeof window.ShadowReviewLLM === "function"
    ? window.ShadowReviewLLM({ h, s, clear, fmtNum, prettyJson, diffChars, legend, api })
    : null;

  /** `protocol` (from the list row, when known): an LLM sample has no tensors to fetch. */
  function fetchSample(id, protocol) {
    let p = state.cache.get(id);
    if (!p) {
      const enc = encodeURIComponent(id);
      const noTensors = LLM && LLM.isLLMProtocol(protocol);
      p = Promise.all([
        api("/api/samples/" + enc).then((r) => r.data),
        noTensors ? null : api("/api/samples/" + enc + "/tensors").then((r) => r.data, (e) => ({ error: e })),
      ]).then(([sample, tensors]) => ({ sample, tensors }));
      p.catch(() => state.cache.delete(id));
      state.cache.set(id, p);
      if (state.cache.size > 40) state.cache.delete(state.cache.keys().next().value);
    }
    return p;
  }

  async function openIndex(index, push) {
    if (index >= state.items.length && hasMore()) await loadList(false);
    if (index < 0 || index >= state.items.length) return false;
    state.selected = index;
    highlightSelected(false);
    await openSample(state.items[index].id, { push, index });
    if (state.items.length - index < 20 && hasMore()) loadList(false);
    return true;
  }

  /** Show sample `id`; push: true (new history entry), false (replace), null (leave the URL). */
  async function openSample(id, opts) {
    const gen = ++state.sampleGen;
    // Show the sample view before waiting on the list: a reload of a sample URL is in the sample
    // view at once, so Escape pressed while the list still loads goes back instead of being lost.
    showView("sample");
    $("sample-view").classList.add("loading");
    let index = opts && opts.index !== undefined ? opts.index : -1;
    if (index < 0) {
      if (state.listLoading) await state.listLoading;
      index = state.items.findIndex((it) => it.id === id);
    }
    if (gen !== state.sampleGen) return;
    state.sampleId = id;
    state.sampleIndex = index;
    if (index >= 0) { state.selected = index; highlightSelected(false); }
    if (opts && opts.push !== null && opts.push !== undefined) writeHash(opts.push);
    $("sample-view").dataset.sampleId = id;
    $("sample-error").hidden = true;
    updatePosition();
    try {
      const { sample, tensors } = await fetchSample(id, index >= 0 ? state.items[index].protocol : undefined);
      if (gen !== state.sampleGen) return;
      if (index >= 0 && state.items[index] && sample.label === null && state.items[index].label) {
        sample.label = state.items[index].label; // labelled here after it was cached
      }
      renderSample(sample, tensors);
      $("sample-content").hidden = false;
      window.scrollTo(0, 0);
    } catch (e) {
      if (gen !== state.sampleGen || e.status === 401) return;
      $("sample-content").hidden = true;
      $("sample-error").textContent = e.status === 404
        ? `Sample ${id} is gone (expired or unknown).`
        : "Could not load the sample: " + e.message;
      $("sample-error").hidden = false;
    } finally {
      if (gen === state.sampleGen) $("sample-view").classList.remove("loading");
    }
    // prefetch the next one so j / a / r / n feel instant
    const nxt = state.items[index + 1];
    if (nxt) fetchSample(nxt.id, nxt.protocol).catch(() => {});
  }

  function updatePosition() {
    const i = state.sampleIndex;
    $("position").textContent = i >= 0
      ? `${(i + 1).toLocaleString()} of ${state.total.toLocaleString()}`
      : "not in the current list";
    $("prev").disabled = i <= 0;
    $("next").disabled = i < 0 ? !state.items.length : (i >= state.items.length - 1 && !hasMore());
  }

  function renderSample(sm, tensors) {
    $("sample-sev").textContent = "";
    $("sample-sev").appendChild(h("span", { class: "muted" }, "severity "));
    $("sample-sev").appendChild(normSev(sm));
    const title = $("sample-title");
    clear(title);
    append(title, [
      h("span", { class: "cand" }, sm.candidate || "?"),
      sm.noise_floor ? [" ", h("span", { class: "tag" }, "A/A noise floor")] : null,
      h("span", { class: "muted" }, " vs reference · "), sm.model || "",
    ]);
    const meta = $("sample-meta");
    clear(meta);
    append(meta, [
      "request ", h("span", { class: "mono", id: "sample-request-id" }, sm.request_id || "—"),
      " · ", h("span", { title: isoUtc(sm.ts) }, fmtTime(sm.ts)),
      " · outcome ", sm.outcome || "—",
      " · sample ", h("span", { class: "mono" }, sm.id),
    ]);
    $("sample-reason").textContent = sm.reason || "(no reason recorded)";
    renderLabelPanel(sm.label);
    const llm = !!(LLM && LLM.isLLM(sm));
    $("sample-content").classList.toggle("llm-sample", llm);
    $("llm").hidden = !llm;
    if (llm) LLM.render($("llm"), sm); else clear($("llm"));
    renderSides(sm);
    renderScores(sm);
    if (llm) clear($("plots")); else renderPlots(sm, tensors);
    renderRequest(sm.payloads || {});
    renderRaw(sm.payloads || {}, llm);
  }

  function renderLabelPanel(label) {
    const canLabel = state.me && state.me.role !== "viewer";
    for (const b of document.querySelectorAll("#label-panel .lbl")) {
      b.disabled = !canLabel || state.labelling;
      b.classList.toggle("current", !!label && label.verdict === b.dataset.verdict);
    }
    $("label-note").disabled = !canLabel;
    $("label-readonly").hidden = canLabel;
    $("label-note").value = label && label.note ? label.note : "";
    const cur = clear($("label-current"));
    if (label) {
      append(cur, ["Labelled ", labelBadge(label), " by ", h("strong", null, label.by || "?"), " ",
        h("span", { title: isoUtc(label.at) }, `${ago(label.at)} (${fmtTime(label.at)})`),
        label.note ? [" — ", h("q", null, label.note)] : null]);
    } else {
      append(cur, [h("span", { class: "muted" }, "Not labelled yet.")]);
    }
  }

  function renderSides(sm) {
    const ref = sm.reference || {};
    const cand = sm.candidate_side || {};
    const rows = (side, other) => [
      ["upstream", side.upstream],
      ["model", side.model],
      ["version", side.version, side.version !== other.version],
      ["status", side.status, side.status !== 200],
      ["latency", side.latency_ms === undefined || side.latency_ms === null ? "—"
        : `${fmtNum(side.latency_ms)} ms`],
    ];
    const card = (el, title, side, other, cls) => {
      clear(el);
      el.className = "side " + cls;
      const dl = h("dl", null);
      for (const [k, v, warn] of rows(side, other)) {
        dl.appendChild(h("dt", null, k));
        dl.appendChild(h("dd", { class: warn ? "warn" : null }, v === undefined || v === null ? "—" : String(v)));
      }
      append(el, [h("h3", null, title), dl]);
    };
    card($("side-reference"), "Reference", ref, cand, "ref");
    card($("side-candidate"), `Candidate · ${sm.candidate || "?"}`, cand, ref, "cand");
    if (typeof ref.latency_ms === "number" && typeof cand.latency_ms === "number" && ref.latency_ms > 0) {
      const d = (cand.latency_ms - ref.latency_ms) / ref.latency_ms;
      const dd = $("side-candidate").querySelectorAll("dd")[4];
      dd.appendChild(h("span", { class: d <= 0 ? "good" : "warn" }, ` (${d > 0 ? "+" : ""}${(d * 100).toFixed(0)}%)`));
    }
  }

  function renderScores(sm) {
    const box = clear($("scores"));
    const outs = (sm.outputs || []).slice().sort((a, b) =>
      (b.flagged - a.flagged) || (sevKey(b) - sevKey(a)));
    if (!outs.length) {
      box.appendChild(h("p", { class: "muted" }, `No per-output scores (outcome: ${sm.outcome}).`));
      return;
    }
    const grid = h("div", { class: "score-grid" });
    for (const o of outs) {
      const t = h("table", { class: "scores" },
        h("caption", null,
          h("span", { class: "out-name" }, o.output), " ",
          h("span", { class: "muted" }, o.metric || ""), " ",
          o.flagged ? h("span", { class: "flag" }, "flagged") : h("span", { class: "okflag" }, "ok"),
          " ", normSev(o),
          o.validity && o.validity !== "ok" ? [" ", h("span", { class: "warn" }, "validity: " + o.validity)] : null));
      const body = h("tbody");
      const names = Object.keys(o.scores || {});
      names.sort((a, b) => (b === o.headline) - (a === o.headline));
      for (const name of names) {
        body.appendChild(h("tr", { class: name === o.headline ? "headline" : null },
          h("th", null, name), h("td", { class: "mono", title: String(o.scores[name]) }, fmtNum(o.scores[name]))));
      }
      t.appendChild(body);
      const card = h("div", { class: "score-card" + (o.flagged ? " flagged" : "") }, t);
      if (o.reason) card.appendChild(h("p", { class: "out-reason" }, o.reason));
      grid.appendChild(card);
    }
    box.appendChild(grid);
  }

  function renderRequest(p) {
    const box = clear($("request"));
    const req = p.request;
    if (!req) box.appendChild(h("p", { class: "muted" }, "The request body was not stored."));
    else if (req.protocol === "v2_grpc") {
      // A protobuf ModelInferRequest, read back as JSON (tensors as their first values).
      box.appendChild(h("p", { class: "note" }, "Came over gRPC (ModelInferRequest, shown as JSON)."));
      box.appendChild(prettyJson(req.json));
    } else if ("json" in req) box.appendChild(prettyJson(req.json));
    else if ("base64" in req) {
      box.appendChild(h("p", { class: "note" },
        `Binary body, ${(req.bytes || 0).toLocaleString()} bytes (e.g. Triton binary tensors): ` +
        "not shown here, only its size."));
    }
    if (Array.isArray(p.request_headers) && p.request_headers.length) {
      box.appendChild(h("details", null, h("summary", null, "request headers"),
        headersTable(p.request_headers)));
    }
  }

  /** JSON indented by 2, but arrays of plain values (tensor data, shapes) kept on one line. */
  function jsonText(v, indent) {
    if (v === null || typeof v !== "object") return JSON.stringify(v);
    const pad = "  ".repeat(indent + 1), end = "  ".repeat(indent);
    if (Array.isArray(v)) {
      if (!v.length) return "[]";
      if (v.every((x) => x === null || typeof x !== "object")) return "[" + v.map((x) => JSON.stringify(x)).join(", ") + "]";
      return "[\n" + v.map((x) => pad + jsonText(x, indent + 1)).join(",\n") + "\n" + end + "]";
    }
    const keys = Object.keys(v);
    if (!keys.length) return "{}";
    return "{\n" + keys.map((k) => pad + JSON.stringify(k) + ": " + jsonText(v[k], indent + 1)).join(",\n") + "\n" + end + "}";
  }

  function prettyJson(value) {
    let text = jsonText(value, 0);
    const limit = 200000;
    const cut = text.length > limit;
    if (cut) text = text.slice(0, limit);
    return h("div", null, h("pre", { class: "json" }, text),
      cut ? h("p", { class: "note" }, `Shown: the first ${limit.toLocaleString()} characters.`) : null);
  }

  function headersTable(rows) {
    const t = h("table", { class: "headers" });
    for (const [k, v] of rows) t.appendChild(h("tr", null, h("th", null, k), h("td", { class: "mono" }, v)));
    return t;
  }

  /** `llm`: a body that is not JSON is an event stream, shown as text. */
  function renderRaw(p, llm) {
    const box = clear($("raw"));
    const body = (b) => !b ? h("p", { class: "muted" }, "not stored")
      : "json" in b ? prettyJson(b.json)
        : llm && "base64" in b ? LLM.textBody(b)
          : h("p", { class: "note" }, `binary, ${(b.bytes || 0).toLocaleString()} bytes`);
    const col = (name, b, hd) => h("div", { class: "side" }, h("h3", null, name), body(b),
      Array.isArray(hd) ? headersTable(hd) : null);
    box.appendChild(h("div", { class: "sides" },
      col("Reference answer", p.reference_body, p.reference_headers),
      col("Candidate answer", p.candidate_body, p.candidate_headers)));
  }

  // ---------------------------------------------------------------- plots

  const KIND_BY_METRIC = {
    logits: "topk", probabilities: "topk", argmax: "topk", cosine: "dense", tolerance: "dense",
    sqnr: "dense", exact_text: "text", exact: "labels",
  };

  /** Tensors from /tensors, or (when that call failed) the previews' first values. */
  function plotSources(sm, tensors) {
    if (tensors && tensors.outputs) {
      const errs = Object.entries(tensors.errors || {}).map(([side, msg]) => `${side}: ${msg}`);
      return { outputs: tensors.outputs, note: errs.length ? "Could not decode " + errs.join("; ") : null };
    }
    const outs = {};
    const metricOf = {};
    for (const o of sm.outputs || []) metricOf[o.output] = o.metric;
    for (const [name, pv] of Object.entries(sm.previews || {})) {
      const side = (x) => x ? { shape: x.shape, dtype: x.dtype, values: x.head || [], truncated: true } : null;
      const ref = side(pv.reference);
      const kind = ref && typeof (ref.values[0]) === "string" ? "text"
        : KIND_BY_METRIC[metricOf[name]] || "dense";
      outs[name] = { reference: ref, candidate: side(pv.candidate), metric: metricOf[name], kind };
    }
    const why = tensors && tensors.error ? tensors.error.message : "unavailable";
    return { outputs: outs, note: `Full tensors ${why}; plotting the stored previews (first values only).` };
  }

  function renderPlots(sm, tensors) {
    const box = clear($("plots"));
    const { outputs, note } = plotSources(sm, tensors);
    if (note) box.appendChild(h("p", { class: "note" }, note));
    const order = (sm.outputs || []).map((o) => o.output);
    const names = Object.keys(outputs).sort((a, b) => {
      const ia = order.indexOf(a), ib = order.indexOf(b);
      return (ia < 0 ? 1e9 : ia) - (ib < 0 ? 1e9 : ib);
    });
    const flaggedOf = {};
    for (const o of sm.outputs || []) flaggedOf[o.output] = o;
    names.sort((a, b) => ((flaggedOf[b] || {}).flagged || 0) - ((flaggedOf[a] || {}).flagged || 0));
    if (!names.length) box.appendChild(h("p", { class: "muted" }, "No tensors to plot."));
    for (const name of names) {
      const t = outputs[name];
      const card = h("div", { class: "plot-card", dataset: { output: name, kind: t.kind || "" } },
        h("h4", null, h("span", { class: "out-name" }, name), " ",
          h("span", { class: "muted" }, `${t.kind || "?"} · ${t.metric || "?"}`),
          shapeNote(t)));
      try {
        card.appendChild(plotOutput(name, t));
      } catch (e) {
        card.appendChild(h("p", { class: "error" }, "Could not plot: " + e.message));
      }
      box.appendChild(card);
    }
  }

  function shapeNote(t) {
    const parts = [];
    for (const side of ["reference", "candidate"]) {
      const x = t[side];
      if (!x) continue;
      parts.push(`${side} ${x.dtype} [${(x.shape || []).join("×")}]${x.truncated ? ", truncated" : ""}`);
    }
    return h("span", { class: "shape muted" }, parts.join(" · "));
  }

  function plotOutput(name, t) {
    const ref = t.reference, cand = t.candidate;
    const missing = !ref || !cand
      ? h("p", { class: "warn" }, !ref && !cand ? "Neither side has this output."
        : `The ${!ref ? "reference" : "candidate"} has no output "${name}".`) : null;
    const frag = h("div", null, missing);
    if (!ref && !cand) return frag;
    let kind = t.kind;
    const one = ref || cand;
    if (kind === "topk" && (/^(u?int|bool)/.test(one.dtype || "") || lastDim(one) <= 1)) kind = "labels";
    if (kind === "topk") frag.appendChild(plotTopk(ref, cand));
    else if (kind === "text") frag.appendChild(plotText(ref, cand));
    else if (kind === "labels") frag.appendChild(plotLabels(ref, cand));
    else frag.appendChild(plotDense(ref, cand));
    return frag;
  }

  function lastDim(x) {
    const shape = x.shape || [];
    return shape.length ? shape[shape.length - 1] : (x.values || []).length;
  }

  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);

  function niceRange(lo, hi) {
    if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    const pad = (hi - lo) * 0.05;
    return [lo - pad, hi + pad];
  }

  function legend(items) {
    return h("div", { class: "legend" }, items.map(([cls, text]) =>
      h("span", { class: "key" }, h("i", { class: "sw " + cls }), text)));
  }

  /** Overlay of both sides as lines, and the difference (candidate - reference) beneath. */
  function plotDense(ref, cand) {
    const a = ref ? ref.values.map(num) : [];
    const b = cand ? cand.values.map(num) : [];
    const n = Math.max(a.length, b.length);
    const wrap = h("div", { class: "dense" });
    if (!n) { wrap.appendChild(h("p", { class: "muted" }, "empty tensor")); return wrap; }
    if (ref && cand && a.length !== b.length) {
      wrap.appendChild(h("p", { class: "warn" }, `Lengths differ: reference ${a.length}, candidate ${b.length}.`));
    }
    const all = a.concat(b).filter((v) => v !== null);
    const [lo, hi] = niceRange(Math.min(...all), Math.max(...all));
    const nan = (a.length - a.filter((v) => v !== null).length) + (b.length - b.filter((v) => v !== null).length);
    wrap.appendChild(legend([["ref", "reference"], ["cand", "candidate"]]));
    wrap.appendChild(lineChart([[a, "ref"], [b, "cand"]], n, lo, hi, 190, "values"));
    if (ref && cand) {
      const m = Math.min(a.length, b.length);
      const d = [];
      let worst = 0, wi = -1;
      for (let i = 0; i < m; i++) {
        const v = a[i] === null || b[i] === null ? null : b[i] - a[i];
        d.push(v);
        if (v !== null && Math.abs(v) > Math.abs(worst)) { worst = v; wi = i; }
      }
      const dv = d.filter((v) => v !== null);
      const ext = Math.max(Math.abs(Math.min(0, ...dv)), Math.abs(Math.max(0, ...dv))) || 1;
      const chart = lineChart([[d, "diff"]], m, -ext * 1.08, ext * 1.08, 130, "candidate − reference", wi >= 0 ? { i: wi, v: worst } : null);
      wrap.appendChild(chart);
      wrap.appendChild(h("p", { class: "muted small" },
        (wi >= 0 ? `largest difference ${fmtNum(worst)} at index ${wi}` : "no difference in the values shown") +
        (nan ? ` · ${nan} NaN/Inf values not drawn` : "")));
    }
    return wrap;
  }

  function lineChart(series, n, lo, hi, height, title, mark) {
    const W = 760, H = height, L = 56, R = 12, T = 18, B = 20;
    const x = (i) => L + (n <= 1 ? 0 : (i / (n - 1)) * (W - L - R));
    const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
    svg.appendChild(s("text", { x: L, y: 12, class: "ctitle" }, title));
    for (const v of [lo, (lo + hi) / 2, hi]) {
      svg.appendChild(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
      svg.appendChild(s("text", { x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, fmtNum(v)));
    }
    if (lo < 0 && hi > 0) svg.appendChild(s("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), class: "zero" }));
    svg.appendChild(s("text", { x: L, y: H - 4, class: "tick" }, "0"));
    svg.appendChild(s("text", { x: W - R, y: H - 4, class: "tick", "text-anchor": "end" }, String(n - 1)));
    for (const [vals, cls] of series) {
      let d = "", pen = false;
      for (let i = 0; i < vals.length; i++) {
        if (vals[i] === null) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(i).toFixed(1) + " " + y(vals[i]).toFixed(1);
        pen = true;
      }
      if (d) svg.appendChild(s("path", { d, class: "line " + cls }));
      if (vals.length <= 64) {
        vals.forEach((v, i) => { if (v !== null) svg.appendChild(s("circle", { cx: x(i), cy: y(v), r: 2, class: "dot " + cls })); });
      }
    }
    if (mark) {
      svg.appendChild(s("circle", { cx: x(mark.i), cy: y(mark.v), r: 4, class: "mark" }));
    }
    return svg;
  }

  /** Per row: the reference's top-5 classes, both sides' values side by side. */
  function plotTopk(ref, cand) {
    const base = ref || cand;
    const classes = lastDim(base);
    const a = ref ? ref.values.map(num) : null;
    const b = cand ? cand.values.map(num) : null;
    const rows = Math.floor(base.values.length / Math.max(1, classes));
    const shown = Math.min(rows, 4);
    const wrap = h("div", { class: "topk" });
    wrap.appendChild(legend([["ref", "reference"], ["cand", "candidate"]]));
    for (let r = 0; r < shown; r++) {
      const slice = (v) => v ? v.slice(r * classes, (r + 1) * classes) : null;
      const ra = slice(a), rb = slice(b);
      const top = topIndices(ra || rb, 5);
      const candTop = rb ? topIndices(rb, 5) : [];
      const agree = ra && rb ? top[0] === candTop[0] : null;
      const vals = [];
      for (const c of top) { if (ra && ra[c] !== null) vals.push(ra[c]); if (rb && rb[c] !== null) vals.push(rb[c]); }
      const lo = Math.min(0, ...vals), hi = Math.max(0, ...vals);
      const W = 360, H = 170, L = 48, T = 22, B = 24, R = 8;
      const y = (v) => T + (1 - (v - lo) / ((hi - lo) || 1)) * (H - T - B);
      const gw = (W - L - R) / top.length, bw = Math.min(26, gw / 2 - 6);
      const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart small", role: "img",
        "aria-label": `row ${r}: reference top-5 classes` });
      svg.appendChild(s("text", { x: L, y: 13, class: "ctitle" },
        (rows > 1 ? `row ${r} · ` : "") + "reference top-5 classes"));
      for (const v of [lo, hi]) {
        svg.appendChild(s("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid" }));
        svg.appendChild(s("text", { x: L - 4, y: y(v) + 4, class: "tick", "text-anchor": "end" }, fmtNum(v)));
      }
      svg.appendChild(s("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), class: "zero" }));
      top.forEach((c, k) => {
        const gx = L + k * gw + gw / 2;
        const bar = (v, dx, cls, side) => {
          if (v === null || v === undefined) return;
          const y0 = y(0), y1 = y(v);
          svg.appendChild(s("rect", { x: gx + dx, y: Math.min(y0, y1), width: bw, height: Math.max(1, Math.abs(y1 - y0)), class: "bar " + cls },
            s("title", null, `class ${c}, ${side}: ${v}`)));
        };
        bar(ra && ra[c], -bw - 1, "ref", "reference");
        bar(rb && rb[c], 1, "cand", "candidate");
        svg.appendChild(s("text", { x: gx, y: H - 8, class: "tick", "text-anchor": "middle" }, "#" + c));
      });
      const cell = h("div", { class: "topk-row" + (agree === false ? " differs" : "") }, svg);
      if (agree !== null) {
        cell.appendChild(h("p", { class: "small " + (agree ? "good" : "error") }, agree
          ? `top-1 agrees (#${top[0]})`
          : `top-1 differs: reference #${top[0]}, candidate #${candTop[0]}`));
      }
      if (rb) {
        cell.appendChild(h("p", { class: "small muted" }, "candidate top-5: " + candTop.map((c) => "#" + c).join(" ")));
      }
      wrap.appendChild(cell);
    }
    if (rows > shown) wrap.appendChild(h("p", { class: "muted small" }, `showing ${shown} of ${rows} rows`));
    return wrap;
  }

  function topIndices(vals, k) {
    const idx = [];
    for (let i = 0; i < vals.length; i++) if (vals[i] !== null) idx.push(i);
    idx.sort((p, q) => vals[q] - vals[p]);
    return idx.slice(0, k);
  }

  /** Both strings per element, the differing characters highlighted (LCS over characters). */
  function plotText(ref, cand) {
    const a = ref ? ref.values.map(String) : [];
    const b = cand ? cand.values.map(String) : [];
    const n = Math.max(a.length, b.length);
    const wrap = h("div", { class: "textdiff" });
    wrap.appendChild(legend([["del", "only in reference"], ["ins", "only in candidate"]]));
    let same = 0;
    const shown = Math.min(n, 50);
    for (let i = 0; i < shown; i++) {
      const ra = a[i], rb = b[i];
      if (ra !== undefined && ra === rb) {
        same += 1;
        wrap.appendChild(h("div", { class: "tpair same" }, h("span", { class: "tidx" }, `[${i}]`),
          h("span", { class: "muted small" }, "identical: "), h("span", { class: "ttext" }, ra)));
        continue;
      }
      const ops = diffChars(ra === undefined ? "" : ra, rb === undefined ? "" : rb);
      const line = (keep, cls, label, missing) => {
        const el = h("div", { class: "tline" }, h("span", { class: "tside" }, label));
        const txt = h("span", { class: "ttext" });
        if (missing) txt.appendChild(h("span", { class: "muted" }, "(missing)"));
        for (const [op, t] of ops) {
          if (op === "=") txt.appendChild(document.createTextNode(t));
          else if (op === keep) txt.appendChild(h("mark", { class: cls }, t));
        }
        el.appendChild(txt);
        return el;
      };
      wrap.appendChild(h("div", { class: "tpair" }, h("span", { class: "tidx" }, `[${i}]`),
        line("-", "del", "ref", ra === undefined), line("+", "ins", "cand", rb === undefined)));
    }
    if (n > shown) wrap.appendChild(h("p", { class: "muted small" }, `showing ${shown} of ${n} strings`));
    wrap.insertBefore(h("p", { class: "small" }, `${shown - same} of ${shown} strings differ`), wrap.children[1]);
    return wrap;
  }

  /** [[op, text]] with op "=", "-" (reference only) or "+" (candidate only). */
  function diffChars(a, b) {
    let p = 0;
    while (p < a.length && p < b.length && a[p] === b[p]) p++;
    let q = 0;
    while (q < a.length - p && q < b.length - p && a[a.length - 1 - q] === b[b.length - 1 - q]) q++;
    const ma = a.slice(p, a.length - q), mb = b.slice(p, b.length - q);
    const ops = [];
    if (p) ops.push(["=", a.slice(0, p)]);
    if (ma.length * mb.length > 4e6) { // too big for a quadratic table: show the middles whole
      if (ma) ops.push(["-", ma]);
      if (mb) ops.push(["+", mb]);
    } else {
      const n = ma.length, m = mb.length, W = m + 1;
      const L = new Uint32Array((n + 1) * W);
      for (let i = n - 1; i >= 0; i--) {
        for (let j = m - 1; j >= 0; j--) {
          L[i * W + j] = ma[i] === mb[j] ? L[(i + 1) * W + j + 1] + 1 : Math.max(L[(i + 1) * W + j], L[i * W + j + 1]);
        }
      }
      let i = 0, j = 0;
      const push = (op, ch) => {
        const last = ops[ops.length - 1];
        if (last && last[0] === op) last[1] += ch; else ops.push([op, ch]);
      };
      while (i < n && j < m) {
        if (ma[i] === mb[j]) { push("=", ma[i]); i++; j++; }
        else if (L[(i + 1) * W + j] >= L[i * W + j + 1]) { push("-", ma[i]); i++; }
        else { push("+", mb[j]); j++; }
      }
      while (i < n) push("-", ma[i++]);
      while (j < m) push("+", mb[j++]);
    }
    if (q) {
      const last = ops[ops.length - 1];
      const tail = a.slice(a.length - q);
      if (last && last[0] === "=") last[1] += tail; else ops.push(["=", tail]);
    }
    return ops;
  }

  /** Integers side by side, 16 per block; mismatches highlighted. */
  function plotLabels(ref, cand) {
    const a = ref ? ref.values : [];
    const b = cand ? cand.values : [];
    const n = Math.max(a.length, b.length);
    const shape = (ref || cand).shape || [n];
    const cols = shape.length >= 2 ? shape[shape.length - 1] : 0;
    const idx = (i) => cols ? `${Math.floor(i / cols)},${i % cols}` : String(i);
    let diff = 0;
    const mism = [];
    for (let i = 0; i < n; i++) if (a[i] !== b[i]) { diff++; mism.push(i); }
    const wrap = h("div", { class: "labels" });
    wrap.appendChild(h("p", { class: "small" + (diff ? " warn" : "") },
      `${diff} of ${n} positions differ` + (n ? ` (agreement ${pct((n - diff) / n)})` : "")));
    // show everything when small, else the mismatches only
    const positions = n <= 128 ? [...Array(n).keys()] : mism.slice(0, 256);
    if (n > 128) wrap.appendChild(h("p", { class: "muted small" }, `showing ${positions.length} mismatching positions of ${n}`));
    for (let s0 = 0; s0 < positions.length; s0 += 16) {
      const chunk = positions.slice(s0, s0 + 16);
      const t = h("table", { class: "labeltable" });
      const row = (name, f, cls) => h("tr", { class: cls }, h("th", null, name),
        chunk.map((i) => h("td", { class: a[i] !== b[i] ? "mismatch" : null }, f(i))));
      t.appendChild(row("index", idx, "idx"));
      t.appendChild(row("reference", (i) => a[i] === undefined ? "—" : String(a[i])));
      t.appendChild(row("candidate", (i) => b[i] === undefined ? "—" : String(b[i])));
      wrap.appendChild(t);
    }
    return wrap;
  }

  // ---------------------------------------------------------------- labelling

  async function labelCurrent(verdict) {
    if (!state.me) return;
    if (state.me.role === "viewer") {
      toast("Viewers can't label: that needs the reviewer role.", "error");
      return;
    }
    if (state.labelling) return;
    let index, id;
    if (state.view === "sample") {
      id = state.sampleId;
      index = state.sampleIndex;
    } else if (state.view === "list") {
      index = state.selected;
      id = state.items[index] && state.items[index].id;
    }
    if (!id) return;
    const note = state.view === "sample" ? $("label-note").value : "";
    // a clicked label button keeps focus; Enter would then label the next sample too
    if (document.activeElement && document.activeElement.classList.contains("lbl")) document.activeElement.blur();
    state.labelling = true;
    for (const b of document.querySelectorAll("#label-panel .lbl")) b.disabled = true;
    try {
      let label;
      try {
        label = (await api(`/api/samples/${encodeURIComponent(id)}/label`, { method: "POST", body: { verdict, note } })).data;
      } catch (e) {
        if (e.status !== 403) throw e;
        await refreshMe(); // a stale CSRF token (new session elsewhere): fetch it and try once more
        if (state.me.role === "viewer") throw e;
        label = (await api(`/api/samples/${encodeURIComponent(id)}/label`, { method: "POST", body: { verdict, note } })).data;
      }
      if (index >= 0 && state.items[index]) {
        state.items[index].label = label;
        updateRowLabel(index);
      }
      const cached = state.cache.get(id);
      if (cached) cached.then((c) => { c.sample.label = label; }).catch(() => {});
      toast(`Labelled ${verdict}` + (state.view === "sample" ? " — next sample" : ""), "ok");
      state.labelling = false;
      if (state.view === "sample") {
        if (!(index >= 0 && await openIndex(index + 1, false))) {
          renderLabelPanel(label);
          toast(`Labelled ${verdict} — that was the last sample in the list`, "ok");
        }
      } else {
        await moveSelection(1);
      }
    } catch (e) {
      if (e.status !== 401) toast(`Label not saved: ${e.message}`, "error");
    } finally {
      state.labelling = false;
      if (state.view === "sample") {
        const canLabel = state.me.role !== "viewer";
        for (const b of document.querySelectorAll("#label-panel .lbl")) b.disabled = !canLabel;
      }
    }
  }

  // ---------------------------------------------------------------- summary view

  async function loadSummary(force) {
    if (state.summaryLoaded && !force) return;
    state.summaryLoaded = true;
    const box = $("summary-content");
    $("summary-error").hidden = true;
    $("summary-info").textContent = "Loading…";
    const bucket = $("bucket").value;
    const [sum, ts] = await Promise.all([
      api("/api/summary").then((r) => r.data, (e) => ({ error: e })),
      api("/api/timeseries?bucket_s=" + encodeURIComponent(bucket)).then((r) => r.data, (e) => ({ error: e })),
    ]);
    clear(box);
    const errs = [sum, ts].filter((x) => x && x.error).map((x) => x.error.message);
    if (errs.length) {
      $("summary-error").textContent = "Partly unavailable: " + errs.join("; ");
      $("summary-error").hidden = false;
    }
    const population = (sum && sum.population) || [];
    const series = (ts && ts.series) || [];
    const names = [];
    const noise = {};
    const add = (n, nf) => { if (!names.includes(n)) names.push(n); if (nf) noise[n] = true; };
    for (const c of (sum && sum.candidates) || []) add(c.name, c.noise_floor);
    for (const s0 of series) add(s0.candidate, s0.noise_floor);
    for (const r of population) add(r.candidate, false);
    $("summary-info").textContent = sum && sum.time ? `as of ${fmtTime(sum.time)}` : "";
    if (sum && !sum.error) showCoverageWarnings(sum);
    if (!names.length) box.appendChild(h("p", { class: "muted" }, "No candidates configured yet."));
    for (const name of names) {
      const card = h("section", { class: "cand-card" },
        h("h2", null, name, noise[name] ? [" ", h("span", { class: "tag" }, "A/A noise floor")] : null));
      const cov = sum && sum.coverage ? sum.coverage[name] : null;
      if (cov) card.appendChild(coverageBlock(cov));
      const sr = series.find((x) => x.candidate === name);
      card.appendChild(h("h3", null, "Divergence over time"));
      card.appendChild(sr && sr.points && sr.points.length
        ? timeChart(sr.points, (ts && ts.bucket_s) || Number(bucket))
        : h("p", { class: "muted" }, "No time series yet."));
      const rows = population.filter((r) => r.candidate === name);
      card.appendChild(h("h3", null, "Distribution per output (this process)"));
      card.appendChild(rows.length ? populationTable(rows)
        : h("p", { class: "muted" }, "No comparisons recorded by this process yet."));
      box.appendChild(card);
    }
  }

  function pct(x) {
    return typeof x === "number" ? (100 * x).toFixed(x < 0.995 ? 1 : 0) + "%" : "–";
  }

  /** Copies asked for, compared and lost by reason, overall and over the last minutes. */
  function coverageBlock(cov) {
    const lost = Object.entries({ ...cov.dropped, ...cov.failed })
      .sort((a, b) => b[1] - a[1]).map(([k, n]) => `${k} ${n}`).join(", ");
    const r = cov.recent || {};
    return h("div", { class: "coverage" },
      h("h3", null, "Coverage"),
      h("p", null, `${cov.compared} of ${cov.sampled} copies asked for were compared (${pct(cov.coverage)}); `
        + `last ${Math.round((r.window_s || 0) / 60)} min: ${r.compared || 0} of ${r.sampled || 0} (${pct(r.coverage)})`),
      lost ? h("p", { class: "muted" }, "Not compared: " + lost) : null,
      cov.warning ? h("p", { class: "error" }, cov.warning) : null);
  }

  /** A banner above the list when some candidate's recent coverage is below target. */
  function showCoverageWarnings(sum) {
    const box = $("coverage-warning");
    const warnings = Object.values((sum && sum.coverage) || {}).map((c) => c.warning).filter(Boolean);
    clear(box);
    for (const w of warnings) box.appendChild(h("p", null, w));
    box.hidden = !warnings.length;
  }

  function logDomain(values) {
    const pos = values.filter((v) => typeof v === "number" && v > 0 && isFinite(v));
    if (!pos.length) return [1e-6, 1];
    // a little air around the data so it never sits on an edge
    const lo = Math.floor(Math.log10(Math.min(...pos)) - 0.3);
    const hi = Math.ceil(Math.log10(Math.max(...pos)) + 0.3);
    return [lo, hi];
  }

  function decadeLabel(e) {
    return e === 0 ? "1" : e === 1 ? "10" : e === -1 ? "0.1" : `1e${e}`;
  }

  /** p50 / p99 severity per bucket on a log scale, max as dots, flagged count as bars below. */
  function timeChart(points, bucket) {
    const W = 860, H = 280, L = 56, R = 50, T = 24, band = 56, gap = 18, B = 22;
    const plotH = H - T - band - gap - B;
    const t1 = points[points.length - 1].t + bucket;
    const t0 = Math.min(points[0].t, t1 - 12 * bucket); // at least a dozen buckets wide
    const x = (t) => L + ((t - t0) / ((t1 - t0) || 1)) * (W - L - R);
    const vals = [];
    for (const p of points) for (const k of ["p50", "p99", "max"]) vals.push(p[k]);
    const [elo, ehi] = logDomain(vals);
    const y = (v) => {
      const e = Math.log10(Math.max(v, Math.pow(10, elo)));
      return T + (1 - (e - elo) / (ehi - elo)) * plotH;
    };
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
      "aria-label": "severity p50 and p99 over time, log scale, with flagged counts" });
    svg.appendChild(s("text", { x: L, y: 14, class: "ctitle" }, "severity per bucket (log scale)"));
    const step = Math.max(1, Math.ceil((ehi - elo) / 6));
    for (let e = elo; e <= ehi; e += step) {
      svg.appendChild(s("line", { x1: L, x2: W - R, y1: y(Math.pow(10, e)), y2: y(Math.pow(10, e)), class: "grid" }));
      svg.appendChild(s("text", { x: L - 6, y: y(Math.pow(10, e)) + 4, class: "tick", "text-anchor": "end" }, decadeLabel(e)));
    }
    const line = (key, cls) => {
      let d = "", pen = false, prevT = null;
      for (const p of points) {
        const v = p[key];
        if (prevT !== null && p.t - prevT > bucket * 1.5) pen = false; // empty buckets: a gap
        prevT = p.t;
        if (!p.n || typeof v !== "number" || !(v > 0)) { pen = false; continue; }
        d += (pen ? "L" : "M") + x(p.t + bucket / 2).toFixed(1) + " " + y(v).toFixed(1);
        pen = true;
      }
      if (d) svg.appendChild(s("path", { d, class: "line " + cls }));
    };
    for (const p of points) {
      if (p.n && typeof p.max === "number" && p.max > 0) {
        svg.appendChild(s("circle", { cx: x(p.t + bucket / 2), cy: y(p.max), r: 2, class: "dot max" },
          s("title", null, `${fmtTime(p.t)}: max ${fmtNum(p.max)}`)));
      }
    }
    line("p50", "p50");
    line("p99", "p99");
    for (const p of points) {
      for (const key of ["p50", "p99"]) {
        const v = p[key];
        if (!p.n || typeof v !== "number" || !(v > 0)) continue;
        svg.appendChild(s("circle", { cx: x(p.t + bucket / 2), cy: y(v), r: 2.5, class: "dot " + key },
          s("title", null, `${fmtTime(p.t)}: ${key} ${fmtNum(v)} over ${p.n} compared`)));
      }
    }
    // flagged counts in their own band, linear
    const by = T + plotH + gap;
    const fmax = Math.max(1, ...points.map((p) => p.flagged || 0));
    const bw = Math.max(1, (W - L - R) * bucket / ((t1 - t0) || 1) - 1);
    svg.appendChild(s("line", { x1: L, x2: W - R, y1: by + band, y2: by + band, class: "zero" }));
    svg.appendChild(s("text", { x: W - R + 4, y: by + 10, class: "tick" }, String(fmax)));
    svg.appendChild(s("text", { x: W - R + 4, y: by + band, class: "tick" }, "0"));
    svg.appendChild(s("text", { x: L, y: by - 4, class: "tick" }, "flagged per bucket"));
    for (const p of points) {
      const hgt = ((p.flagged || 0) / fmax) * band;
      svg.appendChild(s("rect", { x: x(p.t), y: by + band - hgt, width: bw, height: Math.max(hgt, p.flagged ? 1 : 0), class: "bar flagged" },
        s("title", null, `${fmtTime(p.t)}: ${p.flagged || 0} flagged of ${p.n || 0} compared` +
          (p.n ? `, p50 ${fmtNum(p.p50)}, p99 ${fmtNum(p.p99)}, max ${fmtNum(p.max)}` : ""))));
    }
    const ticks = [t0, t0 + (t1 - t0) / 2, t1];
    ticks.forEach((t, i) => svg.appendChild(s("text", { x: x(t), y: H - 4, class: "tick",
      "text-anchor": i === 0 ? "start" : i === 2 ? "end" : "middle" }, fmtClock(t))));
    const n = points.reduce((acc, p) => acc + (p.n || 0), 0);
    const k = points.reduce((acc, p) => acc + (p.flagged || 0), 0);
    return h("div", null,
      legend([["p50", "p50"], ["p99", "p99"], ["max", "max"], ["flagged", "flagged count"]]),
      svg,
      h("p", { class: "muted small" }, `${k.toLocaleString()} flagged of ${n.toLocaleString()} compared in ` +
        `${points.length} bucket${points.length === 1 ? "" : "s"} of ${bucket} s, ${fmtTime(t0)} – ${fmtClock(t1)}`));
  }

  function populationTable(rows) {
    const vals = [];
    for (const r of rows) for (const k of ["p50", "p90", "p99", "max"]) vals.push(r.severity && r.severity[k]);
    const [elo, ehi] = logDomain(vals);
    const t = h("table", { class: "population" },
      h("thead", null, h("tr", null,
        h("th", null, "model · output"), h("th", null, "metric"), h("th", { class: "num" }, "samples"),
        h("th", null, "flagged rate (95% CI)"),
        h("th", null, "severity, log scale ", h("span", { class: "muted" },
          `(${decadeLabel(elo)} … ${decadeLabel(ehi)}; box p50–p90, whisker p99, dot max)`)),
        h("th", null, "headline p50 / p90 / p99"))));
    const body = h("tbody");
    for (const r of rows) {
      const sev = r.severity || {};
      const hl = r.headline || {};
      body.appendChild(h("tr", null,
        h("td", null, r.model, " · ", h("span", { class: "out-name" }, r.output)),
        h("td", null, r.metric || ""),
        h("td", { class: "num" }, (r.samples || 0).toLocaleString()),
        h("td", null, rateBar(r)),
        h("td", null, sevBox(sev, elo, ehi)),
        h("td", { class: "mono small wrap" }, `${hl.name || ""} ${fmtNum(hl.p50)} / ${fmtNum(hl.p90)} / ${fmtNum(hl.p99)}`)));
    }
    t.appendChild(body);
    return h("div", { class: "table-wrap" }, t);
  }

  function rateBar(r) {
    const W = 150, H = 22;
    const ci = r.flagged_rate_ci95 || [0, 0];
    const x = (v) => 2 + Math.max(0, Math.min(1, v)) * (W - 4);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "mini", width: W, height: H, role: "img",
      "aria-label": `flagged rate ${pct(r.flagged_rate)}, 95% CI ${pct(ci[0])} to ${pct(ci[1])}` },
    s("rect", { x: 2, y: 6, width: W - 4, height: 10, class: "track" }),
    r.flagged_rate === null || r.flagged_rate === undefined ? null
      : s("rect", { x: 2, y: 6, width: Math.max(1, x(r.flagged_rate) - 2), height: 10, class: "bar flagged" }),
    s("line", { x1: x(ci[0]), x2: x(ci[1]), y1: 11, y2: 11, class: "ci" }),
    s("line", { x1: x(ci[0]), x2: x(ci[0]), y1: 4, y2: 18, class: "ci" }),
    s("line", { x1: x(ci[1]), x2: x(ci[1]), y1: 4, y2: 18, class: "ci" }));
    return h("span", { class: "rate" }, svg,
      h("span", { class: "small" }, ` ${pct(r.flagged_rate)} `),
      h("span", { class: "muted small" }, `[${pct(ci[0])}, ${pct(ci[1])}] · ${(r.flagged || 0).toLocaleString()} flagged`));
  }

  function sevBox(sev, elo, ehi) {
    const W = 260, H = 24;
    const x = (v) => {
      const e = Math.log10(Math.max(typeof v === "number" && v > 0 ? v : Math.pow(10, elo), Math.pow(10, elo)));
      return 4 + ((e - elo) / (ehi - elo)) * (W - 8);
    };
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "mini", width: W, height: H, role: "img",
      "aria-label": `severity p50 ${fmtNum(sev.p50)}, p90 ${fmtNum(sev.p90)}, p99 ${fmtNum(sev.p99)}, max ${fmtNum(sev.max)}` });
    for (let e = elo; e <= ehi; e++) svg.appendChild(s("line", { x1: x(Math.pow(10, e)), x2: x(Math.pow(10, e)), y1: 2, y2: H - 2, class: "grid" }));
    if (typeof sev.p50 === "number") {
      svg.appendChild(s("line", { x1: x(sev.p90), x2: x(sev.p99), y1: H / 2, y2: H / 2, class: "whisker" }));
      svg.appendChild(s("line", { x1: x(sev.p99), x2: x(sev.p99), y1: 6, y2: H - 6, class: "whisker" }));
      svg.appendChild(s("rect", { x: x(sev.p50) - 1, y: 5, width: Math.max(2, x(sev.p90) - x(sev.p50) + 1), height: H - 10, class: "box" }));
      svg.appendChild(s("line", { x1: x(sev.p50), x2: x(sev.p50), y1: 3, y2: H - 3, class: "median" }));
    }
    if (typeof sev.max === "number") svg.appendChild(s("circle", { cx: x(sev.max), cy: H / 2, r: 3, class: "dot max" }));
    svg.appendChild(s("title", null, `p50 ${fmtNum(sev.p50)} · p90 ${fmtNum(sev.p90)} · p99 ${fmtNum(sev.p99)} · max ${fmtNum(sev.max)}`));
    return h("span", { class: "sevbox" }, svg,
      h("span", { class: "mono small" }, ` ${fmtNum(sev.p50)} / ${fmtNum(sev.p90)} / ${fmtNum(sev.p99)} / ${fmtNum(sev.max)}`));
  }

  // ---------------------------------------------------------------- builds view

  // The Builds view (builds.js, loaded first): built on this file's helpers; the routing stays
  // here, so #/builds, #/builds/ID and #/builds/diff/A/B work as the other views' hashes do.
  let Builds = null;

  /** push: true adds a history entry, false replaces it, null leaves the hash (it is the route). */
  function showBuilds(sub, push) {
    state.buildsPath = sub || "";
    state.view = "builds";
    state.sampleGen += 1; // a sample still loading must not pull the view away
    if (push !== null) writeHash(push);
    showView("builds");
    return Builds.show(state.buildsPath);
  }

  // ---------------------------------------------------------------- keyboard

  function isTyping(el) {
    if (!el) return false;
    const tag = el.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || el.isContentEditable;
  }

  function onKey(ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const help = $("help");
    if (help.open) {
      if (ev.key === "?") { help.close(); ev.preventDefault(); }
      return; // Escape closes the dialog natively
    }
    if (isTyping(ev.target)) {
      if (ev.key === "Escape") ev.target.blur(); // leave the field; shortcuts work again
      return;
    }
    const key = ev.key;
    const inList = state.view === "list", inSample = state.view === "sample";
    if (key === "?") {
      help.showModal();
    } else if (key === "j" || key === "ArrowDown") {
      if (inList) moveSelection(1);
      else if (inSample) step(1);
      else return;
    } else if (key === "k" || key === "ArrowUp") {
      if (inList) moveSelection(-1);
      else if (inSample) step(-1);
      else return;
    } else if (key === "Enter") {
      const tag = ev.target && ev.target.tagName;
      if (tag === "BUTTON" || tag === "A" || tag === "SUMMARY") return;
      if (inList && state.items.length) openIndex(state.selected, true);
      else return;
    } else if (key === "Escape") {
      // in the Builds view: from a build or a comparison to every build, from there to the list
      if (state.view === "builds") { if (!Builds.back()) backToList(); }
      else if (inSample || state.view === "summary") backToList();
      else return;
    } else if (KEY_VERDICT[key] && (inList || inSample)) {
      labelCurrent(KEY_VERDICT[key]);
    } else if (key === "s") {
      if (state.view === "summary") backToList();
      else { state.view = "summary"; writeHash(true); showView("summary"); loadSummary(false); }
    } else if (key === "b" && Builds) {
      if (state.view === "builds") backToList();
      else showBuilds(state.buildsPath, true);
    } else {
      return;
    }
    ev.preventDefault();
  }

  async function step(delta) {
    const i = state.sampleIndex;
    if (i < 0) { if (state.items.length) openIndex(0, false); return; }
    const target = i + delta;
    if (target < 0) { toast("This is the first sample.", ""); return; }
    if (!(await openIndex(target, false))) toast("That was the last sample.", "");
  }

  function backToList() {
    state.view = "list";
    state.sampleGen += 1; // a sample still loading must not pull the view back
    showView("list");
    writeHash(true);
    highlightSelected(true);
  }

  // ---------------------------------------------------------------- start

  async function refreshMe() {
    const me = (await api("/api/me")).data;
    state.me = me;
    csrf = me.csrf || "";
    const who = clear($("who"));
    append(who, [h("strong", null, me.user), " ", h("span", { class: "role role-" + me.role }, me.role)]);
    document.body.dataset.role = me.role;
    return me;
  }

  async function initReview() {
    document.addEventListener("keydown", onKey);
    // A mouse-clicked button keeps the focus, and Enter would then press it again instead of
    // opening the selected sample: let go of it (keyboard activation, detail 0, keeps focus).
    document.addEventListener("click", (ev) => {
      const b = ev.target.closest && ev.target.closest("button");
      if (b && ev.detail > 0 && !b.closest("dialog")) setTimeout(() => b.blur(), 0);
    });
    $("filters").addEventListener("change", () => onFiltersChanged(0));
    $("filters").addEventListener("input", (ev) => {
      if (ev.target.tagName === "INPUT" && ev.target.type !== "datetime-local") onFiltersChanged(350);
    });
    $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); onFiltersChanged(0); });
    $("filters-reset").addEventListener("click", () => {
      state.filters = { sort: state.filters.sort || "severity" };
      fillFilterForm();
      writeHash(false);
      loadList(true);
    });
    for (const b of document.querySelectorAll("th .sortable")) {
      b.addEventListener("click", () => {
        $("filters").elements.sort.value = b.dataset.sort;
        onFiltersChanged(0);
      });
    }
    $("samples-body").addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr");
      if (!tr || !tr.dataset.index) return;
      openIndex(Number(tr.dataset.index), true);
    });
    $("load-more").addEventListener("click", () => loadList(false));
    $("back").addEventListener("click", backToList);
    $("prev").addEventListener("click", () => step(-1));
    $("next").addEventListener("click", () => step(1));
    for (const b of document.querySelectorAll("#label-panel .lbl")) {
      b.addEventListener("click", () => labelCurrent(b.dataset.verdict));
    }
    $("tab-list").addEventListener("click", () => { if (state.view !== "list") backToList(); });
    $("tab-summary").addEventListener("click", () => {
      state.view = "summary"; writeHash(true); showView("summary"); loadSummary(false);
    });
    $("bucket").addEventListener("change", () => loadSummary(true));
    $("summary-refresh").addEventListener("click", () => loadSummary(true));
    if (typeof window.ShadowReviewBuilds === "function") {
      Builds = window.ShadowReviewBuilds({ h, s, clear, fmtNum, fmtTime, pct, api, rateBar,
        populationTable, navigate: (sub) => showBuilds(sub, true),
        refresh: () => showBuilds(state.buildsPath, null) });
      $("tab-builds").addEventListener("click", () => {
        // from another view: back where the Builds view was left; within it: every build
        showBuilds(state.view === "builds" ? "" : state.buildsPath, true);
      });
    } else {
      $("tab-builds").hidden = true;
    }
    $("help-button").addEventListener("click", () => $("help").showModal());
    $("logout").addEventListener("click", async () => {
      try { await api("/logout", { method: "POST", allow401: true }); } catch (e) { /* gone anyway */ }
      location.replace("/review");
    });
    window.addEventListener("popstate", applyRoute);

    try {
      await refreshMe();
    } catch (e) {
      if (e.status !== 401) toast("Could not read the session: " + e.message, "error");
      return;
    }
    // candidates, models and outputs for the filter suggestions
    api("/api/summary").then(({ data }) => {
      showCoverageWarnings(data);
      for (const c of data.candidates || []) addDatalist("candidate", c.name);
      for (const r of data.population || []) {
        addDatalist("model", r.model);
        addDatalist("candidate", r.candidate);
        addDatalist("output", r.output);
        addDatalist("metric", r.metric);
      }
    }).catch(() => {});
    applyRoute();
    document.body.dataset.ready = "1";
  }

  const loginForm = document.getElementById("login-form");
  if (loginForm) initLogin(loginForm);
  else if (document.getElementById("list-view")) initReview();
})();

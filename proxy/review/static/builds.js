/* shadowproxy review page: the Builds view. Every build the ledger recorded, per model, each with
 * its evidence; one build's detail; two builds side by side. Loaded before review.js, which calls
 * window.ShadowReviewBuilds(helpers) with its own DOM, formatting and API helpers, so both files
 * build, escape and format the same way, and which owns the routing (#/builds, #/builds/ID,
 * #/builds/diff/A/B).
 *
 * Facts come from model servers (names, versions, config values): every text is written with
 * textContent or an attribute (the helpers' h / s), never innerHTML.
 */
"use strict";

window.ShadowReviewBuilds = function (k) {
  const { h, s, clear, fmtNum, fmtTime, pct, api, rateBar, populationTable } = k;
  const ALPHA = 0.05; // the significance level the diff's plain-words verdict is read at
  // A replay's outcomes per label, in the order a reviewer reads them (replay_report's keys).
  const REPLAY_STATES = { still_diverges: "still diverge", now_matches: "now match", no_answer: "no answer" };
  const EMPTY = "No builds recorded yet: builds appear when a candidate answers its first copy.";

  const $ = (id) => document.getElementById(id);
  const view = {
    builds: [], // the last /api/builds answer
    selected: [], // ids ticked for "compare", oldest tick first (at most two)
    gen: 0, // drops answers to a superseded request
  };

  // ---------------------------------------------------------------- small formatters

  const shortId = (id) => String(id || "").slice(0, 12);

  function gpusText(g) {
    if (!g) return "—";
    const names = (g.names || []).join(", ");
    const mem = (g.memory_bytes || []).length
      ? ` (${[...new Set(g.memory_bytes.map((b) => Math.round(b / 2 ** 30) + " GiB"))].join(", ")})`
      : "";
    return `${g.count} × ${names || "GPU"}${mem}`;
  }

  function versionText(v) {
    return v === null || v === undefined || v === "" ? "—" : String(v);
  }

  function label(b) {
    return `${b.upstream} v${versionText(b.version)}` + (b.hardware ? ` (${b.hardware})` : "");
  }

  /** Last seen, without the date when it is the first-seen day's. */
  function lastSeen(b) {
    const first = fmtTime(b.first_seen), last = fmtTime(b.last_seen);
    return first.slice(0, 10) === last.slice(0, 10) ? last.slice(11) : last;
  }

  function severityText(sev) {
    sev = sev || {};
    return `p50 ${fmtNum(sev.p50)} · p99 ${fmtNum(sev.p99)}`;
  }

  /** A p-value in plain words, at the page's one significance level. */
  function verdictOf(p) {
    if (typeof p !== "number") return { text: "not enough data to test", cls: "muted" };
    if (p < ALPHA) return { text: `differs at p < ${ALPHA}`, cls: "error" };
    return { text: "no significant change", cls: "good" };
  }

  function pText(p) {
    if (typeof p !== "number") return "—";
    return p < 1e-4 ? p.toExponential(1) : String(Number(p.toPrecision(3)));
  }

  /** A label's verdict as the list shows it ("unlabelled" greyed). */
  function verdictBadge(verdict) {
    if (!verdict || verdict === "unlabelled") return h("span", { class: "badge unlabelled" }, "unlabelled");
    return h("span", { class: "badge verdict-" + verdict }, verdict);
  }

  function value(v) {
    if (v === null || v === undefined) return h("span", { class: "muted" }, "—");
    if (typeof v === "object") return h("code", { class: "mono wrap" }, JSON.stringify(v));
    return h("code", { class: "mono" }, String(v));
  }

  function buildLink(b, text) {
    const sub = encodeURIComponent(b.id);
    return h("a", { href: "#/builds/" + sub, class: "build-link" + (text ? "" : " mono"), "data-build": b.id,
      onclick: (ev) => { if (plainClick(ev)) { ev.preventDefault(); k.navigate(sub); } } },
    text || shortId(b.id));
  }

  /** A click the page handles itself (a modified click keeps the browser's own: new tab...). */
  function plainClick(ev) {
    return ev.button === 0 && !ev.ctrlKey && !ev.metaKey && !ev.shiftKey && !ev.altKey;
  }

  function showError(e, what) {
    const box = $("builds-error");
    box.textContent = `Could not load ${what}: ${e.message}` +
      (e.status === 503 ? " (the ledger's Redis did not answer; try Refresh in a moment)" : "");
    box.hidden = false;
  }

  // ---------------------------------------------------------------- routing

  /** sub: "" (the timeline), a build id, or "diff/A/B". */
  function show(sub) {
    const gen = ++view.gen;
    $("builds-error").hidden = true;
    const m = /^diff\/([^/]+)\/([^/]+)$/.exec(sub || "");
    const box = $("builds-content");
    box.dataset.state = "loading";
    $("builds-info").textContent = "Loading…";
    let p;
    if (m) p = renderDiff(gen, decodeURIComponent(m[1]), decodeURIComponent(m[2]));
    else if (sub) p = renderDetail(gen, decodeURIComponent(sub));
    else p = renderList(gen);
    document.body.dataset.buildsView = m ? "diff" : sub ? "detail" : "list";
    $("builds-back").hidden = !sub;
    $("builds-compare-bar").hidden = !!sub;
    return p.catch((e) => {
      if (gen !== view.gen || e.status === 401) return;
      clear(box);
      $("builds-info").textContent = "";
      showError(e, m ? "the comparison" : sub ? "the build" : "builds");
    }).finally(() => { if (gen === view.gen) box.dataset.state = "ready"; });
  }

  // ---------------------------------------------------------------- timeline of builds

  async function renderList(gen) {
    const { data } = await api("/api/builds");
    if (gen !== view.gen) return;
    const builds = Array.isArray(data) ? data : [];
    view.builds = builds;
    view.selected = view.selected.filter((id) => builds.some((b) => b.id === id));
    const box = clear($("builds-content"));
    const models = [...new Set(builds.map((b) => b.model))];
    $("builds-info").textContent = builds.length
      ? `${builds.length} build${builds.length === 1 ? "" : "s"} of ${models.length} model${models.length === 1 ? "" : "s"}`
      : "";
    updateCompare();
    if (!builds.length) {
      box.appendChild(h("p", { class: "muted empty", id: "builds-empty" }, EMPTY));
      return;
    }
    for (const model of models) {
      const rows = builds.filter((b) => b.model === model)
        .sort((a, b) => a.first_seen - b.first_seen); // the API sorts so too; the timeline relies on it
      box.appendChild(modelCard(model, rows));
    }
  }

  /** Builds of one model on one version and role, told apart only by where they run: the same
   * model version on two hardware pools. Two candidates with one version number may be two
   * different models behind a model_map (int8, bf16 of one embedder); the list does not say
   * which model the server ran, so without that (`served`) only a differing hardware string
   * makes builds siblings, never a differing upstream alone. */
  function siblingsOf(b, rows) {
    if (b.version === null || b.version === undefined) return [];
    return rows.filter((o) => o.id !== b.id && o.role === b.role && o.version === b.version &&
      (o.served === undefined || b.served === undefined ? (o.hardware || "") !== (b.hardware || "")
        : o.served === b.served && (o.hardware !== b.hardware || o.upstream !== b.upstream)));
  }

  function modelCard(model, rows) {
    const card = h("section", { class: "cand-card build-model", "data-model": model },
      h("h2", null, model, " ", h("span", { class: "muted small" },
        `${rows.length} build${rows.length === 1 ? "" : "s"}`)));
    // Builds seen within one minute sit on one spot of any time axis: the table says it all.
    const span = Math.max(...rows.map((b) => b.last_seen)) - Math.min(...rows.map((b) => b.first_seen));
    if (span >= 60) card.appendChild(laneChart(rows));
    // One colour per sibling group, so the rows of one version on several pools read as a set.
    const groups = new Map();
    for (const b of rows) {
      const sib = siblingsOf(b, rows);
      if (!sib.length) continue;
      const key = [b.role, b.version, b.served || ""].join("|");
      if (!groups.has(key)) groups.set(key, groups.size % 4);
    }
    // GPUs are known only where a candidate has a metrics_url: no column of dashes otherwise
    const gpus = rows.some((b) => b.gpus);
    const table = h("table", { class: "population builds" },
      h("thead", null, h("tr", null,
        h("th", { class: "c-pick" }, h("span", { class: "sr-only" }, "compare")),
        h("th", null, "build"), h("th", null, "upstream"), h("th", null, "role"),
        h("th", null, "version"), h("th", null, "hardware"), gpus ? h("th", null, "GPUs") : null,
        h("th", null, "first seen → last seen"), h("th", null, "serves now"),
        h("th", { class: "num" }, "copies"), h("th", null, "flagged rate (95% CI)"),
        h("th", null, "severity"))));
    const body = h("tbody");
    for (const b of rows) {
      const sib = siblingsOf(b, rows);
      const group = sib.length ? groups.get([b.role, b.version, b.served || ""].join("|")) : null;
      const ev = b.evidence;
      const tr = h("tr", { "data-build": b.id, class: [sib.length ? `sibling sib-${group}` : "",
        b.current ? "current" : "old"].join(" ").trim() },
      h("td", { class: "c-pick" }, h("input", { type: "checkbox", class: "pick", "data-build": b.id,
        "aria-label": `compare ${label(b)}`, checked: view.selected.includes(b.id),
        onchange: (evt) => pick(b.id, evt.target.checked) })),
      h("td", null, buildLink(b)),
      h("td", null, b.upstream),
      h("td", null, h("span", { class: "tag role-" + b.role }, b.role)),
      h("td", { class: "mono" }, versionText(b.version)),
      h("td", null, b.hardware || h("span", { class: "muted" }, "—")),
      gpus ? h("td", { class: "wrap small" }, gpusText(b.gpus)) : null,
      h("td", { class: "c-time small" }, fmtTime(b.first_seen), h("br"), "→ " + lastSeen(b)),
      h("td", null, b.current ? h("span", { class: "okflag" }, "serves now")
        : h("span", { class: "muted small" }, "replaced")),
      h("td", { class: "num" }, ev ? (ev.copies || 0).toLocaleString() : "—"),
      h("td", null, ev ? (ev.copies ? rateBar(ev) : h("span", { class: "muted small" }, "no copies compared yet"))
        : h("span", { class: "muted small" }, "the reference: compared against, not judged")),
      h("td", { class: "mono small" }, ev && ev.copies ? severityText(ev.severity) : "—"));
      body.appendChild(tr);
      if (sib.length) {
        body.appendChild(h("tr", { class: `sibling-note sib-${group}` },
          h("td", null),
          h("td", { colspan: gpus ? 11 : 10, class: "small wrap" },
            h("span", { class: "tag sib" }, "siblings"), " same version on other hardware: ",
            sib.map((o, i) => [i ? ", " : "", buildLink(o, label(o)), " ",
              h("a", { href: `#/builds/diff/${encodeURIComponent(b.id)}/${encodeURIComponent(o.id)}`,
                class: "small", onclick: (evt) => {
                  if (plainClick(evt)) { evt.preventDefault(); compare(b.id, o.id); }
                } }, "compare")]))));
      }
    }
    table.appendChild(body);
    card.appendChild(h("div", { class: "table-wrap" }, table));
    return card;
  }

  /** One lane per upstream, one bar per build from first to last seen: when each was served. */
  function laneChart(rows) {
    const lanes = [...new Set(rows.map((b) => b.upstream))];
    const W = 860, L = 120, R = 16, T = 8, lane = 22, B = 18;
    const H = T + lanes.length * lane + B;
    const t0 = Math.min(...rows.map((b) => b.first_seen));
    const t1 = Math.max(...rows.map((b) => b.last_seen));
    const x = (t) => L + ((t - t0) / ((t1 - t0) || 1)) * (W - L - R);
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart lanes", role: "img",
      "aria-label": "when each build was seen, one lane per upstream" });
    lanes.forEach((u, i) => {
      const y = T + i * lane;
      svg.appendChild(s("text", { x: L - 6, y: y + 14, class: "tick", "text-anchor": "end" }, u));
      svg.appendChild(s("line", { x1: L, x2: W - R, y1: y + 10, y2: y + 10, class: "grid" }));
    });
    for (const b of rows) {
      const y = T + lanes.indexOf(b.upstream) * lane;
      const x0 = x(b.first_seen), x1 = Math.max(x(b.last_seen), x0 + 6);
      svg.appendChild(s("rect", { x: x0, y: y + 3, width: x1 - x0, height: 14, rx: 3,
        class: "build-bar " + (b.current ? "current" : "old") },
      s("title", null, `${label(b)} · ${shortId(b.id)} · ${fmtTime(b.first_seen)} – ${fmtTime(b.last_seen)}`)));
      // the version inside its bar where it fits; the title says it anyway
      if (x1 - x0 >= 28) svg.appendChild(s("text", { x: x0 + 3, y: y + 14, class: "bar-label" }, `v${versionText(b.version)}`));
    }
    svg.appendChild(s("text", { x: L, y: H - 4, class: "tick" }, fmtTime(t0)));
    svg.appendChild(s("text", { x: W - R, y: H - 4, class: "tick", "text-anchor": "end" }, fmtTime(t1)));
    return svg;
  }

  // ---------------------------------------------------------------- compare selection

  function pick(id, on) {
    view.selected = view.selected.filter((x) => x !== id);
    if (on) view.selected.push(id);
    if (view.selected.length > 2) view.selected.shift(); // a third tick replaces the oldest
    for (const cb of document.querySelectorAll("#builds-content input.pick")) {
      cb.checked = view.selected.includes(cb.dataset.build);
    }
    updateCompare();
  }

  function updateCompare() {
    const n = view.selected.length;
    $("builds-compare").disabled = n !== 2;
    const names = view.selected.map((id) => view.builds.find((b) => b.id === id)).filter(Boolean).map(label);
    $("builds-picked").textContent = n === 0 ? "Tick two builds to compare them."
      : n === 1 ? `${names[0]} — tick one more to compare.` : `${names[0]} vs ${names[1]}`;
  }

  /** The older build is the baseline (a), whichever was ticked first: "v1 -> v2" reads forward. */
  function compare(x, y) {
    const seen = (id) => (view.builds.find((b) => b.id === id) || { first_seen: 0 }).first_seen;
    const [a, b] = seen(x) <= seen(y) ? [x, y] : [y, x];
    k.navigate(`diff/${encodeURIComponent(a)}/${encodeURIComponent(b)}`);
  }

  function compareSelected() {
    if (view.selected.length === 2) compare(view.selected[0], view.selected[1]);
  }

  // ---------------------------------------------------------------- one build

  async function renderDetail(gen, id) {
    // the list too, when this page opened on the build: its timeline then names the builds
    const [{ data: b }] = await Promise.all([api("/api/builds/" + encodeURIComponent(id)),
      view.builds.length ? null : api("/api/builds").then(({ data }) => {
        if (Array.isArray(data)) view.builds = data;
      }, () => {})]);
    if (gen !== view.gen) return;
    const box = clear($("builds-content"));
    $("builds-info").textContent = `build ${shortId(b.id)}`;
    box.appendChild(h("h2", { id: "build-title" }, `${b.model} · ${label(b)}`));
    box.appendChild(h("p", { class: "muted" },
      h("span", { class: "tag role-" + b.role }, b.role), " ",
      b.current ? h("span", { class: "okflag" }, "serves now") : h("span", null, "replaced"),
      ` · build ${b.id} · first seen ${fmtTime(b.first_seen)} · last seen ${fmtTime(b.last_seen)}`));

    box.appendChild(h("h3", null, "Evidence"));
    const ev = b.evidence;
    box.appendChild(b.role === "reference" && !(ev && ev.copies)
      ? h("p", { class: "muted" }, "The reference is what candidates are compared against; it is not judged.")
      : evidenceLine(ev));

    box.appendChild(h("h3", null, "Fingerprint"));
    box.appendChild(factsTable(b.facts || {}));

    box.appendChild(h("h3", null, "Per output"));
    box.appendChild((b.outputs || []).length ? populationTable(b.outputs)
      : h("p", { class: "muted" }, "No comparisons recorded for this build in the statistics window."));

    box.appendChild(h("h3", null, "Labels of its flagged samples"));
    const labels = Object.entries(b.labels || {}).sort((p, q) => q[1] - p[1]);
    box.appendChild(labels.length
      ? h("p", { class: "labels" }, labels.map(([verdict, n]) => [
        verdictBadge(verdict), ` ${n.toLocaleString()}  `]))
      : h("p", { class: "muted" }, "No flagged samples of this build are stored."));

    box.appendChild(h("h3", null, "Golden-set replays"));
    box.appendChild(replaysTable(b.replays || []));

    box.appendChild(h("h3", null, `Timeline of ${b.upstream} · ${b.model}`));
    box.appendChild(eventsTable(b.timeline || [], b.id));
  }

  function evidenceLine(ev) {
    if (!ev || !ev.copies) return h("p", { class: "muted" }, "No copies compared yet.");
    const sev = ev.severity || {};
    return h("p", { class: "evidence-line" },
      `${ev.copies.toLocaleString()} copies compared · flagged `, rateBar(ev),
      h("span", { class: "mono small" }, ` · severity p50 ${fmtNum(sev.p50)} / p90 ${fmtNum(sev.p90)} / p99 ${fmtNum(sev.p99)}`));
  }

  function factsTable(facts) {
    const rows = Object.keys(facts).filter((key) => key !== "config").sort().map((key) =>
      h("tr", null, h("th", null, key), h("td", null, key === "gpus" && facts[key]
        ? [gpusText(facts[key]), " ", value(facts[key])] : value(facts[key]))));
    const cfg = facts.config;
    return h("div", null,
      h("table", { class: "facts" }, h("tbody", null, rows)),
      Array.isArray(cfg) && cfg.length
        ? h("details", { class: "config" }, h("summary", null, `model config (${cfg.length} lines)`),
          h("pre", { class: "mono" }, cfg.join("\n")))
        : h("p", { class: "muted small" }, "The server gave no model config."));
  }

  function replaysTable(runs) {
    if (!runs.length) {
      return h("p", { class: "muted" }, "No golden-set replay ran against this build (shadowproxy replay FILE --url URL).");
    }
    const t = h("table", { class: "population" },
      h("thead", null, h("tr", null, h("th", null, "time"), h("th", null, "golden set"),
        h("th", { class: "num" }, "samples"), h("th", { class: "num" }, "regressions still diverging"),
        h("th", null, "by label"))));
    const body = h("tbody");
    for (const r of runs) {
      const by = Object.entries(r.by_label || {}).map(([lbl, c]) => `${lbl}: ` +
        Object.entries(REPLAY_STATES).filter(([key]) => (c || {})[key])
          .map(([key, words]) => `${c[key]} ${words}`).join(", "))
        .join(" · ");
      body.appendChild(h("tr", null, h("td", { class: "c-time" }, fmtTime(r.ts)),
        h("td", { class: "mono" }, r.golden_id || "—"),
        h("td", { class: "num" }, r.golden_size ?? "—"),
        h("td", { class: "num" }, r.still_diverging ?? "—"),
        h("td", { class: "small wrap" }, by || "—")));
    }
    t.appendChild(body);
    return h("div", { class: "table-wrap" }, t);
  }

  function eventsTable(events, id) {
    if (!events.length) return h("p", { class: "muted" }, "No events.");
    const t = h("table", { class: "population" },
      h("thead", null, h("tr", null, h("th", null, "time"), h("th", null, "now serving"),
        h("th", null, "replaced"))));
    const body = h("tbody");
    for (const e of events) {
      const link = (bid) => {
        if (!bid) return h("span", { class: "muted" }, "— (first answer)");
        const known = view.builds.find((b) => b.id === bid); // when the timeline was loaded first
        return known ? [buildLink(known, label(known)), h("span", { class: "muted mono small" }, " " + shortId(bid))]
          : buildLink({ id: bid });
      };
      body.appendChild(h("tr", { class: e.build === id ? "this-build" : "" },
        h("td", { class: "c-time" }, fmtTime(e.ts)), h("td", null, link(e.build),
          e.build === id ? h("span", { class: "muted small" }, " (this build)") : null),
        h("td", null, link(e.previous))));
    }
    t.appendChild(body);
    return h("div", { class: "table-wrap" }, t);
  }

  // ---------------------------------------------------------------- two builds side by side

  async function renderDiff(gen, a, b) {
    const { data: d } = await api(`/api/builds/diff?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
    if (gen !== view.gen) return;
    const box = clear($("builds-content"));
    $("builds-info").textContent = `${shortId(d.a.id)} vs ${shortId(d.b.id)}`;
    box.appendChild(h("h2", { id: "diff-title" }, `${d.a.model}: `, buildLink(d.a, label(d.a)), " → ",
      buildLink(d.b, label(d.b))));
    box.appendChild(h("p", { class: "muted small" }, "A is the baseline (the older build), B the one judged against it."));

    box.appendChild(h("h3", null, "What differs in the fingerprints"));
    box.appendChild(fingerprintDiff(d.fingerprint || {}));

    box.appendChild(h("h3", null, "Evidence side by side"));
    box.appendChild(evidenceSideBySide(d));

    box.appendChild(h("h3", null, "Golden-set samples whose outcome changed"));
    const gc = d.golden_changes || [];
    if (!gc.length) {
      box.appendChild(h("p", { class: "muted" },
        "None: no sample's outcome changed between the newest replays of one golden set against both builds (or no such pair of replays)."));
    } else {
      const t = h("table", { class: "population golden" }, h("thead", null, h("tr", null,
        h("th", null, "sample"), h("th", null, "label"), h("th", null, "A"), h("th", null, "B"))));
      const outcome = (div) => div ? h("span", { class: "flag" }, "diverges") : h("span", { class: "okflag" }, "matches");
      t.appendChild(h("tbody", null, gc.map((c) => h("tr", null, h("td", { class: "mono" }, c.sample),
        h("td", null, verdictBadge(c.label)),
        h("td", null, outcome(c.a_diverges)), h("td", null, outcome(c.b_diverges))))));
      box.appendChild(h("div", { class: "table-wrap" }, t));
    }
  }

  function fingerprintDiff(fp) {
    const fields = Object.entries(fp.fields || {});
    const onlyA = fp.config_only_a || [], onlyB = fp.config_only_b || [];
    const out = h("div", { class: "fp-diff" });
    if (!fields.length && !onlyA.length && !onlyB.length) {
      out.appendChild(h("p", { class: "muted" }, "The fingerprints are identical."));
      return out;
    }
    if (fields.length) {
      out.appendChild(h("table", { class: "population fields" },
        h("thead", null, h("tr", null, h("th", null, "field"), h("th", null, "A"), h("th", null, "B"))),
        h("tbody", null, fields.map(([name, [va, vb]]) => h("tr", { "data-field": name },
          h("th", null, name), h("td", { class: "old wrap" }, value(va)), h("td", { class: "new wrap" }, value(vb)))))));
    }
    if (onlyA.length || onlyB.length) {
      out.appendChild(h("pre", { class: "config-diff mono" },
        onlyA.map((l) => h("span", { class: "del" }, "- " + l + "\n")),
        onlyB.map((l) => h("span", { class: "ins" }, "+ " + l + "\n"))));
    }
    return out;
  }

  function evidenceSideBySide(d) {
    const ea = (d.evidence && d.evidence.a) || {}, eb = (d.evidence && d.evidence.b) || {};
    const ft = d.flagged_rate_test || {}, st = d.severity_test || {};
    const sa = ea.severity || {}, sb = eb.severity || {};
    const row = (name, va, vb, extra) => h("tr", null, h("th", null, name), h("td", null, va),
      h("td", null, vb), h("td", { class: "small wrap" }, extra || ""));
    const testCell = (t, more) => {
      const v = verdictOf(t.p);
      return [h("strong", { class: "verdict " + v.cls }, v.text), h("br"),
        h("span", { class: "muted" }, `p = ${pText(t.p)}${more}`), h("br"),
        h("span", { class: "muted" }, t.test || "")];
    };
    const diff = typeof ft.difference === "number"
      ? `; B - A: ${ft.difference >= 0 ? "+" : "-"}${pct(Math.abs(ft.difference))}` : "";
    const pg = typeof st.prob_b_greater === "number"
      ? `; P(B more severe) ${Number(st.prob_b_greater.toFixed(3))}` : "";
    const rate = (e) => e.copies ? rateBar(e) : h("span", { class: "muted small" }, "no copies");
    return h("div", { class: "table-wrap" }, h("table", { class: "population side-by-side" },
      h("thead", null, h("tr", null, h("th", null, ""), h("th", null, "A"), h("th", null, "B"),
        h("th", null, "significance"))),
      h("tbody", null,
        row("copies compared", (ea.copies || 0).toLocaleString(), (eb.copies || 0).toLocaleString()),
        h("tr", { id: "diff-rate-row" }, h("th", null, "flagged rate (95% CI)"), h("td", null, rate(ea)),
          h("td", null, rate(eb)), h("td", { class: "small wrap", id: "diff-rate-test" }, testCell(ft, diff))),
        h("tr", { id: "diff-sev-row" }, h("th", null, "severity p50 / p90 / p99"),
          h("td", { class: "mono small" }, `${fmtNum(sa.p50)} / ${fmtNum(sa.p90)} / ${fmtNum(sa.p99)}`),
          h("td", { class: "mono small" }, `${fmtNum(sb.p50)} / ${fmtNum(sb.p90)} / ${fmtNum(sb.p99)}`),
          h("td", { class: "small wrap", id: "diff-sev-test" }, testCell(st, pg))))));
  }

  // ---------------------------------------------------------------- wiring

  $("builds-compare").addEventListener("click", compareSelected);
  $("builds-refresh").addEventListener("click", () => k.refresh());
  $("builds-back").addEventListener("click", () => k.navigate(""));

  return {
    show,
    /** Escape's meaning here: from a build or a diff back to the timeline (true), else false. */
    back() {
      if (document.body.dataset.buildsView === "list") return false;
      k.navigate("");
      return true;
    },
  };
};

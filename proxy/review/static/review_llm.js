/* shadowproxy review page: the view of an LLM sample (generated text), in place of the tensor
 * plots. Loaded before review.js, which calls window.ShadowReviewLLM(helpers) with its own DOM
 * and formatting helpers, so both files build elements the same way.
 *
 * Prompts and answers come from clients and model servers: every text is written with
 * textContent or an attribute (the helpers' h / s), never innerHTML. An image part of a chat
 * message is shown as its URL, never loaded.
 */
"use strict";

window.ShadowReviewLLM = function (k) {
  const { h, s, clear, fmtNum, prettyJson, diffChars, legend, api } = k;
  const PROTOCOLS = new Set(["openai", "triton_generate"]);
  const AROUND = 8; // tokens shown each side of the first divergence in the probability table
  const SNIPPET = 80; // characters of each answer in the list
  const WORDS = /\s+|[\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]/gu;
  const BAR_W = 110;

  // ---------------------------------------------------------------- which samples

  function isLLMProtocol(protocol) {
    return PROTOCOLS.has(protocol);
  }

  function isText(x) {
    return !!x && x.kind === "text";
  }

  /** Also true for a sample of a protocol added later whose previews are generated text. */
  function isLLM(sm) {
    if (!sm) return false;
    if (isLLMProtocol(sm.protocol)) return true;
    return Object.values(sm.previews || {}).some((pv) => pv && (isText(pv.reference) || isText(pv.candidate)));
  }

  /** "text", then "choices[1].text", "choices[2].text" ... (the answers' choices in order). */
  function choiceKeys(sm) {
    const order = (key) => {
      const m = /^choices\[(\d+)\]\./.exec(key);
      return m ? Number(m[1]) : 0;
    };
    return Object.entries(sm.previews || {})
      .filter(([, pv]) => pv && (isText(pv.reference) || isText(pv.candidate)))
      .map(([key]) => key)
      .sort((a, b) => order(a) - order(b));
  }

  // ---------------------------------------------------------------- small formatters

  function ms(v) {
    return typeof v === "number" && isFinite(v) ? `${fmtNum(v)} ms` : "—";
  }

  /** A token as JSON writes it: its spaces and newlines stay visible in a table cell. */
  function quoted(t) {
    return JSON.stringify(String(t));
  }

  function prob(logprob) {
    return typeof logprob === "number" && isFinite(logprob) ? Math.exp(logprob) : null;
  }

  function short(v, limit) {
    const text = typeof v === "string" ? v : JSON.stringify(v);
    return text.length > limit ? text.slice(0, limit - 1) + "…" : text;
  }

  function tokenTitle(tok, i) {
    if (!tok) return "";
    const p = prob(tok.logprob);
    const lines = [`#${i} ${quoted(tok.token)}` +
      (p === null ? "" : ` · p ${fmtNum(p)} (logprob ${fmtNum(tok.logprob)})`) +
      (tok.id !== undefined && tok.id !== null ? ` · id ${tok.id}` : "")];
    const top = Array.isArray(tok.top) ? tok.top : [];
    if (top.length) {
      lines.push(`top-${top.length}:`);
      for (const [t, lp] of top) lines.push(`  ${quoted(t)}  p ${fmtNum(prob(lp))}`);
    } else {
      lines.push("no top-k alternatives returned");
    }
    return lines.join("\n");
  }

  // ---------------------------------------------------------------- the prompt

  function promptSection(sm) {
    const req = (sm.payloads || {}).request;
    const sec = h("section", { class: "llm-prompt" }, h("h3", null, "Prompt"));
    const body = req && "json" in req ? req.json : null;
    if (!body || typeof body !== "object" || Array.isArray(body)) {
      sec.appendChild(h("p", { class: "muted" }, !req ? "The request body was not stored."
        : req.truncated ? "The request body was stored cut short, so it cannot be read as JSON: see the request below."
          : "The request body is not a JSON object: see the request below."));
      return sec;
    }
    sec.appendChild(paramsLine(sm, body));
    if (Array.isArray(body.messages)) sec.appendChild(conversation(body.messages));
    else if ("prompt" in body) sec.appendChild(promptBlocks(body.prompt));
    else if ("text_input" in body) sec.appendChild(promptBlocks(body.text_input));
    else sec.appendChild(h("p", { class: "muted" }, "No messages, prompt or text_input in the request."));
    if (Array.isArray(body.tools) && body.tools.length) {
      sec.appendChild(h("details", { class: "llm-tools" },
        h("summary", null, `tools offered (${body.tools.length})`), prettyJson(body.tools)));
    }
    return sec;
  }

  /** The request's settings in one line: model, temperature, max_tokens, stream ... */
  function paramsLine(sm, body) {
    const kind = Array.isArray(body.messages) ? "chat" : "prompt" in body ? "completion"
      : sm.protocol === "triton_generate" ? "Triton generate" : sm.protocol || "LLM";
    const skip = new Set(["messages", "prompt", "text_input", "tools", "parameters"]);
    const items = Object.entries(body).filter(([key]) => !skip.has(key));
    if (body.parameters && typeof body.parameters === "object" && !Array.isArray(body.parameters)) {
      items.push(...Object.entries(body.parameters));
    }
    if (Array.isArray(body.tools) && body.tools.length) {
      const names = body.tools.map((t) => (t && t.function && t.function.name) || (t && t.name) || "?");
      items.push(["tools", names.join(", ")]);
    }
    const line = h("p", { class: "llm-params small" }, h("span", { class: "tag" }, kind));
    for (const [key, v] of items) {
      line.appendChild(document.createTextNode(" "));
      line.appendChild(h("span", { class: "param", title: short(v, 2000) },
        h("span", { class: "muted" }, key + " "), short(v, 60)));
    }
    return line;
  }

  function conversation(messages) {
    const ol = h("ol", { class: "conversation" });
    messages.forEach((m, i) => {
      if (!m || typeof m !== "object") {
        ol.appendChild(h("li", { class: "msg" }, h("div", { class: "role" }, `[${i}] not a message`), prettyJson(m)));
        return;
      }
      const role = typeof m.role === "string" ? m.role : "?";
      const li = h("li", { class: "msg", dataset: { role } },
        h("div", { class: "role" }, role,
          typeof m.name === "string" ? h("span", { class: "muted" }, ` · ${m.name}`) : null,
          typeof m.tool_call_id === "string" ? h("span", { class: "muted" }, ` · answers ${m.tool_call_id}`) : null),
        messageContent(m.content));
      if (m.tool_calls !== undefined && m.tool_calls !== null) {
        li.appendChild(h("div", { class: "msg-extra" }, h("span", { class: "muted small" }, "tool calls"), prettyJson(m.tool_calls)));
      }
      ol.appendChild(li);
    });
    if (!messages.length) ol.appendChild(h("li", { class: "msg muted" }, "(no messages)"));
    return ol;
  }

  /** A message's content: a string, or OpenAI's list of parts (text, image_url, input_audio ...). */
  function messageContent(c) {
    if (typeof c === "string") return h("div", { class: "content" }, c);
    if (c === null || c === undefined) return h("div", { class: "content muted" }, "(no content)");
    if (!Array.isArray(c)) return prettyJson(c);
    return h("div", { class: "content" }, c.map((part) => {
      if (part && part.type === "text" && typeof part.text === "string") return h("div", { class: "part" }, part.text);
      const url = part && part.image_url && (typeof part.image_url === "string" ? part.image_url : part.image_url.url);
      if (typeof url === "string") {
        // Shown as its address, never fetched: it may point anywhere (or be a huge data: URL).
        return h("div", { class: "part" }, h("span", { class: "tag" }, "image"), " ",
          h("span", { class: "mono", title: short(url, 2000) }, short(url, 120)));
      }
      return h("div", { class: "part" }, h("span", { class: "tag" }, (part && part.type) || "part"), prettyJson(part));
    }));
  }

  function promptBlocks(p) {
    if (typeof p === "string") return h("div", { class: "prompt-block" }, p);
    if (Array.isArray(p) && p.length && p.every((x) => typeof x === "string")) {
      return h("div", null, p.map((x, i) => h("div", { class: "prompt-block" },
        h("span", { class: "muted small" }, `[${i}] `), x)));
    }
    // token ids, or a list of them per prompt
    return h("div", null, h("p", { class: "muted small" }, "The prompt as sent (not text):"), prettyJson(p));
  }

  // ---------------------------------------------------------------- diffing two answers

  /** One code unit per distinct element, so diffChars (an LCS over code units) diffs sequences. */
  function encodePair(a, b) {
    const codes = new Map();
    let next = 0x21;
    const enc = (seq) => {
      const out = [];
      for (const x of seq) {
        let c = codes.get(x);
        if (c === undefined) {
          if (next === 0xd800) next = 0xe000; // surrogates would pair up and change the lengths
          if (next > 0xfffd) return null;
          c = String.fromCharCode(next++);
          codes.set(x, c);
        }
        out.push(c);
      }
      return out.join("");
    };
    const ea = enc(a), eb = enc(b);
    return ea === null || eb === null ? null : [ea, eb];
  }

  function commonPrefix(a, b) {
    const n = Math.min(a.length, b.length);
    let i = 0;
    while (i < n && a[i] === b[i]) i++;
    return i;
  }

  /** Per element of each side: whether the other side lacks it (LCS). */
  function changedFlags(a, b) {
    const ra = new Array(a.length).fill(false), rb = new Array(b.length).fill(false);
    const enc = encodePair(a, b);
    if (!enc) {
      // more distinct elements than code units: everything after the common prefix
      const p = commonPrefix(a, b);
      ra.fill(true, p);
      rb.fill(true, p);
      return [ra, rb];
    }
    let i = 0, j = 0;
    for (const [op, t] of diffChars(enc[0], enc[1])) {
      for (let n = 0; n < t.length; n++) {
        if (op === "=") { i++; j++; } else if (op === "-") ra[i++] = true; else rb[j++] = true;
      }
    }
    return [ra, rb];
  }

  /** Ids when both sides have one per token (two ids can decode to the same text), else the
   * token strings: the comparator's rule, so the divergence found here is the one it scored. */
  function tokenKeys(ans) {
    const toks = ans.tokens;
    if (Array.isArray(ans.token_ids) && ans.token_ids.length === toks.length) return ans.token_ids;
    if (toks.every((t) => t.id !== undefined && t.id !== null)) return toks.map((t) => t.id);
    return null;
  }

  function unitsOf(ans, mode) {
    if (!ans) return [];
    if (mode === "token") return ans.tokens.map((t) => String(t.token === null || t.token === undefined ? "" : t.token));
    return (ans.text || "").match(WORDS) || [];
  }

  /** Where an offset falls: the index of the unit holding character `at`, or the unit count. */
  function unitAt(units, at) {
    let off = 0;
    for (let i = 0; i < units.length; i++) {
      off += units[i].length;
      if (at < off) return i;
    }
    return units.length;
  }

  /** Both answers split (tokens when both have them, else words), the changed units, and where
   * each side's first divergence is (a unit index; the unit count: "ends here"; -1: none). */
  function diffAnswers(ref, cand) {
    const mode = ref && cand && Array.isArray(ref.tokens) && Array.isArray(cand.tokens) ? "token" : "word";
    const ru = unitsOf(ref, mode), cu = unitsOf(cand, mode);
    let rk = ru, ck = cu;
    if (mode === "token") {
      const ri = tokenKeys(ref), ci = tokenKeys(cand);
      if (ri && ci) { rk = ri; ck = ci; }
    }
    const [rc, cc] = changedFlags(rk, ck);
    let first = { ref: -1, cand: -1, char: -1 };
    const rt = (ref && ref.text) || "", ct = (cand && cand.text) || "";
    // where the texts part, as the text score finds it (here in UTF-16 units, not code points)
    const at = rt === ct ? -1 : commonPrefix(rt, ct);
    if (mode === "token") {
      const p = commonPrefix(rk, ck);
      if (p < rk.length || p < ck.length) first = { ref: p, cand: p, char: at };
    } else if (at >= 0) {
      first = { ref: unitAt(ru, at), cand: unitAt(cu, at), char: at };
    }
    return { mode, ru, cu, rc, cc, first };
  }

  // ---------------------------------------------------------------- one choice's answers

  function verdictOf(sm, name) {
    return (sm.outputs || []).find((o) => o.output === name) || null;
  }

  function score(v, name) {
    return v && v.scores && typeof v.scores[name] === "number" ? v.scores[name] : null;
  }

  function choiceSection(sm, key) {
    const pv = sm.previews[key];
    const ref = isText(pv.reference) ? pv.reference : null;
    const cand = isText(pv.candidate) ? pv.candidate : null;
    const prefix = key.slice(0, key.length - "text".length); // "" or "choices[1]."
    const tv = verdictOf(sm, prefix + "text");
    const lv = verdictOf(sm, prefix + "logprobs");
    const d = diffAnswers(ref, cand);
    const sec = h("section", { class: "llm-choice", dataset: { choice: key, mode: d.mode } },
      h("h3", null, prefix ? `Answers · ${prefix.slice(0, -1)}` : "Answers"));
    const tRef = timing(ref, sm.reference), tCand = timing(cand, sm.candidate_side);
    const answers = h("div", { class: "llm-answers" },
      answerColumn("ref", "Reference", ref, null, timingLine(tRef, null), d.ru, d.rc, d.first.ref,
        score(tv, "ref_chars")),
      answerColumn("cand", `Candidate · ${sm.candidate || "?"}`, cand, ref, timingLine(tCand, tRef),
        d.cu, d.cc, d.first.cand, score(tv, "cand_chars")));
    sec.appendChild(verdictLine(d, tv, lv, answers));
    sec.appendChild(legend([["del", "only in reference"], ["ins", "only in candidate"], ["first", "first divergence"]]));
    sec.appendChild(answers);
    sec.appendChild(probabilities(ref, cand, d));
    return sec;
  }

  function verdictLine(d, tv, lv, answers) {
    const f = d.first;
    const parts = [];
    if (f.ref < 0) {
      const past = d.mode === "token" ? score(tv, "first_divergence_token") : score(tv, "first_divergence_char");
      parts.push(past !== null && past >= 0
        ? `the stored answers agree; they part at ${d.mode === "token" ? "token" : "character"} ${past}, past what was stored`
        : "the answers are identical");
    } else if (d.mode === "token") {
      parts.push(h("strong", { class: "first-div-label" },
        `first divergence at token ${f.ref}` + (f.char >= 0 ? ` (character ${f.char})` : "")));
    } else {
      // counted in words as a reader counts them (the units also hold spaces and punctuation)
      const [units, at] = f.ref < d.ru.length ? [d.ru, f.ref] : [d.cu, f.cand];
      const word = units.slice(0, at + 1).filter((u) => /\S/.test(u)).length;
      parts.push(h("strong", { class: "first-div-label" }, `first divergence at character ${f.char} (word ${word})`));
    }
    if (f.ref >= 0) {
      if (f.ref >= d.ru.length) parts.push(" — the reference ends there");
      else if (f.cand >= d.cu.length) parts.push(" — the candidate ends there");
    }
    const nums = [];
    if (score(tv, "similarity") !== null) nums.push(`similarity ${fmtNum(score(tv, "similarity"))}`);
    if (score(tv, "edit_distance") !== null) nums.push(`edit distance ${fmtNum(score(tv, "edit_distance"))}`);
    if (score(lv, "kl_mean") !== null) {
      nums.push(`KL mean ${fmtNum(score(lv, "kl_mean"))} · p99 ${fmtNum(score(lv, "kl_p99"))} · max ${fmtNum(score(lv, "kl_max"))}`);
    } else if (lv && lv.validity && lv.validity !== "ok") {
      nums.push(`KL: ${lv.validity}`);
    }
    const line = h("p", { class: "llm-verdict" }, parts, nums.length ? [" · ", nums.join(" · ")] : null,
      d.mode === "word" ? h("span", { class: "muted small" }, " (word diff: a side has no tokens)") : null);
    if (f.ref >= 0) {
      line.appendChild(document.createTextNode(" "));
      line.appendChild(h("button", { type: "button", class: "ghost jump-first",
        onclick: () => { answers.scrollIntoView({ block: "nearest" }); scrollToFirst(answers); } },
      "Show it"));
    }
    return line;
  }

  /** The answer's own timing (one per choice), else the side's (one per request), in ms. */
  function timing(ans, side) {
    const pick = (s0, m0) => ans && typeof ans[s0] === "number" ? ans[s0] * 1000
      : side && typeof side[m0] === "number" ? side[m0] : null;
    return { ttft: pick("ttft_s", "ttft_ms"), tpot: pick("tpot_s", "tpot_ms") };
  }

  function timingLine(t, ref) {
    const delta = (v, r) => v !== null && r !== null && r > 0
      ? h("span", { class: v <= r ? "good" : "warn" }, ` (${v > r ? "+" : ""}${((v - r) / r * 100).toFixed(0)}%)`)
      : null;
    return [
      h("span", { class: "ttft", title: "time to first token" }, `TTFT ${ms(t.ttft)}`, ref ? delta(t.ttft, ref.ttft) : null),
      " · ",
      h("span", { class: "tpot", title: t.tpot === null
        ? "time per output token: only for streamed answers of 2+ tokens" : "time per output token after the first" },
      `TPOT ${ms(t.tpot)}`, ref ? delta(t.tpot, ref.tpot) : null),
    ];
  }

  function answerColumn(cls, title, ans, other, timed, units, changed, first, fullChars) {
    const col = h("div", { class: "answer " + cls, dataset: { side: cls } });
    const head = h("div", { class: "answer-head" }, h("strong", null, title), " ", timed);
    if (ans) {
      head.appendChild(h("div", { class: "small" },
        h("span", { class: "finish" + (other && other.finish_reason !== ans.finish_reason ? " warn" : "") },
          `finish ${ans.finish_reason || "—"}`),
        " · ", usageText(ans.usage)));
    }
    col.appendChild(head);
    if (!ans) {
      col.appendChild(h("p", { class: "muted" }, "No answer for this choice."));
      return col;
    }
    if (ans.incomplete) {
      col.appendChild(h("p", { class: "incomplete" },
        "Incomplete: the stream ended early (the client left, the server cut it, or an error event came), so it was not compared."));
    }
    col.appendChild(answerText(ans, units, changed, first, cls));
    if (typeof fullChars === "number" && fullChars > (ans.text || "").length) {
      col.appendChild(h("p", { class: "muted small" },
        `Stored: the first ${(ans.text || "").length.toLocaleString()} of ${fullChars.toLocaleString()} characters.`));
    }
    if (typeof ans.tool_calls === "string" && ans.tool_calls) {
      col.appendChild(h("div", { class: "answer-extra" }, h("h4", null, "Tool calls"), jsonOrText(ans.tool_calls)));
    }
    if (ans.json_expected) {
      col.appendChild(h("div", { class: "answer-extra" }, h("h4", null, "Answer as JSON"), jsonOrText(ans.text || "")));
    }
    return col;
  }

  function usageText(u) {
    if (!u || typeof u !== "object" || !Object.keys(u).length) return h("span", { class: "muted" }, "usage not reported");
    const n = (x) => typeof x === "number" ? x.toLocaleString() : "?";
    return h("span", { class: "usage", title: JSON.stringify(u) },
      `usage ${n(u.prompt_tokens)} prompt + ${n(u.completion_tokens)} completion` +
      (typeof u.total_tokens === "number" ? ` = ${n(u.total_tokens)}` : "") + " tokens");
  }

  function jsonOrText(text) {
    try {
      return prettyJson(JSON.parse(text));
    } catch (e) {
      return h("div", null, h("p", { class: "warn small" }, "Not valid JSON: " + e.message),
        h("pre", { class: "json" }, text));
    }
  }

  /** The answer, each token (or word) its own span; changed ones marked, the first divergence
   * outlined. Text past the stored tokens follows, undiffed. */
  function answerText(ans, units, changed, first, cls) {
    const box = h("div", { class: "answer-text" });
    const toks = Array.isArray(ans.tokens) && units.length === ans.tokens.length ? ans.tokens : null;
    const mark = cls === "ref" ? "del" : "ins";
    units.forEach((u, i) => {
      const c = ["tok"];
      if (changed[i]) c.push(mark);
      if (i === first) c.push("first-div");
      box.appendChild(h("span", { class: c.join(" "), dataset: { i: String(i) },
        title: toks ? tokenTitle(toks[i], i) : null }, u));
    });
    if (first >= 0 && first >= units.length) {
      box.appendChild(h("span", { class: "tok end-mark first-div", title: "this answer ends here; the other goes on" }, "⟂ ends here"));
    }
    const shown = units.join("");
    const text = ans.text || "";
    if (toks && text.length > shown.length && text.startsWith(shown)) {
      box.appendChild(h("span", { class: "tail", title: "past the stored tokens: not diffed" }, text.slice(shown.length)));
    }
    if (!units.length && first < 0) box.appendChild(h("span", { class: "muted" }, "(no text)"));
    return box;
  }

  /** Scroll each answer box so its first divergence sits in view (the boxes scroll on their own). */
  function scrollToFirst(root) {
    for (const box of root.querySelectorAll(".answer-text")) {
      const m = box.querySelector(".first-div");
      if (m) box.scrollTop = Math.max(0, m.offsetTop - box.clientHeight / 3);
    }
  }

  // ---------------------------------------------------------------- token probabilities

  /** The chosen tokens' probabilities around the first divergence, both sides row by row. */
  function probabilities(ref, cand, d) {
    const rt = ref && Array.isArray(ref.tokens) ? ref.tokens : null;
    const ct = cand && Array.isArray(cand.tokens) ? cand.tokens : null;
    const wrap = h("div", { class: "llm-probs" }, h("h4", null, "Token probabilities around the first divergence"));
    if (!rt && !ct) {
      wrap.appendChild(h("p", { class: "muted small" }, "Neither side returned logprobs (ask for logprobs to see them)."));
      return wrap;
    }
    // The centre per side: the divergence's token (a word diff: the token holding its character).
    const centre = (toks, firstUnit) => {
      if (!toks) return -1;
      if (d.first.ref < 0) return Math.min(AROUND, Math.max(0, toks.length - 1));
      if (d.mode === "token") return firstUnit;
      return unitAt(toks.map((t) => String(t.token)), d.first.char);
    };
    const rc = centre(rt, d.first.ref), cc = centre(ct, d.first.cand);
    const table = h("table", { class: "lp-table" },
      h("thead", null, h("tr", null, h("th", null, "#"), h("th", null, "reference token"), h("th", null, "p"),
        h("th", null, "candidate token"), h("th", null, "p"))));
    const body = h("tbody");
    for (let r = -AROUND; r <= AROUND; r++) {
      const i = rc + r, j = cc + r;
      const a = rt && i >= 0 && i < rt.length ? rt[i] : null;
      const b = ct && j >= 0 && j < ct.length ? ct[j] : null;
      if (!a && !b) continue;
      const index = !rt ? j : !ct || i === j ? i : `${i} / ${j}`;
      body.appendChild(h("tr", { class: r === 0 && d.first.ref >= 0 ? "first" : null, dataset: { offset: String(r) } },
        h("td", { class: "muted" }, String(index)),
        tokenCell(a, i, d.rc[i] && d.mode === "token"), barCell(a, i, "ref"),
        tokenCell(b, j, d.cc[j] && d.mode === "token"), barCell(b, j, "cand")));
    }
    table.appendChild(body);
    wrap.appendChild(table);
    const at = [[rt, rc, "reference"], [ct, cc, "candidate"]].filter(([t, c]) => t && c >= 0 && c < t.length);
    if (d.first.ref >= 0 && at.length) {
      wrap.appendChild(h("p", { class: "small" }, "At the first divergence: ", at.map(([t, c, who], n) => [
        n ? "; " : "", `the ${who} chose ${quoted(t[c].token)} (p ${fmtNum(prob(t[c].logprob))})`,
        Array.isArray(t[c].top) && t[c].top.length
          ? `, its top-${t[c].top.length}: ` + t[c].top.map(([x, lp]) => `${quoted(x)} ${fmtNum(prob(lp))}`).join(", ")
          : ""])));
    }
    return wrap;
  }

  function tokenCell(tok, i, changed) {
    if (!tok) return h("td", { class: "muted" }, "—");
    return h("td", { class: "mono lp-tok" + (changed ? " changed" : ""), title: tokenTitle(tok, i) }, quoted(tok.token));
  }

  function barCell(tok, i, cls) {
    if (!tok) return h("td", null);
    const p = prob(tok.logprob);
    const svg = s("svg", { viewBox: `0 0 ${BAR_W} 12`, width: BAR_W, height: 12, class: "mini lp-bar", role: "img",
      "aria-label": p === null ? "no logprob" : `p ${fmtNum(p)}` },
    s("rect", { x: 0, y: 1, width: BAR_W, height: 10, class: "track" }),
    p === null ? null : s("rect", { x: 0, y: 1, width: Math.max(1, p * BAR_W), height: 10, class: "bar " + cls }));
    return h("td", { class: "mono small lp-p", title: tokenTitle(tok, i) }, svg, " ", p === null ? "—" : fmtNum(p));
  }

  // ---------------------------------------------------------------- the sample view

  function render(box, sm) {
    clear(box);
    box.appendChild(promptSection(sm));
    const keys = choiceKeys(sm);
    for (const key of keys) box.appendChild(choiceSection(sm, key));
    if (!keys.length) {
      box.appendChild(h("p", { class: "muted" },
        `No answers were stored with this sample (outcome: ${sm.outcome || "?"}); the raw answers are below.`));
    }
    // after layout: the view is shown once rendering returns
    requestAnimationFrame(() => scrollToFirst(box));
  }

  /** A stored body that is not JSON (an SSE stream): as UTF-8 text. */
  function textBody(b) {
    let text;
    try {
      const bin = atob(b.base64);
      const bytes = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
      text = new TextDecoder("utf-8").decode(bytes);
    } catch (e) {
      return h("p", { class: "note" }, `binary, ${(b.bytes || 0).toLocaleString()} bytes`);
    }
    const limit = 200000;
    return h("div", null, h("pre", { class: "json" }, text.length > limit ? text.slice(0, limit) : text),
      text.length > limit ? h("p", { class: "note" }, `Shown: the first ${limit.toLocaleString()} characters.`) : null,
      b.truncated ? h("p", { class: "note" },
        `Stored cut short: ${(b.bytes || 0).toLocaleString()} of ${(b.original_bytes || 0).toLocaleString()} bytes.`) : null);
  }

  // ---------------------------------------------------------------- the list

  const snippets = new Map(); // sample id -> Promise of {ref, cand, at}
  const queue = [];
  let inFlight = 0;
  const observed = new Set();
  let sweeping = false;
  const observer = typeof IntersectionObserver === "function"
    ? new IntersectionObserver((entries) => {
      for (const e of entries) {
        if (!e.isIntersecting) continue;
        observer.unobserve(e.target);
        observed.delete(e.target);
        queue.push(e.target);
      }
      pump();
    }, { rootMargin: "200px" })
    : null;

  /** The list holds no answers (its rows are summaries): a row's texts are fetched when it
   * comes into view, a few at a time, and kept for the page's life. */
  function listSnippet(item) {
    const el = h("div", { class: "llm-snip", dataset: { id: item.id } },
      h("div", { class: "muted small" }, "…"));
    const stored = item.snippet;
    if (stored && typeof stored.reference === "string" && typeof stored.candidate === "string") {
      // Samples recorded with their texts' snippet in the summary need no fetch of their own.
      const r = stored.reference, c = stored.candidate;
      fillSnippet(el, { ref: r, cand: c, at: r !== c ? commonPrefix(r, c) : -1 });
      return el;
    }
    if (!observer) { queue.push(el); pump(); return el; }
    observer.observe(el);
    observed.add(el);
    if (!sweeping) { sweeping = true; setTimeout(sweep, 0); }
    return el;
  }

  /** Rows of a list since reloaded (new filters) would never come into view: stop watching them.
   * Run after the rows being built now are in the page. */
  function sweep() {
    sweeping = false;
    for (const el of observed) {
      if (!el.isConnected) { observer.unobserve(el); observed.delete(el); }
    }
  }

  function pump() {
    while (inFlight < 3 && queue.length) {
      const el = queue.shift();
      if (!el.isConnected) continue; // the list was reloaded
      inFlight++;
      snippetOf(el.dataset.id)
        .then((sn) => fillSnippet(el, sn), (e) => {
          clear(el).appendChild(h("div", { class: "muted small", title: e.message }, "(texts unavailable)"));
        })
        .finally(() => { inFlight--; pump(); });
    }
  }

  function snippetOf(id) {
    let p = snippets.get(id);
    if (!p) {
      p = api("/api/samples/" + encodeURIComponent(id)).then(({ data }) => {
        const pv = (data.previews || {}).text || {};
        const rt = isText(pv.reference) ? pv.reference.text || "" : null;
        const ct = isText(pv.candidate) ? pv.candidate.text || "" : null;
        return { ref: rt, cand: ct, at: rt !== null && ct !== null && rt !== ct ? commonPrefix(rt, ct) : -1 };
      });
      p.catch(() => snippets.delete(id));
      snippets.set(id, p);
    }
    return p;
  }

  /** Both answers' first characters, or (a late divergence) from shortly before it; the part
   * after the divergence marked. */
  function fillSnippet(el, sn) {
    clear(el);
    const start = sn.at > SNIPPET * 0.6 ? sn.at - 30 : 0;
    const line = (cls, label, text) => {
      const row = h("div", { class: "snip " + cls }, h("span", { class: "snip-side" }, label));
      if (text === null) { row.appendChild(h("span", { class: "muted" }, "(no answer)")); return row; }
      const piece = text.slice(start, start + SNIPPET);
      const cut = sn.at >= 0 ? Math.max(0, sn.at - start) : piece.length;
      append(row, start > 0 ? "…" : "", piece.slice(0, cut));
      if (cut < piece.length) row.appendChild(h("span", { class: "snip-diff" }, piece.slice(cut)));
      if (start + SNIPPET < text.length) row.appendChild(document.createTextNode("…"));
      if (!text.length) row.appendChild(h("span", { class: "muted" }, "(empty)"));
      return row;
    };
    el.appendChild(line("ref", "ref", sn.ref));
    el.appendChild(line("cand", "cand", sn.cand));
  }

  function append(el, ...texts) {
    for (const t of texts) if (t) el.appendChild(document.createTextNode(t));
  }

  return { isLLM, isLLMProtocol, render, textBody, listSnippet };
};

// steerport playground: sliders for the loaded steers, unsteered vs steered continuations streamed
// side by side from /v1/completions, and the token-level explanation of LM-Steer steers.
// Plain script, no build step, no network besides this server.
"use strict";

const $ = (id) => document.getElementById(id);
let MODEL = null;
let STEERS = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value || sessionStorage.getItem("steerport-key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers() });
  const body = await r.json();
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

function keywordLine(label, items) {
  const line = el("div", { class: "kw" }, el("span", { class: "muted", text: label + " " }));
  for (const k of items.slice(0, 10)) line.append(el("code", { text: k.token }));
  return line;
}

function renderSteers() {
  const box = $("steers");
  box.textContent = "";
  if (!STEERS.length) { box.append(el("p", { class: "muted", text: "no steers loaded (serve with --steer NAME=FILE.st)" })); return; }
  for (const s of STEERS) {
    const [lo, hi] = s.allowed_range;
    const rec = s.recommended_range && s.recommended_range.range;
    const slider = el("input", { type: "range", min: String(Math.max(lo, -10)), max: String(Math.min(hi, 10)),
                                 step: "0.5", value: "0", id: "steer-" + s.name, "data-steer": s.name });
    const value = el("span", { class: "value", text: "0" });
    slider.addEventListener("input", () => { value.textContent = slider.value; });
    const card = el("div", { class: "steer" },
      el("div", { class: "head" }, el("b", { text: s.name }), el("span", { class: "muted", text: s.kind }), slider, value),
      el("div", { class: "ends" }, el("span", { text: "− opposite of " + (s.positive || "the + end") }),
                                   el("span", { text: rec ? "recommended " + rec[0] + " … " + rec[1] : "" }),
                                   el("span", { text: "+ " + (s.positive || "positive") })));
    if (s.keywords) {
      card.append(keywordLine("raises:", s.keywords.raised), keywordLine("lowers:", s.keywords.lowered));
    } else if (s.keywords_status === "pending") {
      card.append(el("div", { class: "kw muted", text: "keywords: computing…" }));
    }
    box.append(card);
  }
}

function steerValues() {
  const out = {};
  for (const s of STEERS) {
    const v = parseFloat($("steer-" + s.name).value);
    if (v !== 0) out[s.name] = v;
  }
  return out;
}

// POST /v1/completions with stream: true; calls onText for every text delta.
async function streamCompletion(body, onText) {
  const r = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }) });
  if (!r.ok) {
    const err = await r.json().catch(() => ({}));
    throw new Error((err.error && err.error.message) || r.statusText);
  }
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        for (const c of obj.choices) { if (c.text) onText(c.text); if (c.finish_reason) finish = c.finish_reason; }
      }
    }
  }
  return finish;
}

function showText(box, prompt) {
  box.textContent = "";
  box.append(el("span", { class: "prompt-part", text: prompt }));
  const gen = el("span", { class: "gen" });
  box.append(gen);
  return gen;
}

async function explain(text, values) {
  const out = $("explain");
  out.textContent = "";
  const lm = STEERS.filter((s) => s.kind === "lm-steer" && values[s.name]);
  $("explain-box").hidden = !lm.length || !text.trim();
  if ($("explain-box").hidden) return;
  for (const s of lm) {
    const v = Math.abs(values[s.name]);
    const r = await fetch("/v1/explain", { method: "POST", headers: headers(), body: JSON.stringify({ steer: s.name, text, value: v }) });
    const ex = await r.json();
    if (!r.ok) { out.append(el("p", { class: "error", text: ex.error.message })); continue; }
    $("explain-legend").textContent = "Δ = log p(+s) − log p(−s) per token of the steered continuation: green supports the + end, red the − end.";
    const div = el("div", { class: "ex", id: "explain-" + s.name });
    div.append(el("div", { class: "muted", text: s.name + " (" + (s.positive || "+") + "), score " + ex.score.toFixed(4) }));
    const top = Math.max(1e-9, ...ex.tokens.map((t) => Math.abs(t.delta)));
    let cursor = 0;
    for (const t of ex.tokens) {
      if (t.start > cursor) div.append(document.createTextNode(ex.text.slice(cursor, t.start)));
      const a = Math.min(Math.abs(t.delta) / top, 1).toFixed(2);
      const rgb = t.delta > 0 ? "40,160,60" : "210,50,50";
      const span = el("span", { class: "tok", title: "Δ = " + t.delta.toFixed(3), text: ex.text.slice(t.start, t.end) });
      span.style.background = "rgba(" + rgb + "," + a + ")";
      div.append(span);
      cursor = Math.max(cursor, t.end);
    }
    div.append(document.createTextNode(ex.text.slice(cursor)));
    out.append(div);
  }
}

async function generate() {
  const prompt = $("prompt").value;
  const values = steerValues();
  const common = { model: MODEL, prompt, max_tokens: parseInt($("max_tokens").value, 10) || 32,
                   temperature: parseFloat($("temperature").value) || 0, seed: parseInt($("seed").value, 10) || 0 };
  $("generate").disabled = true;
  $("status").textContent = "generating…";
  $("steer-summary").textContent = Object.entries(values).map(([k, v]) => k + " " + (v > 0 ? "+" : "") + v).join(", ") || "(all steers at 0)";
  const plain = showText($("plain"), prompt);
  const steered = showText($("steered"), prompt);
  let steeredText = "";
  try {
    // both requests are in flight together, so the server decodes them in one batch
    await Promise.all([
      streamCompletion(common, (t) => { plain.textContent += t; }),
      streamCompletion({ ...common, steers: values }, (t) => { steered.textContent += t; steeredText += t; }),
    ]);
    $("status").textContent = "explaining…";
    await explain(steeredText, values);
    $("status").textContent = "done";
  } catch (e) {
    $("status").textContent = "";
    $("steered").append(el("div", { class: "error", text: "error: " + e.message }));
  } finally {
    $("generate").disabled = false;
  }
}

async function load() {
  try {
    const models = await getJSON("/v1/models");
    MODEL = models.data[0].id;
    $("model").textContent = MODEL;
    STEERS = (await getJSON("/v1/steers")).data;
    renderSteers();
    if (STEERS.some((s) => s.keywords_status === "pending")) setTimeout(refreshKeywords, 2000);
  } catch (e) {
    $("keybox").hidden = false;
    $("steers").textContent = "could not load steers: " + e.message;
  }
}

async function refreshKeywords() {
  try {
    const fresh = (await getJSON("/v1/steers")).data;
    const values = steerValues();
    STEERS = fresh;
    renderSteers();
    for (const [k, v] of Object.entries(values)) { $("steer-" + k).value = v; }
    for (const s of STEERS) { $("steer-" + s.name).dispatchEvent(new Event("input")); }
    if (STEERS.some((s) => s.keywords_status === "pending")) setTimeout(refreshKeywords, 2000);
  } catch (e) { /* keep the current sliders */ }
}

$("generate").addEventListener("click", generate);
$("apikey").addEventListener("change", () => { sessionStorage.setItem("steerport-key", $("apikey").value); load(); });
load();

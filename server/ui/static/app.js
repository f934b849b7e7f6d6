// The page over influence-index's JSON API (server/ui/__init__.py). Every text from the
// service is set with textContent, never parsed as HTML.
"use strict";

const form = document.getElementById("query-form");
const statusLine = document.getElementById("status");
const errorBox = document.getElementById("error");
const hitList = document.getElementById("hits");
const versionFields = document.getElementById("version-fields");
let maxAttributionExamples = 0;

// Builds an element with a class and text (as text, never markup).
function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(error) {
  errorBox.textContent = `${error.code}: ${error.message}`;
  errorBox.hidden = false;
  statusLine.textContent = "";
}

// The {code, message} of a failed HTTP call: the service's, or what the page server said.
async function failure(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body.error) return body.error;
  } catch (_) {
    // not JSON: shown as it came
  }
  return { code: `HTTP ${response.status}`, message: text || response.statusText };
}

function enumName(value, prefix) {
  return String(value).replace(prefix, "").toLowerCase();
}

// --- the served version ---

// The page server's answer to a request, or null once its failure is shown on the page.
async function request(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (exc) {
    showError({ code: "UNAVAILABLE", message: `the page server did not answer: ${exc.message}` });
    return null;
  }
  if (!response.ok) {
    showError(await failure(response));
    return null;
  }
  return response;
}

function postJson(body) {
  return {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  };
}

async function loadInfo() {
  const response = await request("/api/info");
  if (!response) return;
  const info = await response.json();
  maxAttributionExamples = info.max_attribution_examples;
  const rows = [
    ["version", info.version || "(none)"],
    ["serving", info.serving ? "yes" : "no"],
    ["built", info.build_time],
    ["model", info.model_path],
    ["examples", Number(info.n_examples).toLocaleString("en")],
    ["dimension", String(info.dim)],
    ["allocation", info.allocation || "(not recorded)"],
    ["tracked", `${(100 * (info.tracked_parameter_share || 0)).toFixed(1)} % of block parameters`],
    ["score", enumName(info.score_kind, "SCORE_KIND_")],
    ["factory", info.faiss_factory],
    ["retrieval", info.retrieval_code ? `${info.retrieval_code} first, ${info.retrieval_candidates} candidates re-scored` : "flat scan"],
    ["re-rank", info.rerank_available ? `available (default depth ${info.rerank_depth})` : "not available"],
    ["lexical candidates", info.lexical_available ? "available" : "not available"],
    ["pending version", info.pending_version || "none"],
    ["last reload error", info.last_reload_error || "none"],
  ];
  versionFields.replaceChildren();
  for (const [name, value] of rows) {
    const dd = element("dd", "", value);
    dd.dataset.field = name;
    if (name === "last reload error" && info.last_reload_error) dd.classList.add("problem");
    versionFields.append(element("dt", "", name), dd);
  }
}

// --- the query ---

function formFields() {
  const data = new FormData(form);
  return {
    prompt: data.get("prompt"),
    completion: data.get("completion"),
    top_k: data.get("top_k"),
    score_kind: data.get("score_kind"),
    rerank_depth: data.get("rerank_depth"),
    lexical_candidates: data.get("lexical_candidates"),
  };
}

async function ask(event) {
  event.preventDefault();
  const fields = formFields();
  const started = performance.now();
  // What arrived and when (ms after submit), for whoever drives the page.
  delete document.body.dataset.firstAnswerMs;
  delete document.body.dataset.finalAnswerMs;
  document.body.dataset.answers = "";
  errorBox.hidden = true;
  hitList.replaceChildren();
  statusLine.textContent = "asking…";
  const response = await request("/api/query", postJson(fields));
  if (!response) return;
  for await (const line of jsonLines(response.body)) {
    if (line.error) {
      showError(line.error);
      return;
    }
    const elapsed = performance.now() - started;
    showAnswer(line.response, line.groups, elapsed);
    document.body.dataset.answers += line.response.final ? "final " : "sketch ";
    if (document.body.dataset.firstAnswerMs === undefined) {
      document.body.dataset.firstAnswerMs = elapsed.toFixed(1);
    }
    if (line.response.final) {
      document.body.dataset.finalAnswerMs = elapsed.toFixed(1);
      await attribute(fields, line.response.influences, line.groups);
    }
  }
  loadInfo();
}

// Parsed NDJSON lines of a streamed body, each as soon as it is complete.
async function* jsonLines(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    let end;
    while ((end = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, end);
      buffered = buffered.slice(end + 1);
      if (line.trim()) yield JSON.parse(line);
    }
  }
  if (buffered.trim()) yield JSON.parse(buffered);
}

function showAnswer(answer, groups, elapsedMs) {
  const stage = answer.final ? "answer" : "sketch answer (estimates; the exact one follows)";
  let said = `${stage} from ${answer.index_version} in ${elapsedMs.toFixed(0)} ms`;
  if (answer.final && answer.candidates_reranked) {
    const stop = enumName(answer.rerank_stop, "RERANK_STOP_");
    said += `, ${answer.candidates_reranked} candidates re-ranked exactly (stopped: ${stop})`;
  }
  statusLine.textContent = said;
  hitList.replaceChildren(...groups.map((group) => hitItem(answer.influences, group)));
}

function hitItem(hits, group) {
  const hit = hits[group[0]];
  const item = element("li", "hit");
  item.dataset.exampleId = hit.example_id;
  const head = element("div", "hit-head");
  head.append(
    element("span", "rank", `#${group[0] + 1}`),
    element("span", "score", Number(hit.score).toPrecision(4)),
    element("span", `badge ${hit.exact ? "exact" : "estimate"}`, hit.exact ? "exact" : "estimate"),
    element("span", "doc", `${hit.doc_id} #${hit.chunk}`),
  );
  if (group.length > 1) {
    const ranks = group.map((i) => i + 1).join(", ");
    const docs = group.map((i) => hits[i].doc_id).join(", ");
    const copies = element("span", "copies", `×${group.length} identical texts, ranks ${ranks}`);
    copies.title = `documents: ${docs}`;
    head.append(copies);
  }
  item.append(head, element("div", "text", hit.text), element("div", "heatmap"));
  item.append(layerBars(hit.layer_scores || {}, group[0] === 0));
  return item;
}

// The hit's score per tracked module, as bars (open for the top hit).
function layerBars(layerScores, open) {
  const details = element("details", "layer-scores");
  details.open = open;
  details.append(element("summary", "", "layer scores (sketch estimates)"));
  const box = element("div", "layers");
  details.append(box);
  const entries = Object.entries(layerScores);
  const peak = Math.max(0, ...entries.map(([, v]) => Math.abs(v)));
  for (const [name, value] of entries) {
    const bar = element("div", `layer-bar ${value >= 0 ? "positive" : "negative"}`);
    bar.style.width = `${peak ? (100 * Math.abs(value)) / peak : 0}%`;
    bar.title = `${name}: ${Number(value).toPrecision(4)}`;
    box.append(element("span", "layer-name", name), bar);
  }
  return details;
}

// --- token heatmaps ---

async function attribute(fields, hits, groups) {
  const ids = groups.map((group) => hits[group[0]].example_id).slice(0, maxAttributionExamples);
  if (!ids.length) return;
  statusLine.textContent += "; token attributions…";
  const response = await request(
    "/api/attribute",
    postJson({ prompt: fields.prompt, completion: fields.completion, example_ids: ids }),
  );
  if (!response) return;
  const answer = await response.json();
  for (const attribution of answer.attributions) {
    const item = hitList.querySelector(`li[data-example-id="${attribution.example_id}"]`);
    if (!item) continue;
    heatmap(item.querySelector(".heatmap"), attribution);
    item.querySelector(".text").hidden = true; // the heatmap shows the same text, shaded
  }
  statusLine.textContent = statusLine.textContent.replace("; token attributions…", "");
}

// Shades each token by its share of the largest |score|: green raises the completion's
// probability, red lowers it; the score is under the pointer.
function heatmap(box, attribution) {
  const peak = Math.max(0, ...attribution.scores.map(Math.abs));
  const tokens = attribution.tokens.map((token, i) => {
    const score = attribution.scores[i];
    const span = element("span", "token", token);
    const strength = peak ? Math.abs(score) / peak : 0;
    const hue = score >= 0 ? "56, 161, 105" : "229, 62, 62";
    span.style.backgroundColor = `rgba(${hue}, ${strength.toFixed(3)})`;
    span.title = `${score >= 0 ? "+" : ""}${Number(score).toPrecision(3)}`;
    return span;
  });
  const total = element("span", "total", `token influence, summed: ${Number(attribution.total).toPrecision(4)}`);
  box.replaceChildren(...tokens, total);
}

form.addEventListener("submit", ask);
loadInfo();

"""The screening app's one page (`anemia_jax.app`): HTML with its CSS and JavaScript inline, nothing fetched from
elsewhere (the server's Content-Security-Policy forbids it too), so it works on a machine with no network.

The script asks the server for its settings (``GET /api/info``), sends each chosen photo as the raw body of
``POST /api/photo?name=...&sex=...`` (no multipart form: one photo per request, the size checked before sending),
and shows per photo the overlay and, when the server provides them, the usable / retake verdict, ONE answer (retake,
likely anemic, likely not anemic, or unclear: confirm with a blood test; `anemia_jax.screening.wording`) and the Hb
estimate with its range explained in one sentence and the WHO threshold it was compared with -- for a photo to
retake no number at all, in the summary table as on the card -- and, in a collapsible "Technical details", the mask
areas (at the photo's size), the anemia probability (from colour alone), the quality measures and the colour check.
The uncertainty map colours only the region the verdict reads, with its scale. A banner says where the Hb model came
from (PHANTOM for synthetic training photos) and the research-use notice stays on screen. Every text from the server
or a file name is inserted with ``textContent`` (never as HTML). The CSV link lists the ids of this batch's results
(``GET /results.csv?ids=...``).
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Conjunctiva screening</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #23395d; color: #fff; padding: 0.8rem 1rem; }
  header h1 { font-size: 1.25rem; margin: 0; }
  header p { margin: 0.2rem 0 0; font-size: 0.85rem; opacity: 0.85; }
  main { max-width: 1100px; margin: 0 auto; padding: 1rem; }
  .panel { background: #fff; border-radius: 8px; padding: 1rem; margin-bottom: 1rem;
           box-shadow: 0 1px 3px rgba(0,0,0,0.12); }
  .controls { display: flex; flex-wrap: wrap; gap: 0.8rem; align-items: center; }
  label.button { background: #2f6fdf; color: #fff; padding: 0.6rem 1rem; border-radius: 6px; cursor: pointer; }
  label.button input { display: none; }
  #error { color: #a31515; font-weight: 600; white-space: pre-line; }
  #error:empty, #status:empty { display: none; }
  .card { display: grid; grid-template-columns: minmax(0, 1.4fr) minmax(0, 1fr); gap: 1rem; }
  @media (max-width: 700px) { .card { grid-template-columns: 1fr; } }
  .card img { width: 100%; max-height: 60vh; object-fit: contain; border-radius: 4px; background: #222; }
  .card img.uncertainty { max-height: 35vh; }
  .card h2 { font-size: 1rem; margin: 0 0 0.5rem; word-break: break-all; }
  table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
  th, td { text-align: left; padding: 0.25rem 0.4rem; border-bottom: 1px solid #e3e5ea; }
  .swatch { display: inline-block; width: 0.9rem; height: 0.9rem; border-radius: 2px; vertical-align: middle;
            margin-right: 0.3rem; border: 1px solid #0003; }
  .verdict { display: inline-block; padding: 0.2rem 0.6rem; border-radius: 4px; font-weight: 700; }
  .verdict.usable { background: #dff3e2; color: #17612a; }
  .verdict.retake { background: #ffe6c7; color: #8a4500; }
  .screening { margin-top: 0.6rem; padding: 0.6rem; background: #f0f4fb; border-radius: 6px; }
  .failed { color: #a31515; }
  a#csv { font-weight: 600; }
  a#csv[aria-disabled="true"] { pointer-events: none; color: #999; }
  .muted { color: #666; font-size: 0.85rem; }
  .notice { background: #fff3cd; color: #5c4300; padding: 0.5rem 1rem; font-weight: 600; margin: 0; }
  #banner { padding: 0.6rem 1rem; font-weight: 600; margin: 0; }
  #banner:empty { display: none; }
  #banner.phantom, #banner.unknown { background: #b3261e; color: #fff; }
  #banner.real { background: #e8eef9; color: #1d2330; }
  .answer { font-size: 1.1rem; font-weight: 700; margin: 0.2rem 0; }
  .answer.likely_anemic, .answer.unclear { color: #8a4500; }
  .answer.likely_not_anemic { color: #17612a; }
  .answer.retake { color: #8a4500; }
  .origin { color: #b3261e; font-weight: 600; font-size: 0.85rem; }
  .origin.real { color: #444; font-weight: 400; }
  details { margin-top: 0.6rem; }
  summary { cursor: pointer; color: #23395d; }
  .legend { display: flex; align-items: center; gap: 0.4rem; font-size: 0.8rem; color: #444; }
  .legend .bar { flex: 1; height: 0.7rem; border-radius: 3px;
                 background: linear-gradient(to right, rgb(40,90,210), rgb(250,210,60), rgb(225,40,40)); }
</style>
</head>
<body>
<header>
  <h1>Conjunctiva screening</h1>
  <p id="about">Loading the model&hellip;</p>
</header>
<p class="notice" id="notice">Research use only: not a diagnosis. Confirm anemia with a blood test.</p>
<p id="banner" role="note"></p>
<main>
  <section class="panel">
    <div class="controls">
      <label class="button">Take a photo
        <input id="camera" type="file" accept="image/*" capture="environment"></label>
      <label class="button">Choose photos
        <input id="photos" type="file" accept="image/*" multiple></label>
      <label id="sex-field" hidden>Sex
        <select id="sex"><option value="">unknown</option><option value="F">female</option>
        <option value="M">male</option></select>
        <span class="muted" id="sex-help">(sets the WHO anemia threshold the Hb range is compared with)</span></label>
      <a id="csv" href="#" download="screening.csv" aria-disabled="true">Download CSV</a>
      <button id="clear" type="button">Clear</button>
    </div>
    <p id="status" role="status" class="muted"></p>
    <p id="error" role="alert"></p>
    <p class="muted">Photos are analysed on this computer only; nothing is sent anywhere else.</p>
  </section>
  <section id="summary" class="panel" hidden>
    <table><thead><tr id="summary-head"></tr></thead><tbody id="summary-body"></tbody></table>
  </section>
  <section id="results"></section>
</main>
<script>
"use strict";
let info = null;
const ids = [];
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function pct(x) { return (100 * x).toFixed(1) + " %"; }
function num(x, d) { return (x === null || x === undefined || !isFinite(x)) ? "n/a" : Number(x).toFixed(d); }

function updateCsv() {
  const a = $("csv");
  if (ids.length) { a.href = "/results.csv?ids=" + ids.join(","); a.setAttribute("aria-disabled", "false"); }
  else { a.href = "#"; a.setAttribute("aria-disabled", "true"); }
}

function hbText(s) {
  return num(s.hgb, 1) + " g/dL (likely range " + num(s.hgb_lo, 1) + " to " + num(s.hgb_hi, 1) + ")";
}

function addSummaryRow(r) {
  $("summary").hidden = false;
  const tr = el("tr");
  tr.dataset.result = r.id;
  tr.appendChild(el("td", r.name));
  tr.appendChild(el("td", r.verdict ? (r.verdict.label === "usable" ? "usable" : "retake") : "n/a", "quality"));
  if (info.screening) {
    const s = r.screening;
    // One answer per photo; a photo to retake has no Hb (the server sends none) and says why.
    tr.appendChild(el("td", s ? s.answer_text : "n/a", "answer"));
    tr.appendChild(el("td", s && s.hgb !== null ? hbText(s) : "none: " + (s ? s.answer_why : "not screened"),
                      "hb"));
  } else {
    for (const t of r.targets) tr.appendChild(el("td", pct(t.fraction)));
  }
  $("summary-body").appendChild(tr);
}

function technicalDetails(r) {
  const d = el("details");
  d.appendChild(el("summary", "Technical details"));
  const table = el("table", null, "areas");
  const head = el("tr");
  for (const h of ["Mask (model target)", "Share of the photo", "Pixels"]) head.appendChild(el("th", h));
  table.appendChild(head);
  for (const t of r.targets) {
    const tr = el("tr");
    const name = el("td");
    const sw = el("span", null, "swatch");
    sw.style.background = t.colour;
    name.appendChild(sw);
    name.appendChild(document.createTextNode(t.name));
    tr.appendChild(name);
    tr.appendChild(el("td", pct(t.fraction), "fraction"));
    tr.appendChild(el("td", t.pixels.toLocaleString()));
    table.appendChild(tr);
  }
  d.appendChild(table);
  const ul = el("ul");
  if (r.measures) {
    ul.appendChild(el("li", "Mean uncertainty inside the outline: " + num(r.measures.mean_uncertainty, 2) +
                            " bits (limit " + num(info.max_uncertainty, 2) + "); brightness " +
                            num(r.measures.brightness, 2) + "; washed-out share " + pct(r.measures.clipped_fraction)));
  }
  const s = r.screening;
  if (s) {
    ul.appendChild(el("li", "Probability of anemia from colour alone (does not use sex): " +
                            (s.p_anemia === null ? "not reported" : num(s.p_anemia, 2) + " (called anemic at >= " +
                             num(s.threshold, 2) + ")")));
    ul.appendChild(el("li", "Colour check: " + (s.colour_check || "within the training photos' range") +
                            (s.colour_range === null ? "" : " (distance / limit " + num(s.colour_range, 2) + ")")));
    if (s.note) ul.appendChild(el("li", "Screening note: " + s.note));
  }
  ul.appendChild(el("li", r.width + " x " + r.height + " px, analysed in " + num(r.seconds, 2) + " s"));
  ul.appendChild(el("li", info.description));
  d.appendChild(ul);
  return d;
}

function screeningBox(r) {
  const s = r.screening, box = el("div", null, "screening");
  const a = el("p", s.answer_text, "answer " + s.answer);
  a.dataset.answer = s.answer;
  box.appendChild(a);
  if (s.answer !== "retake") box.appendChild(el("p", s.answer_why, "why"));  // a retake's reasons are listed above
  if (s.hgb === null) {
    box.appendChild(el("p", "No Hb estimate for a photo to retake.", "hgb"));
  } else {
    const sex = {F: "women", M: "men"}[s.sex] || "sex unknown";
    box.appendChild(el("p", "Hb estimate: " + hbText(s), "hgb"));
    box.appendChild(el("p", info.interval_sentence, "muted"));
    box.appendChild(el("p", "WHO anemia threshold: " + num(s.who_threshold, 0) + " g/dL (" + sex + ")", "who"));
  }
  box.appendChild(el("p", s.provenance, "origin " + s.provenance_kind));
  return box;
}

function showResult(r) {
  const card = el("article", null, "panel card");
  card.dataset.result = r.id;
  const left = el("div");
  const img = el("img");
  img.alt = "Overlay of the predicted masks on " + r.name;
  img.className = "overlay";
  img.src = r.overlay;
  left.appendChild(img);
  const right = el("div");
  right.appendChild(el("h2", r.name));
  if (r.verdict) {
    const v = el("span", r.verdict.label === "usable" ? "Photo usable" : "Retake the photo",
                 "verdict " + r.verdict.label);
    v.dataset.verdict = r.verdict.label;
    right.appendChild(v);
    if (r.verdict.reasons.length) {
      const ul = el("ul");
      for (const reason of r.verdict.reasons) ul.appendChild(el("li", reason));
      right.appendChild(ul);
    }
  }
  if (r.screening) right.appendChild(screeningBox(r));
  if (r.uncertainty) {
    right.appendChild(el("p", "How sure the outline is, inside the region it found:", "muted"));
    const u = el("img");
    u.alt = "Uncertainty map of " + r.name;
    u.className = "uncertainty";
    u.src = r.uncertainty;
    right.appendChild(u);
    const legend = el("div", null, "legend");
    legend.appendChild(el("span", "sure"));
    legend.appendChild(el("span", null, "bar"));
    legend.appendChild(el("span", "unsure"));
    right.appendChild(legend);
  }
  right.appendChild(technicalDetails(r));
  card.appendChild(left);
  card.appendChild(right);
  $("results").prepend(card);
  addSummaryRow(r);
}

async function send(file) {
  if (file.size > info.max_upload_bytes) {
    throw new Error(file.name + ": the file is " + (file.size / 1e6).toFixed(1) + " MB; the limit is " +
                    (info.max_upload_bytes / 1e6).toFixed(0) + " MB. Send a smaller photo.");
  }
  const query = "name=" + encodeURIComponent(file.name) + "&sex=" + encodeURIComponent($("sex").value);
  let response;
  try {
    response = await fetch("/api/photo?" + query, {method: "POST", body: file,
                            headers: {"Content-Type": "application/octet-stream"}});
  } catch (e) {
    throw new Error(file.name + ": the server did not answer (" + e.message + "). Is it still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok || !body || body.error) {
    throw new Error(file.name + ": " + (body && body.error ? body.error : "the server answered " + response.status));
  }
  return body;
}

async function analyse(files) {
  $("error").textContent = "";
  const errors = [];
  let n = 0;
  for (const file of files) {
    n += 1;
    $("status").textContent = "Analysing " + file.name + " (" + n + " of " + files.length + ")...";
    try {
      const r = await send(file);
      ids.push(r.id);
      showResult(r);
      updateCsv();
    } catch (e) {
      errors.push(e.message);
      $("error").textContent = errors.join("\\n");
    }
  }
  $("status").textContent = "Done: " + (files.length - errors.length) + " of " + files.length + " photo(s) analysed.";
}

for (const id of ["camera", "photos"]) {
  $(id).addEventListener("change", (ev) => {
    const files = Array.from(ev.target.files || []);
    ev.target.value = "";
    if (files.length) analyse(files);
  });
}
$("clear").addEventListener("click", () => {
  ids.length = 0; updateCsv();
  $("results").textContent = ""; $("summary-body").textContent = ""; $("summary").hidden = true;
  $("error").textContent = ""; $("status").textContent = "";
});

fetch("/api/info").then((r) => r.json()).then((i) => {
  info = i;
  $("about").textContent = i.screening ? "Photo quality and an Hb estimate from the colour of the inner eyelid; " +
    "running on this computer only." : "Photo quality from the outline of the inner eyelid; running on this " +
    "computer only.";
  $("notice").textContent = i.notice;
  if (i.provenance) { $("banner").textContent = i.provenance.long; $("banner").className = i.provenance.kind; }
  $("sex-field").hidden = !i.screening;
  const head = $("summary-head");
  for (const h of ["Photo", "Photo quality"].concat(i.screening ? ["Answer", "Hb estimate"] :
                                                    i.targets.map((t) => t + " area")))
    head.appendChild(el("th", h));
  document.body.dataset.ready = "true";
}).catch((e) => { $("error").textContent = "Could not reach the server: " + e.message; });
</script>
</body>
</html>
"""

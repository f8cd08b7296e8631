"""The screening app's one page (`anemia_jax.app`): HTML with its CSS and JavaScript inline, nothing fetched from
elsewhere (the server's Content-Security-Policy forbids it too), so it works on a machine with no network.

The script asks the server for its settings (``GET /api/info``), sends each chosen photo as the raw body of
``POST /api/photo?name=...&sex=...`` (no multipart form: one photo per request, the size checked before sending),
and shows per photo the overlay, the mask areas, and, when the server provides them, the uncertainty map, the
usable / retake verdict and the Hb estimate with its interval and the anemia probability. Every text from the server
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
</style>
</head>
<body>
<header>
  <h1>Conjunctiva screening</h1>
  <p id="about">Loading the model&hellip;</p>
</header>
<main>
  <section class="panel">
    <div class="controls">
      <label class="button">Take a photo
        <input id="camera" type="file" accept="image/*" capture="environment"></label>
      <label class="button">Choose photos
        <input id="photos" type="file" accept="image/*" multiple></label>
      <label id="sex-field" hidden>Sex
        <select id="sex"><option value="">unknown</option><option value="F">female</option>
        <option value="M">male</option></select></label>
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

function addSummaryRow(r) {
  $("summary").hidden = false;
  const tr = el("tr");
  tr.appendChild(el("td", r.name));
  for (const t of r.targets) tr.appendChild(el("td", pct(t.fraction)));
  tr.appendChild(el("td", r.verdict ? r.verdict.label : "n/a"));
  if (info.screening) {
    const s = r.screening;
    tr.appendChild(el("td", s && s.hgb !== null ? num(s.hgb, 1) + " g/dL" : "n/a"));
    tr.appendChild(el("td", s && s.p_anemia !== null ? num(s.p_anemia, 2) : "n/a"));
  }
  $("summary-body").appendChild(tr);
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
  right.appendChild(el("p", r.width + " x " + r.height + " px, analysed in " + num(r.seconds, 2) + " s", "muted"));
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
  const table = el("table", null, "areas");
  const head = el("tr");
  for (const h of ["Region", "Area of photo", "Pixels"]) head.appendChild(el("th", h));
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
  right.appendChild(table);
  if (r.screening) {
    const s = r.screening, box = el("div", null, "screening");
    if (r.verdict && r.verdict.label === "retake") {
      box.appendChild(el("p", "Hb is not reported for a photo to retake."));
    } else if (s.hgb === null) {
      box.appendChild(el("p", "No Hb estimate: " + (s.note || "no colour could be read")));
    } else {
      box.appendChild(el("p", "Hb estimate: " + num(s.hgb, 1) + " g/dL (" + Math.round(100 * s.coverage) +
                              " % interval " + num(s.hgb_lo, 1) + " to " + num(s.hgb_hi, 1) + ")", "hgb"));
      box.appendChild(el("p", "Probability of anemia: " + num(s.p_anemia, 2) + " (" + s.call + "; WHO threshold " +
                              num(s.who_threshold, 1) + " g/dL)", "anemia"));
      if (s.note) box.appendChild(el("p", s.note, "muted"));
    }
    right.appendChild(box);
  }
  if (r.uncertainty) {
    right.appendChild(el("p", "Uncertainty of the masks (black: certain, yellow to white: unsure)", "muted"));
    const u = el("img");
    u.alt = "Uncertainty map of " + r.name;
    u.className = "uncertainty";
    u.src = r.uncertainty;
    right.appendChild(u);
  }
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
  $("about").textContent = i.description;
  $("sex-field").hidden = !i.screening;
  const head = $("summary-head");
  for (const h of ["Photo"].concat(i.targets.map((t) => t + " area"), ["Verdict"],
                   i.screening ? ["Hb", "P(anemia)"] : [])) head.appendChild(el("th", h));
  document.body.dataset.ready = "true";
}).catch((e) => { $("error").textContent = "Could not reach the server: " + e.message; });
</script>
</body>
</html>
"""

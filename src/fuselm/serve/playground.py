"""The page at `/`: type a prompt, watch the answer stream in, each span in the colour of the
model that won it (the stream's `fuselm.spans`, as `generate --html` colours a trace)."""

from __future__ import annotations

import json

from ..viz import PALETTE

PLAYGROUND_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>fuselm playground</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; line-height: 1.5; }
textarea { width: 100%; height: 6rem; font: inherit; }
#answer { white-space: pre-wrap; border: 1px solid #ddd; padding: 1rem; border-radius: 6px; min-height: 3rem; }
.s { border-radius: 3px; padding: 0 1px; }
.meta { color: #777; font-size: 0.9rem; }
label { margin-right: 1rem; }
</style></head><body>
<h2>fuselm playground</h2>
<p><label>model <select id="model"></select></label>
<label>max tokens <input id="max" type="number" value="64" min="1" style="width:5rem"></label>
<label>API key <input id="key" type="password" style="width:10rem"></label></p>
<textarea id="prompt">What is the capital of France?</textarea>
<p><button id="go">Generate</button> <span id="status" class="meta"></span></p>
<div id="answer"></div>
<p id="legend" class="meta"></p>
<script>
const PALETTE = __PALETTE__;
const $ = (id) => document.getElementById(id);
function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}
async function loadModels() {
  const r = await fetch("/v1/models", {headers: headers()});
  const body = await r.json();
  $("model").innerHTML = "";
  for (const m of body.data || []) {
    const o = document.createElement("option");
    o.value = m.id; o.dataset.models = JSON.stringify(m.models); o.textContent = m.id + " (" + m.method + ": " + m.models.join(" + ") + ")";
    $("model").appendChild(o);
  }
}
let colours = {};
function legend(models) {
  colours = {};
  models.forEach((m, i) => { colours[m] = PALETTE[i % PALETTE.length]; });
  $("legend").textContent = "";
  for (const m of models) {
    const s = document.createElement("span");
    s.className = "s"; s.style.background = colours[m]; s.textContent = m;
    $("legend").appendChild(s); $("legend").appendChild(document.createTextNode(" "));
  }
}
function show(text, source) {
  // a span per piece of streamed text, coloured by the model that won it
  const span = document.createElement("span");
  span.className = "s"; span.textContent = text; span.title = source || "";
  span.style.background = source ? (colours[source] || "#eeeeee") : "transparent";
  $("answer").appendChild(span);
}
async function generate() {
  $("answer").textContent = ""; $("status").textContent = "generating...";
  const option = $("model").selectedOptions[0];
  legend(option ? JSON.parse(option.dataset.models) : []);
  const body = {model: $("model").value, stream: true, max_tokens: parseInt($("max").value),
                messages: [{role: "user", content: $("prompt").value}], fuselm: {trace: true}};
  const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!r.ok) { const e = await r.json(); $("status").textContent = "error: " + e.error.message; return; }
  const reader = r.body.getReader(); const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\\n")) >= 0) {
      const line = buf.slice(0, i).trim(); buf = buf.slice(i + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") { $("status").textContent = "done"; continue; }
      const msg = JSON.parse(data);
      if (msg.error) { $("status").textContent = "error: " + msg.error.message; continue; }
      for (const c of msg.choices || []) {
        if (c.fuselm && c.fuselm.spans) { for (const sp of c.fuselm.spans) show(sp.text, sp.source); }
        else if (c.delta && c.delta.content) show(c.delta.content, null);
      }
    }
  }
}
$("go").onclick = generate;
$("key").onchange = loadModels;
loadModels();
</script>
</body></html>
""".replace("__PALETTE__", json.dumps(PALETTE))

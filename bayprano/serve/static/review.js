"use strict";
const $ = (id) => document.getElementById(id);
const site = () => $("site").value.trim();
// Server data goes into the page as text or attributes only, never as markup.
function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}
const fmt = (v, d = 3) => (v === null || v === undefined) ? "-" : Number(v).toFixed(d);

function status(message, error = false) {
  $("status").textContent = message;
  $("status").className = error ? "error" : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const token = $("token").value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = await response.json().catch(() => ({ code: "bad_response", message: response.statusText }));
  if (!response.ok) throw new Error(body.message || response.statusText);
  return body;
}

async function loadSites() {
  // Every site with the admin token; a site's own token only opens that site, named by hand or by ?site=.
  try {
    const body = await api("/v1/sites");
    const names = body.sites.map((s) => s.site);
    $("sites").replaceChildren(...names.map((n) => el("option", { value: n })));
    if (!site() && names.length) $("site").value = names[0];
  } catch (e) { /* not the admin token */ }
}

async function score(file) {
  if (!site()) return status("no site to score for", true);
  status("scoring " + file.name + " ...");
  const form = new FormData();
  form.append("files", file, file.name);
  try {
    const body = await api(`/v1/sites/${encodeURIComponent(site())}/score?map=png`, { method: "POST", body: form });
    const r = body.results[0];
    if (r.status === "error") throw new Error(r.error.message);
    $("decision").textContent = r.decision;
    $("decision").className = "decision " + r.decision;
    $("score").textContent = fmt(r.score, 2);
    $("p_value").textContent = fmt(r.p_value);
    $("threshold").textContent = fmt(r.threshold, 2);
    $("uncertainty").textContent = fmt(r.uncertainty, 2);
    $("version").textContent = r.model_version;
    $("result").hidden = false;
    if (r.map) { $("overlay").src = "data:image/png;base64," + r.map; $("overlay").style.display = "block"; }
    status(`${file.name}: ${r.decision} in ${fmt(r.latency_ms, 0)} ms`);
    await loadQueue();
  } catch (e) {
    status(e.message, true);
  }
}

async function loadQueue() {
  if (!site() || !$("token").value.trim()) { $("queue").replaceChildren(); return; }
  try {
    const body = await api(`/v1/sites/${encodeURIComponent(site())}/reviews`);
    $("empty").hidden = body.items.length > 0;
    $("queue").replaceChildren(...body.items.map((it) => {
      const row = el("tr");
      row.dataset.id = it.id;
      const image = el("img", { alt: "review item " + it.id });
      if (/^[A-Za-z0-9+/=]*$/.test(it.thumbnail || "")) image.src = "data:image/png;base64," + (it.thumbnail || "");
      const marks = el("td");
      for (const label of ["good", "defective"]) {
        const button = el("button", { className: "mark", textContent: label });
        button.dataset.label = label;
        marks.append(button, " ");
      }
      row.append(el("td", {}, [image]), el("td", { textContent: fmt(it.score, 2) }),
                 el("td", { textContent: fmt(it.uncertainty, 2) }), el("td", { textContent: it.model_version || "-" }),
                 marks);
      return row;
    }));
  } catch (e) {
    status(e.message, true);
  }
}

async function mark(id, label) {
  try {
    await api(`/v1/sites/${encodeURIComponent(site())}/reviews/${encodeURIComponent(id)}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label }) });
    status(`marked ${id} as ${label}`);
    await loadQueue();
  } catch (e) {
    status(e.message, true);
  }
}

$("site").addEventListener("change", loadQueue);
$("token").addEventListener("change", () => {
  sessionStorage.setItem("token", $("token").value.trim());
  loadSites().then(loadQueue);
});
$("file").addEventListener("change", (e) => { if (e.target.files.length) score(e.target.files[0]); });
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault(); $("drop").classList.remove("over");
  if (e.dataTransfer.files.length) score(e.dataTransfer.files[0]);
});
$("queue").addEventListener("click", (e) => {
  const button = e.target.closest("button.mark");
  if (button) mark(button.closest("tr").dataset.id, button.dataset.label);
});
const params = new URLSearchParams(location.search);
if (params.get("site")) $("site").value = params.get("site");
$("token").value = sessionStorage.getItem("token") || "";
if ($("token").value) loadSites().then(loadQueue);

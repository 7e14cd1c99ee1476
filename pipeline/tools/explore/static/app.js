// gbif-embed explore: the page's script. Plain JavaScript, no library, works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
  "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939", "#c7c7c7", "#eeeeee"];
const state = { info: null, xy: null, codes: null, legend: [], view: null, marked: [],
  selected: -1 };

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || body.detail || `HTTP ${response.status}`);
  return body;
}

function filterParams() {
  const p = new URLSearchParams();
  for (const id of ["rank", "taxon", "country", "year_from", "year_to", "dataset", "licence", "k"]) {
    const value = $(id).value.trim();
    if (value && !(id === "rank" && !$("taxon").value.trim())) p.set(id, value);
  }
  return p;
}

// ------------------------------------------------------------ results

function picture(row) {
  if (row.thumb && row.image_sha256) {
    return `<img src="/thumb/${esc(row.image_sha256)}" alt="${esc(row.scientificName)}" loading="lazy">`;
  }
  return `<div class="placeholder">no picture kept</div>`;
}

function credit(row) {
  const who = row.creator || row.rightsHolder;
  return [who ? `© ${who}` : "", row.license || "licence unknown"].filter(Boolean).join(" · ");
}

function card(row, isQuery) {
  const id = row.gbifID ?? row.coreID;
  const link = row.link ? `<a href="${esc(row.link)}" target="_blank" rel="noopener">${esc(row.gbifID != null ? "gbifID " + row.gbifID : row.coreID)}</a>`
    : esc(id ?? "");
  const where = [row.country, row.eventDate || row.year].filter(Boolean).join(" · ");
  return `<figure class="${isQuery ? "query" : "hit"}" data-row="${esc(row.row)}">${picture(row)}
    <figcaption>${row.similarity != null ? `<span class="sim">${row.similarity.toFixed(3)}</span>` : ""}
    <span class="name">${esc(row.scientificName || "no name")}</span>
    <span class="meta where">${esc(where || "–")}</span>
    <span class="meta dataset" title="${esc(row.datasetKey)}">dataset ${esc((row.datasetKey || "–").slice(0, 8))}</span>
    <span class="meta licence">${esc(credit(row))}</span>${link}</figcaption></figure>`;
}

function showResults(answer) {
  showError("");
  switchTab("explore");
  $("desc").textContent = `${answer.results.length} nearest to ${answer.description}`;
  $("query").innerHTML = answer.query && answer.query.row != null ? card(answer.query, true) : "";
  $("results").innerHTML = answer.results.map((r) => card(r, false)).join("") ||
    `<p class="note">nothing passes these filters</p>`;
  state.marked = answer.results.map((r) => r.row);
  state.selected = answer.query && answer.query.row != null ? answer.query.row : -1;
  draw();
}

async function run(promise) {
  document.body.classList.add("busy");
  try {
    showResults(await promise);
  } catch (err) {
    showError(err.message);
  } finally {
    document.body.classList.remove("busy");
  }
}

let last = null; // what the filters re-run

function searchText() {
  const q = $("q").value.trim();
  last = () => getJSON(`/api/search?${new URLSearchParams({ q })}&${filterParams()}`);
  return run(last());
}

function searchPhoto(file) {
  if (!file) return;
  const max = state.info ? state.info.max_upload_bytes : 0;
  if (max && file.size > max) {
    showError(`the photo is too large: ${file.size.toLocaleString()} bytes, at most ${max.toLocaleString()}`);
    return;
  }
  last = () => getJSON(`/api/photo?${filterParams()}`, { method: "POST", body: file,
    headers: { "Content-Type": "application/octet-stream" } });
  return run(last());
}

function searchRow(row) {
  last = () => getJSON(`/api/record/${row}?${filterParams()}`);
  return run(last());
}

// ------------------------------------------------------------ the map

function resetView() {
  state.view = { scale: 1, x: 0, y: 0 };
  draw();
}

function toScreen(i, size) {
  const v = state.view;
  return [(state.xy[2 * i] * v.scale + v.x) * size, (state.xy[2 * i + 1] * v.scale + v.y) * size];
}

function hexRGB(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

function draw() {
  const canvas = $("map");
  if (!state.xy || !canvas) return;
  const ctx = canvas.getContext("2d");
  const size = canvas.width;
  const image = ctx.createImageData(size, size);
  const data = image.data;
  data.fill(255);
  const colours = PALETTE.map(hexRGB);
  const n = state.xy.length / 2;
  // Few points: bigger dots, so a small snapshot's map is readable; many: one pixel each.
  const dot = n < 2000 ? 5 : n < 50000 ? 3 : 1, half = dot >> 1;
  for (let i = 0; i < n; i++) {
    const [sx, sy] = toScreen(i, size);
    const code = state.codes ? Math.min(state.codes[i], PALETTE.length - 1) : 0;
    const [r, g, b] = colours[code];
    for (let dy = -half; dy <= half; dy++) {
      const py = (sy | 0) + dy;
      if (py < 0 || py >= size) continue;
      for (let dx = -half; dx <= half; dx++) {
        const px = (sx | 0) + dx;
        if (px < 0 || px >= size) continue;
        const at = (py * size + px) * 4;
        data[at] = r; data[at + 1] = g; data[at + 2] = b; data[at + 3] = 255;
      }
    }
  }
  ctx.putImageData(image, 0, 0);
  ctx.lineWidth = 2;
  for (const row of state.marked) {
    const [sx, sy] = toScreen(row, size);
    ctx.strokeStyle = "#000";
    ctx.beginPath(); ctx.arc(sx, sy, 5, 0, 2 * Math.PI); ctx.stroke();
  }
  if (state.selected >= 0) {
    const [sx, sy] = toScreen(state.selected, size);
    ctx.fillStyle = "#e31a1c";
    ctx.beginPath(); ctx.arc(sx, sy, 7, 0, 2 * Math.PI); ctx.fill();
  }
}

function nearestPoint(mx, my, size) {
  let best = -1, bestD = 64; // within 8 px
  const n = state.xy.length / 2;
  for (let i = 0; i < n; i++) {
    const [sx, sy] = toScreen(i, size);
    const d = (sx - mx) ** 2 + (sy - my) ** 2;
    if (d < bestD) { bestD = d; best = i; }
  }
  return best;
}

function setupMap() {
  const canvas = $("map");
  let drag = null;
  const scaleOf = () => canvas.width / canvas.getBoundingClientRect().width;
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    const rect = canvas.getBoundingClientRect();
    const fx = (event.clientX - rect.left) / rect.width, fy = (event.clientY - rect.top) / rect.height;
    const factor = event.deltaY < 0 ? 1.25 : 0.8;
    const v = state.view;
    v.x = fx - (fx - v.x) * factor;
    v.y = fy - (fy - v.y) * factor;
    v.scale *= factor;
    draw();
  }, { passive: false });
  canvas.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX, y: event.clientY, vx: state.view.x, vy: state.view.y, moved: false };
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const rect = canvas.getBoundingClientRect();
    const dx = (event.clientX - drag.x) / rect.width, dy = (event.clientY - drag.y) / rect.height;
    if (Math.abs(event.clientX - drag.x) + Math.abs(event.clientY - drag.y) > 3) drag.moved = true;
    if (drag.moved) { state.view.x = drag.vx + dx; state.view.y = drag.vy + dy; draw(); }
  });
  canvas.addEventListener("pointerup", (event) => {
    const moved = drag && drag.moved;
    drag = null;
    if (moved) return;
    const rect = canvas.getBoundingClientRect();
    const s = scaleOf();
    const row = nearestPoint((event.clientX - rect.left) * s, (event.clientY - rect.top) * s, canvas.width);
    if (row >= 0) searchRow(row);
  });
}

async function loadColours(field) {
  const answer = await getJSON(`/api/colours?field=${encodeURIComponent(field)}`);
  const raw = atob(answer.codes);
  const codes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) codes[i] = raw.charCodeAt(i);
  state.codes = codes;
  $("legend").innerHTML = answer.legend.map((item, i) =>
    `<li><i style="background:${PALETTE[Math.min(i, PALETTE.length - 1)]}"></i>${esc(item.label)} (${item.count.toLocaleString()})</li>`).join("");
  draw();
}

// ------------------------------------------------------------ suspects

async function showSuspects() {
  switchTab("suspects");
  const body = $("suspects").querySelector("tbody");
  body.innerHTML = `<tr><td colspan="7">computing the neighbours of every picture (once per snapshot)…</td></tr>`;
  try {
    const answer = await getJSON("/api/suspects?limit=200");
    $("suspects-total").textContent = `${answer.total.toLocaleString()} records, the first ${answer.rows.length} shown`;
    body.innerHTML = answer.rows.map((r) => `<tr class="suspect" data-row="${esc(r.row)}">
      <td class="num">${r.rank}</td><td>${picture(r)}</td>
      <td>${r.link ? `<a href="${esc(r.link)}" target="_blank" rel="noopener">${esc(r.gbifID ?? r.coreID)}</a>` : esc(r.coreID)}</td>
      <td class="own"><i>${esc(r.scientificName)}</i></td><td class="suggested"><i>${esc(r.suggested_name)}</i></td>
      <td class="num">${r.score.toFixed(2)}</td>
      <td class="num">${Math.round(r.suggested_share * 100)}% vs ${Math.round(r.own_name_share * 100)}%</td></tr>`).join("")
      || `<tr><td colspan="7">no suspects: every picture's neighbours mostly carry its own name</td></tr>`;
  } catch (err) {
    body.innerHTML = "";
    showError(err.message);
  }
}

function switchTab(tab) {
  $("explore-view").hidden = tab !== "explore";
  $("suspects-view").hidden = tab !== "suspects";
  for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
}

// ------------------------------------------------------------ start

function options(select, values, any) {
  select.innerHTML = (any ? `<option value="">${any}</option>` : "") +
    values.map((v) => typeof v === "string" ? `<option value="${esc(v)}">${esc(v)}</option>`
      : `<option value="${esc(v.value)}">${esc(v.label)}</option>`).join("");
}

async function start() {
  const info = await getJSON("/api/info");
  state.info = info;
  $("snapshot").textContent = info.snapshot;
  $("summary").textContent = `${info.rows.toLocaleString()} pictures · ${info.names.toLocaleString()} names` +
    (info.years[0] ? ` · ${info.years[0]}–${info.years[1]}` : "") +
    ` · photo search: ${info.model.status}`;
  $("notes").innerHTML = info.missing.map((m) => `<li>${esc(m)}</li>`).join("");
  options($("rank"), ["scientificName", ...info.ranks]);
  options($("country"), info.countries, "any");
  options($("dataset"), info.datasets.map((d) => ({ value: d.key, label: `${d.key.slice(0, 8)}… (${d.n})` })), "any");
  options($("licence"), info.licences, "any");
  options($("colour"), info.colour_fields);
  document.title = `explore · ${info.snapshot}`;

  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); searchText(); });
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); if (last) run(last()); });
  $("clear").addEventListener("click", () => {
    for (const id of ["taxon", "country", "year_from", "year_to", "dataset", "licence"]) $(id).value = "";
    if (last) run(last());
  });
  $("photo").addEventListener("change", (e) => searchPhoto(e.target.files[0]));
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); searchPhoto(e.dataTransfer.files[0]); });
  $("colour").addEventListener("change", (e) => loadColours(e.target.value));
  $("reset-map").addEventListener("click", resetView);
  $("tab-explore").addEventListener("click", () => switchTab("explore"));
  $("tab-suspects").addEventListener("click", showSuspects);
  $("results").addEventListener("click", (e) => {
    const fig = e.target.closest("figure");
    if (fig && !e.target.closest("a")) searchRow(fig.dataset.row);
  });

  const response = await fetch("/api/map");
  state.xy = new Float32Array(await response.arrayBuffer());
  setupMap();
  resetView();
  await loadColours(info.colour_fields[0]);
  document.body.dataset.ready = "1";
}

start().catch((err) => showError(err.message));

// mlx-clap serve: the page. Plain JavaScript, no build step, nothing loaded from elsewhere.
// Every text from the server is put in the page with textContent (never as HTML).
"use strict";

// Local use: the server writes the session token into the page. With --allow-remote the page carries
// none (anyone reaching the port can fetch it): the user brings it in the URL fragment the command
// printed (#token=..., never sent over the network), kept for this tab only, or types it when asked.
const TOKEN = document.querySelector('meta[name="mlx-clap-token"]').content || remoteToken();
const K = 20;

function remoteToken() {
  const given = new URLSearchParams(location.hash.slice(1)).get("token");
  if (given) {
    sessionStorage.setItem("mlx-clap-token", given);
    history.replaceState(null, "", location.pathname + location.search);  // off the screen and history
    return given;
  }
  return sessionStorage.getItem("mlx-clap-token")
    || window.prompt("Token for this mlx-clap server (printed by `mlx-clap serve`):") || "";
}
const PALETTE = ["#38bdf8", "#f472b6", "#34d399", "#fbbf24", "#a78bfa", "#f87171",
  "#2dd4bf", "#fb923c", "#a3e635", "#e879f9", "#60a5fa", "#facc15"];
const $ = (id) => document.getElementById(id);
const player = $("player");
const state = { info: null, label: "", playing: null, map: null, view: null, file: null, items: new Map() };

// ------------------------------------------------------------------------------------------ helpers
async function api(path, options = {}) {
  const headers = Object.assign({ "X-MLX-Clap-Token": TOKEN }, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function setStatus(id, text, isError) {
  const node = $(id);
  node.textContent = text;
  node.classList.toggle("error", !!isError);
}

function seconds(s) {
  if (s === null || s === undefined) return "?";
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
}

// The last `keep` components of a folder ("…/Field recordings/2019"): the first ones are the same for a whole
// library and would fill a narrow line; the full folder goes in the title.
function shortFolder(folder, keep = 2) {
  const parts = String(folder || "").split(/[\\/]/).filter(Boolean);
  return parts.length > keep ? `…/${parts.slice(-keep).join("/")}` : folder;
}

function folderLine(text, folder) {
  const line = el("div", "folder");
  line.appendChild(el("span", null, `${text} · `));
  const where = el("span", "where", shortFolder(folder));
  where.title = folder;
  line.appendChild(where);
  return line;
}

function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const h = Math.max(1, Math.round(canvas.clientHeight * ratio));
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  return { w, h, ratio };
}

async function itemOf(row) {
  if (!state.items.has(row)) state.items.set(row, api(`/api/item/${row}`));
  return state.items.get(row);
}

// ------------------------------------------------------------------------------------------ playback
function audioUrl(row, start) {
  // A media fragment (#t=) starts playback at a segment without waiting for the metadata.
  return `/audio/${row}?t=${encodeURIComponent(TOKEN)}` + (start > 0 ? `#t=${start}` : "");
}

function play(row, start, owner) {
  if (state.playing && state.playing.owner === owner && !player.paused) { player.pause(); return; }
  if (player.dataset.row === String(row) && player.readyState >= 1) {
    player.currentTime = start || 0;
  } else {
    player.src = audioUrl(row, start || 0);
    player.dataset.row = String(row);
  }
  markPlaying(owner);
  state.playing = { row, owner };
  player.play().catch((e) => setStatus("status", `cannot play: ${e.message}`, true));
}

function markPlaying(owner) {
  document.querySelectorAll(".playing").forEach((n) => n.classList.remove("playing"));
  if (owner) owner.classList.add("playing");
}

player.addEventListener("ended", () => markPlaying(null));
player.addEventListener("error", () => {
  if (player.src) setStatus("status", "this file cannot be played (moved, changed, or a format the browser lacks)", true);
});
player.addEventListener("timeupdate", () => { if (state.file) drawFileWave(); });

// ------------------------------------------------------------------------------------ waveforms
async function drawThumb(canvas, row, start, end) {
  const { w, h } = fitCanvas(canvas);
  const ctx = canvas.getContext("2d");
  let data;
  try { data = await api(`/api/peaks/${row}?n=${Math.max(8, Math.min(2000, Math.round(w / 2)))}`); }
  catch (e) { ctx.fillStyle = "#7f1d1d"; ctx.fillRect(0, h / 2 - 1, w, 2); canvas.title = e.message; return; }
  const item = await itemOf(row).catch(() => null);
  paintPeaks(ctx, data.peaks, w, h, "#64748b");
  if (item && item.duration && start !== undefined && start !== null) {
    const x0 = (start / item.duration) * w, x1 = Math.max(x0 + 2, (end / item.duration) * w);
    ctx.fillStyle = "#38bdf840";
    ctx.fillRect(x0, 0, x1 - x0, h);
    ctx.save(); ctx.beginPath(); ctx.rect(x0, 0, x1 - x0, h); ctx.clip();
    paintPeaks(ctx, data.peaks, w, h, "#38bdf8");
    ctx.restore();
  }
}

function paintPeaks(ctx, peaks, w, h, colour) {
  ctx.fillStyle = colour;
  const bw = w / peaks.length;
  for (let i = 0; i < peaks.length; i++) {
    const v = Math.max(1, peaks[i] * (h - 2));
    ctx.fillRect(i * bw, (h - v) / 2, Math.max(1, bw - 1), v);
  }
}

// --------------------------------------------------------------------------------------- results
function scoreCell(r) {
  const cell = el("div", "score");
  if (r.z !== undefined && r.z !== null) {
    cell.appendChild(el("b", null, `z ${r.z.toFixed(1)}`));
    cell.appendChild(el("small", null, `cos ${r.score.toFixed(3)}`));
  } else {
    cell.appendChild(el("b", null, r.score.toFixed(3)));
    cell.appendChild(el("small", null, "cosine"));
  }
  return cell;
}

// The play button, thumbnail and name (opening the file view) that result rows and duplicate cards share.
function fileParts(it, start, owner, result) {
  const play_ = el("button", "play", "▶");
  play_.type = "button";
  play_.title = start !== undefined ? `Play from ${seconds(start)}` : "Play";
  play_.addEventListener("click", () => play(it.row, start || 0, owner));
  const name = el("button", "name", it.name);
  name.type = "button";
  name.title = it.path;
  name.addEventListener("click", () => openFile(it.row, result));
  const meta = el("div", "meta");
  meta.appendChild(name);
  return { play: play_, thumb: el("canvas", "thumb"), meta };
}

function resultRow(r) {
  const li = el("li", "result");
  li.dataset.row = r.row;
  const { play: button, thumb, meta } = fileParts(r, r.start, li, r);
  const range = r.start !== undefined ? ` · ${seconds(r.start)}–${seconds(r.end)}` : "";
  meta.appendChild(folderLine(`${seconds(r.duration)}${range}`, r.folder));
  const like = el("button", "like", "More like this");
  like.type = "button";
  like.addEventListener("click", () => moreLike(r.row, r.segment, r.name));
  li.append(button, thumb, meta, scoreCell(r), like);
  return { li, draw: () => drawThumb(thumb, r.row, r.start, r.end) };
}

function showResults(data, label) {
  const list = $("results");
  list.replaceChildren();
  state.label = label;
  const rows = data.results.map(resultRow);
  rows.forEach((r) => list.appendChild(r.li));
  rows.forEach((r) => r.draw());
  const what = data.segments ? "files, best segment first" : "files";
  const notes = data.notes && data.notes.length ? ` (${data.notes.join("; ")})` : "";
  setStatus("status", `${data.results.length} ${what} for ${label} · ${data.took_ms} ms${notes}`);
  selectTab("results");
}

async function run(label, request) {
  setStatus("status", `Searching for ${label}…`);
  try { showResults(await request(), label); }
  catch (e) { setStatus("status", e.message, true); selectTab("results"); }
}

function searchText(text) {
  run(`“${text}”`, () => api("/api/search", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, k: K }),
  }));
}

function moreLike(row, segment, name) {
  const body = { row, k: K };
  if (segment !== undefined && segment !== null) body.segment = segment;
  run(`sounds like ${name}`, () => api("/api/search", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  }));
}

function searchFile(file) {
  const limit = state.info ? state.info.max_upload : Infinity;
  if (file.size > limit) {
    setStatus("status", `${file.name} is larger than the ${Math.round(limit / 1048576)} MB upload limit`, true);
    return;
  }
  run(`sounds like ${file.name}`, () => api(`/api/search/audio?k=${K}`, {
    method: "POST",
    headers: { "Content-Type": "application/octet-stream", "X-Filename": encodeURIComponent(file.name) },
    body: file,
  }));
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("query").value.trim();
  if (text) searchText(text);
});

// ------------------------------------------------------------------------------------ drop zone
const zone = $("drop-zone");
["dragover", "drop"].forEach((type) => window.addEventListener(type, (e) => e.preventDefault()));
zone.addEventListener("dragenter", () => zone.classList.add("over"));
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (file) searchFile(file);
});
zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file-input").click(); });
$("file-input").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) searchFile(file);
  e.target.value = "";
});

// ------------------------------------------------------------------------------------ file view
async function openFile(row, result) {
  const item = await itemOf(row).catch((e) => { setStatus("status", e.message, true); return null; });
  if (!item) return;
  const peaks = await api(`/api/peaks/${row}?n=600`).catch(() => ({ peaks: [] }));
  state.file = { row, item, result: result || null, peaks: peaks.peaks, segment: result ? result.segment : null,
    start: result && result.start !== undefined ? result.start : 0 };
  $("fv-name").textContent = item.name;
  $("fv-path").textContent = item.path;
  const facts = [seconds(item.duration), item.channels ? `${item.channels} ch` : null,
    item.source_rate ? `${item.source_rate} Hz` : null, item.size ? `${(item.size / 1048576).toFixed(1)} MB` : null];
  $("fv-facts").textContent = facts.filter(Boolean).join(" · ");
  $("file-view").hidden = false;
  drawFileWave();
  drawTimeline();
}

function drawFileWave() {
  const f = state.file;
  const canvas = $("fv-wave");
  const { w, h } = fitCanvas(canvas);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  paintPeaks(ctx, f.peaks.length ? f.peaks : [0], w, h, "#64748b");
  const dur = f.item.duration || 0;
  if (dur && player.dataset.row === String(f.row)) {
    ctx.fillStyle = "#38bdf8";
    ctx.fillRect((player.currentTime / dur) * w, 0, 2, h);
  }
}

function drawTimeline() {
  const f = state.file;
  const canvas = $("fv-timeline");
  const t = f.result && f.result.timeline;
  canvas.hidden = !(t || f.item.segments);  // a store without segments has no timeline to show
  if (canvas.hidden) { $("fv-legend").textContent = "Click the waveform to play from there."; return; }
  const { w, h } = fitCanvas(canvas);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const dur = f.item.duration || 1;
  if (t && t.score.length) {
    // Segment scores for the query: brighter is closer; the best one is outlined.
    const lo = Math.min(...t.score), hi = Math.max(...t.score);
    for (let i = 0; i < t.score.length; i++) {
      const a = (t.score[i] - lo) / ((hi - lo) || 1);
      ctx.fillStyle = `rgba(56, 189, 248, ${0.08 + 0.92 * a})`;
      ctx.fillRect((t.start[i] / dur) * w, 0, Math.max(1, ((t.end[i] - t.start[i]) / dur) * w / 2), h);
    }
    ctx.strokeStyle = "#f472b6"; ctx.lineWidth = 2;
    ctx.strokeRect((f.result.start / dur) * w, 1, ((f.result.end - f.result.start) / dur) * w, h - 2);
    const r = f.result, stretch = r.windows > 1 ? `, in a match from ${seconds(r.start)} to ${seconds(r.end)} (${r.windows} windows)` : "";
    $("fv-legend").textContent = `Segment scores for ${state.label}: brighter is closer; best ${r.score.toFixed(3)} at ${seconds(r.best_start)}–${seconds(r.best_end)}${stretch}. Click to play from a segment.`;
  } else if (f.item.segments) {
    ctx.fillStyle = "#334155";
    f.item.segments.start.forEach((s) => ctx.fillRect((s / dur) * w, 0, 1, h));
    $("fv-legend").textContent = `${f.item.segments.start.length} segments. Click the waveform to play from there.`;
  }
}

function segmentAt(fraction) {
  const f = state.file, t = f.item.segments, time = fraction * (f.item.duration || 0);
  if (!t) return { start: time, segment: null };
  let best = 0;
  for (let i = 0; i < t.start.length; i++) if (t.start[i] <= time) best = i;
  return { start: t.start[best], segment: t.first + best };
}

function fraction(e, canvas) {
  const box = canvas.getBoundingClientRect();
  return Math.min(1, Math.max(0, (e.clientX - box.left) / box.width));
}

$("fv-wave").addEventListener("click", (e) => {
  const f = state.file, at = fraction(e, e.currentTarget) * (f.item.duration || 0);
  state.playing = null;
  play(f.row, at, null);
});
$("fv-timeline").addEventListener("click", (e) => {
  const f = state.file, s = segmentAt(fraction(e, e.currentTarget));
  f.segment = s.segment; f.start = s.start;
  state.playing = null;
  play(f.row, s.start, null);
});
$("fv-play").addEventListener("click", () => play(state.file.row, state.file.start, $("fv-play")));
$("fv-like").addEventListener("click", () => {
  const f = state.file;
  moreLike(f.row, f.segment, f.item.name);
});
$("fv-copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(state.file.item.path));
$("fv-close").addEventListener("click", () => { $("file-view").hidden = true; state.file = null; });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("fv-close").click(); });

// ------------------------------------------------------------------------------------------- map
const mapCanvas = $("map");
const tip = $("map-tip");

async function loadMap() {
  if (state.map) { drawMap(); return; }
  setStatus("map-status", "Computing the map (once per store, then cached beside it; minutes for 100k files)…");
  try {
    const doc = await api("/api/map");
    const n = doc.x.length;
    const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => doc.cluster[a] - doc.cluster[b]);
    state.map = { doc, n, order: Int32Array.from(order), sx: new Float32Array(n), sy: new Float32Array(n), grid: new Map() };
    state.view = { cx: 0, cy: 0, zoom: 1 };
    const notes = doc.notes && doc.notes.length ? ` ${doc.notes.join("; ")}` : "";
    mapCanvas.dataset.projection = doc.projection || "";
    const placed = doc.projection_note ? ` Placed by ${doc.projection_note}.` : "";
    setStatus("map-status", `${n} files in ${doc.k} clusters (${doc.clusters_from}).${placed} Hover a point to hear it, click to open it; scroll to zoom, drag to pan.${notes}`);
    drawMap();
  } catch (e) { setStatus("map-status", e.message, true); }
}

function drawMap() {
  const m = state.map, v = state.view;
  if (!m) return;
  const { w, h, ratio } = fitCanvas(mapCanvas);
  const ctx = mapCanvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const s = 0.46 * Math.min(w, h) * v.zoom;
  // Big dots for a small library, fine ones for 100k (where they would merge into a blot).
  const dot = m.n < 1000 ? 7 : m.n < 20000 ? 4 : 2.5;
  const size = dot * ratio, cell = 8 * ratio;
  m.grid = new Map();
  let drawn = 0, colour = -1;
  for (let j = 0; j < m.n; j++) {
    const i = m.order[j];
    const x = w / 2 + (m.doc.x[i] - v.cx) * s, y = h / 2 - (m.doc.y[i] - v.cy) * s;
    m.sx[i] = x; m.sy[i] = y;
    if (x < 0 || y < 0 || x > w || y > h) continue;
    const c = m.doc.cluster[i];
    if (c !== colour) { colour = c; ctx.fillStyle = PALETTE[c % PALETTE.length]; }
    ctx.fillRect(x - size / 2, y - size / 2, size, size);
    drawn++;
    const key = Math.floor(x / cell) * 65536 + Math.floor(y / cell);
    const bucket = m.grid.get(key);
    if (bucket) bucket.push(i); else m.grid.set(key, [i]);
  }
  mapCanvas.dataset.points = String(drawn);
  mapCanvas.dataset.total = String(m.n);
  m.cell = cell; m.ratio = ratio;
}

function pointAt(e) {
  const m = state.map;
  if (!m) return -1;
  const box = mapCanvas.getBoundingClientRect();
  const x = (e.clientX - box.left) * m.ratio, y = (e.clientY - box.top) * m.ratio;
  const gx = Math.floor(x / m.cell), gy = Math.floor(y / m.cell);
  let best = -1, bestD = (m.cell * 1.2) ** 2;
  for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
    for (const i of m.grid.get((gx + dx) * 65536 + gy + dy) || []) {
      const d = (m.sx[i] - x) ** 2 + (m.sy[i] - y) ** 2;
      if (d < bestD) { bestD = d; best = i; }
    }
  }
  return best;
}

let hoverTimer = null, hovered = -1, drag = null;
mapCanvas.addEventListener("mousemove", (e) => {
  if (drag) {
    const m = state.map, s = 0.46 * Math.min(mapCanvas.width, mapCanvas.height) * state.view.zoom;
    state.view.cx = drag.cx - ((e.clientX - drag.x) * m.ratio) / s;
    state.view.cy = drag.cy + ((e.clientY - drag.y) * m.ratio) / s;
    drag.moved = true;
    drawMap();
    return;
  }
  const i = pointAt(e);
  if (i === hovered) return;
  hovered = i;
  clearTimeout(hoverTimer);
  if (i < 0) { tip.hidden = true; return; }
  const box = mapCanvas.getBoundingClientRect();
  tip.style.left = `${e.clientX - box.left + 12}px`;
  tip.style.top = `${e.clientY - box.top + 12}px`;
  tip.textContent = `#${i}`;
  tip.hidden = false;
  itemOf(i).then((it) => { if (hovered === i) tip.textContent = `${it.name} · ${seconds(it.duration)}`; }).catch(() => {});
  hoverTimer = setTimeout(() => { if (hovered === i) { state.playing = null; play(i, 0, null); } }, 350);
});
mapCanvas.addEventListener("mouseleave", () => {
  clearTimeout(hoverTimer); hovered = -1; tip.hidden = true; drag = null;
  if (state.playing === null && !player.paused) player.pause();
});
mapCanvas.addEventListener("mousedown", (e) => {
  drag = { x: e.clientX, y: e.clientY, cx: state.view.cx, cy: state.view.cy, moved: false };
});
mapCanvas.addEventListener("mouseup", (e) => {
  const wasDrag = drag && drag.moved;
  drag = null;
  if (!wasDrag) { const i = pointAt(e); if (i >= 0) openFile(i, null); }
});
mapCanvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  const v = state.view;
  if (!v) return;
  v.zoom = Math.min(200, Math.max(0.5, v.zoom * (e.deltaY < 0 ? 1.25 : 0.8)));
  drawMap();
}, { passive: false });
window.addEventListener("resize", () => { if (!$("tab-map").hidden) drawMap(); });

// ------------------------------------------------------------------------------------ duplicates
function memberCard(it) {
  const card = el("div", "member");
  const { play: button, thumb, meta } = fileParts(it, undefined, card, null);
  meta.appendChild(folderLine(seconds(it.duration), it.folder));
  const copy = el("button", "copy", "Copy path");
  copy.type = "button";
  copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(it.path));
  card.append(button, thumb, meta, copy);
  return { card, draw: () => drawThumb(thumb, it.row) };
}

async function findDuplicates(threshold) {
  setStatus("dup-status", `Comparing every pair of files at cosine ≥ ${threshold}… (a minute for 100k files)`);
  const box = $("dup-groups");
  box.replaceChildren();
  try {
    const data = await api(`/api/duplicates?threshold=${encodeURIComponent(threshold)}`);
    const shown = data.groups.length < data.count ? ` (the ${data.groups.length} largest shown)` : "";
    const groups = data.count === 1 ? "1 group" : `${data.count} groups`;
    setStatus("dup-status", `${groups} at cosine ≥ ${data.threshold}${shown} · ${data.took_ms} ms`);
    const draws = [];
    data.groups.forEach((g, n) => {
      const group = el("div", "group");
      group.appendChild(el("h3", null, `Group ${n + 1}: ${g.items.length} files · mean cosine ${g.score.toFixed(4)} · weakest link ${g.min_score.toFixed(4)}`));
      const members = el("div", "members");
      g.items.forEach((it) => { const c = memberCard(it); members.appendChild(c.card); draws.push(c.draw); });
      group.appendChild(members);
      box.appendChild(group);
    });
    draws.forEach((d) => d());
  } catch (e) { setStatus("dup-status", e.message, true); }
}

$("dup-form").addEventListener("submit", (e) => {
  e.preventDefault();
  // Any cosine in range (step="any"): thresholds near 1 need five decimals (0.99958 in the README). The
  // form is novalidate so that a bad value gets this line instead of a browser bubble.
  const input = $("dup-threshold"), value = Number(input.value);
  const lo = Number(input.min), hi = Number(input.max);
  if (input.value.trim() === "" || !Number.isFinite(value) || value < lo || value > hi) {
    const got = input.value.trim() ? ` (got ${input.value})` : "";
    setStatus("dup-status", `The threshold must be a cosine from ${lo} to ${hi}${got}.`, true);
    return;
  }
  findDuplicates(value);
});

// ------------------------------------------------------------------------------------------ tabs
function selectTab(name) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  ["results", "map", "duplicates"].forEach((t) => { $(`tab-${t}`).hidden = t !== name; });
  if (name === "map") loadMap();
}
document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => selectTab(b.dataset.tab)));

// ------------------------------------------------------------------------------------------ start
api("/api/info").then((info) => {
  state.info = info;
  const segs = info.segments ? ` · ${info.segments} segments` : "";
  const model = info.model ? ` · ${info.model}` : "";
  $("store-info").textContent = `${info.items} files${segs}${model}`;
  document.body.dataset.ready = "1";
}).catch((e) => setStatus("status", e.message, true));

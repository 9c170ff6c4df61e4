// mage studio: the page over the JSON API (see server.py). Plain JS, no dependencies, works offline.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

const state = {
  info: null,
  samples: [],
  // what the tests and a curious user can inspect: the last answer of each endpoint
  last: {},
};
window.studio = state;

// ---------------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------------
async function api(path, { json, form } = {}) {
  const init = json !== undefined
    ? { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(json) }
    : form !== undefined ? { method: "POST", body: form } : {};
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new Error("the studio server cannot be reached (is 'mage studio' still running?)");
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON: reported below */ }
  if (!res.ok) throw new Error((body && body.error) || `${res.status} ${res.statusText}`); // 429s say when to retry
  return body;
}

function showError(msg) {
  const el = $("#error");
  if (!msg) { el.hidden = true; el.textContent = ""; return; }
  el.textContent = msg;
  el.hidden = false;
}

// Run an action with its button disabled and a busy label; errors go to the banner.
async function busy(button, label, fn) {
  const old = button.textContent;
  button.disabled = true;
  button.textContent = label;
  document.body.classList.add("working");
  showError(null);
  try {
    return await fn();
  } catch (e) {
    showError(e.message);
  } finally {
    button.disabled = false;
    button.textContent = old;
    document.body.classList.remove("working");
  }
}

const dataURLToBlob = async (url) => (await fetch(url)).blob();
const randomSeed = () => Math.floor(Math.random() * 2 ** 31);

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const im = new Image();
    im.onload = () => resolve(im);
    im.onerror = () => reject(new Error("the browser could not show the image"));
    im.src = src;
  });
}

function numbers(form, names) {
  const out = {};
  for (const n of names) {
    const el = form.elements[n];
    if (el && el.value !== "") out[n] = Number(el.value);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// tabs
// ---------------------------------------------------------------------------------------------
function selectTab(name) {
  for (const b of $$(".tabs button")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  for (const p of $$(".panel")) p.hidden = p.id !== `panel-${name}`;
  showError(null);
  history.replaceState(null, "", `#${name}`);
}

// ---------------------------------------------------------------------------------------------
// image sources: the samples, an upload, a drop
// ---------------------------------------------------------------------------------------------
// onPick({sample} | {file}) is called with what the user chose; the server turns either into the S x S image.
function makeSource(root, dropTargets, onPick) {
  root.innerHTML = `
    <div class="source-head"><span>Image</span>
      <label class="button small">Upload…<input type="file" accept="image/*" hidden></label></div>
    <div class="thumbs" role="list"></div>`;
  const thumbs = $(".thumbs", root);
  const select = (btn) => { for (const t of $$("button", thumbs)) t.classList.toggle("on", t === btn); };
  if (!state.samples.length) thumbs.innerHTML = `<span class="hint">No sample images: upload one.</span>`;
  for (const s of state.samples) {
    const b = document.createElement("button");
    b.type = "button";
    b.title = s.label;
    b.dataset.sample = s.id;
    b.setAttribute("role", "listitem");
    const im = document.createElement("img"); // through the DOM: a class name is text, never markup
    im.src = s.image;
    im.alt = s.label;
    b.appendChild(im);
    b.onclick = () => { select(b); onPick({ sample: s.id }); };
    thumbs.appendChild(b);
  }
  const input = $("input[type=file]", root);
  input.onchange = () => { if (input.files[0]) { select(null); onPick({ file: input.files[0] }); } input.value = ""; };
  for (const t of [root, ...dropTargets]) {
    t.addEventListener("dragover", (e) => { e.preventDefault(); t.classList.add("dragging"); });
    t.addEventListener("dragleave", () => t.classList.remove("dragging"));
    t.addEventListener("drop", (e) => {
      e.preventDefault();
      t.classList.remove("dragging");
      const f = e.dataTransfer.files[0];
      if (f) { select(null); onPick({ file: f }); }
    });
  }
}

function sourceForm(pick) {
  const form = new FormData();
  if (pick.sample !== undefined) form.append("sample", pick.sample);
  else form.append("file", pick.file, pick.file.name || "image.png");
  return form;
}

function classOptions(select, withNone) {
  select.innerHTML = "";
  if (withNone) select.appendChild(new Option(withNone, ""));
  state.info.classes.forEach((c, i) => select.appendChild(new Option(`${i} · ${c}`, String(i))));
}

// ---------------------------------------------------------------------------------------------
// Generate + watch it decode
// ---------------------------------------------------------------------------------------------
function generateParams() {
  const f = $("#generate-form");
  const p = numbers(f, ["num", "steps", "cfg", "temperature", "choice_temperature", "seed"]);
  p.class_label = state.info.class_conditional && f.elements.class_label.value !== "" ? f.elements.class_label.value : null;
  return p;
}

function showImages(grid, urls, scale) {
  grid.innerHTML = "";
  for (const u of urls) {
    const im = document.createElement("img");
    im.src = u;
    im.style.width = `${state.info.image_size * scale}px`;
    grid.appendChild(im);
  }
}

async function onGenerate(e) {
  e.preventDefault();
  await busy($("#generate-go"), "Generating…", async () => {
    const r = await api("/api/generate", { json: generateParams() });
    state.last.generate = r;
    $("#generate-empty").hidden = true;
    $("#watch").hidden = true;
    stopPlaying();
    const grid = $("#generate-grid");
    grid.hidden = false;
    showImages(grid, r.images, r.images.length > 16 ? 3 : 4);
  });
}

let watch = null; // {frames, grid, step}
let playing = null;

function stopPlaying() {
  if (playing) clearInterval(playing);
  playing = null;
  $("#watch-play").textContent = "▶ Play";
}

async function onWatch() {
  const p = generateParams();
  if (p.num > state.info.limits.watch) p.num = state.info.limits.watch;
  await busy($("#watch-go"), "Decoding…", async () => {
    const r = await api("/api/generate/steps", { json: p });
    state.last.steps = r;
    watch = { frames: r.frames, grid: r.grid, images: [] };
    $("#generate-empty").hidden = true;
    $("#generate-grid").hidden = true;
    $("#watch").hidden = false;
    const holder = $("#watch-images");
    holder.innerHTML = "";
    const scale = 5;
    const side = state.info.image_size * scale;
    for (let i = 0; i < p.num; i++) {
      const c = document.createElement("canvas");
      c.width = c.height = side;
      c.className = "frame";
      holder.appendChild(c);
    }
    const slider = $("#watch-step");
    slider.max = r.frames.length;
    slider.value = 1;
    await drawFrame(1);
    stopPlaying();
    togglePlay();
  });
}

async function drawFrame(step) {
  if (!watch) return;
  const frame = watch.frames[step - 1];
  const canvases = $$("#watch-images canvas");
  const overlay = $("#watch-overlay").checked;
  const [gh, gw] = watch.grid;
  const images = await Promise.all(frame.images.map(loadImage));
  canvases.forEach((c, i) => {
    const ctx = c.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(images[i], 0, 0, c.width, c.height);
    if (!overlay) return;
    const cw = c.width / gw, ch = c.height / gh;
    const st = frame.state[i];
    for (let t = 0; t < st.length; t++) {
      const x = (t % gw) * cw, y = Math.floor(t / gw) * ch;
      if (st[t] === "0") {
        ctx.fillStyle = "rgba(100, 116, 139, 0.88)"; // slate: apart from both black and white pixels
        ctx.fillRect(x, y, cw, ch);
      } else if (st[t] === "2") {
        ctx.strokeStyle = "#f59e0b";
        ctx.lineWidth = 2;
        ctx.strokeRect(x + 1, y + 1, cw - 2, ch - 2);
      }
    }
  });
  // every image starts fully masked and follows the same schedule: the counts are the same for each
  const n = frame.state.length, L = frame.state[0].length;
  const decided = Math.round(frame.decided / n);
  const masked = (frame.state[0].match(/0/g) || []).length;
  $("#watch-caption").textContent =
    `step ${step} / ${watch.frames.length} · ${decided} token${decided === 1 ? "" : "s"} decided per image · ` +
    `${masked} of ${L} still masked`;
}

function togglePlay() {
  if (playing) { stopPlaying(); return; }
  const slider = $("#watch-step");
  if (Number(slider.value) >= Number(slider.max)) slider.value = 0;
  $("#watch-play").textContent = "❚❚ Pause";
  playing = setInterval(() => {
    const next = Number(slider.value) + 1;
    if (next > Number(slider.max)) { stopPlaying(); return; }
    slider.value = next;
    drawFrame(next);
  }, 350);
}

// ---------------------------------------------------------------------------------------------
// Inpaint: the mask lives at the model's resolution (S x S), painted pixel by pixel (no anti-aliasing:
// a pixel is in the mask or not, as the server reads it)
// ---------------------------------------------------------------------------------------------
const paint = { image: null, pick: null, mask: null, erase: false, down: false, last: null, hover: null };

function resetMask() {
  const S = state.info.image_size;
  paint.mask = document.createElement("canvas");
  paint.mask.width = paint.mask.height = S;
  drawPaint();
}

function drawPaint() {
  const c = $("#paint");
  const ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = "#e8eaf0";
  ctx.fillRect(0, 0, c.width, c.height);
  if (paint.image) ctx.drawImage(paint.image, 0, 0, c.width, c.height);
  else {
    ctx.fillStyle = "#6b7280";
    ctx.font = "15px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText("Pick or upload an image", c.width / 2, c.height / 2);
  }
  if (paint.mask) {
    ctx.globalAlpha = 0.55;
    ctx.drawImage(paint.mask, 0, 0, c.width, c.height);
    ctx.globalAlpha = 1;
  }
  if (paint.hover && paint.image) {
    const k = c.width / state.info.image_size;
    ctx.strokeStyle = paint.erase ? "#111827" : "#ffffff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.arc(paint.hover.x * k, paint.hover.y * k, (brush() / 2) * k, 0, 2 * Math.PI);
    ctx.stroke();
  }
}

const brush = () => Number($("#brush").value);

function imagePoint(e) {
  const c = $("#paint");
  const r = c.getBoundingClientRect();
  const S = state.info.image_size;
  return { x: ((e.clientX - r.left) / r.width) * S, y: ((e.clientY - r.top) / r.height) * S };
}

function dab(p) {
  const ctx = paint.mask.getContext("2d");
  const S = state.info.image_size;
  const rad = brush() / 2;
  ctx.fillStyle = "#ef4444";
  for (let y = Math.floor(p.y - rad); y <= Math.ceil(p.y + rad); y++) {
    for (let x = Math.floor(p.x - rad); x <= Math.ceil(p.x + rad); x++) {
      if (x < 0 || y < 0 || x >= S || y >= S) continue;
      const dx = x + 0.5 - p.x, dy = y + 0.5 - p.y;
      // a 1-pixel brush always covers the pixel under the pointer
      if (dx * dx + dy * dy > rad * rad && !(Math.floor(p.x) === x && Math.floor(p.y) === y)) continue;
      if (paint.erase) ctx.clearRect(x, y, 1, 1);
      else ctx.fillRect(x, y, 1, 1);
    }
  }
}

function stroke(a, b) {
  const n = Math.max(1, Math.ceil(Math.hypot(b.x - a.x, b.y - a.y) * 2));
  for (let i = 0; i <= n; i++) dab({ x: a.x + ((b.x - a.x) * i) / n, y: a.y + ((b.y - a.y) * i) / n });
}

function bindPainting() {
  const c = $("#paint");
  c.addEventListener("pointerdown", (e) => {
    if (!paint.image) return;
    c.setPointerCapture(e.pointerId);
    paint.down = true;
    paint.last = imagePoint(e);
    dab(paint.last);
    drawPaint();
  });
  c.addEventListener("pointermove", (e) => {
    const p = imagePoint(e);
    paint.hover = p;
    if (paint.down) { stroke(paint.last, p); paint.last = p; }
    drawPaint();
  });
  const up = () => { paint.down = false; paint.last = null; };
  c.addEventListener("pointerup", up);
  c.addEventListener("pointercancel", up);
  c.addEventListener("pointerleave", () => { paint.hover = null; drawPaint(); });
  $("#brush").oninput = () => { $("#brush-size").textContent = `${brush()} px`; };
  $("#mode-paint").onclick = () => setErase(false);
  $("#mode-erase").onclick = () => setErase(true);
  $("#mask-clear").onclick = () => resetMask();
}

function setErase(on) {
  paint.erase = on;
  $("#mode-paint").classList.toggle("on", !on);
  $("#mode-erase").classList.toggle("on", on);
}

// The painted mask as the PNG the API takes: white = regenerate, black = keep.
function maskBlob() {
  const S = state.info.image_size;
  const src = paint.mask.getContext("2d").getImageData(0, 0, S, S).data;
  const out = document.createElement("canvas");
  out.width = out.height = S;
  const octx = out.getContext("2d");
  const img = octx.createImageData(S, S);
  let any = false;
  for (let i = 0; i < S * S; i++) {
    const v = src[4 * i + 3] > 0 ? 255 : 0;
    any = any || v > 0;
    img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
    img.data[4 * i + 3] = 255;
  }
  octx.putImageData(img, 0, 0);
  state.maskDataURL = out.toDataURL("image/png");
  return new Promise((resolve) => out.toBlob((b) => resolve({ blob: b, any }), "image/png"));
}

async function pickForInpaint(pick) {
  await busy($("#inpaint-go"), "Loading…", async () => {
    const r = await api("/api/prepare", { form: sourceForm(pick) });
    paint.image = await loadImage(r.image);
    paint.pick = pick.sample !== undefined ? pick : { file: await dataURLToBlob(r.image) };
    $("#inpaint-result").hidden = true;
    $("#inpaint-empty").hidden = false;
    resetMask();
  });
}

async function onInpaint(e) {
  e.preventDefault();
  if (!paint.image) { showError("pick or upload an image first"); return; }
  const { blob, any } = await maskBlob();
  if (!any) { showError("paint the region to regenerate first (drag on the image)"); return; }
  const f = $("#inpaint-form");
  const form = sourceForm(paint.pick.sample !== undefined ? paint.pick : { file: new File([paint.pick.file], "image.png") });
  form.append("mask", blob, "mask.png");
  for (const [k, v] of Object.entries(numbers(f, ["steps", "seed", "feather"]))) form.append(k, v);
  const replace = f.elements.fill.value === "replace";
  form.append("class_label", replace ? $("#inpaint-class").value : "");
  await busy($("#inpaint-go"), "Inpainting…", async () => {
    const r = await api("/api/inpaint", { form });
    state.last.inpaint = r;
    const out = $("#inpaint-result");
    out.src = r.image;
    out.hidden = false;
    $("#inpaint-empty").hidden = true;
  });
}

// ---------------------------------------------------------------------------------------------
// Outpaint
// ---------------------------------------------------------------------------------------------
let outpaintPick = null;
const SCALE = 8;

async function pickForOutpaint(pick) {
  await busy($("#outpaint-go"), "Loading…", async () => {
    const r = await api("/api/prepare", { form: sourceForm(pick) });
    outpaintPick = pick.sample !== undefined ? pick : { file: new File([await dataURLToBlob(r.image)], "image.png") };
    const im = $("#outpaint-input");
    im.src = r.image;
    im.style.width = `${state.info.image_size * SCALE}px`;
    im.hidden = false;
    $("#outpaint-pick").hidden = true;
  });
}

async function onOutpaint(e) {
  e.preventDefault();
  if (!outpaintPick) { showError("pick or upload an image first"); return; }
  const f = $("#outpaint-form");
  const form = sourceForm(outpaintPick);
  for (const [k, v] of Object.entries(numbers(f, ["left", "right", "top", "bottom", "steps", "seed"]))) form.append(k, v);
  form.append("class_label", $("#outpaint-class").value);
  await busy($("#outpaint-go"), "Outpainting…", async () => {
    const r = await api("/api/outpaint", { form });
    state.last.outpaint = r;
    const im = await loadImage(r.image);
    const out = $("#outpaint-result");
    // large canvases are shown smaller so they fit next to the original
    const k = Math.min(SCALE, Math.floor(420 / Math.max(im.naturalWidth, im.naturalHeight)) || 1);
    out.src = r.image;
    out.style.width = `${im.naturalWidth * k}px`;
    out.hidden = false;
    const box = $("#outpaint-box");
    Object.assign(box.style, {
      left: `${r.box.left * k}px`, top: `${r.box.top * k}px`,
      width: `${r.box.width * k}px`, height: `${r.box.height * k}px`,
    });
    box.hidden = false;
    $("#outpaint-empty").hidden = true;
  });
}

// ---------------------------------------------------------------------------------------------
// Classify
// ---------------------------------------------------------------------------------------------
async function classify(pick) {
  if (!state.info.classifier) { showError("no classifier is loaded: start the studio with --classifier DIR"); return; }
  const bars = $("#classify-bars");
  bars.innerHTML = `<p class="hint">Classifying…</p>`;
  showError(null);
  try {
    const r = await api("/api/classify", { form: sourceForm(pick) });
    state.last.classify = r;
    const im = $("#classify-input");
    im.src = r.image;
    im.hidden = false;
    $("#classify-empty").hidden = true;
    bars.innerHTML = "";
    for (const t of r.top) {
      const row = document.createElement("div");
      row.className = "bar";
      const pct = (100 * t.prob).toFixed(1);
      row.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span><span class="pct">${pct}%</span>`;
      $(".name", row).textContent = t.class;
      $(".fill", row).style.width = `${pct}%`; // set through the DOM: the page's CSP allows no inline styles
      bars.appendChild(row);
    }
  } catch (e) {
    bars.innerHTML = "";
    showError(e.message);
  }
}

// ---------------------------------------------------------------------------------------------
// start
// ---------------------------------------------------------------------------------------------
async function start() {
  try {
    state.info = await api("/api/info");
    state.samples = (await api("/api/samples")).samples;
  } catch (e) {
    showError(e.message);
    return;
  }
  const info = state.info;
  const S = info.image_size;
  $("#model-info").textContent =
    `${info.name} · ${S}×${S} · ${info.grid[0]}×${info.grid[1]} tokens · ` +
    (info.class_conditional ? `${info.classes.length} classes` : "unconditional") +
    (info.classifier ? " · classifier loaded" : "");

  // the model's recommended sampler (its sampler.json) fills every form's sampler fields
  for (const form of $$("form")) {
    for (const [k, v] of Object.entries(info.defaults)) {
      if (form.elements[k] && k !== "seed") form.elements[k].value = v;
    }
  }

  for (const b of $$(".tabs button")) b.onclick = () => selectTab(b.dataset.tab);
  for (const d of $$(".dice")) d.onclick = () => { d.previousElementSibling.value = randomSeed(); };
  if (!info.class_conditional) for (const el of $$(".class-field")) el.hidden = true;

  // Generate
  classOptions($("#generate-class"), "Unconditional");
  if (info.class_conditional) $("#generate-class").value = "0";
  $("#generate-form").elements.num.max = info.limits.num;
  $("#generate-form").addEventListener("submit", onGenerate);
  $("#watch-go").onclick = onWatch;
  $("#watch-go").title = `every step of at most ${info.limits.watch} images`;
  $("#watch-play").onclick = togglePlay;
  $("#watch-step").oninput = () => { stopPlaying(); drawFrame(Number($("#watch-step").value)); };
  $("#watch-overlay").onchange = () => drawFrame(Number($("#watch-step").value));

  // Inpaint
  classOptions($("#inpaint-class"));
  $("#inpaint-class").onchange = () => { $("#inpaint-form").elements.fill.value = "replace"; };
  $("#inpaint-form").elements.feather.max = info.limits.feather;
  makeSource($("[data-source=inpaint]"), [$("#paint")], pickForInpaint);
  bindPainting();
  resetMask();
  $("#inpaint-form").addEventListener("submit", onInpaint);

  // Outpaint
  classOptions($("#outpaint-class"), "Any (unconditional)");
  for (const n of ["left", "right", "top", "bottom"]) $("#outpaint-form").elements[n].max = info.limits.extend;
  makeSource($("[data-source=outpaint]"), [$("#panel-outpaint .output")], pickForOutpaint);
  $("#outpaint-form").addEventListener("submit", onOutpaint);

  // Classify
  $("#no-classifier").hidden = Boolean(info.classifier);
  if (info.classifier) makeSource($("[data-source=classify]"), [$("#panel-classify .output")], classify);
  else $("#classify-empty").textContent = "No classifier loaded";

  const tab = location.hash.slice(1);
  if (["generate", "inpaint", "outpaint", "classify"].includes(tab)) selectTab(tab);
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", start);

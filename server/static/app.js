// The ACA web page: plain JavaScript, no build step. Talks to the public API only:
// POST /v1/identities (upload), GET /v1/identities/{id}?wait= (ingest progress), the appearance map,
// WS /v1/identities/{id}/live (driving frames as JPEG, the server runs mediapipe), POST .../renders.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { identity: null, ws: null, timer: null, stream: null };
// Counters the browser test reads (tests/server/test_browser.py).
window.acaStats = { sent: 0, received: 0, drawn: 0, errors: 0, skipped: 0, lastError: null, closed: null };

// ------------------------------------------------------------------------------------------------ API helpers

function apiKey() {
  const key = $("api-key").value.trim();
  localStorage.setItem("aca-api-key", key);
  return key;
}

function headers() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(method, path, body) {
  const response = await fetch(path, { method, body, headers: headers() });
  if (!response.ok) {
    let message = `${response.status}`;
    try {
      const err = (await response.json()).error;
      message = `${err.code}: ${err.message}`;
    } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

// ------------------------------------------------------------------------------------------------- identities

async function refreshIdentities(selected) {
  try {
    const items = (await (await api("GET", "/v1/identities")).json()).items;
    const select = $("identity-select");
    select.innerHTML = '<option value="">-</option>';
    for (const it of items) {
      const opt = document.createElement("option");
      opt.value = it.id;
      opt.textContent = `${it.name || it.id} (${it.status})`;
      select.appendChild(opt);
    }
    if (selected) select.value = selected;
  } catch (e) { /* the list is a convenience */ }
}

async function followIngest(id) {
  $("appearance-map").hidden = true;
  for (;;) {
    const it = await (await api("GET", `/v1/identities/${id}?wait=2`)).json();
    $("ingest-bar").style.width = `${Math.round(100 * (it.progress || 0))}%`;
    $("identity-status").textContent = `${id}: ${it.status}` +
      (it.n_references ? ` | ${it.n_references} references` : "") +
      (it.error ? ` | ${it.error.code}: ${it.error.message}` : "");
    if (it.status === "ready") {
      state.identity = it;
      refreshIdentities(id);
      const blob = await (await api("GET", it.appearance_map_url)).blob();
      $("appearance-map").src = URL.createObjectURL(blob);
      $("appearance-map").hidden = false;
      $("start-button").disabled = false;
      $("render-button").disabled = false;
      return;
    }
    if (it.status === "failed") return;
  }
}

$("upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("reference-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  if ($("identity-name").value) form.append("name", $("identity-name").value);
  $("identity-status").textContent = "uploading...";
  try {
    const created = await (await api("POST", "/v1/identities", form)).json();
    await refreshIdentities(created.id);
    await followIngest(created.id);
  } catch (e) {
    $("identity-status").textContent = `upload failed: ${e.message}`;
  }
});

$("identity-select").addEventListener("change", (ev) => {
  if (ev.target.value) followIngest(ev.target.value);
});

// ------------------------------------------------------------------------------------------------------- live

const sentAt = new Map();
let latencies = [];

function drawCover(ctx, source, w, h) {
  // Centre square of the source, scaled to the canvas (the server crops around the face anyway).
  const sw = source.videoWidth || source.width, sh = source.videoHeight || source.height;
  const side = Math.min(sw, sh);
  ctx.drawImage(source, (sw - side) / 2, (sh - side) / 2, side, side, 0, 0, w, h);
}

async function openSource() {
  const video = $("driving-video");
  const kind = document.querySelector('input[name="source"]:checked').value;
  if (kind === "webcam") {
    state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
    video.srcObject = state.stream;
  } else {
    const file = $("driving-file").files[0];
    if (!file) throw new Error("choose a driving video first");
    video.srcObject = null;
    video.src = URL.createObjectURL(file);
  }
  await video.play();
  return video;
}

function onFrame(buffer) {
  const view = new DataView(buffer);
  const n = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
  const jpeg = new Blob([new Uint8Array(buffer, 4 + n)], { type: "image/jpeg" });
  window.acaStats.received += 1;
  const t0 = sentAt.get(header.seq);
  if (t0 !== undefined) {
    latencies.push(performance.now() - t0);
    if (latencies.length > 30) latencies = latencies.slice(-30);
    sentAt.delete(header.seq);
  }
  createImageBitmap(jpeg).then((bitmap) => {
    const canvas = $("output-canvas");
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    window.acaStats.drawn += 1;
  });
  const lat = latencies.length ? latencies.reduce((a, b) => a + b) / latencies.length : 0;
  $("live-stats").textContent = `fps ${header.fps.toFixed(1)} | latency ${lat.toFixed(0)} ms ` +
    `(server ${(1000 * header.timings.latency_s).toFixed(0)} ms) | dropped ${header.dropped}/${header.received}` +
    ` | batch ${header.timings.batch}`;
}

function stopLive(sendEnd) {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    if (sendEnd) state.ws.send(JSON.stringify({ type: "end" }));
    else state.ws.close(1000, "stopped");
  }
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.stream = null;
  $("start-button").disabled = !state.identity;
  $("stop-button").disabled = true;
}

async function startLive() {
  if (!state.identity) return;
  $("start-button").disabled = true;
  let video;
  try {
    video = await openSource();
  } catch (e) {
    $("live-stats").textContent = `cannot open the source: ${e.message}`;
    $("start-button").disabled = false;
    return;
  }
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const key = apiKey();
  const query = key ? `?access_token=${encodeURIComponent(key)}` : "";
  const ws = new WebSocket(`${proto}://${location.host}/v1/identities/${state.identity.id}/live${query}`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onmessage = (ev) => {
    if (typeof ev.data !== "string") { onFrame(ev.data); return; }
    const msg = JSON.parse(ev.data);
    if (msg.type === "error") {
      window.acaStats.errors += 1;
      window.acaStats.lastError = msg.error.code;
      $("live-stats").textContent = `error on frame ${msg.seq}: ${msg.error.code}: ${msg.error.message}`;
    }
  };
  ws.onclose = (ev) => {
    window.acaStats.closed = { code: ev.code, reason: ev.reason };
    stopLive(false);
  };
  ws.onopen = () => {
    $("stop-button").disabled = false;
    const input = $("input-canvas"), ctx = input.getContext("2d");
    const fps = Math.max(1, Math.min(60, Number($("send-fps").value) || 15));
    let seq = 0;
    state.timer = setInterval(() => {
      if (video.ended) { stopLive(true); return; }
      drawCover(ctx, video, input.width, input.height);
      // Latest wins on this side too: while the socket's buffer is backed up, skip frames instead of queueing.
      if (ws.bufferedAmount > 256 * 1024) { window.acaStats.skipped += 1; return; }
      const s = seq++;
      input.toBlob(async (blob) => {
        const head = new Uint8Array(4);
        new DataView(head.buffer).setUint32(0, s);
        if (ws.readyState !== WebSocket.OPEN) return;
        sentAt.set(s, performance.now());
        ws.send(new Blob([head, blob]));
        window.acaStats.sent += 1;
      }, "image/jpeg", 0.85);
    }, 1000 / fps);
  };
}

$("start-button").addEventListener("click", startLive);
$("stop-button").addEventListener("click", () => stopLive(true));

// ----------------------------------------------------------------------------------------------------- render

$("render-button").addEventListener("click", async () => {
  const file = $("driving-file").files[0];
  if (!state.identity || !file) { $("render-status").textContent = "choose a driving video first"; return; }
  const form = new FormData();
  form.append("file", file);
  $("render-button").disabled = true;
  $("render-download").hidden = true;
  try {
    const created = await (await api("POST", `/v1/identities/${state.identity.id}/renders`, form)).json();
    for (;;) {
      const r = await (await api("GET", `/v1/renders/${created.id}?wait=2`)).json();
      const frac = r.frames_total ? r.frames_done / r.frames_total : 0;
      $("render-bar").style.width = `${Math.round(100 * frac)}%`;
      $("render-status").textContent = `${r.id}: ${r.state} ${r.frames_done}/${r.frames_total}` +
        (r.error ? ` | ${r.error.code}: ${r.error.message}` : "");
      if (r.state === "done") {
        const blob = await (await api("GET", r.video_url)).blob();
        const link = $("render-download");
        link.href = URL.createObjectURL(blob);
        link.download = `${r.id}.mp4`;
        link.hidden = false;
        break;
      }
      if (r.state === "failed" || r.state === "cancelled") break;
    }
  } catch (e) {
    $("render-status").textContent = `render failed: ${e.message}`;
  }
  $("render-button").disabled = false;
});

$("api-key").value = localStorage.getItem("aca-api-key") || "";
refreshIdentities();

// adaptr ui: the curves chart (uPlot) and the playground's stream. No inline script: the
// pages pass data as JSON in <script type="application/json"> (the CSP allows only 'self').
"use strict";

function csrfToken() {
  return document.querySelector('meta[name="csrf-token"]').content;
}

// ------------------------------------------------------------------ curves
const PALETTE = ["#2f6fde", "#d1495b", "#1a7f37", "#d4a017", "#7b4fc4", "#0f8b8d", "#e07a1f", "#555"];

function drawCurves() {
  const holder = document.getElementById("chart");
  const source = document.getElementById("chart-data");
  if (!holder || !source || typeof uPlot === "undefined") return;
  const chart = JSON.parse(source.textContent);
  const logBox = document.getElementById("log-scale");
  const draw = () => {
    holder.textContent = "";
    const log = logBox && logBox.checked;
    const series = [{ label: "step" }];
    chart.labels.forEach((label, i) => {
      const colour = PALETTE[Math.floor(i / 2) % PALETTE.length];
      series.push({
        label: label, stroke: colour, width: 2, spanGaps: true, points: { show: true, size: 4 },
        dash: label.endsWith("eval_loss") ? [6, 4] : undefined,
        value: (u, v) => (v == null ? "-" : v.toPrecision(4)),
      });
    });
    const opts = {
      width: Math.min(1100, holder.clientWidth || 900), height: 420, series: series,
      scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
      axes: [{ label: "step" }, { label: "loss" }], legend: { live: true },
    };
    window.adaptrChart = new uPlot(opts, chart.data, holder);
  };
  if (logBox) logBox.addEventListener("change", draw);
  draw();
}

// ------------------------------------------------------------------ playground
function column(answers, title) {
  const box = document.createElement("div");
  box.className = "answer";
  const h = document.createElement("h3");
  h.textContent = title;
  const pre = document.createElement("pre");
  const end = document.createElement("div");
  end.className = "end";
  box.append(h, pre, end);
  answers.append(box);
  return { pre: pre, end: end };
}

async function runPlayground(form) {
  const status = document.getElementById("status");
  const answers = document.getElementById("answers");
  const refs = [...form.querySelectorAll('input[name="ref"]:checked')].map((x) => x.value);
  const body = {
    prompt: form.prompt.value, refs: refs, chat: form.chat.checked,
    temperature: Number(form.temperature.value), max_tokens: Number(form.max_tokens.value),
  };
  answers.textContent = "";
  const cols = refs.map((r) => column(answers, r.startsWith("base:") ? r.slice(5) + " (base)" : r));
  status.textContent = "running…";
  const response = await fetch("/playground/stream", {
    method: "POST", body: JSON.stringify(body),
    headers: { "content-type": "application/json", "x-csrf-token": csrfToken(), accept: "text/event-stream, application/json" },
  });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    status.textContent = "refused: " + message;
    status.className = "err";
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const d = data ? JSON.parse(data) : {};
      if (event === "message") cols[d.i].pre.textContent += d.text;
      else if (event === "end") { cols[d.i].end.textContent = "finished: " + d.reason; cols[d.i].pre.parentNode.dataset.done = "1"; }
      else if (event === "error") { cols[d.i].end.textContent = d.message; cols[d.i].end.className = "end err"; cols[d.i].pre.parentNode.dataset.done = "1"; }
      else if (event === "start") status.textContent = "streaming from " + d.base + "…";
      else if (event === "done") { status.textContent = "done"; answers.dataset.done = "1"; }
    }
  }
}

function setupPlayground() {
  const form = document.getElementById("playground");
  if (!form) return;
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    runPlayground(form).catch((err) => { document.getElementById("status").textContent = "failed: " + err; });
  });
}

document.addEventListener("DOMContentLoaded", () => { drawCurves(); setupPlayground(); });

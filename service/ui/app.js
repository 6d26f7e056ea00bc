// memcast pages: the stream list (/ui) and a page per stream (/ui/streams/{id}).
// No libraries, no CDN: fetch, plain SVG and DOM calls. An API key, when the service needs one,
// is asked for once, kept in sessionStorage (this tab only) and sent as the X-API-Key header;
// it never goes into a URL.
"use strict";

const KEY_ITEM = "memcast-api-key";
const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";

class AuthNeeded extends Error {}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { "X-API-Key": key } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: authHeaders() });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_ITEM);
    askForKey("That key was refused; enter a valid one.");
    throw new AuthNeeded();
  }
  const body = await response.json();
  if (!response.ok) {
    throw new Error(body.error ? body.error.message : response.statusText);
  }
  return body;
}

function setStatus(text, isError = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function askForKey(message) {
  const form = document.getElementById("auth");
  form.hidden = false;
  setStatus(message, true);
  document.getElementById("key").focus();
}

function setUpKeyForm(start) {
  const form = document.getElementById("auth");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, document.getElementById("key").value);
    document.getElementById("key").value = "";
    form.hidden = true;
    setStatus("");
    start();
  });
}

// -- the stream list ---------------------------------------------------------------------------

function listPage() {
  let cursor = null;
  const more = document.getElementById("more");

  async function load() {
    const query = new URLSearchParams({ limit: "50" });
    if (cursor) query.set("cursor", cursor);
    try {
      const page = await api(`/v1/streams?${query}`);
      const list = document.getElementById("streams");
      for (const id of page.streams) {
        const item = document.createElement("li");
        const link = document.createElement("a");
        link.href = `/ui/streams/${encodeURIComponent(id)}`;
        link.textContent = id;
        item.append(link);
        list.append(item);
      }
      cursor = page.next_cursor;
      more.hidden = !cursor;
      setStatus(list.children.length ? "" : "No streams yet: POST /v1/streams creates one.");
    } catch (error) {
      if (!(error instanceof AuthNeeded)) setStatus(error.message, true);
    }
  }

  more.addEventListener("click", load);
  return () => {
    cursor = null;
    document.getElementById("streams").replaceChildren();
    load();
  };
}

// -- a stream's page ---------------------------------------------------------------------------

function streamPage() {
  const streamId = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const base = `/v1/streams/${encodeURIComponent(streamId)}`;
  const select = document.getElementById("column");
  let timer = null;
  let last = null;

  document.title = `memcast: ${streamId}`;
  document.getElementById("title").textContent = streamId;
  document.getElementById("crumb").textContent = streamId;
  select.addEventListener("change", () => last && draw(...last));

  async function refresh() {
    clearTimeout(timer);
    try {
      const parts = await Promise.all([api(`${base}/history`), api(`${base}/forecast`), api(`${base}/accuracy`)]);
      last = parts;
      draw(...parts);
      setStatus(`updated ${new Date().toLocaleTimeString()}`);
    } catch (error) {
      if (error instanceof AuthNeeded) return; // polling resumes once a key is given
      setStatus(error.message, true);
    }
    timer = setTimeout(refresh, POLL_MS);
  }

  function draw(history, forecast, accuracy) {
    if (select.options.length !== history.columns.length) {
      select.replaceChildren(...history.columns.map((c) => new Option(c, c)));
      select.value = history.targets[0];
    }
    const ready = history.ready ? "ready" : `needs ${history.needs} more values`;
    document.getElementById("summary").textContent =
      `model ${history.model}, mode ${history.mode}, ${history.steps} observations, ` +
      `last at ${history.last_timestamp ?? "-"}, ${ready}`;
    drawChart(history, forecast, select.value);
    drawAccuracy(accuracy);
  }

  return refresh;
}

function svg(tag, attrs, title) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (title) {
    const tip = document.createElementNS(SVG_NS, "title");
    tip.textContent = title;
    node.append(tip);
  }
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "-";
  return Math.abs(value) >= 1000 || (Math.abs(value) < 0.01 && value !== 0) ? value.toExponential(2) : value.toFixed(3);
}

function drawChart(history, forecast, column) {
  const chart = document.getElementById("chart");
  const [width, height, left, right, top, bottom] = [900, 340, 60, 16, 14, 30];
  const rows = history.rows;
  const isTarget = history.targets.includes(column);
  const ahead = isTarget && forecast.forecast ? forecast.forecast.rows : [];
  const band = ahead.filter((r) => r.lower && r.upper && column in r.lower && column in r.upper);

  const ys = rows.map((r) => r.values[column]);
  if (isTarget) rows.forEach((r) => r.forecast && ys.push(r.forecast[column]));
  ahead.forEach((r) => ys.push(r.values[column]));
  band.forEach((r) => ys.push(r.lower[column], r.upper[column]));
  let [lo, hi] = ys.length ? [Math.min(...ys), Math.max(...ys)] : [0, 1];
  if (hi - lo < 1e-9) [lo, hi] = [lo - 1, hi + 1];
  const pad = (hi - lo) * 0.08;
  [lo, hi] = [lo - pad, hi + pad];
  const slots = Math.max(rows.length + ahead.length - 1, 1);
  const x = (i) => left + ((width - left - right) * i) / slots;
  const y = (v) => top + ((height - top - bottom) * (hi - v)) / (hi - lo);

  const nodes = [
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }),
    svg("line", { class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }),
  ];
  for (let k = 0; k <= 4; k++) {
    const v = lo + ((hi - lo) * k) / 4;
    nodes.push(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }));
    nodes[nodes.length - 1].textContent = fmt(v);
  }
  if (rows.length) {
    const first = svg("text", { x: left, y: height - 10 });
    first.textContent = String(rows[0].timestamp);
    const now = svg("text", { x: x(rows.length - 1), y: height - 10, "text-anchor": "middle" });
    now.textContent = String(rows[rows.length - 1].timestamp);
    nodes.push(first, now);
    if (ahead.length) {
      nodes.push(svg("line", { class: "now", x1: x(rows.length - 1), y1: top, x2: x(rows.length - 1), y2: height - bottom }));
    }
  }
  if (band.length && rows.length) {
    const upper = band.map((r, k) => `${x(rows.length + k)},${y(r.upper[column])}`);
    const lower = band.map((r, k) => `${x(rows.length + k)},${y(r.lower[column])}`).reverse();
    nodes.push(svg("polygon", { class: "interval", points: [...upper, ...lower].join(" ") }));
  }
  nodes.push(svg("polyline", { class: "history", points: rows.map((r, i) => `${x(i)},${y(r.values[column])}`).join(" ") }));
  if (ahead.length && rows.length) {
    const start = `${x(rows.length - 1)},${y(rows[rows.length - 1].values[column])}`;
    const path = ahead.map((r, k) => `${x(rows.length + k)},${y(r.values[column])}`);
    nodes.push(svg("polyline", { class: "forecast", points: [start, ...path].join(" ") }));
  }
  rows.forEach((r, i) => {
    const v = r.values[column];
    nodes.push(svg("circle", { class: "point history", cx: x(i), cy: y(v), r: 2.6 }, `${r.timestamp}: ${fmt(v)}`));
    if (isTarget && r.forecast) {
      const f = r.forecast[column];
      const tip = `${r.timestamp}: forecast ${fmt(f)} (${r.forecast_step} ahead), observed ${fmt(v)}`;
      nodes.push(svg("circle", { class: "point past", cx: x(i), cy: y(f), r: 3.4 }, tip));
    }
  });
  ahead.forEach((r, k) => {
    const tip = `${r.timestamp ?? `step ${r.step}`}: forecast ${fmt(r.values[column])}`;
    nodes.push(svg("circle", { class: "point forecast", cx: x(rows.length + k), cy: y(r.values[column]), r: 2.6 }, tip));
  });
  chart.replaceChildren(...nodes);
  document.querySelector(".legend .interval").hidden = !band.length;
  chart.dataset.steps = String(history.steps);
  chart.dataset.rows = String(rows.length);
}

function drawAccuracy(accuracy) {
  const body = document.querySelector("#accuracy tbody");
  const cells = (s) => [s.count, fmt(s.mae), fmt(s.last_value_mae), s.skill];
  const lines = [["all", accuracy.since_creation, accuracy.recent]];
  accuracy.since_creation.steps.forEach((s, k) => lines.push([String(s.step), s, accuracy.recent.steps[k]]));
  body.replaceChildren(
    ...lines.map(([label, since, recent]) => {
      const tr = document.createElement("tr");
      for (const value of [label, ...cells(since), ...cells(recent)]) {
        const td = document.createElement("td");
        if (typeof value === "number" && !Number.isInteger(value)) {
          td.textContent = fmt(value);
          td.className = value > 0 ? "good" : "bad";
        } else {
          td.textContent = value === null ? "-" : String(value);
        }
        tr.append(td);
      }
      return tr;
    }),
  );
}

// -- start -------------------------------------------------------------------------------------

async function main() {
  const start = document.body.dataset.page === "list" ? listPage() : streamPage();
  setUpKeyForm(start);
  const config = await (await fetch("/ui/config.json")).json();
  if (config.api_key_required && !sessionStorage.getItem(KEY_ITEM)) {
    askForKey("This service needs an API key.");
    return;
  }
  start();
}

main();

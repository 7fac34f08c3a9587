// The mqtt_broker dashboard: plain JavaScript, polling the admin API (/api/v1) every few seconds.
// The API key the operator types is kept in this browser's localStorage and sent as a bearer token.
"use strict";

const API = "api/v1";
// Between 0.5 s and an hour whatever a link says: setTimeout takes a delay past 2^31 - 1 ms as 0.
const POLL_MS = Math.min(3600000, Math.max(500, Number(new URLSearchParams(location.search).get("interval")) || 2000));
const HISTORY = 300; // points per chart: ten minutes at the default interval
// A broker whose reactor is held (or a host gone from the network) keeps the connection open and
// answers nothing: without a limit the page would wait for ever, showing the last figures as live.
const ANSWER_MS = 10000;

const state = {
  key: localStorage.getItem("mqtt_broker.key") || "",
  selected: null,        // client id whose subscriptions are shown
  previous: null,        // the last /stats, for rates
  messages: [],          // {t, in, out}
  connections: [],       // {t, connected, rate}
  timer: null,
  sysOpen: false,        // whether the $SYS branch of the topic tree is unfolded
};

const $ = (id) => document.getElementById(id);

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function say(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

async function ask(path, options = {}) {
  try {
    return await fetch(API + path, Object.assign({ signal: AbortSignal.timeout(ANSWER_MS) }, options));
  } catch (e) {
    if (e.name === "TimeoutError") throw new Error("the broker did not answer within " + ANSWER_MS / 1000 + " s");
    throw e;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers.Authorization = "Bearer " + state.key;
  const response = await ask(path, Object.assign({}, options, { headers }));
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function humanBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function humanDuration(seconds) {
  seconds = Math.floor(seconds);
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600), m = Math.floor(seconds % 3600 / 60);
  return "up " + (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (seconds % 60) + "s";
}

// --- health (public: polled without a key) -----------------------------------------------------

async function refreshHealth() {
  const pill = $("health");
  try {
    const health = await ask("/health").then((r) => r.json());
    const ready = await ask("/ready").then((r) => r.json());
    pill.textContent = ready.ready ? "healthy · ready" : "alive · not ready: " + ready.reason;
    pill.className = "pill " + (ready.ready ? "ok" : "bad");
    $("version").textContent = health.version;
    $("uptime").textContent = humanDuration(health.uptime);
  } catch (e) {
    pill.textContent = "unreachable";
    pill.className = "pill bad";
  }
}

// --- figures and charts ---------------------------------------------------------------------------

async function refreshStats() {
  const stats = await api("/stats");
  $("fig-connected").textContent = stats.clients_connected;
  $("fig-disconnected").textContent = stats.clients_disconnected;
  $("fig-subscriptions").textContent = stats.subscriptions;
  $("fig-retained").textContent = stats.retained;
  $("fig-queued").textContent = stats.queued;
  $("fig-inflight").textContent = stats.inflight;
  $("fig-dropped").textContent = stats.dropped_total;
  $("fig-memory").textContent = humanBytes(stats.memory);
  const previous = state.previous;
  state.previous = stats;
  // A broker started since the last reading (stats.time - stats.uptime is its start) counts from
  // zero again: a rate across the two readings would be its counters' fall, drawn below the axis.
  const restarted = previous && stats.time - stats.uptime > previous.time;
  if (previous && stats.time > previous.time && !restarted) {
    const dt = stats.time - previous.time;
    push(state.messages, { t: stats.time, in: (stats.publish_received_total - previous.publish_received_total) / dt,
                           out: (stats.publish_sent_total - previous.publish_sent_total) / dt });
    push(state.connections, { t: stats.time, connected: stats.clients_connected,
                              rate: (stats.connections_total - previous.connections_total) / dt });
    draw($("chart-messages"), state.messages, [["in", "--in"], ["out", "--out"]]);
    draw($("chart-connections"), state.connections, [["connected", "--conn"], ["rate", "--rate"]]);
  }
  return stats;
}

function push(series, point) {
  series.push(point);
  if (series.length > HISTORY) series.shift();
}

function draw(canvas, points, lines) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width, height = canvas.clientHeight || canvas.height;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  const left = 44, bottom = height - 18, top = 8, right = width - 8;
  // The axis spans the points there are (at least 30 s), up to the whole history at POLL_MS. Polls
  // come POLL_MS after the last one's answers, so a full history spans more: the points before the
  // axis's start are off the chart, neither drawn (they were piled up on its left edge) nor in its
  // scale (a burst gone from view kept the lines shown flat along the bottom).
  const last = points.length ? points[points.length - 1].t : 0;
  const span = points.length ? Math.min((HISTORY - 1) * POLL_MS / 1000, Math.max(30, last - points[0].t)) : 30;
  const t0 = last - span;
  const shown = points.filter((p) => p.t >= t0);
  let max = 1;
  for (const p of shown) for (const [name] of lines) max = Math.max(max, p[name]);
  max = niceCeiling(max);
  g.strokeStyle = "#e3e6eb";
  g.fillStyle = "#6b7280";
  g.font = "11px system-ui, sans-serif";
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = bottom - (bottom - top) * i / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(right, y); g.stroke();
    g.fillText(formatNumber(max * i / 4), 4, y + 4);
  }
  if (shown.length) {
    const x = (t) => left + (right - left) * (t - t0) / span;
    g.fillText(span >= 120 ? Math.round(span / 60) + " min ago" : Math.round(span) + " s ago", left, height - 4);
    g.fillText("now", right - 22, height - 4);
    for (const [name, colour] of lines) {
      g.strokeStyle = style.getPropertyValue(colour).trim() || "#000";
      g.lineWidth = 2;
      g.beginPath();
      shown.forEach((p, i) => {
        const y = bottom - (bottom - top) * p[name] / max;
        if (i) g.lineTo(x(p.t), y); else g.moveTo(x(p.t), y);
      });
      g.stroke();
    }
  }
  // For tests and curious operators: how many points, and each line's highest value shown.
  canvas.dataset.points = String(shown.length);
  canvas.dataset.peak = JSON.stringify(Object.fromEntries(lines.map(([name]) => [name, Math.max(0, ...shown.map((p) => p[name]))])));
}

function niceCeiling(value) {
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function formatNumber(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return n >= 10 || n === 0 ? String(Math.round(n)) : n.toFixed(1);
}

// --- clients ----------------------------------------------------------------------------------------

async function refreshClients() {
  const query = $("client-search").value.trim();
  const page = await api("/clients?limit=200" + (query ? "&q=" + encodeURIComponent(query) : ""));
  $("clients-count").textContent = page.total + (page.total > page.items.length ? " (first " + page.items.length + ")" : "");
  const body = $("clients").tBodies[0];
  body.replaceChildren(...page.items.map((c) => {
    const row = el("tr", { class: "client" + (c.client_id === state.selected ? " selected" : ""), "data-client-id": c.client_id,
                           onclick: () => select(c.client_id) },
      el("td", {}, c.client_id),
      c.connected ? el("td", {}, c.peer || "") : el("td", { class: "offline" }, "offline"),
      el("td", {}, c.protocol_version ? { 3: "3.1", 4: "3.1.1", 5: "5" }[c.protocol_version] : ""),
      el("td", {}, c.subscription_count),
      el("td", {}, c.queued),
      el("td", {}, c.connected ? el("button", { class: "kick", type: "button", title: "disconnect this client",
                                                onclick: (event) => { event.stopPropagation(); kick(c.client_id); } }, "Kick") : ""));
    return row;
  }));
  if (state.selected && !page.items.some((c) => c.client_id === state.selected) && !query) select(null);
}

async function kick(clientId) {
  try {
    await api("/clients/" + encodeURIComponent(clientId), { method: "DELETE" });
    say("");
  } catch (e) {
    say("Could not disconnect " + clientId + ": " + e.message);
  }
  await refreshClients().catch(() => {});
}

async function select(clientId) {
  state.selected = clientId;
  $("details-client").textContent = clientId === null ? "(choose a client)" : clientId;
  for (const row of $("clients").tBodies[0].rows) row.classList.toggle("selected", row.dataset.clientId === clientId);
  await refreshSubscriptions();
}

async function refreshSubscriptions() {
  const body = $("subscriptions").tBodies[0];
  const clientId = state.selected;
  if (clientId === null) { body.replaceChildren(); return; }
  const page = await api("/subscriptions?limit=1000&client_id=" + encodeURIComponent(clientId));
  if (clientId !== state.selected) return;  // (another client was chosen meanwhile: its answer shows)
  // A client may hold more than a page: say so, as the clients panel does, or a filter past the
  // first thousand looks absent.
  $("details-client").textContent = clientId + (page.total > page.items.length
    ? " (first " + page.items.length + " of " + page.total + ")" : "");
  body.replaceChildren(...page.items.map((s) => el("tr", {},
    el("td", {}, s.topic_filter), el("td", {}, s.qos),
    el("td", {}, [s.no_local && "no local", s.retain_as_published && "retain as published",
                  s.share_group && "shared"].filter(Boolean).join(", ")))));
}

// --- topics -------------------------------------------------------------------------------------------

async function refreshTopics(stats) {
  // (Each retained topic's message comes in the tree itself: taken from a page of /retained, a
  // topic past that page was shown without one.)
  const topics = await api("/topics?limit=2000&payload_max=320");
  $("topics-count").textContent = topics.count + " topics, " + stats.retained + " retained";
  // Application topics first; the broker's own $SYS tree last, folded.
  const roots = topics.tree.children.slice().sort((a, b) => (a.name.startsWith("$") - b.name.startsWith("$")));
  $("topics").replaceChildren(...roots.map((node) => treeNode(node)));
}

function treeNode(node) {
  const item = el("li", { "data-topic": node.topic || "" }, el("span", { class: "level" }, node.name || "(empty)"));
  if (node.name === "$SYS" && node.topic === null) {
    const folded = el("details", {}, el("summary", {}, "$SYS"));
    folded.open = state.sysOpen;   // kept across refreshes
    folded.addEventListener("toggle", () => { state.sysOpen = folded.open; });
    folded.append(el("ul", {}, ...node.children.map((child) => treeNode(child))));
    return el("li", { "data-topic": "" }, folded);
  }
  const message = node.message;
  if (message) {
    const text = message.payload_encoding === "utf-8" ? message.payload : "base64:" + message.payload;
    item.append(el("span", { class: "retained", title: "retained, QoS " + message.qos }, "= " + text.slice(0, 80)));
  }
  if (node.topic !== null && !node.retained && node.recent) item.append(el("span", { class: "tag" }, "live"));
  if (node.children.length) item.append(el("ul", {}, ...node.children.map((child) => treeNode(child))));
  return item;
}

// --- the cluster (shown only on a node of a cluster, which /stats tells) -------------------------------

async function refreshCluster(stats) {
  const panel = $("cluster-panel");
  if (!stats.cluster) { panel.hidden = true; return; }
  let answer;
  try {
    answer = await api("/cluster/nodes");
  } catch (e) {
    if (e.status !== 503) throw e;
    // Redis out of reach: the rest of the page is this node's and goes on; the rows are the last known.
    $("cluster-count").textContent = e.message + " (the nodes as last known)";
    return;
  }
  const alive = answer.nodes.filter((n) => n.alive).length;
  $("cluster-count").textContent = alive + " of " + answer.nodes.length + " nodes alive";
  $("cluster").tBodies[0].replaceChildren(...answer.nodes.map((n) => el("tr", { class: "node", "data-node-id": n.id },
    el("td", {}, n.id, n.id === answer.node ? el("span", { class: "tag" }, "this node") : ""),
    n.alive ? el("td", {}, "alive") : el("td", { class: "dead" }, "dead"),
    el("td", {}, n.clients),
    el("td", {}, n.filters),
    el("td", {}, n.inbox.unread),
    el("td", {}, n.inbox.unhandled))));
  panel.hidden = false;
}

// --- bridges (only on a broker with bridges: /stats has a bridges part then) ---------------------------

async function refreshBridges(stats) {
  const panel = $("bridges-panel");
  if (!stats.bridges) { panel.hidden = true; return; }
  const up = stats.bridges.filter((b) => b.state === "connected").length;
  $("bridges-count").textContent = up + " of " + stats.bridges.length + " connected";
  $("bridges").tBodies[0].replaceChildren(...stats.bridges.map((b) => el("tr", { class: "bridge", "data-bridge": b.name },
    el("td", {}, b.name),
    el("td", { class: b.state === "connected" ? "" : "dead" }, b.state),
    el("td", {}, b.address),
    el("td", {}, b.queued),
    el("td", {}, b.messages_in),
    el("td", {}, b.messages_out),
    el("td", { class: "error" }, b.last_error),
    el("td", {}, el("button", { class: "restart", type: "button", title: "drop the links and connect again now",
                                onclick: () => restartBridge(b.name) }, "Restart")))));
  panel.hidden = false;
}

async function restartBridge(name) {
  try {
    await api("/bridges/" + encodeURIComponent(name) + "/restart", { method: "POST" });
    say("");
  } catch (e) {
    say("Could not restart bridge " + name + ": " + e.message);
  }
  await api("/stats").then(refreshBridges).catch(() => {});
}

// --- the loop ---------------------------------------------------------------------------------------

async function refresh() {
  await refreshHealth();
  if (!state.key) { say("Paste an API key to see clients, topics and figures."); return; }
  try {
    const stats = await refreshStats();
    await Promise.all([refreshClients(), refreshSubscriptions(), refreshTopics(stats), refreshCluster(stats),
                      refreshBridges(stats)]);
    say("");
  } catch (e) {
    say(e.status === 401 || e.status === 403 ? "The API key was refused: " + e.message : "Could not reach the API: " + e.message);
  }
}

function schedule() {
  clearTimeout(state.timer);
  refresh().finally(() => { state.timer = setTimeout(schedule, POLL_MS); });
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = state.key;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    localStorage.setItem("mqtt_broker.key", state.key);
    state.previous = null;
    schedule();
  });
  let searching = null;
  $("client-search").addEventListener("input", () => {
    clearTimeout(searching);
    searching = setTimeout(() => refreshClients().catch((e) => say(e.message)), 200);
  });
  schedule();
});

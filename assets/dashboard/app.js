// BootTorrent dashboard: plain DOM, no framework, no build step (it runs air-gapped).
//
// Sign-in: every read of the API needs a token, so the page shows nothing until the operator
// enters one: the admin token, or the read-only viewer token (a wall display). It is kept in
// sessionStorage, so it is gone with the tab, and sent on every request. A 401 signs out and
// says why; a 403 (the viewer token on a change) is shown and the page stays signed in.
//
// Where the data comes from: a fleet has thousands of machines, so no request lists them all.
// The machines table shows one page (GET /api/v1/machines with the operator's filters, a
// `limit` and an `after` cursor; the server's Link header says whether another page follows);
// the counts at a glance come from GET /api/v1/fleet. Both, images and zones are fetched at
// sign-in, on every (re)connect of the live event stream and every few seconds; `machine`
// events update the rows of the page shown. Deployments are fetched at sign-in and on
// (re)connect with at most DEPLOYMENT_ROWS machine rows each (stragglers first, the server
// says how many it left out), then kept current by the `deployment` events (cut short the same
// way) and `transition` events of GET /api/v1/events.
"use strict";

const POLL_MS = 5000;
const TOKEN_KEY = "boottorrent.token";
// Older finished deployments are left out: a lab accumulates hundreds over a term.
const SHOWN_DEPLOYMENTS = 30;
// Machine rows shown per deployment: the stragglers an operator acts on, not a room of 300
// that all staged.
const DEPLOYMENT_ROWS = 20;
// Member ids shown inline per zone before "… N more".
const ZONE_IDS_SHOWN = 5;

const state = {
  page: [], // the machines of the page shown, as GET /api/v1/machines answers
  // The pages walked to: the path of each, the shown page last; Previous goes back one.
  pages: [],
  next: null, // the path of the page after the shown one (the Link header), or null
  fleet: null, // GET /api/v1/fleet: counts of the whole fleet
  images: new Map(), // id -> image
  zones: [],
  deployments: new Map(), // id -> deployment, as in the API and the events
};
// The live event stream: { abort: AbortController, open: bool }, or null when signed out.
let stream = null;
let poller = null; // the polling interval while signed in

const $ = (id) => document.getElementById(id);

// Builds an element. Text always goes in as text nodes, never as HTML: host names and error
// messages come from agents. `data-*` values are written as they are ("true", "false");
// other true/false values are HTML boolean attributes (open, checked): present or absent.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k.startsWith("data-")) node.setAttribute(k, String(v));
    else if (k === "class") node.className = v;
    else if (v !== false) node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

// ---- formatting ----

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}
const rate = (bps) => (bps > 0 ? bytes(bps) + "/s" : "–");
const pct = (done, total) => (total > 0 ? Math.min(100, Math.floor((done * 100) / total)) : 0);

function duration(secs) {
  if (!isFinite(secs) || secs < 0) return "–";
  const s = Math.round(secs);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function ago(ms) {
  if (!ms) return "–";
  const s = (Date.now() - ms) / 1000;
  return s < 5 ? "just now" : duration(s) + " ago";
}

function bar(done, total) {
  return el("span", { class: "bar" },
    el("progress", { max: total || 1, value: Math.min(done, total || 1) }),
    " " + pct(done, total) + "%");
}

function targetText(t) {
  if (t.zone) return "zone " + t.zone;
  if (t.machines) return "machines " + t.machines.join(", ");
  return "every machine";
}

const imageName = (id) => (state.images.get(id) || {}).name || id.slice(0, 12);

// Seconds until the last downloading machine is done at its current rate (what the operator
// waits for), or Infinity when one of them is not moving.
function remainingSecs(machines) {
  let worst = 0;
  for (const m of machines) {
    if (m.state !== "downloading") continue;
    worst = Math.max(worst, m.download_bps > 0 ? (m.bytes_total - m.bytes_done) / m.download_bps : Infinity);
  }
  return worst;
}

// ---- messages ----

function showError(message, from) {
  $("error-text").textContent = message;
  $("error").dataset.from = from || "action";
  $("error").hidden = false;
}
function clearError(from) {
  if (!from || $("error").dataset.from === from) $("error").hidden = true;
}
function notice(message) {
  $("notice").textContent = message;
  $("notice").hidden = false;
}

// ---- API ----

const token = () => sessionStorage.getItem(TOKEN_KEY);

// Why the server refused a request, from its `{"error": ...}` answer; a 401 also signs out.
async function refusal(method, path, response) {
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: shown raw below */ }
  const why = (data && data.error) || text || response.statusText;
  if (response.status === 401) {
    signOut();
    return new Error(`The server refused the token: ${why} (HTTP 401). Enter it again.`);
  }
  if (response.status === 403) return new Error(`Not allowed with this token: ${why} (HTTP 403).`);
  return new Error(`${method} ${path}: ${why} (HTTP ${response.status})`);
}

// Sends a request to the API; throws an Error whose message is the API's own
// `{"error": ...}` text when it is refused.
async function send(method, path, body) {
  if (!token()) throw new Error("Sign in with a token first.");
  const headers = { Authorization: "Bearer " + token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new Error(`The server did not answer ${method} ${path} (${e.message}).`);
  }
  if (!response.ok) throw await refusal(method, path, response);
  return response;
}

async function parsed(response) {
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

// Calls the API and answers its JSON.
const api = async (method, path, body) => parsed(await send(method, path, body));

// A page of a list: its items, and the path of the next page from the answer's
// `Link: <path>; rel="next"` header (null: this is the last).
async function apiPage(path) {
  const response = await send("GET", path);
  const link = /<([^>]*)>\s*;\s*rel="next"/.exec(response.headers.get("Link") || "");
  return { items: await parsed(response), next: link ? link[1] : null };
}

// A list fetched before an event may arrive after it: keep whichever copy saw the later change.
function freshness(d) {
  let t = Math.max(d.created_ms || 0, d.cancelled_ms || 0);
  for (const m of d.machines || []) {
    t = Math.max(t, m.updated_ms || 0);
    const last = m.transitions && m.transitions[m.transitions.length - 1];
    if (last) t = Math.max(t, last.at_ms);
  }
  return t;
}
function mergeDeployment(d) {
  const old = state.deployments.get(d.id);
  if (old && freshness(old) > freshness(d)) return false;
  state.deployments.set(d.id, d);
  return true;
}

// ---- the page of machines ----

// The first page's path for the filters and page size the operator chose.
function firstPagePath() {
  const query = new URLSearchParams({ limit: $("page-size").value });
  for (const [param, select] of [["zone", "filter-zone"], ["online", "filter-online"],
    ["key_state", "filter-key"], ["image", "filter-image"]]) {
    if ($(select).value) query.set(param, $(select).value);
  }
  return "/api/v1/machines?" + query;
}
const shownPath = () => state.pages[state.pages.length - 1] || firstPagePath();

// Reads the page at the top of state.pages and shows it, unless the operator moved to another
// page meanwhile (that page's own read shows it).
async function loadPage() {
  if (!token()) return;
  const path = shownPath();
  try {
    const { items, next } = await apiPage(path);
    if (path !== shownPath()) return;
    state.page = items;
    state.next = next;
    clearError("poll");
    renderMachines();
  } catch (e) {
    showError(e.message, token() ? "poll" : "auth");
  }
}

// A filter or the page size changed: back to the first page.
function firstPage() {
  state.pages = [firstPagePath()];
  state.next = null;
  loadPage();
}
function nextPage() {
  if (!state.next) return;
  state.pages.push(state.next);
  loadPage();
}
function previousPage() {
  if (state.pages.length < 2) return;
  state.pages.pop();
  loadPage();
}

async function refreshLists(withDeployments) {
  if (!token()) return;
  try {
    const path = shownPath();
    const [page, fleet, images, zones] = await Promise.all([
      apiPage(path), api("GET", "/api/v1/fleet"), api("GET", "/api/v1/images"),
      api("GET", "/api/v1/zones?ids=" + ZONE_IDS_SHOWN),
    ]);
    if (path === shownPath()) {
      state.page = page.items;
      state.next = page.next;
    }
    state.fleet = fleet;
    state.images = new Map(images.map((i) => [i.id, i]));
    state.zones = zones;
    if (withDeployments) {
      const path = `/api/v1/deployments?machines=${DEPLOYMENT_ROWS}&limit=${SHOWN_DEPLOYMENTS}`;
      (await api("GET", path)).forEach(mergeDeployment);
    }
    clearError("poll");
    renderAll();
  } catch (e) {
    showError(e.message, token() ? "poll" : "auth");
  }
}

// ---- rendering ----

function renderAll() {
  renderFilters();
  renderMachines();
  renderZones();
  renderImages();
  renderDeployForm();
  renderDeployments();
}

function fillTable(id, rows, columns, emptyText) {
  $(id).tBodies[0].replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: columns, class: "empty" }, emptyText))]));
}

function heldView(h) {
  return el("div", { class: "held", "data-image": h.image, "data-state": h.state },
    imageName(h.image) + " ", el("span", { class: "state", "data-state": h.state }, h.state),
    h.state === "downloading" ? bar(h.bytes_done, h.bytes_total) : null);
}

// The fleet at a glance, counted by the server: machines, online, keys waiting for approval.
function renderCounts() {
  const f = state.fleet;
  if (!f) return $("fleet-counts").replaceChildren();
  const keys = f.key_states || {};
  const waiting = (keys.pending || 0) + (keys.key_changed || 0);
  const count = (name, n, text) => el("span", { class: "count-" + name, "data-count": name, "data-n": n },
    el("strong", {}, String(n)), " " + text);
  $("fleet-counts").replaceChildren(el("span", {},
    count("machines", f.machines, "machines"), " · ",
    count("online", f.online, "online"), " · ",
    count("offline", f.machines - f.online, "offline"), " · ",
    count("waiting", waiting, "waiting for approval"),
    keys.key_changed ? ` (${keys.key_changed} with a changed key)` : null,
    waiting ? el("button", { type: "button", id: "show-waiting" }, "show them") : null));
}

// The filters' choices: zones and images as the server knows them. One that went away (a
// zone deleted) falls back to "any", and the first page is read again.
function renderFilters() {
  const zones = state.zones.map((z) => [z.id, z.id]);
  const images = [...state.images.values()].sort((a, b) => a.name.localeCompare(b.name))
    .map((i) => [i.id, i.name]);
  const zoneGone = syncSelect($("filter-zone"), [["", "any"], ...zones]);
  const imageGone = syncSelect($("filter-image"), [["", "any"], ...images]);
  if (zoneGone || imageGone) firstPage();
}

function renderPager() {
  const number = state.pages.length || 1;
  const first = (number - 1) * Number($("page-size").value) + 1;
  const rows = state.page.length;
  $("page-info").textContent = rows
    ? `page ${number}: ${first}–${first + rows - 1}, ${state.page[0].id} to ${state.page[rows - 1].id}`
    : `page ${number}`;
  $("page-info").dataset.page = number;
  $("page-prev").disabled = number < 2;
  $("page-next").disabled = !state.next;
}

function renderMachines() {
  renderCounts();
  renderPager();
  const filtered = ["filter-zone", "filter-online", "filter-key", "filter-image"].some((s) => $(s).value);
  fillTable("machines-table", state.page.map((m) => el("tr", { "data-machine": m.id, "data-online": m.online },
    el("td", {}, m.id, m.hostname && m.hostname !== m.id ? el("small", {}, " " + m.hostname) : null),
    el("td", {}, el("span", { class: m.online ? "online" : "offline" }, m.online ? "online" : "offline")),
    runningCell(m.running),
    el("td", {}, m.zones.join(", ") || "–"),
    el("td", {}, m.images.length ? m.images.map(heldView) : "–"),
    el("td", { title: m.last_seen }, ago(Date.parse(m.last_seen))),
    el("td", {}, m.agent_version || "–"),
    keyCell(m))), 8, filtered ? "No machine matches these filters."
    : state.pages.length > 1 ? "No machine on this page." : "No machine has registered yet.");
}

// What a machine runs, by its agent's last startup: an image BootTorrent booted (with the
// deployment that booted it), or "–" for anything else (its installed system).
function runningCell(running) {
  if (!running) return el("td", { class: "running", title: "no image BootTorrent booted" }, "–");
  return el("td", { class: "running", "data-image": running.image },
    imageName(running.image), running.deployment ? el("small", {}, " " + running.deployment) : null);
}

// The key state with the fingerprint an operator compares with what the agent printed, and
// what can be done about it: approve the waiting key (named by its fingerprint, so a key
// swapped in since the page was drawn is not approved), or forget the machine.
function keyCell(m) {
  const waiting = m.pending_fingerprint;
  return el("td", { class: "key-" + m.key_state },
    m.key_state, " ",
    el("small", { class: "fingerprint" }, waiting || m.fingerprint || ""), " ",
    waiting ? el("button", { type: "button", "data-approve": m.id, "data-fingerprint": waiting }, "Approve") : null,
    el("button", { type: "button", "data-delete": m.id }, waiting && !m.fingerprint ? "Reject" : "Delete"));
}

// The first few ids of a long list, and how many more (`more` of them the server left out
// already): a zone of 300 machines is a number, not a wall of ids (the machines table,
// filtered on the zone, lists them a page at a time).
function someIds(ids, more) {
  if (!ids.length) return "–";
  const left = ids.length - ZONE_IDS_SHOWN + (more || 0);
  const shown = ids.slice(0, ZONE_IDS_SHOWN).join(", ");
  return left > 0 ? `${shown} … ${left} more` : shown;
}

function renderZones() {
  const counted = (state.fleet && state.fleet.zones) || {};
  fillTable("zones-table", state.zones.map((z) => {
    const c = counted[z.id] || { machines: z.members.length + (z.more_members || 0), online: null };
    return el("tr", { "data-zone": z.id, "data-members": c.machines },
      el("td", {}, z.id),
      el("td", {}, someIds(z.machines, z.more_machines)),
      el("td", {}, z.subnets.join(", ") || "–"),
      el("td", {}, z.images.map(imageName).join(", ") || "–"),
      el("td", { class: "members" }, el("strong", {}, String(c.machines)),
        c.online === null ? "" : ` (${c.online} online)`,
        z.members.length ? el("small", {}, " " + someIds(z.members, z.more_members)) : null),
      el("td", {}, z.source));
  }), 6, "No zones.");
}

// How many machines hold an image, by state, and run it: counted by the server.
function heldCounts(id) {
  const f = state.fleet || {};
  const held = Object.entries((f.images || {})[id] || {}).map(([s, n]) => `${n} ${s}`);
  const running = (f.running || {})[id];
  if (running) held.push(`${running} running it`);
  return held.join(", ") || "–";
}

function renderImages() {
  const images = [...state.images.values()].sort((a, b) => a.name.localeCompare(b.name));
  fillTable("images-table", images.map((i) => el("tr", { "data-image": i.id, "data-state": i.state },
    el("td", {}, i.name),
    el("td", { class: "mono", title: i.id }, i.id.slice(0, 12)),
    el("td", { title: i.error || "" }, el("span", { class: "state", "data-state": i.state }, i.state),
      i.error ? el("div", { class: "error-cell" }, i.error) : null),
    el("td", {}, bytes(i.size)),
    el("td", {}, i.state === "importing" ? bar(i.import_done, i.size) : "–"),
    el("td", { class: "held-counts" }, heldCounts(i.id)),
    el("td", {}, i.peers))), 7, "No images: `boottorrent image add FILE` adds one.");
}

// Replaces a <select>'s options only when they changed, keeping the operator's choice.
// Answers whether that choice is gone (the select then shows its first option).
function syncSelect(select, options, emptyText) {
  const key = JSON.stringify(options);
  if (select.dataset.key === key) return false;
  const keep = select.value;
  select.replaceChildren(...(options.length
    ? options.map(([value, text]) => el("option", { value }, text))
    : [el("option", { value: "" }, emptyText)]));
  const kept = options.some(([value]) => value === keep);
  if (kept) select.value = keep;
  select.dataset.key = key;
  return !kept && keep !== "";
}

function renderDeployForm() {
  const ready = [...state.images.values()].filter((i) => i.state === "ready");
  syncSelect($("deploy-image"), ready.map((i) => [i.id, `${i.name} (${bytes(i.size)})`]), "no ready image");
  const counted = (state.fleet && state.fleet.zones) || {};
  const zones = state.zones.map((z) => [z.id,
    `${z.id} (${(counted[z.id] || {}).machines || z.members.length + (z.more_members || 0)} machines)`]);
  syncSelect($("deploy-zone"), zones, "no zone");
}

function machineProgressRow(m) {
  const moving = m.state === "downloading";
  return el("tr", { "data-machine": m.id, "data-state": m.state },
    el("td", {}, m.id),
    el("td", {}, el("span", { class: "state", "data-state": m.state }, m.state)),
    runningCell(m.running),
    el("td", {}, bar(m.bytes_done, m.bytes_total)),
    el("td", {}, `${bytes(m.bytes_done)} / ${bytes(m.bytes_total)}`),
    el("td", {}, moving ? rate(m.download_bps) : "–"),
    el("td", {}, moving ? duration(remainingSecs([m])) : "–"),
    el("td", {}, m.peers),
    el("td", { class: "error-cell" }, m.error || ""));
}

// The order machine rows go in: what an operator must look at first (failed, stalled, then
// those still on their way, the least far first), the machines done last. The server orders
// the rows it cuts short (`?machines=N`) the same way.
const ROW_ORDER = ["failed", "stalled", "pending", "downloading", "verifying", "staged", "booting", "booted", "cancelled"];
function stragglersFirst(d) {
  const done = d.action === "stage" ? "staged" : "booted";
  const rank = (m) => (m.state === done ? ROW_ORDER.length - 1.5 : ROW_ORDER.indexOf(m.state));
  return [...(d.machines || [])].sort((a, b) => rank(a) - rank(b) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

// Seconds until the deployment is done. With every machine's row: when its slowest downloading
// machine is. With the rows cut short the slowest may not be among them: what is left over the
// whole swarm's rate instead (Infinity, shown as "–", while nothing moves).
function deploymentEta(d, total) {
  if ((d.machines || []).length >= total) return remainingSecs(d.machines);
  return d.download_bps > 0 ? (d.bytes_total - d.bytes_done) / d.download_bps : Infinity;
}

function deploymentView(d, open) {
  const counts = Object.entries(d.counts || {}).map(([s, n]) => `${n} ${s}`).join(", ");
  const total = Object.values(d.counts || {}).reduce((a, n) => a + n, 0);
  const rows = stragglersFirst(d).slice(0, DEPLOYMENT_ROWS);
  const more = total - rows.length;
  return el("details", { class: "deployment", "data-deployment": d.id, "data-state": d.state, open },
    el("summary", {},
      el("strong", {}, d.image_name || d.image), " → ", targetText(d.target), " ",
      el("span", { class: "action" }, d.action.replace("_", " ")), " ",
      el("span", { class: "state", "data-state": d.state }, d.state), " ",
      el("span", { class: "counts" }, counts), " ",
      bar(d.bytes_done, d.bytes_total), " ",
      el("span", { class: "rate", title: "download rate" }, rate(d.download_bps)), " ",
      el("span", { class: "eta", title: "time left" },
        d.state === "running" ? "ETA " + duration(deploymentEta(d, total)) : ""), " ",
      el("small", { class: "mono" }, d.id), " ",
      d.state === "running" ? el("button", { type: "button", "data-cancel": d.id }, "Cancel") : null),
    el("table", { class: "dep-machines" },
      el("thead", {}, el("tr", {}, ["machine", "state", "running", "progress", "bytes", "rate", "ETA", "peers", "error"]
        .map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map(machineProgressRow),
        more > 0 ? el("tr", { class: "more", "data-more": more }, el("td", { colspan: 9, class: "empty" },
          `${more} more machines (${DEPLOYMENT_ROWS} shown, those furthest behind first); `
          + `\`boottorrent deployments show ${d.id}\` lists every one.`)) : null)));
}

// Running and failed deployments start unfolded; a fold the operator chose is kept.
const defaultOpen = (d) => d.state === "running" || d.state === "failed";

function renderDeployment(d) {
  const old = $("deployment-list").querySelector(`[data-deployment="${d.id}"]`);
  if (old) old.replaceWith(deploymentView(d, old.open));
  else renderDeployments();
}

function renderDeployments() {
  const list = $("deployment-list");
  const open = new Map([...list.querySelectorAll("[data-deployment]")]
    .map((e) => [e.dataset.deployment, e.open]));
  const all = [...state.deployments.values()].sort((a, b) => b.created_ms - a.created_ms);
  const shown = all.filter((d, i) => i < SHOWN_DEPLOYMENTS || d.state === "running");
  if (!shown.length) return list.replaceChildren(el("p", { class: "empty" }, "No deployments yet."));
  // The server sends only the newest SHOWN_DEPLOYMENTS (and older running ones), so how many
  // older ones there are is not known here.
  const older = all.length >= SHOWN_DEPLOYMENTS;
  list.replaceChildren(
    ...shown.map((d) => deploymentView(d, open.has(d.id) ? open.get(d.id) : defaultOpen(d))),
    ...(older ? [el("p", { class: "empty" },
      "Older deployments are not shown: `boottorrent deployments list` lists them all.")] : []));
}

function renderAuth() {
  const t = token();
  $("token-form").hidden = !!t;
  $("token-state").hidden = !t;
  $("signin").hidden = !!t;
  $("main").hidden = !t;
  $("deploy-submit").disabled = !t;
}

function setConn(s) {
  $("conn").dataset.state = s;
  $("conn").textContent = { open: "live", connecting: "connecting…", closed: "signed out" }[s];
}

// ---- live events ----

// The stream is read with fetch, not EventSource: EventSource cannot send an Authorization
// header, and the alternative, the token in the URL, would leave it in proxy and server logs
// and in the browser's history. So this parses server-sent events itself (the server sends
// `event:` and `data:` lines, `:` comments as keep-alives, a blank line after each event) and
// reconnects by itself.
const handlers = {
  deployment: (d) => { if (mergeDeployment(d)) renderDeployment(d); },
  // A `deployment` event with the whole view follows every transition and replaces this; the
  // transition is applied first only so that the row changes without waiting for it.
  transition: (t) => {
    const d = state.deployments.get(t.deployment);
    // Absent from a list cut short: the `deployment` event that follows brings it.
    const m = d && d.machines.find((x) => x.id === t.machine);
    if (!m) return;
    d.counts[m.state] = (d.counts[m.state] || 1) - 1;
    if (!d.counts[m.state]) delete d.counts[m.state];
    d.counts[t.state] = (d.counts[t.state] || 0) + 1;
    Object.assign(m, { state: t.state, error: t.error });
    m.transitions.push({ state: t.state, at_ms: t.at_ms });
    renderDeployment(d);
  },
  // Only the page shown changes at once; the counts and a machine new to the page come with
  // the next poll (a room switched on is hundreds of these events in a few seconds).
  machine: (m) => {
    const shown = state.page.find((x) => x.id === m.id);
    if (!shown) return;
    shown.online = m.online;
    renderMachines();
  },
  // This watcher fell behind and missed events: start again from the lists.
  lagged: () => refreshLists(true),
};

function dispatch(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length || !handlers[type]) return;
  try { handlers[type](JSON.parse(data.join("\n"))); } catch (err) { console.error(`bad ${type} event`, err, data); }
}

const streamOpen = () => !!(stream && stream.open);

async function connect() {
  if (!token() || stream) return;
  const mine = { abort: new AbortController(), open: false };
  stream = mine;
  setConn("connecting");
  try {
    // Deployments in the events cut short as in the list: a few rows, not a campus a second.
    const response = await fetch("/api/v1/events?machines=" + DEPLOYMENT_ROWS, {
      headers: { Authorization: "Bearer " + token(), Accept: "text/event-stream" },
      cache: "no-store", signal: mine.abort.signal,
    });
    if (!response.ok) throw await refusal("GET", "/api/v1/events", response);
    mine.open = true;
    setConn("open");
    refreshLists(true);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  } catch (e) {
    if (mine.abort.signal.aborted) return; // signed out: nothing to retry
    if (token()) showError(`Live updates interrupted: ${e.message}`, "stream");
  }
  if (stream !== mine) return;
  stream = null;
  setConn(token() ? "connecting" : "closed");
  // The server restarted or the network blipped: try again after a pause.
  if (token()) setTimeout(connect, POLL_MS);
}

function signIn(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
  clearError();
  renderAuth();
  state.pages = [firstPagePath()];
  refreshLists(true);
  connect();
  // Polling covers what has no event (held images, import progress, last seen); deployments
  // too while the event stream is down.
  if (!poller) poller = setInterval(() => refreshLists(!streamOpen()), POLL_MS);
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  if (stream) { stream.abort.abort(); stream = null; }
  if (poller) { clearInterval(poller); poller = null; }
  // Nothing read with the old token stays on the page.
  state.page = [];
  state.pages = [];
  state.next = null;
  state.fleet = null;
  state.images = new Map();
  state.zones = [];
  state.deployments = new Map();
  renderAll();
  setConn("closed");
  renderAuth();
}

// ---- actions ----

async function deploy(ev) {
  ev.preventDefault();
  clearError();
  const form = $("deploy-form");
  const kind = form.elements["target-kind"].value;
  let target = { global: true };
  if (kind === "zone") {
    if (!$("deploy-zone").value) return showError("There is no zone to deploy to.");
    target = { zone: $("deploy-zone").value };
  } else if (kind === "machines") {
    // Ids as typed, split at commas and spaces. An empty or wrong list goes to the API too,
    // which says what is wrong with it (an unknown id is named in its 404).
    target = { machines: $("deploy-machines").value.split(/[\s,]+/).filter(Boolean) };
  }
  if (!$("deploy-image").value) return showError("There is no ready image to deploy.");
  $("deploy-submit").disabled = true;
  try {
    const d = await api("POST", "/api/v1/deployments",
      { image: $("deploy-image").value, target, action: $("deploy-action").value });
    mergeDeployment(d);
    renderDeployments();
    form.dataset.lastDeployment = d.id;
    notice(`Deployment ${d.id} started: ${d.image_name} to ${targetText(d.target)}.`);
  } catch (e) {
    showError(e.message);
  } finally {
    renderAuth();
  }
}

async function approve(id, fingerprint) {
  if (!confirm(`Approve machine ${id} with key ${fingerprint}? Compare it with the key the agent logged at start.`)) return;
  clearError();
  try {
    await api("POST", "/api/v1/machines/" + encodeURIComponent(id) + "/approve", { fingerprint });
    notice(`Machine ${id} approved (key ${fingerprint}).`);
    await refreshLists(false);
  } catch (e) {
    showError(e.message);
  }
}

async function forget(id) {
  if (!confirm(`Delete machine ${id}? Its key and tracker passkey stop working; the id may enrol again (a reinstalled machine).`)) return;
  clearError();
  try {
    await api("DELETE", "/api/v1/machines/" + encodeURIComponent(id));
    notice(`Machine ${id} deleted.`);
    await refreshLists(false);
  } catch (e) {
    showError(e.message);
  }
}

async function cancel(id) {
  if (!confirm(`Cancel deployment ${id}? The agents stop and delete what they fetched for it.`)) return;
  clearError();
  try {
    const d = await api("DELETE", "/api/v1/deployments/" + encodeURIComponent(id));
    if (mergeDeployment(d)) renderDeployment(d);
    notice(`Deployment ${id} cancelled.`);
  } catch (e) {
    showError(e.message);
  }
}

function init() {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token-input").value.trim();
    $("token-input").value = "";
    signIn(value);
  });
  $("token-clear").addEventListener("click", () => { clearError(); signOut(); });
  $("error-close").addEventListener("click", () => clearError());
  $("deploy-form").addEventListener("submit", deploy);
  // Choosing a zone or typing machine ids picks that kind of target.
  const pick = (kind) => () => { $("deploy-form").elements["target-kind"].value = kind; };
  $("deploy-zone").addEventListener("change", pick("zone"));
  $("deploy-machines").addEventListener("input", pick("machines"));
  for (const id of ["filter-zone", "filter-online", "filter-key", "filter-image", "page-size"]) {
    $(id).addEventListener("change", firstPage);
  }
  $("page-next").addEventListener("click", nextPage);
  // The keys waiting for approval, from the counts: the filter that lists those machines.
  $("fleet-counts").addEventListener("click", (ev) => {
    if (!ev.target.closest("#show-waiting")) return;
    $("filter-key").value = (state.fleet.key_states || {}).pending ? "pending" : "key_changed";
    firstPage();
  });
  $("page-prev").addEventListener("click", previousPage);
  $("deployment-list").addEventListener("click", (ev) => {
    const button = ev.target.closest("[data-cancel]");
    if (!button) return;
    ev.preventDefault(); // the button sits in a <summary>: do not fold the deployment too
    cancel(button.dataset.cancel);
  });
  $("machines-table").addEventListener("click", (ev) => {
    const approving = ev.target.closest("[data-approve]");
    if (approving) approve(approving.dataset.approve, approving.dataset.fingerprint);
    const deleting = ev.target.closest("[data-delete]");
    if (deleting) forget(deleting.dataset.delete);
  });
  if (token()) signIn(token());
  else { setConn("closed"); renderAuth(); }
}

init();

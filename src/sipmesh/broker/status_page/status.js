// The status page: fetch api/status every few seconds and draw it. Everything shown came
// from the network (AORs, contacts, user agents): it goes into the page as text only.
"use strict";

const REFRESH_MS = 3000;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function duration(seconds) {
  if (seconds < 90) return `${seconds} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function drawSummary(broker) {
  const domains = broker.domains.length ? broker.domains.join(", ") : "(its own addresses)";
  const workers = `${broker.workers_serving} of ${broker.workers} workers serving`;
  document.getElementById("summary").textContent =
    `${broker.mode} mode · domains ${domains} · ${broker.listeners.join(", ")} · ${workers} · ` +
    `version ${broker.version}`;
}

function drawRegistrations(registrations) {
  const body = document.querySelector("#registrations tbody");
  const rows = registrations.shown.map((r) => {
    const row = el("tr");
    row.dataset.aor = r.aor;
    row.append(el("td", r.aor, "aor"), el("td", r.contact, "contact"));
    const source = el("td", r.source || "", "source");
    if (r.nat) source.append(el("span", "NAT", "nat"));
    row.append(source, el("td", duration(r.expires_in)), el("td", r.user_agent || ""));
    return row;
  });
  body.replaceChildren(...rows);
  document.getElementById("registrations-count").textContent = `(${registrations.total})`;
  document.getElementById("registrations").hidden = rows.length === 0;
  document.getElementById("registrations-empty").hidden = rows.length !== 0;
  const more = document.getElementById("registrations-more");
  more.hidden = registrations.total <= rows.length;
  more.textContent = `… and ${registrations.total - rows.length} more (see api/status?limit=N)`;
}

function table(headings, rows, className) {
  const node = el("table", null, className);
  const head = el("tr");
  head.append(...headings.map((h) => el("th", h)));
  node.append(el("thead"), el("tbody"));
  node.tHead.append(head);
  node.tBodies[0].append(...rows);
  return node;
}

function drawMembers(network) {
  const rows = network.members.map((m) => {
    const row = el("tr");
    row.dataset.member = m.name;
    row.dataset.online = m.online;
    const state = el("td");
    state.append(el("span", m.online ? "online" : "offline", m.online ? "online" : "offline"));
    row.append(el("td", m.name, "aor"), el("td", m.address, "contact"), state,
               el("td", m.contact || "", "contact"));
    return row;
  });
  return table(["Member", "Mesh address", "Status", "Contact"], rows, "members");
}

function drawPairs(network, columns) {
  // The cells come from the broker in the words of `sipmesh status` (ops/paths.py).
  const rows = network.pairs.map((p) => {
    const row = el("tr");
    row.dataset.member = p.member;
    row.dataset.peer = p.peer;
    row.dataset.path = p.path;
    row.append(...p.cells.map((cell, i) => el("td", cell, i === 3 ? `path ${p.path.split(" ")[0]}` : "")),
               el("td", `${duration(p.age)} ago`, "age"));
    return row;
  });
  return table([...columns, "REPORTED"], rows, "pairs");
}

function drawNetworks(networks, columns) {
  const box = document.getElementById("networks");
  box.replaceChildren(...networks.map((n) => {
    const node = el("div", null, "network");
    node.dataset.network = n.name;
    const online = n.members.filter((m) => m.online).length;
    const title = el("h3", n.name);
    title.append(el("span", ` pool ${n.pool} · ${online} of ${n.members.length} members online`,
                    "count"));
    node.append(title, drawMembers(n));
    if (n.pairs.length) node.append(el("h4", "Pairs, as their members report them"), drawPairs(n, columns));
    else node.append(el("p", "No pairs reported yet.", "empty"));
    return node;
  }));
  document.getElementById("networks-count").textContent = networks.length ? `(${networks.length})` : "";
  document.getElementById("networks-empty").hidden = networks.length !== 0;
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const response = await fetch("api/status", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const status = await response.json();
    drawSummary(status.broker);
    drawRegistrations(status.registrations);
    drawNetworks(status.networks, status.pair_columns);
    document.getElementById("updated").textContent =
      `Updated ${new Date(status.broker.now * 1000).toLocaleTimeString()}`;
    error.hidden = true;
  } catch (err) {
    error.textContent = `cannot reach the broker: ${err.message}`;
    error.hidden = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);

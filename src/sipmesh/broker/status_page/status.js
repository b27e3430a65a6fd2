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

function drawNetworks(networks) {
  const box = document.getElementById("networks");
  box.replaceChildren(...networks.map((n) => el("div", n.name, "network")));
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
    drawNetworks(status.networks);
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

// The Shoal fleet dashboard: polls the local `shoal ui` server (never an agent directly)
// and renders hosts, groups and deployments; changes are POSTs with the page's token.
"use strict";

const TOKEN = document.querySelector('meta[name="shoal-token"]').content;
const PAGE = 100; // rows per page: a fleet of thousands stays quick to render
const state = { hosts: [], groups: [], deployments: [], open: null, view: null, pages: { hosts: 0, deployments: 0, groups: 0, openHosts: 0 } };
const path = (id) => encodeURIComponent(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c ?? "")));
  return e;
}

const short = (rev) => (rev ? rev.slice(0, 12) : "none");

async function get(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

async function post(path) {
  const r = await fetch(path, { method: "POST", headers: { "X-Shoal-Token": TOKEN } });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

function showError(e) {
  document.getElementById("error").textContent = e ? String(e.message || e) : "";
}

function pager(id, total, key, render) {
  const nav = document.getElementById(id);
  const pages = Math.max(1, Math.ceil(total / PAGE));
  state.pages[key] = Math.min(state.pages[key], pages - 1);
  nav.replaceChildren();
  if (pages <= 1) return;
  for (let p = 0; p < pages; p++) {
    const b = el("button", { onclick: () => { state.pages[key] = p; render(); } }, p + 1);
    if (p === state.pages[key]) b.disabled = true;
    nav.append(b);
  }
}

function renderHosts() {
  const filter = document.getElementById("host-filter").value.trim().toLowerCase();
  const rows = state.hosts.filter((h) => !filter || JSON.stringify([h.name, h.state, h.tags]).toLowerCase().includes(filter));
  pager("hosts-pager", rows.length, "hosts", renderHosts);
  const start = state.pages.hosts * PAGE;
  document.getElementById("hosts").replaceChildren(...rows.slice(start, start + PAGE).map((h) =>
    el("tr", { "data-host": h.name },
      el("td", {}, h.name),
      el("td", { class: `status ${h.state}` }, h.state),
      el("td", {}, h.addr),
      el("td", {}, ...Object.entries(h.tags || {}).map(([k, v]) => el("span", { class: "tag" }, `${k}=${v}`))),
      el("td", {}, ...Object.entries(h.apps || {}).map(([app, rev]) => {
        const d = (h.details || {})[app] || {};
        return el("div", {}, `${app} ${short(rev)} `, el("span", { class: d.health === "stopped" ? "Stopped-svc" : "" }, d.health || ""));
      })))));
}

function renderGroups() {
  pager("groups-pager", state.groups.length, "groups", renderGroups);
  const start = state.pages.groups * PAGE;
  document.getElementById("groups").replaceChildren(...state.groups.slice(start, start + PAGE).map((g) =>
    el("tr", { "data-group": g.name },
      el("td", {}, g.name), el("td", {}, g.app), el("td", {}, g.targets), el("td", {}, g.config),
      el("td", {}, short(g.last_successful)), el("td", {}, g.deployments),
      el("td", {}, el("button", {
        class: "danger",
        onclick: () => act(`Roll group ${g.name} back (it undoes its last deployment)?`, `/api/groups/${path(g.name)}/roll-back`),
      }, "Roll back")))));
}

const active = (s) => ["Created", "InProgress", "Baking"].includes(s);

function renderDeployments() {
  const rows = state.deployments;
  pager("deployments-pager", rows.length, "deployments", renderDeployments);
  const start = state.pages.deployments * PAGE;
  document.getElementById("deployments").replaceChildren(...rows.slice(start, start + PAGE).map((d) =>
    el("tr", { class: "clickable", "data-deployment": d.id, onclick: () => open(d.id) },
      el("td", {}, el("code", {}, d.id)),
      el("td", { class: `status ${d.status}` }, d.status),
      el("td", {}, d.app), el("td", {}, d.group), el("td", {}, short(d.revision)),
      el("td", {}, `${d.succeeded}/${d.hosts} succeeded, ${d.failed} failed`),
      el("td", {}, d.catch_up_of ? "catch-up" : ""))));
}

function renderOpen(v) {
  state.view = v;
  const box = document.getElementById("deployment");
  if (!v) { box.hidden = true; return; }
  box.hidden = false;
  document.getElementById("d-id").textContent = v.id;
  const head = document.getElementById("d-head");
  head.replaceChildren(
    el("span", { class: `status ${v.status}`, id: "d-status" }, v.status),
    ` ${v.app} revision ${short(v.revision)}, ${v.config}, ${v.rollout}; coordinator ${v.coordinator || "unknown"}`,
    v.reason ? ` — ${v.reason}` : "",
    v.rollback ? ` — rolled back by ${v.rollback.id} (${v.rollback.status})` : "",
    v.warning ? ` — warning: ${v.warning}` : "");
  const actions = document.getElementById("d-actions");
  actions.replaceChildren();
  if (active(v.status)) {
    actions.append(
      el("button", { id: "d-stop", class: "danger", onclick: () => act(`Stop deployment ${v.id}?`, `/api/deployments/${path(v.id)}/stop`) }, "Stop"),
      " ",
      el("button", { id: "d-stop-rollback", class: "danger", onclick: () => act(`Stop deployment ${v.id} and roll it back?`, `/api/deployments/${path(v.id)}/stop-and-roll-back`) }, "Stop and roll back"));
  }
  pager("d-hosts-pager", v.hosts.length, "openHosts", () => renderOpen(state.view));
  const start = state.pages.openHosts * PAGE;
  document.getElementById("d-hosts").replaceChildren(...v.hosts.slice(start, start + PAGE).map((h) =>
    el("tr", {},
      el("td", {}, h.name),
      el("td", { class: `status ${h.status}` }, h.status, h.reason ? `: ${h.reason}` : ""),
      el("td", {}, h.batch ?? ""),
      el("td", {}, (h.events || []).map((e) => `${e.name} ${e.status}`).join(", ")),
      el("td", { class: "tail" }, (h.log_tail || []).join("\n")))));
}

async function open(id) {
  if (state.open !== id) state.pages.openHosts = 0;
  state.open = id;
  try { renderOpen(await get(`/api/deployments/${path(id)}`)); showError(null); } catch (e) { showError(e); }
}

async function act(question, path) {
  if (!window.confirm(question)) return;
  try { const v = await post(path); showError(null); if (v && v.id) await open(v.id); await refresh(); } catch (e) { showError(e); }
}

async function refresh() {
  try {
    const [hosts, groups, deployments] = await Promise.all([get("/api/hosts"), get("/api/groups"), get("/api/deployments")]);
    Object.assign(state, { hosts, groups, deployments });
    const alive = hosts.filter((h) => h.state === "alive").length;
    const running = deployments.filter((d) => active(d.status)).length;
    document.getElementById("summary").textContent = `${alive} of ${hosts.length} hosts alive · ${groups.length} groups · ${running} deployments running`;
    renderHosts(); renderGroups(); renderDeployments();
    if (state.open) renderOpen(await get(`/api/deployments/${path(state.open)}`));
    showError(null);
  } catch (e) { showError(e); }
}

document.getElementById("host-filter").addEventListener("input", () => { state.pages.hosts = 0; renderHosts(); });
document.getElementById("d-close").addEventListener("click", () => { state.open = null; renderOpen(null); });
// One poll at a time: the next starts a second after the last one ended, so a slow agent
// is never asked twice at once.
async function poll() { await refresh(); setTimeout(poll, 1000); }
poll();

// The portal's only script: "Refresh Data" without a reload, and live status texts
// and history rows from GET /dashboard/events. The page works without it too.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? "";
const DAY = 86400000;

function expiresIn(expiresAt) {
  const left = Date.parse(expiresAt) - Date.now();
  if (!(left > 0)) return "Expired";
  const days = Math.ceil(left / DAY);
  return days === 1 ? "Expires in 1 day" : `Expires in ${days} days`;
}

function row(consentId) {
  return document.getElementById(`consent-${consentId}`);
}

function setStatus(item, text, busy) {
  const status = item.querySelector(".status");
  status.textContent = text;
  status.classList.toggle("busy", busy);
  status.classList.toggle("ok", !busy && item.dataset.status === "ACTIVE");
}

function restStatus(item) {
  const texts = { EXPIRED: "Expired", REVOKED: "Revoked", INACTIVE: "Inactive" };
  return texts[item.dataset.status] ?? expiresIn(item.dataset.expiresAt);
}

function dateText(iso) {
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
    `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())} UTC`;
}

function historyRow(item, record) {
  const body = item.querySelector(".history tbody");
  let tr = body.querySelector(`tr[data-refresh-id="${record.refreshId}"]`);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.refreshId = record.refreshId;
    for (const cls of ["hdate", "hby", "hstatus", "herror"]) {
      const td = document.createElement("td");
      td.className = cls;
      tr.appendChild(td);
    }
    body.prepend(tr);
  }
  const cells = tr.children;
  cells[0].textContent = dateText(record.dateRequested);
  cells[1].textContent = record.requestedBy;
  cells[2].textContent = record.status;
  cells[3].textContent = record.error ? record.error.message : "";
}

function onRefreshEvent(event) {
  const cloud = JSON.parse(event.data);
  const record = cloud.data;
  const item = row(cloud.subject);
  if (!item || !record) return;
  historyRow(item, record);
  if (record.status === "INITIALIZED") {
    setStatus(item, "Refreshing consent…", true);
  } else {
    setStatus(item, restStatus(item), false);
  }
}

function onConsentEvent(event) {
  const cloud = JSON.parse(event.data);
  const item = row(cloud.subject);
  if (!item || !cloud.data) return;
  item.dataset.status = cloud.data.status;
  item.querySelector("button.refresh").disabled = cloud.data.status !== "ACTIVE";
  setStatus(item, restStatus(item), false);
}

async function requestRefresh(button) {
  const item = row(button.dataset.consent);
  const answer = item.querySelector(".answer");
  button.disabled = true;
  answer.textContent = "Requesting…";
  answer.classList.remove("error");
  try {
    const response = await fetch(`/dashboard/consents/${button.dataset.consent}/refresh`, {
      method: "POST",
      headers: { "X-CSRF-Token": csrf, Accept: "application/json" },
      credentials: "same-origin",
    });
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      answer.textContent = body.message ?? "Refresh requested";
      if (body.quotaText) item.querySelector(".quota").textContent = body.quotaText;
      if (body.record) {
        historyRow(item, body.record);
        if (body.record.status === "INITIALIZED") setStatus(item, "Refreshing consent…", true);
      }
    } else {
      answer.textContent = body.detail ?? `The request failed (${response.status})`;
      answer.classList.add("error");
    }
  } catch {
    answer.textContent = "The portal cannot be reached; try again.";
    answer.classList.add("error");
  } finally {
    button.disabled = item.dataset.status !== "ACTIVE";
  }
}

function follow() {
  const state = document.getElementById("live-state");
  const tenant = new URLSearchParams(location.search).get("tenant");
  const url = tenant ? `/dashboard/events?tenant=${encodeURIComponent(tenant)}` : "/dashboard/events";
  const source = new EventSource(url);
  source.addEventListener("open", () => { state.textContent = "Live"; state.classList.add("on"); });
  source.addEventListener("error", () => { state.textContent = "Reconnecting…"; state.classList.remove("on"); });
  for (const status of ["initialized", "updated", "error"]) {
    source.addEventListener(`io.refreshd.refresh.${status}`, onRefreshEvent);
  }
  for (const status of ["revoked", "expired", "inactivated"]) {
    source.addEventListener(`io.refreshd.consent.${status}`, onConsentEvent);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button.refresh")) {
    button.addEventListener("click", () => requestRefresh(button));
  }
  if (document.getElementById("live-state")) follow();
});

// distill dashboard: live parts of a page, without reloading it. An element with data-refresh="URL" is
// replaced by that URL's HTML every data-every ms (default 2000) until the fragment carries data-final;
// the cron field of the schedule form shows the next runs as you type. No framework, no CDN.
"use strict";

function refresh(element) {
  const url = element.dataset.refresh;
  const every = Number(element.dataset.every || 2000);
  let last = null;
  async function tick() {
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } });
      if (response.redirected && new URL(response.url).pathname === "/ui/login") {
        window.location.assign(response.url); // signed out meanwhile
        return;
      }
      if (response.ok) {
        const html = await response.text();
        if (html !== last) { // unchanged HTML is left alone: images and focus stay put
          element.innerHTML = html;
          last = html;
        }
        if (element.querySelector("[data-final]")) {
          element.dataset.final = "";
          return;
        }
      }
    } catch (error) {
      // the server is restarting or the network dropped: try again next time
    }
    window.setTimeout(tick, every);
  }
  if (!element.hasAttribute("data-final")) window.setTimeout(tick, every);
}

function preview(box) {
  const cron = document.getElementById("s-cron");
  const zone = document.getElementById("s-timezone");
  let timer = null;
  async function show() {
    if (!cron.value.trim()) { box.innerHTML = ""; return; }
    const query = new URLSearchParams({ cron: cron.value, timezone: zone.value || "UTC" });
    const response = await fetch(`${box.dataset.preview}?${query}`, { credentials: "same-origin" });
    if (response.ok) box.innerHTML = await response.text();
  }
  function later() { window.clearTimeout(timer); timer = window.setTimeout(show, 300); }
  cron.addEventListener("input", later);
  zone.addEventListener("input", later);
  show();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(refresh);
  document.querySelectorAll("[data-preview]").forEach(preview);
});

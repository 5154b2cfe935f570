// wechat-outbox dashboard: refreshes the figures of a live page (body[data-live]) every few
// seconds by fetching the page again and swapping its <main>. The fetched page is parsed as
// an inert document (its scripts never run) and its content is the server's escaped HTML.
"use strict";
(function () {
  const every = Number(document.body.dataset.live || 0);
  if (!every) return;
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) return;
    // Not while the operator is typing in a form of the page.
    const focused = document.activeElement;
    if (focused && focused.closest && focused.closest("main form")) return;
    busy = true;
    try {
      const answer = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
      if (!answer.ok) return;
      const page = new DOMParser().parseFromString(await answer.text(), "text/html");
      const fresh = page.querySelector("main");
      const main = document.querySelector("main");
      if (fresh && main) {
        main.replaceWith(document.importNode(fresh, true));
        document.body.dataset.refreshed = String(Date.now());
      }
    } catch (e) {
      // The daemon restarting: try again next time.
    } finally {
      busy = false;
    }
  }
  setInterval(refresh, every * 1000);
})();

// wechat-outbox dashboard: refreshes the figures of a live page (body[data-live]) every few
// seconds by reading the page again and swapping its <main>. The page read is parsed as an
// inert document (its scripts never run) and its content is the server's escaped HTML.
//
// XMLHttpRequest rather than fetch: fetch refuses a URL with credentials in it, and a page
// opened as http://user:password@host/ resolves every relative URL to one.
"use strict";
(function () {
  const every = Number(document.body.dataset.live || 0);
  if (!every) return;
  let busy = false;
  function refresh() {
    if (busy || document.hidden) return;
    // Not while the operator is in a form of the page.
    const focused = document.activeElement;
    if (focused && focused.closest && focused.closest("main form")) return;
    busy = true;
    const request = new XMLHttpRequest();
    request.open("GET", location.pathname + location.search);
    request.responseType = "document";
    request.setRequestHeader("Cache-Control", "no-store");
    request.onloadend = function () {
      busy = false;
      const page = request.status === 200 ? request.response : null;
      const fresh = page && page.querySelector("main");
      const main = document.querySelector("main");
      if (fresh && main) {
        main.replaceWith(document.importNode(fresh, true));
        document.body.dataset.refreshed = String(Date.now());
      }
    };
    request.send();
  }
  setInterval(refresh, every * 1000);
})();

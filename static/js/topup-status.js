// The card top-up's return page: fetch the top-up's state every 2 seconds and show it in
// place, until it is final (paid or expired). The page works without this: it shows the
// state it was rendered with, and a reload shows the next.
(function () {
  "use strict";
  var box = document.getElementById("topup-state");
  var url = box && box.getAttribute("data-poll-url");
  if (!url) {
    return;
  }
  var INTERVAL_MS = 2000;
  var MAX_TRIES = 300; // ten minutes; the webhook normally arrives within seconds
  var tries = 0;

  function poll() {
    if (box.querySelector("[data-final]")) {
      return;
    }
    tries += 1;
    if (tries > MAX_TRIES) {
      document.getElementById("topup-gave-up").hidden = false;
      return;
    }
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        // Swap only a final state in: the waiting text never changes, and a live region
        // rewritten with the same words would be read out again every two seconds.
        if (html !== null && html.indexOf("data-final") !== -1) {
          box.innerHTML = html;
        }
      })
      .catch(function () {
        // A network blip: the next try may succeed.
      })
      .then(function () {
        window.setTimeout(poll, INTERVAL_MS);
      });
  }

  window.setTimeout(poll, INTERVAL_MS);
})();

// Live updates: the server-sent events stream (/events) names the orders that
// changed; the page then fetches its own fragment again (server-rendered HTML)
// and swaps it in. No reload, and never while the operator is typing a reason.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.EventSource || !window.fetch) { return; }
  var fragment = live.getAttribute("data-live-url");
  var orderId = live.getAttribute("data-order-id");
  var wanted = false, busy = false, connected = false;

  function editing() {
    var el = document.activeElement;
    if (el && live.contains(el) && (el.tagName === "INPUT" || el.tagName === "SELECT")) { return true; }
    var inputs = live.querySelectorAll("input[name=reason]");
    for (var i = 0; i < inputs.length; i++) { if (inputs[i].value) { return true; } }
    return false;
  }

  function badge() {
    var b = document.getElementById("live-badge");
    if (b) { b.hidden = !connected; }
  }

  function refresh() {
    if (busy) { return; }
    if (editing()) { window.setTimeout(refresh, 1000); return; }
    wanted = false; busy = true;
    window.fetch(fragment, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html !== null && !editing()) { live.innerHTML = html; live.setAttribute("data-refreshed", String(Date.now())); }
      })
      .catch(function () { /* the service or console is down: keep what is shown */ })
      .then(function () { busy = false; badge(); if (wanted) { refresh(); } });
  }

  function connect() {
    var source = new EventSource(live.getAttribute("data-events-url"));
    // on (re)connecting, fetch once: whatever changed since the page was rendered
    source.addEventListener("hello", function () { connected = true; badge(); refresh(); });
    source.addEventListener("changes", function (e) {
      var data = {};
      try { data = JSON.parse(e.data); } catch (err) { return; }
      if (orderId && !data.many && (data.order_ids || []).indexOf(orderId) < 0) { return; }
      wanted = true;
      refresh();
    });
    source.onerror = function () {
      connected = false; badge();
      // the browser retries a dropped stream itself; a refused one (503: too many
      // live pages) is closed for good, so try again later
      if (source.readyState === 2) { window.setTimeout(connect, 10000); }
    };
  }
  connect();
})();

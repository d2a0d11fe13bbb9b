// pgflow console: the only script besides htmx (no inline script: the CSP forbids it).
// Forms with data-confirm ask before they POST (pause, resume, cancel, retry, replay).
"use strict";
document.addEventListener("submit", function (event) {
  var form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
  var reason = form.querySelector("input[name=reason]");
  var text = form.dataset.confirm;
  if (reason && reason.value) text += "\nReason: " + reason.value;
  if (!window.confirm(text)) event.preventDefault();
}, true);

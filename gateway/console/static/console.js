// The console's only script: the quarantine's accept and discard buttons.
// It posts JSON with the session's CSRF token (X-CSRF-Token) to the button's formaction and
// reloads the list. It writes text only (textContent), never markup.
"use strict";

(function () {
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.getAttribute("content") : "";

  async function review(form, button) {
    const note = form.querySelector('input[name="note"]');
    const result = form.querySelector("output");
    const body = note && note.value ? { note: note.value } : {};
    for (const other of form.querySelectorAll("button")) other.disabled = true;
    let answer = {};
    let response = null;
    try {
      response = await fetch(button.formAction, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body),
      });
      answer = await response.json();
    } catch (error) {
      answer = { error: String(error) };
    }
    if (response && response.ok) {
      window.location.reload();
      return;
    }
    const status = response ? response.status : "no answer";
    result.textContent = `${status}: ${answer.reason_id || answer.error || "refused"}`;
    for (const other of form.querySelectorAll("button")) other.disabled = false;
  }

  for (const form of document.querySelectorAll("form[data-review]")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const button = event.submitter || form.querySelector("button");
      review(form, button);
    });
  }
})();

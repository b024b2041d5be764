// autocollect's console: plain JS, no build step, no third-party code.
// Credentials live in this tab's sessionStorage only (gone when the tab
// closes, or on "Sign out"); every request sends them as HTTP Basic.
"use strict";

const $ = (id) => document.getElementById(id);
let auth = sessionStorage.getItem("autocollect.auth");
let role = null;
let task = null;
let stream = null; // AbortController of the event stream

function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Basic " + auth }, options.headers || {});
  // credentials: "omit": no cookie or browser-cached login is ever sent,
  // and a 401 never opens the browser's own sign-in dialog.
  return fetch(path, Object.assign({}, options, { headers, cache: "no-store", credentials: "omit" }));
}

async function signIn(user, password) {
  auth = btoa(unescape(encodeURIComponent(user + ":" + password)));
  const r = await api("/whoami");
  if (!r.ok) {
    auth = null;
    let message = "Sign-in failed (" + r.status + ")";
    try { message = Object.values((await r.json()).errors || {})[0] || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const me = await r.json();
  sessionStorage.setItem("autocollect.auth", auth);
  return me;
}

function signOut() {
  sessionStorage.removeItem("autocollect.auth");
  if (stream) stream.abort();
  location.reload();
}

async function enter(me) {
  role = (me.roles || []).some((r) => r.role === "admin") ? "admin" : "reader";
  $("who").textContent = "Signed in as " + me.id + (role === "admin" ? " (admin)" : " (read-only)");
  $("signin-view").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  $("readonly-note").hidden = role === "admin";
  $("start-button").disabled = role !== "admin";
  loadNodes();
  follow();
}

async function loadNodes() {
  const list = $("nodes");
  list.textContent = "Checking nodes…";
  const r = await api("/pools/default");
  if (!r.ok) { list.textContent = "Cannot list nodes (" + r.status + ")"; return; }
  const pool = await r.json();
  list.textContent = "";
  for (const n of pool.nodes) {
    const name = n.otpNode.split("@")[0];
    const li = document.createElement("li");
    const id = "node-" + name;
    li.innerHTML = '<input type="checkbox" class="node-pick"><label class="inline"></label><span class="reach"></span>';
    const box = li.querySelector("input");
    box.id = id;
    box.value = name;
    const label = li.querySelector("label");
    label.htmlFor = id;
    label.textContent = name + (n.thisNode ? " (this node)" : "");
    const reach = li.querySelector(".reach");
    reach.textContent = n.status === "healthy" ? "reachable" : "unreachable";
    reach.className = "reach " + n.status;
    list.appendChild(li);
  }
  syncNodes();
}

function syncNodes() {
  const some = $("from-some").checked;
  document.querySelectorAll(".node-pick").forEach((b) => { b.disabled = !some; });
}

function syncUpload() {
  const on = $("upload").checked;
  $("upload-fields").hidden = !on;
}

function clearErrors() {
  document.querySelectorAll(".error[id^=err-]").forEach((e) => { e.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
}

function showErrors(errors) {
  for (const [field, message] of Object.entries(errors)) {
    const key = field === "upload_host" ? "uploadHost" : field === "from" ? "nodes" : field;
    const slot = $("err-" + key) || $("err-_");
    slot.textContent = slot.textContent ? slot.textContent + " " + message : message;
    const input = $(key);
    if (input) input.setAttribute("aria-invalid", "true");
  }
  const first = document.querySelector("[aria-invalid=true]");
  if (first) first.focus();
}

async function start(event) {
  event.preventDefault();
  clearErrors();
  const form = new URLSearchParams();
  if ($("from-all").checked) {
    form.set("from", "allnodes");
  } else {
    const picked = [...document.querySelectorAll(".node-pick:checked")].map((b) => b.value);
    form.set("nodes", picked.join(","));
  }
  if ($("upload").checked) {
    form.set("upload", "true");
    for (const f of ["uploadHost", "customer", "ticket", "uploadProxy"]) {
      if ($(f).value.trim()) form.set(f, $(f).value.trim());
    }
    if ($("bypassReachabilityChecks").checked) form.set("bypassReachabilityChecks", "true");
  }
  for (const f of ["logRedactionLevel", "logRedactionSalt", "since", "until", "taskRegexp", "tmpDir", "logDir", "encryptionPassword"]) {
    if ($(f).value.trim()) form.set(f, $(f).value.trim());
  }
  $("start-button").disabled = true;
  try {
    const r = await api("/collectLogs/start", { method: "POST", body: form });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      showErrors(body.errors || body || { _: "Start refused (" + r.status + ")" });
    } else if (!task || task.taskId !== body.taskId || task.version < body.version) {
      // The event stream may already have brought later changes of this
      // task: an older copy never replaces them.
      render(body);
    }
  } catch (e) {
    showErrors({ _: "Cannot reach the node: " + e.message });
  } finally {
    syncButtons();
  }
}

async function cancel() {
  $("cancel-button").disabled = true;
  const r = await api("/collectLogs/cancel", { method: "POST" });
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    showErrors(body.errors || { _: "Cancel refused (" + r.status + ")" });
  }
}

function syncButtons() {
  const running = task && task.status === "running";
  $("start-button").disabled = role !== "admin" || running;
  $("cancel-button").disabled = role !== "admin" || !running;
}

// The event stream, read with fetch so that the Authorization header can
// be sent (EventSource cannot); resumed with Last-Event-ID.
async function follow() {
  let lastId = null;
  for (;;) {
    stream = new AbortController();
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const r = await api("/collectLogs/events", { headers, signal: stream.signal });
      if (r.status === 401) { signOut(); return; }
      if (!r.ok) throw new Error("events: " + r.status);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const e = { event: "message", id: null, data: [] };
          for (const line of block.split("\n")) {
            const i = line.indexOf(":");
            const field = i < 0 ? line : line.slice(0, i);
            let v = i < 0 ? "" : line.slice(i + 1);
            if (v.startsWith(" ")) v = v.slice(1);
            if (field === "event") e.event = v;
            else if (field === "id") e.id = v;
            else if (field === "data") e.data.push(v);
          }
          if (e.data.length === 0) continue;
          if (e.id !== null) lastId = e.id;
          apply(e.event, JSON.parse(e.data.join("\n")));
        }
      }
    } catch (err) {
      if (err.name === "AbortError") return;
    }
    await new Promise((res) => setTimeout(res, 1000));
  }
}

function apply(kind, data) {
  if (kind === "snapshot" || kind === "started") {
    render(data.task);
  } else if (kind === "change") {
    if (!task || task.taskId !== data.taskId || data.version <= task.version) return;
    task.status = data.status;
    task.progress = data.progress;
    task.version = data.version;
    Object.assign(task.perNode, data.nodes);
    render(task);
  }
}

const MiB = 1048576;

function render(t) {
  task = t ? JSON.parse(JSON.stringify(t)) : null;
  syncButtons();
  const box = $("per-node");
  if (!task) {
    $("task-summary").textContent = "No collection has run yet.";
    box.textContent = "";
    return;
  }
  $("task-summary").textContent = "Task " + task.taskId + " (coordinated by " + task.node + ", started " + task.ts + " UTC): " + task.status + ", " + task.progress + "%";
  $("task-summary").dataset.status = task.status;
  $("task-progress").value = task.progress;
  for (const [name, s] of Object.entries(task.perNode)) {
    let card = document.getElementById("card-" + name);
    if (!card) {
      card = document.createElement("article");
      card.className = "node";
      card.id = "card-" + name;
      box.appendChild(card);
    }
    card.dataset.state = s.status;
    card.innerHTML = "";
    const h = document.createElement("h3");
    h.innerHTML = '<span class="name"></span><span class="state"></span>';
    h.querySelector(".name").textContent = name;
    const st = h.querySelector(".state");
    st.textContent = s.status;
    st.classList.add(s.status);
    card.appendChild(h);
    if (s.progress && s.progress.total > 0) {
      const p = document.createElement("progress");
      p.max = s.progress.total;
      p.value = Math.min(s.progress.done, s.progress.total);
      const uploading = s.status === "startedUpload" || s.status === "uploaded";
      const text = uploading
        ? (s.progress.done / MiB).toFixed(1) + " / " + (s.progress.total / MiB).toFixed(1) + " MiB uploaded"
        : s.progress.done + " / " + s.progress.total + (s.progress.message ? " " + s.progress.message : "");
      p.setAttribute("aria-label", name + ": " + text);
      card.appendChild(p);
      const small = document.createElement("div");
      small.className = "amount";
      small.textContent = text;
      card.appendChild(small);
    }
    const dl = document.createElement("dl");
    const row = (label, value, copy) => {
      if (!value) return;
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      const code = document.createElement("code");
      code.textContent = value;
      dd.appendChild(code);
      if (copy) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "copy";
        b.textContent = "Copy";
        b.setAttribute("aria-label", "Copy " + label + " of " + name);
        b.addEventListener("click", () => copyText(value, b));
        dd.appendChild(b);
      }
      dl.append(dt, dd);
    };
    row("URL", s.url, true);
    row("SHA-256", s.sha256, true);
    row("Path", s.path, true);
    if (s.partial) row("Partial", s.partialReason || "yes", false);
    if (s.ignoredParameters && s.ignoredParameters.length) row("Ignored", s.ignoredParameters.join(", "), false);
    if (dl.childNodes.length) card.appendChild(dl);
    const output = (label, code, text) => {
      if (!text && !code) return;
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = label + (code ? " (" + code + ")" : "");
      const pre = document.createElement("pre");
      pre.textContent = text || "";
      card.append(p, pre);
    };
    if (s.status === "failed" || s.status === "cancelled") output("Collection output", s.collectionStatusCode, s.collectionOutput);
    if (s.status === "failedUpload") output("Upload output", s.uploadStatusCode, s.uploadOutput);
  }
  for (const card of [...box.children]) {
    if (!(card.id.slice(5) in task.perNode)) card.remove();
  }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

document.addEventListener("DOMContentLoaded", async () => {
  $("signin").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("signin-error").textContent = "";
    try {
      await enter(await signIn($("user").value, $("password").value));
      $("password").value = "";
    } catch (err) {
      $("signin-error").textContent = err.message;
    }
  });
  $("signout").addEventListener("click", signOut);
  $("start").addEventListener("submit", start);
  $("cancel-button").addEventListener("click", cancel);
  $("from-all").addEventListener("change", syncNodes);
  $("from-some").addEventListener("change", syncNodes);
  $("upload").addEventListener("change", syncUpload);
  syncUpload();
  if (auth) {
    const r = await api("/whoami");
    if (r.ok) { enter(await r.json()); return; }
    sessionStorage.removeItem("autocollect.auth");
    auth = null;
  }
  $("user").focus();
});

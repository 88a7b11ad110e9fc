// fnserve chat: conversations are server sessions (/v1/sessions); answers stream over /v1/chat/ws.
// Model output is untrusted: Markdown is rendered with raw HTML escaped, then sanitised by DOMPurify.
"use strict";

const $ = (id) => document.getElementById(id);
const DEFAULTS = { temperature: 0.7, top_p: 1, top_k: 0, max_tokens: 512, repetition_penalty: 1, system: "" };
const FIELDS = Object.keys(DEFAULTS);
const store = {
  get: (k, d) => { try { const v = localStorage.getItem("fnserve." + k); return v === null ? d : JSON.parse(v); } catch { return d; } },
  set: (k, v) => localStorage.setItem("fnserve." + k, JSON.stringify(v)),
};

let socket = null, socketReady = null, current = store.get("session", null), answering = null, retry = 500;

// --- rendering ---------------------------------------------------------------------------------------------
const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
marked.use({
  renderer: {
    html(token) { return escapeHtml(token.text ?? token.raw ?? ""); },  // raw HTML in a reply is shown, never parsed
    code(token) {
      const lang = hljs.getLanguage(token.lang || "") ? token.lang : null;
      const body = lang ? hljs.highlight(token.text, { language: lang }).value : hljs.highlightAuto(token.text).value;
      return `<pre><button type="button" class="copy">Copy</button><code class="hljs">${body}</code></pre>`;
    },
  },
});
function markdown(text) {
  return DOMPurify.sanitize(marked.parse(text, { async: false }), { FORBID_TAGS: ["style", "form"], FORBID_ATTR: ["style"] });
}
function bubble(role, text, note) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.dataset.text = text || "";
  fill(div, role, text, note);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}
function fill(div, role, text, note) {
  if (role === "assistant") div.innerHTML = markdown(text || "");
  else div.textContent = text || "";
  if (note) { const n = document.createElement("div"); n.className = "note"; n.textContent = note; div.append(n); }
}
$("messages").addEventListener("click", async (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const code = button.parentElement.querySelector("code").innerText;
  try { await navigator.clipboard.writeText(code); button.textContent = "Copied"; } catch { button.textContent = "Select to copy"; }
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
});

// --- server ------------------------------------------------------------------------------------------------
const base = () => (store.get("server", "") || location.origin).replace(/\/$/, "");
function headers() {
  const key = store.get("apiKey", "");
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` } : { "Content-Type": "application/json" };
}
async function api(method, path, body) {
  const response = await fetch(base() + path, { method, headers: headers(), body: body ? JSON.stringify(body) : undefined });
  if (!response.ok) {
    let error = { message: `HTTP ${response.status}` };
    try { error = (await response.json()).error || error; } catch { /* not JSON */ }
    throw Object.assign(new Error(error.message), { status: response.status, error });
  }
  return response.headers.get("content-type")?.includes("json") ? response.json() : response.text();
}
function banner(text) {
  $("banner").hidden = !text;
  $("banner").textContent = text || "";
}
function explain(error) {
  if (error.status === 401 || error.code === "invalid_api_key") {
    openSettings(); $("api-key").focus();
    return "This server needs an API key: enter it in Settings.";
  }
  if (error.status === 429 || error.type === "rate_limit_exceeded" || error.code === "rate_limit_exceeded") return `Rate limited: ${error.message}`;
  if (error.status === 503) return `The server is busy: ${error.message}`;
  return error.message || String(error);
}

// --- the WebSocket -----------------------------------------------------------------------------------------
function connect() {
  if (socket) { socket.onclose = null; socket.onmessage = null; socket.close(); }  // a new server or key
  const url = base().replace(/^http/, "ws") + "/v1/chat/ws";
  const s = new WebSocket(url);
  socket = s;
  socketReady = new Promise((resolve) => {
    s.onopen = () => {
      retry = 500;
      $("connection").textContent = "connected"; $("connection").classList.remove("bad");
      const key = store.get("apiKey", "");
      if (key) s.send(JSON.stringify({ type: "auth", api_key: key }));
      resolve();
    };
  });
  s.onmessage = (event) => answering && answering.frame(JSON.parse(event.data));
  s.onclose = () => {
    if (socket !== s) return;
    $("connection").textContent = "disconnected, reconnecting…"; $("connection").classList.add("bad");
    if (answering) answering.frame({ type: "error", error: { message: "the connection dropped" } });
    setTimeout(connect, retry); retry = Math.min(retry * 2, 10000);
  };
}

// --- sessions ----------------------------------------------------------------------------------------------
async function loadSessions() {
  const list = await api("GET", "/v1/sessions?limit=100");
  const ul = $("sessions");
  ul.replaceChildren();
  for (const s of list.data) {
    const li = document.createElement("li");
    li.dataset.id = s.id;
    if (s.id === current) li.classList.add("current");
    const title = document.createElement("span");
    title.className = "title"; title.textContent = s.title || "New chat"; title.title = s.title;
    title.onclick = () => switchTo(s.id);
    const actions = [["✎", "Rename", () => rename(s)], ["⤓", "Export", () => exportSession(s)], ["✕", "Delete", () => remove(s)]];
    li.append(title, ...actions.map(([label, name, run]) => {
      const b = document.createElement("button"); b.type = "button"; b.textContent = label; b.title = name;
      b.setAttribute("aria-label", `${name} ${s.title || "chat"}`); b.onclick = run; return b;
    }));
    ul.append(li);
  }
}
async function switchTo(id) {
  current = id; store.set("session", id);
  $("messages").replaceChildren();
  if (id) {
    try {
      const session = await api("GET", `/v1/sessions/${id}`);
      for (const m of session.messages) if (m.role === "user" || m.role === "assistant") bubble(m.role, m.content || "");
    } catch (error) {
      if (error.status === 404) { current = null; store.set("session", null); } else banner(explain(error));
    }
  }
  markEditable();
  await loadSessions().catch((e) => banner(explain(e)));
}
async function rename(s) {
  const title = prompt("Rename this chat", s.title);
  if (title !== null) { await api("PATCH", `/v1/sessions/${s.id}`, { title }); await loadSessions(); }
}
async function remove(s) {
  if (!confirm(`Delete "${s.title || "New chat"}"?`)) return;
  await api("DELETE", `/v1/sessions/${s.id}`);
  if (s.id === current) await switchTo(null); else await loadSessions();
}
async function exportSession(s) {
  const text = await api("GET", `/v1/sessions/${s.id}/export?format=markdown`);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type: "text/markdown" }));
  link.download = `${(s.title || s.id).replace(/[^\w-]+/g, "_")}.md`;
  link.click();
}

// --- a turn ------------------------------------------------------------------------------------------------
function settings() {
  const out = {};
  for (const f of FIELDS) out[f] = store.get(f, DEFAULTS[f]);
  return out;
}
function markEditable() {
  document.querySelectorAll(".message .edit").forEach((b) => b.remove());
  const users = document.querySelectorAll(".message.user");
  const last = users[users.length - 1];
  if (!last || answering) return;
  const edit = document.createElement("button");
  edit.type = "button"; edit.className = "edit"; edit.textContent = "Edit";
  edit.onclick = () => { $("input").value = last.dataset.text; $("input").dataset.editing = "1"; $("input").focus(); };
  last.prepend(edit);
}
async function send(text) {
  banner("");
  if (!current) {
    const s = settings();
    current = (await api("POST", "/v1/sessions", { settings: s })).id; store.set("session", current);
  }
  if ($("input").dataset.editing) {  // edit and resend: the last turn leaves the session first
    delete $("input").dataset.editing;
    await api("POST", `/v1/sessions/${current}/rollback`, { amount: 2 });
    const nodes = document.querySelectorAll(".message");
    [...nodes].slice(-2).forEach((n) => n.remove());
  }
  const s = settings();
  const messages = [{ role: "user", content: text }];
  if (s.system && !document.querySelector(".message")) messages.unshift({ role: "system", content: s.system });
  bubble("user", text);
  const reply = bubble("assistant", "");
  const request = { messages, session_id: current, model: $("model").value || "default", temperature: +s.temperature,
                    top_p: +s.top_p, max_tokens: +s.max_tokens, repetition_penalty: +s.repetition_penalty };
  if (+s.top_k > 0) request.top_k = +s.top_k;
  await socketReady;
  if (socket.readyState !== WebSocket.OPEN) { connect(); await socketReady; }
  let text_ = "", tokens = 0, first = 0, painting = 0;  // painting: the animation frame that shows new text
  $("send").hidden = true; $("stop").hidden = false;
  answering = {
    frame(frame) {
      if (frame.type === "delta") {
        text_ += frame.content; tokens += 1; first = first || performance.now();
        const seconds = (performance.now() - first) / 1000;
        if (seconds > 0) $("speed").textContent = `${(tokens / seconds).toFixed(1)} tok/s`;
        if (!painting) painting = requestAnimationFrame(() => { painting = 0; fill(reply, "assistant", text_); reply.scrollIntoView({ block: "end" }); });
        return;
      }
      answering = null;
      if (painting) { cancelAnimationFrame(painting); painting = 0; }  // else it would paint over the note below
      $("send").hidden = false; $("stop").hidden = true;
      if (frame.type === "done" && frame.finish_reason === "cancelled") fill(reply, "assistant", text_, "Stopped: this turn was not saved.");
      else if (frame.type === "done") {
        fill(reply, "assistant", text_);
        const seconds = first ? (performance.now() - first) / 1000 : 0;
        if (frame.usage && seconds > 0) $("speed").textContent = `${(frame.usage.completion_tokens / seconds).toFixed(1)} tok/s`;
        loadSessions().catch(() => {});
      } else { fill(reply, "assistant", text_, "Not saved."); banner(explain(frame.error || {})); }
      markEditable();
    },
  };
  markEditable();
  socket.send(JSON.stringify(request));
}

// --- settings and theme ------------------------------------------------------------------------------------
function openSettings() { $("settings").hidden = false; $("settings-toggle").setAttribute("aria-expanded", "true"); }
function showSettings() {
  for (const f of FIELDS) $(f).value = store.get(f, DEFAULTS[f]);
  $("api-key").value = store.get("apiKey", "");
  $("server").value = store.get("server", "");
}
function theme(dark) {
  document.documentElement.classList.toggle("dark", dark);
  $("code-dark").disabled = !dark; $("code-light").disabled = dark;
  store.set("dark", dark);
}
async function loadModels() {
  const models = await api("GET", "/v1/models");
  const select = $("model");
  const chosen = store.get("model", "default");
  select.replaceChildren();
  for (const m of models.data.filter((m) => m.kind === "chat")) {
    const o = document.createElement("option"); o.value = m.id; o.textContent = m.id; select.append(o);
  }
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

async function start() {
  theme(store.get("dark", matchMedia("(prefers-color-scheme: dark)").matches));
  showSettings();
  $("theme").onclick = () => theme(!document.documentElement.classList.contains("dark"));
  $("settings-toggle").onclick = () => {
    const open = $("settings").hidden; $("settings").hidden = !open; $("settings-toggle").setAttribute("aria-expanded", String(open));
  };
  for (const f of FIELDS) $(f).onchange = () => store.set(f, $(f).value);
  $("api-key").onchange = async () => { store.set("apiKey", $("api-key").value); connect(); await boot(); };
  $("server").onchange = async () => { store.set("server", $("server").value); connect(); await boot(); };
  $("model").onchange = () => store.set("model", $("model").value);
  $("reset-settings").onclick = () => { for (const f of FIELDS) store.set(f, DEFAULTS[f]); showSettings(); };
  $("new-chat").onclick = () => switchTo(null);
  $("stop").onclick = () => socket.send(JSON.stringify({ type: "stop" }));
  $("composer").onsubmit = (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || answering) return;
    $("input").value = "";
    send(text).catch((error) => { banner(explain(error)); answering = null; $("send").hidden = false; $("stop").hidden = true; });
  };
  $("input").onkeydown = (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
  };
  connect();
  await boot();
}
async function boot() {
  try {
    await loadModels();
    banner("");
    await switchTo(current);
  } catch (error) { banner(explain(error)); }
}
start();

// The convo web page: one WebSocket session, streamed answers, tool calls,
// and the post-session summary. Plain JavaScript, no build step.
//
// Signing in follows the gateway's --auth mode (GET / says which): "dev",
// a user name is typed and the gateway signs a token for it; "jwt", a token
// from the identity provider is pasted; "none", the user name is sent as
// user_id, as the seed did. The token travels as ?access_token= on the
// WebSocket (browsers cannot set its headers) and as a bearer header on
// REST calls.
"use strict";

const $ = (id) => document.getElementById(id);
let ws = null;
let answer = null; // the element the current answer streams into
let sessionId = null;
let authMode = "none";
let token = null;

async function learnAuthMode() {
  try {
    const r = await fetch("/");
    authMode = (await r.json()).auth || "none";
  } catch (e) {
    authMode = "none";
  }
  const jwt = authMode === "jwt";
  $("token-label").hidden = !jwt;
  $("token").required = jwt;
  $("user-label").hidden = jwt;
  $("user-id").required = !jwt;
}

// The token for this sign-in: signed by the gateway (dev) or pasted (jwt).
async function signIn(user) {
  if (authMode === "jwt") return $("token").value.trim();
  if (authMode !== "dev") return null;
  const r = await fetch("/api/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user_id: user }),
  });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || `sign-in failed (${r.status})`);
  return body.access_token;
}

function authHeaders() {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function randomId(prefix) {
  return prefix + "-" + Math.random().toString(36).slice(2, 10);
}

function status(text) {
  $("status").textContent = text;
}

function add(cls, text) {
  const el = document.createElement("div");
  el.className = "msg " + cls;
  el.textContent = text;
  $("log").appendChild(el);
  $("log").scrollTop = $("log").scrollHeight;
  return el;
}

function setConnected(on) {
  $("message").disabled = !on;
  $("send").disabled = !on;
  $("end").disabled = !on;
  $("start").disabled = on;
  $("cancel").disabled = true;
}

function onFrame(frame) {
  switch (frame.type) {
    case "session":
      status(`Connected to session ${frame.session_id} as ${frame.user_id}` +
             (frame.resumed ? ` (resumed, ${frame.message_count} earlier messages)` : " (new)"));
      break;
    case "token":
      if (!answer) answer = add("assistant", "");
      answer.textContent += frame.content;
      $("log").scrollTop = $("log").scrollHeight;
      break;
    case "tool_call":
      add("tool tool-call", `→ ${frame.tool}(${JSON.stringify(frame.arguments)})`);
      answer = null;
      break;
    case "tool_result":
      add("tool tool-result", `← ${frame.tool}: ${JSON.stringify(frame.result).slice(0, 600)}`);
      break;
    case "queued":
      add("note", `Queued (position ${frame.position}); it is sent when the answer ends.`);
      break;
    case "done":
      if (frame.status === "cancelled") add("note", "Answer cancelled.");
      answer = null;
      $("cancel").disabled = true;
      break;
    case "error":
      add("error", frame.content + (frame.code ? ` [${frame.code}]` : ""));
      answer = null;
      $("cancel").disabled = true;
      break;
  }
}

async function showSummary(id) {
  $("summary").hidden = false;
  $("summary-text").textContent = "";
  for (let i = 0; i < 120; i++) {
    let body;
    try {
      const r = await fetch(`/api/sessions/${encodeURIComponent(id)}/summary`,
                            { headers: authHeaders() });
      body = await r.json();
    } catch (e) {
      body = { status: "unreachable" };
    }
    $("summary-status").textContent = `Summary: ${body.status}` +
      (body.error ? ` (${body.error})` : "");
    if (body.status === "done") {
      $("summary-text").textContent = body.summary;
      return;
    }
    if (body.status === "failed") return;
    await new Promise((r) => setTimeout(r, 1000));
  }
}

$("session-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  sessionId = $("session-id").value;
  const user = $("user-id").value;
  try {
    await modeKnown;
    token = await signIn(user);
  } catch (err) {
    status(`Could not sign in: ${err.message}`);
    return;
  }
  const query = token ? `access_token=${encodeURIComponent(token)}`
                      : `user_id=${encodeURIComponent(user)}`;
  const proto = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${proto}://${location.host}/ws/session/${encodeURIComponent(sessionId)}` +
                     `?${query}`);
  status("Connecting…");
  $("summary").hidden = true;
  ws.onopen = () => setConnected(true);
  ws.onmessage = (e) => onFrame(JSON.parse(e.data));
  ws.onclose = (e) => {
    setConnected(false);
    status(`Disconnected (${e.code}${e.reason ? " " + e.reason : ""}).`);
    ws = null;
  };
});

$("message-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("message").value.trim();
  if (!text || !ws) return;
  add("user", text);
  answer = null;
  ws.send(JSON.stringify({ message: text }));
  $("message").value = "";
  $("cancel").disabled = false;
});

$("cancel").addEventListener("click", () => {
  if (ws) ws.send(JSON.stringify({ type: "cancel" }));
});

$("end").addEventListener("click", () => {
  if (!ws) return;
  const id = sessionId;
  ws.close(1000, "session ended");
  showSummary(id);
});

$("session-id").value = randomId("s");
$("user-id").value = randomId("u");
const modeKnown = learnAuthMode();

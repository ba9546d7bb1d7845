// The convo web page: sign-in, the list of your conversations, and the
// conversation itself (chat.js). Plain JavaScript modules, no build step;
// marked and DOMPurify come from npm (vendor/). The conversation shown is
// in the URL as #/s/<id>, so reload, back and forward work.
"use strict";

import { Auth, ID_RE, authText, takeTokenFromFragment } from "./auth.js";
import { Chat } from "./chat.js";
import { Sidebar } from "./sidebar.js";

// First of all: a token brought by a login redirect leaves the URL.
const fromRedirect = takeTokenFromFragment();

const $ = (id) => document.getElementById(id);
const INFO_RETRY_MAX_MS = 10000;
const NARROW = window.matchMedia("(max-width: 768px)");
const LAST_USER_KEY = "convo.lastUser";

const auth = new Auth();
const sidebar = new Sidebar({
  list: $("sessions"), empty: $("sessions-empty"), error: $("sessions-error"), more: $("sessions-more"),
}, auth);

function announce(text) {
  const a = $("announcer");
  a.textContent = "";
  setTimeout(() => { a.textContent = text; }, 50);
}

// ---- connection status ------------------------------------------------------

let countdown = null;
let connState = "idle";

function showConn(state, info = {}) {
  connState = state;
  const box = $("conn");
  const text = $("conn-text");
  const retry = $("conn-retry");
  clearInterval(countdown);
  box.dataset.state = state;
  retry.hidden = true;
  const tick = () => {
    const secs = Math.max(0, Math.ceil((info.retryAt - Date.now()) / 1000));
    text.textContent = navigator.onLine === false ? "Offline; waiting for the network…"
      : `Reconnecting in ${secs} s…`;
  };
  switch (state) {
    case "idle":
      text.textContent = "";
      break;
    case "loading":
    case "connecting":
      text.textContent = "Connecting…";
      break;
    case "open":
      text.textContent = "Connected";
      break;
    case "waiting":
      tick();
      countdown = setInterval(tick, 1000);
      retry.textContent = "Reconnect now";
      retry.hidden = false;
      announce("Connection lost. Reconnecting.");
      break;
    case "closed":
      text.textContent = info.reason || "Disconnected.";
      if (info.code === 4409) {
        retry.textContent = "Use here";
        retry.hidden = false;
      }
      announce(text.textContent);
      break;
  }
  const final = state === "closed" && info.code !== 4409;
  $("input").disabled = final;
  $("send").disabled = final;
}

$("conn-retry").addEventListener("click", () => {
  if (connState === "closed") chat.reconnect();
  else if (chat.conn) chat.conn.retryNow();
});

// ---- the conversation ---------------------------------------------------------

const chat = new Chat({
  log: $("log"), turns: $("turns"), empty: $("empty"), older: $("older"),
  olderStatus: $("older-status"), toBottom: $("to-bottom"),
}, {
  auth,
  onState: showConn,
  onCreated: (id, text) => {
    sidebar.added(id, text);
    setTitle(text);
  },
  onTitle: (id, text) => {
    sidebar.setTitle(id, text);
    if (chat.id === id) setTitle(sidebar.title(id));
  },
  onBusy: (busy) => {
    $("stop").hidden = !busy;
  },
  announce,
  notice: (text) => notice(text),
  edit: (text) => {
    $("input").value = text;
    autosize();
    $("input").focus();
  },
});

function setTitle(text) {
  $("title").textContent = text || "Conversation";
  document.title = text ? `${text} · convo` : "convo";
}

// A short message above the composer, for what concerns no single answer.
function notice(text) {
  const p = document.createElement("p");
  p.className = "notice";
  p.setAttribute("role", "status");
  p.textContent = text;
  $("turns").append(p);
  chat.scrollToBottom(false);
}

// ---- routing: #/s/<id> ----------------------------------------------------------

function routeId() {
  const m = /^#\/s\/(.+)$/.exec(location.hash);
  if (!m) return null;
  let id;
  try {
    id = decodeURIComponent(m[1]);
  } catch (e) {
    id = "";
  }
  return id;
}

// force: open it even when it is the one shown (after a sign-in).
function route(force = false) {
  if (!auth.signedIn) return;
  let id = routeId();
  if (id !== null && !ID_RE.test(id)) {
    history.replaceState(history.state, "", "#/");
    id = null;
    chat.open(null);
    notice("That link does not name a valid conversation; here is a new one.");
  } else if (force || id !== chat.id) {
    // The conversation left ends: its summary is on its way to the list.
    if (chat.id) sidebar.reload();
    chat.open(id);
  }
  sidebar.setActive(id);
  setTitle(id === null ? "New chat" : sidebar.title(id));
  if (id === null) document.title = "convo";
  closeDrawer();
  if (!NARROW.matches) $("input").focus();
}

window.addEventListener("hashchange", () => route());

// ---- composer -------------------------------------------------------------------------

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, window.innerHeight * 0.4)}px`;
}

function submit() {
  const input = $("input");
  const text = input.value;
  if (!text.trim() || input.disabled) return;
  chat.send(text);
  input.value = "";
  autosize();
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  submit();
});

$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submit();
  }
});
$("input").addEventListener("input", autosize);

$("stop").addEventListener("click", () => chat.cancel());

document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  if (document.body.classList.contains("drawer-open")) {
    closeDrawer();
    $("menu").focus();
  } else if (chat.cancel()) {
    e.preventDefault();
  }
});

for (const b of document.querySelectorAll(".suggestion")) {
  b.addEventListener("click", () => {
    chat.send(b.textContent);
  });
}

// ---- the drawer (narrow screens) -------------------------------------------------------

function closeDrawer() {
  document.body.classList.remove("drawer-open");
  $("menu").setAttribute("aria-expanded", "false");
  $("scrim").hidden = true;
}

$("menu").addEventListener("click", () => {
  const open = !document.body.classList.contains("drawer-open");
  document.body.classList.toggle("drawer-open", open);
  $("menu").setAttribute("aria-expanded", String(open));
  $("scrim").hidden = !open;
  if (open) sidebar.reload();
});
$("scrim").addEventListener("click", closeDrawer);

// ---- sign-in -------------------------------------------------------------------------------

const INTRO = {
  dev: "Development sign-in: this server signs a token for the name you type.",
  none: "This server does not check who you are: type the user name to talk as.",
  jwt: "Sign in with an access token from your identity provider, or come back here from its "
    + "login page, which hands one over.",
};

function showSignIn(message = "") {
  chat.close();
  sidebar.clear();
  $("app").hidden = true;
  $("boot").hidden = true;
  $("signin").hidden = false;
  const jwt = auth.mode === "jwt";
  $("signin-intro").textContent = INTRO[auth.mode] || "";
  $("signin-user-row").hidden = jwt;
  $("signin-token-row").hidden = !jwt;
  $("signin-user-label").textContent = auth.mode === "none" ? "User" : "Your name";
  $("signin-user").value = localStorage.getItem(LAST_USER_KEY) || "";
  $("signin-token").value = "";
  const err = $("signin-error");
  err.hidden = !message;
  err.textContent = message;
  (jwt ? $("signin-token") : $("signin-user")).focus();
}

$("signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const err = $("signin-error");
  const submitButton = $("signin-submit");
  submitButton.disabled = true;
  err.hidden = true;
  try {
    if (auth.mode === "jwt") {
      await auth.signInWithToken($("signin-token").value);
      $("signin-token").value = "";
    } else {
      const user = $("signin-user").value.trim();
      await auth.signInAs(user);
      localStorage.setItem(LAST_USER_KEY, user);
    }
    start();
  } catch (ex) {
    err.textContent = ex.message;
    err.hidden = false;
  } finally {
    submitButton.disabled = false;
  }
});

$("sign-out").addEventListener("click", () => auth.signOut(""));
auth.onSignedOut = (reason) => showSignIn(reason);

function start() {
  $("signin").hidden = true;
  $("boot").hidden = true;
  $("app").hidden = false;
  $("whoami").textContent = auth.user;
  $("whoami").title = `signed in as ${auth.user} (${auth.mode} mode)`;
  sidebar.reload();
  route(true);
}

// ---- start-up ---------------------------------------------------------------------------

// GET / says the gateway's auth mode; retried while the gateway is away.
async function serverInfo() {
  for (let attempt = 0; ; attempt++) {
    try {
      const r = await fetch("/", { cache: "no-store" });
      if (r.ok) return await r.json();
    } catch (e) {
      // not reachable yet
    }
    const wait = Math.min(INFO_RETRY_MAX_MS, 500 * 2 ** attempt);
    $("boot").textContent = `The server cannot be reached; trying again in ${Math.ceil(wait / 1000)} s…`;
    await new Promise((r) => setTimeout(r, wait));
  }
}

async function boot() {
  const info = await serverInfo();
  auth.mode = ["jwt", "dev", "none"].includes(info.auth) ? info.auth : "none";
  if (fromRedirect && fromRedirect.error) {
    showSignIn(`The identity provider said: ${fromRedirect.error}`);
  } else if (fromRedirect && auth.mode === "jwt") {
    try {
      await auth.signInWithToken(fromRedirect.token);
      start();
    } catch (e) {
      showSignIn(e.message);
    }
  } else {
    const kept = auth.restore();
    if (kept === "ok") start();
    else showSignIn(kept === "expired" ? authText("token_expired") : "");
  }
}

boot();

// One WebSocket to one session, kept open: after any close that is not
// final it reconnects by itself, waiting a backoff that doubles per failed
// attempt (from RETRY_BASE_MS up to RETRY_MAX_MS) with jitter (a random
// half of it), so that the clients of a restarted gateway do not all come
// back in the same instant. An attempt that never got the session frame
// asks the owner (prepare) first, which renews a refused token.
//
// States (onState): "connecting", "open" (the session frame arrived),
// "waiting" (a retry is scheduled; retryAt), "closed" (final: reason).
"use strict";

const RETRY_BASE_MS = 500;
const RETRY_MAX_MS = 15000;

// Closes after which reconnecting cannot help.
const FINAL = {
  4400: "The conversation id is not valid.",
  4403: "This conversation is not available to you.",
  4409: "This conversation was opened in another tab or window.",
  1003: "The server refused what this page sent.",
  1007: "The server refused what this page sent.",
};

export class Connection {
  // url(): the WebSocket URL (asked per attempt: a renewed token goes in);
  // prepare(failedBeforeOpen): async, before each retry, false to stop;
  // onFrame(frame), onState(state, info).
  constructor({ url, prepare, onFrame, onState }) {
    Object.assign(this, { url, prepare, onFrame, onState });
    this.ws = null;
    this.state = "idle";
    this.attempt = 0;
    this.timer = null;
    this.opened = false; // the current attempt got its session frame
    this.lastError = null; // the error frame that came before a close
    this.stopped = false;
    this.onOnline = () => this.retryNow();
    window.addEventListener("online", this.onOnline);
  }

  set(state, info = {}) {
    this.state = state;
    this.onState(state, info);
  }

  start() {
    this.connect();
  }

  connect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.opened = false;
    this.lastError = null;
    let ws;
    try {
      ws = new WebSocket(this.url());
    } catch (e) {
      this.set("closed", { reason: "The conversation could not be opened." });
      return;
    }
    this.ws = ws;
    this.set("connecting");
    ws.onmessage = (e) => {
      if (this.ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(e.data);
      } catch (err) {
        return; // not a frame of ours
      }
      if (frame === null || typeof frame !== "object") return;
      if (frame.type === "session") {
        this.opened = true;
        this.attempt = 0;
        this.set("open", { frame });
      }
      if (frame.type === "error" && !frame.turn_id) this.lastError = frame;
      this.onFrame(frame);
    };
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.closed(e.code);
    };
  }

  closed(code) {
    if (this.stopped) return;
    const reason = FINAL[code];
    if (reason) {
      this.set("closed", { reason, code, error: this.lastError });
      return;
    }
    const base = Math.min(RETRY_MAX_MS, RETRY_BASE_MS * 2 ** this.attempt);
    this.attempt++;
    const delay = Math.round(base / 2 + Math.random() * (base / 2));
    const failedBeforeOpen = !this.opened;
    this.set("waiting", { code, error: this.lastError, retryAt: Date.now() + delay });
    this.timer = setTimeout(async () => {
      this.timer = null;
      if (this.stopped) return;
      if (this.prepare && !(await this.prepare(failedBeforeOpen))) {
        this.set("closed", { reason: "Signed out." });
        return;
      }
      this.connect();
    }, delay);
  }

  // A retry at once (the button, or the browser coming back online).
  retryNow() {
    if (this.stopped || this.state !== "waiting") return;
    this.attempt = 0;
    clearTimeout(this.timer);
    this.timer = null;
    this.connect();
  }

  send(obj) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN || !this.opened) return false;
    this.ws.send(JSON.stringify(obj));
    return true;
  }

  get isOpen() {
    return this.state === "open" && this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  // The end: no more retries.
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    window.removeEventListener("online", this.onOnline);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.close(1000, "closed by the page");
    }
  }
}

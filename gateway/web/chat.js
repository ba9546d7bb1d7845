// One conversation on screen: its history (REST, paged as you scroll up),
// its live answers (WebSocket), and the messages you typed.
//
// Messages wait in a queue kept by the page, shown in order after the answer
// in progress, and leave one at a time: the next is sent when the answer
// before it has ended. So at most one message is ever unconfirmed, and after
// a lost connection the session frame's message_count (the user messages
// the server holds) tells whether it arrived: if it did, it is not sent
// again (its answer was interrupted: Retry sends it anew on request); if it
// did not, it is sent once more after the resume. Unconfirmed messages are
// kept in sessionStorage too, so a reload loses none of them either.
"use strict";

import { Connection } from "./conn.js";
import { ToolCard, copyButton, renderMarkdown } from "./render.js";

// Events asked per page of history, and the most one request may ask.
const HISTORY_PAGE = 500;
const EVENTS_LIMIT_MAX = 1000;
// A latest page follows next_after_seq at most this many times (seq gaps).
const TAIL_PAGES_MAX = 10;
// After a resume, history the store has not written yet is asked again
// this many times, this far apart.
const RECONCILE_TRIES = 3;
const RECONCILE_DELAY_MS = 400;
// A message refused for a rate or queue limit is sent again after these
// waits (the last one repeats).
const RETRY_LATER_MS = [2000, 5000, 10000, 20000];
// Within this many pixels of the bottom the log follows the stream.
const NEAR_BOTTOM_PX = 80;

const OUTBOX_KEY = "convo.outbox.";

// Stored system events that belong to an answer (the others are about the
// session: connected, disconnected, route).
const TURN_EVENTS = new Set(["usage", "turn_cancelled", "turn_failed"]);

// Error frames without a turn_id that answer the message just sent.
const RETRY_LATER = new Set(["rate_limited", "token_limit", "queue_full"]);
const REFUSED = new Set([
  "invalid_json", "missing_message", "empty_message", "message_too_long", "invalid_utf8",
  "invalid_text", "unknown_type", "invalid_type", "frame_too_big",
]);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, cls, onClick) {
  const b = el("button", cls, label);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (e) {
    return null;
  }
}

function usageText(u) {
  if (!u || typeof u.total_tokens !== "number") return "";
  return `${u.total_tokens} tokens (${u.prompt_tokens} in, ${u.completion_tokens} out)`;
}

// One user message and its answer.
class Turn {
  constructor(chat, text, history = false) {
    this.chat = chat;
    this.text = text; // null: an answer without its message (history page edge)
    this.history = history;
    this.state = history ? "completed" : "queued";
    this.events = []; // history: the stored events it was built from
    this.segments = []; // {kind: "text", text, el, dirty} | {kind: "tool", card}
    this.cards = new Map();
    this.serverTurnId = null;
    this.base = null; // the server's message count when it was sent
    this.retries = 0;
    this.usage = null;
    this.finishReason = null;
    this.failCode = null;
    this.el = el("div", "turn");
    this.answerEl = null;
    if (text !== null) {
      this.userEl = el("div", "msg user");
      this.bubble = el("div", "bubble", text);
      this.userMeta = el("div", "meta");
      this.userEl.append(this.bubble, this.userMeta);
      this.el.append(this.userEl);
    }
  }

  setUserNote(text, actions = []) {
    if (!this.userMeta) return;
    this.userMeta.replaceChildren();
    if (text) this.userMeta.append(el("span", "note", text));
    for (const a of actions) this.userMeta.append(a);
    this.userEl.dataset.state = this.state;
  }

  ensureAnswer() {
    if (this.answerEl) return;
    this.answerEl = el("article", "msg assistant");
    this.answerEl.setAttribute("aria-label", "Answer");
    this.body = el("div", "answer-body");
    this.answerMeta = el("div", "meta");
    this.answerEl.append(this.body, this.answerMeta);
    this.el.append(this.answerEl);
  }

  thinking() {
    this.ensureAnswer();
    this.answerEl.setAttribute("aria-busy", "true");
    if (this.segments.length === 0 && !this.body.querySelector(".typing")) {
      const t = el("span", "typing");
      t.setAttribute("aria-label", "Thinking");
      t.append(el("i"), el("i"), el("i"));
      this.body.append(t);
    }
  }

  addToken(text) {
    this.ensureAnswer();
    this.body.querySelector(".typing")?.remove();
    let seg = this.segments[this.segments.length - 1];
    if (!seg || seg.kind !== "text") {
      seg = { kind: "text", text: "", el: el("div", "md"), dirty: false };
      this.segments.push(seg);
      this.body.append(seg.el);
    }
    seg.text += text;
    seg.dirty = true;
  }

  addToolCall(tool, args, id) {
    this.ensureAnswer();
    this.body.querySelector(".typing")?.remove();
    const card = new ToolCard(tool, args, id);
    this.segments.push({ kind: "tool", card });
    this.cards.set(id || `#${this.cards.size}`, card);
    this.body.append(card.el);
    return card;
  }

  addToolResult(tool, result, id, isError) {
    let card = id ? this.cards.get(id) : null;
    if (!card) {
      card = [...this.cards.values()].find((c) => c.tool === tool && c.el.dataset.state === "running")
        || this.addToolCall(tool, null, id);
    }
    card.setResult(result, isError);
  }

  // Renders the text that changed; live: still streaming.
  render(live) {
    for (const seg of this.segments) {
      if (seg.kind === "text" && seg.dirty) {
        renderMarkdown(seg.el, seg.text, live);
        seg.dirty = false;
      }
    }
  }

  answerText() {
    return this.segments.filter((s) => s.kind === "text").map((s) => s.text).join("\n\n");
  }

  // The answer ended: completed, cancelled, failed or interrupted.
  finish(state, { usage = null, finishReason = null, error = null } = {}) {
    this.state = state;
    this.usage = usage || this.usage;
    this.finishReason = finishReason || this.finishReason;
    this.ensureAnswer();
    this.body.querySelector(".typing")?.remove();
    for (const s of this.segments) if (s.kind === "text") s.dirty = true;
    this.render(false);
    if (state !== "completed") for (const c of this.cards.values()) c.abandon();
    this.answerEl.removeAttribute("aria-busy");
    this.answerEl.dataset.state = state;
    this.answerMeta.replaceChildren();
    this.body.querySelector(".answer-error")?.remove();
    const retry = () => this.chat.retry(this);
    if (state === "failed" || state === "interrupted") {
      const box = el("div", "answer-error");
      box.setAttribute("role", "alert");
      box.append(el("span", "", state === "interrupted"
        ? "The connection was lost and this answer stopped."
        : (error && error.content) || "The answer failed."));
      if (this.text !== null) box.append(button("Retry", "link", retry));
      this.body.append(box);
    }
    if (this.segments.some((s) => s.kind === "text")) {
      this.answerMeta.append(copyButton("Copy", () => this.answerText()));
    }
    const u = usageText(this.usage);
    if (u) {
      const span = el("span", "usage", u);
      span.title = "model tokens this answer used";
      this.answerMeta.append(span);
    }
    if (state === "cancelled") this.answerMeta.append(el("span", "note", "Stopped"));
    if (this.finishReason === "length") this.answerMeta.append(el("span", "note", "Cut short (length limit)"));
    if (this.text !== null && this.userMeta) {
      this.setUserNote("");
    }
  }
}

export class Chat {
  // els: {log, turns, empty, older, olderStatus, toBottom, title};
  // hooks: {auth, onState(state, info), onCreated(id, text), onTitle(id, text),
  //         onBusy(bool), announce(text), notice(text), edit(text)}
  constructor(els, hooks) {
    this.els = els;
    this.hooks = hooks;
    this.auth = hooks.auth;
    this.id = null;
    this.gen = 0;
    this.conn = null;
    this.turns = [];
    this.stick = true;
    this.dirty = new Set();
    this.rafPending = false;
    this.holdTimer = null;
    els.log.addEventListener("scroll", () => this.onScroll(), { passive: true });
    els.toBottom.addEventListener("click", () => this.scrollToBottom(true));
    this.olderObserver = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) this.loadOlder();
    }, { root: els.log, rootMargin: "200px 0px 0px 0px" });
    this.olderObserver.observe(els.older);
  }

  // ---- opening and closing ----------------------------------------------

  close() {
    this.gen++;
    if (this.conn) this.conn.stop();
    this.conn = null;
    clearTimeout(this.holdTimer);
    this.holdTimer = null;
    this.id = null;
    this.turns = [];
    this.inflight = null;
    this.dirty.clear();
    this.els.turns.replaceChildren();
    this.els.olderStatus.hidden = true;
    this.hooks.onBusy(false);
  }

  // Shows conversation `id` (null: a new chat, created by its first
  // message).
  async open(id) {
    this.close();
    const gen = this.gen;
    this.id = id;
    this.hist = { first: 1, last: 0, more: false, loading: false, userCount: 0 };
    this.serverCount = null;
    this.ids = new Map();
    this.liveSent = false;
    this.stick = true;
    this.loading = false;
    this.els.empty.hidden = id !== null;
    if (id === null) {
      this.hooks.onState("idle", {});
      return;
    }
    this.loading = true;
    this.hooks.onState("loading", {});
    this.restoreOutbox();
    try {
      await this.loadLatest(gen);
    } catch (e) {
      if (gen !== this.gen || !this.auth.signedIn) return; // signed out: the form is shown
      this.hooks.notice(`The history could not be loaded: ${e.message}`);
    }
    if (gen !== this.gen) return;
    // A message sent before a reload that the history shows: it arrived.
    const t = this.inflight;
    if (t && t.restored && t.base < this.hist.userCount) {
      this.removeTurn(t);
      this.saveOutbox();
    }
    if (this.hist.first <= 1 && this.turns[0] && this.turns[0].history && this.turns[0].text !== null) {
      this.hooks.onTitle(this.id, this.turns[0].text);
    }
    this.els.empty.hidden = this.turns.length > 0;
    this.loading = false;
    this.scrollToBottom(true);
    this.connect();
  }

  connect() {
    const id = this.id;
    const gen = this.gen;
    this.conn = new Connection({
      url: () => this.auth.wsUrl(id),
      // A retry that follows a failed handshake: a refused token shows as a
      // bare close, so ask the REST side, which says 401.
      prepare: async (failedBeforeOpen) => {
        if (gen !== this.gen) return false;
        // A dev token that cannot be renewed now (the gateway is away) is
        // tried anyway: the retries go on until the gateway is back.
        await this.auth.fresh();
        if (!this.auth.signedIn) return false;
        if (failedBeforeOpen && this.auth.mode !== "none") {
          try {
            await this.auth.get("/api/sessions", { limit: 1 });
          } catch (e) {
            if (e.status === 401 || e.code === "signed_out") return this.auth.signedIn;
          }
        }
        return gen === this.gen;
      },
      onFrame: (f) => { if (gen === this.gen) this.onFrame(f); },
      onState: (state, info) => { if (gen === this.gen) this.onConnState(state, info); },
    });
    this.conn.start();
  }

  // After a final close: try again on request ("Use here").
  reconnect() {
    if (this.id === null || (this.conn && this.conn.state !== "closed")) return;
    if (this.conn) this.conn.stop();
    this.connect();
  }

  onConnState(state, info) {
    if (state === "open") {
      this.onSession(info.frame);
    } else if (state === "waiting" || state === "closed") {
      const t = this.inflight;
      if (t && t.serverTurnId !== null) t.setUserNote("");
      if (t && t.answerEl) {
        t.answerMeta.replaceChildren(el("span", "note", "Connection lost; reconnecting…"));
      }
      for (const q of this.turns) if (q.state === "queued") this.showQueued(q);
    }
    this.hooks.onState(state, info);
  }

  // ---- the session frame: what arrived while the connection was down ----

  onSession(frame) {
    const count = Number(frame.message_count) || 0;
    this.serverCount = count;
    this.ids = new Map();
    const t = this.inflight;
    this.inflight = null;
    if (t) {
      const arrived = t.serverTurnId !== null || (t.base !== null && count > t.base);
      if (arrived && t.restored) {
        // Sent before a reload and now in the history.
        this.removeTurn(t);
      } else if (arrived) {
        t.serverTurnId = null;
        t.finish("interrupted");
      } else if (t.cancelled) {
        this.removeTurn(t);
      } else {
        t.state = "queued";
        t.base = null;
        this.showQueued(t);
      }
      this.saveOutbox();
    }
    this.reconcile(this.gen);
  }

  // The history shown may lack what the store had not written yet when
  // it was read (a reload right after an answer): ask again until the
  // counts agree.
  async reconcile(gen) {
    if (this.liveSent || this.serverCount <= this.hist.userCount) {
      this.pump();
      return;
    }
    this.loading = true;
    for (let i = 0; i < RECONCILE_TRIES && gen === this.gen; i++) {
      try {
        const events = await this.fetchEvents(this.hist.last, null);
        if (gen !== this.gen) return;
        if (events.length) this.appendHistory(events);
      } catch (e) {
        break;
      }
      if (this.hist.userCount >= this.serverCount) break;
      await new Promise((r) => setTimeout(r, RECONCILE_DELAY_MS * (i + 1)));
    }
    if (gen !== this.gen) return;
    this.loading = false;
    this.pump();
  }

  // ---- sending ----------------------------------------------------------

  // A message typed by the user: queued, sent when its turn comes.
  send(text) {
    if (this.id === null) {
      this.id = newSessionId();
      history.replaceState(history.state, "", `#/s/${this.id}`);
      this.els.empty.hidden = true;
      this.hist = { first: 1, last: 0, more: false, loading: false, userCount: 0 };
      this.loading = false;
      this.hooks.onCreated(this.id, text);
      this.connect();
    }
    const t = new Turn(this, text);
    this.appendTurn(t);
    this.showQueued(t);
    this.saveOutbox();
    this.scrollToBottom(true);
    this.pump();
  }

  showQueued(t) {
    const offline = !this.conn || !this.conn.isOpen;
    const behind = this.inflight !== null || this.turns.some((x) => x.state === "streaming")
      || this.turns.find((x) => x.state === "queued") !== t;
    const note = offline ? "Waiting for the connection; sent once it is back"
      : behind ? "Queued; sent when the answer before it ends" : "";
    t.setUserNote(note, note ? [button("Remove", "link remove", () => this.removeQueued(t))] : []);
  }

  removeQueued(t) {
    if (t.state !== "queued") return;
    this.removeTurn(t);
    this.saveOutbox();
  }

  removeTurn(t) {
    const i = this.turns.indexOf(t);
    if (i >= 0) this.turns.splice(i, 1);
    if (this.inflight === t) this.inflight = null;
    t.el.remove();
  }

  // Sends the next queued message when nothing is outstanding.
  pump() {
    if (!this.conn || !this.conn.isOpen || this.loading || this.inflight || this.holdTimer) return;
    const t = this.turns.find((x) => x.state === "queued");
    if (!t) {
      this.hooks.onBusy(this.turns.some((x) => x.state === "streaming"));
      return;
    }
    t.base = this.serverCount;
    if (!this.conn.send({ message: t.text })) return;
    t.state = "sent";
    this.inflight = t;
    this.liveSent = true;
    t.setUserNote("");
    t.thinking();
    for (const q of this.turns) if (q.state === "queued") this.showQueued(q);
    this.saveOutbox();
    this.hooks.onBusy(true);
    this.scrollToBottom(false);
  }

  retry(t) {
    if (t.text !== null) this.send(t.text);
  }

  // Esc or Stop: ends whatever streams.
  cancel() {
    const t = this.inflight || this.turns.find((x) => x.state === "streaming");
    if (!t) return false;
    if (this.conn && this.conn.isOpen && (t.state === "streaming" || t.state === "sent")) {
      this.conn.send({ type: "cancel" });
    } else if (t === this.inflight) {
      // Not connected: it is not sent again, and if it arrived the server
      // has stopped its answer already.
      t.cancelled = true;
      t.finish("cancelled");
      this.saveOutbox();
    }
    return true;
  }

  // ---- frames -------------------------------------------------------------

  onFrame(f) {
    switch (f.type) {
      case "queued":
        this.onQueued(f);
        break;
      case "token":
      case "tool_call":
      case "tool_result":
      case "done":
        this.onTurnFrame(f);
        break;
      case "error":
        if (f.turn_id) this.onTurnFrame(f);
        else this.onLooseError(f);
        break;
      default:
        break; // "session" went to onConnState; unknown types are skipped
    }
  }

  // The message we sent waits on the server behind an answer we did not
  // ask for (this session was taken over mid-answer).
  onQueued(f) {
    const t = this.inflight;
    if (!t || t.serverTurnId === f.turn_id) return;
    if (t.serverTurnId !== null) {
      // The frames taken for it belong to that other answer: move them.
      const other = new Turn(this, null);
      other.state = "streaming";
      for (const key of ["segments", "cards", "answerEl", "body", "answerMeta"]) {
        other[key] = t[key];
      }
      if (other.answerEl) other.el.append(other.answerEl);
      t.segments = [];
      t.cards = new Map();
      t.answerEl = null;
      this.ids.set(t.serverTurnId, other);
      this.turns.splice(this.turns.indexOf(t), 0, other);
      t.el.before(other.el);
      t.thinking();
    } else {
      this.confirm(t);
    }
    t.serverTurnId = f.turn_id;
    this.ids.set(f.turn_id, t);
    t.setUserNote("Waiting for the answer before it");
  }

  confirm(t) {
    this.serverCount++;
    t.state = "streaming";
    this.saveOutbox();
  }

  turnFor(id) {
    let t = this.ids.get(id);
    if (t) return t;
    t = this.inflight;
    if (t && t.serverTurnId === null) {
      t.serverTurnId = id;
      this.confirm(t);
    } else {
      // An answer this page did not ask for on this connection (the
      // session was taken over while it streamed): shown on its own.
      t = new Turn(this, null);
      t.state = "streaming";
      const q = this.turns.findIndex((x) => x.state === "queued");
      if (q >= 0) {
        this.turns.splice(q, 0, t);
        this.turns[q + 1].el.before(t.el);
      } else {
        this.appendTurn(t);
      }
    }
    this.ids.set(id, t);
    return t;
  }

  onTurnFrame(f) {
    const t = this.turnFor(f.turn_id);
    if (t.state !== "streaming" && t.state !== "sent") return; // a late frame of a finished answer
    t.setUserNote("");
    switch (f.type) {
      case "token":
        t.addToken(typeof f.content === "string" ? f.content : "");
        this.markDirty(t);
        break;
      case "tool_call":
        t.addToolCall(f.tool, f.arguments, f.id);
        this.scrollToBottom(false);
        break;
      case "tool_result":
        t.addToolResult(f.tool, f.result, f.id, f.is_error === true);
        this.scrollToBottom(false);
        break;
      case "done":
        t.finish(f.status === "cancelled" ? "cancelled" : "completed",
          { usage: f.usage, finishReason: f.finish_reason });
        this.answerEnded(t, f.status === "cancelled" ? "Answer stopped." : "Answer complete.");
        break;
      case "error":
        t.finishReason = null;
        t.finish("failed", { error: f });
        this.answerEnded(t, `The answer failed: ${f.content || f.code}`);
        break;
    }
  }

  answerEnded(t, message) {
    this.dirty.delete(t);
    this.hooks.announce(message);
    if (this.inflight === t) this.inflight = null;
    this.scrollToBottom(false);
    this.pump();
    this.hooks.onBusy(this.inflight !== null || this.turns.some((x) => x.state === "streaming"));
  }

  // An error about no turn: the refusal of the message just sent, or a
  // notice (the reasons of a close are shown by the connection's state).
  onLooseError(f) {
    const t = this.inflight;
    if (t && t.serverTurnId === null && (RETRY_LATER.has(f.code) || REFUSED.has(f.code))) {
      this.inflight = null;
      t.body?.querySelector(".typing")?.remove();
      t.answerEl?.remove();
      t.answerEl = null;
      if (RETRY_LATER.has(f.code)) {
        const wait = RETRY_LATER_MS[Math.min(t.retries, RETRY_LATER_MS.length - 1)];
        t.retries++;
        t.state = "queued";
        t.base = null;
        t.setUserNote(`${f.content} Sending it again in ${Math.round(wait / 1000)} s.`,
          [button("Remove", "link remove", () => this.removeQueued(t))]);
        this.holdTimer = setTimeout(() => {
          this.holdTimer = null;
          this.pump();
        }, wait);
      } else {
        t.state = "failed";
        t.setUserNote(`Not sent: ${f.content}`, [
          button("Edit", "link", () => { this.hooks.edit(t.text); this.removeTurn(t); this.saveOutbox(); }),
          button("Remove", "link remove", () => { this.removeTurn(t); this.saveOutbox(); }),
        ]);
        this.pump();
      }
      this.saveOutbox();
      this.hooks.onBusy(false);
      return;
    }
    if (f.code === "no_active_turn") return;
    this.hooks.notice(f.content || f.code);
  }

  // ---- rendering ----------------------------------------------------------

  markDirty(t) {
    this.dirty.add(t);
    if (this.rafPending) return;
    this.rafPending = true;
    requestAnimationFrame(() => {
      this.rafPending = false;
      for (const x of this.dirty) x.render(true);
      this.dirty.clear();
      this.scrollToBottom(false);
    });
  }

  appendTurn(t) {
    this.turns.push(t);
    this.els.turns.append(t.el);
  }

  onScroll() {
    const log = this.els.log;
    this.stick = log.scrollHeight - log.scrollTop - log.clientHeight < NEAR_BOTTOM_PX;
    this.els.toBottom.hidden = this.stick;
  }

  // force: also when the reader has scrolled up.
  scrollToBottom(force) {
    if (!force && !this.stick) {
      this.els.toBottom.hidden = false;
      return;
    }
    const log = this.els.log;
    log.scrollTop = log.scrollHeight;
    this.stick = true;
    this.els.toBottom.hidden = true;
  }

  // ---- history --------------------------------------------------------------

  // Events of seq in (after, until) — until null: to the end.
  async fetchEvents(after, until) {
    const out = [];
    for (let page = 0; page < TAIL_PAGES_MAX; page++) {
      const limit = until === null ? HISTORY_PAGE : Math.min(EVENTS_LIMIT_MAX, until - 1 - after);
      if (limit <= 0) break;
      const body = await this.auth.get(`/api/sessions/${encodeURIComponent(this.id)}/events`,
        { after_seq: after, limit });
      for (const ev of body.events || []) {
        if (until !== null && ev.seq >= until) return out;
        out.push(ev);
      }
      if (!body.next_after_seq || body.next_after_seq <= after) break;
      after = body.next_after_seq;
    }
    return out;
  }

  async loadLatest(gen) {
    let meta = null;
    try {
      meta = await this.auth.get(`/api/sessions/${encodeURIComponent(this.id)}`);
    } catch (e) {
      if (e.status !== 404) throw e;
    }
    if (gen !== this.gen || !meta) return;
    this.hist.userCount = Number(meta.user_message_count) || 0;
    const total = Number(meta.event_count) || 0;
    if (total === 0) return;
    const after = Math.max(0, total - HISTORY_PAGE);
    const events = await this.fetchEvents(after, null);
    if (gen !== this.gen) return;
    this.hist.first = events.length ? events[0].seq : after + 1;
    this.hist.last = events.length ? events[events.length - 1].seq : after;
    this.hist.more = this.hist.first > 1;
    this.prependHistory(events);
  }

  async loadOlder() {
    const h = this.hist;
    if (!h || !h.more || h.loading || this.id === null) return;
    h.loading = true;
    const gen = this.gen;
    const until = h.first;
    const after = Math.max(0, until - 1 - HISTORY_PAGE);
    this.els.olderStatus.hidden = false;
    this.els.olderStatus.textContent = "Loading earlier messages…";
    try {
      const events = await this.fetchEvents(after, until);
      if (gen !== this.gen) return;
      h.first = after + 1;
      h.more = after > 0;
      this.prependHistory(events);
      this.els.olderStatus.hidden = true;
    } catch (e) {
      if (gen !== this.gen) return;
      this.els.olderStatus.textContent = `Earlier messages could not be loaded: ${e.message}`;
    } finally {
      h.loading = false;
    }
    // Still at the top (a short page): the next one.
    if (gen === this.gen && h.more && this.els.log.scrollTop < NEAR_BOTTOM_PX) {
      requestAnimationFrame(() => this.loadOlder());
    }
  }

  // Stored events → turns, as the live frames would have drawn them.
  buildTurns(events) {
    const turns = [];
    let cur = null;
    for (const ev of events) {
      if (ev.type === "user_message") {
        cur = new Turn(this, ev.content, true);
        cur.events.push(ev);
        turns.push(cur);
        continue;
      }
      if (!cur) {
        // The page starts inside an answer. Session events (connected,
        // route...) before any message belong to no answer.
        const s = ev.type === "system_event" ? parseJson(ev.content) || {} : null;
        if (s && !TURN_EVENTS.has(s.event)) continue;
        cur = new Turn(this, null, true);
        turns.push(cur);
      }
      cur.events.push(ev);
      if (ev.type === "ai_token") {
        cur.addToken(ev.content);
      } else if (ev.type === "tool_call") {
        const c = parseJson(ev.content) || {};
        cur.addToolCall(c.tool, c.arguments, c.id);
      } else if (ev.type === "tool_result") {
        const r = parseJson(ev.content) || {};
        const res = r.result;
        const isError = res !== null && typeof res === "object" && "error" in res && !("results" in res);
        cur.addToolResult(r.tool, res, r.id, isError);
      } else if (ev.type === "system_event") {
        const s = parseJson(ev.content) || {};
        if (s.event === "usage") cur.usage = s;
        else if (s.event === "turn_cancelled") cur.state = "cancelled";
        else if (s.event === "turn_failed") { cur.state = "failed"; cur.failCode = s.detail; }
      }
    }
    for (const t of turns) {
      if (t.answerEl || t.state !== "completed") {
        t.finish(t.state, { error: t.state === "failed" ? { content: failedText(t.failCode) } : null });
      }
      // Only the end of an answer on the page before: kept (hidden) to be
      // joined with it when that page is loaded.
      if (t.text === null && !t.answerEl) t.el.hidden = true;
    }
    return turns;
  }

  // Older events go above what is shown; an answer split between two pages
  // is drawn again whole.
  prependHistory(events) {
    if (events.length === 0) return;
    const built = this.buildTurns(events);
    const first = this.turns[0];
    if (first && first.history && first.text === null && built.length) {
      const last = built.pop();
      built.push(...this.buildTurns(last.events.concat(first.events)));
      this.turns.shift();
      first.el.remove();
    }
    const log = this.els.log;
    const fromBottom = log.scrollHeight - log.scrollTop;
    this.els.turns.prepend(...built.map((t) => t.el));
    this.turns.unshift(...built);
    log.scrollTop = log.scrollHeight - fromBottom;
    this.els.empty.hidden = true;
  }

  // Newer events (reconcile) go after the history shown, before anything
  // typed here.
  appendHistory(events) {
    const lastHist = this.turns.filter((t) => t.history).pop();
    let built;
    if (lastHist && events[0].type !== "user_message") {
      built = this.buildTurns(lastHist.events.concat(events));
      this.turns.splice(this.turns.indexOf(lastHist), 1);
      lastHist.el.replaceWith(...built.map((t) => t.el));
      const at = this.turns.findIndex((t) => !t.history);
      this.turns.splice(at < 0 ? this.turns.length : at, 0, ...built);
    } else {
      built = this.buildTurns(events);
      const at = this.turns.findIndex((t) => !t.history);
      if (at < 0) {
        for (const t of built) this.appendTurn(t);
      } else {
        this.turns[at].el.before(...built.map((t) => t.el));
        this.turns.splice(at, 0, ...built);
      }
    }
    this.hist.last = events[events.length - 1].seq;
    this.hist.userCount += events.filter((e) => e.type === "user_message").length;
    this.els.empty.hidden = true;
    this.scrollToBottom(false);
  }

  // ---- the outbox in sessionStorage ---------------------------------------

  outboxKey() {
    return `${OUTBOX_KEY}${this.auth.user}.${this.id}`;
  }

  saveOutbox() {
    if (this.id === null) return;
    const items = this.turns.filter((t) => t.state === "queued" || (t.state === "sent" && !t.cancelled))
      .map((t) => ({ text: t.text, sent: t.state === "sent", base: t.base }));
    try {
      if (items.length) sessionStorage.setItem(this.outboxKey(), JSON.stringify(items));
      else sessionStorage.removeItem(this.outboxKey());
    } catch (e) {
      // Storage full or refused: the page still works, a reload may lose them.
    }
  }

  restoreOutbox() {
    let items;
    try {
      items = JSON.parse(sessionStorage.getItem(this.outboxKey()) || "[]");
    } catch (e) {
      items = [];
    }
    for (const it of Array.isArray(items) ? items : []) {
      if (typeof it.text !== "string" || !it.text) continue;
      const t = new Turn(this, it.text);
      t.restored = true;
      if (it.sent && !this.inflight && typeof it.base === "number") {
        t.state = "sent";
        t.base = it.base;
        this.inflight = t;
        this.appendTurn(t);
        t.setUserNote("Sent before the reload; checking that it arrived…");
        continue;
      }
      this.appendTurn(t);
      this.showQueued(t);
    }
  }
}

function failedText(code) {
  return code ? `The answer failed (${code}).` : "The answer failed.";
}

// A new conversation's id: time first (ids sort by age), then 80 random bits.
function newSessionId() {
  const rand = crypto.getRandomValues(new Uint8Array(10));
  return `c-${Date.now().toString(36)}-${[...rand].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}

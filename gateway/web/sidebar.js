// The user's conversations (GET /api/sessions: newest first, paged by the
// next_before cursor as the list scrolls), each with its summary once
// summary-svc has written it. Titles: the first message, remembered in
// this browser when the conversation starts here or its first message is
// seen; otherwise the date.
"use strict";

const PAGE = 30;
const TITLES_KEY = "convo.titles.";
const TITLES_MAX = 300;
const TITLE_CHARS = 80;
// While a listed conversation's summary is pending, the first page is asked
// again this often, at most this many times in a row.
const SUMMARY_POLL_MS = 10000;
const SUMMARY_POLLS_MAX = 6;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function when(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const now = new Date();
  const sameDay = d.toDateString() === now.toDateString();
  return sameDay
    ? d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleDateString(undefined, { month: "short", day: "numeric", year:
      d.getFullYear() === now.getFullYear() ? undefined : "numeric" });
}

export class Sidebar {
  // els: {list, empty, error, more}; auth: Auth.
  constructor(els, auth) {
    this.els = els;
    this.auth = auth;
    this.next = null;
    this.loading = false;
    this.active = null;
    this.items = new Map(); // id → li
    this.polls = 0;
    this.pollTimer = null;
    this.gen = 0;
    new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) this.more();
    }, { root: els.list.closest("nav") }).observe(els.more);
  }

  titles() {
    try {
      return JSON.parse(localStorage.getItem(TITLES_KEY + this.auth.user) || "{}") || {};
    } catch (e) {
      return {};
    }
  }

  title(id) {
    return this.titles()[id] || null;
  }

  // Remembers a conversation's title (its first message).
  setTitle(id, text) {
    const all = this.titles();
    if (all[id]) return;
    const line = text.replace(/\s+/g, " ").trim();
    all[id] = line.length > TITLE_CHARS ? line.slice(0, TITLE_CHARS - 1) + "…" : line;
    const ids = Object.keys(all);
    for (const old of ids.slice(0, Math.max(0, ids.length - TITLES_MAX))) delete all[old];
    try {
      localStorage.setItem(TITLES_KEY + this.auth.user, JSON.stringify(all));
    } catch (e) {
      // no room: titles fall back to dates
    }
    const li = this.items.get(id);
    if (li) li.querySelector(".item-title").textContent = all[id];
  }

  clear() {
    this.gen++;
    clearTimeout(this.pollTimer);
    this.items.clear();
    this.els.list.replaceChildren();
    this.next = null;
  }

  // The first page, again (a new conversation, a summary written).
  async reload() {
    const gen = ++this.gen;
    clearTimeout(this.pollTimer);
    this.loading = true;
    try {
      const body = await this.auth.get("/api/sessions", { limit: PAGE });
      if (gen !== this.gen) return;
      this.items.clear();
      this.els.list.replaceChildren();
      this.add(body.sessions || []);
      this.next = body.next_before || null;
      this.els.error.hidden = true;
      this.schedulePoll(body.sessions || []);
    } catch (e) {
      if (gen !== this.gen) return;
      this.els.error.hidden = false;
      this.els.error.textContent = `Conversations could not be listed: ${e.message}`;
    } finally {
      if (gen === this.gen) this.loading = false;
      this.els.empty.hidden = this.items.size > 0;
    }
  }

  async more() {
    if (!this.next || this.loading) return;
    const gen = this.gen;
    this.loading = true;
    try {
      const body = await this.auth.get("/api/sessions", { limit: PAGE, before: this.next });
      if (gen !== this.gen) return;
      this.add(body.sessions || []);
      this.next = body.next_before || null;
    } catch (e) {
      if (gen !== this.gen) return;
      this.els.error.hidden = false;
      this.els.error.textContent = `More conversations could not be listed: ${e.message}`;
    } finally {
      if (gen === this.gen) this.loading = false;
    }
  }

  schedulePoll(sessions) {
    const pending = sessions.some((s) => s.summary_status === "pending"
      || (s.end_time && s.summary_status === "none"));
    if (!pending || this.polls >= SUMMARY_POLLS_MAX) {
      this.polls = 0;
      return;
    }
    this.polls++;
    this.pollTimer = setTimeout(() => this.reload(), SUMMARY_POLL_MS);
  }

  item(s) {
    const li = el("li");
    const a = el("a", "item");
    a.href = `#/s/${encodeURIComponent(s.session_id)}`;
    a.dataset.id = s.session_id;
    const title = el("span", "item-title", this.title(s.session_id) || `Conversation of ${when(s.start_time) || "—"}`);
    const n = Number(s.user_message_count) || 0;
    const sub = el("span", "item-sub",
      `${when(s.start_time)} · ${n} message${n === 1 ? "" : "s"}${s.end_time ? "" : " · open"}`);
    a.append(title, sub);
    if (s.summary_status === "done" && s.final_summary) {
      const p = el("span", "item-summary", s.final_summary);
      p.title = s.final_summary;
      a.append(p);
    } else if (s.summary_status === "pending") {
      a.append(el("span", "item-summary muted", "Summarising…"));
    }
    if (s.session_id === this.active) a.setAttribute("aria-current", "page");
    li.append(a);
    return li;
  }

  add(sessions) {
    for (const s of sessions) {
      if (typeof s.session_id !== "string" || this.items.has(s.session_id)) continue;
      const li = this.item(s);
      this.items.set(s.session_id, li);
      this.els.list.append(li);
    }
    this.els.empty.hidden = this.items.size > 0;
  }

  // A conversation started here: at the top at once, before the server
  // lists it.
  added(id, text) {
    this.setTitle(id, text);
    if (this.items.has(id)) return;
    const li = this.item({ session_id: id, start_time: new Date().toISOString(), user_message_count: 1 });
    this.items.set(id, li);
    this.els.list.prepend(li);
    this.els.empty.hidden = true;
    this.setActive(id);
  }

  setActive(id) {
    this.active = id;
    for (const [sid, li] of this.items) {
      const a = li.querySelector("a");
      if (sid === id) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }
}

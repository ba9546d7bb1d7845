// conversations — live conversations for the replica test (test_replicas.py).
//
// Runs --conversations conversations at once, each as its own user, over
// Node's `ws`. A conversation is a row of sessions of --turns turns; each
// session ends with a normal close (the gateway then ends it in store-svc
// and asks for its summary), and the next one starts with a new id. A
// conversation starts on gateway i mod N of --gateways.
//
// It behaves as a client that survives failures should: a turn that ends
// in an error frame is sent again; a connection that closes unasked (its
// gateway died: 1006; restarting: 1001; try later: 1013) is opened again on
// the next gateway of the list, with the same session id, and the message
// whose answer was cut is sent again once the `session` frame arrives.
//
// What it saw is written to --out (JSON) when it ends: per session, every
// connection (gateway, the session frame, how it closed) with the events
// shown or sent on it in order — [type, content] with the store's type
// names; tool events by their call id — and every turn attempt with its
// outcome and how many of its answer's events were shown. One JSON line per
// turn attempt, connection, failed connection attempt and session end goes
// to stdout as it happens, for the test to follow progress.
//
// "stop" on stdin (or stdin closing): every conversation finishes the
// session it is in, closes it and starts no other; then the record is
// written and the process exits 0.
//
//   node conversations.mjs --gateways 127.0.0.1:8000,127.0.0.2:8000 --token-file F
//        [--conversations 50] [--turns 4] [--words 12] [--delay-ms 20] [--think-ms 200]
//        [--tool-every 3] [--user-prefix res-] [--turn-timeout-ms 30000]
//        [--max-attempts 10] --out FILE
import fs from "node:fs";
import readline from "node:readline";
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const WebSocket = require("ws");

function parseArgs(argv) {
  const o = { gateways: [], conversations: 50, turns: 4, words: 12, delayMs: 20, thinkMs: 200,
              toolEvery: 3, userPrefix: "res-", tokenFile: "", turnTimeoutMs: 30000,
              maxAttempts: 10, out: "" };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => argv[++i];
    if (k === "--gateways") o.gateways = v().split(",");
    else if (k === "--conversations") o.conversations = +v();
    else if (k === "--turns") o.turns = +v();
    else if (k === "--words") o.words = +v();
    else if (k === "--delay-ms") o.delayMs = +v();
    else if (k === "--think-ms") o.thinkMs = +v();
    else if (k === "--tool-every") o.toolEvery = +v();
    else if (k === "--user-prefix") o.userPrefix = v();
    else if (k === "--token-file") o.tokenFile = v();
    else if (k === "--turn-timeout-ms") o.turnTimeoutMs = +v();
    else if (k === "--max-attempts") o.maxAttempts = +v();
    else if (k === "--out") o.out = v();
    else { console.error(`conversations: unknown option ${k}`); process.exit(2); }
  }
  if (o.gateways.length === 0 || !o.out || !o.tokenFile) {
    console.error("conversations: --gateways, --token-file and --out are required");
    process.exit(2);
  }
  return o;
}

const opts = parseArgs(process.argv);
// Line i: a token of user <prefix><i>.
const tokens = fs.readFileSync(opts.tokenFile, "utf8").split("\n").filter((l) => l.trim());
if (tokens.length < opts.conversations) {
  console.error(`conversations: ${opts.tokenFile} has ${tokens.length} tokens, ` +
                `${opts.conversations} needed`);
  process.exit(2);
}
const run = `${process.pid.toString(36)}${Date.now().toString(36)}`;
const expected = Array.from({ length: opts.words }, (_, i) => `w${i + 1}`).join(" ");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const say = (o) => process.stdout.write(JSON.stringify(o) + "\n");
// Codes after which the session cannot go on: reconnecting would not help.
const FATAL_CLOSES = new Set([1003, 1007, 1008, 1009, 4400, 4403, 4409]);
const RECONNECT_FIRST_MS = 100;
const RECONNECT_MAX_MS = 1000;
const RESEND_PAUSE_MS = 100;

let stopping = false;
const input = readline.createInterface({ input: process.stdin });
input.on("line", (l) => { if (l.trim() === "stop") stopping = true; });
input.on("close", () => { stopping = true; });

class Conversation {
  constructor(i) {
    this.i = i;
    this.user = `${opts.userPrefix}${i}`;
    this.token = tokens[i];
    this.gw = i % opts.gateways.length;
    this.sessions = [];
    this.conn = null; // the open connection of the current session, announced
  }

  message(sid, k, t) {
    const tool = opts.toolEvery > 0 && t % opts.toolEvery === 0
      ? ` [[tool1:lookup_contextual_data {"session_id":"${sid}"}]]` : "";
    return `session ${k} turn ${t}:${tool} [[words:${opts.words}]] [[delay:${opts.delayMs}]]`;
  }

  async run() {
    for (let k = 0; !stopping; k++) {
      if (!(await this.session(k))) return;
    }
  }

  // One session; false when it could not go on (the conversation stops).
  async session(k) {
    const sid = `${this.user}-s${k}-${run}`;
    const rec = { id: sid, conns: [], turns: [], connect_failures: 0, closed: false,
                  gave_up: null };
    this.sessions.push(rec);
    for (let t = 1; t <= opts.turns; t++) {
      const message = this.message(sid, k, t);
      for (let attempt = 1; ; attempt++) {
        if (attempt > opts.maxAttempts) {
          rec.gave_up = `turn ${t}: ${opts.maxAttempts} attempts failed`;
          say({ ev: "gave_up", conv: this.i, session: sid, why: rec.gave_up });
          return false;
        }
        const conn = await this.connected(rec);
        if (conn === null)
          return false;
        const res = await this.turn(conn, message);
        rec.turns.push({ turn: t, attempt, outcome: res.outcome, whole: res.text === expected,
                         shown: res.shown, conn: conn.index, gateway: conn.gateway });
        say({ ev: "turn", conv: this.i, session: sid, turn: t, attempt, ok: res.outcome === "done",
              outcome: res.outcome, shown: res.shown, gateway: conn.gateway });
        if (res.outcome === "done")
          break;
        await sleep(RESEND_PAUSE_MS);
      }
      if (t < opts.turns)
        await sleep(opts.thinkMs * (0.5 + Math.random()));
    }
    await this.close(rec);
    return true;
  }

  // The session's open, announced connection; opens one (on the next
  // gateway after a failure) when there is none. null: a fatal refusal.
  async connected(rec) {
    for (let failures = 0; ; failures++) {
      if (this.conn !== null && this.conn.ws.readyState === WebSocket.OPEN)
        return this.conn;
      if (failures > 0)
        await sleep(Math.min(RECONNECT_MAX_MS, RECONNECT_FIRST_MS * 2 ** (failures - 1)));
      const conn = await this.open(rec);
      if (conn.announced)
        return (this.conn = conn);
      rec.connect_failures++;
      say({ ev: "connect_failed", conv: this.i, session: rec.id, gateway: conn.gateway,
            code: conn.closed?.code, reason: conn.closed?.reason, error: conn.error });
      if (FATAL_CLOSES.has(conn.closed?.code)) {
        rec.gave_up = `connection refused for good: ${conn.closed.code} ${conn.closed.reason}`;
        say({ ev: "gave_up", conv: this.i, session: rec.id, why: rec.gave_up });
        return null;
      }
      this.gw = (this.gw + 1) % opts.gateways.length;
    }
  }

  // Opens a connection and waits for its session frame (or its end).
  open(rec) {
    const gateway = opts.gateways[this.gw];
    const conn = { index: rec.conns.length, gateway, session: null, closed: null,
                   by_us: false, seen: [], announced: false, pending: null, ws: null };
    rec.conns.push(conn);
    const url = `ws://${gateway}/ws/session/${rec.id}?access_token=${encodeURIComponent(this.token)}`;
    return new Promise((resolve) => {
      const ws = new WebSocket(url);
      conn.ws = ws;
      ws.on("message", (data) => this.onFrame(conn, JSON.parse(data), resolve));
      ws.on("error", (e) => { conn.error = e.message; });
      ws.on("close", (code, reason) => {
        conn.closed = { code, reason: reason.toString() };
        say({ ev: "closed", conv: this.i, session: rec.id, gateway, code, by_us: conn.by_us });
        if (!conn.by_us && conn.announced)
          this.gw = (this.gw + 1) % opts.gateways.length; // its gateway is in trouble
        if (this.conn === conn)
          this.conn = null;
        if (conn.pending !== null)
          conn.pending.end("cut");
        resolve(conn);
      });
    });
  }

  onFrame(conn, f, opened) {
    if (f.type === "session") {
      conn.session = { resumed: f.resumed, history_loaded: f.history_loaded,
                       message_count: f.message_count };
      conn.announced = true;
      say({ ev: "connected", conv: this.i, session: f.session_id, gateway: conn.gateway,
            ...conn.session });
      opened(conn);
      return;
    }
    const p = conn.pending;
    if (f.type === "token") {
      conn.seen.push(["ai_token", f.content]);
      if (p !== null) { p.text += f.content; p.shown++; }
    } else if (f.type === "tool_call" || f.type === "tool_result") {
      conn.seen.push([f.type, f.id]);
      if (p !== null) p.shown++;
    } else if (f.type === "done" && p !== null) {
      p.end(f.status === "completed" ? "done" : `done:${f.status}`);
    } else if (f.type === "error" && p !== null) {
      p.end(`error:${f.code}`);
    }
  }

  // Sends one message and waits for its answer's end: "done",
  // "error:<code>" or "cut" (the connection closed first, or the answer
  // took longer than --turn-timeout-ms).
  turn(conn, message) {
    return new Promise((resolve) => {
      const p = { text: "", shown: 0 };
      const timer = setTimeout(() => { conn.stuck = true; conn.ws.terminate(); },
                               opts.turnTimeoutMs);
      p.end = (outcome) => {
        clearTimeout(timer);
        conn.pending = null;
        resolve({ outcome, text: p.text, shown: p.shown });
      };
      conn.pending = p;
      conn.seen.push(["user_message", message]);
      conn.ws.send(JSON.stringify({ message }));
    });
  }

  // Ends the session with a normal close, on a connection opened again if
  // the last one was lost: the gateway ends a session in the store only
  // when its client leaves.
  async close(rec) {
    const conn = await this.connected(rec);
    this.conn = null;
    if (conn === null)
      return;
    conn.by_us = true;
    return new Promise((resolve) => {
      conn.ws.once("close", () => {
        rec.closed = true;
        say({ ev: "session_end", conv: this.i, session: rec.id, gateway: conn.gateway });
        resolve();
      });
      conn.ws.close(1000);
    });
  }

  record() {
    return { conv: this.i, user: this.user, sessions: this.sessions.map((s) => ({
      ...s, conns: s.conns.map(({ ws, pending, ...c }) => c) })) };
  }
}

const convs = Array.from({ length: opts.conversations }, (_, i) => new Conversation(i));
await Promise.all(convs.map((c) => c.run()));
fs.writeFileSync(opts.out, JSON.stringify({ options: opts, run,
                                            conversations: convs.map((c) => c.record()) }));
say({ ev: "exit" });
process.exit(0);

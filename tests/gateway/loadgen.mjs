// loadgen — the project's load generator for the gateway (not a test).
//
// Opens N concurrent WebSocket sessions, runs T turns each, checks that every
// token of every answer arrived in order ("w1 w2 ... wW" from the offline
// model's [[words:W]] rule), and reports time to first token p50/p95/p99,
// tokens per second and errors. With --model it first streams the same
// requests straight from the offline model (SSE over HTTP), so the time the
// whole path (gateway, router-svc, llm-svc, store-svc) adds to the first
// token is measured side by side in one run.
//
// --stagger-ms spreads the sessions' starts evenly over that many ms (real
// users do not all press enter in the same millisecond); 0 starts them all
// at once, the worst case for the first token.
//
// --think-ms is a user's pause between an answer and the next message (each
// pause drawn evenly from 0.5x to 1.5x it, so sessions do not fall into
// step). 0 sends the next message the moment an answer ends: a closed loop
// that keeps every process busy, so the first token then measures queueing
// at saturation rather than the path's own cost.
//
// The first --warmup turns of each session (default 1) are run and checked
// but left out of the time-to-first-token figures: they include connecting
// every process to its peers.
//
// Besides the whole run, each path is also measured over its steady window:
// from the moment the last session began its first measured turn to the
// moment the first session finished, when all N sessions are active at once.
// Its tokens/s counts the tokens that arrived inside the window, and its
// first-token figures the turns that started inside it; the ramp up and down
// at either end (lighter load) is left out.
//
// Users: session i is user <--user-prefix><i mod users> (--users, default
// one per session). With --access-token-file (one token a line) session i
// sends line i mod n as ?access_token=, and line k must be a token of user
// <--user-prefix><k>: the same users as without tokens, so a run with
// --auth jwt compares with one with --auth none.
//
// The C generator (tests/gateway/loadgen/) does the same with less CPU and
// is what bench_gateway.py runs by default; this one stays for comparison.
//
//   node loadgen.mjs --gateway 127.0.0.1:8000 [--model 127.0.0.1:8089]
//        [--sessions 100] [--turns 5] [--warmup 1] [--words 50] [--delay-ms 0]
//        [--stagger-ms 0] [--think-ms 0] [--user-prefix load-] [--users N]
//        [--access-token-file FILE] [--json]
import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const WebSocket = require("ws");

function parseArgs(argv) {
  const o = { gateway: "127.0.0.1:8000", model: "", sessions: 100, turns: 5, warmup: 1,
              words: 50, delayMs: 0, staggerMs: 0, thinkMs: 0, json: false, timeoutMs: 120000,
              userPrefix: "load-", users: 0, tokenFile: "" };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => argv[++i];
    if (k === "--gateway") o.gateway = v();
    else if (k === "--model") o.model = v();
    else if (k === "--sessions") o.sessions = +v();
    else if (k === "--turns") o.turns = +v();
    else if (k === "--warmup") o.warmup = +v();
    else if (k === "--words") o.words = +v();
    else if (k === "--delay-ms") o.delayMs = +v();
    else if (k === "--stagger-ms") o.staggerMs = +v();
    else if (k === "--think-ms") o.thinkMs = +v();
    else if (k === "--timeout-ms") o.timeoutMs = +v();
    else if (k === "--user-prefix") o.userPrefix = v();
    else if (k === "--users") o.users = +v();
    else if (k === "--access-token-file") o.tokenFile = v();
    else if (k === "--json") o.json = true;
    else { console.error(`loadgen: unknown option ${k}`); process.exit(2); }
  }
  return o;
}

const opts = parseArgs(process.argv);
const tokens = opts.tokenFile
  ? fs.readFileSync(opts.tokenFile, "utf8").split("\n").map((l) => l.trim()).filter((l) => l)
  : [];
if (opts.tokenFile && tokens.length === 0) {
  console.error(`loadgen: --access-token-file ${opts.tokenFile}: no token in it`);
  process.exit(2);
}
const users = tokens.length || opts.users || opts.sessions;
const message = `[[words:${opts.words}]] [[delay:${opts.delayMs}]]`;
const expected = Array.from({ length: opts.words }, (_, i) => `w${i + 1}`).join(" ");

const HISTORY_MESSAGES = 50;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const startDelay = (i) => (opts.staggerMs * i) / opts.sessions;
const thinkTime = () => opts.thinkMs * (0.5 + Math.random());

function pct(sorted, p) {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function newStats() {
  return { ttft: [], tokens: 0, errors: 0, messages: new Set(),
           turns: [], tokenTimes: [], spans: [] };
}

// A measured turn's first token came `ms` after the turn started at t0.
function firstToken(stats, t0, now) {
  stats.ttft.push(now - t0);
  stats.turns.push({ t0, ms: now - t0 });
}

function gotToken(stats, now) {
  stats.tokens++;
  stats.tokenTimes.push(now);
}

function steady(stats) {
  if (stats.spans.length < opts.sessions) return null;
  const from = Math.max(...stats.spans.map((s) => s.from));
  const to = Math.min(...stats.spans.map((s) => s.to));
  if (!(to > from)) return null;
  const tokens = stats.tokenTimes.filter((t) => t >= from && t <= to).length;
  const ttft = stats.turns.filter((x) => x.t0 >= from && x.t0 <= to).map((x) => x.ms)
    .sort((a, b) => a - b);
  return { seconds: (to - from) / 1000, answers: ttft.length, tokens_per_s: tokens / ((to - from) / 1000),
           ttft_p50_ms: pct(ttft, 50), ttft_p95_ms: pct(ttft, 95), ttft_p99_ms: pct(ttft, 99) };
}

function summary(name, stats, seconds) {
  const s = [...stats.ttft].sort((a, b) => a - b);
  return { path: name, answers: opts.sessions * opts.turns, errors: stats.errors,
           ttft_p50_ms: pct(s, 50), ttft_p95_ms: pct(s, 95), ttft_p99_ms: pct(s, 99),
           tokens: stats.tokens, seconds, tokens_per_s: stats.tokens / seconds,
           steady: steady(stats) };
}

// One session: T turns over one WebSocket, one at a time.
function runSession(id, i, stats) {
  return new Promise((resolve) => {
    const user = encodeURIComponent(`${opts.userPrefix}${i % users}`);
    const token = tokens.length ? `&access_token=${encodeURIComponent(tokens[i % tokens.length])}` : "";
    const ws = new WebSocket(`ws://${opts.gateway}/ws/session/${id}?user_id=${user}${token}`);
    let turn = 0, text = "", t0 = 0, first = true;
    const span = { from: Infinity, to: 0 };
    const timer = setTimeout(() => { stats.errors++; ws.terminate(); }, opts.timeoutMs);
    const send = () => {
      turn++; text = ""; first = true; t0 = performance.now();
      if (turn === opts.warmup + 1) span.from = t0;
      ws.send(JSON.stringify({ message }));
    };
    const next = () => {
      if (turn === opts.turns) {
        span.to = performance.now();
        stats.spans.push(span);
        ws.close(1000);
        return;
      }
      if (turn > 0 && opts.thinkMs > 0) setTimeout(send, thinkTime());
      else send();
    };
    ws.on("message", (data) => {
      const f = JSON.parse(data);
      if (f.type === "session") next();
      else if (f.type === "token") {
        const now = performance.now();
        if (first && turn > opts.warmup) firstToken(stats, t0, now);
        first = false;
        text += f.content;
        gotToken(stats, now);
      } else if (f.type === "done") {
        if (text !== expected) stats.errors++;
        next();
      } else if (f.type === "error") {
        stats.errors++;
        stats.messages.add(f.code);
        next();
      }
    });
    ws.on("error", (e) => { stats.errors++; stats.messages.add(e.message); });
    ws.on("close", () => { clearTimeout(timer); resolve(); });
  });
}

// The same turn straight from the offline model (OpenAI streaming format),
// carrying the conversation so far as the seed's backend did (and as
// llm-svc does, up to the gateway's --history-messages, default 50), so
// both paths ask the model the same amount.
function modelTurn(stats, agent, measured, history) {
  return new Promise((resolve) => {
    const [host, port] = opts.model.split(":");
    history.push({ role: "user", content: message });
    const body = JSON.stringify({ model: "offline-model", stream: true,
                                  messages: history.slice(-(HISTORY_MESSAGES + 1)) });
    const t0 = performance.now();
    let first = true, text = "", buf = "";
    const req = http.request({ host, port, path: "/v1/chat/completions", method: "POST", agent,
                               headers: { "content-type": "application/json",
                                          "content-length": Buffer.byteLength(body) } }, (res) => {
      res.setEncoding("utf8");
      res.on("data", (chunk) => {
        buf += chunk;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const ev = buf.slice(0, i); buf = buf.slice(i + 2);
          const data = ev.split("\n").filter((l) => l.startsWith("data:"))
                         .map((l) => l.slice(5).trim()).join("\n");
          if (!data || data === "[DONE]") continue;
          const content = JSON.parse(data).choices?.[0]?.delta?.content;
          if (content) {
            const now = performance.now();
            if (first && measured) firstToken(stats, t0, now);
            first = false;
            text += content;
            gotToken(stats, now);
          }
        }
      });
      res.on("end", () => {
        if (text !== expected) stats.errors++;
        history.push({ role: "assistant", content: text });
        resolve();
      });
    });
    req.on("error", (e) => { stats.errors++; stats.messages.add(e.message); resolve(); });
    req.end(body);
  });
}

async function runModel() {
  const stats = newStats();
  const agent = new http.Agent({ keepAlive: true, maxSockets: opts.sessions });
  const t0 = performance.now();
  await Promise.all(Array.from({ length: opts.sessions }, async (_, i) => {
    await sleep(startDelay(i));
    const history = [];
    const span = { from: Infinity, to: 0 };
    for (let t = 0; t < opts.turns; t++) {
      if (t > 0 && opts.thinkMs > 0) await sleep(thinkTime());
      if (t === opts.warmup) span.from = performance.now();
      await modelTurn(stats, agent, t >= opts.warmup, history);
    }
    span.to = performance.now();
    stats.spans.push(span);
  }));
  agent.destroy();
  return [summary("offline model direct", stats, (performance.now() - t0) / 1000), stats];
}

async function runGateway() {
  const stats = newStats();
  const run = `load-${process.pid}-${Date.now()}`;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: opts.sessions },
                               (_, i) => sleep(startDelay(i)).then(() => runSession(`${run}-${i}`, i, stats))));
  return [summary("through the gateway", stats, (performance.now() - t0) / 1000), stats];
}

const results = [];
const messages = new Set();
if (opts.model) {
  const [r, s] = await runModel();
  results.push(r); s.messages.forEach((m) => messages.add(m));
}
const [g, gs] = await runGateway();
results.push(g); gs.messages.forEach((m) => messages.add(m));

const row = (name, answers, errors, r) =>
  `${name.padEnd(26)}${String(answers).padStart(7)}${String(errors).padStart(8)}` +
  `  ${r.ttft_p50_ms.toFixed(2).padStart(7)}  ${r.ttft_p95_ms.toFixed(2).padStart(7)}` +
  `  ${r.ttft_p99_ms.toFixed(2).padStart(7)}  ${r.tokens_per_s.toFixed(0).padStart(9)}`;
const added = (a, b) => `p50 ${(b.ttft_p50_ms - a.ttft_p50_ms).toFixed(2)} ms, ` +
                        `p99 ${(b.ttft_p99_ms - a.ttft_p99_ms).toFixed(2)} ms`;

if (opts.json) {
  console.log(JSON.stringify({ options: opts, results, errors: [...messages] }));
} else {
  console.log(`sessions ${opts.sessions}, turns ${opts.turns}, ${opts.words} tokens per answer, ` +
              `${opts.delayMs} ms per token, starts spread over ${opts.staggerMs} ms, ` +
              `${opts.thinkMs} ms between answer and next message`);
  console.log("path                      answers  errors  ttft p50   p95      p99      tokens/s");
  for (const r of results) console.log(row(r.path, r.answers, r.errors, r));
  if (results.length === 2) console.log(`added time to first token: ${added(results[0], results[1])}`);
  if (results.every((r) => r.steady)) {
    console.log(`steady window (all ${opts.sessions} sessions active):`);
    for (const r of results)
      console.log(row(`  ${r.path}`, r.steady.answers, "", r.steady) +
                  `  (${r.steady.seconds.toFixed(1)} s)`);
    if (results.length === 2)
      console.log(`added time to first token, steady: ${added(results[0].steady, results[1].steady)}`);
  }
  if (messages.size) console.log("error kinds:", [...messages].join(", "));
}
process.exit(results.some((r) => r.errors > 0) ? 1 : 0);

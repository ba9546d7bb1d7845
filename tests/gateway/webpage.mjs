// Drives the gateway's web page in Debian's Chromium (playwright-core), one
// scenario per run, for tests/gateway/test_webpage.py:
//
//   node webpage.mjs SCENARIO --url http://HOST:PORT/app/ --out DIR [--key value]...
//
// Prints JSON lines: {"ask": step} when the test must act (kill the
// gateway, start it again...; answered with a line on stdin), then
// {"done": facts} or {"error": text} (exit 1). Every scenario fails on a
// page error, a dialog (alert/confirm/prompt), or a console error or
// warning it does not expect. Chromium runs headless with a fresh profile
// that is removed afterwards.
import { createRequire } from "node:module";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const WAIT = 30000;
const [scenario, ...rest] = process.argv.slice(2);
const args = {};
for (let i = 0; i < rest.length; i += 2) args[rest[i].replace(/^--/, "")] = rest[i + 1];
const base = args.url;
const origin = new URL(base).origin;

const stdin = readline.createInterface({ input: process.stdin });
const answers = stdin[Symbol.asyncIterator]();
function say(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}
// Asks the test to act (extra: what it needs to know); resolves when it
// says it has.
async function ask(step, extra = {}) {
  say({ ask: step, ...extra });
  const { value, done } = await answers.next();
  if (done || value.trim() !== "ok") throw new Error(`the test did not do ${step}: ${value}`);
}

function check(cond, message) {
  if (!cond) throw new Error(message);
}

// ---- helpers ----------------------------------------------------------------

async function signIn(page, user) {
  await page.goto(base);
  await page.waitForSelector("#signin-user", { state: "visible", timeout: WAIT });
  await page.fill("#signin-user", user);
  await page.click("#signin-submit");
  await page.waitForSelector("#app:not([hidden])", { timeout: WAIT });
}

async function send(page, text) {
  await page.fill("#input", text);
  await page.press("#input", "Enter");
}

// Waits until n answers have ended (any final state).
async function answersEnded(page, n) {
  await page.waitForFunction((n) => document.querySelectorAll(
    ".msg.assistant[data-state]").length >= n, n, { timeout: WAIT });
}

async function connected(page) {
  await page.waitForSelector("#conn[data-state=open]", { timeout: WAIT });
}

function answerTexts(page) {
  return page.$$eval(".turn:not([hidden])", (turns) => turns.map((t) => ({
    user: t.querySelector(".msg.user .bubble")?.textContent ?? null,
    answer: [...t.querySelectorAll(".answer-body .md")].map((m) => m.textContent.trim()).join(""),
    state: t.querySelector(".msg.assistant")?.dataset.state ?? null,
  })));
}

async function shot(page, name) {
  const file = path.join(args.out, name);
  await page.screenshot({ path: file, fullPage: false, animations: "disabled" });
  return file;
}

// Elements wider than the screen: right edge past the viewport, except
// inside boxes that scroll on their own (code, tables).
function overflowing(page) {
  return page.evaluate(() => {
    const w = window.innerWidth;
    const bad = [];
    for (const e of document.querySelectorAll("body *")) {
      if (e.closest("pre, .table-wrap")) continue;
      if (!e.checkVisibility({ visibilityProperty: true, opacityProperty: false })) continue;
      const r = e.getBoundingClientRect();
      if (r.width === 0 || r.height === 0) continue;
      if (r.right > w + 0.5) bad.push(`${e.tagName.toLowerCase()}.${e.className} right=${Math.round(r.right)}`);
    }
    return { bad, scrollWidth: document.documentElement.scrollWidth, width: w };
  });
}

// ---- scenarios -----------------------------------------------------------------

const scenarios = {
  // The page loads cleanly: no console message, its pattern attributes
  // compile as Chromium compiles them (the v flag), the vendor scripts
  // load, and the Content-Security-Policy's Trusted Types are enforced.
  async load(page) {
    await page.goto(base);
    await page.waitForSelector("#signin-user", { state: "visible", timeout: WAIT });
    const facts = await page.evaluate(() => {
      const patterns = [...document.querySelectorAll("[pattern]")].map((e) => e.getAttribute("pattern"));
      const compiled = patterns.map((p) => {
        try {
          new RegExp(`^(?:${p})$`, "v");
          return true;
        } catch (e) {
          return false;
        }
      });
      const input = document.getElementById("signin-user");
      input.value = "bad id!";
      const badValid = input.checkValidity();
      input.value = "good_id-1.x";
      const goodValid = input.checkValidity();
      input.value = "";
      let innerHtml;
      try {
        document.getElementById("boot").innerHTML = "<b>x</b>";
        innerHtml = "assigned";
      } catch (e) {
        innerHtml = e.name;
      }
      return {
        patterns, compiled, badValid, goodValid, innerHtml,
        vendor: typeof window.DOMPurify?.sanitize === "function" && typeof window.marked?.Marked === "function",
      };
    });
    check(facts.patterns.length > 0 && facts.compiled.every(Boolean), `a pattern does not compile: ${facts.patterns}`);
    check(!facts.badValid && facts.goodValid, "the user field's pattern does not check ids");
    check(facts.vendor, "marked and DOMPurify did not load from /app/vendor/");
    check(facts.innerHtml === "TypeError", `Trusted Types not enforced: innerHTML ${facts.innerHtml}`);
    // The Trusted Types refusal above is the one console error expected.
    return facts;
  },

  // dev: a typed name, a token from POST /api/dev/token kept in this tab
  // only; the conversation works; the token is in no URL the page shows.
  async signin_dev(page, ctx) {
    await signIn(page, args.user);
    const stored = await page.evaluate(() => ({
      session: sessionStorage.getItem("convo.auth"),
      local: JSON.stringify(localStorage),
      url: location.href,
      who: document.getElementById("whoami").textContent,
    }));
    const auth = JSON.parse(stored.session);
    check(auth.mode === "dev" && auth.user === args.user && auth.token.split(".").length === 3,
      "no dev token in sessionStorage");
    check(!stored.local.includes(auth.token), "the token is in localStorage");
    check(stored.who === args.user, "not shown as signed in");
    await send(page, "hello from dev mode");
    await answersEnded(page, 1);
    const url = page.url();
    check(!url.includes(auth.token) && !url.includes("access_token"), `the token is in the URL ${url}`);
    const texts = await answerTexts(page);
    check(texts[0].answer.includes("hello from dev mode"), "no answer");
    // Another tab has no sign-in (sessionStorage is per tab).
    const other = await ctx.newPage();
    await other.goto(base);
    await other.waitForSelector("#signin-user", { state: "visible", timeout: WAIT });
    await other.close();
    // Sign out: the token is gone.
    await page.click("#sign-out");
    await page.waitForSelector("#signin-user", { state: "visible", timeout: WAIT });
    check(await page.evaluate(() => sessionStorage.getItem("convo.auth")) === null, "signed out but kept");
    return { session: url.split("#/s/")[1], texts, token: auth.token };
  },

  // jwt: bad tokens are refused with a reason; a good pasted token signs in.
  async signin_jwt(page) {
    await page.goto(base);
    await page.waitForSelector("#signin-token", { state: "visible", timeout: WAIT });
    check(await page.isHidden("#signin-user-row"), "jwt mode shows a user field");
    const errors = {};
    for (const [name, token] of [["garbage", "not-a-token"], ["expired", args.expired],
      ["forged", args.forged]]) {
      await page.fill("#signin-token", token);
      await page.click("#signin-submit");
      await page.waitForSelector("#signin-error:not([hidden])", { timeout: WAIT });
      errors[name] = await page.textContent("#signin-error");
      check(await page.isHidden("#app"), `${name} token signed in`);
    }
    check(/not a JWT/.test(errors.garbage), `garbage: ${errors.garbage}`);
    check(/expired/.test(errors.expired), `expired: ${errors.expired}`);
    check(/signature/.test(errors.forged), `forged: ${errors.forged}`);
    await page.fill("#signin-token", args.token);
    await page.click("#signin-submit");
    await page.waitForSelector("#app:not([hidden])", { timeout: WAIT });
    check(await page.textContent("#whoami") === args.user, "not signed in as the token's sub");
    await send(page, "hello from jwt mode");
    await answersEnded(page, 1);
    const url = page.url();
    check(!url.includes(args.token), "the token is in the URL");
    return { errors, session: url.split("#/s/")[1] };
  },

  // jwt: back from a login redirect with #access_token=...: taken, and gone
  // from the address bar and from the history entry at once.
  async signin_redirect(page) {
    await page.goto(`${base}#access_token=${args.token}&token_type=bearer&expires_in=3600`);
    await page.waitForSelector("#app:not([hidden])", { timeout: WAIT });
    const seen = await page.evaluate(() => ({ href: location.href, hash: location.hash }));
    check(!seen.href.includes(args.token) && !seen.href.includes("access_token"),
      `the token stays in the URL: ${seen.href}`);
    check(await page.textContent("#whoami") === args.user, "not signed in from the redirect");
    await send(page, "hello after a redirect");
    await answersEnded(page, 1);
    // The history entry was replaced: back leaves the page rather than
    // showing the token again.
    check(!page.url().includes(args.token), "the token came back");
    return seen;
  },

  // none: the user field of the seed; REST and WebSocket with ?user_id=.
  async signin_none(page) {
    await page.goto(base);
    await page.waitForSelector("#signin-user", { state: "visible", timeout: WAIT });
    check((await page.textContent("#signin-user-label")) === "User", "no user field");
    await page.fill("#signin-user", args.user);
    await page.click("#signin-submit");
    await page.waitForSelector("#app:not([hidden])", { timeout: WAIT });
    await send(page, "What is gRPC?");
    await answersEnded(page, 1);
    await page.waitForSelector(`#sessions a[data-id]`, { timeout: WAIT });
    return { session: page.url().split("#/s/")[1], texts: await answerTexts(page) };
  },

  // Tool cards, Markdown, code copy, links, usage, the keyboard.
  async conversation(page, ctx) {
    await ctx.grantPermissions(["clipboard-read", "clipboard-write"], { origin });
    await signIn(page, args.user);
    await page.focus("#input");
    await page.keyboard.type("line one");
    await page.keyboard.press("Shift+Enter");
    await page.keyboard.type("line two");
    check(await page.inputValue("#input") === "line one\nline two", "Shift+Enter did not add a line");
    check(await page.$$eval(".turn", (t) => t.length) === 0, "Shift+Enter sent the message");
    await page.fill("#input", "");
    await send(page, "What is PostgreSQL?");
    await answersEnded(page, 1);
    const card = await page.$eval(".tool-card", (d) => ({
      title: d.querySelector(".tool-title").textContent,
      note: d.querySelector(".tool-note").textContent,
      open: d.open,
      state: d.dataset.state,
    }));
    check(card.title === "Searched the knowledge base for “PostgreSQL”", `card title: ${card.title}`);
    check(!card.open && card.state === "done" && /passage/.test(card.note), `card: ${JSON.stringify(card)}`);
    await page.click(".tool-card summary");
    const json = await page.$$eval(".tool-card pre", (p) => p.map((x) => x.textContent));
    check(json[0].includes('\n  "topic": "PostgreSQL"'), `arguments not pretty JSON: ${json[0]}`);
    check(json[1].includes('"results": ['), "no result JSON");
    const usage = await page.textContent(".msg.assistant .usage");
    check(/^\d+ tokens \(\d+ in, \d+ out\)$/.test(usage), `usage: ${usage}`);

    const md = "ok\n# Big heading\n\n## Small heading\n\n- one\n- two\n\n1. first\n2. second\n\n"
      + "```python\nprint('hi')\n```\n\n[a link](https://example.com/x) and [bad](javascript:alert(1)) "
      + "and `inline`\n\n| a | b |\n|---|---|\n| 1 | 2 |";
    await send(page, md);
    await answersEnded(page, 2);
    const last = ".turn:last-child .msg.assistant";
    const facts = await page.$eval(last, (a) => ({
      h1: a.querySelector("h1")?.textContent,
      h2: a.querySelector("h2")?.textContent,
      ul: a.querySelectorAll("ul > li").length,
      ol: a.querySelectorAll("ol > li").length,
      lang: a.querySelector(".codeblock-head span")?.textContent,
      code: a.querySelector(".codeblock pre")?.textContent,
      links: [...a.querySelectorAll(".md a")].map((l) => ({
        text: l.textContent, href: l.getAttribute("href"), target: l.target, rel: l.rel,
      })),
      inline: a.querySelector("p code")?.textContent,
      table: a.querySelectorAll(".table-wrap table td").length,
    }));
    check(facts.h1 === "Big heading" && facts.h2 === "Small heading", `headings: ${JSON.stringify(facts)}`);
    check(facts.ul === 2 && facts.ol === 2, `lists: ${JSON.stringify(facts)}`);
    check(facts.lang === "python" && facts.code.trim() === "print('hi')", `code: ${JSON.stringify(facts)}`);
    const good = facts.links.find((l) => l.text === "a link");
    check(good && good.href === "https://example.com/x" && good.target === "_blank"
      && good.rel === "noopener noreferrer", `link: ${JSON.stringify(facts.links)}`);
    const bad = facts.links.find((l) => l.text === "bad");
    check(bad && bad.href === null, `javascript: link kept: ${JSON.stringify(bad)}`);
    check(facts.inline === "inline" && facts.table === 2, `inline code / table: ${JSON.stringify(facts)}`);
    await page.click(`${last} .codeblock button.copy`);
    const copied = await page.evaluate(() => navigator.clipboard.readText());
    check(copied.trim() === "print('hi')", `copied ${copied}`);
    check(await page.textContent(`${last} .codeblock button.copy`) === "Copied", "no Copied feedback");
    await shot(page, "webpage-markdown-1280.png");
    return { card, usage, facts };
  },

  // Messages typed while an answer streams wait in order after it; one
  // is removed before it leaves; Esc stops the first answer, the Stop
  // button the second; every answer in its own bubble; the stream is
  // announced politely and marked busy while it runs.
  async queue(page) {
    await signIn(page, args.user);
    const a = "[[delay:40]] [[words:300]] alpha";
    const b = "[[delay:40]] [[words:300]] bravo";
    await send(page, a);
    await page.waitForFunction(() => (document.querySelector(".md")?.textContent || "").includes("w5"),
      null, { timeout: WAIT });
    check(await page.getAttribute("#log", "aria-live") === "polite", "the log is not aria-live polite");
    check(await page.getAttribute(".msg.assistant", "aria-busy") === "true", "the stream is not aria-busy");
    await send(page, b);
    await send(page, "charlie");
    await send(page, "delta");
    const order = await page.evaluate(() => {
      const users = [...document.querySelectorAll(".msg.user")];
      const answer = document.querySelector(".msg.assistant");
      return {
        texts: users.map((u) => u.querySelector(".bubble").textContent),
        notes: users.map((u) => u.querySelector(".meta").textContent),
        // Every queued message comes after the answer in progress.
        after: users.slice(1).every((u) => answer.compareDocumentPosition(u) & Node.DOCUMENT_POSITION_FOLLOWING),
      };
    });
    check(order.texts.join("|") === [a, b, "charlie", "delta"].join("|"), `order: ${order.texts}`);
    check(order.after, "a queued message is shown inside or before the answer in progress");
    check(order.notes.slice(1).every((n) => n.includes("Queued")), `notes: ${order.notes}`);
    // charlie is taken back before it leaves.
    await page.click(".turn:nth-child(3) .meta button.remove");
    check(await page.$$eval(".msg.user", (u) => u.length) === 3, "charlie was not removed");
    await page.keyboard.press("Escape");
    await page.waitForSelector(".turn:nth-child(1) .msg.assistant[data-state=cancelled]", { timeout: WAIT });
    // bravo goes out and streams; the Stop button ends it.
    await page.waitForFunction(() => (document.querySelector(".turn:nth-child(2) .md")?.textContent || "").includes("w5"),
      null, { timeout: WAIT });
    await page.click("#stop");
    await page.waitForSelector(".turn:nth-child(2) .msg.assistant[data-state=cancelled]", { timeout: WAIT });
    await page.waitForSelector(".turn:nth-child(3) .msg.assistant[data-state=completed]", { timeout: WAIT });
    const texts = await answerTexts(page);
    check(texts.length === 3, `turns: ${JSON.stringify(texts)}`);
    check(!texts[0].answer.includes("bravo") && !texts[0].answer.includes("delta"), "answers mixed");
    check(texts[2].answer.includes("You said: delta"), `delta's answer: ${texts[2].answer}`);
    check(await page.$$eval(".msg.assistant[aria-busy]", (x) => x.length) === 0, "still busy");
    check(await page.isHidden("#stop"), "Stop shown with nothing streaming");
    const stopped = await page.$$eval(".msg.assistant .meta", (m) => m.map((x) => x.textContent));
    check(stopped[0].includes("Stopped") && stopped[1].includes("Stopped"), `meta: ${stopped}`);
    return { session: page.url().split("#/s/")[1], texts };
  },

  // A long conversation opened from the sidebar: the latest page first,
  // older pages as the log scrolls up, answers split between pages drawn
  // whole; the list is newest first with the summaries.
  async history(page) {
    await signIn(page, args.user);
    const ids = args.sessions.split(",");
    await page.waitForFunction((n) => document.querySelectorAll("#sessions a[data-id]").length >= n,
      ids.length, { timeout: WAIT });
    await page.waitForFunction(() => [...document.querySelectorAll("#sessions .item-summary")]
      .some((s) => s.textContent.startsWith("Overview")), null, { timeout: 60000 });
    // The list pages as it scrolls: scrolled to the bottom until it holds
    // them all (polled, so a slow machine only takes longer).
    await page.waitForFunction((total) => {
      const nav = document.querySelector("nav.sessions");
      nav.scrollTop = nav.scrollHeight;
      return nav.querySelectorAll("a[data-id]").length >= total;
    }, Number(args.total), { timeout: WAIT, polling: 300 });
    const listed = await page.$$eval("#sessions a[data-id]", (as) => as.map((a) => ({
      id: a.dataset.id, summary: a.querySelector(".item-summary")?.textContent ?? "",
    })));
    await page.click(`#sessions a[data-id="${ids[0]}"]`);
    await page.waitForFunction((t) => document.getElementById("turns").textContent.includes(t),
      args.last, { timeout: WAIT });
    check(page.url().endsWith(`#/s/${ids[0]}`), `the URL does not name the session: ${page.url()}`);
    const firstShown = await page.evaluate((t) => document.getElementById("turns").textContent.includes(t), args.first);
    check(!firstShown, "the whole history was loaded at once");
    // Older pages come as the log is scrolled to the top, until the first
    // message is there.
    await page.waitForFunction((t) => {
      document.getElementById("log").scrollTop = 0;
      return document.getElementById("turns").textContent.includes(t);
    }, args.first, { timeout: WAIT, polling: 300 });
    return { listed, texts: await answerTexts(page) };
  },

  // The conversation is in the URL: reload keeps it; new chat, back and
  // forward move between conversations.
  async reload(page) {
    await signIn(page, args.user);
    await send(page, "remember the apples");
    await answersEnded(page, 1);
    const first = page.url();
    check(/#\/s\/[A-Za-z0-9._-]+$/.test(first), `no session in the URL: ${first}`);
    await page.reload();
    await page.waitForFunction(() => document.getElementById("turns").textContent.includes("You said: remember the apples"),
      null, { timeout: WAIT });
    check(page.url() === first, "the reload changed the URL");
    await connected(page);
    await send(page, "and the pears");
    await answersEnded(page, 2);
    const afterReload = await answerTexts(page);
    await page.click("#new-chat");
    await page.waitForSelector("#empty:not([hidden])", { timeout: WAIT });
    await send(page, "a new topic: bananas");
    await answersEnded(page, 1);
    const second = page.url();
    check(second !== first, "the new chat kept the old URL");
    await page.goBack();
    await page.waitForFunction(() => document.getElementById("turns").textContent.includes("remember the apples"),
      null, { timeout: WAIT });
    check(page.url() === first, `back went to ${page.url()}`);
    check(!(await page.textContent("#turns")).includes("bananas"), "back shows the other chat");
    await page.goForward();
    await page.waitForFunction(() => document.getElementById("turns").textContent.includes("bananas"),
      null, { timeout: WAIT });
    return { first: first.split("#/s/")[1], second: second.split("#/s/")[1], afterReload };
  },

  // The gateway killed mid-answer and started again: the page says it is
  // reconnecting, comes back by itself (signing in again: a restarted dev
  // gateway refuses its old tokens), sends what was typed meanwhile, once,
  // and answers the next message.
  async restart(page) {
    await signIn(page, args.user);
    await send(page, "before the restart");
    await answersEnded(page, 1);
    await send(page, "[[delay:50]] [[words:300]] long");
    await page.waitForFunction(() => (document.querySelectorAll(".md")[1]?.textContent || "").includes("w10"),
      null, { timeout: WAIT });
    await ask("kill", { session: page.url().split("#/s/")[1], stored: 2 });
    await page.waitForSelector("#conn[data-state=waiting]", { timeout: WAIT });
    const waiting = await page.textContent("#conn-text");
    check(/Reconnecting/.test(waiting), `no reconnecting state: ${waiting}`);
    await send(page, "typed while it was down");
    const note = await page.textContent(".turn:last-child .msg.user .meta");
    check(/Waiting for the connection/.test(note), `queued note: ${note}`);
    await shot(page, "webpage-reconnecting-1280.png");
    await ask("start");
    await page.waitForSelector(".turn:nth-child(3) .msg.assistant[data-state=completed]", { timeout: 60000 });
    check(await page.getAttribute("#conn", "data-state") === "open", "not connected again");
    const interrupted = await page.getAttribute(".turn:nth-child(2) .msg.assistant", "data-state");
    await send(page, "after the restart");
    await page.waitForSelector(".turn:nth-child(4) .msg.assistant[data-state=completed]", { timeout: WAIT });
    return { session: page.url().split("#/s/")[1], interrupted, texts: await answerTexts(page) };
  },

  // A message typed while the gateway is down and the page reloaded before
  // it reconnected: kept in this tab (sessionStorage), sent once.
  async offline_reload(page) {
    await signIn(page, args.user);
    await send(page, "before the outage");
    await answersEnded(page, 1);
    await ask("kill", { session: page.url().split("#/s/")[1], stored: 1 });
    await page.waitForSelector("#conn[data-state=waiting]", { timeout: WAIT });
    await send(page, "typed before the reload");
    const kept = await page.evaluate(() => Object.keys(sessionStorage)
      .filter((k) => k.startsWith("convo.outbox.")).map((k) => sessionStorage.getItem(k)).join(""));
    check(kept.includes("typed before the reload"), `not kept for a reload: ${kept}`);
    await ask("start");
    await page.reload();
    await page.waitForFunction(() => [...document.querySelectorAll(".turn:not([hidden])")]
      .some((t) => t.querySelector(".bubble")?.textContent === "typed before the reload"
        && t.querySelector(".msg.assistant")?.dataset.state === "completed"), null, { timeout: 60000 });
    return { session: page.url().split("#/s/")[1], texts: await answerTexts(page) };
  },

  // The same conversation opened in a second tab takes it over; the first
  // says so and does not take it back by itself (no tug of war) until
  // "Use here".
  async takeover(page, ctx) {
    await signIn(page, args.user);
    await send(page, "hello from the first tab");
    await answersEnded(page, 1);
    const url = page.url();
    const other = await ctx.newPage();
    await signIn(other, args.user);
    await other.goto(url);
    await connected(other);
    await page.waitForSelector("#conn[data-state=closed]", { timeout: WAIT });
    const said = await page.textContent("#conn-text");
    check(/another tab/.test(said), `taken-over text: ${said}`);
    await page.waitForTimeout(3000);
    check(await page.getAttribute("#conn", "data-state") === "closed", "the first tab took it back");
    check(await other.getAttribute("#conn", "data-state") === "open", "the second tab lost it");
    check(await page.textContent("#conn-retry") === "Use here", "no Use here");
    await page.click("#conn-retry");
    await connected(page);
    await other.waitForSelector("#conn[data-state=closed]", { timeout: WAIT });
    await send(page, "back in the first tab");
    await answersEnded(page, 2);
    await other.close();
    return { session: url.split("#/s/")[1] };
  },

  // Another user's conversation, by its URL: nothing of it is shown.
  async forbidden(page) {
    await signIn(page, args.user);
    await page.goto(`${base}#/s/${args.session}`);
    await page.waitForSelector("#conn[data-state=closed]", { timeout: WAIT });
    const facts = await page.evaluate(() => ({
      said: document.getElementById("conn-text").textContent,
      shown: document.getElementById("turns").textContent,
      disabled: document.getElementById("input").disabled,
    }));
    check(/not available/.test(facts.said), `text: ${facts.said}`);
    check(!facts.shown.includes(args.secret), "another user's conversation is shown");
    check(facts.disabled, "the composer is usable");
    return facts;
  },

  // Messages the gateway refuses: over --max-user-message-bytes (an error
  // frame) and over --max-frame-bytes (a close 1009). Neither is sent
  // again; the conversation goes on.
  async refusals(page) {
    await signIn(page, args.user);
    const tooLong = "x".repeat(20000);
    await send(page, tooLong);
    await page.waitForSelector(".msg.user[data-state=failed]", { timeout: WAIT });
    const note = await page.textContent(".msg.user[data-state=failed] .meta");
    check(/^Not sent: /.test(note), `note: ${note}`);
    await page.click(".msg.user[data-state=failed] .meta button:text('Edit')");
    check(await page.inputValue("#input") === tooLong, "Edit did not give the text back");
    check(await page.$$eval(".msg.user", (u) => u.length) === 0, "Edit left the failed message");
    await page.fill("#input", "");
    await send(page, "y".repeat(70000));
    await page.waitForSelector(".msg.user[data-state=failed]", { timeout: WAIT });
    await page.waitForSelector("#conn[data-state=waiting]", { timeout: WAIT });
    await connected(page);
    await send(page, "still here");
    await answersEnded(page, 1);
    await page.waitForTimeout(1000);
    return { session: page.url().split("#/s/")[1], texts: await answerTexts(page) };
  },

  // jwt: a sign-in whose token has expired is not used after a reload: the
  // page asks to sign in again, and says why. (Time passes by moving the
  // kept exp into the past: the page reads nothing else.)
  async jwt_expiry(page) {
    await page.goto(base);
    await page.waitForSelector("#signin-token", { state: "visible", timeout: WAIT });
    await page.fill("#signin-token", args.token);
    await page.click("#signin-submit");
    await page.waitForSelector("#app:not([hidden])", { timeout: WAIT });
    await page.evaluate(() => {
      const kept = JSON.parse(sessionStorage.getItem("convo.auth"));
      kept.exp = Date.now() - 1000;
      sessionStorage.setItem("convo.auth", JSON.stringify(kept));
    });
    await page.reload();
    await page.waitForSelector("#signin-error:not([hidden])", { timeout: WAIT });
    const said = await page.textContent("#signin-error");
    check(/expired/.test(said), `said: ${said}`);
    check(await page.evaluate(() => sessionStorage.getItem("convo.auth")) === null, "the token was kept");
    return { said };
  },

  // Script in a user message, in the model's answer (the offline model
  // says back what it was told), in tool arguments and results, and in a
  // conversation's title: none of it runs.
  async xss(page) {
    await signIn(page, args.user);
    const payload = [
      "<img src=x onerror=\"window.__xss=1\">",
      "<script>window.__xss=2</script>",
      "[click me](javascript:window.__xss=3)",
      "<a href=\"javascript:window.__xss=4\">html link</a>",
      "![pic](javascript:window.__xss=5)",
      "<svg onload=\"window.__xss=6\"></svg>",
      "<iframe src=\"javascript:window.__xss=7\"></iframe>",
      "<details open ontoggle=\"window.__xss=8\">x</details>",
      "[data](data:text/html,<script>window.__xss=9</script>)",
    ].join("\n\n");
    await send(page, `look:\n\n${payload}`);
    await answersEnded(page, 1);
    await send(page, "What is <img src=x onerror=\"window.__xss=10\">?");
    await answersEnded(page, 2);
    await page.click(".tool-card summary");
    // Links that survived are inert; click them all.
    for (const a of await page.$$("#turns .md a")) await a.click({ modifiers: [] }).catch(() => {});
    await page.waitForTimeout(500);
    const facts = await page.evaluate(() => ({
      flag: window.__xss ?? null,
      elements: [...document.querySelectorAll("#turns img, #turns script, #turns iframe, #turns svg, #turns details:not(.tool-card), #sessions img")]
        .map((e) => e.outerHTML),
      hrefs: [...document.querySelectorAll("#turns a[href]")].map((a) => a.getAttribute("href")),
      shown: document.querySelector(".turn .msg.assistant .md")?.textContent ?? "",
      title: document.querySelector("#sessions a[aria-current] .item-title")?.textContent ?? "",
    }));
    check(facts.flag === null, `script ran: window.__xss = ${facts.flag}`);
    check(facts.elements.length === 0, `dangerous elements: ${facts.elements}`);
    check(facts.hrefs.every((h) => /^(https?:|mailto:)/.test(h)), `hrefs: ${facts.hrefs}`);
    check(facts.shown.includes("<img src=x onerror=\"window.__xss=1\">"), "the payload is not shown as text");
    return facts;
  },

  // 375 px and 1280 px, light and dark: nothing wider than the screen
  // (long words, tool JSON, code), the list as a drawer on phones; the
  // screenshots are kept.
  async layout(page) {
    await signIn(page, args.user);
    const long = "x".repeat(400);
    await send(page, `${long}\n\n\`\`\`\n${"y".repeat(300)}\n\`\`\`\n\n| ${"h |".repeat(12)}\n|${"---|".repeat(12)}\n| ${"cell |".repeat(12)}`);
    await answersEnded(page, 1);
    await send(page, `What is ${"z".repeat(200)}?`);
    await answersEnded(page, 2);
    await page.click(".tool-card summary");
    const found = {};
    for (const scheme of ["light", "dark"]) {
      await page.emulateMedia({ colorScheme: scheme });
      found[scheme] = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
      for (const width of [375, 1280]) {
        await page.setViewportSize({ width, height: width === 375 ? 740 : 800 });
        await page.waitForTimeout(100);
        const o = await overflowing(page);
        check(o.bad.length === 0 && o.scrollWidth <= width, `${width} px ${scheme}: ${JSON.stringify(o)}`);
        await shot(page, `webpage-${width}-${scheme}.png`);
      }
    }
    const lum = (c) => {
      const [r, g, b] = c.match(/\d+/g).map(Number);
      return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
    };
    check(lum(found.light) > 0.8 && lum(found.dark) < 0.2, `themes: ${JSON.stringify(found)}`);
    // On a phone the conversations are a drawer.
    await page.emulateMedia({ colorScheme: "light" });
    await page.setViewportSize({ width: 375, height: 740 });
    check(!(await page.isVisible("#sidebar #new-chat")), "the list is open on a phone");
    await page.click("#menu");
    await page.waitForSelector("#sidebar #new-chat", { state: "visible" });
    const o = await overflowing(page);
    check(o.bad.length === 0, `drawer: ${JSON.stringify(o)}`);
    await shot(page, "webpage-375-drawer.png");
    await page.keyboard.press("Escape");
    await page.waitForSelector("#sidebar #new-chat", { state: "hidden" });
    return found;
  },

  // The seed's own kind of page (tests/gateway/seed_page.html) at the
  // gateway's origin, as the seed's backend served it, against a gateway in
  // --auth none. (Written into a document of that origin: /healthz answers
  // without the web page's Content-Security-Policy, which forbids the
  // seed's inline script.)
  async seed(page) {
    const html = fs.readFileSync(new URL("./seed_page.html", import.meta.url), "utf8");
    await page.goto(`${origin}/healthz`);
    await page.setContent(html);
    await page.fill("#session", args.session);
    await page.fill("#user", args.user);
    await page.click("#connect");
    await page.waitForSelector("#status:text('connected')", { timeout: WAIT });
    await page.fill("#text", "What is Python?");
    await page.click("#send");
    await page.waitForSelector(".done", { timeout: WAIT });
    await page.fill("#text", "");
    await page.click("#send");
    await page.waitForSelector(".error", { timeout: WAIT });
    return page.evaluate(() => ({
      call: document.querySelector(".tool-call")?.textContent,
      result: document.querySelector(".tool-result")?.textContent,
      answer: document.querySelector(".assistant")?.textContent,
      error: document.querySelector(".error")?.textContent,
    }));
  },
};

// Console messages a scenario expects (everything else fails it).
const EXPECTED = {
  load: [/TrustedHTML/, /Trusted Type/],
  signin_jwt: [/status of 401/],
  restart: [/WebSocket connection to .* failed/, /ERR_CONNECTION_REFUSED/, /status of 401/],
  offline_reload: [/WebSocket connection to .* failed/, /ERR_CONNECTION_REFUSED/, /status of 401/],
  forbidden: [/status of 404/], // the conversation's metadata: "no such session"
  seed: [/status of 404/], // the browser asks /favicon.ico of a page without an icon
};

async function main() {
  const fn = scenarios[scenario];
  if (!fn) throw new Error(`no scenario ${scenario}`);
  fs.mkdirSync(args.out, { recursive: true });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "convo-chromium-"));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--no-first-run", "--disable-sync"],
  });
  const seen = { console: [], errors: [], dialogs: [] };
  const watch = (page) => {
    page.on("console", (m) => {
      if (m.type() === "error" || m.type() === "warning") seen.console.push(`${m.type()}: ${m.text()}`);
    });
    page.on("pageerror", (e) => seen.errors.push(e.message));
    page.on("dialog", (d) => {
      seen.dialogs.push(`${d.type()}: ${d.message()}`);
      d.dismiss().catch(() => {});
    });
  };
  ctx.on("page", watch);
  const page = ctx.pages()[0] || (await ctx.newPage());
  watch(page);
  let failed = false;
  try {
    const facts = await fn(page, ctx);
    const allowed = EXPECTED[scenario] || [];
    const unexpected = seen.console.filter((c) => !allowed.some((re) => re.test(c)));
    check(seen.errors.length === 0, `page errors: ${seen.errors}`);
    check(seen.dialogs.length === 0, `dialogs opened: ${seen.dialogs}`);
    check(unexpected.length === 0, `console: ${unexpected.join(" | ")}`);
    say({ done: { ...facts, console: seen.console } });
  } catch (e) {
    failed = true;
    await page.screenshot({ path: path.join(args.out, `failed-${scenario}.png`) }).catch(() => {});
    say({ error: `${e.stack || e}\nconsole: ${seen.console.join(" | ")}\npage errors: ${seen.errors}` });
  } finally {
    await ctx.close();
    fs.rmSync(profile, { recursive: true, force: true });
    stdin.close();
  }
  process.exit(failed ? 1 : 0);
}

await main();

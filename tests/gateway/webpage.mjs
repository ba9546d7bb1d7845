// Drives the gateway's web page in Debian's Chromium (playwright-core):
// sign in, start a session, send a message, see the streamed answer and a
// tool call, end the session, see the summary appear.
//   node webpage.mjs http://127.0.0.1:PORT/app/ [screenshot.png] [token]
// With a token (a gateway in --auth jwt) it is pasted into the page; else
// the page signs in by user name (--auth dev, or none).
import { createRequire } from "node:module";
const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const url = process.argv[2];
const shot = process.argv[3];
const token = process.argv[4];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => { console.error("page error:", e.message); failed = true; });
  await page.goto(url);
  await page.fill("#session-id", "web-" + Date.now());
  if (token) {
    await page.waitForSelector("#token", { state: "visible", timeout: 15000 });
    await page.fill("#token", token);
  } else {
    await page.fill("#user-id", "web-user");
  }
  await page.click("#start");
  await page.waitForSelector("#status:has-text('Connected to session')", { timeout: 15000 });
  await page.fill("#message", "What is PostgreSQL?");
  await page.click("#send");
  await page.waitForSelector(".tool-call", { timeout: 20000 });
  await page.waitForSelector(".tool-result", { timeout: 20000 });
  // The answer streams in after the tool result.
  await page.waitForFunction(() => {
    const a = [...document.querySelectorAll(".assistant")];
    return a.length > 0 && a[a.length - 1].textContent.length > 40;
  }, null, { timeout: 20000 });
  await page.waitForFunction(() => document.querySelector("#cancel").disabled, null,
                             { timeout: 20000 });
  const call = await page.textContent(".tool-call");
  if (!call.includes("fetch_internal_knowledge")) throw new Error("tool call not shown: " + call);
  await page.click("#end");
  await page.waitForSelector("#summary-status:has-text('Summary: done')", { timeout: 60000 });
  const summary = await page.textContent("#summary-text");
  if (!/overview/i.test(summary)) throw new Error("summary looks wrong: " + summary);
  if (shot) await page.screenshot({ path: shot, fullPage: true });
  console.log("ok: streamed answer, tool call and result, summary of", summary.length, "chars");
} catch (e) {
  console.error("FAILED:", e.message);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);

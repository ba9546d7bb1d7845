// What answers look like: Markdown made safe, code blocks with a copy
// button, tool calls as compact cards.
//
// Safety, in layers: marked renders the model's Markdown but shows raw
// HTML in it as text (a model or a user typing <img onerror=...> sees it
// written out, as chat apps do); DOMPurify then keeps only harmless
// elements and attributes of what marked made; links keep their href only
// when it is http(s) or mailto (javascript: and the rest are neutralised)
// and open in a new tab with rel="noopener noreferrer"; images become
// links (an image would be fetched at once, telling any host what the page
// shows). Under the gateway's Content-Security-Policy only DOMPurify may
// produce HTML (Trusted Types): everything else is built with DOM calls
// and textContent. Without the vendor scripts answers are plain text.
"use strict";

const SAFE_HREF = /^(https?:|mailto:)/i;
// Past this many characters a streaming answer is shown as plain text until
// it ends (parsing the whole text per frame grows with its square).
const LIVE_MARKDOWN_MAX = 100000;
const COPIED_MS = 1500;

const purify = window.DOMPurify;
const markedLib = window.marked;
let md = null;

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

if (purify && markedLib && typeof purify.sanitize === "function") {
  md = new markedLib.Marked({
    gfm: true,
    breaks: true,
    renderer: {
      html(token) {
        return escapeHtml(token.text);
      },
      image(token) {
        const label = token.text || token.href;
        return `<a href="${escapeHtml(token.href)}">${escapeHtml("🖼 " + label)}</a>`;
      },
    },
  });
  purify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName !== "A") return;
    const href = node.getAttribute("href") || "";
    if (SAFE_HREF.test(href.trim())) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    } else {
      node.removeAttribute("href");
      node.setAttribute("class", "link-removed");
      node.setAttribute("title", "link removed: only http, https and mailto links are kept");
    }
  });
}

const PURIFY_CONFIG = {
  RETURN_TRUSTED_TYPE: true,
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "button", "textarea", "select"],
  FORBID_ATTR: ["style", "id", "name"],
  ALLOW_DATA_ATTR: false,
};

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on another host: no Clipboard API; the old way.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

export function copyButton(label, getText) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "copy";
  b.textContent = label;
  b.addEventListener("click", async () => {
    try {
      await copyText(getText());
      b.textContent = "Copied";
    } catch (e) {
      b.textContent = "Copy failed";
    }
    setTimeout(() => { b.textContent = label; }, COPIED_MS);
  });
  return b;
}

// Code blocks get a header with their language and a copy button; tables
// scroll sideways inside their own box (nothing wider than the screen).
function decorate(root) {
  for (const pre of root.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    const box = document.createElement("div");
    box.className = "codeblock";
    const head = document.createElement("div");
    head.className = "codeblock-head";
    const lang = document.createElement("span");
    const m = code && /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
    lang.textContent = m ? m[1] : "code";
    head.append(lang, copyButton("Copy code", () => (code || pre).textContent));
    pre.replaceWith(box);
    box.append(head, pre);
  }
  for (const table of root.querySelectorAll("table")) {
    const wrap = document.createElement("div");
    wrap.className = "table-wrap";
    table.replaceWith(wrap);
    wrap.append(table);
  }
}

// Shows `text` (Markdown) in el. live: the text is still streaming.
export function renderMarkdown(el, text, live = false) {
  if (!md || (live && text.length > LIVE_MARKDOWN_MAX)) {
    el.classList.add("plain");
    el.textContent = text;
    return;
  }
  el.classList.remove("plain");
  el.innerHTML = purify.sanitize(md.parse(text), PURIFY_CONFIG);
  decorate(el);
}

// ---- tool cards -----------------------------------------------------------

function quoted(s) {
  const t = String(s);
  return `“${t.length > 80 ? t.slice(0, 79) + "…" : t}”`;
}

// A sentence for people: [while running, when done].
function toolSentence(tool, args) {
  const a = args && typeof args === "object" ? args : {};
  switch (tool) {
    case "fetch_internal_knowledge":
      return a.topic
        ? [`Searching the knowledge base for ${quoted(a.topic)}…`,
           `Searched the knowledge base for ${quoted(a.topic)}`]
        : ["Searching the knowledge base…", "Searched the knowledge base"];
    case "lookup_contextual_data":
      return ["Looking up this conversation's history…", "Looked up this conversation's history"];
    default:
      return [`Using the tool ${tool}…`, `Used the tool ${tool}`];
  }
}

function resultNote(tool, result, isError) {
  if (isError) {
    const msg = result && typeof result === "object" && (result.error || result.message);
    return msg ? `failed: ${msg}` : "failed";
  }
  if (tool === "fetch_internal_knowledge" && result && Array.isArray(result.results)) {
    const n = result.results.length;
    return n === 0 ? "nothing found" : `${n} passage${n === 1 ? "" : "s"} found`;
  }
  return "done";
}

function pretty(value) {
  if (typeof value === "string") {
    try {
      return JSON.stringify(JSON.parse(value), null, 2);
    } catch (e) {
      return value;
    }
  }
  return JSON.stringify(value, null, 2);
}

// A card for one tool call; setResult() completes it.
export class ToolCard {
  constructor(tool, args, id) {
    this.tool = String(tool || "tool");
    this.id = id || null;
    this.args = args;
    this.el = document.createElement("details");
    this.el.className = "tool-card";
    this.el.dataset.state = "running";
    const summary = document.createElement("summary");
    this.icon = document.createElement("span");
    this.icon.className = "tool-icon";
    this.icon.setAttribute("aria-hidden", "true");
    this.title = document.createElement("span");
    this.title.className = "tool-title";
    this.note = document.createElement("span");
    this.note.className = "tool-note";
    const text = document.createElement("span");
    text.className = "tool-text";
    text.append(this.title, this.note);
    summary.append(this.icon, text);
    this.body = document.createElement("div");
    this.body.className = "tool-body";
    this.body.append(this.section("Arguments", args));
    this.el.append(summary, this.body);
    this.title.textContent = toolSentence(this.tool, args)[0];
  }

  section(label, value) {
    const box = document.createElement("div");
    const h = document.createElement("div");
    h.className = "tool-label";
    h.textContent = label;
    const pre = document.createElement("pre");
    pre.textContent = pretty(value);
    box.append(h, pre);
    return box;
  }

  setResult(result, isError) {
    this.el.dataset.state = isError ? "failed" : "done";
    this.title.textContent = toolSentence(this.tool, this.args)[1];
    this.note.textContent = " · " + resultNote(this.tool, result, isError);
    this.body.append(this.section(isError ? "Error" : "Result", result));
  }

  // The answer ended without a result (cancelled or failed).
  abandon() {
    if (this.el.dataset.state !== "running") return;
    this.el.dataset.state = "failed";
    this.title.textContent = toolSentence(this.tool, this.args)[1];
    this.note.textContent = " · no result";
  }
}

// Who the page speaks for, per the gateway's --auth mode (GET / says which):
//   dev   a typed user name; the gateway signs a token (POST /api/dev/token),
//         signed again when it expires or the gateway restarted;
//   jwt   a token from the identity provider: pasted, or brought back by a
//         login redirect in the URL fragment (#access_token=...), which is
//         taken out of the URL before anything else runs;
//   none  a typed user name, sent as ?user_id= (the seed's way).
// The token lives in sessionStorage (this tab only, gone when it closes),
// never in a URL the page shows, never in a log. REST calls carry it as
// Authorization: Bearer; the WebSocket as ?access_token= (browsers cannot
// set a WebSocket's headers), which the gateway hides from its logs.
"use strict";

const STORE_KEY = "convo.auth";
export const ID_RE = /^[A-Za-z0-9._-]{1,128}$/;
// A dev token this close to its exp is signed again before it is used; a
// jwt one is used until its exp (the gateway decides, with its leeway).
const DEV_RENEW_MARGIN_MS = 30 * 1000;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// A token handed over by a login redirect (#access_token=...&expires_in=...),
// removed from the address bar and the history entry at once. Returns the
// token or null; an error the provider sent back is returned as {error}.
export function takeTokenFromFragment() {
  const hash = location.hash.startsWith("#") ? location.hash.slice(1) : "";
  if (!/(^|&)(access_token|error)=/.test(hash)) return null;
  const params = new URLSearchParams(hash);
  history.replaceState(history.state, "", location.pathname + location.search);
  const token = params.get("access_token");
  if (token) return { token };
  return { error: params.get("error_description") || params.get("error") || "sign-in failed" };
}

function b64urlJson(part) {
  const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
  const bin = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
  const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

// The claims of a compact JWT, unverified: only to show who is signed in
// and to notice expiry early. The gateway verifies every use.
function tokenClaims(token) {
  const parts = token.split(".");
  if (parts.length !== 3) throw new Error("this is not a JWT (three parts separated by dots)");
  let claims;
  try {
    claims = b64urlJson(parts[1]);
  } catch (e) {
    throw new Error("this is not a JWT: its middle part is not base64url JSON");
  }
  if (claims === null || typeof claims !== "object") throw new Error("the token's claims are not an object");
  return claims;
}

// What the gateway's error codes mean to a person signing in.
const AUTH_TEXT = {
  missing_token: "No token was sent.",
  malformed_token: "This is not a valid token.",
  alg_not_allowed: "The token is signed with an algorithm this server does not accept.",
  bad_signature: "The token's signature is not valid for this server.",
  unknown_key: "The token was signed with a key this server does not know.",
  auth_unavailable: "The server cannot check tokens right now; try again in a moment.",
  missing_exp: "The token has no expiry time.",
  token_expired: "The token has expired; sign in again.",
  token_not_yet_valid: "The token is not valid yet (check the clocks).",
  wrong_issuer: "The token was issued by another provider.",
  wrong_audience: "The token is meant for another audience.",
  invalid_subject: "The token's user id is not one this server accepts.",
};

export function authText(code, fallback) {
  return AUTH_TEXT[code] || fallback;
}

export class Auth {
  constructor() {
    this.mode = null; // "dev" | "jwt" | "none"
    this.user = null;
    this.token = null;
    this.exp = 0; // ms since the epoch; 0: unknown
    this.onSignedOut = null; // (reason) => void
  }

  get signedIn() {
    return this.user !== null;
  }

  // Takes the sign-in kept in this tab, if it is for this mode and not
  // expired. Returns "ok", "none" or "expired" (a jwt one; dev tokens are
  // signed again when used).
  restore() {
    let saved;
    try {
      saved = JSON.parse(sessionStorage.getItem(STORE_KEY) || "null");
    } catch (e) {
      saved = null;
    }
    if (!saved || saved.mode !== this.mode || !ID_RE.test(saved.user || "")) return "none";
    if (this.mode === "jwt" && saved.exp && saved.exp < Date.now()) {
      sessionStorage.removeItem(STORE_KEY);
      return "expired";
    }
    Object.assign(this, { user: saved.user, token: saved.token || null, exp: saved.exp || 0 });
    return "ok";
  }

  save() {
    sessionStorage.setItem(STORE_KEY, JSON.stringify({
      mode: this.mode, user: this.user, token: this.token, exp: this.exp,
    }));
  }

  signOut(reason) {
    sessionStorage.removeItem(STORE_KEY);
    this.user = null;
    this.token = null;
    this.exp = 0;
    if (this.onSignedOut) this.onSignedOut(reason || "");
  }

  // dev and none: a user name. Throws an Error with a text for people.
  async signInAs(user) {
    if (!ID_RE.test(user)) {
      throw new Error("Use 1 to 128 letters, digits, dots, underscores or hyphens.");
    }
    if (this.mode === "dev") {
      await this.devToken(user);
    } else {
      this.user = user;
      this.token = null;
      this.exp = 0;
    }
    this.save();
  }

  async devToken(user) {
    let r;
    try {
      r = await fetch("/api/dev/token", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user_id: user }),
        cache: "no-store",
      });
    } catch (e) {
      throw new Error("The server cannot be reached.");
    }
    const body = await r.json().catch(() => ({}));
    if (!r.ok || typeof body.access_token !== "string") {
      throw new Error(body.error || `Sign-in failed (HTTP ${r.status}).`);
    }
    this.user = body.user_id || user;
    this.token = body.access_token;
    this.exp = Date.now() + 1000 * (Number(body.expires_in) || 0);
  }

  // jwt: a pasted token (or one from a login redirect), checked by the
  // gateway with one cheap call before it is kept.
  async signInWithToken(raw) {
    const token = raw.trim();
    if (!token) throw new Error("Paste your access token.");
    const claims = tokenClaims(token);
    if (typeof claims.sub !== "string" || !ID_RE.test(claims.sub)) {
      throw new Error(authText("invalid_subject"));
    }
    const exp = typeof claims.exp === "number" ? claims.exp * 1000 : 0;
    if (exp && exp < Date.now()) throw new Error(authText("token_expired"));
    const r = await fetch("/api/sessions?limit=1", {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
    }).catch(() => null);
    if (r === null) throw new Error("The server cannot be reached.");
    if (r.status === 401) {
      const body = await r.json().catch(() => ({}));
      throw new Error(authText(body.code, body.error || "The server refused this token."));
    }
    this.user = claims.sub;
    this.token = token;
    this.exp = exp;
    this.save();
  }

  // Before a use: a dev token near its end is signed again; an expired jwt
  // one signs the user out. Returns whether the token is usable now (a dev
  // token that could not be renewed, the gateway being away, is not; the
  // user stays signed in).
  async fresh() {
    if (!this.signedIn) return false;
    if (this.mode === "none" || !this.exp) return true;
    const margin = this.mode === "dev" ? DEV_RENEW_MARGIN_MS : 0;
    if (this.exp - margin > Date.now()) return true;
    return this.renew("token_expired");
  }

  // The gateway refused the token (401): dev signs again (the gateway may
  // have restarted with a new key), jwt signs out. Returns whether there
  // is a usable token now; a dev sign-in that failed (unreachable) stays.
  async renew(code) {
    if (this.mode === "dev" && this.user) {
      try {
        await this.devToken(this.user);
        this.save();
        return true;
      } catch (e) {
        return false; // unreachable: try again later
      }
    }
    this.signOut(authText(code, "Your sign-in is no longer valid; sign in again."));
    return false;
  }

  // The WebSocket URL of a session.
  wsUrl(sessionId) {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const q = this.token ? `access_token=${encodeURIComponent(this.token)}`
      : `user_id=${encodeURIComponent(this.user)}`;
    return `${proto}://${location.host}/ws/session/${encodeURIComponent(sessionId)}?${q}`;
  }

  // A REST GET: JSON back, or an ApiError. A 401 renews the token once.
  async get(path, params = {}) {
    for (let attempt = 0; ; attempt++) {
      if (!(await this.fresh())) {
        if (!this.signedIn) throw new ApiError(401, "signed_out", "signed out");
        throw new ApiError(0, "unreachable", "The server cannot be reached.");
      }
      const q = new URLSearchParams(params);
      if (this.mode === "none") q.set("user_id", this.user);
      const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
      let r;
      try {
        const qs = q.toString();
        r = await fetch(qs ? `${path}?${qs}` : path, { headers, cache: "no-store" });
      } catch (e) {
        throw new ApiError(0, "unreachable", "The server cannot be reached.");
      }
      const body = await r.json().catch(() => ({}));
      if (r.ok) return body;
      if (r.status === 401 && attempt === 0 && (await this.renew(body.code))) continue;
      throw new ApiError(r.status, body.code || `http_${r.status}`, body.error || `HTTP ${r.status}`);
    }
  }
}

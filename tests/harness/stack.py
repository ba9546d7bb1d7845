"""The whole system for end-to-end tests and benchmarks: a throwaway
PostgreSQL, store-svc, the offline model, llm-svc, router-svc, summary-svc,
and gateways started against them, each a real process on a free port.

    from stack import Stack

    with Stack() as s:                      # plaintext, as the local run
        gw = s.gateway("--rate-limit", "6000")
    with Stack(tls=True) as s:              # every gRPC hop over mutual TLS
        s.ca.issue("admin").channel(s.store.addr)

With tls=True a throwaway CA (`.ca`, certs.CA) issues each process a
certificate named as on Kubernetes (store-svc.convo.svc, gateway.convo.svc,
...; plus IP 127.0.0.1, which the processes dial here) and every process
gets TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE. `.ids` maps a process to
its certs.Identity. The harness's own calls use an `admin` certificate."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Iterable, Mapping, Optional

from harness import Postgres, Service, build_dir, find_binary

SERVICES = ("store-svc", "llm-svc", "router-svc", "summary-svc", "gateway")


def _built(name: str) -> bool:
    try:
        find_binary(name)
        return True
    except FileNotFoundError:
        return False


class Stack:
    def __init__(self, tls: bool = False, env: Optional[Mapping[str, str]] = None,
                 summary: bool = True, model_args: Iterable[str] = ("--token-delay-ms", "0")):
        self.env = dict(env or {})
        self.ca = None
        self.ids = {}
        self.admin = None
        if tls:
            from certs import CA
            self.ca = CA("convo-stack-ca")
            self.ids = {name: self.ca.issue(name) for name in SERVICES}
            self.admin = self.ca.issue("admin")
        self.pg = Postgres()
        self.store = self._start("store-svc", env={"DATABASE_URL": self.pg.url})
        self.model = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                             args=list(model_args), env=self.env, ready="tcp")
        self.llm = self._start("llm-svc", args=["--store", self.store.addr],
                               env={"OPENAI_BASE_URL": f"http://{self.model.addr}/v1",
                                    "OPENAI_API_KEY": "offline", "OPENAI_MODEL": "offline-model"})
        self.router = self._start("router-svc")
        self.summary = None
        if summary and _built("summary-svc"):
            self.summary = self._start("summary-svc", args=["--store", self.store.addr,
                                                           "--llm", self.llm.addr])

    def _start(self, name: str, args: Iterable[str] = (), env: Optional[dict] = None,
               **kw) -> Service:
        return Service(name, args=list(args), env={**self.env, **(env or {})},
                       tls=self.ids.get(name), caller=self.admin, **kw)

    def services(self) -> list:
        """The gRPC services, in start order."""
        return [s for s in (self.store, self.llm, self.router, self.summary) if s is not None]

    def peers(self) -> list:
        summary = self.summary.addr if self.summary else "127.0.0.1:1"
        return ["--router", self.router.addr, "--llm", self.llm.addr, "--store", self.store.addr,
                "--summary", summary]

    def gateway(self, *extra: str, auth: str = "dev", env: Optional[dict] = None,
                **kw) -> Service:
        """A gateway against this stack (stopped by the caller or at exit).
        --auth dev unless a test asks for another mode: the closest to
        production (every call carries a bearer token, signed by the
        gateway's POST /api/dev/token; dev_token())."""
        gw = self._start("gateway", args=[*self.peers(), "--end-grace-ms", "0", "--auth", auth,
                                          *extra], env=env, ready="http", **kw)
        gw.auth = auth
        return gw

    def stop(self) -> None:
        for svc in (self.summary, self.router, self.llm, self.model, self.store):
            if svc is not None:
                svc.stop()
        self.pg.stop()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def dev_token(gw, user: str) -> str:
    """A token for `user` from a --auth dev gateway (cached per gateway)."""
    cache = gw.__dict__.setdefault("tokens", {})
    if user not in cache:
        req = urllib.request.Request(f"http://{gw.addr}/api/dev/token", method="POST",
                                     data=json.dumps({"user_id": user}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            cache[user] = json.load(r)["access_token"]
    return cache[user]


def ws_url(gw, session: str, user: Optional[str] = None, **args) -> str:
    """The WebSocket URL of `session` for `user`: with --auth dev its token
    (?access_token=, as browsers send it) and user_id; with --auth none the
    seed's ?user_id=. Extra query arguments are added as given."""
    query = dict(args)
    if user is not None:
        query["user_id"] = user
        if getattr(gw, "auth", "none") == "dev":
            query["access_token"] = dev_token(gw, user)
    url = f"ws://{gw.addr}/ws/session/{session}"
    return url + ("?" + urllib.parse.urlencode(query) if query else "")

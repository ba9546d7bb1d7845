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

import asyncio
import json
import socket
import time
import urllib.parse
import urllib.request
from typing import Iterable, Mapping, Optional

from harness import Postgres, Service, build_dir, find_binary, free_port

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


# How long a WebSocket test waits for the gateway's next frame.
FRAME_TIMEOUT = 30


async def recv(ws, timeout: float = FRAME_TIMEOUT) -> dict:
    """The next frame from the gateway, decoded."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def first_frame(ws) -> dict:
    """The `session` frame a new connection starts with."""
    frame = await recv(ws)
    assert frame["type"] == "session", frame
    return frame


async def turn(ws, message: str) -> list:
    """Sends a message and returns every frame up to its done or error."""
    await ws.send(json.dumps({"message": message}))
    frames = []
    while True:
        f = await recv(ws)
        frames.append(f)
        if f["type"] in ("done", "error"):
            return frames


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


# --------------------------------------------------------------------------
# replicas


def shared_port(hosts: Iterable[str]) -> int:
    """A TCP port free on every one of `hosts` (loopback addresses: on Linux
    all of 127.0.0.0/8 is on lo), so that replicas listen on one port at
    several addresses, as pods of a Service do."""
    hosts = list(hosts)
    for _ in range(100):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sk:
                    sk.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {hosts}")


def replica_identity(ca, name: str, host: str):
    """A replica's certificate from `ca` (None: plaintext): the service's
    names, as deploy/k8s issues them, and its own address only (which the
    harness dials), not its siblings'."""
    if ca is None:
        return None
    return ca.issue(name, dns=[name, f"{name}.convo.svc"], ips=[host])


class Replicas:
    """Replicas of one binary, one per address of `hosts`, all on one port
    (shared_port): `.members[i]` (harness Services), `.addr` the address
    list callers take (`127.0.0.1:P,127.0.0.2:P`). Started in order."""

    def __init__(self, name: str, hosts: Iterable[str], args: Iterable[str] = (),
                 env: Optional[dict] = None, ca=None, caller=None, **kw):
        self.name = name
        hosts = list(hosts)
        port = shared_port(hosts)
        self.members = [Service(name, args=list(args), env=env, host=h, port=port,
                                tls=replica_identity(ca, name, h), caller=caller, **kw)
                        for h in hosts]

    @property
    def addr(self) -> str:
        return ",".join(m.addr for m in self.members)

    def __getitem__(self, i: int) -> Service:
        return self.members[i]

    def __iter__(self):
        return iter(self.members)

    def stop(self) -> None:
        for m in reversed(self.members):
            m.stop()


class ReplicaStack:
    """Every service twice (or once per address of `hosts`), each replica on
    its own loopback address and all of a service on one port; one
    PostgreSQL and one offline model (the hosted model's stand-in). Every
    caller is given the address list of its peers and --grpc-round-robin, as
    on Kubernetes (where the list comes from a headless Service's DNS name).

        with ReplicaStack() as s:
            gws = s.gateways("--auth", "jwt", "--jwt-secret-file", path)
            s.store[0].kill(); s.store[0].start()

    `.store`, `.llm`, `.router`, `.summary` are Replicas; `summary_args` are
    added to summary-svc's (leases, sweep). With tls=True every gRPC hop is
    mutual TLS (`.ca`, each replica's certificate from replica_identity, the
    harness's calls as `.admin`)."""

    def __init__(self, hosts: Iterable[str] = ("127.0.0.1", "127.0.0.2"),
                 env: Optional[Mapping[str, str]] = None, summary_args: Iterable[str] = (),
                 model_args: Iterable[str] = ("--token-delay-ms", "0"), tls: bool = False):
        self.hosts = list(hosts)
        self.env = dict(env or {})
        self.ca = self.admin = None
        if tls:
            from certs import CA
            self.ca = CA("convo-replicas-ca")
            self.admin = self.ca.issue("admin")
        sec = {"ca": self.ca, "caller": self.admin}
        self.pg = Postgres()
        self.store = Replicas("store-svc", self.hosts, env={**self.env, "DATABASE_URL": self.pg.url},
                              **sec)
        self.model = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                             args=list(model_args), env=self.env, ready="tcp")
        rr = ["--grpc-round-robin"]
        self.llm = Replicas("llm-svc", self.hosts, args=["--store", self.store.addr, *rr],
                            env={**self.env, "OPENAI_BASE_URL": f"http://{self.model.addr}/v1",
                                 "OPENAI_API_KEY": "offline", "OPENAI_MODEL": "offline-model"},
                            **sec)
        self.router = Replicas("router-svc", self.hosts, env=self.env, **sec)
        self.summary = Replicas("summary-svc", self.hosts,
                                args=["--store", self.store.addr, "--llm", self.llm.addr, *rr,
                                      *summary_args], env=self.env, **sec)
        self.gateway_replicas: list = []

    def services(self) -> list:
        """Every gRPC service's Replicas, in start order."""
        return [self.store, self.llm, self.router, self.summary]

    def peers(self) -> list:
        return ["--router", self.router.addr, "--llm", self.llm.addr, "--store", self.store.addr,
                "--summary", self.summary.addr, "--grpc-round-robin"]

    def gateways(self, *extra: str, env: Optional[dict] = None) -> Replicas:
        """A gateway on each address (one port), against every replica."""
        gws = Replicas("gateway", self.hosts, args=[*self.peers(), "--end-grace-ms", "0", *extra],
                       env={**self.env, **(env or {})}, ready="http", ca=self.ca)
        self.gateway_replicas.append(gws)
        return gws

    def stop(self) -> None:
        for gws in self.gateway_replicas:
            gws.stop()
        for r in (self.summary, self.router, self.llm):
            r.stop()
        self.model.stop()
        self.store.stop()
        self.pg.stop()

    def __enter__(self) -> "ReplicaStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stored_events(pg, session: str, want=None, timeout: float = 30) -> list:
    """A session's events in PostgreSQL as (seq, event_type, content), in seq
    order, once `want(rows)` holds (or the timeout passed: then as they are)."""
    import psycopg2  # only the tests that read the database need it
    deadline = time.monotonic() + timeout
    while True:
        with psycopg2.connect(pg.url) as conn, conn.cursor() as cur:
            cur.execute("SELECT seq, event_type, content FROM session_events "
                        "WHERE session_id = %s ORDER BY seq", (session,))
            got = cur.fetchall()
        if want is None or want(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)

"""The whole system for the gateway's end-to-end tests: a throwaway
PostgreSQL, store-svc, the offline model, llm-svc, router-svc, summary-svc
and a gateway, each a real process on a free port.

Gateways start with --auth dev unless a test asks for another mode: the
closest to production (every call carries a bearer token, signed here by the
gateway's POST /api/dev/token)."""

import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))

from harness import Postgres, Service, build_dir, find_binary  # noqa: E402


def optional_binary(name):
    try:
        return find_binary(name)
    except FileNotFoundError:
        return None


class Stack:
    def __init__(self):
        self.pg = Postgres()
        self.store = Service("store-svc", env={"DATABASE_URL": self.pg.url})
        self.model = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                             args=["--token-delay-ms", "0"], ready="tcp")
        self.llm = Service("llm-svc", args=["--store", self.store.addr],
                           env={"OPENAI_BASE_URL": f"http://{self.model.addr}/v1",
                                "OPENAI_API_KEY": "offline", "OPENAI_MODEL": "offline-model"})
        self.router = Service("router-svc")
        self.summary = None
        if optional_binary("summary-svc") is not None:
            self.summary = Service("summary-svc", args=["--store", self.store.addr,
                                                        "--llm", self.llm.addr])

    def peers(self):
        summary = self.summary.addr if self.summary else "127.0.0.1:1"
        return ["--router", self.router.addr, "--llm", self.llm.addr, "--store", self.store.addr,
                "--summary", summary]

    def gateway(self, *extra, auth="dev", **kw):
        gw = Service("gateway", args=[*self.peers(), "--end-grace-ms", "0", "--auth", auth,
                                      *extra], ready="http", **kw)
        gw.auth = auth
        return gw


def dev_token(gw, user):
    """A token for `user` from a --auth dev gateway (cached per gateway)."""
    cache = gw.__dict__.setdefault("tokens", {})
    if user not in cache:
        req = urllib.request.Request(f"http://{gw.addr}/api/dev/token", method="POST",
                                     data=json.dumps({"user_id": user}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            cache[user] = json.load(r)["access_token"]
    return cache[user]


def ws_url(gw, session, user=None, **args):
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


@pytest.fixture(scope="session")
def stack():
    s = Stack()
    yield s
    for svc in (s.summary, s.router, s.llm, s.model, s.store):
        if svc is not None:
            svc.stop()
    s.pg.stop()


@pytest.fixture(scope="session")
def gateway(stack):
    gw = stack.gateway("--rate-limit", "6000", "--rest-rate-per-ip", "1000")
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def gateway_none(stack):
    gw = stack.gateway("--rate-limit", "6000", auth="none")
    yield gw
    gw.stop()

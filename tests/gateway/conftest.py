"""The whole system for the gateway's end-to-end tests: a throwaway
PostgreSQL, store-svc, the offline model, llm-svc, router-svc, summary-svc
and a gateway, each a real process on a free port."""

import sys
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

    def gateway(self, *extra, **kw):
        return Service("gateway", args=[*self.peers(), "--end-grace-ms", "0", *extra],
                       ready="http", **kw)


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
    gw = stack.gateway("--rate-limit", "6000")
    yield gw
    gw.stop()

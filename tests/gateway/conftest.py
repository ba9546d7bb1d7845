"""The whole system for the gateway's end-to-end tests: a throwaway
PostgreSQL, store-svc, the offline model, llm-svc, router-svc, summary-svc
and gateways, each a real process on a free port (tests/harness/stack.py).

Gateways start with --auth dev unless a test asks for another mode: the
closest to production (every call carries a bearer token, signed by the
gateway's POST /api/dev/token)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))

from stack import Stack, dev_token, ws_url  # noqa: E402,F401


@pytest.fixture(scope="session")
def stack():
    s = Stack()
    yield s
    s.stop()


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

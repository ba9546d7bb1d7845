"""The whole system for the gateway's end-to-end tests: a throwaway
PostgreSQL, store-svc, the offline model, llm-svc, router-svc, summary-svc
and a gateway, each a real process on a free port (tests/harness/stack.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "harness"))

from stack import Stack  # noqa: E402


@pytest.fixture(scope="session")
def stack():
    s = Stack()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def gateway(stack):
    gw = stack.gateway("--rate-limit", "6000")
    yield gw
    gw.stop()

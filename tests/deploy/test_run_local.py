"""deploy/run.sh, the README's run command: started (on free ports, with a
temporary DATA_DIR, without its install and build steps), answers a
WebSocket conversation through the gateway, and stops on SIGTERM (first run)
and SIGINT (second run, which reuses the database) with nothing left
running."""
import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from deploy_util import DEPLOY, binary_path, build_dir
from harness import free_port, tmp_root

READY_LINE = "Press Ctrl-C to stop."


def _children(pid: int) -> set:
    """Every descendant of pid (by /proc ppid links)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
        return True
    except OSError:
        return False


class Run:
    """One `deploy/run.sh` in its own session, output in a file."""

    def __init__(self, tmp: Path, ports: dict, name: str):
        self.ports = ports
        self.out_path = tmp / f"{name}.out"
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "LISTEN_ADDR",
                            "ROUTER_ADDR", "LLM_ADDR", "STORE_ADDR", "SUMMARY_ADDR")}
        env.update(RUN_SKIP_INSTALL="1", RUN_SKIP_BUILD="1", BUILD_DIR=str(build_dir()),
                   DATA_DIR=str(tmp / "data"), HOST="127.0.0.1", HEALTH_TIMEOUT="60",
                   PORT=str(ports["gateway"]), PG_PORT=str(ports["pg"]), STORE_PORT=str(ports["store"]),
                   LLM_PORT=str(ports["llm"]), ROUTER_PORT=str(ports["router"]),
                   SUMMARY_PORT=str(ports["summary"]), MODEL_PORT=str(ports["model"]),
                   OFFLINE_MODEL_TOKEN_DELAY_MS="0")
        self.out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(["bash", str(DEPLOY / "run.sh")], env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids = set()

    def text(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.text():
            if self.proc.poll() is not None:
                pytest.fail(f"run.sh exited {self.proc.returncode} before it was ready:\n{self.text()}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                pytest.fail(f"run.sh not ready after {timeout} s:\n{self.text()}")
            time.sleep(0.1)
        self.pids = _children(self.proc.pid)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60, group: bool = False) -> int:
        """Signals run.sh (group=True: its whole process group, as Ctrl-C in
        a terminal does) and waits for it to exit."""
        self.pids |= _children(self.proc.pid)
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            for p in self.pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            self.proc.wait()
            pytest.fail(f"run.sh did not stop within {timeout} s:\n{self.text()}")
        self.out.close()
        return rc

    def assert_nothing_left(self) -> None:
        time.sleep(0.2)
        left = [p for p in self.pids if _alive(p)]
        assert not left, f"still running after run.sh stopped: {left}\n{self.text()}"
        busy = {k: p for k, p in self.ports.items() if _port_open(p)}
        assert not busy, f"ports still open: {busy}"


def _token(base: str, user: str) -> str:
    """A token from the gateway run.sh starts (--auth dev)."""
    req = urllib.request.Request(f"{base}/api/dev/token", method="POST",
                                 data=json.dumps({"user_id": user}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)["access_token"]


async def _converse(url: str, message: str, timeout: float = 30):
    import websockets

    frames = []
    async with websockets.connect(url, open_timeout=10) as ws:
        await ws.send(json.dumps({"message": message}))
        while True:
            f = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            frames.append(f)
            if f.get("type") in ("done", "error"):
                return frames


def _have(*names) -> list:
    return [n for n in names if not binary_path(n).exists()]


def _free_with_metrics_port():
    """A free port whose /metrics port (+ 1000) is free too."""
    for _ in range(100):
        p = free_port()
        if p + 1000 <= 65535 and not _port_open(p + 1000):
            return p
    raise RuntimeError("no port with a free port + 1000")


@pytest.fixture(scope="module")
def ports():
    ports = {k: free_port() for k in ("pg", "model")}
    ports.update({k: _free_with_metrics_port() for k in ("gateway", "store", "llm", "router", "summary")})
    # The /metrics ports must be closed after the stop as well.
    ports.update({f"{k}-metrics": ports[k] + 1000 for k in ("gateway", "store", "llm", "router", "summary")})
    return ports


def test_run_converse_stop_and_reuse(ports):
    missing = _have("gateway", "router-svc")
    if missing:
        pytest.fail(f"not built: {missing} (the tests run after the build)")
    # Under the harness's temporary root (removed at exit), open to the
    # postgres user that PostgreSQL runs as when the tests run as root.
    tmp_path = Path(tempfile.mkdtemp(prefix="run-", dir=tmp_root()))
    tmp_path.chmod(0o755)

    # ---- first start: creates the database
    run = Run(tmp_path, ports, "first")
    run.wait_ready()
    out = run.text()
    url = f"http://127.0.0.1:{ports['gateway']}"
    assert f"{url}/app/" in out, out
    for skipped in ("store-svc", "llm-svc", "summary-svc"):
        if not binary_path(skipped).exists():
            assert f"skipping {skipped}: not built yet" in out
    if binary_path("store-svc").exists():
        assert "creating the database" in out, out
    with urllib.request.urlopen(f"{url}/api/health", timeout=5) as r:
        health = json.load(r)
    with urllib.request.urlopen(f"{url}/app/", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{url}/", timeout=5) as r:
        assert json.load(r)["auth"] == "dev", "run.sh runs the gateway with --auth dev"
    # Every process serves /metrics on its port + 1000, as the run says.
    metrics_url = f"http://127.0.0.1:{ports['gateway-metrics']}/metrics"
    assert metrics_url in out, out
    for k in ("gateway", "store", "llm", "router", "summary"):
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[k + '-metrics']}/metrics", timeout=5) as r:
            assert b"process_cpu_seconds_total" in r.read(), k
    conversation_missing = _have("llm-svc", "store-svc", "offline-model")
    if not conversation_missing:
        for name in ("router-svc", "llm-svc", "store-svc"):
            assert health["services"][name]["status"] == "SERVING", health
        frames = asyncio.run(_converse(f"ws://127.0.0.1:{ports['gateway']}/ws/session/deploy-test-1"
                                       f"?access_token={_token(url, 'deploy-test')}", "hello"))
        types = [f["type"] for f in frames]
        assert types[-1] == "done", frames
        assert "token" in types, frames
        assert types.index("token") < len(types) - 1
        assert "".join(f["content"] for f in frames if f["type"] == "token").strip()
    rc = run.stop(signal.SIGTERM)
    assert rc == 0, run.text()
    assert "all stopped" in run.text()
    run.assert_nothing_left()
    stopped = [line for line in run.text().splitlines() if line.startswith("run.sh: stopped ")]
    assert stopped and stopped[0] == "run.sh: stopped gateway", run.text()
    if binary_path("store-svc").exists():
        assert stopped[-1] == "run.sh: stopped postgres", "PostgreSQL stops last"

    # ---- second start: reuses the database; stopped as by Ctrl-C in a
    # terminal (SIGINT to the foreground process group)
    run2 = Run(tmp_path, ports, "second")
    run2.wait_ready()
    if binary_path("store-svc").exists():
        assert "reusing the database" in run2.text(), run2.text()
    if not conversation_missing:
        frames = asyncio.run(_converse(f"ws://127.0.0.1:{ports['gateway']}/ws/session/deploy-test-2"
                                       f"?access_token={_token(url, 'deploy-test')}",
                                       "hello again"))
        assert frames[-1]["type"] == "done", frames
    rc = run2.stop(signal.SIGINT, group=True)
    assert rc == 0, run2.text()
    run2.assert_nothing_left()
    if conversation_missing:
        pytest.fail(f"started and stopped cleanly, but no WebSocket conversation: not built: "
                    f"{conversation_missing}")

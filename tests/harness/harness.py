"""The test harness every Python test of the project reuses.

Run with Debian's /usr/bin/python3 (python3-grpcio, python3-grpc-tools); it
needs nothing beyond the standard library and grpcio. See README.md here.

    from harness import Postgres, Service, free_port, proto_stubs

    pb = proto_stubs()                       # Python modules from proto/ only
    with Postgres() as pg, Service("store-svc", env={"DATABASE_URL": pg.url}) as store:
        stub = pb.store_pb2_grpc.StoreStub(store.channel())
        ...

Everything a test starts (services, PostgreSQL) is stopped when the
interpreter exits, even when the test failed; a child process also dies with
the test process if that is killed outright (PR_SET_PDEATHSIG through
setpriv). Temporary files live under one directory per process, removed at
exit unless CONVO_KEEP_TMP=1.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import grpc

__all__ = [
    "REPO_ROOT",
    "PROTO_DIR",
    "build_dir",
    "free_port",
    "proto_stubs",
    "Postgres",
    "Service",
    "tmp_root",
    "process_cpu_seconds",
]

# The repository this file belongs to (not a fixed path: CI runs a fresh
# clone somewhere else).
REPO_ROOT = Path(os.environ.get("CONVO_REPO_ROOT") or Path(__file__).resolve().parents[2])
PROTO_DIR = Path(os.environ.get("CONVO_PROTO_DIR") or REPO_ROOT / "proto")


def build_dir() -> Path:
    """The CMake build tree holding the binaries: $CONVO_BUILD_DIR (ctest sets
    it), else <repo>/build."""
    return Path(os.environ.get("CONVO_BUILD_DIR") or REPO_ROOT / "build")


def _truthy(value: Optional[str]) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


KEEP_TMP = _truthy(os.environ.get("CONVO_KEEP_TMP"))

_lock = threading.RLock()
_tmp_root: Optional[Path] = None
_live: list = []  # Services and Postgres instances to stop at exit
_given_ports: set = set()


def tmp_root() -> Path:
    """This process's temporary directory (created on first use). It can be
    traversed by the postgres user, so PostgreSQL data can live under it."""
    global _tmp_root
    with _lock:
        if _tmp_root is None:
            _sweep_stale_tmp()
            _tmp_root = Path(tempfile.mkdtemp(prefix=f"convo-test-{os.getpid()}-"))
            os.chmod(_tmp_root, 0o711)
        return _tmp_root


def _sweep_stale_tmp() -> None:
    """Removes the temporary directories of earlier harness processes that
    died without cleaning up (SIGKILL), unless they were kept on purpose."""
    for d in Path(tempfile.gettempdir()).glob("convo-test-*-*"):
        try:
            pid = int(d.name.split("-")[2])
        except ValueError:
            continue
        if (d / "KEPT").exists():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running (or the pid was reused: leave it)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            continue


def _at_exit() -> None:
    for obj in reversed(list(_live)):
        try:
            obj._emergency_stop()
        except Exception as e:  # never let one failure keep the rest running
            print(f"harness: cleaning up {obj!r} failed: {e}", file=sys.stderr)
    if _tmp_root is not None:
        if KEEP_TMP:
            (_tmp_root / "KEPT").touch()
            print(f"harness: kept temporary files in {_tmp_root}", file=sys.stderr)
        else:
            shutil.rmtree(_tmp_root, ignore_errors=True)


atexit.register(_at_exit)


def _die_with_parent(argv: list, as_user: Optional[str] = None) -> list:
    """Prefixes argv with setpriv so that the child is SIGKILLed when this
    process dies (even by SIGKILL), optionally switching to `as_user`.
    Python's preexec_fn is avoided on purpose: it is unsafe once grpc has
    started threads."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if as_user:
            return ["runuser", "-u", as_user, "--", *argv]
        return list(argv)
    prefix = [setpriv]
    if as_user:
        prefix += [f"--reuid={as_user}", f"--regid={as_user}", "--init-groups"]
    return [*prefix, "--pdeathsig=KILL", "--", *argv]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no output)"
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def _proc_stat(pid: int) -> Optional[list]:
    """The fields of /proc/PID/stat after the command name (field 3 on), or
    None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads); 0.0
    when it is gone."""
    f = _proc_stat(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK") if f else 0.0


# --------------------------------------------------------------------------
# ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now and was not handed out before by
    this process."""
    with _lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _given_ports:
                _given_ports.add(port)
                return port
    raise RuntimeError("no free port found")


def _port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# Python modules generated from proto/

_stubs: Optional[types.SimpleNamespace] = None


def proto_stubs() -> types.SimpleNamespace:
    """Generates Python modules from every .proto file under proto/ (and only
    those) once per process, makes them importable and returns a namespace:
    `.router_pb2`, `.router_pb2_grpc`, `.common_pb2`, `.health_pb2`,
    `.health_pb2_grpc`, `.store_pb2`, ... (the real modules are
    convo.v1.router_pb2, grpc.health.v1.health_pb2, ...; all of them are in
    `.modules` by full name; where two files share a base name the first in
    path order keeps the short name). `.dir` is where they were written.

    The generator is grpc_tools.protoc (python3-grpc-tools). Debian's
    grpc_tools bundles an old protoc that rejects some newer syntax (proto3
    `optional`); then the messages come from the system protoc and the
    service stubs from the harness's own writer, which emits what grpc_tools
    would. CONVO_STUBS=grpc_tools or CONVO_STUBS=protoc forces one way."""
    global _stubs
    with _lock:
        if _stubs is None:
            _stubs = _generate_stubs(PROTO_DIR)
        return _stubs


def _proto_files(proto_dir: Path) -> list:
    files = sorted(p.relative_to(proto_dir).as_posix() for p in proto_dir.rglob("*.proto"))
    if not files:
        raise RuntimeError(f"no .proto files under {proto_dir}")
    return files


def _generate_stubs(proto_dir: Path) -> types.SimpleNamespace:
    files = _proto_files(proto_dir)
    out = tmp_root() / "stubs"
    out.mkdir(exist_ok=True)
    how = os.environ.get("CONVO_STUBS", "")
    if how not in ("", "grpc_tools", "protoc"):
        raise ValueError(f"CONVO_STUBS must be grpc_tools or protoc, not {how!r}")

    errors = []
    generated_by = None
    if how in ("", "grpc_tools"):
        ok, msg = _generate_with_grpc_tools(proto_dir, files, out)
        if ok:
            generated_by = "grpc_tools"
        else:
            errors.append(f"grpc_tools.protoc: {msg}")
    if generated_by is None and how in ("", "protoc"):
        shutil.rmtree(out)
        out.mkdir()
        ok, msg = _generate_with_protoc(proto_dir, files, out)
        if ok:
            generated_by = "protoc"
        else:
            errors.append(f"protoc: {msg}")
    if generated_by is None:
        raise RuntimeError("generating Python modules from proto/ failed:\n" + "\n".join(errors))

    _make_importable(out)
    ns = types.SimpleNamespace(dir=out, generated_by=generated_by, modules={})
    for f in files:
        base = f[: -len(".proto")]
        for suffix in ("_pb2", "_pb2_grpc"):
            if not (out / f"{base}{suffix}.py").exists():
                continue
            full = base.replace("/", ".") + suffix
            mod = importlib.import_module(full)
            ns.modules[full] = mod
            short = full.rsplit(".", 1)[-1]
            if not hasattr(ns, short):
                setattr(ns, short, mod)
    return ns


def _generate_with_grpc_tools(proto_dir: Path, files: list, out: Path):
    try:
        import grpc_tools
    except ImportError as e:
        return False, f"not importable ({e}); install python3-grpc-tools"
    bundled = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}", f"-I{bundled}",
           f"--python_out={out}", f"--grpc_python_out={out}", *files]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=proto_dir)
    if r.returncode != 0:
        return False, (r.stderr or r.stdout).strip()
    return True, ""


def _generate_with_protoc(proto_dir: Path, files: list, out: Path):
    protoc = shutil.which("protoc")
    if protoc is None:
        return False, "protoc not found; install protobuf-compiler"
    descset = out / "_descriptors.pb"
    cmd = [protoc, f"-I{proto_dir}", "--include_imports", f"--descriptor_set_out={descset}",
           f"--python_out={out}", *files]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=proto_dir)
    if r.returncode != 0:
        return False, (r.stderr or r.stdout).strip()
    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(descset.read_bytes())
    _write_grpc_modules(fds, set(files), out)
    return True, ""


def _module_of(proto_file: str) -> str:
    return proto_file[: -len(".proto")].replace("/", ".") + "_pb2"


def _write_grpc_modules(fds, ours: set, out: Path) -> None:
    """Writes <file>_pb2_grpc.py for each file of ours, shaped like
    grpc_tools' output: <Service>Stub, <Service>Servicer and
    add_<Service>Servicer_to_server."""
    # Fully qualified message name -> (module, attribute path).
    where = {}

    def walk(module, prefix_name, prefix_attr, messages):
        for m in messages:
            name = f"{prefix_name}.{m.name}"
            attr = f"{prefix_attr}.{m.name}" if prefix_attr else m.name
            where[name] = (module, attr)
            walk(module, name, attr, m.nested_type)

    for f in fds.file:
        walk(_module_of(f.name), "." + f.package if f.package else "", "", f.message_type)

    kinds = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }
    for f in fds.file:
        if f.name not in ours:
            continue
        path = out / (f.name[: -len(".proto")] + "_pb2_grpc.py")
        lines = ["# Generated by tests/harness/harness.py from the descriptors protoc wrote. DO NOT EDIT!",
                 "import grpc", ""]
        aliases = {}

        def ref(type_name):
            module, attr = where[type_name]
            if module not in aliases:
                alias = module.replace("_", "__").replace(".", "_dot_")
                aliases[module] = alias
                pkg, _, leaf = module.rpartition(".")
                lines.insert(2, f"from {pkg} import {leaf} as {alias}" if pkg
                             else f"import {leaf} as {alias}")
            return f"{aliases[module]}.{attr}"

        body = []
        for svc in f.service:
            full = f"{f.package}.{svc.name}" if f.package else svc.name
            body += ["", "", f"class {svc.name}Stub(object):", "    def __init__(self, channel):"]
            if not svc.method:
                body.append("        pass")
            for m in svc.method:
                kind = kinds[(m.client_streaming, m.server_streaming)]
                body += [f"        self.{m.name} = channel.{kind}(",
                         f"            '/{full}/{m.name}',",
                         f"            request_serializer={ref(m.input_type)}.SerializeToString,",
                         f"            response_deserializer={ref(m.output_type)}.FromString)"]
            body += ["", "", f"class {svc.name}Servicer(object):"]
            if not svc.method:
                body.append("    pass")
            for m in svc.method:
                arg = "request_iterator" if m.client_streaming else "request"
                body += [f"    def {m.name}(self, {arg}, context):",
                         "        context.set_code(grpc.StatusCode.UNIMPLEMENTED)",
                         "        context.set_details('Method not implemented!')",
                         "        raise NotImplementedError('Method not implemented!')", ""]
            body += ["", f"def add_{svc.name}Servicer_to_server(servicer, server):",
                     "    rpc_method_handlers = {"]
            for m in svc.method:
                kind = kinds[(m.client_streaming, m.server_streaming)]
                body += [f"        '{m.name}': grpc.{kind}_rpc_method_handler(",
                         f"            servicer.{m.name},",
                         f"            request_deserializer={ref(m.input_type)}.FromString,",
                         f"            response_serializer={ref(m.output_type)}.SerializeToString),"]
            body += ["    }",
                     f"    generic_handler = grpc.method_handlers_generic_handler('{full}', rpc_method_handlers)",
                     "    server.add_generic_rpc_handlers((generic_handler,))"]
        path.write_text("\n".join(lines + body) + "\n")


def _make_importable(out: Path) -> None:
    """Puts `out` first on sys.path. A top-level package that already exists
    as a regular package (grpc, for grpc.health.v1) gets `out`'s directory
    appended to its __path__, so grpc.health.v1.health_pb2 imports beside
    grpcio's own grpc package."""
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    importlib.invalidate_caches()
    for top in sorted(p.name for p in out.iterdir() if p.is_dir()):
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            continue
        pkg = importlib.import_module(top)
        if str(out / top) not in list(pkg.__path__):
            pkg.__path__.append(str(out / top))


# --------------------------------------------------------------------------
# PostgreSQL


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies do not count:
    they hold no memory, and orphans may never be reaped in a container)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin, else the directory of a
    pg_ctl on PATH; $PG_BINDIR overrides."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    candidates = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        try:
            version = tuple(int(x) for x in d.parent.name.split("."))
        except ValueError:
            continue
        if (d / "postgres").exists() and (d / "initdb").exists():
            candidates.append((version, d))
    if candidates:
        return max(candidates)[1]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).resolve().parent
    raise FileNotFoundError("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin "
                            "nor on PATH: run deploy/install-deps.sh (package postgresql)")


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1:<free port>: trust auth,
    user postgres, fsync off. Data lives in a temporary directory until
    cleanup(). As root the server runs as the postgres system user (initdb
    and postgres refuse root).

    The server runs as a direct child of this process (not daemonized by
    pg_ctl), so it dies with the test process even when that is killed."""

    def __init__(self, port: Optional[int] = None, start: bool = True,
                 settings: Optional[Mapping[str, str]] = None, timeout: float = 30.0):
        self.bindir = pg_bindir()
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.url = self.url_for("postgres")
        self.timeout = timeout
        # fsync=off only: a killed server loses nothing (the OS keeps what
        # was written); synchronous_commit=off would lose the last commits
        # and make crash tests lie.
        self.settings = {"fsync": "off", **(settings or {})}
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            try:
                import pwd

                pw = pwd.getpwnam(self.user)
            except KeyError:
                raise RuntimeError("running as root needs the postgres system user "
                                   "(package postgresql): run deploy/install-deps.sh") from None
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir=tmp_root()))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.socket_dir.mkdir()
        self.log_path = self.dir / "postgres.log"
        if self.user:
            for p in (self.dir, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._proc: Optional[subprocess.Popen] = None
        with _lock:
            _live.append(self)
        self._initdb()
        if start:
            self.start()

    def __repr__(self) -> str:
        return f"<Postgres {self.host}:{self.port} {self.dir}>"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def _as_user(self, argv: list) -> list:
        return ["runuser", "-u", self.user, "--", *argv] if self.user else list(argv)

    def _initdb(self) -> None:
        cmd = self._as_user([str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                             "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"])
        r = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed ({r.returncode}):\n{r.stdout}{r.stderr}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "Postgres":
        """Starts the server (same data, same port after a stop) and waits
        until it accepts connections."""
        if self.running:
            return self
        argv = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.socket_dir), "-c", f"listen_addresses={self.host}"]
        for k, v in self.settings.items():
            argv += ["-c", f"{k}={v}"]
        with open(self.log_path, "ab") as log:
            # Its own process group, so kill() can take every backend down
            # at once, as a machine crash would.
            self._proc = subprocess.Popen(_die_with_parent(argv, self.user), cwd=self.dir,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True)
        deadline = time.monotonic() + self.timeout
        isready = [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port),
                   "-U", "postgres", "-d", "postgres"]
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self._proc.returncode} while starting:\n"
                                   f"{_tail(self.log_path)}")
            if subprocess.run(isready).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self._proc.kill()
                self._proc.wait()
                raise TimeoutError(f"postgres not ready after {self.timeout}s:\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """Fast shutdown (SIGINT); SIGKILL after `timeout`. Returns the exit
        code (None when it was not running)."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL to the server and all its backends: a crash, for recovery
        tests (start() then recovers the data). Returns once every one of
        them is gone, so a start() right after finds no shared memory in use."""
        if not self.running:
            return
        pgid = self._proc.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait()
        deadline = time.monotonic() + timeout
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"postgres processes of group {pgid} still alive after SIGKILL")
            time.sleep(0.02)

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Runs SQL with psql (unaligned, tuples only, stops at the first
        error) and returns its output; raises on failure."""
        cmd = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
               "-d", self.url_for(dbname), "-c", sql]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cpu_seconds(self) -> float:
        """CPU seconds this server has used so far: the postmaster, its live
        children (backends, background processes) and the children that
        already exited (the postmaster's cutime + cstime). Other servers on
        the machine are not counted. 0.0 when it is not running."""
        if not self.running:
            return 0.0
        f = _proc_stat(self._proc.pid)
        if f is None:
            return 0.0
        tick = os.sysconf("SC_CLK_TCK")
        total = sum(int(x) for x in f[11:15]) / tick
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            c = _proc_stat(int(p.name))
            if c is not None and int(c[1]) == self._proc.pid:
                total += (int(c[11]) + int(c[12])) / tick
        return total

    def cleanup(self) -> None:
        """Stops the server and removes its data."""
        self.stop()
        with _lock:
            if self in _live:
                _live.remove(self)
        if not KEEP_TMP:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _emergency_stop(self) -> None:
        self.stop(timeout=5.0)

    def __enter__(self) -> "Postgres":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


# --------------------------------------------------------------------------
# our services


def find_binary(name: str) -> Path:
    """The binary `name` in the build tree (<build>/<name>/<name>, <build>/<name>
    or <build>/bin/<name>)."""
    b = build_dir()
    for p in (b / name / name, b / name, b / "bin" / name):
        if p.is_file() and os.access(p, os.X_OK):
            return p
    raise FileNotFoundError(f"{name} not found in the build tree {b} (CONVO_BUILD_DIR): build it "
                            f"first, e.g. cmake -S {REPO_ROOT} -B {b} && cmake --build {b} -j2")


Ready = Union[None, str, Callable[["Service"], bool]]


# Our binaries that serve /metrics (--metrics-listen): the harness gives
# each its own free port, so that two of them (or a test run beside a
# deployment) never clash on the default service port + 1000.
METRICS_BINARIES = frozenset({"router-svc", "llm-svc", "store-svc", "summary-svc", "gateway"})


class Service:
    """One of our binaries, started with `--listen 127.0.0.1:<free port>` and
    `args`, in the environment of this process updated by `env` (a value of
    None removes a variable). Its stderr (JSON lines) goes to a log file in
    the temporary directory: log_lines() parses it. Binaries that serve
    metrics also get `--metrics-listen 127.0.0.1:<free port>` (unless `args`
    name one): `.metrics_port`, `.scrape()`, `.metric()`. `listen_flag`
    names the address flag of a binary not ours (Prometheus's
    --web.listen-address).

    `ready` says when start() returns: "grpc" (default) when
    grpc.health.v1.Health/Check("") answers SERVING; "grpc-up" when Check
    answers at all; "http" when GET /api/health answers 200; "tcp" when the
    port accepts connections; None at once; or a callable(service) -> bool.
    start() fails with the log tail if the process exits first or `timeout`
    passes.

    `tls` (a certs.Identity) runs it with mutual TLS: TLS_CERT_FILE, TLS_KEY_FILE,
    TLS_CA_FILE and TLS_REFRESH_SECONDS=1 in its environment (`env` may
    override them). The harness's own calls (readiness, channel()) then go
    over TLS as `caller` (another Identity; default `tls` itself)."""

    def __init__(self, name: str, args: Iterable[str] = (), env: Optional[Mapping[str, Optional[str]]] = None,
                 *, port: Optional[int] = None, host: str = "127.0.0.1", ready: Ready = "grpc",
                 timeout: float = 20.0, binary: Union[str, Path, None] = None, start: bool = True,
                 tls=None, caller=None, metrics_port: Optional[int] = None,
                 listen_flag: str = "--listen"):
        self.name = name
        self.listen_flag = listen_flag
        self.tls = tls
        self.caller = caller or tls
        self.binary = Path(binary) if binary else find_binary(name)
        self.args = list(args)
        self.env = dict(env or {})
        self.host = host
        self._auto_port = port is None
        self.port = port or free_port(host)
        own_metrics = name in METRICS_BINARIES and not any(
            a == "--metrics-listen" or a.startswith("--metrics-listen=") for a in self.args)
        self._auto_metrics_port = own_metrics and metrics_port is None
        self.metrics_port = (metrics_port or free_port(host)) if own_metrics else None
        self.ready = ready
        self.timeout = timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_root()))
        self.log_path = self.dir / "stderr.log"
        self.stdout_path = self.dir / "stdout.log"
        self._proc: Optional[subprocess.Popen] = None
        self._channels: list = []
        with _lock:
            _live.append(self)
        if start:
            self.start()

    def __repr__(self) -> str:
        return f"<Service {self.name} {self.addr} pid={self.pid}>"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll() if self._proc else None

    @property
    def metrics_addr(self) -> str:
        return f"{self.host}:{self.metrics_port}"

    def argv(self) -> list:
        extra = ["--metrics-listen", self.metrics_addr] if self.metrics_port else []
        return [str(self.binary), self.listen_flag, self.addr, *extra, *self.args]

    def _environ(self) -> dict:
        env = dict(os.environ)
        if self.tls is not None:
            env.update(self.tls.env(), TLS_REFRESH_SECONDS="1")
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def start(self) -> "Service":
        """Starts the process (again, on the same port, after a stop) and
        waits until it is ready. A first start on a port picked here that
        loses a race for it retries on another port."""
        if self.running:
            return self
        for attempt in range(3):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log, open(self.stdout_path, "ab") as out:
                self._proc = subprocess.Popen(_die_with_parent(self.argv()), cwd=self.dir,
                                              env=self._environ(), stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=log)
            try:
                self._wait_ready()
                return self
            except _Exited as e:
                text = self.log_path.read_bytes()[log_start:].decode(errors="replace").lower()
                lost_race = "address already in use" in text or "bind" in text
                if not ((self._auto_port or self._auto_metrics_port) and lost_race and attempt < 2):
                    raise RuntimeError(str(e)) from None
                if self._auto_port:
                    self.port = free_port(self.host)
                if self._auto_metrics_port:
                    self.metrics_port = free_port(self.host)
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        check = self._ready_check()
        while True:
            if self._proc.poll() is not None:
                raise _Exited(f"{self.name} exited with {self._proc.returncode} before it was ready "
                              f"({' '.join(self.argv())}); log tail:\n{self.log_tail()}")
            try:
                if check():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"{self.name} not ready ({self.ready!r}) within {self.timeout}s on "
                                   f"{self.addr}; log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def _ready_check(self) -> Callable[[], bool]:
        if self.ready is None:
            return lambda: True
        if callable(self.ready):
            return lambda: bool(self.ready(self))
        if self.ready == "tcp":
            return lambda: _port_open(self.host, self.port)
        if self.ready == "http":
            def http() -> bool:
                if not _port_open(self.host, self.port):
                    return False
                with urllib.request.urlopen(f"http://{self.addr}/api/health", timeout=2) as r:
                    return r.status == 200
            return http
        if self.ready in ("grpc", "grpc-up"):
            want_serving = self.ready == "grpc"

            def grpc_check() -> bool:
                # A fresh channel only once the port is open: a channel that
                # failed to connect backs off for seconds before it retries.
                if not _port_open(self.host, self.port):
                    return False
                status = self.health_check("", timeout=2.0)
                pb = proto_stubs().health_pb2
                return status == pb.HealthCheckResponse.SERVING or not want_serving
            return grpc_check
        raise ValueError(f"unknown ready mode {self.ready!r}")

    def health_check(self, service: str = "", timeout: float = 5.0) -> int:
        """grpc.health.v1.Health/Check(service) on a new channel; returns the
        status (an int of HealthCheckResponse.ServingStatus); raises
        grpc.RpcError on failure (NOT_FOUND for an unknown service)."""
        pb = proto_stubs()
        with self._open_channel() as ch:
            stub = pb.health_pb2_grpc.HealthStub(ch)
            return stub.Check(pb.health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def _open_channel(self, options: Optional[list] = None) -> grpc.Channel:
        if self.caller is not None:
            return self.caller.channel(self.addr, options)
        return grpc.insecure_channel(self.addr, options=options or [])

    def scrape(self, path: str = "/metrics", timeout: float = 5.0) -> str:
        """GET `path` from the metrics listener; the body as text (raises
        urllib.error.HTTPError for a status that is not 2xx)."""
        with urllib.request.urlopen(f"http://{self.metrics_addr}{path}", timeout=timeout) as r:
            return r.read().decode()

    def samples(self) -> list:
        """Every sample of /metrics as (name, labels dict, value), parsed by
        the Prometheus Python client's parser (python3-prometheus-client)."""
        from prometheus_client.parser import text_string_to_metric_families
        return [(s.name, dict(s.labels), s.value)
                for fam in text_string_to_metric_families(self.scrape()) for s in fam.samples]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include
        `labels` (0 when there are none)."""
        return sum(v for n, ls, v in self.samples()
                   if n == name and all(ls.get(k) == str(want) for k, want in labels.items()))

    def channel(self, options: Optional[list] = None) -> grpc.Channel:
        """A new channel to the service (plaintext, or mutual TLS as
        `caller`), closed by stop()."""
        ch = self._open_channel(options)
        self._channels.append(ch)
        return ch

    def _close_channels(self) -> None:
        for ch in self._channels:
            try:
                ch.close()
            except Exception:
                pass
        self._channels.clear()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> Optional[int]:
        """Sends `sig` and waits up to `timeout` s for the exit; returns the
        exit code (negative: killed by that signal; None if never started).
        If it does not exit in time it is SIGKILLed and TimeoutError raised."""
        self._close_channels()
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                raise TimeoutError(f"{self.name} did not exit within {timeout}s of signal {sig}; "
                                   f"killed. Log tail:\n{self.log_tail()}") from None
        return self._proc.returncode

    def kill(self) -> Optional[int]:
        """SIGKILL (a crash); returns the exit code."""
        self._close_channels()
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        return self._proc.returncode

    def _emergency_stop(self) -> None:
        if self.running:
            try:
                self.stop(timeout=3.0)
            except TimeoutError:
                pass

    # logs -----------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def log_lines(self, strict: bool = False) -> list:
        """stderr parsed line by line as JSON objects. A line that is not a
        JSON object (a sanitizer report, say) comes back as {"_raw": line},
        or raises ValueError with strict=True."""
        result = []
        for line in self.log_text().splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
            except ValueError:
                if strict:
                    raise ValueError(f"{self.name}: log line is not a JSON object: {line!r}") from None
                obj = {"_raw": line}
            result.append(obj)
        return result

    def wait_for_log(self, pred: Callable[[dict], bool], timeout: float = 10.0) -> dict:
        """Waits until a log line (parsed as by log_lines) satisfies `pred`;
        returns it, or raises TimeoutError with the log tail."""
        deadline = time.monotonic() + timeout
        while True:
            for obj in self.log_lines():
                if pred(obj):
                    return obj
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no matching log line within {timeout}s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        except TimeoutError:
            pass


class _Exited(Exception):
    pass

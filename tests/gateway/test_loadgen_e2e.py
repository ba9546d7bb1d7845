"""The C load generator (tests/gateway/loadgen/) against the real stack: it
counts every token of both paths, signs its sessions in with the tokens it
is given and spreads them over those users, and reports failures instead
of figures when answers break."""

import json
import subprocess

from conftest import dev_token
from harness import Service, build_dir

SESSIONS, TURNS, WORDS = 12, 3, 20


def loadgen(*args):
    r = subprocess.run([str(build_dir() / "tests" / "gateway" / "loadgen"), *args],
                       capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def test_every_token_of_both_paths_is_counted(stack, gateway_none):
    rc, out, err = loadgen("--gateway", gateway_none.addr, "--model", stack.model.addr,
                           "--sessions", str(SESSIONS), "--turns", str(TURNS),
                           "--words", str(WORDS), "--delay-ms", "5", "--stagger-ms", "20", "--json")
    assert rc == 0, out + err
    res = json.loads(out)
    assert [r["path"] for r in res["results"]] == ["offline model direct", "through the gateway"]
    for r in res["results"]:
        assert r["errors"] == 0
        assert r["tokens"] == SESSIONS * TURNS * WORDS
        assert r["frames"] >= r["tokens"]
        assert r["steady"] is not None
        assert r["ttft_p50_ms"] > 0
    assert res["errors"] == []
    # Every session went through the gateway into the store.
    users = stack.pg.psql("SELECT count(DISTINCT user_id) FROM sessions "
                          "WHERE session_id LIKE 'load-%' AND user_id LIKE 'load-%'")
    assert int(users) >= SESSIONS


def test_sessions_sign_in_with_the_token_files_users(stack, gateway, tmp_path):
    """A --auth dev gateway: line k of the file is a token of user lg-user-k;
    four sessions go two to each user, each accepted by its token."""
    tokens = tmp_path / "tokens"
    # Blank lines do not count.
    tokens.write_text(f"{dev_token(gateway, 'lg-user-0')}\n\n{dev_token(gateway, 'lg-user-1')}\n")
    rc, out, err = loadgen("--gateway", gateway.addr, "--sessions", "4", "--turns", "2",
                           "--words", "3", "--user-prefix", "lg-user-",
                           "--access-token-file", str(tokens), "--json")
    assert rc == 0, out + err
    run = json.loads(out)
    assert run["results"][0]["tokens"] == 4 * 2 * 3
    rows = stack.pg.psql("SELECT user_id, count(*) FROM sessions WHERE user_id LIKE 'lg-user-%' "
                         "GROUP BY user_id ORDER BY 1").split()
    assert rows == ["lg-user-0|2", "lg-user-1|2"]


def test_sessions_without_a_token_are_refused_and_reported(gateway):
    """The same gateway without tokens: every session fails at the
    handshake (401), and the run says so."""
    rc, out, err = loadgen("--gateway", gateway.addr, "--sessions", "3", "--turns", "2",
                           "--words", "3", "--json")
    assert rc == 1
    res = json.loads(out)["results"][0]
    assert res["errors"] == 3 and res["tokens"] == 0  # one per session: it never opened
    assert any(k.startswith("connection failed") for k in json.loads(out)["errors"])


def test_an_empty_token_file_is_refused(tmp_path):
    empty = tmp_path / "none"
    empty.write_text("\n\n")
    rc, out, err = loadgen("--access-token-file", str(empty))
    assert rc == 2
    assert "no token" in err


def test_broken_answers_are_errors_not_figures(stack, tmp_path):
    """A model that cuts every answer after 3 tokens, and a gateway port
    where nothing listens: every turn of both paths is an error, and the
    run fails."""
    broken = Service("offline-model", binary=build_dir() / "llm-svc" / "offline-model",
                     args=["--token-delay-ms", "0", "--fault", "drop"], ready="tcp")
    try:
        dead = broken.addr.rsplit(":", 1)[0] + ":1"
        rc, out, err = loadgen("--gateway", dead, "--model", broken.addr, "--sessions", "3",
                               "--turns", "2", "--words", "10", "--json")
    finally:
        broken.stop()
    assert rc == 1, out + err
    direct, through = json.loads(out)["results"]
    assert direct["errors"] == 3 * 2
    assert direct["tokens"] == 3 * 2 * 3  # what came before each cut
    assert through["errors"] == 3 and through["tokens"] == 0
    kinds = json.loads(out)["errors"]
    assert any(k.startswith("model:") or "differed" in k for k in kinds), kinds
    assert any(k.startswith("connection failed") for k in kinds), kinds

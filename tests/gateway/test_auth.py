"""gateway/auth.c from the attacker's side.

Tokens and keys are made by an independent implementation (python3-jwt with
python3-cryptography; forgeries by hand with hmac/base64) and verified by
tests/gateway/authcheck, which runs auth.c alone: one token a line on stdin,
one verdict a line on stdout ("ok <sub>" / "error <code>"). Every refusal is
asserted with its exact code next to a token that passes, so a missing check
fails its test. JWKS URLs are served by Python's http.server (counting the
fetches), over TLS with a CA made here where TLS is the point."""
import base64
import datetime
import hashlib
import hmac
import http.server
import ipaddress
import json
import os
import secrets
import select
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from harness import build_dir

AUTHCHECK = build_dir() / "tests" / "gateway" / "authcheck"
SUB = "user-1"
DROP = object()  # a claim value that removes the claim


# ------------------------------------------------------------------ helpers
def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over):
    now = int(time.time())
    c = {"sub": SUB, "iat": now, "exp": now + 300}
    c.update(over)
    return {k: v for k, v in c.items() if v is not DROP}


def token(key, alg="HS256", kid=None, headers=None, **over):
    h = dict(headers or {})
    if kid is not None:
        h["kid"] = kid
    return jwt.encode(claims(**over), key, algorithm=alg, headers=h or None)


def raw_token(key, payload: bytes, alg="HS256", headers=None):
    """A JWS over arbitrary payload bytes (not necessarily a JSON object)."""
    return jwt.api_jws.PyJWS().encode(payload, key, algorithm=alg, headers=headers)


def forge_hs256(key_bytes: bytes, header: dict, payload: dict) -> str:
    """HS256 by hand, with any bytes as the key (python3-jwt refuses a PEM
    public key as an HMAC secret, which is the point of the attack)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    sig = hmac.new(key_bytes, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(sig)


def jwk_of(private_key, kid, **extra):
    pub = private_key.public_key()
    alg = RSAAlgorithm if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm
    d = json.loads(alg.to_jwk(pub))
    if alg is ECAlgorithm:
        # RFC 7518 6.2.1.2: x and y are the full coordinate size. Debian's
        # PyJWT drops leading zero bytes (a short coordinate about one key in
        # 128), which the gateway rightly refuses as a malformed key.
        size = (pub.curve.key_size + 7) // 8
        nums = pub.public_numbers()
        d["x"] = b64(nums.x.to_bytes(size, "big"))
        d["y"] = b64(nums.y.to_bytes(size, "big"))
    d["kid"] = kid
    d.update(extra)
    return d


def jwks(*keys):
    return {"keys": list(keys)}


class Check:
    """One authcheck process; ask() sends a line and returns the answer."""

    def __init__(self, *args):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen([str(AUTHCHECK), *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True)

    def ask(self, line, timeout=30):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        assert ready, f"authcheck gave no answer in {timeout} s\n{self.stderr()}"
        out = self.p.stdout.readline()
        assert out, f"authcheck exited ({self.p.poll()})\n{self.stderr()}"
        return out.rstrip("\n")

    def stderr(self):
        self.log.seek(0)
        return self.log.read()

    def close(self):
        self.p.stdin.close()
        rc = self.p.wait(timeout=30)
        assert rc == 0, f"authcheck exit {rc} (sanitizer report or crash?)\n{self.stderr()}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.p.kill()
            self.p.wait()


def refused_at_start(*args):
    """authcheck whose auth_new fails: its message."""
    r = subprocess.run([str(AUTHCHECK), *args], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    return r.stderr


def wait_for(cond, timeout=15, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class JwksServer:
    """Serves self.body at /jwks.json with self.status; counts requests."""

    def __init__(self, body, tls_files=None):
        self.body = body
        self.status = 200
        self.count = 0
        self.send_length = True  # False: no Content-Length, the body ends at the close
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.count += 1
                data = server.body if isinstance(server.body, bytes) else json.dumps(server.body).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                if server.send_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.scheme = "http"
        if tls_files is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls_files)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------- keys
@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "ec2": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "secret": secrets.token_urlsafe(30),  # 40 characters, like Supabase's
    }


@pytest.fixture
def secret_file(tmp_path, keys):
    p = tmp_path / "jwt-secret"
    p.write_text(keys["secret"] + "\n")  # as `echo` or a Kubernetes Secret writes it
    return str(p)


@pytest.fixture
def jwks_file(tmp_path, keys):
    p = tmp_path / "jwks.json"
    p.write_text(json.dumps(jwks(jwk_of(keys["rsa"], "r1"), jwk_of(keys["ec"], "e1"))))
    return str(p)


# ------------------------------------------------------------ valid tokens
def test_valid_hs256_rs256_es256(secret_file, jwks_file, keys):
    with Check("--jwt-secret-file", secret_file, "--jwks-file", jwks_file) as c:
        assert c.ask(token(keys["secret"])) == f"ok {SUB}"
        assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == f"ok {SUB}"
        assert c.ask(token(keys["ec"], "ES256", kid="e1")) == f"ok {SUB}"
        assert c.ask(token(keys["ec"], "ES256", kid="e1", sub="a" * 128)) == "ok " + "a" * 128


def test_token_without_kid_needs_exactly_one_key_of_its_algorithm(tmp_path, keys):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(jwks(jwk_of(keys["rsa"], "r1"), jwk_of(keys["ec"], "e1"))))
    two = tmp_path / "two.json"
    two.write_text(json.dumps(jwks(jwk_of(keys["rsa"], "r1"), jwk_of(keys["rsa2"], "r2"))))
    with Check("--jwks-file", str(one)) as c:
        assert c.ask(token(keys["rsa"], "RS256")) == f"ok {SUB}"
    with Check("--jwks-file", str(two)) as c:
        assert c.ask(token(keys["rsa"], "RS256")) == "error unknown_key"
        assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == f"ok {SUB}"


# ------------------------------------------------------------------- times
def test_expired_and_leeway(secret_file, keys):
    now = int(time.time())
    with Check("--jwt-secret-file", secret_file) as c:  # default leeway 30 s
        assert c.ask(token(keys["secret"], exp=now - 120)) == "error token_expired"
        assert c.ask(token(keys["secret"], exp=now - 10)) == f"ok {SUB}"
    with Check("--jwt-secret-file", secret_file, "--jwt-leeway-secs", "0") as c:
        assert c.ask(token(keys["secret"], exp=now - 10)) == "error token_expired"
        assert c.ask(token(keys["secret"], exp=now + 120)) == f"ok {SUB}"


def test_not_yet_valid(secret_file, keys):
    now = int(time.time())
    with Check("--jwt-secret-file", secret_file) as c:
        assert c.ask(token(keys["secret"], nbf=now + 300)) == "error token_not_yet_valid"
        assert c.ask(token(keys["secret"], nbf=now + 10)) == f"ok {SUB}"  # within leeway
        assert c.ask(token(keys["secret"], iat=now + 300)) == "error token_not_yet_valid"
        assert c.ask(token(keys["secret"], iat=now + 10)) == f"ok {SUB}"
        assert c.ask(token(keys["secret"], nbf=now - 60)) == f"ok {SUB}"
    with Check("--jwt-secret-file", secret_file, "--jwt-leeway-secs", "0") as c:
        assert c.ask(token(keys["secret"], nbf=now + 10)) == "error token_not_yet_valid"


def test_missing_or_mistyped_exp(secret_file, keys):
    with Check("--jwt-secret-file", secret_file) as c:
        assert c.ask(token(keys["secret"], exp=DROP)) == "error missing_exp"
        assert c.ask(token(keys["secret"], exp=str(int(time.time()) + 300))) == "error malformed_token"
        assert c.ask(token(keys["secret"], exp=None)) == "error malformed_token"
        assert c.ask(token(keys["secret"], nbf="soon")) == "error malformed_token"
        assert c.ask(token(keys["secret"], exp=time.time() + 300.5)) == f"ok {SUB}"  # fractions are fine


# ------------------------------------------------------------ aud and iss
def test_audience(secret_file, keys):
    k = keys["secret"]
    with Check("--jwt-secret-file", secret_file, "--jwt-audience", "authenticated") as c:
        assert c.ask(token(k, aud="authenticated")) == f"ok {SUB}"
        assert c.ask(token(k, aud=["other", "authenticated"])) == f"ok {SUB}"
        assert c.ask(token(k, aud="anon")) == "error wrong_audience"
        assert c.ask(token(k, aud=["anon", "other"])) == "error wrong_audience"
        assert c.ask(token(k, aud=DROP)) == "error wrong_audience"
        assert c.ask(token(k, aud=7)) == "error wrong_audience"
    with Check("--jwt-secret-file", secret_file) as c:  # not configured: not checked
        assert c.ask(token(k, aud="anon")) == f"ok {SUB}"


def test_issuer(secret_file, keys):
    k, iss = keys["secret"], "https://abcdefghijklmnopqrst.supabase.co/auth/v1"
    with Check("--jwt-secret-file", secret_file, "--jwt-issuer", iss) as c:
        assert c.ask(token(k, iss=iss)) == f"ok {SUB}"
        assert c.ask(token(k, iss="https://evil.supabase.co/auth/v1")) == "error wrong_issuer"
        assert c.ask(token(k, iss=iss + "/")) == "error wrong_issuer"
        assert c.ask(token(k, iss=DROP)) == "error wrong_issuer"
        assert c.ask(token(k, iss=[iss])) == "error wrong_issuer"


# -------------------------------------------------------------- signatures
def test_bad_signatures(secret_file, jwks_file, keys):
    with Check("--jwt-secret-file", secret_file, "--jwks-file", jwks_file) as c:
        assert c.ask(token("another-secret-of-at-least-32-bytes!!")) == "error bad_signature"
        # Signed by another key under a known kid.
        assert c.ask(token(keys["rsa2"], "RS256", kid="r1")) == "error bad_signature"
        assert c.ask(token(keys["ec2"], "ES256", kid="e1")) == "error bad_signature"
        # A valid token with its claims swapped for another user's.
        for t in (token(keys["secret"]), token(keys["rsa"], "RS256", kid="r1"),
                  token(keys["ec"], "ES256", kid="e1")):
            h, _, s = t.split(".")
            forged = h + "." + b64(json.dumps(claims(sub="admin")).encode()) + "." + s
            assert c.ask(forged) == "error bad_signature"
            assert c.ask(t) == f"ok {SUB}"
        # Signatures of the wrong length (cut, extended, DER instead of r||s).
        t = token(keys["secret"])
        for cut in (1, 4, 11):  # each still base64url of a shorter signature
            assert c.ask(t[:-cut]) == "error bad_signature"
        assert c.ask(t + "AAAA") == "error bad_signature"
        t = token(keys["ec"], "ES256", kid="e1")
        h, p, s = t.split(".")
        raw = base64.urlsafe_b64decode(s + "==")
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        padded = b"\0" + raw[:32] + b"\0" + raw[32:]  # r and s with a leading zero each
        for sig in (der, padded, raw[:63], raw + b"\0"):
            assert c.ask(f"{h}.{p}.{b64(sig)}") == "error bad_signature"
        assert c.ask(f"{h}.{p}.{b64(raw)}") == f"ok {SUB}"


def test_alg_none_refused(secret_file, jwks_file, keys):
    with Check("--jwt-secret-file", secret_file, "--jwks-file", jwks_file) as c:
        unsigned = jwt.encode(claims(), None, algorithm="none")
        assert unsigned.endswith(".")
        assert c.ask(unsigned) == "error malformed_token"  # no signature at all
        p = b64(json.dumps(claims()).encode())
        for sig in (b"x" * 32, b"x" * 64, b"x" * 256):
            h = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            assert c.ask(f"{h}.{p}.{b64(sig)}") == "error alg_not_allowed"
            h = b64(json.dumps({"alg": "none", "kid": "r1"}).encode())
            assert c.ask(f"{h}.{p}.{b64(sig)}") == "error alg_not_allowed"
        for alg in ("None", "NONE", "nOnE", ""):  # libcjose refuses to parse these
            h = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
            assert c.ask(f"{h}.{p}.{b64(b'x' * 32)}") == "error malformed_token", alg
        # The same claims signed properly pass.
        assert c.ask(token(keys["secret"])) == f"ok {SUB}"


def test_hs256_forged_with_the_rsa_public_key(secret_file, tmp_path, keys):
    """The classic algorithm confusion: the attacker signs HS256 with the
    server's public key as the HMAC secret."""
    pub = keys["rsa"].public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk_text = json.dumps(jwk_of(keys["rsa"], "r1")).encode()
    only = tmp_path / "rsa-only.json"
    only.write_text(json.dumps(jwks(jwk_of(keys["rsa"], "r1"))))
    forged = [forge_hs256(k, {"alg": "HS256", "typ": "JWT", "kid": "r1"}, claims())
              for k in (pem, der, jwk_text)]
    with Check("--jwks-file", str(only)) as c:  # JWKS only: HS256 has no key at all
        for f in forged:
            assert c.ask(f) == "error alg_not_allowed"
        assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == f"ok {SUB}"
    with Check("--jwks-file", str(only), "--jwt-secret-file", secret_file) as c:
        for f in forged:  # HS256 is checked with the secret only, never a JWKS key
            assert c.ask(f) == "error bad_signature"


def test_algorithms_outside_the_key_types(secret_file, jwks_file, keys):
    with Check("--jwt-secret-file", secret_file, "--jwks-file", jwks_file) as c:
        assert c.ask(token(keys["rsa"], "RS384", kid="r1")) == "error alg_not_allowed"
        assert c.ask(token(keys["rsa"], "PS256", kid="r1")) == "error alg_not_allowed"
        assert c.ask(token(keys["secret"], "HS512")) == "error alg_not_allowed"
        assert c.ask(token(keys["p384"], "ES384", kid="e1")) == "error alg_not_allowed"
        # A kid of the other key type: RS256 under the EC key's kid.
        assert c.ask(token(keys["rsa"], "RS256", kid="e1")) == "error alg_not_allowed"
        assert c.ask(token(keys["ec"], "ES256", kid="r1")) == "error alg_not_allowed"
    with Check("--jwt-secret-file", secret_file) as c:  # no JWKS: no RS256/ES256
        assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == "error alg_not_allowed"
        assert c.ask(token(keys["ec"], "ES256", kid="e1")) == "error alg_not_allowed"


def test_jwks_keys_that_are_not_used(tmp_path, keys):
    oct_secret = b"a-symmetric-key-published-in-the-jwks!!"
    bad = [
        {"kty": "oct", "k": b64(oct_secret), "kid": "o1", "alg": "HS256"},
        jwk_of(keys["rsa1024"], "short"),
        jwk_of(keys["p384"], "p384"),
        jwk_of(keys["rsa2"], "rs512", alg="RS512"),
        jwk_of(keys["ec2"], "enc", use="enc"),
        jwk_of(keys["rsa2"], "wrapkey", key_ops=["wrapKey"]),
        {"kty": "RSA", "kid": "broken", "n": "AQAB", "e": "AQAB"},
        "not an object",
    ]
    p = tmp_path / "jwks.json"
    p.write_text(json.dumps(jwks(*bad, jwk_of(keys["rsa"], "good"))))
    with Check("--jwks-file", str(p)) as c:
        assert c.ask(token(keys["rsa"], "RS256", kid="good")) == f"ok {SUB}"
        assert c.ask(forge_hs256(oct_secret, {"alg": "HS256", "kid": "o1"}, claims())) == \
            "error alg_not_allowed"
        assert c.ask(token(keys["rsa1024"], "RS256", kid="short")) == "error unknown_key"
        assert c.ask(token(keys["rsa2"], "RS256", kid="rs512")) == "error unknown_key"
        assert c.ask(token(keys["ec2"], "ES256", kid="enc")) == "error unknown_key"
        assert c.ask(token(keys["rsa2"], "RS256", kid="wrapkey")) == "error unknown_key"
    p.write_text(json.dumps(jwks(*bad)))
    assert "no usable key" in refused_at_start("--jwks-file", str(p))


# ----------------------------------------------------------------- subject
def test_subject(secret_file, keys):
    k = keys["secret"]
    with Check("--jwt-secret-file", secret_file) as c:
        assert c.ask(token(k, sub=DROP)) == "error invalid_subject"
        assert c.ask(token(k, sub="")) == "error invalid_subject"
        assert c.ask(token(k, sub="a" * 129)) == "error invalid_subject"
        assert c.ask(token(k, sub="a" * 128)) == "ok " + "a" * 128
        assert c.ask(token(k, sub="auth0|123")) == "error invalid_subject"
        assert c.ask(token(k, sub="a b")) == "error invalid_subject"
        assert c.ask(token(k, sub="a\u0000b")) == "error invalid_subject"
        assert c.ask(token(k, sub="é")) == "error invalid_subject"
        assert c.ask(token(k, sub=42)) == "error invalid_subject"
        assert c.ask(token(k, sub=["a"])) == "error invalid_subject"
        u = str(uuid.uuid4())
        assert c.ask(token(k, sub=u)) == f"ok {u}"


# ----------------------------------------------------------------- garbage
def test_garbage_tokens(secret_file, jwks_file, keys):
    k = keys["secret"]
    good = token(k)
    h, p, s = good.split(".")
    signed = lambda payload, **kw: raw_token(k, payload, **kw)  # noqa: E731
    no_b64 = lambda seg: seg[:len(seg) - (len(seg) - 1) % 4]  # noqa: E731 (4n+1 chars: no base64)
    cases = [
        "abc", "a.b", "a.b.c", "..", "a..c", ".b.c", "a.b.", f"{h}.{p}", f"{h}.{p}.{s}.x",
        f"{h}.{p}.{s}.{s}.{s}",  # JWE-shaped
        f"{h}.{p}.{s}=", f"{h}=.{p}.{s}", f"{h} .{p}.{s}", f"Bearer {good}",
        good.replace("-", "+").replace("_", "/") + "+/",
        f"{h}.{p}.{s}\x7f", f"é.{p}.{s}", "\t", " ", "x" * 100,
        f"{b64(b'[]')}.{p}.{s}", f"{b64(b'null')}.{p}.{s}", f"{b64(b'{')}.{p}.{s}",
        f"{b64(json.dumps({'alg': 5}).encode())}.{p}.{s}",
        f"{b64(json.dumps({'typ': 'JWT'}).encode())}.{p}.{s}",
        f"{no_b64(h)}.{p}.{s}", f"{h}.{no_b64(p)}.{s}", f"{h}.{p}.{no_b64(s)}",
        # Signed properly, but the claims are no JSON object:
        signed(b"[1,2]"), signed(b"\"sub\""), signed(b"{\"sub\":\"a\""), signed(b"not json"),
        signed(json.dumps(claims()).encode() + b"garbage"),
        signed(json.dumps(claims()).encode() + b"\0"),
        signed(b"{" * 40 + b"}" * 40),
        # Signed, with header members that must be refused:
        signed(json.dumps(claims()).encode(), headers={"crit": ["exp"]}),
        forge_hs256(k.encode(), {"alg": "HS256", "kid": 7}, claims()),
        forge_hs256(k.encode(), {"alg": "HS256", "kid": None}, claims()),
    ]
    with Check("--jwt-secret-file", secret_file, "--jwks-file", jwks_file) as c:
        assert c.ask("") == "error missing_token"
        for t in cases:
            assert c.ask(t) == "error malformed_token", t
        assert c.ask(good) == f"ok {SUB}"
        # Random bytes of many shapes (never a crash; checked by the exit
        # status and the sanitizers).
        rnd = __import__("random").Random(1234)
        alphabet = "ABCxyz019-_.=+/ {}\"'\\é"
        for _ in range(300):
            n = rnd.randrange(1, 200)
            t = "".join(rnd.choice(alphabet) for _ in range(n)).replace("\n", "")
            assert c.ask(t).startswith("error "), t


def test_token_size_bound(secret_file, keys):
    big = token(keys["secret"], pad="x" * 9000)
    assert len(big) > 8192
    with Check("--jwt-secret-file", secret_file) as c:  # default --jwt-max-bytes 8192
        assert c.ask(big) == "error malformed_token"
        assert c.ask(token(keys["secret"], pad="x" * 4000)) == f"ok {SUB}"
    with Check("--jwt-secret-file", secret_file, "--jwt-max-bytes", "16384") as c:
        assert c.ask(big) == f"ok {SUB}"


# ---------------------------------------------------------------- JWKS URL
def test_unknown_kid_refetches_once_then_refuses(keys):
    with JwksServer(jwks(jwk_of(keys["rsa"], "r1"))) as srv:
        with Check("--jwks-url", srv.url, "--jwks-refetch-secs", "60",
                   "--jwks-refresh-secs", "3600") as c:
            assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == f"ok {SUB}"
            assert srv.count == 1  # fetched once at start; a known kid costs no fetch
            unknown = token(keys["rsa2"], "RS256", kid="r2")
            assert c.ask(unknown) == "error unknown_key"
            wait_for(lambda: srv.count == 2, what="the refetch of the JWKS")
            # More unknown kids within --jwks-refetch-secs: refused, no fetch.
            for i in range(30):
                assert c.ask(token(keys["rsa2"], "RS256", kid=f"x{i}")) == "error unknown_key"
            assert c.ask(unknown) == "error unknown_key"
            time.sleep(0.5)
            assert srv.count == 2
            assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == f"ok {SUB}"


def test_rotated_key_at_the_url_verifies_after_the_refetch(keys):
    with JwksServer(jwks(jwk_of(keys["rsa"], "r1"))) as srv:
        with Check("--jwks-url", srv.url, "--jwks-refetch-secs", "1") as c:
            assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == f"ok {SUB}"
            srv.body = jwks(jwk_of(keys["ec"], "e2"))  # the provider rotated its key
            new = token(keys["ec"], "ES256", kid="e2")
            assert c.ask(new) == "error unknown_key"  # the loop never waits for the fetch
            wait_for(lambda: srv.count == 2, what="the refetch")
            wait_for(lambda: c.ask(new) == f"ok {SUB}", what="the new key to verify")
            assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == "error unknown_key"


def test_periodic_refresh_drops_a_removed_key(keys):
    with JwksServer(jwks(jwk_of(keys["rsa"], "r1"), jwk_of(keys["ec"], "e1"))) as srv:
        with Check("--jwks-url", srv.url, "--jwks-refresh-secs", "1",
                   "--jwks-refetch-secs", "3600") as c:
            old = token(keys["rsa"], "RS256", kid="r1")
            assert c.ask(old) == f"ok {SUB}"
            srv.body = jwks(jwk_of(keys["ec"], "e1"))  # r1 revoked
            wait_for(lambda: c.ask(old) == "error unknown_key", what="r1 to be dropped")
            assert c.ask(token(keys["ec"], "ES256", kid="e1")) == f"ok {SUB}"


def test_unreachable_or_bad_jwks_url_gives_auth_unavailable_then_recovers(keys):
    good = jwks(jwk_of(keys["rsa"], "r1"))
    t = token(keys["rsa"], "RS256", kid="r1")
    with JwksServer(good) as srv:
        srv.status = 500
        with Check("--jwks-url", srv.url, "--jwks-refetch-secs", "1",
                   "--jwks-refresh-secs", "1") as c:
            assert c.ask(t) == "error auth_unavailable"
            srv.status = 200
            wait_for(lambda: c.ask(t) == f"ok {SUB}", what="the retry after the failure")
            # Later bad answers keep the keys loaded before.
            for bad in (b"{not json", json.dumps(jwks()).encode()):
                srv.body = bad
                seen = srv.count
                wait_for(lambda: srv.count >= seen + 2, what="two refreshes")
                assert c.ask(t) == f"ok {SUB}"
        assert "HTTP status 500" in c.stderr()


def test_jwks_size_and_time_bounds(keys):
    many = jwks(*[jwk_of(keys["rsa"], f"k{i}") for i in range(20)])
    t = token(keys["rsa"], "RS256", kid="k0")
    with JwksServer(many) as srv:
        for send_length in (True, False):  # announced, or found while reading
            srv.send_length = send_length
            with Check("--jwks-url", srv.url, "--jwks-max-bytes", "2048") as c:
                assert c.ask(t) == "error auth_unavailable"
            assert "over --jwks-max-bytes" in c.stderr()
        with Check("--jwks-url", srv.url) as c:
            assert c.ask(t) == f"ok {SUB}"
    # A server that accepts the connection and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/jwks.json"
        started = time.monotonic()
        with Check("--jwks-url", url, "--jwks-timeout-ms", "300") as c:
            assert c.ask(t, timeout=20) == "error auth_unavailable"
        assert time.monotonic() - started < 20
        assert "timed out" in c.stderr().lower() or "timeout" in c.stderr().lower()


def make_tls(tmp_path, san):
    """A CA and a server certificate for `san` signed by it: (ca, cert, key) paths."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "convo auth test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    d = tmp_path / f"tls-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "ca.pem"), str(d / "cert.pem"), str(d / "key.pem")


def test_jwks_over_tls_is_verified(tmp_path, keys):
    t = token(keys["rsa"], "RS256", kid="r1")
    body = jwks(jwk_of(keys["rsa"], "r1"))
    ca, cert, key = make_tls(tmp_path, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    with JwksServer(body, tls_files=(cert, key)) as srv:
        with Check("--jwks-url", srv.url, "--jwks-ca-file", ca) as c:
            assert c.ask(t) == f"ok {SUB}"
        with Check("--jwks-url", srv.url) as c:  # a CA the system does not trust
            assert c.ask(t) == "error auth_unavailable"
    # A certificate for another name, from the trusted CA.
    ca, cert, key = make_tls(tmp_path, x509.DNSName("idp.example.com"))
    with JwksServer(body, tls_files=(cert, key)) as srv:
        with Check("--jwks-url", srv.url, "--jwks-ca-file", ca) as c:
            assert c.ask(t) == "error auth_unavailable"


def test_jwks_url_in_the_clear_only_to_loopback():
    for url in ("http://idp.example.com/jwks.json", "http://10.0.0.1/jwks.json",
                "ftp://127.0.0.1/jwks.json", "file:///etc/passwd", "not a url"):
        msg = refused_at_start("--jwks-url", url)
        assert "--jwks-url" in msg, msg


# --------------------------------------------------------------- JWKS file
def test_key_rotated_in_the_jwks_file(tmp_path, keys):
    p = tmp_path / "jwks.json"
    p.write_text(json.dumps(jwks(jwk_of(keys["rsa"], "r1"))))
    old, new = token(keys["rsa"], "RS256", kid="r1"), token(keys["ec"], "ES256", kid="e2")
    with Check("--jwks-file", str(p)) as c:
        assert c.ask(old) == f"ok {SUB}"
        p.write_text(json.dumps(jwks(jwk_of(keys["ec"], "e2"))))  # rotated
        assert c.ask(new) == f"ok {SUB}"  # re-read at once for the unknown kid
        assert c.ask(old) == "error unknown_key"  # the old key is gone


def test_jwks_file_rate_bound_and_refused_shapes(tmp_path, keys):
    p = tmp_path / "jwks.json"
    p.write_text(json.dumps(jwks(jwk_of(keys["rsa"], "r1"))))
    with Check("--jwks-file", str(p), "--jwks-refetch-secs", "3600") as c:
        assert c.ask(token(keys["rsa2"], "RS256", kid="a")) == "error unknown_key"  # re-read
        p.write_text(json.dumps(jwks(jwk_of(keys["rsa"], "r1"), jwk_of(keys["rsa2"], "b"))))
        # Within --jwks-refetch-secs: not re-read, so still unknown.
        assert c.ask(token(keys["rsa2"], "RS256", kid="b")) == "error unknown_key"
    for body in ("", "[]", '{"keys": {}}', "{not json", json.dumps(jwks()) + "x"):
        p.write_text(body)
        assert "JWKS" in refused_at_start("--jwks-file", str(p))
    p.write_text(json.dumps(jwks(*[jwk_of(keys["rsa"], f"k{i}") for i in range(10)])))
    assert "over" in refused_at_start("--jwks-file", str(p), "--jwks-max-bytes", "1000")
    assert "No such file" in refused_at_start("--jwks-file", str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- Supabase
SUPABASE_ISS = "https://abcdefghijklmnopqrst.supabase.co/auth/v1"


def supabase_claims(user):
    now = int(time.time())
    return {
        "iss": SUPABASE_ISS, "sub": user, "aud": "authenticated", "exp": now + 3600, "iat": now,
        "email": "alice@example.com", "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {"email_verified": True}, "role": "authenticated", "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}], "session_id": str(uuid.uuid4()),
        "is_anonymous": False,
    }


def test_supabase_tokens(tmp_path, secret_file, keys):
    """Supabase Auth's access tokens as they are: the legacy HS256 project
    secret, and the asymmetric ES256 key published at
    /auth/v1/.well-known/jwks.json — both configured at once, as during
    Supabase's migration from one to the other."""
    user = str(uuid.uuid4())
    kid = str(uuid.uuid4())
    published = jwks({**jwk_of(keys["ec"], kid), "alg": "ES256", "use": "sig",
                      "key_ops": ["verify"], "ext": True})
    legacy = jwt.encode(supabase_claims(user), keys["secret"], algorithm="HS256",
                        headers={"typ": "JWT"})
    current = jwt.encode(supabase_claims(user), keys["ec"], algorithm="ES256",
                         headers={"kid": kid, "typ": "JWT"})
    anon = jwt.encode({**supabase_claims(user), "aud": "anon", "role": "anon"}, keys["secret"],
                      algorithm="HS256")
    with JwksServer(published) as srv:
        with Check("--jwt-secret-file", secret_file, "--jwks-url", srv.url,
                   "--jwt-audience", "authenticated", "--jwt-issuer", SUPABASE_ISS) as c:
            assert c.ask(legacy) == f"ok {user}"
            assert c.ask(current) == f"ok {user}"
            assert c.ask(anon) == "error wrong_audience"
        with Check("--jwks-url", srv.url, "--jwt-audience", "authenticated",
                   "--jwt-issuer", SUPABASE_ISS) as c:  # after the legacy secret is revoked
            assert c.ask(current) == f"ok {user}"
            assert c.ask(legacy) == "error alg_not_allowed"


# --------------------------------------------------------------------- dev
def test_dev_tokens_verify_and_are_the_gateways_own(keys):
    with Check("--auth", "dev") as c, Check("--auth", "dev") as other:
        answer = c.ask("sign alice")
        assert answer.startswith("token ")
        t = answer.split(" ", 1)[1]
        assert c.ask(t) == "ok alice"
        # Read by an independent implementation: HS256, sub, exp after iat.
        hdr = jwt.get_unverified_header(t)
        body = jwt.decode(t, options={"verify_signature": False})
        assert hdr["alg"] == "HS256" and body["sub"] == "alice"
        assert body["exp"] - body["iat"] == 86400
        # Another gateway's start-up secret is another secret.
        assert other.ask(t) == "error bad_signature"
        assert c.ask("sign bad|user") == "error invalid_subject"
        assert c.ask("sign " + "a" * 129) == "error invalid_subject"
        # Nothing but its own tokens.
        assert c.ask(token(keys["secret"], iss="convo-gateway-dev")) == "error bad_signature"
        assert c.ask(token(keys["rsa"], "RS256", kid="r1")) == "error alg_not_allowed"


def test_dev_tokens_expire():
    with Check("--auth", "dev", "--dev-token-ttl-secs", "2", "--jwt-leeway-secs", "0") as c:
        t = c.ask("sign bob").split(" ", 1)[1]
        assert c.ask(t) == "ok bob"
        time.sleep(3.2)
        assert c.ask(t) == "error token_expired"


def test_modes(secret_file, keys):
    msg = refused_at_start()  # the default is jwt, and it has no key source
    assert "--auth dev" in msg and "--jwks-url" in msg
    assert "--auth dev" in refused_at_start("--auth", "jwt")
    assert "jwt, dev or none" in refused_at_start("--auth", "yes")
    with Check("--jwt-secret-file", secret_file) as c:
        assert c.ask("sign alice") == "error wrong_mode"
    with Check("--auth", "none") as c:
        assert c.ask(token(keys["secret"])) == "error wrong_mode"


def test_bad_key_sources_refused_at_start(tmp_path, jwks_file):
    short = tmp_path / "short"
    short.write_text("too-short-secret\n")
    assert "at least 32" in refused_at_start("--jwt-secret-file", str(short))
    assert "No such file" in refused_at_start("--jwt-secret-file", str(tmp_path / "missing"))
    assert "not both" in refused_at_start("--jwks-file", jwks_file, "--jwks-url",
                                          "https://127.0.0.1:1/jwks.json")
    assert "at least 1" in refused_at_start("--jwks-file", jwks_file, "--jwks-refetch-secs", "0")


def test_tokens_are_never_logged(tmp_path, secret_file, jwks_file, keys):
    tokens = [token(keys["secret"]), token(keys["secret"], exp=1),
              token(keys["rsa"], "RS256", kid="r1"), token(keys["rsa2"], "RS256", kid="nope"),
              token("another-secret-of-at-least-32-bytes!!"), token(keys["secret"], sub="a|b")]
    with Check("--jwt-secret-file", secret_file, "--jwks-file", jwks_file,
               "--log-level", "debug") as c:
        for t in tokens:
            assert c.ask(t).split()[0] in ("ok", "error")
    log = c.stderr()
    assert "JWKS" in log  # debug logging was on and did write
    for t in tokens:
        for part in t.split("."):
            assert part not in log
    with Check("--auth", "dev", "--log-level", "debug") as c:
        t = c.ask("sign alice").split(" ", 1)[1]
        assert c.ask(t) == "ok alice"
    assert t.split(".")[2] not in c.stderr()

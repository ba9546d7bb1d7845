"""Throwaway certificate authorities and certificates for the mutual TLS
tests, made with the openssl CLI (never a library of ours), under the
harness's temporary directory.

    from certs import CA

    ca = CA()                                   # a new CA (EC P-256)
    store = ca.issue("store-svc")               # DNS:store-svc.convo.svc, IP:127.0.0.1
    Service("store-svc", tls=store, ...)        # TLS_CERT_FILE / KEY / CA set for it
    ch = ca.issue("gateway").channel(store.addr)  # grpcio with the gateway's certificate

A certificate's files sit in a folder laid out as a Kubernetes Secret
volume: `tls.crt`, `tls.key`, `ca.crt` are symbolic links into `..data`,
itself a link to the current version; `Identity.replace_with()` swaps
`..data` at once, as the kubelet does when cert-manager renews a Secret.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import grpc

from harness import tmp_root

_counter = itertools.count(1)


def _openssl(*args: str, cwd: Optional[Path] = None) -> None:
    r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{r.stderr}")


_CA_CONF = """[ca]
default_ca = this
[this]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
[any]
commonName = supplied
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {name}
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""


class CA:
    """A certificate authority: an EC P-256 key and a self-signed
    certificate valid for `days`. `.cert` is its PEM file."""

    def __init__(self, name: str = "convo-test-ca", days: int = 30):
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"ca-{next(_counter)}-", dir=tmp_root()))
        (self.dir / "issued").mkdir()
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        self.conf = self.dir / "ca.cnf"
        self.conf.write_text(_CA_CONF.format(dir=self.dir, name=name))
        self.key = self.dir / "ca.key"
        self.cert = self.dir / "ca.crt"
        _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-days", str(days),
                 "-config", str(self.conf), "-extensions", "ca_ext")

    def issue(self, name: str, dns: Optional[Iterable[str]] = None,
              ips: Iterable[str] = ("127.0.0.1",), days: int = 30, expired: bool = False,
              extra_ca: Iterable["CA"] = ()) -> "Identity":
        """A certificate for `name` (its caller name is the first label of
        the first DNS name): DNS names `dns` (default NAME.convo.svc), then
        the IP addresses `ips` (the tests dial 127.0.0.1), for server and
        client use. expired=True: valid only in 2020. The Identity's CA file
        holds this CA and the `extra_ca` (a trust bundle during a CA change)."""
        dns = list(dns) if dns is not None else [f"{name}.convo.svc"]
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        n = next(_counter)
        work = self.dir / f"{name}-{n}"
        work.mkdir()
        key, csr, crt, ext = work / "tls.key", work / "req.csr", work / "tls.crt", work / "ext.cnf"
        ext.write_text("[ext]\nbasicConstraints = critical, CA:FALSE\n"
                       "keyUsage = critical, digitalSignature, keyEncipherment\n"
                       "extendedKeyUsage = serverAuth, clientAuth\n"
                       + (f"subjectAltName = {', '.join(sans)}\n" if sans else ""))
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
        when = (["-startdate", "20200101000000Z", "-enddate", "20200201000000Z"] if expired
                else ["-days", str(days)])
        _openssl("ca", "-batch", "-notext", "-config", str(self.conf), "-cert", str(self.cert),
                 "-keyfile", str(self.key), "-in", str(csr), "-out", str(crt),
                 "-extfile", str(ext), "-extensions", "ext", *when)
        bundle = work / "ca.crt"
        bundle.write_text("".join(c.cert.read_text() for c in (self, *extra_ca)))
        return Identity(name, work)


class Identity:
    """A certificate, its key and the CA bundle its holder trusts, laid out
    as a Kubernetes Secret volume in `.dir` (paths `.cert`, `.key`, `.ca`)."""

    def __init__(self, name: str, version_dir: Path):
        self.name = name
        self.dir = Path(tempfile.mkdtemp(prefix=f"tls-{name}-", dir=tmp_root()))
        self._link_version(version_dir)
        for f in ("tls.crt", "tls.key", "ca.crt"):
            os.symlink(f"..data/{f}", self.dir / f)
        self.cert, self.key, self.ca = self.dir / "tls.crt", self.dir / "tls.key", self.dir / "ca.crt"

    def _link_version(self, version_dir: Path) -> None:
        tmp = self.dir / "..data_tmp"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(version_dir, tmp)
        os.replace(tmp, self.dir / "..data")  # one rename: readers see old or new, whole

    def replace_with(self, other: "Identity") -> None:
        """Makes this identity's files the other's, at once (as the kubelet
        updates a Secret volume). Processes started with these paths read
        the new files on their next refresh."""
        self._link_version(Path(os.readlink(other.dir / "..data")))

    def env(self) -> dict:
        return {"TLS_CERT_FILE": str(self.cert), "TLS_KEY_FILE": str(self.key),
                "TLS_CA_FILE": str(self.ca)}

    def args(self) -> list:
        return ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                "--tls-ca-file", str(self.ca)]

    def serial(self) -> int:
        out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(self.cert)],
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip().split("=", 1)[1], 16)

    def credentials(self) -> grpc.ChannelCredentials:
        """grpcio channel credentials: trusts this identity's CA bundle and
        shows its certificate."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                            private_key=self.key.read_bytes(),
                                            certificate_chain=self.cert.read_bytes())

    def channel(self, addr: str, options: Optional[list] = None) -> grpc.Channel:
        """A new grpcio channel to addr ("127.0.0.1:PORT"; the server's
        certificate must name 127.0.0.1) calling as this identity."""
        return grpc.secure_channel(addr, self.credentials(), options=options or [])

    def server_credentials(self, require_client_cert: bool = True) -> grpc.ServerCredentials:
        """grpcio server credentials with this certificate, verifying client
        certificates against this identity's CA bundle."""
        return grpc.ssl_server_credentials([(self.key.read_bytes(), self.cert.read_bytes())],
                                           root_certificates=self.ca.read_bytes(),
                                           require_client_auth=require_client_cert)

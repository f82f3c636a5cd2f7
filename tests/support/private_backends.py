"""A PostgreSQL and a Redis of a test's own, on free ports, that the test may stop, kill and restart; either may
speak TLS only, with certificates from a throw-away CA (`ThrowawayPki`).

The machine's instances (5432, 6379) serve every other test run: a fault test never touches them. PostgreSQL's
initdb refuses to run as root, so its tools run as the `postgres` user in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.mesh import free_port


@dataclass(frozen=True)
class ThrowawayPki:
    """A throw-away CA (`ca.pem`) and what it signed, as PEM files in `folder`: a server certificate for the name
    `localhost` alone (`server.pem`, `server.key`), so that a client which checks host names accepts the server at
    localhost and refuses it at 127.0.0.1, and a client certificate for the user `postgres` (`client.pem`,
    `client.key`)."""

    folder: Path

    @classmethod
    def create(cls, folder: Path) -> ThrowawayPki:
        """A new CA and its two leaves in `folder` (made when absent), valid for an hour."""
        folder.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {folder.name}")])
        ca = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, is_ca=True)
        (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        for leaf, common_name in (("server", "localhost"), ("client", "postgres")):
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
            names: list[x509.GeneralName] = [x509.DNSName(common_name)] if leaf == "server" else []
            cert = _certificate(subject, ca_name, key.public_key(), ca_key, names=names)
            (folder / f"{leaf}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            (folder / f"{leaf}.key").write_bytes(
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
            )  # fmt: skip
            (folder / f"{leaf}.key").chmod(0o600)
        return cls(folder)

    def file(self, name: str) -> str:
        """The path of one of its files ("ca.pem", "server.key", ...)."""
        return str(self.folder / name)


def _certificate(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, signer: ec.EllipticCurvePrivateKey,
    *, is_ca: bool = False, names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pg_bin(tool: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    if not found:
        raise RuntimeError(f"no PostgreSQL {tool} under /usr/lib/postgresql/*/bin")
    return found[-1]


def _as_postgres(*args: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)


@dataclass
class PrivatePostgres:
    """A throw-away PostgreSQL cluster with trust authentication."""

    root: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        """Its data directory."""
        return self.root / "data"

    @property
    def url(self) -> str:
        """The DATABASE_URL of its `postgres` database."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def tls_url(self, pki: ThrowawayPki, sslmode: str = "verify-full", trust: ThrowawayPki | None = None) -> str:
        """Its DATABASE_URL over TLS at localhost (the name in its certificate), with `pki`'s client certificate,
        the server checked against the CA of `trust` (default: `pki`)."""
        query = {"sslmode": sslmode, "sslrootcert": (trust or pki).file("ca.pem"), "sslcert": pki.file("client.pem"),
                 "sslkey": pki.file("client.key")}  # fmt: skip
        return f"postgresql+asyncpg://postgres@localhost:{self.port}/postgres?{urlencode(query)}"

    @classmethod
    def create(cls, tls: ThrowawayPki | None = None) -> PrivatePostgres:
        """initdb in a fresh folder owned by the `postgres` user, then start it. With `tls`: TCP connections only
        over TLS, with `tls`'s server certificate, and only from clients with a certificate from its CA."""
        root = Path(tempfile.mkdtemp(prefix="va-pg-"))
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        server = cls(root)
        subprocess.run(
            _as_postgres(_pg_bin("initdb"), "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
            check=True, capture_output=True,
        )  # fmt: skip
        if tls is not None:
            server._require_tls(tls)
        server.start()
        return server

    def _require_tls(self, pki: ThrowawayPki) -> None:
        # PostgreSQL refuses a key file that others may read or that another user owns.
        for name in ("ca.pem", "server.pem", "server.key"):
            shutil.copy(pki.file(name), self.data / name)
            if os.geteuid() == 0:
                shutil.chown(self.data / name, "postgres", "postgres")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.pem'\n")
        # No `host` line: a plaintext TCP connection matches no entry and is refused.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust clientcert=verify-ca\n"
        )

    def start(self) -> None:
        """Start (again) on the same port and data; returns once it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            _as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w",
                         "start"),
            check=True, capture_output=True,
        )  # fmt: skip

    def sql(self, query: str) -> str:
        """One query's unaligned output, over its Unix socket (trusted, whatever TCP connections need)."""
        return subprocess.run(
            ["psql", "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-Atc", query],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: "fast" disconnects every client (a restart), "immediate" is a crash."""
        subprocess.run(
            _as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
            check=False, capture_output=True,
        )  # fmt: skip

    def destroy(self) -> None:
        """Stop it and remove its files."""
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PrivateRedis:
    """A redis-server child process; no background saves, but `stop` saves its data for the next `start`, as a
    restart of a production Redis keeps it. With `tls`: TLS only, with `tls`'s server certificate, and only for
    clients with a certificate from its CA."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="va-redis-")))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    tls: ThrowawayPki | None = None

    @property
    def url(self) -> str:
        """Its REDIS_URL (with `tls`: `tls_url()`)."""
        return self.tls_url() if self.tls else f"redis://127.0.0.1:{self.port}/0"

    def tls_url(self, trust: ThrowawayPki | None = None) -> str:
        """Its REDIS_URL over TLS at localhost (the name in its certificate), with `tls`'s client certificate, the
        server checked against the CA of `trust` (default: `tls`)."""
        assert self.tls is not None, "a server started without tls"
        query = {"ssl_ca_certs": (trust or self.tls).file("ca.pem"), "ssl_certfile": self.tls.file("client.pem"),
                 "ssl_keyfile": self.tls.file("client.key")}  # fmt: skip
        return f"rediss://localhost:{self.port}/0?{urlencode(query)}"

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        pki = self.tls
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", pki.file("server.pem"),
                "--tls-key-file", pki.file("server.key"), "--tls-ca-cert-file", pki.file("ca.pem")]  # fmt: skip

    def _client(self, **options: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **options)

    def start(self) -> None:
        """Start (again) on the same port; returns once it answers PING."""
        self.process = subprocess.Popen(
            ["redis-server", *self._listen_args(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = self._client(socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on {self.port} did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """SHUTDOWN SAVE: every client disconnected, the data kept on disk for the next start."""
        assert self.process is not None
        with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it goes
            self._client().shutdown(save=True)
        self.process.wait(timeout=30)

    def destroy(self) -> None:
        """Kill it and remove its files."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

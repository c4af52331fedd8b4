"""TLS on the client port: the server certificate, its SSL context, and the in-place
upgrade of a client connection after SSLRequest.

The supervisor calls :func:`prepare` before forking: it generates a self-signed
certificate on first run (so ``sslmode=verify-full`` works with that file as the
root certificate), checks that the pair loads, and keeps the context in this
module, where the forked workers find it without reading the files again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.config import Config

    from .session import Session

log = logging.getLogger("pgfleet.gateway")

CERT_FILE = "server.crt"
KEY_FILE = "server.key"
CERT_DAYS = 3650

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = ext
prompt = no
[dn]
CN = localhost
[ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, digitalSignature, keyCertSign
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = {san}
"""

# (cert, key) -> context; filled by prepare() in the supervisor, inherited by forks.
_contexts: dict[tuple[str, str], ssl.SSLContext] = {}
# context -> its certificate's tls-server-end-point data (None: cannot bind).
_bindings: dict[ssl.SSLContext, bytes | None] = {}


class TlsError(RuntimeError):
    """The certificate cannot be made or loaded; pgfleet does not start."""


def _alt_names(host: str) -> str:
    names = ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    hostname = socket.gethostname()
    if hostname and hostname != "localhost" and all(c.isalnum() or c in "-." for c in hostname):
        names.append(f"DNS:{hostname}")
    if host not in ("", "0.0.0.0", "::", "127.0.0.1", "::1", "localhost"):
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            names.append(f"IP:{host}")
        except OSError:
            if all(c.isalnum() or c in "-." for c in host):
                names.append(f"DNS:{host}")
    return ", ".join(dict.fromkeys(names))


def generate_self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """Make ``server.crt``/``server.key`` (EC P-256, CN and SAN localhost, 127.0.0.1, ::1)
    in ``directory`` unless both exist. The key is 0600; files appear atomically, so an
    interrupted first run never leaves half a pair behind."""
    cert, key = directory / CERT_FILE, directory / KEY_FILE
    if cert.exists() and key.exists():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".gen-") as tmp:
        conf, tcert, tkey = Path(tmp, "req.cnf"), Path(tmp, CERT_FILE), Path(tmp, KEY_FILE)
        conf.write_text(_OPENSSL_CONFIG.format(san=_alt_names(host)))
        cmd = ["openssl", "req", "-x509", "-new", "-config", str(conf), "-newkey", "ec",
               "-pkeyopt", "ec_paramgen_curve:prime256v1", "-sha256", "-nodes",
               "-days", str(CERT_DAYS), "-keyout", str(tkey), "-out", str(tcert)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TlsError(f"could not run openssl to make a TLS certificate: {exc}") from None
        if out.returncode != 0:
            raise TlsError(f"openssl could not make a TLS certificate:\n{out.stderr.strip()}")
        os.chmod(tkey, 0o600)
        os.chmod(tcert, 0o644)
        os.replace(tkey, key)
        os.replace(tcert, cert)
    log.info("generated a self-signed TLS certificate %s", cert)
    return cert, key


def load_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for this pair (TLS 1.2 or later, as Postgres's default)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"could not load TLS certificate {cert} and key {key}: {exc}") from None
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


def prepare(cfg: Config) -> None:
    """Fill in the generated certificate's paths (first run: make it) and load the pair."""
    if not cfg.tls:
        return
    if not cfg.tls_cert:
        cert, key = generate_self_signed(cfg.tls_dir, cfg.host)
        cfg.tls_cert, cfg.tls_key = str(cert), str(key)
    server_context(cfg)


def server_context(cfg: Config) -> ssl.SSLContext | None:
    """The context to answer SSLRequest with, or None when TLS is off."""
    if not cfg.tls or not cfg.tls_cert:
        return None
    pair = (cfg.tls_cert, cfg.tls_key)
    ctx = _contexts.get(pair)
    if ctx is None:
        ctx = _contexts[pair] = load_context(*pair)
        _bindings[ctx] = _binding_of_file(cfg.tls_cert)
    return ctx


# -- tls-server-end-point channel binding (RFC 5929) ---------------------------------------

# DER of the signature AlgorithmIdentifier OIDs whose hash is known; MD5 and SHA-1 use
# SHA-256, as RFC 5929 says. Other algorithms (PSS, EdDSA) cannot bind: not offered.
_SIG_HASHES = {
    bytes.fromhex(oid): name
    for name, oids in {
        "sha256": ("2a864886f70d010104", "2a864886f70d010105", "2a864886f70d01010b",
                   "2a8648ce3d040302", "2b0e03021d", "2a8648ce3d0401"),
        "sha384": ("2a864886f70d01010c", "2a8648ce3d040303"),
        "sha512": ("2a864886f70d01010d", "2a8648ce3d040304"),
        "sha224": ("2a864886f70d01010e", "2a8648ce3d040301"),
    }.items()
    for oid in oids
}


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the DER item at ``pos``."""
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def end_point_hash(der: bytes) -> bytes | None:
    """The tls-server-end-point binding data of a DER certificate, None if unknown."""
    try:
        _, body, _ = _der_item(der, 0)  # Certificate ::= SEQUENCE {
        _, _, tbs_end = _der_item(der, body)  # tbsCertificate,
        _, alg, _ = _der_item(der, tbs_end)  # signatureAlgorithm SEQUENCE { OID, ... }
        tag, oid_start, oid_end = _der_item(der, alg)
    except (IndexError, ValueError):
        return None
    name = _SIG_HASHES.get(der[oid_start:oid_end]) if tag == 0x06 else None
    return None if name is None else hashlib.new(name, der).digest()


def _binding_of_file(path: str) -> bytes | None:
    """End-point data of the first certificate in a PEM file (the server's own)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    start = text.find(ssl.PEM_HEADER)
    end = text.find(ssl.PEM_FOOTER, start)
    if start < 0 or end < 0:
        return None
    try:
        der = ssl.PEM_cert_to_DER_cert(text[start : end + len(ssl.PEM_FOOTER)] + "\n")
    except ValueError:
        return None
    return end_point_hash(der)


def channel_binding_data(transport: asyncio.BaseTransport) -> bytes | None:
    """tls-server-end-point data for a TLS connection, None without TLS or binding."""
    obj = transport.get_extra_info("ssl_object")
    return None if obj is None else _bindings.get(obj.context)


# -- the upgrade after SSLRequest ------------------------------------------------------------


class Handshaking:
    """Stands in for the session's transport while the TLS handshake runs: nothing may be
    written in clear into a TLS stream, and closing ends the connection."""

    def __init__(self, raw: asyncio.Transport) -> None:
        self.raw = raw

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.raw.close()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.raw.get_extra_info(name, default)


async def upgrade(session: Session, raw: asyncio.Transport, ctx: ssl.SSLContext) -> None:
    """Run the handshake on ``raw`` (reading already paused, 'S' already written), then
    hand the session its TLS transport and the bytes that came behind the handshake."""
    loop = session.worker.loop
    try:
        transport = await loop.start_tls(
            raw, session, ctx, server_side=True,
            ssl_handshake_timeout=max(1.0, session.worker.cfg.auth_timeout),
        )
    except asyncio.CancelledError:
        raw.close()
        session.close()
        raise
    except Exception as exc:  # a failed handshake ends this client only
        log.debug("TLS handshake failed: %r", exc)
        raw.close()
        session.close()
        return
    session.tls_started(transport)

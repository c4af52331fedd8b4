"""TLS on the client port: SSLRequest answered 'S' and the handshake done in place, with
the certificate ``pgfleet up`` generates or one given with --tls-cert/--tls-key;
``--tls off`` answers 'N' as Postgres with ssl=off; ``--auth password`` (cleartext)
only over TLS; SCRAM-SHA-256-PLUS channel binding.

Real clients throughout: psql (libpq 15), psycopg (its bundled libpq), asyncpg (Python's
ssl module), plus a raw-protocol client for the byte-level cases.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
from scramp import ScramClient

from gateway.tls import end_point_hash
from pgwire import backend as be
from pgwire import frontend as fe

from .conftest import PASSWORD, PGFLEET, PgfleetServer
from .waiting import bounded
from .wire import RawClient, assert_fatal_then_eof, data_rows

NO_SSL = "server does not support SSL, but SSL was required"


# ----------------------------------------------------------------------------- fixtures


def _openssl_cert(directory: Path, name: str, key_args: list[str], digest: str) -> Path:
    """A self-signed certificate for localhost/127.0.0.1 made with the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-new", "-nodes", *key_args, f"-{digest}", "-days", "2",
         "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert


@pytest.fixture(scope="module")
def own_certs(tmp_path_factory) -> Path:
    """Certificates of our own: an RSA/SHA-384 one pgfleet serves, and a stranger."""
    d = tmp_path_factory.mktemp("certs")
    os.chmod(d, 0o755)
    _openssl_cert(d, "own", ["-newkey", "rsa:2048"], "sha384")
    _openssl_cert(d, "stranger", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
                  "sha256")
    return d


@pytest.fixture(scope="module")
def tls_server(make_module_server):
    """TLS on by default, the generated certificate, SCRAM; two workers."""
    return make_module_server("--workers", "2", "--pool-size", "3", "--auth-timeout", "3")


@pytest.fixture(scope="module")
def plain_server(make_module_server):
    return make_module_server("--workers", "1", "--pool-size", "2", "--tls", "off")


@pytest.fixture(scope="module")
def password_server(make_module_server, own_certs):
    """Cleartext password auth, serving our own certificate."""
    return make_module_server(
        "--workers", "1", "--pool-size", "2", "--auth", "password",
        "--tls-cert", str(own_certs / "own.crt"), "--tls-key", str(own_certs / "own.key"),
    )


def ca_of(server) -> str:
    return str(server.home / "tls" / "server.crt")


def tls_client(port: int, ca: str, hostname: str = "localhost") -> RawClient:
    """A raw client that sent SSLRequest, got 'S' and finished the handshake."""
    c = RawClient(port)
    try:
        c.send(fe.encode_ssl_request())
        assert c.recv_raw(1) == b"S"
        ctx = ssl.create_default_context(cafile=ca)
        c.sock = ctx.wrap_socket(c.sock, server_hostname=hostname)
    except BaseException:
        c.close()
        raise
    return c


def assert_healthy(server, pids: list[int], **dsn: str) -> None:
    """A psycopg client still works and no pgfleet process died or was replaced."""

    def check() -> None:
        with psycopg.connect(server.dsn(**dsn), connect_timeout=10, autocommit=True) as conn:
            assert conn.execute("select 40 + 2").fetchone() == (42,)

    bounded(check, 30, "a normal psycopg query")
    assert sorted(server.child_pids()) == sorted(pids), server.log()[-3000:]


def psql(server, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = server.env()
    e.update(env)
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", *args], env=e,
                          capture_output=True, text=True, timeout=60)


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ----------------------------------------------------------------------------- the certificate


def test_generated_certificate(tls_server):
    cert, key = Path(ca_of(tls_server)), tls_server.home / "tls" / "server.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-subject", "-ext", "subjectAltName"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert "CN = localhost" in text or "CN=localhost" in text, text
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text, text
    # Self-signed: the certificate is its own root.
    out = subprocess.run(["openssl", "verify", "-CAfile", str(cert), str(cert)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tls: on" in tls_server.log() and str(cert) in tls_server.log()


def test_certificate_made_once_and_only_with_tls(make_server):
    srv = make_server("--workers", "1", "--pool-size", "1", "--tls", "off")
    assert not (srv.home / "tls").exists()
    srv.stop()
    again = PgfleetServer("--workers", "1", "--pool-size", "1", home=srv.home)
    try:
        again.start()
        cert = Path(ca_of(again))
        made = (cert.read_bytes(), cert.stat().st_mtime_ns)
        again.stop()
        again.start()  # the second start reuses the pair
        assert (cert.read_bytes(), cert.stat().st_mtime_ns) == made
        assert again.log().count("generated a self-signed TLS certificate") == 1
        with psycopg.connect(again.dsn(sslmode="verify-full", sslrootcert=str(cert)),
                             connect_timeout=10) as conn:
            assert conn.pgconn.ssl_in_use
    finally:
        again.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls", "off", "--auth", "password"], "only offered over TLS"),
        (["--tls-cert", "/etc/hostname"], "both --tls-cert and --tls-key"),
        (["--tls-cert", "/nonexistent.crt", "--tls-key", "/etc/hostname"], "does not exist"),
    ],
    ids=["password-needs-tls", "cert-without-key", "missing-cert"],
)
def test_cli_refuses_bad_tls_options(tmp_path, args, message):
    out = subprocess.run([PGFLEET, "up", "--home", str(tmp_path / "h"), "--port", "1", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert message in " ".join(out.stderr.split()), out.stderr
    assert not (tmp_path / "h").exists()


def test_unloadable_certificate_is_reported(tmp_path, own_certs):
    # A key that does not belong to the certificate: pgfleet says so and does not start.
    out = subprocess.run(
        [PGFLEET, "up", "--home", str(tmp_path / "h"), "--port", "1",
         "--tls-cert", str(own_certs / "own.crt"), "--tls-key", str(own_certs / "stranger.key")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1, out
    assert "could not load TLS certificate" in out.stderr, out.stderr


@pytest.mark.parametrize("name", ["own", "stranger"])
def test_end_point_hash_follows_the_signature_digest(own_certs, name):
    der = ssl.PEM_cert_to_DER_cert((own_certs / f"{name}.crt").read_text())
    digest = "sha384" if name == "own" else "sha256"
    assert end_point_hash(der) == hashlib.new(digest, der).digest()


# ----------------------------------------------------------------------------- real clients


def test_psql_require_and_verify_full(tls_server):
    out = psql(tls_server, "-c", r"\conninfo", "-Atc", "select 1", PGSSLMODE="require")
    assert out.returncode == 0, out.stderr
    assert "SSL connection (protocol: TLS" in out.stdout, out.stdout
    for host in ("127.0.0.1", "localhost"):
        out = psql(tls_server, "-c", r"\conninfo", "-Atc", "select 2", PGHOST=host,
                   PGSSLMODE="verify-full", PGSSLROOTCERT=ca_of(tls_server))
        assert out.returncode == 0, out.stderr
        assert "SSL connection" in out.stdout and out.stdout.rstrip().endswith("2"), out.stdout


def test_psql_verify_full_refuses_another_root(tls_server, own_certs):
    pids = tls_server.child_pids()
    out = psql(tls_server, "-Atc", "select 1", PGSSLMODE="verify-full",
               PGSSLROOTCERT=str(own_certs / "stranger.crt"))
    assert out.returncode != 0
    assert "certificate verify failed" in out.stderr, out.stderr
    assert_healthy(tls_server, pids)


def test_psycopg_require_and_verify_full(tls_server):
    with psycopg.connect(tls_server.dsn(sslmode="require"), connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select %s::int + 1", (41,)).fetchone() == (42,)
    for host in ("127.0.0.1", "localhost"):
        dsn = tls_server.dsn(sslmode="verify-full", sslrootcert=ca_of(tls_server)).replace(
            "host=127.0.0.1", f"host={host}")
        with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
            assert conn.pgconn.ssl_in_use
            # Extended protocol, a transaction and a big result all cross the TLS transport.
            with conn.transaction():
                rows = conn.execute("select g, repeat('x', 1000) from generate_series(1, 2000) g "
                                    "where g > %s", (0,)).fetchall()
            assert len(rows) == 2000 and rows[-1][0] == 2000
    # The default sslmode (prefer) takes TLS; disable goes without, and still logs in.
    with psycopg.connect(tls_server.dsn(), connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(tls_server.dsn(sslmode="disable"), connect_timeout=10) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 3").fetchone() == (3,)


def test_scram_channel_binding(tls_server):
    # Over TLS pgfleet offers SCRAM-SHA-256-PLUS (tls-server-end-point), so a client that
    # requires channel binding logs in; without TLS it fails cleanly in libpq, no hang.
    dsn = tls_server.dsn(sslmode="verify-full", sslrootcert=ca_of(tls_server),
                         channel_binding="require")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        bounded(lambda: psycopg.connect(
            tls_server.dsn(sslmode="disable", channel_binding="require"), connect_timeout=10),
            30, "a channel_binding=require login without TLS")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(tls_server.dsn(password="wrong", channel_binding="require",
                                       sslmode="require"), connect_timeout=10)


def test_scram_plus_on_the_wire(tls_server):
    ca = ca_of(tls_server)
    with RawClient(tls_server.port) as c:  # no TLS: no channel binding offered
        c.startup("postgres")
        assert c.expect_auth(be.AUTH_SASL).mechanisms == ["SCRAM-SHA-256"]
    cases = [
        ("SCRAM-SHA-256-PLUS", "socket", None),
        ("SCRAM-SHA-256", None, None),
        ("SCRAM-SHA-256-PLUS", b"\x00" * 32, "SCRAM channel binding check failed"),
        # 'y': the client could bind but thinks we cannot; we can, so this is a downgrade.
        ("SCRAM-SHA-256", "socket", "SCRAM channel binding negotiation error"),
    ]
    for mechanism, data, error in cases:
        with tls_client(tls_server.port, ca) as c:
            c.startup("postgres")
            offered = c.expect_auth(be.AUTH_SASL).mechanisms
            assert offered == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
            binding = None
            if data is not None:
                binding = ("tls-server-end-point", c.sock if data == "socket" else data)
            client = ScramClient([mechanism], "postgres", PASSWORD, channel_binding=binding)
            c.send(fe.encode_sasl_initial(mechanism, client.get_client_first().encode()))
            if error is not None and "negotiation" in error:
                assert_fatal_then_eof(c, "08P01", error)
                continue
            cont = c.read_message()
            assert isinstance(cont, be.Authentication), cont
            client.set_server_first(cont.data.decode())
            c.send(fe.encode_sasl_response(client.get_client_final().encode()))
            if error is not None:
                assert_fatal_then_eof(c, "08P01", error)
                continue
            final = c.read_message()
            assert isinstance(final, be.Authentication) and final.code == be.AUTH_SASL_FINAL
            client.set_server_final(final.data.decode())  # checks the server's signature
            c.expect_auth(be.AUTH_OK)
            c._after_auth_ok()
            assert data_rows(c.query("select 1")) == [[b"1"]]


def test_asyncpg_with_the_ca(tls_server, own_certs):
    async def main() -> None:
        ctx = ssl.create_default_context(cafile=ca_of(tls_server))
        for host in ("127.0.0.1", "localhost"):
            conn = await asyncpg.connect(host=host, port=tls_server.port, user="postgres",
                                         password=PASSWORD, database="postgres", ssl=ctx,
                                         timeout=30)
            try:
                assert conn._transport.get_extra_info("ssl_object") is not None
                assert await conn.fetchval("select $1::int * 2", 21) == 42
                async with conn.transaction():
                    assert await conn.fetchval("select count(*) from generate_series(1, 5)") == 5
            finally:
                await conn.close(timeout=10)
        conn = await asyncpg.connect(host="127.0.0.1", port=tls_server.port, user="postgres",
                                     password=PASSWORD, database="postgres", ssl="require",
                                     timeout=30)
        try:
            assert conn._transport.get_extra_info("ssl_object") is not None
            assert await conn.fetchval("select 7") == 7
        finally:
            await conn.close(timeout=10)
        # A root that did not sign the server's certificate: refused by the client.
        stranger = ssl.create_default_context(cafile=str(own_certs / "stranger.crt"))
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncpg.connect(host="127.0.0.1", port=tls_server.port, user="postgres",
                                  password=PASSWORD, database="postgres", ssl=stranger,
                                  timeout=30)

    run(main())


def test_cancel_over_tls(tls_server):
    # libpq sends its CancelRequest over TLS too (SSLRequest first): a cancel connection
    # is just another startup packet after the handshake.
    with psycopg.connect(tls_server.dsn(sslmode="require"), connect_timeout=10,
                         autocommit=True) as conn:
        def cancel_soon() -> None:
            time.sleep(0.5)
            conn.cancel_safe(timeout=10)

        for _ in range(3):  # several cancel connections: the workers take turns
            t = threading.Thread(target=cancel_soon, daemon=True)
            t.start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                bounded(lambda: conn.execute("select pg_sleep(30)"), 20, "the cancelled sleep")
            t.join(15)
            assert conn.execute("select 1").fetchone() == (1,)


# ----------------------------------------------------------------------------- the protocol


def test_raw_client_over_tls(tls_server):
    ca = ca_of(tls_server)
    c = RawClient(tls_server.port)
    with c:
        c.send(fe.encode_gssenc_request())
        assert c.recv_raw(1) == b"N"  # GSS encryption: never
        c.send(fe.encode_ssl_request())
        assert c.recv_raw(1) == b"S"
        c.sock = ssl.create_default_context(cafile=ca).wrap_socket(
            c.sock, server_hostname="localhost")
        msgs = c.login_scram()
        key = next(m for m in msgs if isinstance(m, be.BackendKeyData))
        assert key.pid > 0
        assert data_rows(c.query("select 'over tls'")) == [[b"over tls"]]
        c.send(fe.TERMINATE)
        assert c.read_to_eof() == []


def test_ssl_request_after_tls_is_refused(tls_server):
    pids = tls_server.child_pids()
    with tls_client(tls_server.port, ca_of(tls_server)) as c:
        c.send(fe.encode_ssl_request())
        assert_fatal_then_eof(c, "0A000", "unsupported frontend protocol 1234.5679")
    assert_healthy(tls_server, pids)


def test_ssl_request_then_garbage_in_one_packet(tls_server):
    # CVE-2021-23214: bytes behind the SSLRequest, sent before our answer, were not
    # encrypted; pgfleet must not hand them to the TLS layer or the login.
    pids = tls_server.child_pids()
    for junk in (b"garbage!", fe.encode_startup({"user": "postgres", "database": "postgres"})):
        with RawClient(tls_server.port) as c:
            c.send(fe.encode_ssl_request() + junk)
            assert_fatal_then_eof(c, "08P01", "received unencrypted data after SSL request")
    assert_healthy(tls_server, pids)


def test_bad_or_silent_handshakes_end_only_that_client(tls_server):
    pids = tls_server.child_pids()
    with RawClient(tls_server.port) as c:  # 'S', then not TLS at all
        c.send(fe.encode_ssl_request())
        assert c.recv_raw(1) == b"S"
        c.send(fe.encode_startup({"user": "postgres", "database": "postgres"}))
        assert c.read_to_eof() == []
    with RawClient(tls_server.port) as c:  # 'S', then silence: the auth timeout (3 s) ends it
        c.send(fe.encode_ssl_request())
        assert c.recv_raw(1) == b"S"
        assert c.read_to_eof(limit=20) == []
    with RawClient(tls_server.port) as c:  # vanishes mid-handshake
        c.send(fe.encode_ssl_request())
        assert c.recv_raw(1) == b"S"
        c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
        c.abort()
    assert_healthy(tls_server, pids)


# ----------------------------------------------------------------------------- --tls off


@pytest.mark.parametrize(
    "requests",
    [
        [fe.encode_ssl_request()],
        [fe.encode_gssenc_request(), fe.encode_ssl_request()],
        [fe.encode_ssl_request(), fe.encode_gssenc_request()],
    ],
    ids=["ssl", "gssenc-then-ssl", "ssl-then-gssenc"],
)
def test_tls_off_refuses_then_login(plain_server, requests):
    with RawClient(plain_server.port) as c:
        for req in requests:
            c.send(req)
            assert c.recv_raw(1) == b"N"
        c.login_scram()
        assert data_rows(c.query("select 7")) == [[b"7"]]


def test_tls_off_second_ssl_request_is_a_protocol_error(plain_server):
    with RawClient(plain_server.port) as c:
        c.send(fe.encode_ssl_request())
        assert c.recv_raw(1) == b"N"
        c.send(fe.encode_ssl_request())
        assert_fatal_then_eof(c, "0A000", "unsupported frontend protocol 1234.5679")


def test_tls_off_with_real_clients(plain_server):
    assert not (plain_server.home / "tls").exists()
    with pytest.raises(psycopg.OperationalError, match=NO_SSL):
        psycopg.connect(plain_server.dsn(sslmode="require"), connect_timeout=10)
    out = psql(plain_server, "-Atc", "select 1", PGSSLMODE="require")
    assert out.returncode != 0 and NO_SSL in out.stderr, out.stderr
    with psycopg.connect(plain_server.dsn(sslmode="prefer"), connect_timeout=10) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        bounded(lambda: psycopg.connect(plain_server.dsn(channel_binding="require"),
                                        connect_timeout=10), 30, "a channel_binding login")
    assert "tls: off" in plain_server.log()


# ----------------------------------------------------------------------------- --auth password


def test_password_auth_over_tls(password_server, own_certs):
    ca = str(own_certs / "own.crt")
    assert not (password_server.home / "tls").exists()  # our own certificate, none made
    dsn = password_server.dsn(sslmode="verify-full", sslrootcert=ca)
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user'):
        psycopg.connect(password_server.dsn(password="wrong", sslmode="require"),
                        connect_timeout=10)
    out = psql(password_server, "-Atc", "select 5", PGSSLMODE="verify-full", PGSSLROOTCERT=ca)
    assert out.returncode == 0 and out.stdout.strip() == "5", out.stderr

    async def main() -> None:
        conn = await asyncpg.connect(
            host="localhost", port=password_server.port, user="postgres", password=PASSWORD,
            database="postgres", ssl=ssl.create_default_context(cafile=ca), timeout=30)
        try:
            assert await conn.fetchval("select 6") == 6
        finally:
            await conn.close(timeout=10)

    run(main())


def test_password_auth_on_the_wire(password_server, own_certs):
    ca = str(own_certs / "own.crt")
    with tls_client(password_server.port, ca) as c:
        c.startup("postgres")
        c.answer_auth(c.expect_auth(be.AUTH_CLEARTEXT), "postgres", PASSWORD)
        c.expect_auth(be.AUTH_OK)
        c._after_auth_ok()
        assert data_rows(c.query("select 1")) == [[b"1"]]
    for user, password in (("postgres", "wrong"), ("nosuchrole", PASSWORD)):
        with tls_client(password_server.port, ca) as c:
            c.startup(user)
            c.answer_auth(c.expect_auth(be.AUTH_CLEARTEXT), user, password)
            assert_fatal_then_eof(c, "28P01", f'password authentication failed for user "{user}"')


def test_password_auth_checks_md5_secrets(password_server, own_certs):
    with psycopg.connect(password_server.direct_dsn(), autocommit=True) as d:
        d.execute("set password_encryption = 'md5'")
        d.execute("drop role if exists tls_md5_user")
        d.execute("create role tls_md5_user login password 'md5-pw'")
        assert d.execute("select rolpassword like 'md5%' from pg_authid "
                         "where rolname = 'tls_md5_user'").fetchone() == (True,)
    dsn = password_server.dsn(user="tls_md5_user", password="md5-pw", sslmode="require")
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        assert conn.execute("select current_user").fetchone() == ("tls_md5_user",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(password_server.dsn(user="tls_md5_user", password="nope",
                                            sslmode="require"), connect_timeout=10)


def test_password_auth_refused_without_tls(password_server):
    hba = ('no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "postgres", '
           "no encryption")
    with pytest.raises(psycopg.OperationalError, match=hba):
        psycopg.connect(password_server.dsn(sslmode="disable"), connect_timeout=10)
    with RawClient(password_server.port) as c:  # no password is ever asked for in clear
        c.startup("postgres")
        assert_fatal_then_eof(c, "28000", hba)
    # A client that requires channel binding gets a clear refusal, not a hang.
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        bounded(lambda: psycopg.connect(password_server.dsn(sslmode="require",
                                                            channel_binding="require"),
                                        connect_timeout=10), 30, "a channel_binding login")

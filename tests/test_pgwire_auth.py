"""SCRAM-SHA-256 server and md5 helpers, checked against scramp and RFC 7677."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import scramp

from pgwire import auth, sqlstate
from pgwire.auth import (
    AuthFailed,
    ScramServer,
    ScramVerifier,
    md5_client_response,
    md5_stored,
    md5_verify,
    parse_scram_verifier,
    scram_client_verifier,
)
from pgwire.errors import ProtocolViolation

# RFC 7677 section 3 (user "user", password "pencil").
RFC_SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
# The same secret as Postgres stores it for password "pencil" with that salt.
PENCIL_SECRET = (
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"
    "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
)
# Copied from a pg_dumpall of a Postgres 13 cluster (rolpassword of "postgres").
PG_DUMP_SECRET = (
    "SCRAM-SHA-256$4096:lWa+BG+NdQ8/r1x99Fr6hQ==$"
    "Ev3Se2IUwbgr5p0vP1GVgtuuTWenipJBUiecmTFIonQ=:V8NnRU4nkJaeoXbiXffEfH5sFTUMtW5bBjYWctqxSCI="
)


def run_scramp(server: ScramServer, password: str, username: str = "alice") -> bytes:
    client = scramp.ScramClient(["SCRAM-SHA-256"], username, password)
    server_first = server.first(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    server_final = server.final(client.get_client_final().encode())
    client.set_server_final(server_final.decode())  # raises if our signature is wrong
    return server_final


def manual_client(
    password: str, bare: str, server_first: bytes, gs2: bytes = b"n,,", ext: str = ""
) -> tuple[bytes, bytes]:
    """Minimal SCRAM client for cases scramp refuses (empty username)."""
    attrs = dict(kv.split("=", 1) for kv in server_first.decode().split(","))
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(gs2).decode()},r={attrs['r']}{ext}"
    auth_message = f"{bare},{server_first.decode()},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    server_sig = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    return final, b"v=" + base64.b64encode(server_sig)


@pytest.fixture(scope="module")
def verifier() -> ScramVerifier:
    v = parse_scram_verifier(scram_client_verifier("correct horse"))
    assert v is not None
    return v


# ---------------------------------------------------------------- verifiers


def test_parse_real_postgres_secret():
    v = parse_scram_verifier(PG_DUMP_SECRET)
    assert v is not None
    assert v.iterations == 4096
    assert v.salt == base64.b64decode("lWa+BG+NdQ8/r1x99Fr6hQ==") and len(v.salt) == 16
    assert v.stored_key == base64.b64decode("Ev3Se2IUwbgr5p0vP1GVgtuuTWenipJBUiecmTFIonQ=")
    assert v.server_key == base64.b64decode("V8NnRU4nkJaeoXbiXffEfH5sFTUMtW5bBjYWctqxSCI=")


def test_client_verifier_matches_postgres_format():
    assert scram_client_verifier("pencil", 4096, base64.b64decode(RFC_SALT)) == PENCIL_SECRET
    secret = scram_client_verifier("x", iterations=100)
    assert secret.startswith("SCRAM-SHA-256$100:")
    v = parse_scram_verifier(secret)
    assert v is not None and v.iterations == 100 and len(v.salt) == 16


def test_client_verifier_matches_scramp():
    mech = scramp.ScramMechanism()
    for password in ("pencil", "pässwörd", "I\u00adX", "\u2168"):
        salt, stored, server, _ = mech.make_auth_info(password, iteration_count=4096)
        v = parse_scram_verifier(scram_client_verifier(password, 4096, salt))
        assert (v.stored_key, v.server_key) == (stored, server), password


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "md5a3556571e93b0d20722ba62be61e8c2d",
        "plaintext",
        "SCRAM-SHA-256$4096:c2FsdA==$abc",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,  # 33-byte keys
        "SCRAM-SHA-256$x:c2FsdA==$" + PENCIL_SECRET.split("$")[2],
        "SCRAM-SHA-256$0:c2FsdA==$" + PENCIL_SECRET.split("$")[2],
        "SCRAM-SHA-256$-1:c2FsdA==$" + PENCIL_SECRET.split("$")[2],
        "SCRAM-SHA-256$4096:!!!$" + PENCIL_SECRET.split("$")[2],
        "SCRAM-SHA-256$4096:$" + PENCIL_SECRET.split("$")[2],
        "SCRAM-SHA-256$4096:c2FsdA==$" + PENCIL_SECRET.split("$")[2] + "$x",
        "SCRAM-SHA-1$4096:c2FsdA==$" + PENCIL_SECRET.split("$")[2],
    ],
)
def test_parse_rejects(secret):
    assert parse_scram_verifier(secret) is None


# --------------------------------------------------------------------- SCRAM


def test_rfc7677_vector():
    v = parse_scram_verifier(PENCIL_SECRET)
    server = ScramServer(v, "user", server_nonce=RFC_SERVER_NONCE)
    assert server.first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    assert server.authenticated


def test_scramp_client_success(verifier):
    server = ScramServer(verifier, "alice")
    assert ScramServer.mechanisms == ("SCRAM-SHA-256",)
    assert run_scramp(server, "correct horse").startswith(b"v=")
    assert server.authenticated


def test_unicode_password():
    v = parse_scram_verifier(scram_client_verifier("pässwörd\u2168"))
    run_scramp(ScramServer(v, "alice"), "pässwörd\u2168")


def test_wrong_password(verifier):
    server = ScramServer(verifier, "alice")
    with pytest.raises(AuthFailed) as ei:
        run_scramp(server, "battery staple")
    assert ei.value.sqlstate == sqlstate.INVALID_PASSWORD
    assert 'user "alice"' in ei.value.message
    assert not server.authenticated


def test_unknown_user_mock_exchange():
    server = ScramServer(None, "ghost")
    with pytest.raises(AuthFailed):
        run_scramp(server, "anything")
    assert not server.authenticated


def test_mock_salt_is_stable_and_looks_real():
    def salt_of(username: str) -> tuple[str, str]:
        first = ScramServer(None, username).first(b"n,,n=,r=abc").decode()
        attrs = dict(kv.split("=", 1) for kv in first.split(","))
        return attrs["s"], attrs["i"]

    s1, i1 = salt_of("ghost")
    assert salt_of("ghost") == (s1, i1)  # a probe sees the same salt every time
    assert salt_of("phantom")[0] != s1
    assert i1 == "4096" and len(base64.b64decode(s1)) == 16
    original = auth._mock_secret
    auth.set_mock_auth_secret(b"k" * 32)  # what a supervisor shares with its workers
    try:
        assert salt_of("ghost")[0] != s1
    finally:
        auth.set_mock_auth_secret(original)
    assert salt_of("ghost")[0] == s1


def test_empty_username_in_client_first(verifier):
    # libpq sends "n,,n=,r=..." since the role comes from the startup packet.
    server = ScramServer(verifier, "alice")
    bare = "n=,r=fyko+d2lbbFgONRv9qkxdawL"
    server_first = server.first(("n,," + bare).encode())
    assert server_first.startswith(b"r=fyko+d2lbbFgONRv9qkxdawL")
    final, expected = manual_client("correct horse", bare, server_first)
    assert server.final(final) == expected


def test_y_flag_accepted(verifier):
    server = ScramServer(verifier, "alice")
    bare = "n=,r=abcdef"
    server_first = server.first(("y,," + bare).encode())
    final, expected = manual_client("correct horse", bare, server_first, gs2=b"y,,")
    assert server.final(final) == expected


def test_extensions_ignored(verifier):
    server = ScramServer(verifier, "alice")
    bare = "n=,r=abcdef,x=ext"
    server_first = server.first(("n,," + bare).encode())
    # Extensions before the proof are tolerated; they are part of the signed text.
    final, expected = manual_client("correct horse", bare, server_first, ext=",y=1")
    assert b",y=1,p=" in final
    assert server.final(final) == expected


def test_channel_binding_request_fails(verifier):
    server = ScramServer(verifier, "alice")
    with pytest.raises(ProtocolViolation) as ei:
        server.first(b"p=tls-server-end-point,,n=,r=abc")
    assert ei.value.sqlstate == sqlstate.PROTOCOL_VIOLATION
    with pytest.raises(ProtocolViolation):
        server.final(b"c=biws,r=abc,p=AAAA")  # no second chance


def test_authzid_and_mandatory_extension_not_supported(verifier):
    with pytest.raises(ProtocolViolation) as ei:
        ScramServer(verifier, "alice").first(b"n,a=bob,n=,r=abc")
    assert ei.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED
    with pytest.raises(ProtocolViolation) as ei:
        ScramServer(verifier, "alice").first(b"n,,m=ext,n=,r=abc")
    assert ei.value.sqlstate == sqlstate.FEATURE_NOT_SUPPORTED


@pytest.mark.parametrize(
    "client_first",
    [
        b"",
        b"n",
        b"n,",
        b"x,,n=,r=abc",
        b"n,,",
        b"n,,n=",
        b"n,,r=abc",
        b"n,,n=,r=",
        b"n,,n=,r=a b",
        b"n,,n=,x=abc",
        b"n,,n=,r=abc,",
        b"n,,n=,r=abc,1=x",
        b"n,,n=\xff,r=abc",
        b"nn,n=,r=abc",
    ],
)
def test_malformed_client_first(verifier, client_first):
    with pytest.raises(ProtocolViolation) as ei:
        ScramServer(verifier, "alice").first(client_first)
    assert ei.value.sqlstate in (sqlstate.PROTOCOL_VIOLATION, sqlstate.FEATURE_NOT_SUPPORTED)


def _started(verifier) -> tuple[ScramServer, str]:
    server = ScramServer(verifier, "alice")
    nonce = dict(
        kv.split("=", 1) for kv in server.first(b"n,,n=,r=abc").decode().split(",")
    )["r"]
    return server, nonce


def test_malformed_client_final(verifier):
    proof = base64.b64encode(b"\x00" * 32).decode()
    _, nonce = _started(verifier)
    cases = [
        b"",
        b"c=biws",
        f"c=biws,r={nonce}".encode(),
        f"c=eSws,r={nonce},p={proof}".encode(),  # y,, but we got n,,
        f"c=!!,r={nonce},p={proof}".encode(),
        f"c=biws,r=abcWRONG,p={proof}".encode(),
        f"c=biws,r={nonce},p=AAAA".encode(),  # short proof
        f"c=biws,r={nonce},p=!!!!".encode(),
        f"c=biws,r={nonce},p={proof},x=1".encode(),  # data after the proof
        f"r={nonce},c=biws,p={proof}".encode(),
        f"c=biws,r={nonce},1,p={proof}".encode(),
        b"c=biws,r=\xff,p=" + proof.encode(),
    ]
    for final in cases:
        server, nonce2 = _started(verifier)
        with pytest.raises(ProtocolViolation) as ei:
            server.final(final.replace(nonce.encode(), nonce2.encode()))
        assert ei.value.sqlstate == sqlstate.PROTOCOL_VIOLATION, final


def test_state_machine(verifier):
    server = ScramServer(verifier, "alice")
    with pytest.raises(ProtocolViolation):
        server.final(b"c=biws,r=abc,p=AAAA")
    server = ScramServer(verifier, "alice")
    run_scramp(server, "correct horse")
    with pytest.raises(ProtocolViolation):
        server.first(b"n,,n=,r=abc")
    with pytest.raises(ProtocolViolation):
        server.final(b"c=biws,r=abc,p=AAAA")


def test_saslprep():
    assert auth.saslprep("plain ascii\x01") == "plain ascii\x01"  # ASCII untouched, as Postgres
    assert auth.saslprep("I\u00adX") == "IX"  # soft hyphen maps to nothing
    assert auth.saslprep("a\u00a0b") == "a b"  # non-ASCII space maps to space
    assert auth.saslprep("\u2168") == "IX"  # NFKC
    assert auth.saslprep("a\u0007\u00e9") == "a\u0007\u00e9"  # prohibited: used as-is


# ----------------------------------------------------------------------- md5


def test_md5_known_value():
    # Widely published: role "postgres" with password "postgres".
    assert md5_stored("postgres", "postgres") == "md53175bce1d3201d16594cebf9d7eb3f9d"


def test_md5_roundtrip():
    salt = b"\x9a\x01\xff\x10"
    stored = md5_stored("s3cret", "alice")
    response = md5_client_response("s3cret", "alice", salt)
    assert response.startswith("md5") and len(response) == 35
    inner = hashlib.md5(b"s3cretalice").hexdigest().encode()
    assert response == "md5" + hashlib.md5(inner + salt).hexdigest()
    assert md5_verify(stored, salt, response)
    assert not md5_verify(stored, b"\x00\x00\x00\x00", response)
    assert not md5_verify(stored, salt, md5_client_response("wrong", "alice", salt))
    assert not md5_verify(stored, salt, md5_client_response("s3cret", "bob", salt))
    assert not md5_verify(PENCIL_SECRET, salt, response)
    assert not md5_verify("s3cret", salt, response)
    assert not md5_verify(stored, salt, "")
    assert not md5_verify(stored, salt, "ü" * 35)

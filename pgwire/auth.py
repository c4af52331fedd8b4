"""Server-side password authentication: SCRAM-SHA-256 and md5, sans-IO.

The gateway moves the bytes (AuthenticationSASL / SASLInitialResponse / ...);
this module only computes. SCRAM follows RFC 5802/7677 as Postgres implements it
(auth-scram.c): tls-server-end-point channel binding only (SCRAM-SHA-256-PLUS), no
authzid, the username inside the SCRAM message is ignored, and an unknown role gets a
mock exchange that fails only at the end so probing cannot tell which roles exist.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
import stringprep
import unicodedata
from dataclasses import dataclass

from pgwire import sqlstate
from pgwire.errors import ProtocolViolation

__all__ = [
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "DEFAULT_ITERATIONS",
    "AuthFailed",
    "ScramVerifier",
    "ScramServer",
    "parse_scram_verifier",
    "scram_client_verifier",
    "saslprep",
    "set_mock_auth_secret",
    "md5_stored",
    "md5_verify",
    "md5_client_response",
]

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
DEFAULT_ITERATIONS = 4096  # Postgres's scram_iterations default
_SALT_LEN = 16  # SCRAM_DEFAULT_SALT_LEN
_NONCE_RAW_LEN = 18  # SCRAM_RAW_NONCE_LEN
_KEY_LEN = 32

# Keys the mock salts. Per process unless the supervisor installs a shared one:
# workers that disagree would hand out different salts for the same unknown role.
_mock_secret = os.urandom(32)


def set_mock_auth_secret(secret: bytes) -> None:
    """Share one mock-salt secret across processes (e.g. the supervisor's)."""
    global _mock_secret
    if len(secret) < 16:
        raise ValueError("mock auth secret must be at least 16 bytes")
    _mock_secret = bytes(secret)


class AuthFailed(Exception):
    """Authentication did not succeed; report 28P01 to the client, log ``detail``."""

    sqlstate = sqlstate.INVALID_PASSWORD

    def __init__(self, message: str = "password authentication failed", detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


@dataclass(slots=True, frozen=True)
class ScramVerifier:
    """A pg_authid SCRAM secret, decoded."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        return None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


@functools.lru_cache(maxsize=1024)
def parse_scram_verifier(rolpassword: str) -> ScramVerifier | None:
    """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` -> ScramVerifier, else None
    (remembered: every login of a role parses the same verifier)."""
    if not isinstance(rolpassword, str) or not rolpassword.startswith(SCRAM_SHA_256 + "$"):
        return None
    parts = rolpassword[len(SCRAM_SHA_256) + 1 :].split("$")
    if len(parts) != 2:
        return None
    iter_salt = parts[0].split(":")
    keys = parts[1].split(":")
    if len(iter_salt) != 2 or len(keys) != 2:
        return None
    iter_text, salt_text = iter_salt
    if not (iter_text.isascii() and iter_text.isdigit()):
        return None
    iterations = int(iter_text)
    salt = _b64decode(salt_text)
    stored_key = _b64decode(keys[0])
    server_key = _b64decode(keys[1])
    if (
        iterations < 1
        or not salt
        or stored_key is None
        or server_key is None
        or len(stored_key) != _KEY_LEN
        or len(server_key) != _KEY_LEN
    ):
        return None
    return ScramVerifier(iterations, salt, stored_key, server_key)


# RFC 4013 tables, as stringprep names them.
_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
    stringprep.in_table_a1,
)


def saslprep(password: str) -> str:
    """Normalise a password the way Postgres does before hashing it (pg_saslprep).

    ASCII passes through untouched; a string SASLprep rejects is used as-is, which
    is also what Postgres and libpq fall back to.
    """
    if password.isascii():
        return password
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return password
    for ch in normalized:
        if any(check(ch) for check in _PROHIBITED):
            return password
    if any(stringprep.in_table_d1(ch) for ch in normalized):
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            return password
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            return password
    return normalized


def _password_bytes(password: str) -> bytes:
    return saslprep(password).encode("utf-8", "surrogatepass")


def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) of RFC 5802 for a password: one PBKDF2."""
    salted = hashlib.pbkdf2_hmac("sha256", _password_bytes(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return client_key, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")


def xor_key(a: bytes, b: bytes) -> bytes:
    """a XOR b for two 32-byte SCRAM values (a proof and a signature)."""
    return (int.from_bytes(a) ^ int.from_bytes(b)).to_bytes(_KEY_LEN)


def scram_client_verifier(
    password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """Build a pg_authid-format SCRAM secret (what ``ALTER ROLE ... PASSWORD`` stores)."""
    if salt is None:
        salt = os.urandom(_SALT_LEN)
    _, stored_key, server_key = scram_keys(password, salt, iterations)
    return f"{SCRAM_SHA_256}${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def _malformed(detail: str) -> ProtocolViolation:
    return ProtocolViolation(f"malformed SCRAM message: {detail}")


_PRINTABLE = re.compile(r"[\x21-\x2b\x2d-\x7e]*")


def _printable(value: str) -> bool:
    # RFC 5802 "printable": %x21-2B / %x2D-7E (no comma).
    return _PRINTABLE.fullmatch(value) is not None


def _attr(part: str, name: str) -> str:
    if len(part) < 2 or part[0] != name or part[1] != "=":
        raise _malformed(f'expected attribute "{name}"')
    return part[2:]


def _check_extension(part: str) -> None:
    if len(part) < 2 or not ("a" <= part[0] <= "z" or "A" <= part[0] <= "Z") or part[1] != "=":
        raise _malformed("attribute expected")


class ScramServer:
    """One SCRAM-SHA-256(-PLUS) exchange, server side.

    ``first()`` answers the SASLInitialResponse data with server-first-message
    (send as AuthenticationSASLContinue); ``final()`` checks client-final-message
    and returns server-final-message (send as AuthenticationSASLFinal, then
    AuthenticationOk) or raises AuthFailed. With ``verifier=None`` the exchange is
    a mock with a stable per-username salt, and ``final()`` always fails.
    """

    mechanisms = (SCRAM_SHA_256,)  # what to put in AuthenticationSASL

    def __init__(
        self,
        verifier: ScramVerifier | None,
        username: str,
        mock_iterations: int = DEFAULT_ITERATIONS,
        *,
        server_nonce: str | None = None,
        binding: bytes | None = None,
        binding_offered: bool = False,
    ) -> None:
        """``server_nonce`` fixes our half of the nonce; only for test vectors.

        Over TLS the server offers SCRAM-SHA-256-PLUS (``binding_offered``); when the
        client chose it, ``binding`` is the connection's tls-server-end-point data.
        """
        self.username = username
        self._binding = binding
        self._binding_offered = binding_offered or binding is not None
        self._server_nonce = server_nonce
        self._mock = verifier is None
        if verifier is None:
            seed = username.encode("utf-8", "surrogatepass")
            salt = _hmac(_mock_secret, b"pgfleet mock salt\0" + seed)[:_SALT_LEN]
            verifier = ScramVerifier(
                mock_iterations, salt, os.urandom(_KEY_LEN), os.urandom(_KEY_LEN)
            )
        self._verifier = verifier
        self._state = "first"
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self.authenticated = False

    def first(self, client_first: bytes) -> bytes:
        """client-first-message -> server-first-message."""
        if self._state != "first":
            raise ProtocolViolation("unexpected SCRAM client-first-message")
        self._state = "failed"  # until this message proves well-formed
        text = _decode(client_first)
        comma = text.find(",")
        flag, rest = text[: max(comma, 0)], text[comma + 1 :]
        if text[:1] == "p":
            if self._binding is None:
                raise _malformed(
                    "the client selected SCRAM-SHA-256 without channel binding, "
                    "but the SCRAM message includes channel binding data"
                )
            if comma < 0 or flag[:2] != "p=":
                raise _malformed("unexpected channel-binding flag")
            if flag[2:] != "tls-server-end-point":
                raise ProtocolViolation(f'unsupported SCRAM channel-binding type "{flag[2:]}"')
        elif self._binding is not None:
            raise _malformed(
                "the client selected SCRAM-SHA-256-PLUS, "
                "but the SCRAM message does not include channel binding data"
            )
        elif flag not in ("n", "y") or comma != 1:
            raise _malformed("unexpected channel-binding flag")
        elif flag == "y" and self._binding_offered:
            raise ProtocolViolation(
                "SCRAM channel binding negotiation error: the client supports SCRAM channel "
                "binding but thinks the server does not; this server does support it"
            )
        if rest[:2] == "a=":
            raise ProtocolViolation(
                "client uses authorization identity, but it is not supported",
                sqlstate.FEATURE_NOT_SUPPORTED,
            )
        if rest[:1] != ",":
            raise _malformed("unexpected attribute in client-first-message")
        self._gs2_header = text[: comma + 2]
        bare = rest[1:]
        if bare.startswith("m="):
            raise ProtocolViolation(
                "client requires an unsupported SCRAM extension", sqlstate.FEATURE_NOT_SUPPORTED
            )
        parts = bare.split(",")
        if len(parts) < 2:
            raise _malformed("client-first-message is incomplete")
        _attr(parts[0], "n")  # Postgres ignores it: the startup packet names the role
        client_nonce = _attr(parts[1], "r")
        if not client_nonce or not _printable(client_nonce):
            raise _malformed("invalid client nonce")
        for extension in parts[2:]:
            _check_extension(extension)

        self._client_first_bare = bare
        ours = self._server_nonce or _b64(os.urandom(_NONCE_RAW_LEN))
        self._nonce = client_nonce + ours
        v = self._verifier
        self._server_first = f"r={self._nonce},s={_b64(v.salt)},i={v.iterations}"
        self._state = "final"
        return self._server_first.encode("ascii")

    def final(self, client_final: bytes) -> bytes:
        """client-final-message -> server-final-message, or AuthFailed."""
        if self._state != "final":
            raise ProtocolViolation("unexpected SCRAM client-final-message")
        self._state = "failed"
        text = _decode(client_final)
        parts = text.split(",")
        if len(parts) < 3:
            raise _malformed("client-final-message is incomplete")
        cbind = _b64decode(_attr(parts[0], "c"))
        if cbind is None:
            raise _malformed("invalid channel-binding data")
        expected = self._gs2_header.encode("ascii") + (self._binding or b"")
        if not hmac.compare_digest(cbind, expected):
            if self._binding is not None:
                raise ProtocolViolation("SCRAM channel binding check failed")
            raise ProtocolViolation(
                "unexpected SCRAM channel-binding attribute in client-final-message"
            )
        if _attr(parts[1], "r") != self._nonce:
            raise _malformed("nonce does not match")
        for extension in parts[2:-1]:
            _check_extension(extension)
        proof = _b64decode(_attr(parts[-1], "p"))
        if proof is None or len(proof) != _KEY_LEN:
            raise _malformed("malformed proof in client-final-message")
        without_proof = text[: len(text) - len(parts[-1]) - 1]

        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_bytes = auth_message.encode("utf-8")
        v = self._verifier
        # Same work on the mock path, so timing does not reveal it either.
        signature = _hmac(v.stored_key, auth_bytes)
        client_key = xor_key(proof, signature)
        matches = hmac.compare_digest(hashlib.sha256(client_key).digest(), v.stored_key)
        if self._mock:
            raise AuthFailed(
                f'password authentication failed for user "{self.username}"',
                "User does not have a valid SCRAM secret.",
            )
        if not matches:
            raise AuthFailed(
                f'password authentication failed for user "{self.username}"',
                "Password does not match.",
            )
        self._state = "done"
        self.authenticated = True
        return b"v=" + base64.b64encode(_hmac(v.server_key, auth_bytes))


def _decode(message: bytes) -> str:
    try:
        return bytes(message).decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("invalid UTF-8") from None


# --------------------------------------------------------------------------- md5


def _md5hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_stored(password: str, user: str) -> str:
    """pg_authid md5 format: 'md5' + md5hex(password + user)."""
    return "md5" + _md5hex((password + user).encode("utf-8"))


def md5_client_response(password: str, user: str, salt: bytes) -> str:
    """What a client answers AuthenticationMD5Password with."""
    return "md5" + _md5hex(md5_stored(password, user)[3:].encode("ascii") + salt)


def md5_verify(stored: str, salt: bytes, client_response: str) -> bool:
    """Check a client's md5 response against an md5-format pg_authid secret."""
    if len(stored) != 35 or not stored.startswith("md5"):
        return False
    try:
        inner = stored[3:].encode("ascii")
    except UnicodeEncodeError:
        return False
    expected = ("md5" + _md5hex(inner + salt)).encode("ascii")
    return hmac.compare_digest(expected, client_response.encode("utf-8", "surrogatepass"))

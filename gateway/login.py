"""Client login: the startup packet's parameters, authentication, and the first status report.

Authentication checks the client against the real role's verifier from
``pg_authid`` (fetched by the pooler), with the same SQLSTATEs and messages as
Postgres. The ParameterStatus values reported to the client are the ones a real
backend reports after the session's startup settings are applied to it, which
also validates those settings exactly as Postgres would.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import TYPE_CHECKING

from pgwire import backend as be
from pgwire import frontend as fe
from pgwire import sqlstate
from pgwire.auth import (
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    AuthFailed,
    ScramServer,
    md5_stored,
    md5_verify,
    parse_scram_verifier,
    scram_client_verifier,
)
from pgwire.errors import ProtocolViolation

from . import tls
from .backend import K_QUERY
from .startup_params import StartupParamError, session_settings

if TYPE_CHECKING:
    from .backend import BackendLink
    from .session import Session
    from .worker import Worker

PASSWORD_MSG = ord("p")
EMPTY_QUERY = fe.encode_query("")
TERMINATE = ord("X")


class LoginFailed(Exception):
    def __init__(self, code: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


class _NextMessage:
    """What the login awaits for the client's next message. The login's own driver
    (not an asyncio Task) sees it and resumes the login straight from data_received:
    no future, no task wakeup, no loop turn per message."""

    __slots__ = ()

    def __await__(self):
        yield self


_NEXT_MESSAGE = _NextMessage()

# The SASL mechanisms offered (with TLS, -PLUS first, as Postgres lists them), encoded once.
_WITH_PLUS = (SCRAM_SHA_256_PLUS, SCRAM_SHA_256)
_WITHOUT_PLUS = (SCRAM_SHA_256,)
_SASL_OFFERS = {m: be.encode_auth_sasl(m) for m in (_WITH_PLUS, _WITHOUT_PLUS)}


class StartupFacts:
    """What a startup packet asks for, worked out once per distinct packet: every
    connection of an application sends the same bytes, so a worker keeps these by
    packet (see Worker.remember_startup) and a repeat login skips the parsing."""

    __slots__ = ("user", "database", "key", "settings", "custom_names", "status_key", "negotiate")

    def __init__(self, user: str, database: str, settings: dict[str, tuple[str, str]],
                 status_key: tuple, negotiate: bytes | None) -> None:
        self.user = user
        self.database = database
        self.key = (database, user)
        self.settings = settings
        # Extension-style settings (app.tenant): the session re-reads them by name.
        self.custom_names = frozenset(low for low in settings if "." in low)
        self.status_key = status_key
        self.negotiate = negotiate  # NegotiateProtocolVersion to send first, if any


def read_startup(worker: Worker, msg: fe.StartupMessage) -> StartupFacts:
    """A StartupMessage's user, database and settings, refused as Postgres refuses them."""
    params = msg.params
    minor = msg.protocol & 0xFFFF
    unknown = [k for k in params if k.startswith("_pq_.")]
    negotiate = be.encode_negotiate_protocol_version(0, unknown) if minor > 0 or unknown else None
    user = params.get("user", "")
    if not user:
        raise LoginFailed(
            sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        )
    database = params.get("database") or user
    repl = params.get("replication")
    if repl is not None and repl.lower() not in ("false", "off", "no", "0"):
        raise LoginFailed(
            sqlstate.FEATURE_NOT_SUPPORTED, "pgfleet does not accept replication connections"
        )
    try:
        settings = session_settings(params)
    except StartupParamError as exc:
        raise LoginFailed(exc.sqlstate, exc.message) from None
    settings = worker.shared_book(settings)
    return StartupFacts(user, database, settings, worker.status_key((database, user), settings),
                        negotiate)


class LoginDeadlines:
    """Ends logins that outlast --auth-timeout, as Postgres's authentication_timeout
    does: one sweep over the logins in progress instead of a timer per connection
    (made and cancelled at every login). A login ends between ``timeout`` and
    ``timeout`` plus one sweep period after its connection opened."""

    __slots__ = ("loop", "timeout", "period", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.period = min(1.0, max(0.05, timeout / 10))
        # Login -> loop time its connection opened, oldest first (only ever appended).
        self.started: dict[Login, float] = {}
        loop.call_later(self.period, self._sweep)

    def _sweep(self) -> None:
        self.loop.call_later(self.period, self._sweep)
        limit = self.loop.time() - self.timeout
        late = []
        for login, opened in self.started.items():
            if opened > limit:
                break
            late.append(login)
        for login in late:
            if self.started.pop(login, None) is not None:
                login.timed_out()


class Login:
    """Drives one client's login; lives only until the session is ready or gone.

    The login is a coroutine stepped by :meth:`_step` rather than an asyncio Task:
    it runs at once up to its first wait, so a login whose role facts and status
    report are at hand (most of them) completes inside the read of its startup
    packet, and each later client message resumes it directly. Futures it awaits
    (the pooler's answer, a backend, PBKDF2 in a thread) resume it through their
    done callback, as a Task would."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.worker = session.worker
        self.loop = self.worker.loop
        self._coro = None
        self._running = False
        self._awaits_message = False
        self._link_fut: asyncio.Future | None = None
        self.worker.login_deadlines.started[self] = self.loop.time()

    def abort(self) -> None:
        """The session is gone: stop the login where it waits (its finally blocks run)."""
        self.worker.login_deadlines.started.pop(self, None)
        coro, self._coro = self._coro, None
        if coro is not None and not self._running:
            coro.close()
        if self._link_fut is not None and not self._link_fut.done():
            self._link_fut.cancel()

    def timed_out(self) -> None:
        self.session.fatal(sqlstate.PROTOCOL_VIOLATION, "canceling authentication due to timeout")

    def start(self, startup: fe.StartupMessage | StartupFacts, packet: bytes | None = None) -> None:
        """Log in with a decoded StartupMessage (``packet``: its bytes, to remember
        what it asks for) or with the facts of a packet seen before."""
        if type(startup) is StartupFacts and self._at_once(startup):
            return
        self._coro = self._run(startup, packet)
        self._step()

    def _at_once(self, facts: StartupFacts) -> bool:
        """A login with nothing to wait for (trust, and this worker knows the role's
        facts and the status report): done here, without the coroutine, as most
        logins of an application that connects per request are. False: it waits."""
        worker = self.worker
        if worker.cfg.auth != "trust":
            return False
        status = worker.status_cache.get(facts.status_key)
        info = worker.role_facts.get(facts.user, facts.database) if status is not None else None
        if info is None:
            return False
        try:
            self._adopt(facts)
            self._trust(facts.user, info)
            self._authorize(facts.user, facts.database, info)
        except LoginFailed as exc:
            self._refused(facts.user)
            self.session.fatal(exc.code, exc.message, exc.detail)
            return True
        self._done(status)
        return True

    def wake(self) -> None:
        """Bytes arrived from the client: resume a login waiting for a message."""
        if self._awaits_message:
            self._awaits_message = False
            self._step()

    def _step(self, _done: object = None) -> None:
        coro = self._coro
        if coro is None or self._running:
            return
        self._running = True
        try:
            waited = coro.send(None)
        except StopIteration:
            self._coro = None
            return
        finally:
            self._running = False
        if self._coro is None:  # aborted while it ran
            coro.close()
        elif waited is _NEXT_MESSAGE:
            self._awaits_message = True
        elif waited is None:  # a bare yield (asyncio.sleep(0))
            self.loop.call_soon(self._step)
        else:  # a future: resume when it is done, as a Task would
            waited._asyncio_future_blocking = False
            waited.add_done_callback(self._step)

    async def _message(self) -> tuple[int, bytes]:
        framer = self.session.framer
        while True:
            m = framer.next_message()
            if m is not None:
                return m[0], m[1]
            await _NEXT_MESSAGE

    async def _password_message(self, expected: str) -> bytes:
        mtype, payload = await self._message()
        if mtype == TERMINATE:
            raise asyncio.CancelledError
        if mtype != PASSWORD_MSG:
            raise LoginFailed(
                sqlstate.PROTOCOL_VIOLATION, f"expected {expected}, got message type {mtype}"
            )
        return payload

    # -- the login sequence -------------------------------------------------------------------
    async def _run(self, startup: fe.StartupMessage | StartupFacts, packet: bytes | None) -> None:
        s = self.session
        try:
            status = await self._login(startup, packet)
        except LoginFailed as exc:
            s.fatal(exc.code, exc.message, exc.detail)
            return
        except ProtocolViolation as exc:
            s.fatal(exc.sqlstate, exc.message)
            return
        except asyncio.CancelledError:
            s.close()
            return
        except Exception as exc:  # the pooler vanished, etc.: fail this client only
            s.fatal(sqlstate.CONNECTION_FAILURE, f"pgfleet could not log you in: {exc}")
            return
        self._done(status)

    def _done(self, status: dict[str, str]) -> None:
        self.worker.login_deadlines.started.pop(self, None)
        if self.session.phase != 3:
            self.session.ready(status)

    async def _login(self, startup: fe.StartupMessage | StartupFacts,
                     packet: bytes | None) -> dict[str, str]:
        if type(startup) is StartupFacts:
            facts = startup
        else:
            facts = read_startup(self.worker, startup)
            if packet is not None:
                self.worker.remember_startup(packet, facts)
        self._adopt(facts)
        user, database = facts.user, facts.database
        cache_key = facts.status_key
        # Role/database defaults may change while we wait; then what we learn is stale.
        gen = self.worker.defaults_gen
        worker = self.worker
        status = worker.status_cache.get(cache_key)
        # With the status report known here, facts this worker kept will do; without
        # it, ask the pooler, which may know the report from another worker.
        info = worker.role_facts.get(user, database) if status is not None else None
        if info is None:
            asked_at, info = await worker.pooler.auth(user, database, cache_key[1])
            if "error" in info:
                raise LoginFailed(sqlstate.CANNOT_CONNECT_NOW, str(info["error"]))
            worker.role_facts.remember(user, database, asked_at, info)
        try:
            await self._authenticate(user, info)
            self._authorize(user, database, info)
        except LoginFailed:
            self._refused(user)
            raise
        status = worker.status_cache.get(cache_key)
        if status is not None:
            return status
        status = info.get("status")
        if status is None:
            status = await self._probe_status()
            if gen == self.worker.defaults_gen:
                self.worker.pooler.send(
                    {"op": "status", "db": database, "user": user, "skey": cache_key[1],
                     "status": status}
                )
        if gen == self.worker.defaults_gen:  # else made with defaults that just changed
            self.worker.remember_status(cache_key, status)
        return status

    def _adopt(self, facts: StartupFacts) -> None:
        """The session takes what its startup packet asks for."""
        s = self.session
        if facts.negotiate is not None:
            s.write_client(facts.negotiate)
        user, database = facts.user, facts.database
        s.user, s.database, s.key = user, database, facts.key
        s.settings = s.startup_settings = facts.settings
        s.custom_names = facts.custom_names
        if self.worker.cfg.auth == "password" and not s.tls_in_use:
            # Cleartext passwords only travel encrypted: as a pg_hba.conf with hostssl only.
            raise LoginFailed(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                f'no pg_hba.conf entry for host "{self._client_host()}", user "{user}", '
                f'database "{database}", no encryption',
            )

    def _refused(self, user: str) -> None:
        """What we know of this role may be stale: refetch it for the next login, here
        and (through the pooler's epoch) in every worker."""
        self.worker.role_facts.forget(user)
        self.worker.pooler.invalidate(user)

    def _authorize(self, user: str, database: str, info: dict) -> None:
        """Authenticated: AuthenticationOk, then the checks Postgres makes after it."""
        s = self.session
        s.cork()  # AuthenticationOk travels with the status report (or the error)
        s.write_client(be.encode_auth_ok())
        if not info["can_login"]:
            raise LoginFailed(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION,
                f'role "{user}" is not permitted to log in',
            )
        if not info["db_exists"]:
            raise LoginFailed(sqlstate.INVALID_CATALOG_NAME, f'database "{database}" does not exist')
        if not info["db_allow_conn"]:
            raise LoginFailed(
                sqlstate.OBJECT_NOT_IN_PREREQUISITE_STATE,
                f'database "{database}" is not currently accepting connections',
            )
        if not info["db_connect"]:
            raise LoginFailed(
                sqlstate.INSUFFICIENT_PRIVILEGE,
                f'permission denied for database "{database}"',
                "User does not have CONNECT privilege.",
            )

    @staticmethod
    def _trust(user: str, info: dict) -> None:
        if not info["role_exists"]:
            raise LoginFailed(
                sqlstate.INVALID_AUTHORIZATION_SPECIFICATION, f'role "{user}" does not exist'
            )

    async def _authenticate(self, user: str, info: dict) -> None:
        method = self.worker.cfg.auth
        if method == "trust":
            self._trust(user, info)
            return
        stored = info["password"] if info["role_exists"] and not info["expired"] else None
        ok = False
        if method == "password":
            ok = await self._cleartext(user, stored)
        elif method == "md5" and (stored is None or stored.startswith("md5")):
            ok = await self._md5(user, stored)
        else:
            # Postgres uses SCRAM under "md5" too when the role has a SCRAM verifier.
            ok = await self._scram(user, stored)
        if not ok:
            raise LoginFailed(
                sqlstate.INVALID_PASSWORD, f'password authentication failed for user "{user}"'
            )

    def _client_host(self) -> str:
        peer = self.session.transport.get_extra_info("peername") if self.session.transport else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "[local]"

    async def _cleartext(self, user: str, stored: str | None) -> bool:
        """AuthenticationCleartextPassword, checked against the role's SCRAM or md5 secret
        as Postgres's plain_crypt_verify does (only ever offered over TLS)."""
        self.session.write_client(be.encode_auth_cleartext())
        payload = await self._password_message("password message")
        password = fe.decode_password(payload)
        if stored is None or not password:
            return False
        if stored.startswith("md5"):
            return hmac.compare_digest(md5_stored(password, user).encode(), stored.encode())
        verifier = parse_scram_verifier(stored)
        if verifier is None:
            return False
        # PBKDF2 with the role's iteration count: off the event loop (it releases the GIL).
        computed = await self.loop.run_in_executor(
            None, scram_client_verifier, password, verifier.iterations, verifier.salt
        )
        mine = parse_scram_verifier(computed)
        return mine is not None and hmac.compare_digest(mine.server_key, verifier.server_key)

    async def _md5(self, user: str, stored: str | None) -> bool:
        salt = os.urandom(4)
        self.session.write_client(be.encode_auth_md5(salt))
        payload = await self._password_message("password message")
        answer = fe.decode_password(payload)
        return stored is not None and md5_verify(stored, salt, answer)

    async def _scram(self, user: str, stored: str | None) -> bool:
        verifier = parse_scram_verifier(stored) if stored else None
        s = self.session
        # Over TLS, SCRAM-SHA-256-PLUS too (tls-server-end-point), first as Postgres lists it.
        binding = tls.channel_binding_data(s.transport) if s.tls_in_use else None
        mechanisms = _WITH_PLUS if binding else _WITHOUT_PLUS
        s.write_client(_SASL_OFFERS[mechanisms])
        payload = await self._password_message("SASL response")
        mech, data = fe.decode_sasl_initial(payload)
        if mech not in mechanisms:
            raise LoginFailed(
                sqlstate.PROTOCOL_VIOLATION,
                "client selected an invalid SASL authentication mechanism",
            )
        server = ScramServer(
            verifier, user, binding=binding if mech == SCRAM_SHA_256_PLUS else None,
            binding_offered=binding is not None,
        )
        try:
            first = server.first(data)
        except AuthFailed:
            return False
        self.session.write_client(be.encode_auth_sasl_continue(first))
        payload = await self._password_message("SASL response")
        try:
            final = server.final(fe.decode_sasl_response(payload))
        except AuthFailed:
            return False
        self.session.cork()  # with AuthenticationOk and the status report
        self.session.write_client(be.encode_auth_sasl_final(final))
        return True

    # -- the first status report ---------------------------------------------------------------
    async def _probe_status(self) -> dict[str, str]:
        """Apply the session's settings on a real backend and report what it reports."""
        s = self.session
        self._link_fut = self.loop.create_future()
        s._request_backend()
        link: BackendLink = await self._link_fut
        ok_fut = self.loop.create_future()

        def applied(ok: bool) -> None:
            if not ok_fut.done():
                ok_fut.set_result(ok)

        try:
            if not self.worker.apply_settings(link, s.settings, on_done=applied):
                # Nothing to set: an empty query all the same, so that a backend that has
                # run nothing since a configuration reload reports what it has now.
                link.expect(K_QUERY, swallow=1, on_done=applied)
                link.write(EMPTY_QUERY)
            link.flush()
            ok = await ok_fut
            if not ok:
                fields = link.last_error or {}
                raise LoginFailed(
                    fields.get("C", sqlstate.INVALID_PARAMETER_VALUE),
                    fields.get("M", "invalid startup parameter"),
                    fields.get("D"),
                )
            while link.queue and not link.dead:  # let the replay's ReadyForQuery arrive
                link.idle_waiter = self.loop.create_future()
                await link.idle_waiter
            if link.dead:
                raise LoginFailed(sqlstate.CONNECTION_FAILURE, "server closed the connection")
            return dict(link.reported)
        finally:
            link.idle_waiter = None
            if link.dead:
                self.worker.leases.discard(link)
            else:
                self.worker.leases.put_back(link)

    def on_link(self, link: BackendLink) -> None:
        fut = self._link_fut
        if fut is None or fut.done():
            self.worker.leases.put_back(link)
        else:
            fut.set_result(link)

    def on_lease_failed(self, fields: dict[str, str]) -> None:
        fut = self._link_fut
        if fut is not None and not fut.done():
            fut.set_exception(
                LoginFailed(
                    fields.get("C", sqlstate.CONNECTION_FAILURE),
                    fields.get("M", "could not open a backend"),
                    fields.get("D"),
                )
            )

    def on_wait_timeout(self) -> None:
        fut = self._link_fut
        if fut is not None and not fut.done():
            fut.set_exception(
                LoginFailed(
                    sqlstate.CANNOT_CONNECT_NOW,
                    "no backend became free within query_wait_timeout to start this session",
                )
            )

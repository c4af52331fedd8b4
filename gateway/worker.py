"""One gateway worker process: accepts clients on the shared socket and serves their sessions."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import resource
import signal
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import orjson
import uvloop

from ipc.cancel_table import CLIENT_PID_BASE, CancelTable, new_secret
from ipc.channel import Channel, connect
from ipc.epoch import SharedEpoch
from ipc.statement_catalog import HASHED_KEY, StatementCatalog, backend_name, key_of_name, sql_key
from pgwire import backend as be
from pgwire import frontend as fe
from pgwire.quoting import quote_guc_name, quote_literal
from supervisor.config import Config

from . import gc_policy
from .backend import K_QUERY, BackendLink
from .leases import LeaseManager
from .listen import Listeners
from .login import LoginDeadlines, StartupFacts
from .protocol import P, msg
from .role_facts import RoleFacts
from .session import Session

log = logging.getLogger("pgfleet.gateway")
T = TypeVar("T")

STATUS_CACHE_SIZE = 1024
SHARED_BOOKS_MAX = 4096
STATEMENT_NAMES_MAX = 16384
#: Distinct startup packets whose facts a worker keeps, and the longest it keeps.
STARTUP_FACTS_MAX = 1024
STARTUP_PACKET_CACHED_MAX = 1024


class PoolerClient:
    """The worker's end of the control channel to the pooler."""

    def __init__(self, worker: Worker, channel: Channel) -> None:
        self.worker = worker
        self.channel = channel
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future] = {}
        self._auth_inflight: dict[tuple[str, str, str], asyncio.Task] = {}
        channel.on_message = self.on_message
        channel.on_close = self.on_close

    def send(self, msg: dict) -> None:
        self.channel.send(msg)

    async def call(self, msg: dict, timeout: float = 60.0) -> dict:
        rid = next(self._ids)
        fut = self.worker.loop.create_future()
        self._calls[rid] = fut
        try:
            self.send({**msg, "req": rid})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._calls.pop(rid, None)

    async def auth(self, user: str, database: str, skey: str) -> tuple[int, dict]:
        """Role facts for a login, and the startup status report if the pooler knows
        it for these settings (``skey``), with the role-facts epoch read before asking.
        The pooler's cache is the one place a refused login refreshes, for every worker
        at once (see ``role_facts``). Logins that need the same answer while one is on
        its way share it: under load the reply waits behind a busy loop, and every
        login in that window would otherwise ask again."""
        key = (user, database, skey)
        task = self._auth_inflight.get(key)
        if task is None:
            asked_at = self.worker.role_facts.epoch.value
            task = self.worker.loop.create_task(self._auth(asked_at, user, database, skey))
            self._auth_inflight[key] = task
            task.add_done_callback(lambda t: self._auth_done(key, t))
        return await asyncio.shield(task)

    async def _auth(self, asked_at: int, user: str, database: str, skey: str) -> tuple[int, dict]:
        return asked_at, await self.call({"op": "auth", "user": user, "db": database, "skey": skey})

    def _auth_done(self, key: tuple[str, str, str], task: asyncio.Task) -> None:
        self._auth_inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: the logins that shared it may all be gone

    def invalidate(self, user: str) -> None:
        self.send({"op": "invalidate", "user": user})

    def on_message(self, msg: dict, fds: list[int]) -> None:
        op = msg.get("op")
        leases = self.worker.leases
        if op == "leased":
            leases.on_leased(msg, fds)
        elif op == "lease_failed":
            leases.on_lease_failed(msg)
        elif op == "defaults_changed":
            key = (str(msg["db"]), str(msg["user"]))
            self.worker.forget_status(key)
            leases.retire(key)
        elif op == "forget_statuses":
            self.worker.forget_status(None)
        elif op == "vacate":
            db = str(msg["db"])
            for key in [k for k in leases.idle if k[0] == db]:
                leases.retire(key)
        elif op == "cancel_client":
            self.worker.cancel_waiting(int(msg["pid"]), int(msg["secret"]))
        elif op == "notify":
            self.worker.listeners.on_notify(msg)
        elif op == "listening":
            self.worker.listeners.on_listening(msg)
        elif op == "reclaim":
            debts = {(str(db), str(user)): int(n) for db, user, n in msg["debts"]}
            leases.reclaim(debts, spare=bool(msg.get("spare", True)))
        else:
            fut = self._calls.get(msg.get("req"))
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for fd in fds if op != "leased" else ():
            os.close(fd)

    def on_close(self) -> None:
        # Without the pooler we can neither lease nor release: exit and let the
        # supervisor restart us against the new pooler.
        log.error("lost the pooler connection; worker %d exits", self.worker.index)
        os._exit(3)


class Worker:
    def __init__(self, cfg: Config, index: int, listen_sock: socket.socket) -> None:
        self.cfg = cfg
        self.index = index
        self.listen_sock = listen_sock
        self.loop = asyncio.get_event_loop()
        # Every client connection, logging in or logged in (a dict used as an ordered
        # set: about a third of a set's bytes per member at tens of thousands).
        self.sessions: dict[Session, None] = {}
        self.status_cache: OrderedDict[tuple, dict[str, str]] = OrderedDict()
        self.books: dict[frozenset, dict[str, tuple[str, str]]] = {}
        # Startup packet (length word included) -> what it asks for.
        self.startups: dict[bytes, StartupFacts] = {}
        self.login_deadlines = LoginDeadlines(self.loop, cfg.auth_timeout)
        # id(shared book) -> (book, its settings as text); id(status) -> (status, encoded)
        self._settings_text: dict[int, tuple[object, str]] = {}
        self._status_bytes: dict[int, tuple[object, bytes]] = {}
        # Parse body (and search_path) -> backend name, so the shared catalog is
        # consulted once per text.
        self._statement_names: dict[bytes, bytes] = {}
        # Hashes of unnamed statements' texts seen once, and the promoted ones' shared
        # name and Parse under it (see promoted_statement).
        self._unnamed_seen: set[int] = set()
        self._promoted: dict[bytes, tuple[bytes, bytes]] = {}
        # Hash-named statements (catalog full) that parsed successfully here.
        self._known_hashed: set[bytes] = set()
        self.catalog = StatementCatalog.attach(cfg.statement_catalog_name)
        self._sql_names = itertools.count(1)
        # Bumped when role/database defaults change: status reports made before are stale.
        self.defaults_gen = 0
        self.cancel_table = CancelTable.attach(cfg.cancel_table_name)
        self.role_facts = RoleFacts(SharedEpoch.attach(cfg.role_epoch_name))
        self.slots = self.cancel_table.partition(index, cfg.workers)
        self.cancel_table.reset_range(self.slots)
        self.free_slots = list(reversed(self.slots))
        self.listeners = Listeners(self)
        self.tasks: set[asyncio.Task] = set()
        self.leases: LeaseManager  # set in run()
        self.pooler: PoolerClient

    # -- cancel table -----------------------------------------------------------------------
    def claim_slot(self) -> tuple[int, int, int]:
        if not self.free_slots:
            return -1, 0, new_secret()  # table full: this client just cannot cancel
        slot = self.free_slots.pop()
        secret = new_secret()
        pid = self.cancel_table.claim(slot, secret)
        return slot, pid, secret

    def release_slot(self, slot: int) -> None:
        self.cancel_table.release(slot)
        self.free_slots.append(slot)

    def cancel_client(self, client_pid: int, secret: int) -> asyncio.Task | None:
        """A CancelRequest arrived: cancel whatever backend serves that client right now,
        or, if it is waiting for a backend, its queued statement (in the worker that
        owns it: through the pooler if that is another one). Returns the task that
        signals the backend, if there is one."""
        target = self.cancel_table.lookup(client_pid, secret)
        if target is not None:
            return self.send_cancel(*target)
        owner = self.cancel_table.owner_of(client_pid, self.cfg.workers)
        if owner == self.index:
            self.cancel_waiting(client_pid, secret)
        elif owner is not None:
            self.pooler.send({"op": "cancel_client", "worker": owner, "pid": client_pid,
                              "secret": secret})
        return None

    def cancel_waiting(self, client_pid: int, secret: int) -> None:
        if not self.cancel_table.holds(client_pid, secret):
            return
        slot = client_pid - CLIENT_PID_BASE
        for session in self.sessions:
            if session.slot == slot:
                session.cancel_waiting()
                return

    def vacate(self, databases: tuple[str, ...]) -> None:
        """A statement needs these databases free of other sessions (DROP DATABASE, ...):
        every worker and the pooler close their idle backends there. Postgres waits a
        few seconds for other backends to exit, which is time enough."""
        for db in databases:
            self.pooler.send({"op": "vacate", "db": db})

    def client_pid_of_backend(self, backend_pid: int) -> int:
        """The pid our client knows for the session a backend serves here, so that a
        notification from a session's own NOTIFY carries that session's pid."""
        for link in self.leases.held:
            if link.pid == backend_pid and link.session is not None:
                return link.session.client_pid or backend_pid
        return backend_pid

    def send_cancel(self, backend_pid: int, backend_secret: int) -> asyncio.Task:
        """Ask Postgres to cancel; the task ends once Postgres has signalled the backend."""
        return self.spawn(self._send_cancel(backend_pid, backend_secret))

    def spawn(self, coro) -> asyncio.Task:
        """A task kept alive until it finishes: the event loop holds tasks only weakly,
        so a cancelled login whose session is gone could be collected mid-cancel."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _send_cancel(self, pid: int, secret: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self.loop.sock_connect(sock, str(self.cfg.pg_socket_path))
            await self.loop.sock_sendall(sock, fe.encode_cancel_request(pid, secret))
            # Postgres closes the connection after reading the request.
            await asyncio.wait_for(self.loop.sock_recv(sock, 1), 5.0)
        except (OSError, TimeoutError):
            pass
        finally:
            sock.close()

    # -- settings replay --------------------------------------------------------------------
    def apply_settings(
        self,
        link: BackendLink,
        settings: dict[str, tuple[str, str]],
        on_done=None,
        quiet: bool = False,
        force: bool = False,
    ) -> bool:
        """Make ``link``'s settings the session's: one swallowed query with the difference.

        ``force`` sets every one of ``settings`` and resets nothing else (putting
        startup values back after a client's RESET); ``quiet`` also swallows an error
        (a RESET inside a failed transaction). Returns False if nothing was sent.
        """
        applied = link.applied
        link.synced_with = None if force else settings
        if force:
            sets = list(settings.values())
            resets: list[str] = []
        else:
            sets = [(g, v) for low, (g, v) in settings.items() if applied.get(low) != v]
            resets = [low for low in applied if low not in settings]
        if not sets and not resets:
            return False
        parts = [f"RESET {quote_guc_name(low)}" for low in resets]
        if sets:
            calls = ", ".join(
                f"pg_catalog.set_config({quote_literal(g)}, {quote_literal(v)}, false)"
                for g, v in sets
            )
            parts.append("SELECT " + calls)
        before = dict(applied)
        for low in resets:
            del applied[low]
        for low, (_, v) in settings.items():
            applied[low] = v

        def done(ok: bool) -> None:
            if not ok:
                link.applied = before
                link.synced_with = None
            if on_done is not None:
                on_done(ok)

        link.expect(K_QUERY, swallow=2 if quiet else 1, on_done=done)
        link.write(fe.encode_query("; ".join(parts)))
        return True

    def sql_statement_name(self) -> bytes:
        """A backend name for one session's SQL PREPARE, unique across workers and restarts."""
        return backend_name(sql_key(os.getpid(), next(self._sql_names)))

    def statement_name(self, body: bytes, search_path: str | None = None) -> bytes:
        """The backend name of a Parse body (query and parameter types): ``pgf_<id>`` from
        the shared catalog, the same in every worker, so each backend parses it once.

        ``search_path``: the session's own, if it set one. Sessions on different paths
        get different names for the same text: Postgres analyses a prepared statement
        again when the search_path it was parsed under changes, and one shared between
        tenants whose tables differ would fail "cached plan must not change result
        type" where each session's own statement works."""
        key = _statement_key(body, search_path)
        name = self._statement_names.get(key)
        return self._name_statement(key) if name is None else name

    def promoted_statement(self, body: bytes, search_path: str | None
                           ) -> tuple[bytes, bytes] | None:
        """The shared backend name for an unnamed statement's Parse body, and the Parse
        under that name (kept: it is sent once per backend, and kept for the heal on every
        run), once this worker has seen the text before (None the first time). Drivers
        send their queries as unnamed statements, Postgres parses each one again, and
        repeated texts are most of them: run as a shared named statement, each backend
        parses them once. A text seen once is left alone, so one-off queries do not fill
        the catalog."""
        key = _statement_key(body, search_path)
        promoted = self._promoted.get(key)
        if promoted is not None:
            return promoted
        name = self._statement_names.get(key)
        if name is None:
            seen = self._unnamed_seen
            h = hash(key)
            if h not in seen:
                if len(seen) >= STATEMENT_NAMES_MAX:
                    seen.clear()
                seen.add(h)
                return None
            name = self._name_statement(key)
        if len(self._promoted) >= STATEMENT_NAMES_MAX:
            self._promoted.clear()
        promoted = self._promoted[key] = (name, msg(P, name + b"\x00" + body))
        return promoted

    def _name_statement(self, key: bytes) -> bytes:
        if len(self._statement_names) >= STATEMENT_NAMES_MAX:
            self._statement_names.clear()
        name = self._statement_names[key] = backend_name(self.catalog.key_for(key))
        return name

    def note_statement(self, bname: bytes) -> None:
        """Postgres accepted ``bname``'s text (see Session._parse_known)."""
        key = key_of_name(bname)
        if key is None:
            return
        if key & HASHED_KEY:
            if len(self._known_hashed) >= STATEMENT_NAMES_MAX:
                self._known_hashed.clear()
            self._known_hashed.add(bname)
        else:
            self.catalog.mark_parsed(key)

    def statement_known(self, bname: bytes) -> bool:
        """Did Postgres accept this text before, in any worker?"""
        key = key_of_name(bname)
        if key is None:
            return False
        if key & HASHED_KEY:
            return bname in self._known_hashed
        return self.catalog.parsed(key)

    def status_key(self, key: tuple[str, str], settings: dict[str, tuple[str, str]]) -> tuple:
        """Cache key of the status report: (database, user) and the settings as text
        (worked out once per shared book: every login with the same settings has it)."""
        text = _once_per_object(
            self._settings_text, settings, SHARED_BOOKS_MAX,
            lambda: orjson.dumps(sorted((low, v) for low, (_, v) in settings.items())).decode(),
        )
        return (key, text)

    def status_messages(self, status: dict[str, str]) -> bytes:
        """The ParameterStatus messages of a status report, encoded once per report."""
        return _once_per_object(
            self._status_bytes, status, STATUS_CACHE_SIZE,
            lambda: b"".join(be.encode_parameter_status(k, v) for k, v in status.items()),
        )

    def forget_status(self, key: tuple[str, str] | None) -> None:
        """Role/database defaults changed: login status reports for ``key`` (None: every
        key, after a configuration reload) are stale."""
        self.defaults_gen += 1
        if key is None:
            self.status_cache.clear()
            return
        for k in [k for k in self.status_cache if k[0] == key]:
            del self.status_cache[k]

    def shared_book(self, book: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
        """One dict for every session with the same settings. Books are never changed in
        place, so sessions can share them: the memory is paid once, and a backend last
        synced with a book is known to be in sync for every session holding it."""
        key = frozenset(book.items())
        shared = self.books.get(key)
        if shared is None:
            if len(self.books) >= SHARED_BOOKS_MAX:
                self.books.clear()
            self.books[key] = shared = book
        return shared

    def remember_startup(self, packet: bytes, facts: StartupFacts) -> None:
        """Keep what an accepted startup packet asks for, so the next login that sends
        the same bytes skips decoding it (a long packet is rare, and not kept)."""
        if len(packet) <= STARTUP_PACKET_CACHED_MAX:
            if len(self.startups) >= STARTUP_FACTS_MAX:
                self.startups.clear()
            self.startups[packet] = facts

    def remember_status(self, cache_key: tuple, status: dict[str, str]) -> None:
        self.status_cache[cache_key] = status
        if len(self.status_cache) > STATUS_CACHE_SIZE:
            self.status_cache.popitem(last=False)

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self) -> None:
        channel = None
        for _ in range(100):
            try:
                channel = await connect(str(self.cfg.pooler_socket), lambda m, f: None, lambda: None)
                break
            except OSError:
                await asyncio.sleep(0.1)
        if channel is None:
            raise RuntimeError("could not reach the pooler")
        self.pooler = PoolerClient(self, channel)
        self.pooler.send({"op": "hello", "worker": self.index, "pid": os.getpid()})
        self.leases = LeaseManager(self)
        server = await self.loop.create_server(
            lambda: Session(self), sock=self.listen_sock, backlog=4096
        )
        stop = asyncio.Event()
        self.loop.add_signal_handler(signal.SIGTERM, stop.set)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from .metrics import WorkerMetrics

            self.metrics = WorkerMetrics(self)
        gc_policy.apply(self.loop)
        self.cfg.worker_ready_file(self.index).touch()
        await stop.wait()
        server.close()
        for s in list(self.sessions):
            s.fatal("57P01", "terminating connection due to administrator command")
        self.leases.close_all()
        await asyncio.sleep(0.05)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _once_per_object(memo: dict[int, tuple[object, T]], obj: object, limit: int,
                     make: Callable[[], T]) -> T:
    """``make()`` worked out once per object, for objects shared by many sessions
    (settings books, status reports). Keyed by identity, and the object is kept with
    its value, so a recycled id never returns another object's value."""
    hit = memo.get(id(obj))
    if hit is None or hit[0] is not obj:
        if len(memo) >= limit:
            memo.clear()
        hit = memo[id(obj)] = (obj, make())
    return hit[1]


def main(cfg_dict: dict, index: int, listen_fd: int) -> None:
    """Entry point of a worker process (forked by the supervisor)."""
    cfg = Config.from_dict(cfg_dict)
    from supervisor.logs import setup_logging

    setup_logging(cfg.log_level, f"worker{index}")
    raise_fd_limit()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listen_sock = socket.socket(fileno=listen_fd)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(cfg, index, listen_sock)
    prof_dir = os.environ.get("PGFLEET_CPROFILE")
    if prof_dir:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
        try:
            loop.run_until_complete(worker.run())
        finally:
            prof.disable()
            prof.dump_stats(f"{prof_dir}/worker{index}.prof")
        return
    loop.run_until_complete(worker.run())


def _statement_key(body: bytes, search_path: str | None) -> bytes:
    """What names a statement: its Parse body, and the session's search_path if it set one."""
    return body if search_path is None else body + b"\x00search_path=" + search_path.encode()

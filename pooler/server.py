"""The pooler process: serves lease/release/auth requests from gateway workers over IPC."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import uvloop

from ipc.channel import Channel, ChannelServer, serve
from ipc.epoch import SharedEpoch
from ipc.statement_catalog import StatementCatalog
from supervisor.config import Config

from .auth_cache import AuthCache
from .connect import BackendError
from .listen_hub import ListenHub
from .pool import LeaseRequest, PooledBackend, PoolManager

log = logging.getLogger("pgfleet.pooler")


class WorkerLink:
    """One connected gateway worker and the lease requests it has outstanding."""

    def __init__(self, pooler: Pooler, channel: Channel) -> None:
        self.pooler = pooler
        self.index = -1
        self.pending: dict[int, LeaseRequest] = {}
        self.channel = channel

    def on_message(self, msg: dict, fds: list[int]) -> None:
        for fd in fds:  # workers never send us descriptors
            os.close(fd)
        op = msg.get("op")
        handler = getattr(self, "op_" + str(op), None)
        if handler is None:
            log.warning("unknown IPC op %r from worker %s", op, self.index)
            return
        handler(msg)

    def on_close(self) -> None:
        pool = self.pooler.pool
        for req in self.pending.values():
            pool.cancel(req)
        self.pending.clear()
        self.pooler.hub.holder_gone(self)
        pool.owner_gone(self)
        self.pooler.links.discard(self)

    # -- ops ----------------------------------------------------------------------------------
    def op_hello(self, msg: dict) -> None:
        self.index = int(msg.get("worker", -1))

    def op_lease(self, msg: dict) -> None:
        key = (str(msg["db"]), str(msg["user"]))
        for rid in msg["reqs"]:
            self._lease(int(rid), key)

    def _lease(self, rid: int, key: tuple[str, str]) -> None:

        def grant(b: PooledBackend) -> None:
            self.pending.pop(rid, None)
            self.channel.send(
                {
                    "op": "leased",
                    "req": rid,
                    "id": b.id,
                    "db": b.key[0],
                    "user": b.key[1],
                    "pid": b.conn.pid,
                    "secret": b.conn.secret,
                    "params": b.conn.params,
                    "applied": b.applied,
                    "slot": b.slot,
                },
                [b.conn.sock.fileno()],
            )

        def fail(fields: dict[str, str]) -> None:
            self.pending.pop(rid, None)
            self.channel.send({"op": "lease_failed", "req": rid, "error": fields})

        req = LeaseRequest(key, grant, fail, owner=self)
        self.pending[rid] = req
        self.pooler.pool.request(req)

    def op_cancel_lease(self, msg: dict) -> None:
        for rid in msg["reqs"]:
            req = self.pending.pop(int(rid), None)
            if req is not None:
                self.pooler.pool.cancel(req)

    def op_release(self, msg: dict) -> None:
        self.pooler.pool.release(int(msg["id"]), str(msg.get("state", "dead")), msg)

    def op_auth(self, msg: dict) -> None:
        self.pooler.loop.create_task(self._auth(msg))

    async def _auth(self, msg: dict) -> None:
        rid = int(msg["req"])
        try:
            user, db = str(msg["user"]), str(msg["db"])
            info = await self.pooler.auth.lookup(user, db, bool(msg.get("refresh")))
            reply = {"op": "auth_info", "req": rid, **info}
            status = self.pooler.statuses.get((db, user, msg.get("skey")))
            if status is not None:
                reply["status"] = status
        except Exception as exc:  # Postgres unreachable for too long, etc.
            reply = {"op": "auth_info", "req": rid, "error": str(exc)}
        if not self.channel.closed:
            self.channel.send(reply)

    def op_status(self, msg: dict) -> None:
        """A worker learnt the status report for a (database, user, settings)."""
        statuses = self.pooler.statuses
        statuses[(str(msg["db"]), str(msg["user"]), msg.get("skey"))] = msg["status"]
        if len(statuses) > 4096:
            statuses.pop(next(iter(statuses)))

    def op_invalidate(self, msg: dict) -> None:
        self.pooler.auth.invalidate(str(msg["user"]))

    def op_listen(self, msg: dict) -> None:
        """The worker's sessions want (db, channel): answer once the hub listens on it."""
        self.pooler.loop.create_task(self._listen(str(msg["db"]), str(msg["channel"])))

    async def _listen(self, database: str, channel: str) -> None:
        reply: dict = {"op": "listening", "db": database, "channel": channel}
        try:
            await self.pooler.hub.listen(database, channel.encode("latin-1"), self)
        except BackendError as exc:
            reply["error"] = exc.fields
        if not self.channel.closed:
            self.channel.send(reply)

    def op_unlisten(self, msg: dict) -> None:
        self.pooler.hub.unlisten(str(msg["db"]), str(msg["channel"]).encode("latin-1"), self)

    def op_vacate(self, msg: dict) -> None:
        """Close every idle backend of a database, here and in every worker's cache."""
        db = str(msg["db"])
        self.pooler.pool.retire(db, None)
        self.pooler.broadcast({"op": "vacate", "db": db})

    def op_cancel_client(self, msg: dict) -> None:
        """A CancelRequest reached one worker for a client of another: pass it on."""
        for link in self.pooler.links:
            if link.index == int(msg["worker"]) and not link.channel.closed:
                link.channel.send({"op": "cancel_client", "pid": msg["pid"],
                                   "secret": msg["secret"]})

    def op_stats(self, msg: dict) -> None:
        self.channel.send({"op": "stats", "req": msg.get("req"), **self.pooler.pool.stats()})


class Pooler:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_event_loop()
        self.pool = PoolManager(
            self.loop,
            str(cfg.pg_socket_path),
            cfg.pool_size,
            on_pressure=self.reclaim,
            on_relief=self.relieve,
            user_limits=cfg.user_limits,
            catalog=StatementCatalog.attach(cfg.statement_catalog_name),
        )
        self.role_epoch = SharedEpoch.attach(cfg.role_epoch_name)
        self.auth = AuthCache(
            self.pool, on_defaults_changed=self.defaults_changed,
            on_facts_changed=self.role_epoch.bump,
            changed_by_sessions=lambda: self.role_epoch.sessions,
            on_starts_changed=self.forget_statuses,
        )
        self.hub = ListenHub(self.loop, str(cfg.pg_socket_path), self.notify)
        self.links: set[WorkerLink] = set()
        # Startup status reports per (database, user, settings), shared by all workers
        # so that only the first login with new settings needs a backend.
        self.statuses: dict[tuple, dict[str, str]] = {}
        self.server: ChannelServer | None = None

    def reclaim(self, asks: dict) -> None:
        """Someone waits: holders give back the backends they keep idle, and those above
        their fair share give back that many more of the named pool as they come free.
        ``asks`` maps each owner asked to its whole debt now, per pool (see Reclaims): a
        worker replaces what it owed by it, so a debt never outlives the shortage."""
        for owner, debts in asks.items():
            if not isinstance(owner, WorkerLink) or owner.channel.closed:
                continue
            owner.channel.send(
                {"op": "reclaim", "debts": [[db, user, n] for (db, user), n in debts.items()]}
            )

    def relieve(self, owners: list) -> None:
        """Nobody waits any more: holders owe nothing (and keep their idle backends)."""
        for owner in owners:
            if isinstance(owner, WorkerLink) and not owner.channel.closed:
                owner.channel.send({"op": "reclaim", "debts": [], "spare": False})

    @staticmethod
    def notify(link: WorkerLink, database: str, channel: bytes, payload: bytes, pid: int) -> None:
        """Hand a notification to a worker that listens on its channel (bytes as latin-1
        text: the IPC codec carries text, and this round-trips every byte)."""
        if not link.channel.closed:
            link.channel.send({"op": "notify", "db": database, "channel": channel.decode("latin-1"),
                               "payload": payload.decode("latin-1"), "pid": pid})

    def defaults_changed(self, database: str, user: str) -> None:
        """New sessions of (database, user) must start from the new defaults (or as the
        role now of that name): retire backends that started with the old ones and forget
        status reports made with them."""
        self.pool.retire(database, user)
        for k in [k for k in self.statuses if k[0] == database and k[1] == user]:
            del self.statuses[k]
        self.broadcast({"op": "defaults_changed", "db": database, "user": user})

    def forget_statuses(self) -> None:
        """Every status report may be stale (a configuration reload, or a session changed
        roles or databases): here and in every worker, before any login is answered."""
        self.statuses.clear()
        self.broadcast({"op": "forget_statuses"})

    def broadcast(self, msg: dict) -> None:
        """Send ``msg`` to every worker still connected."""
        for link in list(self.links):
            if not link.channel.closed:
                link.channel.send(msg)

    def accept(self, channel: Channel) -> tuple:
        link = WorkerLink(self, channel)
        self.links.add(link)
        return link.on_message, link.on_close

    async def run(self) -> None:
        self.cfg.ipc_dir.mkdir(parents=True, exist_ok=True)
        self.server = await serve(str(self.cfg.pooler_socket), self.accept)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from .metrics import PoolerMetrics

            self.metrics = PoolerMetrics(self.pool)
        stop = asyncio.Event()
        # Ctrl-C reaches the whole process group; the supervisor decides the order of
        # shutdown (workers first), so only its SIGTERM stops us.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        self.server.close()
        for link in list(self.links):
            link.channel.close()
        self.hub.close()
        self.pool.close_all()


def main(cfg_dict: dict) -> None:
    """Entry point of the pooler process (forked by the supervisor)."""
    cfg = Config.from_dict(cfg_dict)
    from supervisor.logs import setup_logging

    setup_logging(cfg.log_level, "pooler")
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    pooler = Pooler(cfg)
    loop.run_until_complete(pooler.run())

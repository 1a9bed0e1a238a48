"""The per-step path between members and the coordinator: a direct, authenticated connection.

A Ray actor call costs about 0.4 ms of CPU in the caller and as much again in the callee on a
2-core machine, and an exchange round is one call per member: on small populations of small
values that per-message cost, not the coupling maths, is what a coupled step pays. So the
coordinator also listens on a plain connection (:mod:`multiprocessing.connection`, from the
standard library) where a round of scalars costs tens of microseconds:

* it binds to the coordinator's node address (127.0.0.1 on a local run), on a free port; a
  member that cannot reach it (a firewall between nodes that lets only Ray's ports through)
  warns and uses Ray calls instead;
* every connection must pass ``multiprocessing.connection``'s HMAC challenge with a random
  32-byte key that exists only in the coordinator and reaches members through Ray (itself
  token-authenticated on a cluster), before a single message is read from it;
* messages are ``(request id, method, args)`` and ``(request id, ok, value or exception)``; a
  member may have several requests in flight (async pipelining, a parameter reply read after the
  forward pass), matched by id;
* a member waits for a reply at most ``exchange.timeout_s`` plus a margin (:func:`reply_bound`),
  either way to the coordinator: the coordinator answers a barrier that waited ``timeout_s`` with
  its own :class:`~poptrain.exchange.wire.ExchangeTimeout` naming the missing members, so a reply
  that does not come even then means the coordinator's exchange thread died or is stuck, which
  no dead process shows the driver. The member raises :class:`ReplyTimeout` and the run fails.

It carries only what is small: a population whose exchanged values could be large (parameter
averaging, shared modules) talks to the coordinator with Ray calls instead, so that arrays travel
through Ray's object store and are read without a copy. Both ways reach the same
:class:`poptrain.coordinator.actor.CoordinatorActor` methods.
"""

from __future__ import annotations

import itertools
import secrets
import socket
import struct
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Any

from poptrain.exchange.wire import ExchangeTimeout

CONNECT_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 10.0
# How much longer than ``exchange.timeout_s`` a member waits for the coordinator's reply: the
# coordinator's own barrier timer starts only once it holds its lock (behind another round's
# coupling maths, say) and its answer must still cross over.
REPLY_MARGIN_S = 5.0
REPLY_MARGIN_FRACTION = 0.25


def reply_bound(timeout_s: float | None) -> float | None:
    """The longest a member waits for one reply, given the run's ``exchange.timeout_s``
    (``None``: unbounded)."""
    return None if timeout_s is None else timeout_s + REPLY_MARGIN_S + REPLY_MARGIN_FRACTION * timeout_s


class ReplyTimeout(ExchangeTimeout):
    """The coordinator did not answer a member's call within :func:`reply_bound`: not even with
    its own :class:`ExchangeTimeout`, so its exchange thread died or is stuck."""


def _tune(conn: Connection, read_timeout_s: float | None) -> None:
    """Send small messages at once (no Nagle delay), and bound how long one read may block
    (``None``: unbounded). A bound read raises an OSError."""
    sock = socket.socket(fileno=conn.fileno())
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seconds = read_timeout_s or 0
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
    finally:
        sock.detach()  # the connection keeps the descriptor


class ChannelServer:
    """Serves ``handlers[method](*args)`` to authenticated members, in the coordinator's process.

    ``inline``: run each request on its connection's thread (one request in flight per member,
    as in ``sync`` mode); otherwise on a pool of ``threads`` (``async`` mode, where a request
    blocks while a member's next one arrives)."""

    def __init__(self, handlers: dict[str, Callable[..., Any]], host: str, inline: bool, threads: int):
        self.handlers = handlers
        self.authkey = secrets.token_bytes(32)
        # No authkey here: the handshake happens on each connection's own thread, below.
        self.listener = Listener((host, 0), family="AF_INET", backlog=128)
        self.address: tuple[str, int] = self.listener.address
        self.pool = None if inline else ThreadPoolExecutor(threads, thread_name_prefix="poptrain-channel")
        self.closed = False
        threading.Thread(target=self._accept, name="poptrain-channel-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return  # the listener was closed
            if self.closed:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), name="poptrain-channel", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:  # on this connection's own thread, and bounded: a client that never answers blocks nobody
            _tune(conn, HANDSHAKE_TIMEOUT_S)
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            _tune(conn, None)
        except (AuthenticationError, EOFError, OSError):
            conn.close()
            return
        sending = threading.Lock()

        def handle(request_id: int, method: str, args: tuple) -> None:
            try:
                reply = (request_id, True, self.handlers[method](*args))
            except Exception as exc:  # the member raises it as its own
                reply = (request_id, False, exc)
            with sending:
                try:
                    conn.send(reply)
                except OSError:
                    pass  # the member is gone; a restarted one connects anew
                except Exception as exc:  # a reply that cannot be pickled: the member must still hear back
                    conn.send((request_id, False, RuntimeError(f"the coordinator could not send its reply to {method}: {exc!r}")))

        while True:
            try:
                request_id, method, args = conn.recv()
            except (EOFError, OSError):
                conn.close()
                return
            if self.pool is None:
                handle(request_id, method, args)
                continue
            try:
                self.pool.submit(handle, request_id, method, args)
            except RuntimeError:  # closed: the coordinator has taken on another run (poptrain.driver.pool)
                conn.close()
                return

    def close(self) -> None:
        """Stop accepting connections (those open end when their members close them)."""
        self.closed = True
        try:  # wakes the accepting thread, which a listener closed under it would not
            socket.create_connection(self.address, timeout=1.0).close()
        except OSError:
            pass
        self.listener.close()
        if self.pool is not None:
            self.pool.shutdown(wait=False)


class CoordinatorClient:
    """A member's end of the way to the coordinator: :meth:`call` sends a request and returns a
    function that waits for its reply. Over the coordinator's channel when it has one, else as a
    Ray actor call.

    ``timeout_s``: the run's ``exchange.timeout_s``; each wait for a reply is bounded by
    :func:`reply_bound` of it (counted from when the wait starts) and raises :class:`ReplyTimeout`
    past it. ``None``: waits are unbounded."""

    def __init__(self, coordinator, channel: tuple[tuple[str, int], bytes] | None, timeout_s: float | None = None):
        self.coordinator = coordinator
        self.timeout_s = timeout_s
        self.bound_s = reply_bound(timeout_s)
        self.conn: Connection | None = None
        if channel is not None:
            address, authkey = channel
            try:
                sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT_S)
                sock.settimeout(None)  # blocking: Connection reads the descriptor itself
                self.conn = Connection(sock.detach())
                _tune(self.conn, CONNECT_TIMEOUT_S)
                answer_challenge(self.conn, authkey)  # the client's half of what Client(authkey=...) does
                deliver_challenge(self.conn, authkey)
                # Waits are bounded by poll() in _reply; this bounds a read stuck mid-message too.
                _tune(self.conn, self.bound_s)
            except (OSError, EOFError) as exc:  # e.g. a firewall between nodes that lets only Ray's ports through
                warnings.warn(
                    f"poptrain: cannot reach the coordinator's exchange connection at {address[0]}:{address[1]} "
                    f"({type(exc).__name__}: {exc}); exchanging through Ray calls instead, which costs more per step",
                    RuntimeWarning,
                    stacklevel=2,
                )
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        self.ids = itertools.count()
        self.replies: dict[int, tuple[bool, Any]] = {}

    def call(self, method: str, *args: Any) -> Callable[[], Any]:
        if self.conn is None:
            ref = getattr(self.coordinator, method).remote(*args)
            return lambda: self._ray_reply(ref, method, args)
        request_id = next(self.ids)
        self.conn.send((request_id, method, args))
        return lambda: self._reply(request_id, method, args)

    def _ray_reply(self, ref, method: str, args: tuple) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=self.bound_s)
        except ray.exceptions.GetTimeoutError:
            raise self._timeout(method, args, "through a Ray call") from None

    def _reply(self, request_id: int, method: str, args: tuple) -> Any:
        deadline = None if self.bound_s is None else time.monotonic() + self.bound_s
        conn = self.conn
        assert conn is not None, "a reply over the direct connection follows a request sent over it"
        while request_id not in self.replies:  # replies come in the order requests complete
            # Replies to this member's other requests may arrive meanwhile: the bound is on this
            # wait as a whole, not on each message.
            if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
                raise self._timeout(method, args, "over the direct connection")
            try:
                got, ok, value = conn.recv()
            except (EOFError, OSError) as exc:
                raise ConnectionError(f"lost the connection to the coordinator ({type(exc).__name__}: {exc}); its process may have died") from None
            self.replies[got] = (ok, value)
        ok, value = self.replies.pop(request_id)
        if not ok:
            raise value
        return value

    def _timeout(self, method: str, args: tuple, way: str) -> ReplyTimeout:
        kind, step, members = (list(args) + [None] * 3)[:3]
        one = not isinstance(members, (list, tuple)) or len(members) == 1  # one host's members
        who = f"member {(members[0] if isinstance(members, (list, tuple)) else members)!r}" if one else f"members {list(members)}"
        return ReplyTimeout(
            f"{method} of {kind!r} at step {step}: {who} waited {self.bound_s:g} s for the coordinator's reply "
            f"({way}) and the coordinator did not answer, not even with a timeout naming the missing members "
            f"(it gives one after exchange.timeout_s, {self.timeout_s:g} s): its exchange thread may have died or be stuck, "
            "e.g. in a coupling's rewrite or value; see the coordinator's log"
        )

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

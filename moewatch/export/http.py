"""A small HTTP server for ``/metrics`` that a hostile client cannot starve.

prometheus-client's server spends a thread and a descriptor on every connection, with no
timeout, so a few hundred connections held open stop real scrapes and can use up the
process's descriptors. This one runs one thread per endpoint, an event loop over non-blocking
sockets:

* where the platform has it (Linux's ``TCP_DEFER_ACCEPT``), the kernel hands over a connection
  only once its first bytes have come in, so connections that send nothing wait in the kernel
  (no descriptor, no slot) and a scraper's is accepted with its request;
* at most ``max_connections`` connections are open; past the cap a newcomer closes the
  connection that has waited longest for the rest of its request, so holding connections (or
  reopening them as fast as they are closed) cannot lock scrapers out: a scraper sends its
  request with the connection and is answered as soon as it is accepted. A connection is
  never pushed out in its first ``GRACE`` seconds (its request may come a moment after it is
  accepted); while every slot is that young, accepting waits;
* a request must arrive whole within ``request_timeout`` seconds and fit in
  ``max_request_bytes``; a response must be taken within ``write_timeout`` seconds;
* one request per connection (``Connection: close``), ``GET`` and ``HEAD`` only.

The body is the registry rendered by prometheus-client's own exposition (text or OpenMetrics by
the ``Accept`` header, gzip when asked, ``name[]`` filtering). A failure to render is counted
(``moewatch_internal_errors_total{component="prometheus"}``) and answered with a 500.
"""
from __future__ import annotations

import gzip
import selectors
import socket
import threading
import time
from typing import Dict, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import choose_encoder

MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
MAX_REQUEST_BYTES = 16 * 1024
MIN_AGE = 0.1  # seconds a connection that has sent nothing yet keeps its place, but for a flood
# seconds a connection keeps its place even in a flood: its client may send its request a
# moment after the connection is accepted (one in this process waits for the GIL, which Python
# hands over every 5 ms), and being pushed out then would lose a real scrape
GRACE = 0.02
# connections waiting to be accepted are the kernel's (memory, no descriptor): a queue longer
# than a flood of a few hundred connections keeps a scraper's SYN from being dropped (a drop
# costs the scraper a 1 s retransmission)
BACKLOG = 1024
DEFER_ACCEPT_SECONDS = 10  # a silent connection is handed over after ~15 s (four SYN-ACKs resent)
PATHS = ("/metrics", "/")

_LISTENER, _WAKE = object(), object()
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error"}


class _Connection:
    """One client: the request bytes so far, then the response bytes left to send."""

    __slots__ = ("sock", "opened", "deadline", "inbox", "outbox")

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.opened = now
        self.deadline = now + REQUEST_TIMEOUT
        self.inbox = bytearray()
        self.outbox: Optional[memoryview] = None


def _defer_accept(listener: socket.socket) -> None:
    """Have the kernel hand over a connection once its first bytes arrive, where it can."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:  # not Linux: the cap and the grace below do the work alone
        return
    try:
        listener.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS)
    except OSError:
        pass


def _family(addr: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


class MetricsServer:
    """Serves ``registry`` at ``http://addr:port/metrics`` from one daemon thread; :meth:`close` stops it."""

    def __init__(self, registry, addr: str, port: int, errors=None, max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT, write_timeout: float = WRITE_TIMEOUT,
                 max_request_bytes: int = MAX_REQUEST_BYTES):
        self.registry = registry
        self.errors = errors
        self.max_connections = max(1, int(max_connections))
        self.request_timeout = float(request_timeout)
        self.write_timeout = float(write_timeout)
        self.max_request_bytes = int(max_request_bytes)
        self.served = 0  # responses sent whole (200 or not)
        self.evicted = 0  # connections closed to make room under the cap
        self.timed_out = 0  # connections closed at their deadline
        self._listener = socket.create_server((addr, port), family=_family(addr, port), backlog=BACKLOG)
        self._listener.setblocking(False)
        _defer_accept(self._listener)
        self.server_address: Tuple = self._listener.getsockname()[:2]
        self.server_port: int = self.server_address[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._conns: Dict[int, _Connection] = {}  # fd -> connection, in the order they were accepted
        self._accept_paused_until = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moewatch-prometheus", daemon=True)
        self._thread.start()

    @property
    def connections(self) -> int:
        """Connections open now (at most ``max_connections``)."""
        return len(self._conns)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                accept = False
                for key, mask in self._selector.select(self._next_timeout()):
                    if key.data is _LISTENER:
                        accept = True
                    elif key.data is _WAKE:
                        self._drain_wake()
                    elif mask & selectors.EVENT_READ:
                        self._read(key.data)
                    elif mask & selectors.EVENT_WRITE:
                        self._write(key.data)
                if accept:  # after the reads: a request that arrived is answered before anyone is evicted
                    self._accept()
                self._expire()
        except Exception as error:  # never a traceback from a thread in the model's process
            self._record(error)
        finally:
            self._close_all()

    def _next_timeout(self) -> float:
        now = time.monotonic()
        nearest = min((c.deadline for c in self._conns.values()), default=now + 1.0)
        if self._accept_paused_until:
            nearest = min(nearest, self._accept_paused_until)
        return max(0.0, min(1.0, nearest - now))

    def _accept(self) -> None:
        # a bounded batch per turn, so that requests already read are answered between batches
        for _ in range(self.max_connections):
            victim = None
            if len(self._conns) >= self.max_connections:
                victim, wait = self._victim()
                if victim is None and len(self._conns) >= self.max_connections:
                    # every slot is too young to push out: newcomers wait in the kernel's queue
                    self._pause_accepting(wait)
                    return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of descriptors (EMFILE): make room and pause accepting
                self._record(error)
                self._evict(victim if victim is not None else self._victim()[0])
                self._pause_accepting(0.1)
                return
            self._evict(victim)  # the cap holds
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic())
            conn.deadline = conn.opened + self.request_timeout
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            # a scraper sends its request with the connection: answer it now
            self._read(conn)

    def _victim(self) -> Tuple[Optional[_Connection], float]:
        """The connection a newcomer past the cap replaces, and otherwise how long until one may go.

        Returns ``(None, 0)`` once a slot came free. First the one waiting longest for the rest
        of its request. A connection that has sent nothing yet keeps its place for MIN_AGE
        seconds (a scraper accepted a moment before its request arrives is not pushed out by a
        flood behind it). Under a flood every slot can be that young: then the oldest one past
        GRACE is read once more before it goes, since its request may have come in meanwhile
        (read, it is answered and keeps its place); while none is past GRACE, ``(None,
        seconds until the oldest is)``. One being answered goes only if every slot is."""
        while self._conns:
            now = time.monotonic()

            def fresh(c: _Connection) -> bool:
                return not c.inbox and c.outbox is None and now - c.opened < MIN_AGE

            conns = list(self._conns.values())  # oldest first
            stalled = next((c for c in conns if c.outbox is None and not fresh(c)), None)
            if stalled is not None:
                return stalled, 0.0
            young = next((c for c in conns if c.outbox is None), None)
            if young is None:
                return conns[0], 0.0  # every slot is being answered
            if now - young.opened < GRACE:
                return None, young.opened + GRACE - now
            self._read(young)  # answered, dropped (the client left), or still silent
            if len(self._conns) < self.max_connections:
                return None, 0.0
            if young.sock.fileno() in self._conns and young.outbox is None:
                return young, 0.0
        return None, 0.0

    def _pause_accepting(self, seconds: float) -> None:
        if not self._accept_paused_until:
            self._selector.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + max(seconds, 0.001)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:  # the client went away before sending a whole request
            self._drop(conn)
            return
        conn.inbox += data
        end = conn.inbox.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbox) > self.max_request_bytes:
                self._respond(conn, 431, b"request too large\n", "text/plain; charset=utf-8")
            return
        if end + 4 > self.max_request_bytes:
            self._respond(conn, 431, b"request too large\n", "text/plain; charset=utf-8")
            return
        self._handle(conn, bytes(conn.inbox[:end]))

    def _write(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if not len(conn.outbox):
            self._drop(conn)
            self.served += 1

    def _expire(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._drop(conn)  # before counting: whoever reads the count sees the connection gone
            self.timed_out += 1

    def _evict(self, conn: Optional[_Connection]) -> None:
        if conn is not None:
            self._drop(conn)
            self.evicted += 1

    def _drop(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is None:
            return
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # -- one request --------------------------------------------------------------------------
    def _handle(self, conn: _Connection, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._respond(conn, 400, b"bad request\n", "text/plain; charset=utf-8")
            return
        method, target = parts[0], parts[1].decode("latin-1")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            self._respond(conn, 405, b"only GET and HEAD\n", "text/plain; charset=utf-8", allow=True)
            return
        url = urlsplit(target)
        if url.path not in PATHS:
            self._respond(conn, 404, b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            registry = self.registry
            names = parse_qs(url.query).get("name[]")
            if names:
                registry = registry.restricted_registry(names)
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            body = encoder(registry)
        except Exception as error:  # a collector that fails (or text that cannot be encoded)
            self._record(error)
            self._respond(conn, 500, b"moewatch: rendering the metrics failed; it is counted in "
                                     b"moewatch_internal_errors_total{component=\"prometheus\"}\n",
                          "text/plain; charset=utf-8")
            return
        gzipped = "gzip" in headers.get("accept-encoding", "")
        if gzipped:
            body = gzip.compress(body)
        self._respond(conn, 200, body, content_type, gzipped=gzipped, head_only=method == b"HEAD")

    def _respond(self, conn: _Connection, status: int, body: bytes, content_type: str, gzipped: bool = False,
                 head_only: bool = False, allow: bool = False) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}", f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}", "Connection: close"]
        if gzipped:
            head.append("Content-Encoding: gzip")
        if allow:
            head.append("Allow: GET, HEAD")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
        conn.inbox = bytearray()
        conn.outbox = memoryview(data)
        conn.deadline = time.monotonic() + self.write_timeout
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)  # most responses fit the socket buffer: sent at once

    def _record(self, error: BaseException) -> None:
        if self.errors is not None:
            self.errors.record("prometheus", error, where="http")

    # -- shutdown --------------------------------------------------------------------------------
    def _close_all(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        self._selector.close()

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving and close every socket (waits at most ``timeout`` seconds for the loop)."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

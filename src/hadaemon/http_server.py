"""The HTTP server: a part of the master's loop, its connections and their budget.

Owns HttpServer: a non-blocking listener and its connections on the master's
selector (no thread), TLS when ``http_cert`` is set, the per-connection deadlines,
and the answering budget that keeps a flood of requests from holding due checks
back (at most a share of the loop's time).

Uses: base, netsettings, wire, http_proto, http_views.
"""

import errno
import selectors
import socket
import time
import typing

from .base import HadaemonError, log
from .netsettings import http_ssl_context
from .wire import _shorten
from .http_proto import (
    HTTP_AUTH_LOG_EVERY, HTTP_IDLE, HTTP_LINGER, HTTP_MAX_CONNS, HTTP_PASS_BUDGET, HTTP_RECV,
    HTTP_REQUEST_TIME, HTTP_SEND_TIME, HTTP_SHARE, HttpError, RequestReader, _LOCAL_HOST_RE,
    encode_answer, error_answer, token_problem,
)
from .http_views import http_route


# -- the server: a part of the master's loop -----------------------------------------

def http_listen(address):
    """A non-blocking listening socket on ``address``; HadaemonError naming it when it cannot."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a restart need not wait out TIME_WAIT
        sock.bind((address.host, address.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise HadaemonError("cannot listen on %s (http = %s): %s%s" % (
            address.url(), address.text, exc.strerror,
            "; another process holds the port" if exc.errno == errno.EADDRINUSE else "")) from None
    sock.setblocking(False)
    return sock


class HttpApp(typing.NamedTuple):
    """What HttpServer answers from: the master's own views, so nothing can be stale."""
    document: typing.Callable       # () -> the --status --json document
    host: typing.Callable           # (name) -> that document's hosts[name], built alone; None: never seen
    history: typing.Callable        # (n) -> --history n --json
    pause: typing.Callable          # (flag) -> the paused state after it


class HttpConn:
    """One HTTP client connection and where it is in its life."""

    def __init__(self, sock, peer, now, tls):
        self.sock = sock
        self.peer = peer                    # the client's address, for the log
        self.reader = RequestReader()
        self.out = bytearray()              # the answer still to send
        self.handshake = tls                # a TLS handshake is yet to finish
        self.since = now                    # when its current wait began: accepted, or last answered
        self.request_at = now if tls else None  # first byte of the request on its way (or the handshake)
        self.sent_at = None                 # when ``out`` began to wait for the client
        self.closing = False                # end the connection once ``out`` is sent
        self.linger_until = None            # half-closed: reading what the client still sends until then
        self.events = selectors.EVENT_READ     # 0: out of the selector, waiting for credit
        self.handler = None

    def waiting_since(self):
        return self.since if self.request_at is None else self.request_at


class HttpServer:
    """The HTTP server of docs/http.md: a listener and its connections on the master's selector.

    The master calls ``configure(settings)`` at start and on reload, ``tick(now)`` on
    every pass of its loop and ``close()`` at stop; the rest happens in selector
    callbacks, and none of them waits.  ``app`` (an HttpApp) is what it answers
    from.  While an answer waits to go out its connection is not read, so a client
    that never reads holds one answer, not more.
    """

    def __init__(self, sel, app):
        self.sel, self.app = sel, app
        self.address = None
        self.listener = None
        self.tls = None                     # ssl.SSLContext with http_cert
        self.token = None
        self.conns = {}                     # fd -> HttpConn
        self.refused = {}                   # (client address, "token" | "host") -> when last logged
        self.accept_paused_until = None
        self.next_tick = 0.0
        # Answering time is credit: spent by each answer, earned back at HTTP_SHARE of
        # the time that passes, never more than HTTP_PASS_BUDGET.  Without credit a
        # connection leaves the selector (``waiting``) until there is some again.
        self.credit, self.credit_at = HTTP_PASS_BUDGET, None
        self.waiting = []
        self.would_block = (BlockingIOError, InterruptedError)     # and ssl's, with http_cert

    @property
    def url(self):
        return self.address.url(self.tls is not None) if self.listener is not None else None

    def configure(self, settings):
        """Apply the [daemon] http settings: listen, move, or stop.

        Raises HadaemonError naming the address when it cannot listen there; then
        everything stays as it was (the old listener too).
        """
        tls = None
        if settings.http and settings.http_cert:
            try:
                tls = http_ssl_context(settings.http_cert)
            except ValueError as exc:
                raise HadaemonError("http_cert: %s" % exc) from None
        before = (self.url, self.token is not None)
        if settings.http != self.address:
            self._move(settings.http)
        elif (tls is None) != (self.tls is None):
            for conn in list(self.conns.values()):     # they speak the other protocol
                self._close(conn)
        self.tls, self.token = tls, settings.http_token
        if tls is not None:
            import ssl
            self.would_block = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                                ssl.SSLWantWriteError)
        if (self.url, self.token is not None) != before:
            log.info("http: %s%s", "serving " + self.url if self.url else "off",
                     " (token required)" if self.url and self.token else "")

    def _move(self, address):
        new = None
        if address is not None:
            try:
                new = http_listen(address)
            except HadaemonError:
                if self.listener is None or address.port != self.address.port:
                    raise
                # The old listener may be what holds the port (127.0.0.1:P -> 0.0.0.0:P):
                # let it go, and take it back if the new address still cannot be had.
                old = self.address
                self._stop_listening()
                try:
                    new = http_listen(address)
                except HadaemonError:
                    self._start_listening(http_listen(old), old)
                    raise
        self._stop_listening()
        for conn in list(self.conns.values()):
            self._close(conn)
        if new is not None:
            self._start_listening(new, address)

    def _start_listening(self, sock, address):
        self.listener, self.address = sock, address
        self.sel.register(sock, selectors.EVENT_READ, self.accept)

    def _stop_listening(self):
        if self.listener is not None:
            if self.accept_paused_until is None:
                self.sel.unregister(self.listener)
            self.listener.close()
        self.listener = self.address = self.accept_paused_until = None

    def close(self):
        for conn in list(self.conns.values()):
            self._close(conn)
        self._stop_listening()

    # -- connections ------------------------------------------------------------------

    def accept(self, mask):
        now = time.monotonic()
        for _ in range(HTTP_MAX_CONNS):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("http: cannot accept connections: too many open files; new ones wait 1s")
                    self.sel.unregister(self.listener)
                    self.accept_paused_until = now + 1.0
                else:
                    log.warning("http: accept failed: %s", exc)
                return
            if len(self.conns) >= HTTP_MAX_CONNS:
                oldest = min(self.conns.values(), key=lambda c: (bool(c.out), c.waiting_since()))
                log.debug("http: %d connections open; closing the one from %s waiting since %.1fs",
                          len(self.conns), oldest.peer, now - oldest.waiting_since())
                self._close(oldest)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError as exc:
                log.debug("http: connection from %s lost at once: %s", peer[0], exc)
                sock.close()
                continue
            conn = HttpConn(sock, peer[0], now, self.tls is not None)
            conn.handler = lambda m, c=conn: self.on_io(c, m)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn.handler)

    def on_io(self, conn, mask):
        now = time.monotonic()
        if conn.linger_until is not None:
            self._linger(conn)
        elif conn.handshake:
            self._handshake(conn, now)
        else:
            if conn.out:
                self._flush(conn, now)
            if not conn.out and not conn.closing and conn.sock.fileno() >= 0:
                self._pump(conn, now)

    def _handshake(self, conn, now):
        import ssl                      # a handshake: there is a TLS context, ssl is loaded
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except OSError as exc:          # ssl.SSLError too: not TLS, a bad client, a reset
            log.debug("http: TLS handshake with %s failed: %s", conn.peer, exc)
            self._close(conn)
            return
        conn.handshake = False
        conn.request_at, conn.since = None, now
        self._pump(conn, now)

    def _pump(self, conn, now):
        """Answer what the buffer holds, reading more while no answer waits to go out."""
        for _ in range(16):             # then a later pass: one client does not hold the loop
            if self.credit <= 0:
                # Enough answering for now: due checks go out first, and the workers
                # and their checks get the CPU.  tick() lets the connection back.
                self._wait(conn)
                return
            try:
                request = conn.reader.next_request()
            except HttpError as exc:
                self._send(conn, None, error_answer(exc.status, exc.message, exc.headers, True), now)
                return
            if request is not None:
                conn.request_at = now if conn.reader.started() else None
                started = time.monotonic()
                self._send(conn, request, self.answer(request, conn.peer, now), now)
                self.credit -= time.monotonic() - started
                if conn.out or conn.closing:
                    return
                continue
            try:
                data = conn.sock.recv(HTTP_RECV)
            except self.would_block:
                self._want(conn, selectors.EVENT_READ)
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn)
                return
            conn.reader.feed(data)
            if conn.request_at is None and conn.reader.started():
                conn.request_at = now
        self._want(conn, selectors.EVENT_WRITE)   # bytes may wait where the selector cannot see them

    def answer(self, request, peer, now):
        """The answer to one request: the token first, then docs/http.md's table."""
        if self.token is not None:
            problem = token_problem(request.headers.get("authorization"), self.token)
            if problem:
                self._log_refused(peer, request, problem, now, "token")
                return error_answer(401, "a token is needed: Authorization: Bearer TOKEN, or Basic "
                                         "with the token as password",
                                    [("WWW-Authenticate", 'Basic realm="hadaemon"')])
        elif not _LOCAL_HOST_RE.match(request.headers.get("host", "localhost").strip()):
            why = ("Host %s: without http_token only an IP address or localhost names this server"
                   % _shorten(request.headers["host"], 100))
            self._log_refused(peer, request, why, now, "host")
            return error_answer(403, why)
        try:
            return http_route(request, self.app, self.token is not None)
        except Exception:               # noqa: BLE001 - a bug in one answer must not stop the master
            log.exception("http: answering %s %s failed", request.method, _shorten(request.target, 200))
            return error_answer(500, "internal error; the daemon's log has the details")

    def _log_refused(self, peer, request, problem, now, kind):
        last = self.refused.get((peer, kind))
        if last is not None and now - last < HTTP_AUTH_LOG_EVERY:
            return
        if len(self.refused) > 1024:
            self.refused = {p: t for p, t in self.refused.items() if now - t < HTTP_AUTH_LOG_EVERY}
        self.refused[peer, kind] = now
        log.warning("http: refused %s %s from %s: %s (logged once a minute per address and reason)",
                    request.method, _shorten(request.target, 100), peer, problem)

    def _send(self, conn, request, answer, now):
        keep = request is not None and request.keep_alive and not answer.close
        conn.out += encode_answer(answer, request.method if request else "GET",
                                  request.version if request else (1, 1), keep)
        conn.closing = not keep
        conn.since = now
        log.debug("http %s %s %s: %d, %d bytes", conn.peer, request.method if request else "-",
                  _shorten(request.target if request else "(malformed)", 200), answer.status,
                  len(answer.body))
        self._flush(conn, now)

    def _flush(self, conn, now):
        try:
            while conn.out:
                del conn.out[:conn.sock.send(conn.out)]
        except self.would_block:
            pass
        except OSError:
            self._close(conn)
            return
        if conn.out:
            conn.sent_at = conn.sent_at or now
            self._want(conn, selectors.EVENT_WRITE)
            return
        conn.sent_at = None
        if conn.closing:
            self._finish(conn, now)

    def _finish(self, conn, now):
        """After an answer that ends the connection: half-close, then read out what the
        client still sends, so our answer is not lost to a reset (RFC 9112 §9.6)."""
        if conn.sock.fileno() < 0:
            return
        if self.tls is not None or not conn.reader.started():
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.linger_until = now + HTTP_LINGER
        self._want(conn, selectors.EVENT_READ)

    def _linger(self, conn):
        try:
            if conn.sock.recv(HTTP_RECV):
                return
        except self.would_block:
            return
        except OSError:
            pass
        self._close(conn)

    def _want(self, conn, events):
        if conn.events == events or conn.sock.fileno() < 0:
            return
        if conn.events:
            self.sel.modify(conn.sock, events, conn.handler)
        else:
            self.waiting.remove(conn)
            self.sel.register(conn.sock, events, conn.handler)
        conn.events = events

    def _wait(self, conn):
        """Out of the selector until there is credit (level-triggered, it would spin)."""
        if conn.events:
            self.sel.unregister(conn.sock)
            conn.events = 0
            self.waiting.append(conn)

    def _close(self, conn):
        fd = conn.sock.fileno()
        if fd < 0:
            return
        if conn.events:
            self.sel.unregister(conn.sock)
        else:
            self.waiting.remove(conn)
        del self.conns[fd]
        conn.sock.close()

    def wakeup(self):
        """When the loop must wake for connections waiting for credit (monotonic), or None."""
        if not self.waiting or self.credit_at is None:
            return None
        return self.credit_at + max(0.0, -self.credit) / HTTP_SHARE + 0.001

    def tick(self, now):
        """Every pass: credit earned, and waiting connections back once there is some.
        Twice a second: the deadlines of half-sent requests, idle keep-alives, unread answers."""
        if self.credit_at is not None:
            self.credit = min(HTTP_PASS_BUDGET, self.credit + (now - self.credit_at) * HTTP_SHARE)
        self.credit_at = now
        if self.credit > 0:
            for conn in list(self.waiting):
                self._want(conn, selectors.EVENT_WRITE)     # writable: back in the next pass
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, self.accept)
        if now < self.next_tick:
            return
        self.next_tick = now + 0.5
        for conn in list(self.conns.values()):
            if conn.linger_until is not None:
                if now >= conn.linger_until:
                    self._close(conn)
            elif conn.out:
                if now - conn.sent_at > HTTP_SEND_TIME:
                    log.debug("http: %s did not take its answer in %ds; closed", conn.peer, HTTP_SEND_TIME)
                    self._close(conn)
            elif conn.request_at is not None:
                if now - conn.request_at > HTTP_REQUEST_TIME:
                    if conn.handshake:
                        self._close(conn)
                    else:
                        self._send(conn, None, error_answer(
                            408, "the request was not complete within %ds" % HTTP_REQUEST_TIME,
                            close=True), now)
            elif now - conn.since > HTTP_IDLE:
                self._close(conn)

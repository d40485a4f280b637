"""Control server: the daemon's UNIX socket and everyone on it.

Workers, action runs and control clients (--status, --reload, ...) all connect
to var/hadaemon.sock and speak one JSON object per line.  Peers of another uid
are refused (SO_PEERCRED).  A connection's first message says who it is: a
``hello`` from a child the Pool knows, or else a control request.  One bad
message closes one connection, never the master.

Uses: base, wire, proc.
"""

import collections
import errno
import functools
import os
import selectors
import socket
import time

from .base import ANSWER_BUFFER, CLIENT_IDLE, ProtocolError, log, peer_credentials
from .wire import LineReader, encode_message
from .proc import _select_read


class Conn:
    """One accepted connection: a worker, an action run, or a control client."""

    def __init__(self, sock, pid, uid):
        self.sock = sock
        self.pid, self.uid = pid, uid
        self.reader = LineReader()
        self.out = bytearray()
        self.writing = False            # registered for EVENT_WRITE too (its out waits)
        self.role = None
        self.child = None
        self.opened = time.monotonic()
        self.answering = None           # an answer made in steps: a generator of its bytes
        self.waiting = collections.deque()  # requests that came in meanwhile, answered in turn


class ControlServer:
    """The listener and its connections on the master's selector.

    What a message means is the master's: ``on_result(child, msg)`` for what a
    worker says, ``on_event(child, msg)`` for what an action run or the cluster agent
    says, ``answer(msg)`` for a control verb: its answer, a dict sent back at once,
    or a generator that makes it in steps (bytes of the answer's line; None: nothing
    yet, ask later), which ``answer_some`` runs a slice of time each pass of the loop.
    """

    def __init__(self, sel, path, pool, on_result, on_event, answer):
        self.sel, self.path, self.pool = sel, path, pool
        self.on_result, self.on_event, self.answer = on_result, on_event, answer
        self.conns = {}                 # fd -> Conn
        self.listener = None
        self.resting_until = None       # out of fds: the listener rests until then
        self.answering = []             # connections with an answer being made
        self.oldest = float("inf")      # no connection that may be a client opened before

    def listen(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(256)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, self.accept)

    def accept(self, mask):
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # The listener would stay readable and spin the loop (and the log):
                    # it rests a second, and each rest is logged once.
                    log.error("cannot accept connections: too many open files (%d clients); "
                              "new ones wait 1s", len(self.conns))
                    self.sel.unregister(self.listener)
                    self.resting_until = time.monotonic() + 1.0
                    return
                raise
            pid, uid, _ = peer_credentials(sock)
            if uid not in (0, os.getuid()):
                log.warning("refused a connection from pid %d: uid %d is not ours", pid, uid)
                sock.close()
                continue
            sock.setblocking(False)
            conn = Conn(sock, pid, uid)
            self.conns[sock.fileno()] = conn
            self.oldest = min(self.oldest, conn.opened)
            self.sel.register(sock, selectors.EVENT_READ, functools.partial(self.on_io, conn))

    def on_io(self, conn, mask):
        if mask & selectors.EVENT_WRITE:
            self.flush(conn)
        if not mask & selectors.EVENT_READ or conn.sock.fileno() < 0:
            return
        try:
            data = conn.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        try:
            for msg in conn.reader.feed(data):
                self.on_message(conn, msg)
                if conn.sock.fileno() < 0:
                    return
        except ProtocolError as exc:
            log.warning("connection from pid %d (%s): %s; closed", conn.pid, conn.role or "client", exc)
            self.close(conn)

    def on_message(self, conn, msg):
        if conn.role is None:
            self.identify(conn, msg)
        elif conn.role == "worker":
            self.on_result(conn.child, msg)
        elif conn.role in ("action", "cluster", "notify"):
            self.on_event(conn.child, msg)
        else:
            self.respond(conn, msg)

    def identify(self, conn, msg):
        if msg.get("t") == "hello":
            child = self.pool.children.get(conn.pid)
            if child is None or msg.get("pid") != conn.pid or msg.get("role") != child.kind \
                    or child.conn is not None:
                raise ProtocolError("hello from pid %d that is not a child of ours" % conn.pid)
            conn.role, conn.child, child.conn = child.kind, child, conn
            self.pool.greet(child)
            return
        conn.role = "control"
        self.respond(conn, msg)

    def respond(self, conn, msg):
        """Answer a control request, in the order they came."""
        if conn.answering is not None:
            conn.waiting.append(msg)
            return
        answer = self.answer(msg)
        if isinstance(answer, dict):
            self.send(conn, answer)
        else:
            conn.answering = answer
            self.answering.append(conn)

    def answer_some(self, until):
        """Make the answers under way, a piece of each in turn, until monotonic ``until``;
        one whose reader lags (ANSWER_BUFFER unsent) waits."""
        while self.answering and time.monotonic() < until:
            progress = False
            for conn in list(self.answering):
                if conn.sock.fileno() < 0:
                    self.answering.remove(conn)
                    continue
                if len(conn.out) > ANSWER_BUFFER:
                    continue
                try:
                    piece = next(conn.answering)
                except StopIteration:
                    conn.answering = None
                    self.answering.remove(conn)
                    while conn.waiting and conn.answering is None and conn.sock.fileno() >= 0:
                        self.respond(conn, conn.waiting.popleft())
                    continue
                except Exception:       # a bug in one answer closes one connection
                    log.exception("answering pid %d failed; connection closed", conn.pid)
                    self.close(conn)
                    continue
                if piece:
                    conn.out += piece
                    self.flush(conn)
                    progress = True
            if not progress:
                return

    def busy(self):
        """Whether an answer under way can be worked on now (the loop must not sleep)."""
        return bool(self.answering) and any(len(c.out) <= ANSWER_BUFFER for c in self.answering)

    def send(self, conn, obj):
        """Send ``obj``, a message (a dict) or its line already encoded (bytes)."""
        if conn is None or conn.sock.fileno() < 0:
            return
        conn.out += obj if isinstance(obj, bytes) else encode_message(obj)
        self.flush(conn)

    def flush(self, conn):
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close(conn)
            return
        if conn.writing != bool(conn.out):    # the usual send changes nothing: no selector call
            conn.writing = bool(conn.out)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
            self.sel.modify(conn.sock, events, self.sel.get_key(conn.sock).data)

    def close(self, conn):
        fd = conn.sock.fileno()
        if fd < 0:
            return
        self.sel.unregister(conn.sock)
        del self.conns[fd]
        conn.sock.close()
        if conn.answering is not None:
            conn.answering.close()
            conn.answering = None
            self.answering.remove(conn)
        child = conn.child
        if child is not None:
            child.conn = None
            if child.kind == "worker" and child.state != "exiting":
                # A worker that hung up is of no use: retire it, reap it, replace it.
                child.lost = True
                self.pool.retire(child)

    def drain(self, child):
        """Handle what an exited child sent before it went (its "done", a last result).

        A quick child can send everything and exit between two passes of the loop,
        its connection still unread, even still in the listen backlog: accept and
        read it now, while the child is still known (its hello needs that).
        """
        if child.conn is None:
            self.accept(selectors.EVENT_READ)
            conns = [c for c in self.conns.values() if c.pid == child.pid and c.role is None]
        else:
            conns = [child.conn]
        for conn in conns:
            for _ in range(64):         # bounded; the peer is gone, so EOF comes soon
                if conn.sock.fileno() < 0 or not _select_read([conn.sock], 0):
                    break
                self.on_io(conn, selectors.EVENT_READ)
        if child.conn is not None:
            self.close(child.conn)

    def tick(self, now):
        """Close control clients idle too long; let the listener back after a rest.
        The connections are looked at only once the oldest that may be a client is
        that old (the workers' never are)."""
        if now - self.oldest > CLIENT_IDLE:
            self.oldest = float("inf")
            for conn in list(self.conns.values()):
                if conn.role not in (None, "control"):
                    continue
                if now - conn.opened > CLIENT_IDLE:
                    log.warning("connection from pid %d idle for %ds; closed", conn.pid, CLIENT_IDLE)
                    self.close(conn)
                else:
                    self.oldest = min(self.oldest, conn.opened)
        if self.resting_until is not None and now >= self.resting_until:
            self.resting_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, self.accept)

    def close_all(self):
        for conn in list(self.conns.values()):
            self.close(conn)
        if self.listener is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.listener.close()

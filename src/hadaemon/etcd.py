"""etcd: a v3 client on its JSON gateway (docs/cluster.md).

What this client is built on, measured on etcd 3.4 (../shared/notes/etcd-v3-gateway.md):

  - every call is a POST of a JSON body to /v3/...; keys and values are base64;
    int64 fields come back as strings; fields at their default value are left out
    of answers (a txn whose compare failed has no "succeeded" at all).
  - without etcd quorum, writes, lease grants and keep-alives never answer: only
    our socket timeout ends them.  A write that timed out may still be applied
    later, so its outcome is unknown (EtcdUnknown), never a failure to retry.
  - a call that never left (refused, no route, the connect timed out) is tried on
    the next endpoint; so is a read or a keep-alive whose answer was lost.
  - http.client, never urllib: urllib follows http_proxy from the environment.

Every call blocks for at most ``timeout``: the client runs in the cluster agent,
a process of its own, so a call etcd never answers stalls nothing of the master.

Uses: base, netsettings, wire, proc.
"""

import base64
import json
import socket
import threading
import time

from .base import HadaemonError, ProtocolError
from .netsettings import etcd_ssl_context, parse_etcd_url
from .wire import LineReader
from .proc import _select_read


class EtcdError(HadaemonError):
    """etcd refused a call (``status`` / ``code`` say why), or no endpoint answered."""

    def __init__(self, message, status=None, code=None):
        super().__init__(message)
        self.status, self.code = status, code


class EtcdUnknown(EtcdError):
    """A write was sent and its answer lost: it may be applied, now or later."""


class _TryNext(Exception):
    """This endpoint did not do it (never reached, or a read it failed): try the next."""


def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def unb64(text):
    return base64.b64decode(text or "").decode("utf-8", "replace")


def prefix_end(prefix):
    """The range_end that makes a range cover every key starting with ``prefix``."""
    raw = prefix.encode("utf-8")
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode("ascii")


def decode_kv(kv):
    """A gateway key-value -> {key, value, lease, create, mod} with ints and text."""
    return {"key": unb64(kv.get("key")), "value": unb64(kv.get("value")),
            "lease": int(kv.get("lease") or 0), "create": int(kv.get("create_revision") or 0),
            "mod": int(kv.get("mod_revision") or 0)}


def etcd_put(key, value, lease=None):
    put = {"key": b64(key), "value": b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def etcd_delete(key):
    return {"request_delete_range": {"key": b64(key)}}


def etcd_get(key):
    return {"request_range": {"key": b64(key)}}


def etcd_compare(key, target, value, result="EQUAL"):
    """A txn compare: ``target`` CREATE / MOD / VERSION (a revision) or VALUE (text) / LEASE."""
    field = {"CREATE": "create_revision", "MOD": "mod_revision", "VERSION": "version",
             "VALUE": "value", "LEASE": "lease"}[target]
    return {"key": b64(key), "target": target, "result": result,
            field: b64(value) if target == "VALUE" else str(value)}


def connect_bounded(host, port, timeout):
    """A TCP connection to host:port within ``timeout`` seconds, the name lookup included:
    getaddrinfo alone may wait on a dead DNS server far longer, so a name (not an address)
    is looked up in a thread of its own, given up on (left to end by itself) at the timeout."""
    deadline = time.monotonic() + timeout
    try:
        found = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        answer = []
        lookup = threading.Thread(target=lambda: answer.append(_lookup(host, port)), daemon=True)
        lookup.start()
        lookup.join(timeout)
        if not answer:
            raise socket.gaierror(socket.EAI_AGAIN, "the name lookup of %s took longer than %gs"
                                  % (host, timeout))
        if isinstance(answer[0], OSError):
            raise answer[0]
        found = answer[0]
    error = socket.timeout("timed out")
    for family, kind, proto, _, address in found:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, proto)
        sock.settimeout(left)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _lookup(host, port):
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError as exc:
        return exc


class EtcdEndpoint:
    """One endpoint URL and what it last did: shared by the clients of one agent (each
    keeps its own connection to it), so that one's failure demotes it for the other."""

    def __init__(self, url, context):
        self.url = url
        self.scheme, self.host, self.port = parse_etcd_url(url)
        self.context = context
        self.last_ok = None             # monotonic time of its last answer
        self.error = None               # why its last call failed, until one succeeds
        self.down_until = 0.0           # tried last until then, after it gave no answer


def endpoint_order(endpoints, current, now):
    """The order to try ``endpoints`` in: from ``current`` (the one that answered last) on
    round the ring, those demoted (no answer lately) last, the longest demoted first."""
    ring = endpoints[current:] + endpoints[:current]
    return [ep for ep in ring if ep.down_until <= now] + \
        sorted((ep for ep in ring if ep.down_until > now), key=lambda ep: ep.down_until)


def _etcd_message(doc, status):
    """What an error answer says: {error, message, code}, or for streams {error: {message}}."""
    error = doc.get("error")
    if isinstance(error, dict):
        error = error.get("message")
    return str(doc.get("message") or error or "HTTP %d" % status)[:300]


def _os_error_text(exc):
    if isinstance(exc, socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class EtcdClient:
    """Calls on the JSON gateway of every endpoint given, moving on when one fails.

    A call goes first to the endpoint that answered this client last, then round the
    others; one that gave no answer (refused, timed out, reset, etcd's own timeout) is
    demoted for ``demote`` seconds: tried last, after those that answer.  ``requests``
    counts the calls sent (for the figures: a steady cluster should only send
    keep-alives).  Each attempt is bounded by ``timeout`` seconds.
    """

    def __init__(self, urls, timeout=1.0, context=None, demote=None, endpoints=None):
        if any(url.startswith("https:") for url in urls) and context is None:
            import ssl
            context = ssl.create_default_context()
        self.endpoints = endpoints or [EtcdEndpoint(url, context) for url in urls]
        self.timeout = timeout
        self.demote = 2 * timeout if demote is None else demote
        self.conns = {}                 # url -> its kept-alive connection (this client's own)
        self.current = 0                # where the next call goes first
        self.requests = 0
        self.last = None                # the endpoint that answered the last call

    @classmethod
    def for_cluster(cls, cluster, timeout, demote=None):
        context = etcd_ssl_context(cluster) if any(u.startswith("https:") for u in cluster.etcd) else None
        return cls(cluster.etcd, timeout, context, demote)

    def twin(self, timeout):
        """A client of its own connections on the same endpoints, sharing what each did."""
        return EtcdClient([ep.url for ep in self.endpoints], timeout, demote=self.demote,
                          endpoints=self.endpoints)

    def _order(self, rotate):
        if rotate:
            self.current = (self.current + 1) % len(self.endpoints)
        return endpoint_order(self.endpoints, self.current, time.monotonic())

    def call(self, path, body, idempotent=False, rotate=False, timeout=None):
        """POST ``body`` to ``path``: the decoded answer.  A call that never left goes to
        the next endpoint; so does an ``idempotent`` one whose answer was lost.  Raises
        EtcdUnknown for a write whose answer was lost, EtcdError otherwise."""
        payload = json.dumps(body).encode("utf-8")
        failures = []
        for ep in self._order(rotate):
            try:
                answer = self._call_one(ep, path, payload, idempotent, timeout or self.timeout)
            except _TryNext as exc:
                failures.append("%s: %s" % (ep.url, exc))
                continue
            except EtcdUnknown as exc:
                if idempotent:
                    failures.append("%s: %s" % (ep.url, exc))
                    continue
                raise
            self.current = self.endpoints.index(ep)
            self.last = ep
            return answer
        raise EtcdError("no etcd endpoint answered: %s" % "; ".join(failures))

    def _connection(self, ep, timeout):
        """The kept-alive connection to ``ep``, or a new one, bounded by ``timeout``.  One
        etcd closed (or a member that restarted) reads as EOF: a request sent on it would
        be lost for nothing."""
        import http.client
        conn = self.conns.get(ep.url)
        if conn is not None and conn.sock is not None and _select_read([conn.sock], 0):
            self._close(ep)
            conn = None
        if conn is None or conn.sock is None:
            if ep.scheme == "https":
                conn = http.client.HTTPSConnection(ep.host, ep.port, timeout=timeout, context=ep.context)
            else:
                conn = http.client.HTTPConnection(ep.host, ep.port, timeout=timeout)
            self.conns[ep.url] = conn
            try:
                sock = connect_bounded(ep.host, ep.port, timeout)    # not conn.connect(): DNS too
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if ep.scheme == "https":
                    sock = ep.context.wrap_socket(sock, server_hostname=ep.host)
                conn.sock = sock
            except (OSError, http.client.HTTPException) as exc:
                self._close(ep)
                raise _TryNext(_os_error_text(exc))
        conn.sock.settimeout(timeout)
        return conn

    def _close(self, ep):
        conn = self.conns.pop(ep.url, None)
        if conn is not None:
            conn.close()

    def _failed(self, ep, why):
        self._close(ep)
        ep.error = why
        ep.down_until = time.monotonic() + self.demote

    def _call_one(self, ep, path, payload, idempotent, timeout):
        return self._receive(ep, self._send(ep, path, payload, timeout), path, idempotent)

    def _send(self, ep, path, payload, timeout):
        """The request sent on ``ep``'s connection (made within ``timeout``): the connection."""
        import http.client
        try:
            conn = self._connection(ep, timeout)
            self.requests += 1
            try:
                conn.request("POST", path, payload, {"Content-Type": "application/json"})
            except (OSError, http.client.HTTPException) as exc:
                raise _TryNext(_os_error_text(exc))
        except _TryNext as exc:
            self._failed(ep, str(exc))
            raise
        return conn

    def _receive(self, ep, conn, path, idempotent):
        """The answer on ``conn``, read within its socket's timeout: the decoded document."""
        import http.client
        try:
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            why = _os_error_text(exc)
            self._failed(ep, why)
            raise EtcdUnknown("%s %s: no answer (%s)" % (ep.url, path, why))
        if resp.will_close:
            self._close(ep)
        try:
            doc = json.loads(data.decode("utf-8")) if data else {}
        except (UnicodeDecodeError, ValueError):
            doc = {"error": data[:200].decode("utf-8", "replace")}
        if not isinstance(doc, dict):
            doc = {"error": "unexpected answer %r" % (data[:200],)}
        if resp.status >= 500:
            self._failed(ep, _etcd_message(doc, resp.status))
            if not idempotent:
                # etcd's own timeouts ("context deadline exceeded", "leader changed"):
                # the proposal may be in the log and still be applied.
                raise EtcdUnknown("%s %s: %s" % (ep.url, path, ep.error))
            raise _TryNext(ep.error)
        ep.last_ok, ep.error, ep.down_until = time.monotonic(), None, 0.0
        if resp.status != 200:
            raise EtcdError("%s %s: %s" % (ep.url, path, _etcd_message(doc, resp.status)),
                            status=resp.status, code=doc.get("code"))
        return doc

    def race(self, path, body, stagger, budget, rotate=False):
        """An idempotent call sent to the first endpoint, and to the next each ``stagger``
        seconds it goes unanswered, the first answer taken, for ``budget`` seconds: a
        dead endpoint costs a stagger, and a call etcd holds (a raft election) is
        answered as soon as etcd can, not dropped by a timeout just before."""
        payload = json.dumps(body).encode("utf-8")
        order = self._order(rotate)
        started = time.monotonic()
        deadline, next_at = started + budget, started
        pending, failures = {}, []
        try:
            while True:
                now = time.monotonic()
                if order and now >= next_at:
                    ep = order.pop(0)
                    try:
                        pending[ep] = (self._send(ep, path, payload, max(0.05, min(stagger, deadline - now))), now)
                    except _TryNext as exc:
                        failures.append("%s: %s" % (ep.url, exc))
                        continue            # refused at once: the next one now
                    next_at = now + stagger
                if not pending and not order:
                    raise EtcdError("no etcd endpoint answered: %s" % "; ".join(failures))
                if now >= deadline:
                    raise EtcdError("no etcd endpoint answered in %.2fs: %s" % (budget, "; ".join(
                        failures + ["%s: no answer (timed out)" % ep.url for ep in pending])))
                wait = (min(next_at, deadline) if order else deadline) - now
                ready = _select_read([conn.sock for conn, _ in pending.values()], max(0.0, wait))
                for ep in [ep for ep, (conn, _) in pending.items() if conn.sock in ready]:
                    conn, _ = pending.pop(ep)
                    conn.sock.settimeout(max(0.05, deadline - time.monotonic()))
                    try:
                        answer = self._receive(ep, conn, path, True)
                    except (_TryNext, EtcdUnknown) as exc:
                        failures.append("%s: %s" % (ep.url, exc))
                        next_at = time.monotonic()      # the next one now
                        continue
                    self.current = self.endpoints.index(ep)
                    self.last = ep
                    return answer
        finally:
            now = time.monotonic()
            for ep, (conn, sent) in pending.items():
                self._close(ep)             # its answer would come on a connection we reuse
                if now - sent >= stagger:
                    self._failed(ep, "timed out")

    # -- the calls hadaemon uses ------------------------------------------------------

    def status(self, ep):
        """/v3/maintenance/status of one endpoint (for --check-config --connect)."""
        answer = self._call_one(ep, "/v3/maintenance/status", b"{}", True, self.timeout)
        self.last = ep
        return answer

    def grant(self, ttl, timeout=None):
        """A new lease: (id, the TTL etcd granted, maybe more than asked)."""
        answer = self.call("/v3/lease/grant", {"TTL": ttl}, idempotent=True, timeout=timeout)
        if answer.get("error"):
            raise EtcdError("lease grant refused: %s" % answer["error"])
        return int(answer["ID"]), int(answer.get("TTL") or 0)

    def keepalive(self, lease, stagger=None, budget=None):
        """Renew a lease: (its TTL, or 0 when it is gone (expired or revoked), revision).

        Sent to each endpoint in turn, so every endpoint is heard from within a few
        renewals and a member that lost its quorum is found without an extra call;
        raced (``race``) when it does not answer within ``stagger``."""
        stagger = stagger or self.timeout
        answer = self.race("/v3/lease/keepalive", {"ID": str(lease)}, stagger,
                           budget or len(self.endpoints) * stagger, rotate=True)
        result = answer.get("result") or {}
        return int(result.get("TTL") or 0), int((result.get("header") or {}).get("revision") or 0)

    def revoke(self, lease, timeout=None):
        """Revoke a lease (and delete its keys); one already gone is no error."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)}, idempotent=True, timeout=timeout)
        except EtcdError as exc:
            if exc.status != 404:
                raise

    def range(self, key, prefix=False):
        """(revision, [kv]) of ``key``, or of every key under it with ``prefix``."""
        body = {"key": b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        answer = self.call("/v3/kv/range", body, idempotent=True)
        revision = int((answer.get("header") or {}).get("revision") or 0)
        return revision, [decode_kv(kv) for kv in answer.get("kvs") or []]

    def put(self, key, value, lease=None):
        """Put one key (on ``lease``): the revision of the write."""
        body = etcd_put(key, value, lease)["request_put"]
        answer = self.call("/v3/kv/put", body)
        return int((answer.get("header") or {}).get("revision") or 0)

    def txn(self, compares, success, failure=()):
        """(succeeded, revision, responses) of a transaction."""
        answer = self.call("/v3/kv/txn", {"compare": list(compares), "success": list(success),
                                          "failure": list(failure)})
        revision = int((answer.get("header") or {}).get("revision") or 0)
        return bool(answer.get("succeeded")), revision, answer.get("responses") or []

    def health(self):
        """[{endpoint, last_ok, error}] for every endpoint (last_ok: monotonic, or None)."""
        return [{"endpoint": ep.url, "last_ok": ep.last_ok, "error": ep.error}
                for ep in self.endpoints]

    def close(self):
        for ep in self.endpoints:
            self._close(ep)


def connect_etcd_endpoints(cluster, timeout=2.0):
    """--check-config --connect: [(url, error or None, what it answered)] for each endpoint."""
    client = EtcdClient.for_cluster(cluster, timeout)
    results = []
    for ep in client.endpoints:
        started = time.monotonic()
        try:
            answer = client.status(ep)
        except (EtcdError, _TryNext) as exc:
            results.append((ep.url, str(exc), None))
            continue
        took = time.monotonic() - started
        header = answer.get("header") or {}
        results.append((ep.url, None, "ok in %.2fs (etcd %s, member %s, %s)" % (
            took, answer.get("version", "?"), header.get("member_id", "?"),
            "the raft leader" if answer.get("leader") == header.get("member_id")
            else "leader %s" % answer.get("leader", "unknown"))))
    client.close()
    return results


class EtcdWatch:
    """One watch stream (POST /v3/watch) on one endpoint, read without blocking.

    The gateway answers with chunked transfer encoding, one JSON object per line;
    ``read()`` returns the objects that have arrived and raises EtcdError when the
    stream ends or breaks.  ``fileno()`` is for select.
    """

    def __init__(self, ep, prefix, start_revision, timeout):
        import ssl
        self.ep = ep
        self.buf = bytearray()
        self.headers_done = False
        self.lines = LineReader()
        sock = connect_bounded(ep.host, ep.port, timeout)
        try:
            if ep.scheme == "https":
                sock = ep.context.wrap_socket(sock, server_hostname=ep.host)
            body = json.dumps({"create_request": {"key": b64(prefix), "range_end": prefix_end(prefix),
                                                  "start_revision": str(start_revision)}}).encode()
            host = "[%s]" % ep.host if ":" in ep.host else ep.host
            sock.sendall(b"POST /v3/watch HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), ep.port, len(body), body))
            sock.setblocking(False)
        except (OSError, ssl.SSLError):
            sock.close()
            raise
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()

    def read(self):
        """The JSON objects that arrived (each {"result": {...}}); EtcdError at the end."""
        import ssl
        ended = False
        while True:
            try:
                data = self.sock.recv(262144)
            except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
                break
            except (OSError, ssl.SSLError) as exc:
                raise EtcdError("watch on %s broke: %s" % (self.ep.url, _os_error_text(exc)))
            if not data:
                ended = True
                break
            self.buf += data
        out = self._decode()
        if ended:
            raise EtcdError("watch on %s: the stream ended" % self.ep.url)
        return out

    def _decode(self):
        if not self.headers_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    raise EtcdError("watch on %s: no end of the headers" % self.ep.url)
                return []
            head = bytes(self.buf[:end]).decode("latin-1").lower()
            del self.buf[:end + 4]
            if not head.startswith("http/1.1 200") or "transfer-encoding: chunked" not in head:
                raise EtcdError("watch on %s refused: %s" % (self.ep.url, head.splitlines()[0]))
            self.headers_done = True
        out = []
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            try:
                size = int(bytes(self.buf[:end]).split(b";")[0], 16)
            except ValueError:
                raise EtcdError("watch on %s: bad chunk" % self.ep.url)
            if size == 0:
                raise EtcdError("watch on %s: the stream ended" % self.ep.url)
            if len(self.buf) < end + 2 + size + 2:
                break
            chunk = bytes(self.buf[end + 2:end + 2 + size])
            del self.buf[:end + 2 + size + 2]
            try:
                out.extend(self.lines.feed(chunk))
            except ProtocolError as exc:
                raise EtcdError("watch on %s: %s" % (self.ep.url, exc))
        return out

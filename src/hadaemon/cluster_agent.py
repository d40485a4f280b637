"""Cluster agent: the process that talks to etcd.

Every etcd call of a member runs here, in a child of the master forked like the
workers and speaking the same newline-JSON over the daemon socket.  A call to an
etcd without quorum blocks until its timeout (a fraction of ttl); in the master's
loop that would freeze every check, the control socket and the running sequence
for as long; here it freezes only the next etcd call.

The agent holds no decisions.  The master owns the lease (its id), decides when
to renew it, campaigns, and sends each guarded write; it also judges, by its own
monotonic clock, whether its lease can still be alive: the agent renews only when
asked, so a master that is frozen (SIGSTOP) or dead lets its lease expire.  A
thread reads the master's requests; the lease's (renew, revoke) go to a thread of
their own with connections of their own, so a renewal never waits behind a write
that is being settled; the main loop answers the others in order, and keeps a
mirror of the cluster's keys flowing to the master: one range of the prefix, then
a watch from the revision after it; again on any break.

Both ask the endpoint that answered last first, and an endpoint that gave no
answer goes last for a while, for both (etcd.py).  A write whose answer was lost
is settled, not given up: every ledger write of an epoch carries a ticket (the
epoch and the write's number in it) and applies only where the ticket of the
write before it is (the first: where no ticket of this epoch is), so it is sent
again through the next endpoint: applied there, or refused because it was applied
already (the refusal shows our ticket) or because we no longer lead.  Each write
applies once however often it is sent, and never after a later one.  A campaign
is settled the same way (the holder of the key shows our lease).

  master -> agent   {t: renew, id, lease, ttl}      renew (a new lease when lease is null)
                    {t: put, id, key, value, lease}  a key on a lease (a member's view)
                    {t: campaign, id, lease, value}  create the leader key if absent
                    {t: txn, id, epoch, seq, puts, deletes}   ledger write number seq of
                                                     the leader of epoch (the leader key's
                                                     create revision), with its ticket
                    {t: revoke, id, lease}           resign, or stop
                    {t: resync}                      range and watch again
  agent -> master   {t: reply, id, ...}              one per request, in order
                    {t: snapshot, revision, kvs, last}   the keys, in parts; then
                    {t: events, revision, events}    each change, in revision order

Keys in messages are relative to /hadaemon/NAME/; values are JSON.  A write of an
epoch that failed or was lost stops every later write of that epoch unsent: the
ledger never holds a later write of a leader without an earlier one.

Uses: base, wire, proc, children, etcd.
"""

import collections
import json
import os
import queue
import signal
import threading
import time

from .base import log
from .wire import Channel, LineReader
from .proc import _Orphaned, _select_read
from .children import child_setup
from .etcd import (
    EtcdClient, EtcdError, EtcdUnknown, EtcdWatch, decode_kv, etcd_compare, etcd_delete,
    etcd_get, etcd_put,
)


RENEWS_PER_TTL = 4              # renewals sent per ttl
SNAPSHOT_PART = 1 << 20         # bytes of keys per snapshot message (the socket takes 4 MiB)
TICKET_KEY = "ledger/ticket"    # the epoch and number of the last ledger write


def etcd_timeouts(ttl):
    """(renewal stagger, other call) timeouts for ``ttl`` seconds (docs/cluster.md: the
    arithmetic).

    A renewal is due a quarter ttl after the last one, and the leader stops half a
    ttl after that one: the renewal has a quarter ttl, and goes to the next endpoint
    each sixteenth ttl the ones before it leave it unanswered (``EtcdClient.race``).
    Any other call waits an eighth ttl for one endpoint."""
    return max(0.1, min(1.0, ttl / 16.0)), max(0.25, min(2.0, ttl / 8.0))


def ticket(epoch, seq):
    """The ledger/ticket value of write ``seq`` of the leader of ``epoch`` (compared as text)."""
    return json.dumps({"epoch": epoch, "seq": seq}, sort_keys=True)


def parse_json_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


class ClusterAgent:
    """The agent's loop: the master's etcd calls one at a time, and the mirror."""

    def __init__(self, chan, cluster):
        self.chan = chan
        self.cluster = cluster
        self.prefix = cluster.prefix
        self.stagger, self.timeout = etcd_timeouts(cluster.ttl)
        self.renew_for = cluster.ttl / float(RENEWS_PER_TTL)
        self.settle_for = cluster.ttl / 2.0     # a lost write is sent again for so long
        self.client = EtcdClient.for_cluster(cluster, self.timeout, demote=2.0 * cluster.ttl)
        self.lease_client = self.client.twin(self.timeout)
        self.lease_requests = queue.Queue()
        self.sending = threading.Lock()     # the threads send to the master
        self.inbox = collections.deque()    # the reading thread's, for the main loop
        self.reader = LineReader()
        self.wake_r, self.wake_w = os.pipe()    # the reading thread wakes the main loop
        os.set_blocking(self.wake_w, False)
        self.orphaned = False
        self.watch = None
        self.watch_after = 0.0          # no new mirror before (monotonic), after a failure
        self.watch_failures = 0
        self.poisoned = set()           # epochs whose writes stopped

    def send(self, msg):
        with self.sending:
            self.chan.send(msg)

    def run(self):
        threading.Thread(target=self.lease_loop, name="lease", daemon=True).start()
        threading.Thread(target=self.read_loop, name="read", daemon=True).start()
        while True:
            if self.watch is not None and self.watch.ep.down_until > time.monotonic():
                # A call to it failed: it may have lost its quorum and so its events.
                self.drop_watch("its endpoint %s failed a call" % self.watch.ep.url)
            if self.watch is None and time.monotonic() >= self.watch_after:
                self.start_mirror()
            wait = 0.0 if self.inbox else 1.0
            if self.watch is None:
                wait = min(wait, max(0.0, self.watch_after - time.monotonic()))
            self.receive(wait)
            if self.inbox:
                self.handle(self.inbox.popleft())

    # -- input ---------------------------------------------------------------------

    def read_loop(self):
        """The reading thread: the master's requests, the lease's to the lease's thread at
        once (the main loop may be settling a write), the others to the main loop."""
        try:
            while True:
                data = self.chan.sock.recv(262144)
                if not data:
                    break               # the master is gone: its lease expires by itself
                for msg in self.reader.feed(data):
                    if msg.get("t") in ("renew", "revoke"):
                        self.lease_requests.put(msg)
                    else:
                        self.inbox.append(msg)
                self.wake()
        except BaseException:           # noqa: B036 - a bad message: the agent goes, as before
            log.exception("cluster agent: reading the master's requests failed")
        self.orphaned = True
        self.wake()

    def wake(self):
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass                        # a wake-up is pending already

    def receive(self, wait):
        fds = [self.wake_r] + ([self.watch] if self.watch is not None else [])
        for fd in _select_read(fds, wait):
            if fd == self.wake_r:
                os.read(self.wake_r, 4096)
                if self.orphaned:
                    raise _Orphaned()
            elif self.watch is not None:
                try:
                    results = self.watch.read()
                except EtcdError as exc:
                    self.drop_watch(str(exc))
                    continue
                for doc in results:
                    self.watched(doc)

    def lease_loop(self):
        """The lease's thread: renewals and revocations, on connections of their own.
        Should it fail, the agent goes (the master forks another): a lease thread gone
        would leave the master waiting for renewals that never come."""
        try:
            while True:
                self.handle(self.lease_requests.get())
        except (BrokenPipeError, ConnectionError):
            self.orphaned = True        # its reply found the master gone: the main loop ends
            self.wake()
        except BaseException:           # noqa: B036 - whatever it was, the process must go
            log.exception("cluster agent: the lease thread failed")
            os._exit(1)

    # -- requests --------------------------------------------------------------------

    def handle(self, msg):
        kind = msg.get("t")
        reply = {"t": "reply", "id": msg.get("id"), "op": kind}
        try:
            if kind == "renew":
                reply.update(self.renew(msg))
            elif kind == "revoke":
                self.lease_client.revoke(msg["lease"], self.timeout)
            elif kind == "put":
                reply["revision"] = self.client.put(self.prefix + msg["key"], json.dumps(msg["value"]),
                                                    msg.get("lease"))
            elif kind == "campaign":
                reply.update(self.campaign(msg))
            elif kind == "txn":
                reply.update(self.guarded(msg))
            elif kind == "resync":
                self.drop_watch(None)
                self.start_mirror()
            else:
                reply["error"] = "unknown request %r" % (kind,)
        except EtcdUnknown as exc:
            reply.update(error=str(exc), unknown=True)
        except EtcdError as exc:
            reply.update(error=str(exc), status=exc.status)
        reply["endpoints"] = self.client.health()
        reply["requests"] = self.client.requests + self.lease_client.requests
        self.send(reply)

    def renew(self, msg):
        lease = msg.get("lease")
        if not lease:
            lease, ttl = self.lease_client.grant(msg["ttl"], self.timeout)
            return {"lease": lease, "ttl": ttl, "granted": True}
        ttl, revision = self.lease_client.keepalive(lease, self.stagger, self.renew_for)
        return {"lease": lease, "ttl": ttl, "revision": revision}

    def settled(self, send, applied):
        """``send()`` a write, again through the next endpoint while its answer is lost,
        for ``settle_for`` seconds: (succeeded, revision, responses) of the first answer,
        or ``applied(responses)`` -> (True, revision) when a refusal shows that an
        earlier sending of it was applied.  EtcdUnknown when none answered in time."""
        deadline = time.monotonic() + self.settle_for
        lost = None
        while True:
            sent = time.monotonic()
            try:
                ok, revision, responses = send()
            except EtcdUnknown as exc:
                lost = exc
            except EtcdError as exc:
                if exc.status is not None:
                    raise                   # etcd refused it: nothing to settle
                lost = lost or exc          # never left: not applied (unless an earlier one was)
            else:
                if lost is not None:
                    log.info("cluster agent: a write whose answer was lost (%s) was settled", lost)
                    if not ok:
                        ok, revision = applied(responses) or (False, revision)
                return ok, revision, responses
            if time.monotonic() + self.timeout > deadline:
                raise lost if isinstance(lost, EtcdUnknown) else EtcdUnknown(str(lost))
            time.sleep(max(0.0, sent + 0.05 - time.monotonic()))    # refused at once: not a spin

    def campaign(self, msg):
        """Create the leader key on our lease if nobody holds it: {won, epoch, holder}."""
        key = self.prefix + "leader"

        def ours(responses):
            holder = _first_kv(responses, 0)
            return holder is not None and holder["lease"] == msg["lease"] and (True, holder["create"])
        ok, revision, responses = self.settled(lambda: self.client.txn(
            [etcd_compare(key, "CREATE", 0)],
            [etcd_put(key, json.dumps(msg["value"]), msg["lease"])], [etcd_get(key)]), ours)
        if ok:
            return {"won": True, "epoch": revision}
        holder = _first_kv(responses, 0)
        if holder is not None:
            holder["value"] = parse_json_value(holder["value"])
        return {"won": False, "holder": holder}

    def guarded(self, msg):
        """Ledger write ``seq`` of the leader of ``epoch``: applied once, after write seq - 1
        of it (the tickets), or not at all if it no longer leads."""
        epoch, seq = msg["epoch"], msg.get("seq") or 1
        if epoch in self.poisoned:
            return {"ok": False, "error": "an earlier write of epoch %d failed" % epoch}
        leader, mark = self.prefix + "leader", self.prefix + TICKET_KEY
        ops = [etcd_put(self.prefix + k, json.dumps(v, sort_keys=True)) for k, v in msg.get("puts", {}).items()]
        ops += [etcd_delete(self.prefix + k) for k in msg.get("deletes", [])]
        ops.append(etcd_put(mark, ticket(epoch, seq)))
        compares = [etcd_compare(leader, "CREATE", epoch),
                    etcd_compare(mark, "VALUE", ticket(epoch, seq - 1)) if seq > 1 else
                    etcd_compare(mark, "MOD", epoch + 1, "LESS")]     # no write of this epoch yet

        def ours(responses):
            kv = _first_kv(responses, 1)
            return kv is not None and kv["value"] == ticket(epoch, seq) and (True, kv["mod"])
        try:
            ok, revision, responses = self.settled(
                lambda: self.client.txn(compares, ops, [etcd_get(leader), etcd_get(mark)]), ours)
        except EtcdError:
            self.poisoned.add(epoch)
            raise
        if not ok:
            self.poisoned.add(epoch)
            holder = _first_kv(responses, 0)
            if holder is None or holder["create"] != epoch:
                return {"ok": False, "deposed": True, "error": "no longer the leader of epoch %d" % epoch}
            return {"ok": False, "error": "write %d of epoch %d follows none applied" % (seq, epoch)}
        return {"ok": True, "revision": revision}

    # -- the mirror --------------------------------------------------------------------

    def start_mirror(self):
        """Range the prefix whole, send it, and watch from the next revision."""
        import ssl
        try:
            revision, kvs = self.client.range(self.prefix, prefix=True)
            ep = self.client.last
            watch = EtcdWatch(ep, self.prefix, revision + 1, self.timeout)
        except (EtcdError, OSError, ssl.SSLError) as exc:
            self.watch_failures += 1
            self.watch_after = time.monotonic() + min(2.0, 0.1 * 2 ** self.watch_failures)
            log.debug("cluster agent: no mirror: %s", exc)
            return
        self.watch_failures = 0
        part, size = [], 0
        for kv in kvs:
            kv["key"] = kv["key"][len(self.prefix):]
            kv["value"] = parse_json_value(kv["value"])
            part.append(kv)
            size += len(kv["key"]) + len(json.dumps(kv["value"]))
            if size > SNAPSHOT_PART:
                self.send({"t": "snapshot", "revision": revision, "kvs": part, "last": False})
                part, size = [], 0
        self.send({"t": "snapshot", "revision": revision, "kvs": part, "last": True})
        self.watch = watch

    def drop_watch(self, why):
        if self.watch is not None:
            if why:
                log.debug("cluster agent: watch dropped: %s", why)
            self.watch.close()
            self.watch = None
            self.watch_after = time.monotonic() + (0.1 if why else 0.0)

    def watched(self, doc):
        result = doc.get("result") or {}
        if doc.get("error") or result.get("canceled") or result.get("compact_revision"):
            self.drop_watch("watch ended: %s" % (doc.get("error") or result.get("cancel_reason")
                                                 or "compacted"))
            return
        events = []
        for event in result.get("events") or []:
            kv = decode_kv(event.get("kv") or {})
            events.append({"type": "delete" if event.get("type") == "DELETE" else "put",
                           "key": kv["key"][len(self.prefix):], "lease": kv["lease"],
                           "create": kv["create"], "mod": kv["mod"],
                           "value": parse_json_value(kv["value"]) if event.get("type") != "DELETE" else None})
        if events:
            revision = int((result.get("header") or {}).get("revision") or 0)
            self.send({"t": "events", "revision": revision, "events": events})


def _first_kv(responses, index):
    """The key-value the ``index``-th range of a txn's answer found (decoded), or None."""
    if len(responses) <= index:
        return None
    kvs = (responses[index].get("response_range") or {}).get("kvs") or []
    return decode_kv(kvs[0]) if kvs else None


def cluster_agent_main(sock_path, cluster):
    """The forked cluster agent: hello, then the agent's loop until the master goes."""
    child_setup()
    # A master gone is an EPIPE its threads end on (run, lease_loop), not a death by signal.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    chan = Channel.connect(sock_path)
    chan.send({"t": "hello", "role": "cluster", "pid": os.getpid()})
    ClusterAgent(chan, cluster).run()
    return 0

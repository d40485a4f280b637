"""Cluster agent: the process that talks to etcd.

Every etcd call of a member runs here, in a child of the master forked like the
workers and speaking the same newline-JSON over the daemon socket.  A call to an
etcd without quorum blocks until its timeout (a fraction of ttl); in the master's
loop that would freeze every check, the control socket and the running sequence
for as long; here it freezes only the next etcd call.

The agent holds no decisions.  The master owns the lease (its id), decides when
to renew it, campaigns, and sends each guarded write; it also judges, by its own
monotonic clock, whether its lease can still be alive: the agent renews only when
asked, so a master that is frozen (SIGSTOP) or dead lets its lease expire.  The
agent answers each request in order (renewals first), and keeps a mirror of the
cluster's keys flowing to the master: one range of the prefix, then a watch from
the revision after it; again on any break.

  master -> agent   {t: renew, id, lease, ttl}      renew (a new lease when lease is null)
                    {t: put, id, key, value, lease}  a key on a lease (a member's view)
                    {t: campaign, id, lease, value}  create the leader key if absent
                    {t: txn, id, epoch, puts, deletes}   a ledger write guarded by the
                                                     leader key's create revision = epoch
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


def etcd_timeouts(ttl):
    """(renewal, other call) timeouts for a lease of ``ttl`` seconds.

    A renewal that hangs must leave time for the next endpoint within the quarter
    ttl between renewals; a write gets a little longer, as etcd syncs it to disk."""
    return max(0.2, min(2.0, ttl / 6.0)), max(0.25, min(2.0, ttl / 4.0))


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
        self.renew_timeout, self.timeout = etcd_timeouts(cluster.ttl)
        self.client = EtcdClient.for_cluster(cluster, self.timeout)
        self.inbox = collections.deque()
        self.reader = LineReader()
        self.watch = None
        self.watch_after = 0.0          # no new mirror before (monotonic), after a failure
        self.watch_failures = 0
        self.poisoned = set()           # epochs whose writes stopped

    def run(self):
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
                self.handle(self.next_request())

    # -- input ---------------------------------------------------------------------

    def receive(self, wait):
        fds = [self.chan.sock] + ([self.watch] if self.watch is not None else [])
        for fd in _select_read(fds, wait):
            if fd is self.chan.sock:
                data = self.chan.sock.recv(262144)
                if not data:
                    raise _Orphaned()   # the master is gone: its lease expires by itself
                self.inbox.extend(self.reader.feed(data))
            elif self.watch is not None:
                try:
                    results = self.watch.read()
                except EtcdError as exc:
                    self.drop_watch(str(exc))
                    continue
                for doc in results:
                    self.watched(doc)

    def next_request(self):
        """The oldest renewal first (a late one can cost the leadership), else the oldest."""
        for i, msg in enumerate(self.inbox):
            if msg.get("t") == "renew":
                del self.inbox[i]
                return msg
        return self.inbox.popleft()

    # -- requests --------------------------------------------------------------------

    def handle(self, msg):
        kind = msg.get("t")
        reply = {"t": "reply", "id": msg.get("id"), "op": kind}
        try:
            if kind == "renew":
                reply.update(self.renew(msg))
            elif kind == "put":
                reply["revision"] = self.client.put(self.prefix + msg["key"], json.dumps(msg["value"]),
                                                    msg.get("lease"))
            elif kind == "campaign":
                reply.update(self.campaign(msg))
            elif kind == "txn":
                reply.update(self.guarded(msg))
            elif kind == "revoke":
                self.client.revoke(msg["lease"], self.renew_timeout)
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
        reply["requests"] = self.client.requests
        self.chan.send(reply)

    def renew(self, msg):
        lease = msg.get("lease")
        if not lease:
            lease, ttl = self.client.grant(msg["ttl"], self.renew_timeout)
            return {"lease": lease, "ttl": ttl, "granted": True}
        ttl, revision = self.client.keepalive(lease, self.renew_timeout)
        return {"lease": lease, "ttl": ttl, "revision": revision}

    def campaign(self, msg):
        """Create the leader key on our lease if nobody holds it: {won, epoch, holder}."""
        key = self.prefix + "leader"
        ok, revision, responses = self.client.txn(
            [etcd_compare(key, "CREATE", 0)],
            [etcd_put(key, json.dumps(msg["value"]), msg["lease"])], [etcd_get(key)])
        if ok:
            return {"won": True, "epoch": revision}
        kvs = ((responses[0] if responses else {}).get("response_range") or {}).get("kvs") or []
        holder = decode_kv(kvs[0]) if kvs else None
        if holder is not None:
            holder["value"] = parse_json_value(holder["value"])
        return {"won": False, "holder": holder}

    def guarded(self, msg):
        """One ledger write of the leader of ``epoch``, or none if it is no longer that."""
        epoch = msg["epoch"]
        if epoch in self.poisoned:
            return {"ok": False, "error": "an earlier write of epoch %d failed" % epoch}
        key = self.prefix + "leader"
        ops = [etcd_put(self.prefix + k, json.dumps(v, sort_keys=True)) for k, v in msg.get("puts", {}).items()]
        ops += [etcd_delete(self.prefix + k) for k in msg.get("deletes", [])]
        try:
            ok, revision, _ = self.client.txn([etcd_compare(key, "CREATE", epoch)], ops, [etcd_get(key)])
        except EtcdError:
            self.poisoned.add(epoch)
            raise
        if not ok:
            self.poisoned.add(epoch)
            return {"ok": False, "deposed": True, "error": "no longer the leader of epoch %d" % epoch}
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
                self.chan.send({"t": "snapshot", "revision": revision, "kvs": part, "last": False})
                part, size = [], 0
        self.chan.send({"t": "snapshot", "revision": revision, "kvs": part, "last": True})
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
            self.chan.send({"t": "events", "revision": revision, "events": events})


def cluster_agent_main(sock_path, cluster):
    """The forked cluster agent: hello, then the agent's loop until the master goes."""
    child_setup()
    chan = Channel.connect(sock_path)
    chan.send({"t": "hello", "role": "cluster", "pid": os.getpid()})
    ClusterAgent(chan, cluster).run()
    return 0

"""Cluster ledger: EtcdStore, the ledger kept in etcd, written by the leader alone (docs/cluster.md).

The Ledger's rules are the same for a cluster member (ledger.py); this is where
they keep what they decide when the ledger is shared:

  put()        each change set of the leader goes into the pass's txn, sent by
               flush() as one etcd txn guarded by its leader key
               (ClusterMember.write); durable() once etcd acknowledged it.  The
               local state db is written only from what etcd holds (the mirror),
               the leader's own writes included: a read copy for --status when
               etcd is down.
  publish_view()  what this member sees, under members/NODE on its lease; no
               member accepts a state by itself, the leader weighs the views
               (views_changed).
  mirrored()   each change of the mirror goes into the local copy; a follower's
               ledger then rereads it (ClusterLink); a leader, whose memory runs
               ahead of etcd by its writes in flight, rereads it whole when it
               takes over, and again when it steps down.
  paused()     the /pause key, which any member may write; likewise paused_hosts()
               (hostpause/HOST) and the last switchover request (switchover).

Keys under /hadaemon/NAME/: leader, members/NODE, pause, hostpause/HOST, switchover
(a request), ledger/meta (next ids), ledger/queue, ledger/switchover (switchover.py's
book), ledger/host/HOST, ledger/tr/ID, ledger/run/ID (IDs zero-padded so they sort;
the leader deletes what falls out of its history).

Uses: base, store, ledger_store, cluster_member.
"""

import json

from .base import log
from .store import well_formed
from .ledger_store import LedgerStore, Snapshot
from .cluster_member import HOSTPAUSE_KEYS, LEDGER_KEYS, MEMBER_KEYS, PAUSE_KEY, SWITCHOVER_KEY


def ledger_to_etcd(changes, cap):
    """A Ledger change set (Changes) -> (puts, deletes) of etcd keys."""
    puts, deletes = {}, []
    for host, record in changes.hosts.items():
        puts[LEDGER_KEYS + "host/" + host] = {"state": record["state"], "since": record["since"]}
    for kind, records in (("tr", changes.transitions), ("run", changes.runs.values())):
        for record in records:      # a run's outputs cut to ETCD_OUTPUT_CAP
            puts[LEDGER_KEYS + "%s/%010d" % (kind, record.id)] = \
                record.to_etcd() if kind == "run" else record.to_json()
            if cap and record.id > cap:
                deletes.append(LEDGER_KEYS + "%s/%010d" % (kind, record.id - cap))
    if changes.queue is not None:
        puts[LEDGER_KEYS + "queue"] = list(changes.queue)
    if changes.meta is not None:
        puts[LEDGER_KEYS + "meta"] = {k: changes.meta[k] for k in ("next_transition", "next_run")}
    if changes.switchover is not None:
        puts[LEDGER_KEYS + "switchover"] = changes.switchover
    return puts, deletes


def ledger_from_etcd(key, value, cap):
    """One etcd ledger key -> (state db key, value), or None (not a ledger key, or
    a value of the wrong shape: a hand-edited etcd must not take the daemon down)."""
    if not key.startswith(LEDGER_KEYS) or value is None:
        return None
    name = key[len(LEDGER_KEYS):]
    kind, _, rest = name.partition("/")
    if kind == "host" and isinstance(value, dict):
        local, value = "host:" + rest, {"state": value.get("state"), "since": value.get("since"),
                                        "pending": None, "count": 0}
    elif kind in ("tr", "run") and rest.isdigit() and cap:
        local = "%s:%d" % (kind, int(rest) % cap)
    elif name in ("queue", "meta", "switchover"):
        local = name
    else:
        return None
    return (local, value) if well_formed(local, value) else None


TXN_OPS = 64                    # puts and deletes in one txn (etcd takes 128 by default)
TXN_BYTES = 512 * 1024          # ... and bytes of values (its requests: 1.5 MiB)


class EtcdStore(LedgerStore):
    """The ledger of a cluster member; see the comment above."""

    shared = True

    def __init__(self, local, member):
        self.local = local              # a LocalStore: the read copy in the state db
        self.member = member
        self.node = member.node
        self.puts, self.deletes, self.size = {}, set(), 0
        self.views_changed = False      # the leader has views to weigh
        self.hosts_paused = set()       # the mirror's hostpause/HOST keys, as mirrored() last saw them
        self.last_write = 0             # request id of our newest ledger write (None: dropped)
        self.acked = 0                  # ... and of the newest etcd acknowledged

    def load(self, cap=None):
        """The local copy: --status shows it until etcd's ledger arrives.  Only a leader,
        from etcd's ledger, decides what happened to runs that were running."""
        return self.local.load(cap)

    def reread(self, cap=None):
        """What etcd holds, as the mirror shows it (our writes gathered are dropped)."""
        self.discard()
        data = {}
        for key, kv in self.member.mirror.items():
            entry = ledger_from_etcd(key, kv.get("value"), cap)
            if entry is not None:
                data[entry[0]] = entry[1]
        return Snapshot.from_db(data)

    def discard(self):
        self.puts, self.deletes, self.size = {}, set(), 0

    def put(self, changes, cap):
        """Gathered into the pass's txn; sent at once when it grows big."""
        puts, deletes = ledger_to_etcd(changes, cap)
        self.puts.update(puts)
        self.deletes.update(deletes)
        self.deletes.difference_update(puts)
        self.size += sum(len(json.dumps(v)) for v in puts.values())
        if len(self.puts) + len(self.deletes) >= TXN_OPS or self.size >= TXN_BYTES:
            self.flush()

    def put_report(self, host, report):
        self.local.put_report(host, report)

    def flush(self):
        """Send what was gathered as one guarded txn.  The ticket: the request id of the
        newest txn, which holds every change put so far (with nothing gathered, the one
        put() sent when the txn grew big); None when that one could not be sent."""
        if not self.puts and not self.deletes:
            return self.last_write
        puts, deletes = self.puts, sorted(self.deletes)
        self.discard()
        self.last_write = rid = self.member.write(puts, deletes)
        if rid is None:
            # Only the leader decides; a change here while not leading is a bug.
            log.error("cluster: a ledger change while not leading was dropped: %s",
                      ", ".join(sorted(puts)))
        return rid

    def durable(self, ticket):
        return self.acked >= ticket

    def written(self, rid, result):
        if result == "ok":
            self.acked = max(self.acked, rid)

    def paused(self):
        return self.member.paused()

    def set_paused(self, paused):
        self.member.set_pause(paused)
        return paused

    def paused_hosts(self):
        """As the mirror shows them; before it arrives, as the local copy kept them."""
        return self.hosts_paused if self.member.synced else self.local.paused_hosts()

    def set_hosts_paused(self, hosts, paused):
        """Asked: etcd has it when the mirror shows it (then ``paused_hosts`` says so)."""
        for host in hosts:
            self.member.put_word(HOSTPAUSE_KEYS + host, {"paused": bool(paused)})
        return self.hosts_paused | set(hosts) if paused else self.hosts_paused - set(hosts)

    def switchover_request(self):
        return self.member.word(SWITCHOVER_KEY)

    def put_switchover_request(self, request):
        self.member.put_word(SWITCHOVER_KEY, request)

    def publish_view(self, view):
        self.member.set_view(view)
        self.views_changed = True

    def mirrored(self, keys, cap):
        """Mirror changes into the local copy; True when the ledger's keys (or the
        pause) changed there."""
        changes = {}
        for key in keys:
            kv = self.member.mirror.get(key)
            entry = ledger_from_etcd(key, kv and kv.get("value"), cap)
            if entry is not None:
                changes[entry[0]] = entry[1]
        if any(k.startswith(MEMBER_KEYS) or k == PAUSE_KEY for k in keys):
            self.views_changed = True
        if "meta" in changes or PAUSE_KEY in keys:
            meta = changes.get("meta") or self.local.data.get("meta") or {}
            changes["meta"] = dict(meta, paused=self.member.paused())
        if any(k.startswith(HOSTPAUSE_KEYS) for k in keys):
            self.hosts_paused = self.member.paused_hosts()
            changes["hostpause"] = sorted(self.hosts_paused)
        if changes:
            self.local.store.commit(changes)
        return bool(changes)


def cluster_reload_problem(old, new):
    """Why a reload cannot apply this [cluster] change (a restart can), or None."""
    if (old is None) != (new is None):
        return "[cluster] %s: restart the daemon to %s the cluster" % (
            "added" if new else "removed", "join" if new else "leave")
    if old is None:
        return None
    fixed = ("etcd", "name", "node", "etcd_ca", "etcd_cert", "etcd_key")
    changed = [k for k in fixed if getattr(old, k) != getattr(new, k)]
    if changed:
        return "%s: [cluster] %s changed: restart the daemon to apply it (quorum and ttl " \
               "apply on reload)" % (new.where, ", ".join(changed))
    return None

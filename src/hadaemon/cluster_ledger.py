"""Cluster ledger: the Ledger kept in etcd, written by the leader alone (docs/cluster.md).

The Ledger's verbs over a ledger that lives in etcd:

  report()     a member's own confirm (docs/configuration.md) decides what it *sees*: its view,
               published under members/NODE on its lease.  No member accepts a
               state by itself.
  agree()      the acting leader moves each host that quorum live members see in
               a new state through accept(), as a local daemon's confirmed
               reports do; runs are queued, dequeued, recorded the same way.
  commit       through LeaderGate: each change set of the leader becomes one etcd
               txn guarded by its leader key (ClusterMember.write).  The local state
               db is written only from what etcd holds (the mirror), the leader's
               own writes included: a read copy for --status when etcd is down.
  mirrored()   a follower takes each ledger change from the mirror; a leader, whose
               memory runs ahead of etcd by its writes in flight, reads the ledger
               whole when it takes over, and again when it steps down.

Keys under /hadaemon/NAME/: leader, members/NODE, pause, ledger/meta (next ids),
ledger/queue, ledger/host/HOST, ledger/tr/ID, ledger/run/ID (IDs zero-padded so
they sort; the leader deletes what falls out of its history).

Uses: base, store, children, ledger, cluster_member.
"""

import collections
import json

from .base import log
from .store import well_formed
from .children import action_variables
from .ledger import Ledger
from .cluster_member import LEDGER_KEYS, MEMBER_KEYS, PAUSE_KEY


ETCD_OUTPUT_CAP = 4096          # bytes of a command's output kept in etcd (requests <= 1.5 MiB)


def _etcd_run(run):
    """A run as etcd keeps it: each command's output cut to ETCD_OUTPUT_CAP."""
    run = dict(run, commands=[dict(c) for c in run.get("commands", [])])
    for cmd in run["commands"]:
        result = cmd.get("result")
        if result and len(result.get("output") or "") > ETCD_OUTPUT_CAP:
            cmd["result"] = dict(result, output=result["output"][:ETCD_OUTPUT_CAP], truncated=True)
    return run


def ledger_to_etcd(changes, cap):
    """A Ledger change set (state db keys) -> (puts, deletes) of etcd keys."""
    puts, deletes = {}, []
    for key, value in changes.items():
        kind = key.split(":", 1)[0]
        if kind == "host":
            puts[LEDGER_KEYS + "host/" + key[5:]] = {"state": value["state"], "since": value["since"]}
        elif kind in ("tr", "run"):
            puts[LEDGER_KEYS + "%s/%010d" % (kind, value["id"])] = \
                _etcd_run(value) if kind == "run" else value
            if cap and value["id"] > cap:
                deletes.append(LEDGER_KEYS + "%s/%010d" % (kind, value["id"] - cap))
        elif key == "queue":
            puts[LEDGER_KEYS + "queue"] = list(value)
        elif key == "meta":
            puts[LEDGER_KEYS + "meta"] = {k: value[k] for k in ("next_transition", "next_run")}
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
    elif name in ("queue", "meta"):
        local = name
    else:
        return None
    return (local, value) if well_formed(local, value) else None


TXN_OPS = 64                    # puts and deletes in one txn (etcd takes 128 by default)
TXN_BYTES = 512 * 1024          # ... and bytes of values (its requests: 1.5 MiB)


class LeaderGate:
    """The store a ClusterLedger writes through: reads and soft values go to the local
    state db, commits to etcd as the leader's guarded writes.  The commits of one pass
    of the loop go as one txn (``flush``): a transition and the start of its run are
    one write, not two."""

    def __init__(self, store, ledger):
        self.store, self.ledger = store, ledger
        self.puts, self.deletes, self.size = {}, set(), 0

    @property
    def data(self):
        return self.store.data

    def soft(self, key, value):
        self.store.soft(key, value)

    def commit(self, changes):
        puts, deletes = ledger_to_etcd(changes, self.ledger.cap)
        self.puts.update(puts)
        self.deletes.update(deletes)
        self.deletes.difference_update(puts)
        self.size += sum(len(json.dumps(v)) for v in puts.values())
        if len(self.puts) + len(self.deletes) >= TXN_OPS or self.size >= TXN_BYTES:
            self.flush()

    def flush(self):
        """Send what was committed as one guarded txn; its request id (None: nothing sent)."""
        if not self.puts and not self.deletes:
            return None
        puts, deletes = self.puts, sorted(self.deletes)
        self.puts, self.deletes, self.size = {}, set(), 0
        rid = self.ledger.member.write(puts, deletes)
        if rid is None:
            # Only the leader decides; a change here while not leading is a bug.
            log.error("cluster: a ledger change while not leading was dropped: %s",
                      ", ".join(sorted(puts)))
            return None
        self.ledger.last_write = rid
        return rid


class ClusterLedger(Ledger):
    """The ledger of a cluster member; see the comment above."""

    def __init__(self, store, state_dir, config, member):
        super().__init__(LeaderGate(store, self), state_dir, config)
        self.local = store
        self.member = member
        self.seen = {}                  # host -> {state, pending, count}: what this member sees
        self.views_changed = False      # the leader has views to weigh
        self.last_write = 0             # request id of our newest ledger write
        self.acked = 0                  # ... and of the newest etcd acknowledged

    @property
    def paused(self):
        return self.member.paused()

    def open(self, now):
        """Load the local copy: --status shows it until etcd's ledger arrives.  Only a
        leader, from etcd's ledger, decides what happened to runs that were running."""
        self.load(self.local.data)
        self.meta["paused"] = False

    def set_paused(self, paused):
        self.member.set_pause(paused)

    # -- what this member sees ---------------------------------------------------------

    def report(self, host, state, check, now):
        """confirm against this member's own view: a confirmed state changes the view."""
        self.reports[host] = {"time": now, "check": check.name, "state": state}
        self.store.soft("report:" + host, self.reports[host])   # the local db; a crash may lose it
        seen = self.seen.get(host) or {"state": "unknown", "pending": None, "count": 0}
        if state == seen["state"]:
            if seen["pending"] is not None:
                self.seen[host] = dict(seen, pending=None, count=0)
            return None
        seen = dict(seen)
        if seen["pending"] == state:
            seen["count"] += 1
        else:
            seen["pending"], seen["count"] = state, 1
        if seen["count"] < check.group.confirm:
            self.seen[host] = seen
            return None
        log.info("host %s: %s sees %s (by %s)", host, self.member.node, state, check.name)
        self.seen[host] = {"state": state, "pending": None, "count": 0}
        self.member.set_view({h: r["state"] for h, r in self.seen.items()})
        self.views_changed = True
        return None

    def agree(self, now):
        """The acting leader: every host that quorum live members see in a new state moves."""
        if not self.views_changed or not self.member.acting:
            return
        self.views_changed = False
        for host, state, voters in self.member.agreement(self.states()):
            self.accept(host, state, "cluster: %s" % ",".join(voters), now)

    # -- what etcd holds -----------------------------------------------------------------

    def mirrored(self, keys):
        """Mirror changes: into the local copy always; into memory unless we lead."""
        cap, changes = self.cap, {}
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
        if changes:
            self.local.commit(changes)
            if self.member.role != "leader":
                known = self.transitions[-1]["id"] if self.transitions else 0
                self.reload()
                if len(keys) < 100:     # an event, not a whole snapshot: say what the leader did
                    for tr in self.transitions:
                        if tr["id"] > known:
                            log.info("transition %s: %s -> %s (by %s; recorded by the leader)",
                                     tr["host"], tr["from"], tr["to"], tr.get("check"))

    def reload(self):
        """Memory becomes what etcd holds (our writes in flight are dropped)."""
        self.store.puts, self.store.deletes, self.store.size = {}, set(), 0
        cap, data = self.cap, {}
        for key, kv in self.member.mirror.items():
            entry = ledger_from_etcd(key, kv.get("value"), cap)
            if entry is not None:
                data[entry[0]] = entry[1]
        self.hosts, self.transitions, self.runs, self.queue = {}, collections.deque(), \
            collections.OrderedDict(), []
        self.load(data)
        self.meta["paused"] = False

    def take_over(self, now):
        """We lead now: the ledger as etcd holds it, with every earlier leader's writes;
        what was running under one of them is interrupted, never run again."""
        self.reload()
        for run in list(self.runs.values()):
            if run["state"] == "running":
                self.finish(run, "interrupted", "its leader (%s, epoch %s) lost the lead while it ran"
                            % (run.get("node", "?"), run.get("epoch", "?")), now)
        self.views_changed = True
        log.info("cluster %s: %s takes over the ledger: %d hosts, %d transitions, %d runs, %d queued",
                 self.member.settings.name, self.member.node, len(self.hosts), len(self.transitions),
                 len(self.runs), len(self.queue))

    def written(self, rid, result):
        if result == "ok":
            self.acked = max(self.acked, rid)

    def host_status(self, name):
        """The pending candidate is this member's own (the leader's record has none):
        /status, --status and /hosts/HOST alike."""
        entry = super().host_status(name)
        if entry is not None:
            seen = self.seen.get(name) or {}
            entry["pending"] = {"state": seen["pending"], "count": seen["count"]} \
                if seen.get("pending") else None
        return entry

    def new_run(self, tr, section, changes, now, rerun_of=None):
        """The run, with the variables it was expanded with: the member that runs it may
        be another leader, which expands the section of its own actions.conf with them."""
        run = super().new_run(tr, section, changes, now, rerun_of)
        run["variables"] = action_variables(tr["host"], tr["from"], tr["to"], self.states())
        return run


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

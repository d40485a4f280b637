"""Ledger stores: where the ledger's decisions are kept, and the local one.

The Ledger (ledger.py) decides; a store keeps what it decided.  One decision of
the rules is one Changes: one journal line in a LocalStore (a daemon alone, its
own state db), part of one txn guarded by the leader's key in an EtcdStore (a
cluster member, cluster_ledger.py; docs/cluster.md).  A LedgerStore answers:

  load(cap)           the ledger as stored, a Snapshot (at start)
  reread(cap)         the same, as the store holds it now; what was gathered and
                      not sent is dropped (a cluster member: what etcd holds)
  put(changes, cap)   keep a change set: at once (local), or in the txn being
                      gathered (etcd); never fails back to the rules
  put_report(h, r)    a host's last report (soft: a crash may lose it)
  flush()             send what is gathered: a ticket, None when nothing may be
                      written; durable(ticket) says when the store has it
  paused(), set_paused(flag)    the pause of actions
  paused_hosts(), set_hosts_paused(hosts, flag)   the pause of some hosts' actions
                      (SPEC §12: any member may write it, as the pause)
  publish_view(view)  a shared store only: what this member sees

``shared`` is the one mode bit of the rules: True when other members read this
ledger (docs/cluster.md: each member confirms for itself, the leader accepts).

Uses: records.
"""

import typing

from .records import Run, Transition


class Changes:
    """One change set of the rules; the store lays out its keys."""

    __slots__ = ("hosts", "transitions", "runs", "queue", "meta", "switchover")

    def __init__(self, hosts=None, runs=None, queue=None, meta=None, switchover=None):
        self.hosts = hosts or {}        # host -> its record {state, since, pending, count}
        self.transitions = []           # Transitions
        self.runs = runs or {}          # run id -> Run
        self.queue = queue              # the whole queue (run ids), when it changed
        self.meta = meta                # {"next_transition", "next_run"}, when they changed
        self.switchover = switchover    # the switchover book (switchover.py), when it changed

    def __bool__(self):
        return bool(self.hosts or self.transitions or self.runs) or \
            self.queue is not None or self.meta is not None or self.switchover is not None


def _by_id(data, prefix, record):
    """The ``record``s (Transition, Run) of the keys PREFIXn in ``data``, by id (the
    values were checked where they were read: Store.load, ledger_from_etcd)."""
    return sorted((record.from_json(v) for k, v in data.items() if k.startswith(prefix)),
                  key=lambda r: r.id)


class Snapshot(typing.NamedTuple):
    """The ledger as a store holds it: every transition and run it has, oldest first."""
    meta: dict                  # next_transition, next_run
    hosts: dict
    reports: dict
    transitions: list          # Transitions
    runs: list                 # Runs
    queue: list
    switchover: dict           # the switchover book (switchover.py): scheduled, expected, seen

    @classmethod
    def from_db(cls, data):
        """From the state db's key -> value ``data`` (the local db, or etcd's as its keys)."""
        meta = dict(data.get("meta") or {})
        meta.pop("paused", None)
        # One key per host (report:HOST); an older db has them all in one key, ``reports``.
        reports = dict(data.get("reports") or {})
        reports.update((k[7:], v) for k, v in data.items() if k.startswith("report:"))
        return cls(meta=meta,
                   hosts={k[5:]: v for k, v in data.items() if k.startswith("host:") and isinstance(v, dict)},
                   reports=reports, transitions=_by_id(data, "tr:", Transition), runs=_by_id(data, "run:", Run),
                   queue=list(data.get("queue") or []),
                   switchover=dict(data.get("switchover") or {}))


class LedgerStore:
    """Where the ledger is kept; see the comment above."""

    shared = False

    def publish_view(self, view):
        raise AssertionError("only a shared ledger publishes a view")


def db_changes(changes, cap):
    """A Changes as the state db's keys: host:H, tr:N, run:N (N = id % cap), queue, meta."""
    out = {"host:" + host: record for host, record in changes.hosts.items()}
    for tr in changes.transitions:
        out["tr:%d" % (tr.id % cap)] = tr.to_json()
    for run_id, run in changes.runs.items():
        out["run:%d" % (run_id % cap)] = run.to_json()
    if changes.queue is not None:
        out["queue"] = changes.queue
    if changes.switchover is not None:
        out["switchover"] = changes.switchover
    return out


class LocalStore(LedgerStore):
    """The ledger in this daemon's own state db (a Store): every put is one journal
    line, durable before it returns."""

    def __init__(self, store, data=None):
        self.store = store              # None: a read-only copy of ``data`` (offline --status)
        self._data = data

    @classmethod
    def of_data(cls, data):
        return cls(None, data)

    @property
    def data(self):
        return self.store.data if self.store is not None else self._data

    def load(self, cap=None):
        snapshot = Snapshot.from_db(self.data)
        if self.store is not None and self.data.get("reports"):
            for host, report in snapshot.reports.items():   # one key per host from now on
                self.store.soft("report:" + host, report)
            self.store.soft("reports", {})
        return snapshot

    def reread(self, cap=None):
        return Snapshot.from_db(self.data)

    def put(self, changes, cap):
        out = db_changes(changes, cap)
        if changes.meta is not None:
            out["meta"] = dict(changes.meta, paused=self.paused())
        self.store.commit(out)

    def put_report(self, host, report):
        self.store.soft("report:" + host, report)

    def flush(self):
        return 0

    def durable(self, ticket):
        return True

    def paused(self):
        return bool((self.data.get("meta") or {}).get("paused"))

    def set_paused(self, paused):
        self.store.commit({"meta": dict(self.data.get("meta") or {}, paused=bool(paused))})
        return self.paused()

    def paused_hosts(self):
        return set(self.data.get("hostpause") or ())

    def set_hosts_paused(self, hosts, paused):
        now = self.paused_hosts()
        now = now | set(hosts) if paused else now - set(hosts)
        self.store.commit({"hostpause": sorted(now)})
        return now

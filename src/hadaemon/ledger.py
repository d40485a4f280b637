"""Ledger: host states, transitions, action runs and their queue (docs/configuration.md).

What the daemon has decided, and the rules that decide it: a report goes in,
transitions and action runs come out.  Every change is committed to the Store
before anything acts on it.  The ledger knows nothing of sockets, processes or
the clock: every time is handed in (wall-clock seconds), so a test can drive it
with no process started.

  report()      the pending candidate and its confirm count; a confirmed
                state goes to accept()
  accept()      the transition FROM_to_TO and the run of its section (actions.conf): queued,
                or skipped (paused), or failed (an empty variable)
  head(), dequeue(), command_started(), command_ended(), finish()
                a run's life: queued -> running -> ok | failed | interrupted

This is the local backend: one daemon decides alone and keeps the ledger in its
own state db.  A cluster (docs/cluster.md) keeps the same verbs with a ledger that the
leader alone writes elsewhere.

Uses: base, children.
"""

import collections
import logging
import os

from .base import OUTPUT_CAP, log
from .children import StateVariables, plan_run


# An action run: queued -> running -> ok | failed | interrupted, or skipped / failed
# without running (paused, an empty variable).
RUN_EDGES = {
    None: {"queued", "skipped", "failed"},
    "queued": {"running", "skipped", "failed"},
    "running": {"ok", "failed", "interrupted"},
}
RUN_FINAL = {"ok", "failed", "interrupted", "skipped"}
NEW_HOST = {"state": "unknown", "since": None, "pending": None, "count": 0}


def summarize_run(run):
    """A run as --status and --history show it (its environment left out)."""
    summary = {k: run.get(k) for k in ("id", "transition", "host", "from", "to", "section",
                                       "state", "reason", "queued", "started", "ended", "rerun_of")}
    summary["commands"] = [{"argv": c["argv"], "ignore": c["ignore"], "where": c.get("where"),
                            "started": c.get("started"), "result": c.get("result")}
                           for c in run.get("commands", [])]
    if "node" in run:                   # a cluster's run: the member and epoch that ran it
        summary["node"], summary["epoch"] = run["node"], run.get("epoch")
    return summary


def history_entries(transitions, runs, n):
    """The ``n`` newest transitions, newest first, each with its run and that run's
    reruns, oldest first (--history)."""
    reruns = collections.defaultdict(list)
    for run in runs.values():
        if run.get("rerun_of") is not None:
            reruns[run.get("transition")].append(summarize_run(run))
    out = []
    for tr in transitions[-n:][::-1] if n > 0 else []:
        run = runs.get(tr.get("run")) if tr.get("run") is not None else None
        out.append(dict(tr, run=summarize_run(run) if run else None,
                        reruns=reruns.get(tr["id"], []) if run else []))
    return out


def _by_id(data, prefix):
    return sorted((v for k, v in data.items() if k.startswith(prefix) and isinstance(v, dict)),
                  key=lambda r: r.get("id", 0))


class Ledger:
    """Host states, transitions, action runs and the queue, kept in the Store."""

    def __init__(self, store, state_dir, config=None):
        self.store = store
        self.state_dir = state_dir
        self.config = config
        self.meta = {"next_transition": 1, "next_run": 1, "paused": False}
        self.hosts = {}                 # host -> {state, since, pending, count}
        self.reports = {}               # host -> its last report {time, check, state} (soft)
        self.by_state = collections.defaultdict(set)    # state -> hosts in it
        self.transitions = collections.deque()
        self.runs = collections.OrderedDict()   # id -> run, oldest first
        self.queue = []                 # run ids waiting, in order
        # Since this process started, for metrics: (host, from, to) and (section, result).
        self.transition_counts = collections.Counter()
        self.run_counts = collections.Counter()

    @property
    def cap(self):
        """History kept: transitions and runs (None: all there is, when reading)."""
        return self.config.daemon.history if self.config is not None else None

    @property
    def paused(self):
        return bool(self.meta.get("paused"))

    def load(self, data):
        """Take the ledger from the state db's key -> value ``data``."""
        self.meta.update(data.get("meta") or {})
        self.hosts = {k[5:]: v for k, v in data.items() if k.startswith("host:") and isinstance(v, dict)}
        self.by_state.clear()
        for host, record in self.hosts.items():
            self.by_state[record["state"]].add(host)
        # One key per host (report:HOST); an older db has them all in one key, ``reports``.
        self.reports = dict(data.get("reports") or {})
        self.reports.update((k[7:], v) for k, v in data.items() if k.startswith("report:"))
        cap = self.cap
        self.transitions = collections.deque(_by_id(data, "tr:")[-cap if cap else 0:], maxlen=cap)
        self.runs = collections.OrderedDict((r["id"], r) for r in _by_id(data, "run:")[-cap if cap else 0:])
        self.queue = [rid for rid in data.get("queue") or [] if rid in self.runs]

    def open(self, now):
        """Load the opened store: a run that was running when the daemon died is interrupted."""
        self.load(self.store.data)
        changes = {}
        for run in self.runs.values():
            if run.get("state") == "running":
                self._set_run_state(run, "interrupted", "the daemon died while it ran", changes, now)
                self.queue = [rid for rid in self.queue if rid != run["id"]]
                changes["queue"] = self.queue
        if changes:
            self.store.commit(changes)
        if self.store.data.get("reports"):
            for host, report in self.reports.items():   # one key per host from now on
                self.store.soft("report:" + host, report)
            self.store.soft("reports", {})
        if self.paused:
            log.warning("actions are paused (hadaemon --resume to run them again)")
        if self.queue:
            log.info("%d queued action runs from before the restart", len(self.queue))

    def set_paused(self, paused):
        self.meta["paused"] = bool(paused)
        self.store.commit({"meta": self.meta})

    def state_of(self, host):
        return self.hosts.get(host, NEW_HOST)["state"]

    def states(self):
        return {host: record["state"] for host, record in self.hosts.items()}

    # -- reports, candidates, transitions (docs/configuration.md: states) ---------

    def report(self, host, state, check, now):
        """One report of ``state`` for ``host`` by ``check``; the transition it makes, or None."""
        record = self.hosts.get(host, NEW_HOST)
        self.reports[host] = {"time": now, "check": check.name, "state": state}
        self.store.soft("report:" + host, self.reports[host])   # a crash may lose it
        if state == record["state"]:
            if record["pending"] is not None:
                log.info("host %s: %s again; candidate %s dropped", host, state, record["pending"])
                self._put_host(host, dict(record, pending=None, count=0))
            return None
        record = dict(record)
        if record["pending"] == state:
            record["count"] += 1
        else:
            record["pending"], record["count"] = state, 1
        confirm = check.group.confirm
        if record["count"] < confirm:
            log.info("host %s: reported %s by %s (%d/%d)", host, state, check.name,
                     record["count"], confirm)
            self._put_host(host, record)
            return None
        return self.accept(host, state, check.name, now)

    def _put_host(self, host, record):
        self.hosts[host] = record
        self.store.commit({"host:" + host: record})

    def accept(self, host, state, by, now):
        """``host`` moves to ``state``: record the transition and its section's run."""
        record = dict(self.hosts.get(host, NEW_HOST))
        old = record["state"]
        record.update(state=state, since=now, pending=None, count=0)
        self.hosts[host] = record
        self.by_state[old].discard(host)
        self.by_state[state].add(host)
        cap = self.cap
        tr_id = self.meta["next_transition"]
        self.meta["next_transition"] = tr_id + 1
        tr = {"id": tr_id, "time": now, "host": host, "from": old, "to": state,
              "check": by, "run": None}
        changes = {"host:" + host: record, "meta": self.meta}
        section = self.config.section_for(host, old, state)
        if section is not None:
            tr["run"] = self.new_run(tr, section, changes, now)["id"]
        self.transitions.append(tr)
        while len(self.transitions) > cap:
            self.transitions.popleft()
        changes["tr:%d" % (tr_id % cap)] = tr
        self.store.commit(changes)
        self.transition_counts[(host, old, state)] += 1
        log.info("transition %s: %s -> %s (by %s)%s", host, old, state, by,
                 "; runs [%s] as run %d" % (section.name, tr["run"]) if section else
                 "; no action section matches")
        return tr

    # -- action runs and their queue (docs/configuration.md: actions.conf) -------

    def new_run(self, tr, section, changes, now, rerun_of=None):
        """The run of ``section`` for transition ``tr``: queued, or skipped / failed at once."""
        cap = self.cap
        run_id = self.meta["next_run"]
        self.meta["next_run"] = run_id + 1
        plan = plan_run(section, tr["host"], tr["from"], tr["to"], None, self.config.config_dir,
                        self.state_dir, StateVariables(tr["host"], tr["from"], tr["to"], self.by_state))
        run = {"id": run_id, "transition": tr["id"], "host": tr["host"], "from": tr["from"],
               "to": tr["to"], "section": section.name, "state": None, "reason": None,
               "queued": now, "started": None, "ended": None,
               "env": dict(plan.env, HA_RUN_ID=str(run_id)), "commands": plan.commands}
        if rerun_of is not None:
            run["rerun_of"] = rerun_of
        if plan.error:
            self._set_run_state(run, "failed", plan.error, changes, now)
        else:
            if self.paused:
                self._set_run_state(run, "skipped", "paused", changes, now)
            else:
                self._set_run_state(run, "queued", None, changes, now)
                self.queue.append(run_id)
                changes["queue"] = self.queue
        self.runs[run_id] = run
        while len(self.runs) > cap:
            self.runs.popitem(last=False)
        return run

    def rerun(self, run_id, now):
        """--rerun: the section of ended run ``run_id`` (by its name, in the current
        config) again, for its host, FROM and TO, expanded against the states of now;
        a new run with ``rerun_of``, through the queue like any (or skipped, paused).

        ValueError says why not: an unknown id, a run still queued or running, a
        section no longer in the config.
        """
        old = self.runs.get(run_id)
        if old is None:
            raise ValueError("no run #%s in the history (its last %d runs)" % (run_id, self.cap))
        if old["state"] not in RUN_FINAL:
            raise ValueError("run #%d is %s; only an ended run can be re-run"
                             % (run_id, old["state"]))
        section = self.config.section_named(old["section"])
        if section is None:
            raise ValueError("section [%s] of run #%d is no longer in %s" % (
                old["section"], run_id, os.path.join(self.config.config_dir, "actions.conf")))
        tr = {"id": old["transition"], "host": old["host"], "from": old["from"], "to": old["to"]}
        changes = {"meta": self.meta}
        run = self.new_run(tr, section, changes, now, rerun_of=run_id)
        self.store.commit(changes)
        log.info("run %d: rerun of #%d [%s] for %s %s_to_%s, by request: %s", run["id"], run_id,
                 section.name, run["host"], run["from"], run["to"], run["state"])
        return run

    def _set_run_state(self, run, state, reason, changes, now):
        """Every run state change passes here: checks the edge, logs, records in ``changes``."""
        if state not in RUN_EDGES.get(run["state"], ()):
            raise AssertionError("run %s: %s -> %s" % (run["id"], run["state"], state))
        run["state"] = state
        if reason:
            run["reason"] = reason
        if state == "running":
            run["started"] = now
        if state in RUN_FINAL:
            run["ended"] = now
            self.run_counts[(run["section"], state)] += 1
        if state != "queued":
            level = logging.ERROR if state in ("failed", "interrupted") else logging.INFO
            log.log(level, "run %d [%s] for %s %s_to_%s: %s%s", run["id"], run["section"],
                    run["host"], run["from"], run["to"], state, (" (%s)" % reason) if reason else "")
        changes[self._run_key(run)] = run

    def _run_key(self, run):
        return "run:%d" % (run["id"] % self.cap)

    def head(self):
        """The run first in the queue, or None (ids of runs gone from history are dropped)."""
        while self.queue:
            run = self.runs.get(self.queue[0])
            if run is not None:
                return run
            self.queue.pop(0)
            self.store.commit({"queue": self.queue})
        return None

    def dequeue(self, run, state, reason, now):
        """The head of the queue leaves it: ``running``, or ``skipped`` / ``failed`` unrun."""
        assert self.queue and self.queue[0] == run["id"], "run %s is not first" % run["id"]
        self.queue.pop(0)
        changes = {"queue": self.queue}
        self._set_run_state(run, state, reason, changes, now)
        self.store.commit(changes)

    def command_started(self, run, index, when):
        cmd = run["commands"][index]
        cmd["started"] = when
        log.info("run %d: command %d/%d: %s", run["id"], index + 1, len(run["commands"]),
                 _command_words(cmd))
        self.store.commit({self._run_key(run): run})

    def command_ended(self, run, index, msg):
        """Record a command's end, as its action run reported it in ``msg``."""
        cmd = run["commands"][index]
        output = msg.get("output") if isinstance(msg.get("output"), str) else ""
        cmd["result"] = {"exit": msg.get("exit"), "signal": msg.get("signal"),
                         "error": msg.get("error"), "duration": msg.get("duration"),
                         "output": output[:OUTPUT_CAP], "truncated": bool(msg.get("truncated"))}
        level = logging.WARNING if msg.get("error") else logging.INFO
        log.log(level, "run %d: command %d/%d %s: %s in %.3fs%s", run["id"], index + 1,
                len(run["commands"]), _command_words(cmd), msg.get("error") or "exit %s" % msg.get("exit"),
                msg.get("duration") or 0, " (failure ignored)" if msg.get("error") and cmd["ignore"] else "")
        for line in output.splitlines()[:20]:
            log.info("run %d:   | %s", run["id"], line)
        self.store.commit({self._run_key(run): run})

    def finish(self, run, state, reason, now):
        """A running run ends: ``ok``, ``failed`` or ``interrupted``."""
        changes = {}
        self._set_run_state(run, state, reason, changes, now)
        self.store.commit(changes)

    # -- what it reports about itself --------------------------------------------

    def status(self, last=20):
        """hosts, transitions and runs of the --status --json document."""
        return dict(self.recent(last), hosts=dict(self.host_entries()))

    def recent(self, last=20):
        """The last transitions and runs, newest first."""
        transitions = list(self.transitions)[-last:][::-1]
        runs = [summarize_run(r) for r in list(self.runs.values())[-last:]][::-1]
        return {"transitions": transitions, "runs": runs}

    def host_entries(self):
        """(host, what --status --json says of it), by name, made one by one as they are read."""
        for name in sorted(self.hosts):
            yield name, self.host_status(name)

    def host_status(self, name):
        """One host as the document's ``hosts`` shows it; None for a host never seen."""
        record = self.hosts.get(name)
        if record is None:
            return None
        pending = None
        if record.get("pending"):
            pending = {"state": record["pending"], "count": record.get("count", 0)}
        return {"state": record.get("state"), "since": record.get("since"),
                "pending": pending, "last_report": self.reports.get(name)}

    def daemon_status(self):
        """What the daemon block of --status says of actions."""
        return {"paused": self.paused, "queue": list(self.queue)}

    def counters(self):
        """Transitions and ended runs since this process started (Prometheus' counters)."""
        return {"transitions": [{"host": h, "from": f, "to": t, "count": n}
                                for (h, f, t), n in sorted(self.transition_counts.items())],
                "action_runs": [{"section": sec, "result": result, "count": n}
                                for (sec, result), n in sorted(self.run_counts.items())]}

    def history(self, n):
        return history_entries(list(self.transitions), self.runs, n)


def _command_words(cmd):
    return " ".join([os.path.basename(cmd["argv"][0])] + cmd["argv"][1:])

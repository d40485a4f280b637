"""Ledger: host states, transitions, action runs and their queue (docs/configuration.md).

What the daemon has decided, and the rules that decide it: a report goes in,
transitions and action runs come out.  The rules exist once, for a daemon alone
and for a cluster member alike; only where the ledger is kept differs (a
LedgerStore, ledger_store.py: the daemon's own state db, or etcd written by the
cluster's leader alone, docs/cluster.md).  Every change goes to the store before
anything acts on it.  The ledger knows nothing of sockets, processes or the
clock: every time is handed in (wall-clock seconds), so a test can drive it with
no process started.

  report()      the pending candidate and its confirm count (confirm_step); a
                confirmed state goes to accept() -- or, in a cluster, into this
                member's view, and the leader accepts what quorum sees (agree())
  accept()      the transition FROM_to_TO and the run of its section (actions.conf): queued,
                or skipped (paused), or failed (an empty variable)
  head(), dequeue(), commands_for(), start(), command_started(), command_ended(), finish()
                a run's life: queued -> running -> ok | failed | interrupted
  open(), reread(), interrupt_running()
                the ledger as the store holds it; what was running when its
                runner died (or its leader lost the lead) is interrupted

Every transition and every run's change of state (but ``queued``) is told to
``notify`` (notify.py's ``event``, set by the master; nothing by default), after
the change it tells of.

``shared`` (the store's) is read where a cluster genuinely differs: whose
candidate a report moves (this member's own view), who accepts a confirmed
state (the leader, from quorum's views), and a run recording its variables (so
another member can expand its own section).

Uses: base, records, children, ledger_store, switchover.
"""

import collections
import logging
import os

from .base import log
from .records import CommandResult, Run, RunCommand, Transition
from .children import StateVariables, action_variables, expand_commands, plan_run
from .ledger_store import Changes, LedgerStore, LocalStore
from .switchover import (
    cannot_start, expected, run_moved, scheduled_view, switchover_commands, switchover_run,
)


# An action run: queued -> running -> ok | failed | interrupted, or skipped / failed
# without running (paused, an empty variable).
RUN_EDGES = {
    None: {"queued", "skipped", "failed"},
    "queued": {"running", "skipped", "failed"},
    "running": {"ok", "failed", "interrupted"},
}
RUN_FINAL = {"ok", "failed", "interrupted", "skipped"}
NEW_HOST = {"state": "unknown", "since": None, "pending": None, "count": 0}
DAMPING_KEYS = ("pending", "count", "window", "recent")   # confirm_step's part of a host record


def summarize_run(run):
    """A run (a Run, or its JSON as the state db holds it) as --status and --history
    show it: Run.summary()."""
    return (run if isinstance(run, Run) else Run.from_json(run, check=False)).summary()


def history_entries(transitions, runs, n):
    """The ``n`` newest transitions and switchovers, newest first, each transition with its
    run and that run's reruns, oldest first (--history).  Records, or their JSON as the state db holds it."""
    transitions = [tr if isinstance(tr, Transition) else Transition.from_json(tr) for tr in transitions]
    runs = {rid: run if isinstance(run, Run) else Run.from_json(run) for rid, run in runs.items()}
    reruns = collections.defaultdict(list)
    for run in runs.values():
        if run.rerun_of is not None:
            reruns[run.transition].append(run.summary())
    # A switchover's run is an entry of its own (SPEC §12), in time order with the rest.
    entries = [(tr.time or 0, 0, tr.id, tr) for tr in transitions] + \
        [(run.queued or 0, 1, run.id, run) for run in runs.values() if run.switchover]
    out = []
    for _, kind, _, item in sorted(entries, key=lambda e: e[:3])[-n:][::-1] if n > 0 else []:
        if kind == 1:
            out.append({"id": None, "time": item.queued, "host": item.host, "from": item.frm,
                        "to": item.to, "check": None, "run": item.summary(), "reruns": [],
                        "switchover": {"from": item.frm, "to": item.to}})
            continue
        run = runs.get(item.run) if item.run is not None else None
        out.append(dict(item.to_json(), run=run.summary() if run else None,
                        reruns=reruns.get(item.id, []) if run else []))
    return out


def no_event(kind, **keys):
    """Where events go when no one listens (a Ledger's ``notify`` until the master sets it)."""


def transition_event(tr):
    """The keys of a ``transition`` event (docs/notify.md) from a Transition."""
    doc = tr.to_json()
    return {"host": doc["host"], "from": doc["from"], "to": doc["to"], "check": doc["check"],
            "id": doc["id"], "run": doc["run"], "switchover": doc.get("switchover")}


def confirm_step(cand, state, confirm, window=None):
    """docs/configuration.md's confirm, ``confirm = N of M`` (``confirm`` N, ``window`` M;
    None: N of N, reports in a row), one report of ``state`` on a candidate record:
    (the record after it, what happened).

    The record is {state, pending, count}, and while a candidate is pending its
    ``window`` (M), and ``recent``: the last M reports, oldest first, each None that
    can no longer count (cut from the front), kept only when it is not ``count``
    times ``pending`` (N of N never needs it).  The host moves to ``state`` when it
    is not its state and at least N of the last M reports (this one included) said
    it.  What happened: "same" (nothing changed), "moved" (only ``recent`` did),
    "dropped" (its own state again: no candidate left), "counted" (not confirmed
    yet) or "confirmed" (the record is in ``state``, maybe with a new candidate)."""
    n, m = confirm, window or confirm
    recent = cand.get("recent")
    if state == cand["state"] and cand["pending"] is None:
        # The usual report, on a window that holds nothing but the state (N of M: the
        # newest M - 1 reports, as the oldest can no longer count) or nothing (N of N).
        steady = recent is None if m == n else recent == [state] * (m - 1)
        if steady:
            return cand, "same"
    if recent is None:
        recent = [cand["pending"]] * cand["count"] if cand["pending"] is not None else []
    last = (recent + [state])[-m:]
    now = cand["state"]
    confirmed = state != now and last.count(state) >= n
    if confirmed:
        now = state
    last = _still_counting(last, now, n, m)
    pending = next((word for word in reversed(last) if word is not None and word != now), None)
    new = {key: value for key, value in cand.items() if key not in ("window", "recent")}
    new.update(state=now, pending=pending, count=last.count(pending) if pending else 0)
    if pending is not None:
        new["window"] = m
    if last != [pending] * new["count"]:
        new["recent"] = last
    if confirmed:
        return new, "confirmed"
    if state != now:
        return new, "counted"
    if pending is None and cand["pending"] is not None:
        return new, "dropped"
    return new, "same" if new == cand else "moved"


def _still_counting(last, state, n, m):
    """``last`` (the last ``m`` reports, oldest first) with None for each report that can
    no longer count toward an ``n`` of ``m``, leading Nones cut.  A report ``age``
    reports old stays in the window ``m - 1 - age`` more reports; its word W can reach
    ``n`` in that time only if W's count among the newest ``age + 1`` plus those
    reports does.  A report of the host's own ``state`` counts only toward a return
    to it, which N of N can never make while the report is in its window."""
    out, seen = [], collections.Counter()
    for age, word in enumerate(reversed(last)):
        seen[word] += 1
        counts = word is not None and age <= m - 2 and seen[word] + m - 1 - age >= n \
            and (word != state or n < m)
        out.append(word if counts else None)
    while out and out[-1] is None:
        out.pop()
    return out[::-1]


def pending_among(ledger, reports):
    """Whether one of ``reports`` ((host, state) pairs, applied to ``ledger``) left its
    state the host's pending candidate (a member's own, in a cluster): what ``recheck``
    follows."""
    candidates = ledger.seen if ledger.shared else ledger.hosts
    return any(candidates.get(host, NEW_HOST)["pending"] == state for host, state in reports)


def change_nothing(ledger, group, reports):
    """Whether ``reports`` ((host, state) pairs) of a check of ``group``, applied to
    ``ledger`` now, would each change nothing (confirm_step's "same"): a worker may then
    hold back a run that says them again, a while (checkflow.py)."""
    candidates = ledger.seen if ledger.shared else ledger.hosts
    return all(confirm_step(candidates.get(host, NEW_HOST), state, group.confirm, group.window)[1] == "same"
               for host, state in reports)


class Ledger:
    """Host states, transitions, action runs and the queue, kept in a LedgerStore."""

    def __init__(self, store, state_dir, config=None):
        # A Store (the state db) is this daemon's own: a LocalStore over it.
        self.store = store if isinstance(store, LedgerStore) else LocalStore(store)
        self.shared = self.store.shared
        self.state_dir = state_dir
        self.config = config
        self.meta = {"next_transition": 1, "next_run": 1}
        self.hosts = {}                 # host -> {state, since, pending, count}, as accepted
        self.seen = {}                  # shared: host -> {state, pending, count}, this member's own
        self.view = {}                  # shared: host -> the state this member confirmed
        self.reports = {}               # host -> its last report {time, check, state} (soft)
        self.by_state = collections.defaultdict(set)    # state -> hosts in it
        self.transitions = collections.deque()    # Transitions, oldest first
        self.runs = collections.OrderedDict()   # id -> Run, oldest first
        self.queue = []                 # run ids waiting, in order
        self.book = {}                  # switchovers: scheduled, expected, seen (switchover.py)
        # Since this process started, for metrics: (host, from, to) and (section, result).
        self.transition_counts = collections.Counter()
        self.run_counts = collections.Counter()
        self.notify = no_event          # notify.py's event(kind, **keys), set by the master

    @property
    def cap(self):
        """History kept: transitions and runs (None: all there is, when reading)."""
        return self.config.daemon.history if self.config is not None else None

    @property
    def paused(self):
        return self.store.paused()

    def take(self, snapshot):
        """The ledger becomes ``snapshot`` (a store's), its history capped."""
        self.meta.update(snapshot.meta)
        self.hosts = snapshot.hosts
        self.by_state.clear()
        for host, record in self.hosts.items():
            self.by_state[record["state"]].add(host)
        self.reports = snapshot.reports
        cap = self.cap
        self.transitions = collections.deque(snapshot.transitions[-cap if cap else 0:], maxlen=cap)
        self.runs = collections.OrderedDict((r.id, r) for r in snapshot.runs[-cap if cap else 0:])
        self.queue = [rid for rid in snapshot.queue if rid in self.runs]
        self.book = dict(snapshot.switchover)

    def open(self, now, acting=True):
        """Load the ledger as stored.  Acting (a daemon alone; not a cluster member at
        its start, which waits for etcd's ledger): a run that was running when the
        daemon died is interrupted."""
        self.take(self.store.load(self.cap))
        if not acting:
            return
        self.interrupt_running(lambda run: "the daemon died while it ran", now)
        if self.paused:
            log.warning("actions are paused (hadaemon --resume to run them again)")
        if self.queue:
            log.info("%d queued action runs from before the restart", len(self.queue))

    def reread(self, log_new=False):
        """Memory becomes what the store holds (a cluster: etcd; writes gathered and not
        sent are dropped); ``log_new``: say which transitions are new (the leader's)."""
        known = self.transitions[-1].id if self.transitions else 0
        reports = self.reports          # this member's own, in no other store's ledger
        self.take(self.store.reread(self.cap))
        self.reports = reports
        if log_new:
            for tr in self.transitions:
                if tr.id > known:
                    log.info("transition %s: %s -> %s (by %s; recorded by the leader)",
                             tr.host, tr.frm, tr.to, tr.check)

    def interrupt_running(self, reason_of, now):
        """Every run still running is interrupted, ``reason_of(run)`` saying why."""
        changes = Changes()
        for run in list(self.runs.values()):
            if run.state == "running":
                self._set_run_state(run, "interrupted", reason_of(run), changes, now)
                self.queue = [rid for rid in self.queue if rid != run.id]
                changes.queue = self.queue
        if changes:
            self._put(changes)

    def set_paused(self, paused):
        """Pause or resume actions: the paused state to answer (a cluster: the one asked,
        once etcd has it)."""
        return self.store.set_paused(paused)

    def _put(self, changes):
        self.store.put(changes, self.cap)

    def state_of(self, host):
        return self.hosts.get(host, NEW_HOST)["state"]

    def states(self):
        return {host: record["state"] for host, record in self.hosts.items()}

    # -- reports, candidates, transitions (docs/configuration.md: states) ---------

    def report(self, host, state, check, now, attributes=None):
        """One report of ``state`` for ``host`` by ``check`` (``attributes``: the other keys it
        printed); the transition it makes, or None (always None in a cluster: a member's
        confirm moves its view, the leader accepts)."""
        self.reports[host] = report = {"time": now, "check": check.name, "state": state}
        if attributes:
            report["attributes"] = attributes       # docs/http.md: load-balancer conditions
        self.store.put_report(host, report)         # a crash may lose it
        cand = (self.seen if self.shared else self.hosts).get(host, NEW_HOST)
        confirm, window = check.group.confirm, check.group.window
        new, what = confirm_step(cand, state, confirm, window)
        if what == "same":
            return None                             # the usual report: nothing new
        if what == "dropped":
            log.info("host %s: %s again; candidate %s dropped", host, state, cand["pending"])
        elif what == "counted" and window == confirm:
            log.info("host %s: reported %s by %s (%d/%d)", host, state, check.name, new["count"], confirm)
        elif what == "counted":
            log.info("host %s: reported %s by %s (%d of the last %d; %d needed)", host, state,
                     check.name, new["count"], window, confirm)
        if self.shared:                             # docs/cluster.md: after this member's own confirm
            self.seen[host] = new
            if what == "confirmed":
                # Confirmed states only: a host with only a candidate is not "unknown" to it.
                log.info("host %s: %s sees %s (by %s)", host, self.store.node, state, check.name)
                self.view[host] = state
                self.store.publish_view(self.view)
            return None
        if what == "confirmed":
            return self.accept(host, state, check.name, now, new)
        self.hosts[host] = new                      # the candidate survives a restart
        self._put(Changes(hosts={host: new}))
        return None

    def agree(self, moves, now):
        """The cluster's leader: each (host, state, voters) that quorum sees moves."""
        for host, state, voters in moves:
            self.accept(host, state, "cluster: %s" % ",".join(voters), now)

    def accept(self, host, state, by, now, cand=None):
        """``host`` moves to ``state``: record the transition and its section's run.
        ``cand``: confirm_step's record that confirmed it (its window goes on)."""
        record = dict(self.hosts.get(host, NEW_HOST))
        old = record["state"]
        record.pop("window", None)
        record.pop("recent", None)
        record.update(state=state, since=now, pending=None, count=0)
        if cand is not None:
            record.update((key, cand[key]) for key in DAMPING_KEYS if key in cand)
        self.hosts[host] = record
        self.by_state[old].discard(host)
        self.by_state[state].add(host)
        cap = self.cap
        tr_id = self.meta["next_transition"]
        self.meta["next_transition"] = tr_id + 1
        changes = Changes(hosts={host: record}, meta=self.meta)
        section = self.config.section_for(host, old, state)
        expecting = expected(self.book, host, old, state, self.config.daemon.switchover_role, now)
        if expecting is not None:       # a switchover's own transition: no section runs
            section, changes.switchover = None, self.book
        run, run_id = None, (self.meta["next_run"] if section is not None else None)
        # Logged before its run is made: a run skipped (paused) or failed at once logs after it.
        log.info("transition %s: %s -> %s (by %s)%s", host, old, state, by,
                 "; runs [%s] as run %d" % (section.name, run_id) if section else
                 "; expected by switchover run %d: no section runs" % expecting
                 if expecting is not None else "; no action section matches")
        if section is not None:         # the run first: the Transition names it
            run = self.new_run(tr_id, host, old, state, section, changes, now)
        run_id = run.id if run is not None else None
        tr = Transition(tr_id, now, host, old, state, by, run_id, expecting)
        self.transitions.append(tr)
        while len(self.transitions) > cap:
            self.transitions.popleft()
        changes.transitions.append(tr)
        self._put(changes)
        self.notify("transition", **transition_event(tr))
        if run is not None and run.state != "queued":
            self._run_event(run)        # skipped or failed at once: told after its transition
        self.transition_counts[(host, old, state)] += 1
        return tr

    # -- action runs and their queue (docs/configuration.md: actions.conf) -------

    def new_run(self, tr_id, host, frm, to, section, changes, now, rerun_of=None):
        """The run of ``section`` for transition ``tr_id`` (``host``: ``frm`` -> ``to``):
        queued, or skipped / failed at once."""
        run_id = self.meta["next_run"]
        self.meta["next_run"] = run_id + 1
        plan = plan_run(section, host, frm, to, None, self.config.config_dir,
                        self.state_dir, StateVariables(host, frm, to, self.by_state))
        run = Run(run_id, tr_id, host, frm, to, section.name, None, None, now, None, None,
                  dict(plan.env, HA_RUN_ID=str(run_id)), [RunCommand.from_json(c) for c in plan.commands],
                  rerun_of)
        if self.shared:
            # The member that runs it may be another leader: it expands the section of
            # its own actions.conf with these (commands_for).
            run.variables = action_variables(host, frm, to, self.states())
        if plan.error:
            self._set_run_state(run, "failed", plan.error, changes, now)
        else:
            why = cannot_start(self, run, now)
            self._set_run_state(run, why[0] if why else "queued", why and why[1], changes, now)
        return self._enter(run, changes)

    def _enter(self, run, changes):
        """A new run joins the runs (and the queue, when it is queued there)."""
        if run.state == "queued":
            self.queue.append(run.id)
            changes.queue = self.queue
        self.runs[run.id] = run
        while len(self.runs) > self.cap:
            self.runs.popitem(last=False)
        return run

    def queue_switchover(self, frm, to, request, reason, now):
        """The run of a switchover from host ``frm`` to ``to`` (SPEC §12), through the queue
        like any; failed at once, unrun, when ``reason`` (a refusal) holds."""
        run = switchover_run(self, self.meta["next_run"], frm, to, request, now)
        self.meta["next_run"] = run.id + 1
        changes = Changes(meta=self.meta)
        self._set_run_state(run, "failed" if reason else "queued", reason, changes, now)
        self._enter(run, changes)
        self._put(changes)
        return run

    def note_book(self, key, value):
        """switchover.py's book: ``scheduled`` (one, or None), ``seen`` (the request a leader took)."""
        self.book[key] = value
        self._put(Changes(switchover=self.book))

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
        if old.switchover:
            raise ValueError("run #%d is a switchover: ask for it again (hadaemon --switchover %s)"
                             % (run_id, old.to))
        if old.state not in RUN_FINAL:
            raise ValueError("run #%d is %s; only an ended run can be re-run"
                             % (run_id, old.state))
        section = self.config.section_named(old.section)
        if section is None:
            raise ValueError("section [%s] of run #%d is no longer in %s" % (
                old.section, run_id, os.path.join(self.config.config_dir, "actions.conf")))
        changes = Changes(meta=self.meta)
        run = self.new_run(old.transition, old.host, old.frm, old.to, section, changes, now,
                           rerun_of=run_id)
        self._put(changes)
        if run.state != "queued":
            self._run_event(run)
        log.info("run %d: rerun of #%d [%s] for %s %s_to_%s, by request: %s", run.id, run_id,
                 section.name, run.host, run.frm, run.to, run.state)
        return run

    def _set_run_state(self, run, state, reason, changes, now):
        """Every run state change passes here: checks the edge, logs, records in ``changes``."""
        if state not in RUN_EDGES.get(run.state, ()):
            raise AssertionError("run %s: %s -> %s" % (run.id, run.state, state))
        run.state = state
        if reason:
            run.reason = reason
        if state == "running":
            run.started = now
        if state in RUN_FINAL:
            run.ended = now
            self.run_counts[(run.section, state)] += 1
        if run.switchover:
            run_moved(self.book, run, state, now, self.config.daemon.switchover_settle)
            changes.switchover = self.book
        if state != "queued":
            level = logging.ERROR if state in ("failed", "interrupted") else logging.INFO
            log.log(level, "run %d [%s] for %s: %s%s", run.id, run.section, "%s -> %s" % (run.frm, run.to)
                    if run.switchover else "%s %s_to_%s" % (run.host, run.frm, run.to), state,
                    (" (%s)" % reason) if reason else "")
        changes.runs[run.id] = run
        if state != "queued" and run.id in self.runs:   # a new run's is told by its maker
            self._run_event(run)

    def _run_event(self, run):
        self.notify("run", run=run.id, section=run.section, host=run.host, result=run.state,
                    reason=run.reason)

    def head(self):
        """The run first in the queue, or None (ids of runs gone from history are dropped)."""
        while self.queue:
            run = self.runs.get(self.queue[0])
            if run is not None:
                return run
            self.queue.pop(0)
            self._put(Changes(queue=self.queue))
        return None

    def dequeue(self, run, state, reason, now, head=True):
        """The head of the queue leaves it: ``running``, or ``skipped`` / ``failed`` unrun
        (not ``head``: a run anywhere in it, cancelled: --switchover --cancel)."""
        assert run.id in self.queue[:1 if head else None], "run %s is not first" % run.id
        self.queue.remove(run.id)
        changes = Changes(queue=self.queue)
        self._set_run_state(run, state, reason, changes, now)
        self._put(changes)

    def commands_for(self, run, config):
        """The commands ``run`` starts with: as planned when it was queued; a run with
        ``variables`` (a cluster's) expands its section, found by its name as a rerun
        finds it (precedence chose it when it was queued), in this member's ``config``.
        ValueError says why it cannot start."""
        if run.switchover:
            return switchover_commands(self, run, config)
        if run.variables is None:
            return run.commands
        section = config.section_named(run.section)
        if section is None:
            raise ValueError("no section [%s] in this member's %s" % (
                run.section, os.path.join(config.config_dir, "actions.conf")))
        return [RunCommand.from_json(c) for c in expand_commands(section, run.variables)]

    def start(self, run, commands, stamp, config_dir, now):
        """The head of the queue starts with ``commands``; ``stamp`` (a cluster's leader:
        cluster, node, epoch) says who runs it, in the run and in its environment."""
        run.commands = commands
        if stamp is not None:
            cluster, node, epoch = stamp
            run.node, run.epoch = node, epoch
            run.env = dict(run.env, HA_CONFIG_DIR=config_dir, HA_STATE_DIR=self.state_dir,
                           HA_CLUSTER=cluster, HA_NODE=node, HA_LEADER_EPOCH=str(epoch))
        self.dequeue(run, "running", None, now)

    def command_started(self, run, index, when):
        cmd = run.commands[index]
        cmd.started = when
        log.info("run %d: command %d/%d: %s", run.id, index + 1, len(run.commands), _command_words(cmd))
        self._put(Changes(runs={run.id: run}))

    def command_ended(self, run, index, msg):
        """Record a command's end, as its action run reported it in ``msg``."""
        cmd = run.commands[index]
        cmd.result = result = CommandResult.from_event(msg)
        level = logging.WARNING if result.error else logging.INFO
        log.log(level, "run %d: command %d/%d %s: %s in %.3fs%s", run.id, index + 1,
                len(run.commands), _command_words(cmd), result.error or "exit %s" % result.exit,
                result.duration or 0, " (failure ignored)" if result.error and cmd.ignore else "")
        for line in (msg.get("output") if isinstance(msg.get("output"), str) else "").splitlines()[:20]:
            log.info("run %d:   | %s", run.id, line)
        self._put(Changes(runs={run.id: run}))

    def finish(self, run, state, reason, now):
        """A running run ends: ``ok``, ``failed`` or ``interrupted``."""
        changes = Changes()
        self._set_run_state(run, state, reason, changes, now)
        self._put(changes)

    # -- what it reports about itself --------------------------------------------

    def recent(self, last=20):
        """The last transitions and runs, newest first."""
        transitions = [tr.to_json() for tr in list(self.transitions)[-last:][::-1]]
        runs = [r.summary() for r in list(self.runs.values())[-last:]][::-1]
        return {"transitions": transitions, "runs": runs}

    def host_entries(self):
        """(host, its --status entry) by name, made as read but from the records as they are
        now, with the document's runs and queue: never a host moved with its run nowhere."""
        return ((name, self.host_status(name, record)) for name, record in sorted(self.hosts.items()))

    def host_status(self, name, record=None):
        """One host as --status shows it (``record``: as host_entries took it); None if never seen."""
        record = record or self.hosts.get(name)
        if record is None:
            return None
        cand = self.seen.get(name) if self.shared else record     # a member's candidate is its own
        pending = None
        if cand and cand.get("pending"):
            pending = {"state": cand["pending"], "count": cand.get("count", 0)}
            if cand.get("window") is not None:      # None: a record from before N of M
                pending["window"] = cand["window"]
        return {"state": record.get("state"), "since": record.get("since"),
                "pending": pending, "last_report": self.reports.get(name),
                "paused": name in self.store.paused_hosts()}

    def daemon_status(self):
        """What the daemon block of --status says of actions."""
        return {"paused": self.paused, "queue": list(self.queue),
                "switchover": scheduled_view(self.book), "paused_hosts": sorted(self.store.paused_hosts())}

    def counters(self):
        """Transitions and ended runs since this process started (Prometheus' counters)."""
        return {"transitions": [{"host": h, "from": f, "to": t, "count": n}
                                for (h, f, t), n in sorted(self.transition_counts.items())],
                "action_runs": [{"section": sec, "result": result, "count": n}
                                for (sec, result), n in sorted(self.run_counts.items())]}

    def history(self, n):
        return history_entries(list(self.transitions), self.runs, n)


def _command_words(cmd):
    return " ".join([os.path.basename(cmd.argv[0])] + cmd.argv[1:])

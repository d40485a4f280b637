"""Switchover: the planned move of a role from one host to another (SPEC §12).

Owns the rules of ``--switchover TO [--from FROM] [--at TIME]`` and of its answer,
for a daemon alone and a cluster member alike (the Ledger and its store keep what
they decide; nothing here knows whether that is the state db or etcd):

  refusal()         why a switchover cannot be now, in words that say what to fix;
                    checked when asked, when a scheduled one comes due, and again
                    when its run starts (a refusal then fails the run, unrun)
  cannot_start()    why a run may not start: that refusal, or a pause (global, or
                    of the run's host: --pause HOST)
  the book          what the ledger keeps of switchovers besides their runs, one
                    JSON value (``switchover`` in the state db, ledger/switchover in
                    etcd): ``scheduled`` {from, to, at, request, asked} or None,
                    ``expect`` {run, from, to, until, from_done, to_done} or None,
                    ``seen`` the last request a cluster's leader took
  expected()        whether a transition is one of the switchover's own (FROM's
                    first out of the role, TO's first into it, from the run's start
                    until ``switchover_settle`` after it ended ok): recorded, no
                    section runs
  SwitchoverDesk    the master's part: the control verbs (``switchover``,
                    ``hostpause``), and each pass of the loop, for the acting
                    daemon (alone, or the cluster's leader), the request a member
                    stored in etcd and a scheduled switchover that came due

A cluster's member answers from its copy of the ledger and stores the request in
etcd (``switchover`` under the cluster's prefix); the leader takes it from there.

The moments a notification will tell (SPEC §12: ``switchover`` events scheduled,
cancelled, missed) all pass through SwitchoverDesk.event().

Uses: base, records, children.
"""

import datetime
import os

from .base import format_duration, format_time, log, parse_duration, valid_name
from .records import Run, RunCommand
from .children import action_variables, expand_commands, plan_run

MISSED_AFTER = 60.0         # a scheduled switchover this late when a daemon first can act: dropped
REPORT_AGE = 3              # TO's last report may be this many of its check intervals old
CRON_INTERVAL = 60.0        # the interval a cron group counts as (a minute at most, as cron's)
ACTIVE_RUN = ("queued", "running")


def parse_at(text, now):
    """--at TIME as epoch seconds: ``HH:MM`` (the next such local time), ``YYYY-MM-DD HH:MM``
    (local time) or ``+DURATION``.  ValueError says what is wrong."""
    text = " ".join(str(text).split())
    if text.startswith("+"):
        return now + parse_duration(text[1:])
    base = datetime.datetime.fromtimestamp(now)
    for form in ("%H:%M", "%Y-%m-%d %H:%M"):
        try:
            when = datetime.datetime.strptime(text, form)
        except ValueError:
            continue
        if form == "%H:%M":
            when = base.replace(hour=when.hour, minute=when.minute, second=0, microsecond=0)
            if when.timestamp() <= now:
                when += datetime.timedelta(days=1)
        return when.timestamp()
    raise ValueError("bad TIME %r: write HH:MM, YYYY-MM-DD HH:MM (local time) or +DURATION "
                     "(+10m)" % text)


def new_request_id():
    """A request's id: unique enough across members and restarts."""
    return os.urandom(6).hex()


def _interval_of(config, host, report):
    """The check interval of the check that last reported ``host``."""
    checks = [c for c in config.checks if report and c.name == report.get("check")]
    checks = [c for c in checks if c.host == host] or checks
    if not checks:
        return config.daemon.interval
    return min(CRON_INTERVAL if c.group.cron is not None else c.group.interval for c in checks)


def _seconds(value):
    return "%g s" % round(value, 1) if value < 10 else "%d s" % value


def refusal(ledger, frm, to, now, run=None, request=None):
    """(why a switchover to ``to`` cannot be now, or None; FROM as it would be).

    ``frm``: --from, or None (the one host in the role).  ``run``: the switchover's own
    run, when it starts; ``request``: its request, when its schedule comes due (neither
    counts as another switchover).
    """
    config, d = ledger.config, ledger.config.daemon
    role, candidate = d.switchover_role, d.switchover_candidate
    if config.switchover_section(to) is None:
        return ("%s has no [switchover] section (nor [%s: switchover]): add one with the commands "
                "that move the %s role" % (os.path.join(config.config_dir, "actions.conf"), to, role)), frm
    if to not in ledger.hosts:
        return ("%s has never been seen: no check has reported it (hosts known: %s)" % (
            to, ", ".join(sorted(ledger.hosts)) or "none")), frm
    holders = sorted(ledger.by_state.get(role, ()))
    state = ledger.state_of(to)
    if state == role:
        return "%s is already %s (switchover_role = %s): nothing to move" % (to, role, role), frm
    if state != candidate:
        return ("%s is %s, not %s (switchover_candidate = %s): only a %s can take the %s role"
                % (to, state, candidate, candidate, candidate, role)), frm
    if len(holders) != 1:
        return ("%s hosts are %s%s (switchover_role = %s): a switchover moves the role from the "
                "one host that holds it" % (len(holders) or "no", role,
                                            " (%s)" % ", ".join(holders) if holders else "", role)), frm
    if frm is not None and frm != holders[0]:
        return "--from %s, but %s is the %s (leave out --from, or name %s)" % (
            frm, holders[0], role, holders[0]), frm
    frm = holders[0]
    report = ledger.reports.get(to)
    interval = _interval_of(config, to, report)
    if report is None or not isinstance(report.get("time"), (int, float)):
        return "%s has no report from this daemon's checks: is its check running? (hadaemon --status)" \
            % to, frm
    if now - report["time"] > REPORT_AGE * interval:
        return ("%s's last report is %s old (its check interval is %s): is its check running? "
                "(hadaemon --status)" % (to, _seconds(now - report["time"]), _seconds(interval))), frm
    if ledger.paused:
        return "actions are paused (hadaemon --resume, then ask again)", frm
    paused = sorted(ledger.store.paused_hosts() & {frm, to})
    if paused:
        return "actions are paused for %s (hadaemon --resume %s, then ask again)" % (
            " and ".join(paused), " ".join(paused)), frm
    own = run.switchover.get("request") if run is not None else request
    for other in ledger.runs.values():
        if other.switchover and other.state in ACTIVE_RUN and other is not run:
            return ("switchover run #%d (%s -> %s) is %s: wait for it to end, or hadaemon "
                    "--switchover --cancel" % (other.id, other.frm, other.to, other.state)), frm
    scheduled = ledger.book.get("scheduled")
    if scheduled and scheduled.get("request") != own:
        return ("a switchover %s -> %s is scheduled at %s: hadaemon --switchover --cancel first"
                % (scheduled["from"], scheduled["to"], format_time(scheduled["at"]))), frm
    return None, frm


def cannot_start(ledger, run, now):
    """(state, reason) when ``run`` may not start now (or be queued), else None: a
    switchover's refusal fails it; a pause, global or of its host, skips it."""
    if run.switchover:
        reason, _ = refusal(ledger, run.frm, run.to, now, run)
        return ("failed", reason) if reason else None
    if ledger.paused:
        return "skipped", "paused"
    if run.host in ledger.store.paused_hosts():
        return "skipped", "paused %s" % run.host
    return None


def switchover_plan(ledger, frm, to, config):
    """(section, env, commands or [], error) of a switchover from ``frm`` to ``to``, expanded
    against the states of now: %FROM%, %TO% and %HOST% (= TO) name hosts here."""
    section = config.switchover_section(to)
    if section is None:
        return None, {}, [], "no [switchover] section (nor [%s: switchover]) in %s" % (
            to, os.path.join(config.config_dir, "actions.conf"))
    variables = action_variables(to, frm, to, ledger.states())
    plan = plan_run(section, to, frm, to, None, config.config_dir, ledger.state_dir, variables)
    return section, dict(plan.env, HA_TRANSITION="switchover"), plan.commands, plan.error


def switchover_run(ledger, run_id, frm, to, request, now):
    """Run ``run_id``: the switchover from host ``frm`` to ``to``, its commands as they would
    be now (made again when it starts), not yet queued."""
    section, env, commands, _ = switchover_plan(ledger, frm, to, ledger.config)
    return Run(run_id, None, to, frm, to, section.name if section else "switchover", None, None,
               now, None, None, dict(env, HA_RUN_ID=str(run_id)), [RunCommand.from_json(c) for c in commands],
               switchover={"from": frm, "to": to, "request": request})


def switchover_commands(ledger, run, config):
    """The commands of switchover ``run`` as it starts, expanded against the states of now
    (its env's HA_MASTER, HA_SLAVE with them).  ValueError says why it cannot start."""
    section, env, _, _ = switchover_plan(ledger, run.frm, run.to, config)
    if section is None:
        raise ValueError("no [switchover] section (nor [%s: switchover]) in this daemon's %s"
                         % (run.to, os.path.join(config.config_dir, "actions.conf")))
    commands = expand_commands(section, action_variables(run.to, run.frm, run.to, ledger.states()))
    run.env = dict(run.env, HA_MASTER=env["HA_MASTER"], HA_SLAVE=env["HA_SLAVE"])
    return [RunCommand.from_json(c) for c in commands]


def expected(book, host, old, new, role, now):
    """The switchover run whose own transition this is (host: old -> new), or None; the
    book is marked (each of the two is expected once)."""
    exp = book.get("expect")
    if not exp or (exp.get("until") is not None and now > exp["until"]):
        return None
    if host == exp["from"] and old == role and new != role and not exp.get("from_done"):
        book["expect"] = dict(exp, from_done=True)
        return exp["run"]
    if host == exp["to"] and new == role and old != role and not exp.get("to_done"):
        book["expect"] = dict(exp, to_done=True)
        return exp["run"]
    return None


def run_moved(book, run, state, now, settle):
    """A switchover run changed state: the expectation of its own transitions begins when
    it starts, lasts ``settle`` after it ended ok, ends when it failed or was interrupted."""
    exp = book.get("expect")
    if state == "running":
        book["expect"] = {"run": run.id, "from": run.frm, "to": run.to, "until": None,
                          "from_done": False, "to_done": False}
    elif exp and exp.get("run") == run.id:
        if state == "ok":
            book["expect"] = dict(exp, until=now + settle)
        elif state in ("failed", "interrupted"):
            book["expect"] = None


def scheduled_view(book):
    """daemon.switchover of --status --json: {from, to, at} or None."""
    sched = book.get("scheduled")
    return {"from": sched["from"], "to": sched["to"], "at": sched["at"]} if sched else None


class SwitchoverDesk:
    """The master's part for --switchover and --pause HOST: see the comment above."""

    VERBS = ("switchover", "hostpause")

    def __init__(self, ledger, leadership):
        self.ledger = ledger
        self.leadership = leadership    # actions.Alone, or a cluster member's ClusterLink
        self.since = None               # when this daemon first could act (wall clock)

    def event(self, what, sched):
        """A moment of a scheduled switchover: ``scheduled``, ``cancelled`` or ``missed``
        (SPEC §12: a ``switchover`` event; its one call point)."""
        log.warning("switchover %s: %s -> %s at %s", what, sched.get("from"), sched.get("to"),
                    format_time(sched.get("at")))
        self.ledger.notify("switchover", event=what, to=sched.get("to"), at=sched.get("at"),
                           **{"from": sched.get("from")})

    # -- the control verbs ------------------------------------------------------------

    def answer(self, msg, now):
        if msg.get("cmd") == "hostpause":
            return self.answer_hostpause(msg)
        op = msg.get("op")
        if op == "state":
            return self.request_state(msg.get("request"))
        if op == "cancel":
            return self.ask_cancel(now)
        to, frm, at = msg.get("to"), msg.get("from"), msg.get("at")
        if not valid_name(to) or (frm is not None and not valid_name(frm)) or \
                (at is not None and not isinstance(at, (int, float))):
            return {"ok": False, "usage": True, "errors": ["bad request %r" % ({k: msg.get(k) for k in (
                "to", "from", "at")},)]}
        reason, frm = refusal(self.ledger, frm, to, now)
        if reason:
            return {"ok": False, "errors": [reason]}
        request = {"request": new_request_id(), "from": frm, "to": to, "at": at, "asked": now}
        return self.take(request, now)

    def ask_cancel(self, now):
        sched, run = self.ledger.book.get("scheduled"), self.queued_run()
        if sched is None and run is None:
            return {"ok": False, "errors": ["no switchover is scheduled or queued: nothing to cancel"]}
        what = "%s -> %s %s" % (sched["from"], sched["to"], "scheduled at %s" % format_time(sched["at"])) \
            if sched else "%s -> %s (run #%d, queued)" % (run.frm, run.to, run.id)
        answer = self.take({"request": new_request_id(), "cancel": True, "asked": now}, now)
        return answer if self.ledger.store.shared else dict(answer, cancelled=what)

    def take(self, request, now):
        """A request that passed the refusals: applied at once by a daemon alone, stored in
        etcd by a cluster member (the leader applies it)."""
        store = self.ledger.store
        if store.shared:
            store.put_switchover_request(request)
            return {"ok": True, "request": request["request"], "stored": False, "cluster": True}
        self.apply(request, now)
        return dict(self.request_state(request["request"]), ok=True)

    def request_state(self, request):
        """Where request ``request`` is: stored (etcd has it), taken, its run, its schedule."""
        ledger = self.ledger
        store = ledger.store
        run = next((r for r in reversed(ledger.runs.values())
                    if r.switchover and r.switchover.get("request") == request), None)
        sched = ledger.book.get("scheduled")
        stored = not store.shared or ledger.book.get("seen") == request or \
            (store.switchover_request() or {}).get("request") == request
        return {"ok": True, "request": request, "stored": stored,
                "taken": not store.shared or ledger.book.get("seen") == request or run is not None,
                "run": run.summary() if run is not None else None,
                "scheduled": scheduled_view(ledger.book) if sched and sched.get("request") == request else None}

    def answer_hostpause(self, msg):
        hosts = msg.get("hosts")
        if not isinstance(hosts, list) or not hosts or not all(valid_name(h) for h in hosts):
            return {"ok": False, "usage": True, "errors": ["bad host names %r" % (hosts,)]}
        paused = bool(msg.get("paused"))
        self.ledger.store.set_hosts_paused(hosts, paused)
        log.warning("actions %s for %s by request%s", "paused" if paused else "resumed", ", ".join(hosts),
                    " (the whole cluster, once etcd has it)" if self.ledger.store.shared else "")
        self.ledger.notify("daemon", event="paused" if paused else "resumed", hosts=sorted(hosts))
        return {"ok": True, "paused_hosts": sorted(self.ledger.store.paused_hosts()),
                "cluster": self.ledger.store.shared}

    def queued_run(self):
        return next((r for r in self.ledger.runs.values() if r.switchover and r.state == "queued"), None)

    # -- the acting daemon, each pass ---------------------------------------------------

    def tick(self, now):
        """A request stored in etcd (a cluster's leader), a scheduled switchover come due."""
        if not self.leadership.acting():
            return
        ledger = self.ledger
        self.since = now if self.since is None else self.since
        if ledger.store.shared:
            request = ledger.store.switchover_request()
            if request and request.get("request") != ledger.book.get("seen"):
                self.apply(request, now)
        sched = ledger.book.get("scheduled")
        if sched is None or now < sched["at"]:
            return
        if now - sched["at"] > MISSED_AFTER:
            ledger.note_book("scheduled", None)
            log.error("switchover %s -> %s scheduled at %s dropped: %s late, more than %s; no daemon "
                      "could act on it then (hadaemon --switchover %s to ask again)", sched["from"],
                      sched["to"], format_time(sched["at"]), format_duration(now - sched["at"]),
                      format_duration(MISSED_AFTER), sched["to"])
            self.event("missed", sched)
            return
        reason, frm = refusal(ledger, sched["from"], sched["to"], now, request=sched["request"])
        if reason and self.starting(sched["to"], now):
            return                      # its first report since this daemon started comes first
        ledger.note_book("scheduled", None)
        ledger.queue_switchover(frm, sched["to"], sched["request"], reason, now)

    def starting(self, host, now):
        """Whether ``host``'s checks have not reported since this daemon started, and still
        may (within REPORT_AGE of their interval): a schedule due at a restart waits for them."""
        report = self.ledger.reports.get(host) or {}
        if (report.get("time") or 0) >= self.since:
            return False
        return now - self.since <= REPORT_AGE * _interval_of(self.ledger.config, host, report)

    def apply(self, request, now):
        """Take a request (checked where it was asked): cancel, schedule, or queue its run
        (failed at once, unrun, when a refusal holds now)."""
        ledger = self.ledger
        ledger.note_book("seen", request.get("request"))
        if request.get("cancel"):
            sched, run = ledger.book.get("scheduled"), self.queued_run()
            if sched is not None:
                ledger.note_book("scheduled", None)
                self.event("cancelled", sched)
            elif run is not None:
                ledger.dequeue(run, "skipped", "cancelled by request (--switchover --cancel)", now, head=False)
            else:
                log.warning("switchover: --cancel asked, but none is scheduled or queued")
            return
        reason, frm = refusal(ledger, request.get("from"), request["to"], now)
        at = request.get("at")
        if at is not None and at > now and not reason:
            sched = {"from": frm, "to": request["to"], "at": at, "request": request["request"],
                     "asked": request.get("asked")}
            ledger.note_book("scheduled", sched)
            self.event("scheduled", sched)
            return
        ledger.queue_switchover(frm, request["to"], request["request"], reason, now)


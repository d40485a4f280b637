"""Scheduler: when each check runs, and what it last said.

One timer heap of (due, seq, key, token) over every configured check.  Interval
checks run at a fixed rate from their schedule (a late pass skips, it never
bursts); cron checks at their next matching minute.  A check due while its last
run is still queued or running is skipped and counted: it never overlaps itself.
Due checks wait in ``ready`` for a worker.  The master's pass takes the checks
due within AHEAD and hands them out at once, each with its time (``at``), at
which its worker starts it: one wake-up of the master for a batch of checks, not
one each.  A check handed to a worker and not yet answered goes to that worker
again, behind its last run, so a check never overlaps itself and its results
come in the order it ran; one due while it still waits for a worker is skipped.
The lag we sample is a run's start after its time.
A check whose report left a candidate pending (``recheck``) runs again that soon
after, from a second heap, its scheduled runs passing unrun meanwhile; once the
candidate is settled it is back on its schedule, which never moved.

Uses: base, config, wire, records, ssh.
"""

import collections
import dataclasses
import heapq
import itertools
import logging
import time
import typing

from .base import CONFIG_STEP, format_duration, log, run_steps, signal_name
from .config import Check
from .wire import reports_from_result
from .records import Job
from .ssh import ssh_command

AHEAD = 0.1         # seconds ahead a pass of the master hands out the checks due
LEAD = 0.02         # a pass comes this long before the next check is due (next_wake)


@dataclasses.dataclass
class CheckRuntime:
    """What the master knows of one configured check between reloads."""
    check: Check
    next_due: float = 0.0
    token: int = 0                      # heap entries with an older token are stale
    queued: bool = False                # in ``ready``: a run due meanwhile is skipped
    handed: int = 0                     # runs handed to ``worker`` and not answered yet
    worker: typing.Any = None           # the pool's Child they were handed to
    waiting: typing.Optional[list] = None   # its first run is not in the heap yet: next_due
                                            # is an offset from waiting[0] (Scheduler.fresh)
    runs: int = 0
    skipped: int = 0
    last: typing.Optional[dict] = None
    trouble: typing.Optional[str] = None    # logged once when it starts, once when it ends
    hosts: tuple = ()                   # the hosts its last own report was about
    rechecking: bool = False            # a candidate it reported is pending: recheck, not schedule
    recheck_at: typing.Optional[float] = None   # when it runs again, while one is planned
    job_tail: typing.Optional[tuple] = None     # (HA_STATE, config dir, state dir, its job's
                                                # line after the id): Scheduler._job_line
    said: typing.Optional[tuple] = None         # (data items, exit, reports, print) of its last
                                                # clean run: Scheduler._derive

    @property
    def busy(self):
        """Queued or handed, not answered: --status's "running"."""
        return self.queued or self.handed > 0


def percentile(ordered, q):
    """The q-quantile of an ascending list of seconds, in milliseconds (None when empty)."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


def describe_schedule(group):
    return ("cron " + group.cron.text) if group.cron else "every " + format_duration(group.interval)


def check_entry(check, last, rt=None, next_run=None, schedules=None):
    """One check as --status --json shows it (``rt`` None: from the state db).

    ``schedules``: a dict that keeps each group's schedule text, made once.
    """
    group = check.group
    if schedules is None:
        schedule = describe_schedule(group)
    else:
        schedule = schedules.get(id(group)) or schedules.setdefault(id(group), describe_schedule(group))
    reported = ",".join(sorted((last or {}).get("reports") or {}))    # what --status shows too
    return {"key": check.key, "name": check.name, "scope": group.scope.name,
            "host": reported or check.host, "where": check.where, "schedule": schedule,
            "next_run": next_run, "running": rt.busy if rt else False,
            "rechecking": rt.rechecking if rt else False,
            "runs": rt.runs if rt else None, "skipped": rt.skipped if rt else None, "last": last}


def _same_schedule(a, b):
    return (a.group.interval, a.group.cron and a.group.cron.text) == \
           (b.group.interval, b.group.cron and b.group.cron.text)


def _cron_due(cron, now_wall=None):
    now_wall = time.time() if now_wall is None else now_wall
    import datetime
    nxt = cron.next_after(datetime.datetime.fromtimestamp(now_wall))
    return time.monotonic() + max(0.0, time.mktime(nxt.timetuple()) - now_wall)


class Scheduler:
    """The checks' runtimes and timers; hands out due checks as jobs for the workers."""

    def __init__(self, once=False, store=None):
        self.once = once                # --once: every check due now, and only once
        self.store = store              # where each last result goes (check:KEY, soft)
        self.runtimes = {}              # check key -> CheckRuntime
        self.heap = []                  # (due, seq, key, token)
        self.rechecks = []              # the same, of the rechecks planned (recheck())
        self.stale = 0                  # heap entries of checks a reload removed or rescheduled
        self.ready = collections.deque()    # (CheckRuntime, due) waiting for a worker
        self.lags = collections.deque(maxlen=10000)
        self.lag_count, self.lag_sum = 0, 0.0     # since the start: the window above forgets
        self.lag_cache = None                       # (when, lag_count, percentiles of the window)
        self.heap_seq = itertools.count()
        self.tokens = itertools.count()     # never reused: a removed check that comes back is new
        # After a (re)configuration, the checks that start afresh wait here, by the
        # offset of their first run from the swap, and go into the heap when due: the
        # swap does not push ten thousand of them at once.  One batch per swap: [its
        # time], deque of (offset, CheckRuntime), earliest first.  The entry of a
        # check that a later reload replaced is dropped when its time comes.
        self.fresh = []
        self.job_ids = itertools.count(1)

    def configure(self, checks, now):
        """(Re)build the schedule at once (at start-up; a reload goes in steps):
        plan_steps() then swap() (see there)."""
        self.swap(run_steps(self.plan_steps(checks)), now)

    def plan_steps(self, checks):
        """The new schedule, prepared: keep what is known of checks whose schedule is
        unchanged.  A generator that looks at CONFIG_STEP checks between yields and
        changes nothing; it returns the plan for swap()."""
        old = self.runtimes
        runtimes, kept, fresh, cron = {}, [], [], []
        for i, check in enumerate(checks, 1):
            if i % CONFIG_STEP == 0:
                yield
            rt = old.get(check.key)
            if rt is not None and _same_schedule(rt.check, check):
                kept.append((rt, check))
                runtimes[check.key] = rt
                continue
            rt = runtimes[check.key] = CheckRuntime(check, token=next(self.tokens))
            if check.group.cron and not self.once:
                rt.next_due = _cron_due(check.group.cron)
                cron.append(rt)
            else:
                fresh.append(rt)
        # The first runs spread over the first interval (--once: all at once).
        since = [None]                  # the time of the swap, when it comes
        for i, rt in enumerate(fresh):
            if i % CONFIG_STEP == 0:
                yield
            rt.next_due = 0.0 if self.once else rt.check.group.interval * i / len(fresh)
            rt.waiting = since
        fresh = collections.deque(sorted(((rt.next_due, rt) for rt in fresh), key=lambda e: e[0]))
        yield
        return old, runtimes, kept, fresh, cron, since

    def swap(self, plan, now=None):
        """Put the planned schedule in at once.  A check whose schedule is unchanged keeps
        its runtime and its place in the heap; new ones and rescheduled ones start
        afresh, their first runs spread over their first interval from ``now`` (default:
        the time of the swap).  Returns the runtimes replaced, for the caller to let go
        of a slice at a time."""
        old, runtimes, kept, fresh, cron, since = plan
        since[0] = time.monotonic() if now is None else now
        for rt, check in kept:
            rt.check, rt.job_tail, rt.said = check, None, None  # its job's line and last made anew
        for rt in cron:
            self._push(rt)
        if fresh:
            self.fresh.append((since, fresh))
        for key, rt in old.items():             # queued or handed as they are now
            new = runtimes.get(key)
            if new is not None and new is not rt:
                new.queued, new.handed, new.worker = rt.queued, rt.handed, rt.worker
        self.stale += len(old) - len(kept)
        self.runtimes = runtimes
        if self.stale > max(len(runtimes), 1000):
            # Entries left by reloads wait for their due time, a year for a cron check:
            # drop them once they outnumber the checks.
            self.heap = [e for e in self.heap if e[2] in runtimes and runtimes[e[2]].token == e[3]]
            heapq.heapify(self.heap)
            self.stale = 0
        self.ready = collections.deque((runtimes[rt.check.key], due) for rt, due in self.ready
                                       if rt.check.key in runtimes)
        return list(old.values())

    def _push_fresh(self, until):
        """Checks waiting for their first run due by ``until`` go into the heap."""
        for since, queue in self.fresh:
            while queue and since[0] + queue[0][0] <= until:
                offset, rt = queue.popleft()
                if self.runtimes.get(rt.check.key) is rt:
                    rt.next_due, rt.waiting = since[0] + offset, None
                    self._push(rt)
        self.fresh = [batch for batch in self.fresh if batch[1]]

    def due_of(self, rt):
        """When ``rt`` runs next (monotonic)."""
        if rt.recheck_at is not None:
            return rt.recheck_at
        return rt.waiting[0] + rt.next_due if rt.waiting else rt.next_due

    def _push(self, rt):
        heapq.heappush(self.heap, (rt.next_due, next(self.heap_seq), rt.check.key, rt.token))

    def next_due(self):
        due = self.heap[0][0] if self.heap else None
        if self.rechecks and (due is None or self.rechecks[0][0] < due):
            due = self.rechecks[0][0]
        for since, queue in self.fresh:
            if due is None or since[0] + queue[0][0] < due:
                due = since[0] + queue[0][0]
        return due

    def next_wake(self):
        """When the master's next pass should come for the checks (None: no check)."""
        due = self.next_due()
        return None if due is None else due - LEAD

    def fire_due(self, now, ahead=0.0):
        """Move every check due by ``now`` + ``ahead`` to ``ready``, or count it skipped;
        set its next time.  Ahead only when the next check is due within LEAD: a pass
        awake for something else (a result) takes nothing early, so the workers get
        their jobs in batches, not a few at every pass."""
        due = self.next_due() if ahead else None
        until = now + ahead if due is not None and due <= now + LEAD else now
        if self.fresh:
            self._push_fresh(until)
        while self.rechecks and self.rechecks[0][0] <= until:
            due, _, key, token = heapq.heappop(self.rechecks)
            rt = self.runtimes.get(key)
            if rt is not None and rt.token == token and rt.recheck_at == due:
                rt.recheck_at = None
                if not rt.queued:
                    self.enqueue(rt, due)
        while self.heap and self.heap[0][0] <= until:
            due, _, key, token = heapq.heappop(self.heap)
            rt = self.runtimes.get(key)
            if rt is None or rt.token != token:
                continue
            if rt.rechecking and not self.once:
                pass                            # its recheck runs instead
            elif rt.queued:
                rt.skipped += 1
                log.debug("check %s: still waiting for a worker at its next run; skipped", rt.check.name)
            else:
                self.enqueue(rt, due)
            if self.once:
                continue
            group = rt.check.group
            if group.cron:
                rt.next_due = _cron_due(group.cron)
            else:
                rt.next_due = due + group.interval
                if rt.next_due <= now:          # we fell behind: skip, never burst
                    missed = int((now - rt.next_due) // group.interval) + 1
                    rt.skipped += missed
                    rt.next_due += missed * group.interval
            self._push(rt)

    def enqueue(self, rt, due, front=False):
        """``rt`` waits for a worker: queued, so a run due meanwhile is skipped (``front``:
        first, a run that was handed and came back)."""
        rt.queued = True
        if front:
            self.ready.appendleft((rt, due))
        else:
            self.ready.append((rt, due))

    def take(self, now, host_state, config_dir, state_dir, quiet=None):
        """The next ready check as a Job to start at its time (None when none waits),
        counted as handed.  ``quiet(group, reports)``: whether those reports of a check
        of that group would change nothing now; if so, and the check is not rechecking,
        its worker may hold a result that says what its last clean run said (Job.same)."""
        if not self.ready:
            return None
        rt, due = self.ready.popleft()
        rt.queued = False
        rt.handed += 1
        said = rt.said
        same = said[3] if said is not None and quiet is not None and not rt.rechecking \
            and quiet(rt.check.group, said[2]) else None
        check = rt.check
        env = {"HA_CHECK": check.name, "HA_SCOPE": check.group.scope.name,
               "HA_STATE": host_state(check.host), "HA_CONFIG_DIR": config_dir,
               "HA_STATE_DIR": state_dir}
        if check.group.host:
            env["HA_HOST"] = check.group.host
        if check.group.scope.kind == "ssh":
            argv, stdin = ssh_command(check, env, state_dir)
            job = Job(next(self.job_ids), check.key, argv, env, check.group.timeout, stdin, True, due, same)
            if same is not None:
                job.said = said[:2]
            return job
        job = Job(next(self.job_ids), check.key, list(check.argv), env, check.group.timeout,
                  at=due, same=same)
        if same is not None:
            job.said = said[:2]
        job.line = self._job_line(rt, job, config_dir, state_dir)
        return job

    @staticmethod
    def _job_line(rt, job, config_dir, state_dir):
        """``job``'s line (Job.to_line) from the part after its id kept per check: its
        message is encoded again only when HA_STATE or the directories changed (a reload
        of the check forgets it, in swap())."""
        head = b'{"t":"job","id":%d,"at":%s,"same":%s' % (
            job.id, repr(job.at).encode(), b"null" if job.same is None else b"%d" % job.same)
        kept, state = rt.job_tail, job.env["HA_STATE"]
        if kept is not None and kept[0] == state and kept[1] == config_dir and kept[2] == state_dir:
            return head + kept[3]
        line = job.to_line()
        rt.job_tail = (state, config_dir, state_dir, line[len(head):]) \
            if line.startswith(head + b",") else None
        return line

    def released(self, key):
        """A run of check ``key`` handed and not answered is no more (its worker died, or
        gave it back): its runtime, or None (a reload removed it)."""
        rt = self.runtimes.get(key)
        if rt is not None:
            rt.handed = max(0, rt.handed - 1)
        return rt

    def sample_lag(self, job, result):
        """How late ``job`` started after its time (by ``result``'s start, a wall clock)."""
        lag = max(0.0, result.started - job.sent_wall - (job.at - job.sent)) \
            if isinstance(result.started, (int, float)) else 0.0
        self.lags.append(lag)
        self.lag_count += 1
        self.lag_sum += lag

    def finished(self, key, result):
        """Check ``key``'s CheckResult -> (its runtime, [(host, state)] reported), None if unknown."""
        rt = self.released(key)
        if rt is None:
            return None                 # removed by a reload while it ran
        rt.runs += 1
        items, said = tuple(result.data.items()), rt.said
        if said is not None and said[0] == items and said[1] == result.exit and not result.failed:
            # The same as its last clean run said: the same reports and text, nothing to log.
            reports, rt.last = said[2], result.same_last(rt.last)
            if result.fingerprint is not None and result.fingerprint != said[3]:
                rt.said = said[:3] + (result.fingerprint,)      # its bytes, as they are now
        else:
            reports = self._derive(rt, result, items)
        if result.trouble != rt.trouble:
            self._note_trouble(rt, result.trouble)
        if log.isEnabledFor(logging.DEBUG):     # its arguments cost more than the record
            log.debug("check %s: %s; %s in %.3fs", rt.check.name,
                      ", ".join("%s %s" % pair for pair in reports) or "no valid report",
                      "killed by %s" % signal_name(result.signal) if isinstance(result.signal, int)
                      else "exit %s" % result.exit, result.duration or 0)
        if self.store is not None:
            self.store.soft("check:" + rt.check.key, rt.last)     # a crash may lose it
        return rt, reports

    @staticmethod
    def _derive(rt, result, items):
        """``rt``'s reports (returned) and last from ``result`` (``items``: its data's),
        its rejected reports logged.  A clean run of text values is kept as ``rt.said``:
        a run that says the same again needs none of it (finished)."""
        reports, problems = reports_from_result(result.data, result.exit, rt.check.host)
        if result.failed and rt.hosts:
            # It never said whom it is about this time: its unknown goes to the hosts
            # it watches, not to a host named after its file.
            reports = [(host, "unknown") for host in rt.hosts]
        elif reports:
            rt.hosts = tuple(host for host, _ in reports)
        for problem in problems:
            log.warning("check %s: %s", rt.check.name, problem)
        rt.last = result.to_last(reports, problems)
        # Only text values: == on them is sameness (1 == 1.0 == True, and nested dicts
        # equal in another order, would each show differently in its last).  Its print
        # (None when the worker made none: it had trouble or stderr) is the next job's same.
        clean = not result.failed and not problems and all(type(v) is str for _, v in items)
        rt.said = (items, result.exit, reports, result.fingerprint) if clean else None
        return reports

    def recheck(self, rt, pending, now):
        """After ``rt``'s reports went to the ledger: while a candidate one of them made
        is ``pending``, its group's ``recheck`` after ``now`` (the run's end) is its next
        run; once none is, it is back on its schedule."""
        recheck = rt.check.group.recheck
        if pending and recheck and not self.once and self.runtimes.get(rt.check.key) is rt:
            rt.rechecking, rt.recheck_at = True, now + recheck
            heapq.heappush(self.rechecks, (rt.recheck_at, next(self.heap_seq), rt.check.key, rt.token))
        elif rt.rechecking:
            rt.rechecking, rt.recheck_at = False, None
            log.debug("check %s: candidate settled; back on its schedule", rt.check.name)

    @staticmethod
    def _note_trouble(rt, trouble):
        """What the daemon had to do about a check's runs: logged when it starts and ends."""
        if trouble != rt.trouble:
            if trouble:
                log.warning("check %s: %s", rt.check.name, trouble[:200])
            else:
                log.info("check %s: runs normally again", rt.check.name)
            rt.trouble = trouble

    def all_ran(self):
        return all(rt.runs >= 1 for rt in self.runtimes.values())

    @staticmethod
    def adopt_results(store):
        """An older state db keeps every last result in one key, ``checks``: one key per
        check from now on (written at the next checkpoint)."""
        old = store.data.get("checks")
        if old:
            for key, last in old.items():
                store.soft("check:" + key, last)
            store.soft("checks", {})

    def status(self, now_m, now):
        """checks of the --status --json document, one by one (made as they are read)."""
        schedules = {}                  # per group: ten thousand checks share a few
        for rt in list(self.runtimes.values()):
            entry = check_entry(rt.check, rt.last, rt, now + max(0.0, self.due_of(rt) - now_m),
                                schedules)
            yield entry

    def lag_summary(self):
        # Sorting 10000 samples takes a millisecond or more, and the status page, /status
        # and /metrics ask often: the percentiles of a window this long are recomputed
        # at most once a second (at once while they have no sample yet).
        now = time.monotonic()
        cache = self.lag_cache
        if cache is None or (cache[1] != self.lag_count
                             and (now - cache[0] >= 1.0 or not cache[2]["samples"])):
            lags = sorted(self.lags)
            cache = self.lag_cache = (now, self.lag_count, {
                "p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99),
                "max": percentile(lags, 1.0), "samples": len(lags)})
        return dict(cache[2], count=self.lag_count, sum=round(self.lag_sum * 1000, 3))

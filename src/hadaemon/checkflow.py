"""Check flow: due checks handed to the workers, their results to the ledger.

  Scheduler.ready --dispatch--> a worker's queue --result / back--> Ledger.report

A pass hands out every check due within AHEAD (scheduler.py), each to the first
worker free at its time (by the runs it was handed, each as long as its check's
last run), else to the one free soonest; or to the worker that has the check's
last run still unanswered (so its runs never overlap and answer in order).  So
the work goes to as few workers as keep up, which stay warm: woken for every
check, a worker costs a third less CPU per check than woken for every fourth
(bench/worker.py).  A worker starts each
at its time, sends a changed result at once, and holds one that says what the
check's last clean run said for up to HOLD, to send it with others (children.py):
a job says which result that is (``same``) only while the check's reports would
change nothing (ledger.change_nothing: each the host's state, no candidate pending)
and the check is not rechecking, so a change, and every report a candidate waits
for, comes at once.

A worker that could not start a job in time gives it back, and is handed nothing
until it answers again; a worker that dies loses only the check it was running
(reported unknown), and the jobs it had not answered go back to ``ready``.

Uses: base, records, ledger.
"""

import functools
import signal
import time

from .base import killpg_quietly
from .records import CheckResult
from .ledger import change_nothing, pending_among


UNTIMED = 0.01      # seconds a check that never ran yet is taken to run
AROUND = 0.0005     # seconds of a worker's own around each check it runs


def first_free(takers, at):
    """The first of ``takers`` free by ``at`` (Child.free_at), else the one free soonest."""
    soonest = takers[0]
    for child in takers:
        if child.free_at <= at:
            return child
        if child.free_at < soonest.free_at:
            soonest = child
    return soonest


def took(last):
    """How long the run of a check whose ``last`` (CheckRuntime.last) it is took."""
    duration = last.get("duration") if last is not None else None
    return duration if isinstance(duration, float) else UNTIMED


class CheckFlow:
    """Hands the ready checks to the workers; takes their results and given-back jobs."""

    def __init__(self, scheduler, pool, server, ledger, notify, dirs):
        self.scheduler, self.pool, self.server = scheduler, pool, server
        self.ledger, self.notify = ledger, notify
        self.dirs = dirs                # () -> (config dir, state dir), as they are now
        self.quiet = functools.partial(change_nothing, ledger)     # what a job may hold

    def dispatch(self, now):
        ready = self.scheduler.ready
        if not ready:
            return
        takers = self.pool.takers()
        if not takers:
            return
        config_dir, state_dir = self.dirs()
        state_of, quiet, take, hand = self.ledger.state_of, self.quiet, self.scheduler.take, self.pool.hand
        lines = {}                      # pid -> (worker, its lines): one write each
        while ready:
            rt, at = ready[0]
            if rt.handed:
                child = rt.worker
                if child.state not in ("idle", "busy") or child.gave_back:
                    # Its last run is on a worker that is leaving, or behind: still
                    # running, or waiting, at this one's time.
                    ready.popleft()
                    rt.queued, rt.skipped = False, rt.skipped + 1
                    continue
            else:
                child = first_free(takers, at)
            job = take(now, state_of, config_dir, state_dir, quiet)
            rt.worker = child
            child.free_at = max(child.free_at, at) + AROUND + took(rt.last)
            lines.setdefault(child.pid, (child, []))[1].append(hand(child, job, now))
        for child, batch in lines.values():
            self.server.send(child.conn, b"".join(batch))

    def on_worker(self, child, msg):
        """What a worker sent: a result, or the jobs it gives back."""
        if msg.get("t") == "back":
            for job in self.pool.given_back(child, msg):
                self.give_back(job)
            return
        job = self.pool.job_done(child, msg)
        if msg["t"] == "same" and job.said is not None:
            result = CheckResult.from_same(job, msg)
        else:
            result = CheckResult.from_wire(msg)
        self.scheduler.sample_lag(job, result)
        self.result(job, result)

    def give_back(self, job, skip=None):
        """``job`` did not run: its check waits for a worker again (at the front), or is
        skipped, as a run due while the last still runs is (``skip``; None: when another
        run of it is still unanswered)."""
        rt = self.scheduler.released(job.key)
        if rt is None or rt.queued:
            return
        if skip or (skip is None and rt.handed):
            rt.skipped += 1
            return
        self.scheduler.enqueue(rt, job.at, front=True)

    def result(self, job, result):
        done = self.scheduler.finished(job.key, result)
        if done is not None:
            rt, reports = done
            self.notify.check_ran(rt, result)
            # A result that could be held (it says what the last said: the very reports)
            # changed nothing when it ran; one that reached us after a newer report of its
            # host would have come before that one: it is not applied after it.
            held = job.same is not None and rt.said is not None and reports is rt.said[2]
            ended = (result.started or 0) + (result.duration or 0) if held else None
            last, now = self.ledger.reports, time.time()
            for host, state in reports:
                if held and host in last and last[host]["time"] > ended:
                    continue
                self.ledger.report(host, state, rt.check, now, rt.last["attributes"])
            if rt.check.group.recheck or rt.rechecking:
                self.scheduler.recheck(rt, pending_among(self.ledger, reports), time.monotonic())

    def worker_exited(self, child, stopping, how):
        """A worker is gone: the check it ran is lost, the rest of its jobs wait again."""
        jobs, child.jobs = child.jobs, {}
        running = child.running_job()
        if not stopping:                # a check the stop ended is no report
            pgid = child.check_pgid()
            if pgid:
                killpg_quietly(pgid, signal.SIGKILL)            # the check it left behind
            lost = jobs.pop(running, None)
            if lost is not None:
                self.result(lost, CheckResult.lost(lost, how, time.monotonic()))
            for job in jobs.values():       # a later run of the lost check was due while it ran
                self.give_back(job, skip=lost is not None and job.key == lost.key)
        child.close_slot()

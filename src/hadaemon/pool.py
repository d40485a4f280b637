"""Pool: every forked child of the master.

One ``children`` map, keyed by pid, holds every process the master forks: the
check workers, the action run (one waits, forked ahead of need, until it is
handed a sequence) and the ssh master connections.  One fork shape registers
them; one reaping loop (waitpid until 0, level-triggered) collects them; one
deadline per child (``kill_at``) turns a polite SIGTERM into SIGKILL.

Uses: base, proc, children, ssh.
"""

import dataclasses
import errno
import mmap
import os
import signal
import struct
import time
import typing

from .base import (
    ProtocolError, WORKER_HANG_GRACE, decode_wait_status, format_duration, log, signal_name,
)
from .proc import _Orphaned, _Terminate
from .children import HOLD, action_main, worker_main
from .ssh import SshMasters


# A worker: starting -> idle <-> busy (jobs handed, not all answered) -> exiting.
WORKER_EDGES = {
    "starting": {"idle", "exiting"},
    "idle": {"busy", "exiting"},
    "busy": {"idle", "exiting"},
    "exiting": set(),
}
KILL_GRACE = 5.0                # SIGTERM -> SIGKILL for a child of the master
HELLO_WITHIN = 10.0             # a worker that has not said hello by then is killed


@dataclasses.dataclass
class Child:
    """A forked process of the master: a check worker, an action run, an ssh master."""
    pid: int
    kind: str                           # "worker" | "action" | "ssh" (a master connection)
    state: str
    started: float                      # monotonic
    conn: typing.Any = None
    jobs: dict = dataclasses.field(default_factory=dict)   # a worker's: id -> Job handed, not answered
    answered: float = 0.0                    # a worker's last result (monotonic)
    gave_back: bool = False                  # a worker that gave jobs back: none more until it answers
    free_at: float = 0.0                     # a worker's: when the runs handed to it should be done
    run_id: typing.Optional[int] = None
    kill_at: typing.Optional[float] = None   # monotonic deadline to be gone by
    signalled: bool = False                  # SIGTERM sent: the next signal is SIGKILL
    lost: bool = False                       # a worker that hung up or died unasked
    pgid: typing.Optional[int] = None        # group of the command an action run runs now
    slot: typing.Any = None                  # a worker's shared page: pid and job of its check

    def check_pgid(self):
        """The group of the check this worker runs now (from its shared page), or None."""
        pid = struct.unpack_from("q", self.slot, 0)[0] if self.slot is not None else 0
        return pid if pid > 1 else None

    def running_job(self):
        """The id of the job this worker runs now (from its shared page), or None."""
        job = struct.unpack_from("q", self.slot, 8)[0] if self.slot is not None else 0
        return job or None

    def close_slot(self):
        if self.slot is not None:
            self.slot.close()
            self.slot = None

    def signal(self, sig, deadline):
        """Send ``sig`` (gone, it is not an error) and give it until ``deadline`` to exit."""
        self.kill_at, self.signalled = deadline, True
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class Pool:
    """The master's children: forked, said hello, reaped, retired, replaced with a backoff."""

    def __init__(self, sock_path, state_dir):
        self.sock_path = sock_path
        self.children = {}              # pid -> Child
        self.ssh = SshMasters(state_dir)
        self.stopping = False
        self.spawn_after = 0.0          # no worker forked before (after quick deaths)
        self.runner_after = 0.0         # no spare action run forked before (after a quick death)
        self.quick_deaths = 0

    def fork(self, kind, target, *args):
        """The one fork shape: the parent registers the child, the child never returns."""
        try:
            pid = os.fork()
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                log.error("cannot fork a %s: too many processes (EAGAIN); retrying", kind)
            else:
                log.error("cannot fork a %s: %s", kind, exc)
            return None
        if pid:
            child = Child(pid, kind, "starting", time.monotonic())
            self.children[pid] = child
            return child
        code = 1
        try:
            code = target(*args)
        except (_Terminate, _Orphaned, BrokenPipeError, ConnectionError):
            code = 0
        except BaseException:           # noqa: B036 - the child must reach os._exit
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code or 0)         # this must never return

    # -- who is who ------------------------------------------------------------------

    def workers(self, *states):
        return [c for c in self.children.values() if c.kind == "worker"
                and (not states or c.state in states)]

    def action_child(self):
        """The action run running a sequence, or None."""
        for child in self.children.values():
            if child.kind == "action" and child.run_id is not None:
                return child
        return None

    def spare_runner(self):
        """The action run forked ahead, waiting for a sequence, or None."""
        for child in self.children.values():
            if child.kind == "action" and child.run_id is None:
                return child
        return None

    def set_worker_state(self, child, state):
        if state not in WORKER_EDGES[child.state]:
            raise AssertionError("worker %d: %s -> %s" % (child.pid, child.state, state))
        child.state = state

    def greet(self, child):
        """A child said hello on its connection: a worker is ready for jobs."""
        if child.kind == "worker" and child.state == "starting":
            self.set_worker_state(child, "idle")

    def hand(self, child, job, now):
        """Give a worker a Job (it starts it at ``job.at``); returns the message to send
        it, encoded."""
        job.sent, job.sent_wall = now, time.time()
        child.jobs[job.id] = job
        if child.state == "idle":
            self.set_worker_state(child, "busy")
        return job.to_line()

    def job_done(self, child, msg):
        """A worker's result message (``result`` or ``same``): the Job it answers."""
        job = child.jobs.pop(msg.get("job"), None) if msg.get("t") in ("result", "same") else None
        if job is None:
            raise ProtocolError("unexpected message from worker %d" % child.pid)
        child.answered, child.gave_back = time.monotonic(), False
        self._maybe_idle(child)
        return job

    def given_back(self, child, msg):
        """A worker's ``back``: the Jobs it could not start in time, for another worker."""
        ids = msg.get("jobs")
        if not isinstance(ids, list) or not all(i in child.jobs for i in ids):
            raise ProtocolError("unexpected message from worker %d" % child.pid)
        child.gave_back = True
        jobs = [child.jobs.pop(i) for i in ids]
        self._maybe_idle(child)
        return jobs

    def _maybe_idle(self, child):
        if not child.jobs and child.state == "busy":
            self.set_worker_state(child, "idle")

    def takers(self):
        """The workers that may be handed jobs now: said hello, not leaving, not behind."""
        ready = [c for c in self.children.values() if c.kind == "worker" and c.state in ("idle", "busy")]
        return [c for c in ready if not c.gave_back] or ready

    def runner(self, config_dir):
        """An action run for the next sequence: the spare, else one forked now (None: failed)."""
        child = self.spare_runner()
        if child is None:           # none waits (its fork failed, or it died): fork now
            child = self.fork("action", action_main, self.sock_path, config_dir)
        return child

    # -- keeping it full -------------------------------------------------------------

    def manage(self, config, now, ssh=True):
        """Keep ``workers`` workers and one spare action run; kill the hung; follow the ssh targets."""
        if self.stopping:
            return
        # One look at the children (every pass of the loop comes here): the workers
        # counted, the few late to say hello or hung noted, the action runs seen.
        live, late, hung, spare, running = 0, [], [], None, False
        for child in self.children.values():
            if child.kind == "worker":
                state = child.state
                if state == "exiting":
                    continue
                live += 1
                if state == "starting":
                    if now - child.started > HELLO_WITHIN:
                        late.append(child)
                elif state != "idle":
                    # Workers enforce their checks' timeouts and send a held result within
                    # HOLD: one silent long past the first job's is hung (stopped, stuck),
                    # and its check must not freeze its host's state.
                    job = next(iter(child.jobs.values()), None)
                    if job is not None and \
                            now - max(job.start(), child.answered) > job.timeout + WORKER_HANG_GRACE + HOLD:
                        hung.append(child)
            elif child.kind == "action":
                if child.run_id is None:
                    spare = child
                else:
                    running = True
        missing = config.daemon.workers - live
        if missing > 0 and now >= self.spawn_after:
            for _ in range(missing):
                slot = mmap.mmap(-1, 16)        # shared with the worker: its check's pid and job
                child = self.fork("worker", worker_main, self.sock_path, config.config_dir, slot)
                if child is None:
                    slot.close()
                    self.spawn_after = now + 1.0
                    break
                child.slot = slot
        if missing < 0:
            # A smaller pool (after a reload) shrinks by idle workers only: retiring a
            # busy one would cut its check short and report it unknown.
            for child in self.workers("idle")[:-missing]:
                self.retire(child)
        for child in late:
            log.error("worker %d did not connect within %ds; killing it", child.pid, HELLO_WITHIN)
            self.retire(child, signal.SIGKILL)
        for child in hung:
            log.error("worker %d: no result of check %s %s after its timeout; killing it",
                      child.pid, next(iter(child.jobs.values())).env["HA_CHECK"],
                      format_duration(WORKER_HANG_GRACE))
            self.retire(child, signal.SIGKILL)
        if now >= self.runner_after and spare is None and not running:
            # One action run forked and waiting, so a sequence starts without a fork.
            # Not while a sequence runs: the next cannot start before it ends, and a
            # fork (a copy of the master's page tables, a millisecond of CPU) as its
            # commands start would take the CPU they need.
            if self.fork("action", action_main, self.sock_path, config.config_dir) is None:
                self.runner_after = now + 1.0
        if ssh:
            self.ssh.maintain(config, now, self.fork)

    def retire(self, child, sig=signal.SIGTERM):
        if child.state != "exiting":
            self.set_worker_state(child, "exiting")
        child.signal(sig, time.monotonic() + KILL_GRACE)

    def enforce_kills(self, now):
        """A child past its deadline gets SIGTERM, then SIGKILL on a later pass."""
        for child in self.children.values():      # signal() changes no one's membership
            if child.kill_at is not None and now >= child.kill_at:
                sig = signal.SIGKILL if child.signalled else signal.SIGTERM
                log.warning("%s %d did not exit in time; sending %s", child.kind, child.pid,
                            signal_name(sig))
                child.signal(sig, now + KILL_GRACE)

    # -- the end of a child ------------------------------------------------------------

    def reap(self):
        """Every child that has exited, as [(child, how)] (level-triggered: a coalesced
        SIGCHLD loses nothing).  They stay known until ``forget``, so what they sent
        before they went can still be read."""
        gone = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.get(pid)
            if child is None:
                continue
            if child.kind == "worker" and child.state != "exiting":
                child.lost = True       # and, reaped, it must not be signalled any more
                self.set_worker_state(child, "exiting")
            code, sig = decode_wait_status(status)
            gone.append((child, ("killed by %s" % signal_name(sig)) if sig else "exit %s" % code))
        return gone

    def forget(self, child):
        self.children.pop(child.pid, None)

    def worker_gone(self, child, how):
        """A worker that died unasked is replaced, after a backoff if it keeps dying young."""
        if not child.lost:
            return
        log.error("worker %d died (%s); replacing it", child.pid, how)
        if time.monotonic() - child.started < 1.0:
            self.quick_deaths += 1
            self.spawn_after = time.monotonic() + min(30.0, 0.25 * 2 ** self.quick_deaths)
        else:
            self.quick_deaths = 0

    def spare_gone(self, child, how):
        """The spare action run died before it had a sequence: replaced (later if it died young)."""
        if self.stopping:
            return
        log.error("action run %d died waiting for a sequence (%s); replacing it", child.pid, how)
        if time.monotonic() - child.started < 1.0:
            self.runner_after = time.monotonic() + 5.0

    def stop(self, now):
        """The daemon stops: workers, the spare action run and ssh masters are asked to go."""
        self.stopping = True
        for child in self.workers():
            self.retire(child)
        spare = self.spare_runner()
        if spare is not None:
            spare.signal(signal.SIGTERM, now + KILL_GRACE)
        self.ssh.stop_all()

    def kill_all(self):
        """SIGKILL every child and reap them (5 s at most); returns the children reaped."""
        for child in self.children.values():
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        gone = []
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            child = self.children.pop(pid, None)
            if child is not None:
                gone.append(child)
        return gone

    def status(self):
        """What the daemon block of --status says of the children."""
        return {"workers": [{"pid": w.pid, "state": w.state} for w in self.workers()],
                "action_pid": getattr(self.action_child(), "pid", None),
                "ssh": self.ssh.status()}

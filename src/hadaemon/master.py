"""Master: the loop, signals, readiness and shutdown.

The story of the daemon's life, in run(): set up (lock, state db, socket,
signals, schedule), say ready, loop, shut down.  Each pass of the loop is
level-triggered: it handles recorded signals, reaps, enforces kill deadlines,
keeps the pool full, fires due checks, hands them to the workers and starts
the next queued action run, so a lost signal or wake-up never matters.  The
parts do the work; the master only wires them:

  Scheduler --CheckFlow--> a worker --result--> ControlServer --CheckFlow--> Ledger.report
  Ledger.head --ActionRuns--> the action run --events--> ControlServer --> ActionRuns
  SIGHUP, --reload --> Reload (a slice per pass) --> Master.reload swaps it in

Uses: base, configfiles, records, store, ledger_store, switchover, ledger, scheduler, pool, control,
      checkflow, http_server, cluster_member, cluster_ledger, cluster_link, actions, reload, notify.
"""

import logging
import os
import selectors
import signal
import socket
import time

from .base import (
    ANSWER_SLICE, CHECKPOINT_EVERY, ConfigError, EXIT_FAIL, EXIT_OK, HadaemonError, PidLock,
    SOCK_FILE, __version__, ensure_state_dir, log, raise_open_files_limit,
    reopen_log, settle_heap, setup_logging, signal_name,
)
from .configfiles import load_config_steps
from .records import DaemonBlock, StatusDoc
from .store import Store
from .ledger_store import LocalStore
from .ledger import Ledger
from .scheduler import AHEAD, Scheduler
from .pool import Pool
from .control import ControlServer
from .checkflow import CheckFlow
from .http_server import HttpApp, HttpServer
from .cluster_member import ClusterMember
from .cluster_ledger import EtcdStore, cluster_reload_problem
from .cluster_link import ClusterLink
from .actions import ActionRuns, Alone
from .switchover import SwitchoverDesk
from .reload import Reload
from .notify import Notifications


class Notifier:
    """systemd's sd_notify protocol, when NOTIFY_SOCKET is set."""

    def __init__(self):
        self.address = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC", "")
        self.watchdog = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]

    def send(self, text):
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(text.encode(), self.address)
        except OSError as exc:
            log.warning("systemd notify %r failed: %s", text, exc)


class Master:
    """The daemon: ``run()`` is setup, ready, loop, shutdown; the parts do the rest."""

    def __init__(self, config, state_dir, once=False, default_log="stderr", ready_fd=None):
        self.config = config
        self.state_dir = state_dir
        self.once = once
        self.default_log = default_log      # where logs go when ``log`` is not set
        self.ready_fd = ready_fd
        self.lock = PidLock(state_dir)
        self.store = Store(state_dir)
        if config.cluster is None:
            ledger_store = LocalStore(self.store)
        else:
            ledger_store = EtcdStore(LocalStore(self.store), ClusterMember(config.cluster, time.monotonic()))
        self.ledger = Ledger(ledger_store, state_dir, config)
        self.scheduler = Scheduler(once, self.store)
        self.pool = Pool(os.path.join(state_dir, SOCK_FILE), state_dir)
        self.sel = selectors.DefaultSelector()
        self.flow = CheckFlow(self.scheduler, self.pool, None, self.ledger, None,
                              lambda: (self.config.config_dir, self.state_dir))
        self.server = self.flow.server = ControlServer(self.sel, self.pool.sock_path, self.pool,
                                                       self.flow.on_worker, self.child_event, self.answer)
        self.cluster = None if config.cluster is None else ClusterLink(self.ledger, self.pool, self.server)
        self.leadership = Alone() if self.cluster is None else self.cluster
        self.runs = ActionRuns(self.ledger, self.pool, self.server, self.leadership)
        self.switchover = SwitchoverDesk(self.ledger, self.leadership)
        self.http = HttpServer(self.sel, HttpApp(self.status_document, self.ledger.host_status,
                                                 self.ledger.history,
                                                 lambda flag: self.set_paused(flag, "an http request")))
        self.notifier = Notifier()
        self.notify = self.flow.notify = Notifications(self.store, self.pool, self.server,
                                                       lambda: self.config)
        self.ledger.notify = self.notify.event      # docs/HACKING.md: events
        self.signals = []
        self.stopping = False
        self.stop_deadline = None
        self.started_wall, self.started = time.time(), time.monotonic()
        self.next_checkpoint = self.started + CHECKPOINT_EVERY
        self.next_watchdog = self.started
        self.reloads = Reload(self.reload_steps)

    # -- the life of the daemon --------------------------------------------------

    def run(self):
        """Process flow: setup, say ready, loop, shut down.  Returns the exit code."""
        try:
            self.setup()
        except (HadaemonError, OSError) as exc:
            self.signal_ready("error: %s" % exc)
            raise
        log.info("hadaemon %s started (pid %d): %d checks, %d workers, %d action sections, "
                 "state in %s", __version__, os.getpid(), len(self.config.checks),
                 self.config.daemon.workers, len(self.config.sections), self.state_dir)
        if self.store.created:
            log.info("state db: none in %s; a new one is created", self.state_dir)
        self.signal_ready("ok %d" % os.getpid())
        self.notifier.send("READY=1\nMAINPID=%d" % os.getpid())
        self.notify.event("daemon", event="started")
        try:
            self.loop()
        finally:
            self.shutdown()
        failed = sum(n for (_, result), n in self.ledger.run_counts.items() if result == "failed")
        return EXIT_FAIL if self.once and failed else EXIT_OK

    def setup(self):
        ensure_state_dir(self.state_dir)
        if not self.lock.acquire():
            pid = PidLock.holder(self.state_dir)
            raise HadaemonError("a daemon already runs on %s (pid %s)" % (self.state_dir, pid))
        self.lock.write_pid()
        raise_open_files_limit()
        self.store.open()
        for note in self.store.notes:
            log.error("state db: %s", note)
        self.ledger.open(time.time(), self.leadership.acting())
        self.scheduler.adopt_results(self.store)
        self.http.configure(self.config.daemon)    # a busy port fails the start before the socket exists
        self.server.listen()
        self.install_signals()
        self.scheduler.configure(self.config.checks, time.monotonic())
        settle_heap()

    def install_signals(self):
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, self.record_signal)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self.drain_wakeup)

    def record_signal(self, signum, frame):
        self.signals.append(signum)     # only record: the loop does the work

    def drain_wakeup(self, mask):
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def signal_ready(self, text):
        """Tell ``--start``, waiting on a pipe, that we are up (or why not)."""
        if self.ready_fd is not None:
            try:
                os.write(self.ready_fd, text.encode() + b"\n")
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None

    def loop(self):
        while True:
            now = time.monotonic()
            for key, mask in self.sel.select(self.timeout(now)):
                key.data(mask)
            now = time.monotonic()
            if self.signals:
                self.handle_signals()
            self.reap()
            self.pool.enforce_kills(now)
            if self.notifier.watchdog and now >= self.next_watchdog:
                # While stopping too: the loop is healthy while a sequence finishes.
                self.notifier.send("WATCHDOG=1")
                self.next_watchdog = now + self.notifier.watchdog
            self.http.tick(now)         # while stopping too: it answers until the end
            self.notify.tick(now)       # likewise: it delivers what waits, for a while
            # Answers that touch every check or host are made a slice per pass: due
            # checks wait for a slice, never for the whole of them.
            if self.server.answering:
                self.server.answer_some(time.monotonic() + ANSWER_SLICE)
            if self.stopping:
                if self.cluster is not None:
                    self.cluster.tick(now)     # step down, resign
                self.ledger.store.flush()
                if not self.pool.children or now >= self.stop_deadline:
                    return
                continue
            self.pool.manage(self.config, now, ssh=not self.once)
            if self.cluster is None:
                # A run queued by this pass's results starts before the checks are handed
                # out (up to AHEAD of them); once more below, for what the rest of the pass
                # queues.  Not in a cluster: a member hears etcd first (cluster.tick), where
                # the run may be another's already (test_kill_loop ran sequences twice).
                self.runs.start_next(self.config)
            self.scheduler.fire_due(now, AHEAD)
            self.flow.dispatch(now)
            if self.cluster is not None:
                self.cluster.tick(now)         # the agent, the mirror, agreement
            self.switchover.tick(time.time())     # a stored request, a scheduled one come due
            self.runs.start_next(self.config)
            if self.cluster is not None:                    # after the run it may have handed
                self.cluster.extend_lease(self.runs.handoff is not None)
            self.ledger.store.flush()       # a cluster: the pass's changes as one txn
            if self.reloads.due():
                self.reloads.step(time.monotonic() + ANSWER_SLICE)     # a reload, likewise
                self.reloads.let_go()
            self.server.tick(now)
            if now >= self.next_checkpoint:
                self.checkpoint(now)
            if self.once and self.scheduler.all_ran() and not self.ledger.queue \
                    and self.pool.action_child() is None:
                self.begin_stop("--once pass complete")

    def timeout(self, now):
        if self.server.busy() or (self.reloads.busy() and not self.stopping):
            return 0.0                  # work in steps under way: look at the sockets, go on
        wake = min(self.next_checkpoint, now + 1.0)     # the earliest deadline (no list made)
        due = None if self.stopping else self.scheduler.next_wake()
        if due is not None and due < wake:
            wake = due
        if self.notifier.watchdog and self.next_watchdog < wake:
            wake = self.next_watchdog
        if self.cluster is not None:
            wake = min(wake, self.cluster.next_wake(now))
        http = self.http.wakeup()
        if http is not None and http < wake:
            wake = http
        return max(0.0, wake - now)

    def handle_signals(self):
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGHUP:
                self.reloads.want()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.begin_stop("%s received" % signal_name(sig))
            elif sig == signal.SIGUSR1:
                reopen_log()
                log.info("log reopened")

    def reload_steps(self):
        """A reload in steps: read both files, prepare the schedule, swap it all in at
        once (no step between the scheduler's swap and the rest).  Returns the errors."""
        config = yield from load_config_steps(self.config.config_dir)
        problem = cluster_reload_problem(self.config.cluster, config.cluster)
        if problem:
            raise ConfigError([problem])
        plan = yield from self.scheduler.plan_steps(config.checks)
        try:
            self.http.configure(config.daemon)  # it binds: a busy port refuses the reload
        except HadaemonError as exc:
            raise ConfigError([str(exc)])       # before anything is swapped in
        self.reloads.bury(self.scheduler.swap(plan))
        return self.reload(config)

    def reload(self, config):
        """Swap in ``config``, read and checked whole (the schedule is swapped already).
        Returns the errors (none)."""
        self.notifier.send("RELOADING=1")
        log_changed = config.daemon.log != self.config.daemon.log
        self.reloads.bury(self.config.checks, self.config.groups)
        self.config = self.ledger.config = config
        settle_heap(collect=False)      # a collection now would walk all of them once more
        if self.cluster is not None:
            self.cluster.reconfigure(config.cluster)
        if log_changed:
            target = config.daemon.log or self.default_log
            if target == "stderr":
                target = self.default_log   # daemonized, stderr is /dev/null
            setup_logging(target, self.state_dir, log.level == logging.DEBUG)
        else:
            reopen_log()
        log.info("configuration reloaded: %d checks, %d action sections",
                 len(config.checks), len(config.sections))
        self.notifier.send("READY=1")
        self.notify.event("daemon", event="reloaded")
        return []

    def checkpoint(self, now):
        self.next_checkpoint = now + CHECKPOINT_EVERY
        try:
            self.store.checkpoint()
        except OSError:
            pass        # logged by the store; everything stays dirty for the next one

    def begin_stop(self, why):
        """No new checks or runs; the running sequence may finish within its timeouts."""
        if self.stopping:
            return
        log.info("stopping: %s", why)
        self.notifier.send("STOPPING=1")
        self.stopping = True
        self.reloads.drop("the daemon is stopping; the configuration was not reloaded")
        self.scheduler.ready.clear()
        now = time.monotonic()
        self.notify.stopping(now)
        self.pool.stop(now)
        if self.cluster is not None:
            self.cluster.stop(now)
        self.stop_deadline = now + self.runs.stop_budget(now) + 10.0
        # systemd >= 236 waits that long, not TimeoutStopSec, before its SIGKILL.
        self.notifier.send("EXTEND_TIMEOUT_USEC=%d" % ((self.stop_deadline - now + 5.0) * 1e6))

    def shutdown(self):
        for child in self.pool.kill_all():
            if child.kind == "action":
                self.runs.exited(child, "killed at stop", self.stopping)
        self.server.close_all()
        self.http.close()
        try:
            self.checkpoint(time.monotonic())
            self.store.close()
        except OSError as exc:
            log.error("closing the state db: %s", exc)
        self.lock.release()
        log.info("stopped")

    # -- checks: Scheduler -> a worker -> Ledger -------------------------------------

    def reap(self):
        for child, how in self.pool.reap():
            self.server.drain(child)        # what it sent before it went
            self.pool.forget(child)
            if child.kind == "worker":
                self.worker_exited(child, how)
            elif child.kind == "ssh":
                self.pool.ssh.reaped(child, how)
            elif child.kind == "cluster":
                self.cluster.agent_exited(child, how, self.stopping)
            elif child.kind == "notify":
                self.notify.exited(child, how, self.stopping)
            else:
                self.runs.exited(child, how, self.stopping)

    def worker_exited(self, child, how):
        self.pool.worker_gone(child, how)
        self.flow.worker_exited(child, self.stopping, how)

    def child_event(self, child, msg):
        """What the cluster agent or an action run says."""
        if child.kind == "cluster":
            self.cluster.member.on_message(msg, time.monotonic())
        elif child.kind == "notify":
            self.notify.on_message(child, msg)
        else:
            self.runs.event(child, msg)

    # -- what the daemon answers -------------------------------------------------------

    def answer(self, msg):
        """A control verb (from the socket): its answer."""
        cmd = msg.get("cmd")
        if cmd == "status":
            return self.status_stream()
        if cmd == "reload":
            if self.stopping:
                return {"ok": False, "errors": ["the daemon is stopping"]}
            return self.reloads.answer()
        if cmd in ("pause", "resume"):
            return {"ok": True, "paused": self.set_paused(cmd == "pause", "request"),
                    "cluster": self.cluster is not None}
        if cmd == "history":
            return {"ok": True, "history": self.ledger.history(
                msg.get("n") if isinstance(msg.get("n"), int) else 20)}
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd in ("rerun", "run"):
            return self.answer_run(cmd, msg.get("run"))
        if cmd in SwitchoverDesk.VERBS:
            return self.switchover.answer(msg, time.time())
        return {"ok": False, "errors": ["unknown command %r" % (cmd,)]}

    def set_paused(self, paused, by):
        """--pause / --resume, or POST /pause and /resume: the paused state to answer."""
        self.notify.event("daemon", event="paused" if paused else "resumed")
        paused = self.ledger.set_paused(paused)
        log.warning("actions %s by %s%s", "paused" if paused else "resumed", by,
                    " (the whole cluster, once etcd has it)" if self.cluster else "")
        return paused

    def answer_run(self, cmd, run_id):
        """``rerun``: queue run ``run_id``'s section again (docs/operating.md); ``run``: how it is now."""
        if not isinstance(run_id, int) or isinstance(run_id, bool):
            return {"ok": False, "errors": ["bad run id %r" % (run_id,)]}
        if cmd == "run":
            run = self.ledger.runs.get(run_id)
            return {"ok": True, "run": run.summary()} if run else \
                {"ok": False, "errors": ["no run #%d in the history" % run_id]}
        if not self.leadership.acting():
            leader = self.leadership.leader_name()
            return {"ok": False, "errors": ["this member does not lead the cluster: run --rerun on "
                                            "the leader (%s)" % (leader or "none now")]}
        try:
            return {"ok": True, "run": self.ledger.rerun(run_id, time.time()).summary()}
        except ValueError as exc:
            return {"ok": False, "errors": [str(exc)]}

    def daemon_status(self, now_m):
        """The DaemonBlock of --status --json."""
        cluster = None
        if self.cluster is not None:
            cluster = self.cluster.member.status(now_m, getattr(self.cluster.agent(), "pid", None))
        return DaemonBlock(running=True, pid=os.getpid(), version=__version__,
                           started=self.started_wall, uptime=now_m - self.started,
                           config_dir=self.config.config_dir, state_dir=self.state_dir,
                           lag_ms=self.scheduler.lag_summary(), http=self.http.url,
                           counters=dict(self.ledger.counters(), **self.notify.status()), cluster=cluster,
                           **self.ledger.daemon_status(), **self.pool.status())

    def status_doc(self):
        """The StatusDoc, its hosts and checks made as they are read."""
        now_m, now = time.monotonic(), time.time()
        recent = self.ledger.recent()
        return StatusDoc(recent["transitions"], recent["runs"], self.daemon_status(now_m),
                         self.ledger.host_entries(), self.scheduler.status(now_m, now))

    def status_stream(self):
        """--status --json as pieces of its one line: the daemon's block, then what each
        part says of itself, the hosts and checks a few hundred at a time (the loop
        goes on between the pieces, so ten thousand checks hold up nothing due)."""
        yield from self.status_doc().pieces()

    def status_document(self):
        """--status --json whole, as a dict, made in one go (the HTTP server's pages)."""
        return self.status_doc().to_wire()

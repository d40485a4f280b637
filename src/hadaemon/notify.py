"""Notifications: events made, stored, and delivered one at a time by a child (docs/notify.md).

Owns the ``notify =`` command's events (SPEC §12): Notifications, the master's
part, which every other part tells what happened through one call,
``event(kind, **keys)``; notify_main, the child that runs the command for one
event at a time (its retries included); and --notify-test.

  event()       stamp (kind, time, node), store (NotifyQueue: seq, the state db),
                hand the head to the child when it is free
  the child     the command with the event as one JSON object on stdin, HA_EVENT
                in its environment, cwd = the config dir; a try that exits
                non-zero or runs past notify_timeout is made again after 1, 2 and
                4 s; then it says ``done`` (ok, or failed: given up)
  done          the event leaves the queue (committed), the next is handed

The master's loop never waits for a notify command: the child runs it, and the
master only sends a line and reads one.  A child that dies is replaced (after a
second when it died young) and is handed the same event again.

Uses: base, wire, proc, children, pool, actions, notify_queue.
"""

import json
import os
import select
import signal
import socket
import sys
import tempfile
import time

from .base import EXIT_FAIL, EXIT_OK, ProtocolError, format_duration, killpg_quietly, log
from .wire import Channel
from .proc import ChildWatch, run_process
from .children import child_setup
from .pool import KILL_GRACE
from .actions import _spawned_pid
from .notify_queue import NotifyQueue

NOTIFY_RETRIES = (1.0, 2.0, 4.0)    # seconds before each try again
NOTIFY_KILL_GRACE = 2.0             # a notify command past its timeout: SIGTERM, then SIGKILL
NOTIFY_STOP_WAIT = 5.0              # stopping: how long after the last event its delivery may take


def notify_node(config):
    """``node`` of every event: the cluster's node, or this host's name."""
    return config.cluster.node if config.cluster is not None else socket.gethostname()


def deliver_event(argv, event, timeout, watch, master=None, environ=None, on_spawn=None):
    """Run the notify command ``argv`` once with ``event`` on its stdin: its ProcResult."""
    env = dict(os.environ if environ is None else environ)
    env.update(HA_EVENT=str(event.get("kind")), HA_SEQ=str(event.get("seq")))
    with tempfile.TemporaryFile() as f:
        f.write(json.dumps(event, sort_keys=True).encode("utf-8") + b"\n")
        f.seek(0)
        return run_process(list(argv), env, timeout, NOTIFY_KILL_GRACE, watch, stdin_fd=f.fileno(),
                           merge_stderr=True, master=master, on_spawn=on_spawn)


def _output_tail(output):
    lines = output.decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def _rest(chan, seconds):
    """Wait ``seconds`` before a try again, listening to the master: False when told to go."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        readable, _, _ = select.select([chan.sock], [], [], left)
        if readable:
            msg = chan.receive()
            if msg is None or msg.get("t") == "exit":
                return False


def notify_main(sock_path, config_dir):
    """The notify child: hello, then one event at a time, each tried until it is delivered
    or given up, each try's failure and the end said to the master."""
    child_setup()
    os.chdir(config_dir)
    watch = ChildWatch()
    chan = Channel.connect(sock_path)
    chan.send({"t": "hello", "role": "notify", "pid": os.getpid()})
    environ = dict(os.environ, HA_CONFIG_DIR=config_dir, HA_STATE_DIR=os.path.dirname(sock_path))
    while True:
        msg = chan.receive()
        if msg is None or msg.get("t") == "exit":
            return 0
        event, argv, timeout = msg["event"], msg["argv"], msg["timeout"]

        def announce(pid, seq=event["seq"]):
            # The master kills this group if we die before the command ends.
            chan.send({"t": "spawned", "seq": seq, "pid": pid})
        for tries, again in enumerate(NOTIFY_RETRIES + (None,), 1):
            res = deliver_event(argv, event, timeout, watch, chan.sock, environ, announce)
            failure = res.failure(timeout)
            if failure is None:
                break
            chan.send({"t": "failed", "seq": event["seq"], "try": tries, "error": failure,
                       "output": _output_tail(res.output), "again": again})
            if again is not None and not _rest(chan, again):
                return 0
        chan.send({"t": "done", "seq": event["seq"], "result": "failed" if failure else "ok",
                   "tries": tries, "error": failure})


class Notifications:
    """The master's part: ``event()`` from every other part; the notify child, kept by it.

    ``config_of()`` gives the configuration of now (a reload swaps it)."""

    def __init__(self, store, pool, server, config_of):
        self.queue = NotifyQueue(store)
        self.pool, self.server, self.config_of = pool, server, config_of
        self.pid = None                 # the notify child's
        self.inflight = None            # the seq handed to it, until it says done
        self.child_after = 0.0          # no child forked before (after a quick death)
        self.leave_by = None            # stopping: the child goes when nothing waits, or then
        self.troubled = set()           # checks whose trouble was told (until they run cleanly)

    def event(self, kind, **keys):
        """SPEC §12: an event of ``kind`` with ``keys``, stored, then delivered in its turn
        (nothing when no notify command is set).  The one call every part makes."""
        config = self.config_of()
        if config.daemon.notify is None:
            return None
        event = dict({"kind": kind, "time": round(time.time(), 6), "node": notify_node(config)}, **keys)
        event = self.queue.push(event)
        if self.leave_by is not None:       # stopping: this one gets its chance too
            self.leave_by = max(self.leave_by, time.monotonic() + NOTIFY_STOP_WAIT)
        self.hand()
        return event

    def check_ran(self, rt, result):
        """A check's run (its runtime, its CheckResult): a ``check`` event when it was cut
        short (timed out, could not start) or reported a rejected name; once until it
        runs cleanly again."""
        if self.config_of().daemon.notify is None:
            return
        rejected = rt.last["rejected"]
        key = rt.check.key
        if not result.failed and not rejected:
            self.troubled.discard(key)
        elif key not in self.troubled:
            self.troubled.add(key)
            message = (result.trouble or result.data.get("message")) if result.failed else rejected[0]
            self.event("check", check=rt.check.name, message=str(message)[:500])

    def child(self):
        return self.pool.children.get(self.pid) if self.pid is not None else None

    def hand(self):
        """The head of the queue to the child, when it is free and connected."""
        child = self.child()
        if self.inflight is not None or child is None or child.conn is None or child.kill_at:
            return
        settings = self.config_of().daemon
        event = self.queue.head()
        if event is None or settings.notify is None:
            return
        self.inflight = event["seq"]
        self.server.send(child.conn, {"t": "event", "event": event, "argv": list(settings.notify),
                                      "timeout": settings.notify_timeout})

    def tick(self, now):
        """Every pass of the loop: a child while events wait (stopping: until it may go)."""
        if self.pid is None and self.leave_by is None and self.queue.opened and not self.queue.waiting:
            return                      # no child, nothing waits: the usual pass
        child = self.child()
        if self.leave_by is not None and self._leave(child, now):
            return
        if child is None and now >= self.child_after and self.queue.head() is not None \
                and self.config_of().daemon.notify is not None:
            child = self.pool.fork("notify", notify_main, self.pool.sock_path, self.config_of().config_dir)
            self.pid = child.pid if child is not None else None
            self.child_after = now + 1.0 if child is None else 0.0
        self.hand()

    def _leave(self, child, now):
        """Stopping: whether the child goes now (nothing waits any more, or its time is up)."""
        idle = self.inflight is None and not self.queue.waiting and self.pool.action_child() is None
        if not idle and now < self.leave_by:
            return False
        if child is not None and child.kill_at is None:
            child.signal(signal.SIGTERM, now + KILL_GRACE)
            if not idle:
                log.warning("notify: stopping with %d events not delivered; they are delivered "
                            "after the next start", len(self.queue.waiting))
        return True

    def stopping(self, now):
        """The daemon stops: the ``stopping`` event; the child goes once nothing waits, or
        NOTIFY_STOP_WAIT later (what is left is delivered after the next start): a hung
        receiver does not hold up a stop."""
        self.leave_by = now + NOTIFY_STOP_WAIT
        self.event("daemon", event="stopping")

    def on_message(self, child, msg):
        """What the notify child says: a try failed, or an event is done with."""
        kind, seq = msg.get("t"), msg.get("seq")
        if seq != self.inflight or kind not in ("spawned", "failed", "done"):
            raise ProtocolError("unexpected notify message %r for seq %r" % (kind, seq))
        if kind == "spawned":
            child.pgid = _spawned_pid(msg)
            return
        child.pgid = None
        event = self.queue.head() or {}
        what = "event %s (%s)" % (seq, event.get("kind") if event.get("seq") == seq else "dropped")
        if kind == "failed":
            log.warning("notify: %s: try %s of %d failed: %s%s%s", what, msg.get("try"),
                        len(NOTIFY_RETRIES) + 1, msg.get("error"),
                        " (%s)" % msg["output"] if msg.get("output") else "",
                        "; again in %s" % format_duration(msg["again"]) if msg.get("again") else "")
            return
        result = "ok" if msg.get("result") == "ok" else "failed"
        if result == "failed":
            log.error("notify: %s dropped after %s tries: %s", what, msg.get("tries"), msg.get("error"))
        self.inflight = None
        self.queue.finish(seq, result)
        self.hand()

    def exited(self, child, how, stopping):
        """The notify child is gone: the event it had is handed to the next one again."""
        if child.pgid:
            killpg_quietly(child.pgid, signal.SIGKILL)  # the command it left behind
        self.pid = self.inflight = None
        if stopping and child.kill_at is not None:
            return
        log.error("notify child %d died (%s); %s", child.pid, how,
                  "replacing it" if self.queue.waiting else "a new one starts with the next event")
        if time.monotonic() - child.started < 1.0:
            self.child_after = time.monotonic() + 1.0

    def status(self):
        return self.queue.status()


def notify_test(config, state_dir):
    """--notify-test: the notify command once, with an event of kind ``test`` (seq 0), no
    daemon; prints what it did.  Exit 0 when the command exited 0."""
    settings = config.daemon
    if settings.notify is None:
        print("hadaemon: no notify command: set notify = COMMAND ARGS in [daemon] of %s"
              % os.path.join(config.config_dir, "checks.conf"), file=sys.stderr)
        return EXIT_FAIL
    event = {"kind": "test", "seq": 0, "time": round(time.time(), 6), "node": notify_node(config),
             "message": "a test event from hadaemon --notify-test"}
    print("notify command: %s" % " ".join(settings.notify))
    print("event (stdin, HA_EVENT=test): %s" % json.dumps(event, sort_keys=True))
    os.chdir(config.config_dir)
    environ = dict(os.environ, HA_CONFIG_DIR=config.config_dir, HA_STATE_DIR=state_dir)
    res = deliver_event(settings.notify, event, settings.notify_timeout, ChildWatch(), environ=environ)
    for line in res.output.decode("utf-8", "replace").splitlines()[:50]:
        print("  | %s" % line)
    failure = res.failure(settings.notify_timeout)
    print("%s in %.3fs" % (failure or "exit 0", res.duration))
    return EXIT_FAIL if failure else EXIT_OK

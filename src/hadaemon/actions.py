"""Action runs: the queue's head, handed to the action run, and what it says back.

At most one sequence runs at a time, in the action run the Pool keeps waiting.
The head of the Ledger's queue is handed to it; its events (a command started,
spawned, ended; the sequence done; in a cluster's leader, whether it still may)
go to the Ledger; its death ends the run as failed, or interrupted when the
daemon stops or a cluster's leader steps down.

Uses: base.
"""

import signal
import time

from .base import ACTION_KILL_GRACE, ProtocolError, format_duration, killpg_quietly, log


def _command_index(run, msg):
    index = msg.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(run["commands"]):
        raise ProtocolError("bad command index %r" % (index,))
    return index


def _spawned_pid(msg):
    """The pid of a {t: spawned} message: an action run's command, leader of its group."""
    pid = msg.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise ProtocolError("bad pid %r in a spawned message" % (pid,))
    return pid


class ActionRuns:
    """Ledger -> the action run -> Ledger."""

    def __init__(self, ledger, pool, server, cluster):
        self.ledger, self.pool, self.server = ledger, pool, server
        self.cluster = cluster          # a ClusterLink, or None

    def start_next(self, config_dir):
        if self.pool.action_child() is not None:
            return
        run = self.ledger.head()
        if run is None:
            return
        if self.ledger.paused:
            self.ledger.dequeue(run, "skipped", "paused", time.time())
            return
        child = self.pool.runner(config_dir)
        if child is None:
            self.ledger.dequeue(run, "failed", "cannot fork the action run", time.time())
            return
        if child.conn is None:
            return                      # not connected yet: a later pass hands it the run
        self.ledger.dequeue(run, "running", None, time.time())
        child.run_id = run["id"]
        self.server.send(child.conn, {"t": "run", "run": run})

    def event(self, child, msg):
        """The action run reports: a command started, spawned, ended; the sequence is done;
        in a cluster it asks before each command (``may``) whether it still may."""
        run = self.ledger.runs.get(child.run_id)
        if run is None or msg.get("run") != run["id"]:
            raise ProtocolError("event for run %r, expected %r" % (msg.get("run"), child.run_id))
        kind = msg.get("t")
        if kind == "start":
            self.ledger.command_started(run, _command_index(run, msg), msg.get("time"))
        elif kind == "spawned":
            _command_index(run, msg)
            child.pgid = _spawned_pid(msg)
        elif kind == "end":
            child.pgid = None
            self.ledger.command_ended(run, _command_index(run, msg), msg)
        elif kind == "may" and self.cluster is not None:
            _command_index(run, msg)
            self.server.send(child.conn, self.cluster.may())
        elif kind == "done":
            state = msg.get("result") if msg.get("result") in ("ok", "interrupted") else "failed"
            self.ledger.finish(run, state, msg.get("reason"), time.time())
        else:
            raise ProtocolError("unknown action event %r" % (kind,))

    def exited(self, child, how, stopping):
        if child.pgid:
            killpg_quietly(child.pgid, signal.SIGKILL)  # the command it left behind
        if child.run_id is None:        # the spare, before it had a sequence
            self.pool.spare_gone(child, how)
            return
        run = self.ledger.runs.get(child.run_id)
        if run is None or run["state"] != "running":
            return
        stepped = self.cluster.interrupted() if self.cluster is not None else None
        if stepped:
            self.ledger.finish(run, "interrupted", "%s (%s)" % (stepped, how), time.time())
        elif stopping:
            self.ledger.finish(run, "interrupted", "the daemon stopped while it ran (%s)" % how, time.time())
        else:
            self.ledger.finish(run, "failed", "the action run died (%s)" % how, time.time())

    def stop_budget(self, now):
        """The daemon stops: the time the running sequence has left to finish in (its
        commands' timeouts), or 10 s when none runs; its kill is set for then."""
        action = self.pool.action_child()
        if action is None:
            return 10.0
        run = self.ledger.runs.get(action.run_id) or {}
        pending = [c for c in run.get("commands", []) if "result" not in c]
        budget = sum(c["timeout"] + ACTION_KILL_GRACE for c in pending) + 1.0
        log.info("waiting up to %s for run %s to finish", format_duration(budget), action.run_id)
        action.kill_at = now + budget
        return budget

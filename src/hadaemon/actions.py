"""Action runs: the queue's head, handed to the action run, and what it says back.

At most one sequence runs at a time, in the action run the Pool keeps waiting.
The head of the Ledger's queue is handed to it; its events (a command started,
spawned, ended; the sequence done; in a cluster's leader, whether it still may)
go to the Ledger; its death ends the run as failed, or interrupted when the
daemon stops or a cluster's leader steps down.

Uses: base, switchover.
"""

import signal
import time

from .base import ACTION_KILL_GRACE, ProtocolError, format_duration, killpg_quietly, log
from .switchover import cannot_start


def _command_index(run, msg):
    index = msg.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(run.commands):
        raise ProtocolError("bad command index %r" % (index,))
    return index


def _spawned_pid(msg):
    """The pid of a {t: spawned} message: an action run's command, leader of its group."""
    pid = msg.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise ProtocolError("bad pid %r in a spawned message" % (pid,))
    return pid


class Alone:
    """The leadership of a daemon alone: it always acts, asks no one, stamps nothing.
    (A cluster member's is its ClusterLink.)"""

    confirms = False                    # its action run asks nobody before a command

    def acting(self):
        return True

    def stamp(self):
        return None

    def interrupted(self):
        return None

    def leader_name(self):
        return None


class ActionRuns:
    """Ledger -> the action run -> Ledger."""

    def __init__(self, ledger, pool, server, leadership):
        self.ledger, self.pool, self.server = ledger, pool, server
        self.leadership = leadership    # Alone, or a cluster member's ClusterLink
        self.handoff = None             # (run, ticket): handed to its action run once durable

    def start_next(self, config):
        """docs/configuration.md: one sequence at a time, in order; docs/cluster.md: only
        the acting leader, and a run goes to its action run only once its ``running``
        is durable (at once in a daemon alone's state db; in etcd once it acknowledged)."""
        if self.handoff is None and not self.ledger.queue:
            return                      # nothing to hand, nothing queued: the usual pass
        if not self.leadership.acting():
            self.handoff = None         # stepping down: nothing is handed any more
            return
        if self.handoff is not None:
            self._deliver()
            return
        if self.pool.action_child() is not None:
            return
        run = self.ledger.head()
        if run is None:
            return
        now = time.time()
        why = cannot_start(self.ledger, run, now)       # paused; a switchover's refusal
        if why:
            self.ledger.dequeue(run, why[0], why[1], now)
            return
        try:
            commands = self.ledger.commands_for(run, config)
        except ValueError as exc:
            self.ledger.dequeue(run, "failed", str(exc), now)
            return
        child = self.pool.runner(config.config_dir)
        if child is None:
            self.ledger.dequeue(run, "failed", "cannot fork the action run", now)
            return
        if child.conn is None:
            return                      # not connected yet: a later pass hands it the run
        self.ledger.start(run, commands, self.leadership.stamp(), config.config_dir, now)
        ticket = self.ledger.store.flush()  # with the transition, if it came in this pass
        if ticket is None:
            return                      # not written (no longer leading): nothing handed
        child.run_id = run.id
        self.handoff = (run, ticket)
        self._deliver()

    def _deliver(self):
        run, ticket = self.handoff
        child = self.pool.action_child()
        if child is None or child.run_id != run.id:
            self.handoff = None         # its action run died: recorded by exited()
        elif self.ledger.store.durable(ticket):
            self.handoff = None
            self.server.send(child.conn, {"t": "run", "run": run.to_action(self.leadership.confirms)})

    def event(self, child, msg):
        """The action run reports: a command started, spawned, ended; the sequence is done;
        in a cluster it asks before each command (``may``) whether it still may."""
        run = self.ledger.runs.get(child.run_id)
        if run is None or msg.get("run") != run.id:
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
        elif kind == "may" and self.leadership.confirms:
            _command_index(run, msg)
            self.server.send(child.conn, self.leadership.may())
        elif kind == "done" and run.state != "running":
            # Ended already: a leader that took over again interrupted it before its
            # last command's SIGTERM came back (cluster_link.take_over).
            log.info("run %d: its action run's end (%s) comes after the run was %s", run.id,
                     msg.get("result"), run.state)
        elif kind == "done":
            state = msg.get("result") if msg.get("result") in ("ok", "interrupted") else "failed"
            reason = msg.get("reason")
            stepped = self.leadership.interrupted()
            if stepped and state == "failed":
                # its command ended by the step-down's SIGTERM (exit 143): interrupted, as
                # the next leader would record it
                state, reason = "interrupted", "%s (%s)" % (stepped, reason)
            self.ledger.finish(run, state, reason, time.time())
        else:
            raise ProtocolError("unknown action event %r" % (kind,))

    def exited(self, child, how, stopping):
        if child.pgid:
            killpg_quietly(child.pgid, signal.SIGKILL)  # the command it left behind
        if child.run_id is None:        # the spare, before it had a sequence
            self.pool.spare_gone(child, how)
            return
        run = self.ledger.runs.get(child.run_id)
        if run is None or run.state != "running":
            return
        stepped = self.leadership.interrupted()
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
        run = self.ledger.runs.get(action.run_id)
        pending = [c for c in run.commands if c.result is None] if run else []
        budget = sum(c.timeout + ACTION_KILL_GRACE for c in pending) + 1.0
        log.info("waiting up to %s for run %s to finish", format_duration(budget), action.run_id)
        action.kill_at = now + budget
        return budget

"""The cluster as a part of the master: agent, member and the ledger's etcd store wired together.

Owns ClusterLink: the agent child (forked by the Pool), the messages between it and
the ClusterMember, what the mirror's news and taking over mean for the Ledger
(reread, interrupt_running), when the leader weighs the members' views (agree),
the lease clock told to the running command, and the cluster's face of the
leadership ActionRuns asks (acting, stamp, may, interrupted; a daemon alone's is
actions.Alone).

Uses: base, pool, cluster_agent.
"""

import signal
import time

from .base import killpg_quietly, log
from .pool import KILL_GRACE
from .cluster_agent import cluster_agent_main


class ClusterLink:
    """The cluster as a part of the master: the agent (a child in the Pool), the member
    and the cluster ledger.  The master calls ``tick`` every pass of its loop, hands it
    the agent's messages, and asks it before an action command starts."""

    def __init__(self, ledger, pool, server):
        self.ledger, self.store, self.member = ledger, ledger.store, ledger.store.member
        self.pool, self.server = pool, server
        self.agent_after = 0.0          # no agent forked before (after quick deaths)
        self.extended = None            # the lease clock the running command was last told
        self.leave_by = None            # stopping: the agent goes once the lease is revoked, or then
        self.restarting = None          # the pid of an agent asked to go (a new ttl)

    def agent(self):
        return next((c for c in self.pool.children.values() if c.kind == "cluster"), None)

    def tick(self, now):
        """One pass: keep the agent, send what the member asks, act on what it noted."""
        agent = self.agent()
        if agent is None and self.leave_by is None and now >= self.agent_after:
            self.pool.fork("cluster", cluster_agent_main, self.pool.sock_path, self.member.settings)
        elif agent is not None and agent.conn is not None:
            if self.leave_by is None:
                self.member.tick(now)
            for request in self.member.take_requests():
                self.server.send(agent.conn, request)
        while self.member.notes:
            note = self.member.notes.popleft()
            if note[0] == "mirror":
                if self.store.mirrored(note[1], self.ledger.cap) and self.member.role != "leader":
                    # an event, not a whole snapshot: say what the leader did
                    self.ledger.reread(log_new=len(note[1]) < 100)
            elif note[0] == "acting":
                self.take_over(time.time())
            elif note[0] == "written":
                self.store.written(note[1], note[2])
            elif note[0] == "paused" and note[2]:
                log.error("cluster: a request (pause, resume, switchover) not written: %s", note[2])
        if self.member.stepping is not None:
            self.stepping(now)
        elif self.leave_by is not None and agent is not None and agent.kill_at is None and \
                (now >= self.leave_by or not self.member.inflight):
            agent.signal(signal.SIGTERM, now + KILL_GRACE)
        if self.leave_by is None:
            self.agree(time.time())

    # -- the leadership ActionRuns asks (a daemon alone's is Alone) ----------------------

    confirms = True                     # the action run asks ``may`` before each command

    def acting(self):
        return self.member.acting

    def stamp(self):
        """Who runs a run: (cluster, node, epoch)."""
        return self.member.settings.name, self.member.settings.node, self.member.epoch

    def leader_name(self):
        return self.member.leader()[0]

    def extend_lease(self, handing):
        """A renewal moved the lease clock on: the running command's deadlines move with it
        (its action run keeps them itself, so a frozen master cannot keep it running).
        ``handing``: a run waits to be handed; its ``run`` must reach it first."""
        member = self.member
        if not member.acting or member.stepping or member.renew_failed or \
                member.valid_until == self.extended:
            return
        child = self.pool.action_child()
        if child is None or child.conn is None or handing:
            return
        self.extended = member.valid_until
        self.server.send(child.conn, {"t": "lease", "until": member.stop_at(), "kill_at": member.kill_by()})

    def stepping(self, now):
        """Stepping down: the running command gets SIGTERM, SIGKILL by kill_at; then resign."""
        step = self.member.stepping
        child = self.pool.action_child()
        if child is not None:
            if not step.get("termed"):
                step["termed"] = True
                if child.pgid:
                    killpg_quietly(child.pgid, signal.SIGTERM)
            if now >= step["kill_at"] and not step.get("killed"):
                step["killed"] = True
                if child.pgid:
                    killpg_quietly(child.pgid, signal.SIGKILL)
                child.signal(signal.SIGKILL, now + KILL_GRACE)
            return
        self.ledger.store.flush()           # the run it ended, before the lease is revoked
        self.member.stepped_down(now)
        self.ledger.reread()

    def agree(self, now):
        """The acting leader: every host that quorum live members see in a new state moves."""
        if not self.store.views_changed or not self.member.acting:
            return
        self.store.views_changed = False
        self.ledger.agree(self.member.agreement(self.ledger.states()), now)

    def take_over(self, now):
        """We lead now: the ledger as etcd holds it, with every earlier leader's writes;
        what was running under one of them is interrupted, never run again."""
        ledger = self.ledger
        ledger.reread()
        ledger.notify("leader", leader=self.member.node, epoch=self.member.epoch)
        ledger.interrupt_running(lambda run: "its leader (%s, epoch %s) lost the lead while it ran"
                                 % ("?" if run.node is None else run.node,
                                    "?" if run.node is None else run.epoch), now)
        self.store.views_changed = True
        log.info("cluster %s: %s takes over the ledger: %d hosts, %d transitions, %d runs, %d queued",
                 self.member.settings.name, self.member.node, len(ledger.hosts), len(ledger.transitions),
                 len(ledger.runs), len(ledger.queue))

    def next_wake(self, now):
        """When the loop must pass again for the cluster, at the latest.

        Only what a pass can act on counts: a deadline already past whose work waits
        for the agent (a renewal in flight, requests while it is not connected) would
        make the loop spin until the agent answers.
        """
        member = self.member
        agent = self.agent()
        connected = agent is not None and agent.conn is not None
        if member.notes or (connected and member.outbox):
            return now
        times = [member.next_renew, member.next_put, member.next_campaign, member.next_revoke]
        if agent is None and self.leave_by is None:
            times.append(self.agent_after)
        if member.stepping is not None:
            times.append(member.stepping["kill_at"])
        elif member.role == "leader" and member.valid_until is not None:
            times.append(member.stop_at())
        if member.valid_until is not None:
            times.append(member.valid_until)
        return min([t for t in times if t > now] or [now + 1.0])

    def may(self):
        """The answer to an action run that asks before its next command."""
        until = self.member.may_start(time.monotonic())
        if until is None:
            why = (self.member.stepping or {}).get("why") or "its lease is not renewed"
            return {"t": "stop", "reason": "the leader may not start commands: %s" % why}
        return {"t": "go", "until": until, "kill_at": self.member.kill_by()}

    def interrupted(self):
        """Why a run ends now, if the leader is stepping down (None otherwise)."""
        step = self.member.stepping
        return "the leader stepped down: %s" % step["why"] if step else None

    def agent_exited(self, child, how, stopping):
        self.member.agent_lost(time.monotonic())
        if stopping or self.leave_by is not None or child.pid == self.restarting:
            return
        log.error("cluster agent %d died (%s); replacing it", child.pid, how)
        if time.monotonic() - child.started < 1.0:
            self.agent_after = time.monotonic() + 1.0

    def stop(self, now):
        """The daemon stops: a leader steps down (its command ended, its run interrupted),
        then the lease is revoked, and the agent goes."""
        if self.member.role == "leader":
            self.member.step_down("the daemon stops", now)
        elif self.member.lease is not None:
            self.member.stepped_down(now)
        self.leave_by = now + 2.0 + self.member.settings.ttl / 4.0

    def reconfigure(self, settings):
        """quorum and ttl on reload (a new ttl with the next lease; the agent's timeouts too)."""
        ttl_changed = settings.ttl != self.member.settings.ttl
        self.member.settings = settings
        self.store.views_changed = True         # a new quorum may move a host now
        agent = self.agent()
        if ttl_changed and agent is not None:
            log.info("cluster: ttl is now %ds; the cluster agent restarts with its timeouts", settings.ttl)
            self.restarting = agent.pid
            agent.signal(signal.SIGTERM, time.monotonic() + KILL_GRACE)

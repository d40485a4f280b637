"""The cluster as a part of the master: agent, member and cluster ledger wired together.

Owns ClusterLink: the agent child (forked by the Pool), the messages between it and
the ClusterMember, the cluster ledger's writes in flight, and the answer to "may
this command start?" that the action run asks before each command in a leader.

Uses: base, children, pool, cluster_agent.
"""

import os
import signal
import time

from .base import killpg_quietly, log
from .children import expand_commands
from .pool import KILL_GRACE
from .cluster_agent import cluster_agent_main


class ClusterLink:
    """The cluster as a part of the master: the agent (a child in the Pool), the member
    and the cluster ledger.  The master calls ``tick`` every pass of its loop, hands it
    the agent's messages, and asks it before an action command starts."""

    def __init__(self, ledger, pool, server):
        self.ledger, self.member = ledger, ledger.member
        self.pool, self.server = pool, server
        self.agent_after = 0.0          # no agent forked before (after quick deaths)
        self.handoff = None             # (run, rid): handed to its action run once rid is acknowledged
        self.extended = None            # the lease clock the running command was last told
        self.leave_by = None            # stopping: the agent goes once the lease is revoked, or then
        self.restarting = None          # the pid of an agent asked to go (a new ttl)

    def agent(self):
        return next((c for c in self.pool.children.values() if c.kind == "cluster"), None)

    def tick(self, now, config):
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
                self.ledger.mirrored(note[1])
            elif note[0] == "acting":
                self.ledger.take_over(time.time())
            elif note[0] == "written":
                self.ledger.written(note[1], note[2])
            elif note[0] == "paused" and note[2]:
                log.error("cluster: pause / resume not written: %s", note[2])
        if self.member.stepping is not None:
            self.stepping(now)
        elif self.leave_by is not None and agent is not None and agent.kill_at is None and \
                (now >= self.leave_by or not self.member.inflight):
            agent.signal(signal.SIGTERM, now + KILL_GRACE)
        if self.leave_by is None:
            self.ledger.agree(time.time())
            self.start_next_run(config)
            self.extend_lease()
        self.ledger.store.flush()

    def extend_lease(self):
        """A renewal moved the lease clock on: the running command's deadlines move with it
        (its action run keeps them itself, so a frozen master cannot keep it running)."""
        member = self.member
        if not member.acting or member.stepping or member.renew_failed or \
                member.valid_until == self.extended:
            return
        child = self.pool.action_child()
        if child is None or child.conn is None or self.handoff is not None:
            return
        self.extended = member.valid_until
        self.server.send(child.conn, {"t": "lease", "until": member.stop_at(), "kill_at": member.kill_by()})

    def stepping(self, now):
        """Stepping down: the running command gets SIGTERM, SIGKILL by kill_at; then resign."""
        self.handoff = None
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
        self.ledger.reload()

    def start_next_run(self, config):
        """The acting leader runs the queue: each run is recorded running in etcd, and
        only once etcd acknowledged that is it handed to its action run."""
        if not self.member.acting:
            return
        child = self.pool.action_child()
        if self.handoff is not None:
            run, rid = self.handoff
            if child is None or child.run_id != run["id"]:
                self.handoff = None             # its action run died: recorded by ActionRuns.exited
            elif self.ledger.acked >= rid:
                self.handoff = None
                self.server.send(child.conn, {"t": "run", "run": dict(run, confirm=True)})
            return
        if child is not None:
            return
        run = self.ledger.head()
        if run is None:
            return
        now = time.time()
        if self.ledger.paused:
            self.ledger.dequeue(run, "skipped", "paused", now)
            return
        section = config.section_for(run["host"], run["from"], run["to"])
        try:
            if section is None or section.name != run["section"]:
                raise ValueError("no section [%s] in this member's %s" % (
                    run["section"], os.path.join(config.config_dir, "actions.conf")))
            commands = expand_commands(section, run.get("variables") or {})
        except ValueError as exc:
            self.ledger.dequeue(run, "failed", str(exc), now)
            return
        child = self.pool.runner(config.config_dir)
        if child is None:
            self.ledger.dequeue(run, "failed", "cannot fork the action run", now)
            return
        if child.conn is None:
            return                      # not connected yet: a later pass hands it the run
        settings = self.member.settings
        run["commands"], run["node"], run["epoch"] = commands, settings.node, self.member.epoch
        run["env"] = dict(run["env"], HA_CONFIG_DIR=config.config_dir, HA_STATE_DIR=self.ledger.state_dir,
                          HA_CLUSTER=settings.name, HA_NODE=settings.node,
                          HA_LEADER_EPOCH=str(self.member.epoch))
        self.ledger.dequeue(run, "running", None, now)
        rid = self.ledger.store.flush()     # with the transition, if it came in this pass
        if rid is None:
            return                      # not written (no longer leading): nothing handed
        child.run_id = run["id"]
        self.handoff = (run, rid)

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
        self.ledger.views_changed = True        # a new quorum may move a host now
        agent = self.agent()
        if ttl_changed and agent is not None:
            log.info("cluster: ttl is now %ds; the cluster agent restarts with its timeouts", settings.ttl)
            self.restarting = agent.pid
            agent.signal(signal.SIGTERM, time.monotonic() + KILL_GRACE)

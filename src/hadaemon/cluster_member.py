"""Cluster member: the lease by our own clock, the leader, the views (docs/cluster.md).

What this daemon knows and decides as one member of the cluster, with no socket
and no process: the master hands it the agent's messages and the time, sends the
requests it queues, and asks it before it acts.

The lease clock.  A renewal sent at our monotonic time t and answered with TTL
means etcd's lease lives at least until t + TTL (etcd set its expiry when the
renewal reached it, after t).  That bound, ``valid_until``, is all we trust:

    t ---------- t + TTL/2 ---------- t + 3/4 TTL ---------- t + TTL
    renewed      stop: no new command;   the command gets       the lease may
                 SIGTERM to the running  SIGKILL                 expire; another
                 command, step down                              member may win

Renewals go every TTL/4, so one lost or slow renewal costs nothing; two in a row
and the leader steps down, its command dead a quarter TTL before anyone else may
start one.  A leader frozen (SIGSTOP) past its lease wakes up with its clock far
past the stop and steps down before it does anything else.  A renewal that failed
stops new commands until one succeeds.

Roles: none (no lease: etcd unreachable, or not joined yet) -> follower (a live
lease, a view published) -> leader (the leader key, created on our lease in a
txn; its create revision is the epoch) -> stepping down -> none.  A leader acts
only once its mirror holds its own leader key (so it holds every ledger write of
the leaders before it) and while its lease clock runs.

Uses: base, records, cluster_agent.
"""

import collections
import itertools
import os
import socket
import time

from .base import ACTION_KILL_GRACE, ProtocolError, log
from .records import ClusterStatus
from .cluster_agent import RENEWS_PER_TTL


# A member: none -> follower (a lease, its view published) -> leader (the leader key on
# its lease) -> none (stepped down, or the lease lost: a new lease makes it a follower).
ROLE_EDGES = {
    "none": {"follower"},
    "follower": {"leader", "none"},
    "leader": {"none"},
}
LEADER_KEY = "leader"
MEMBER_KEYS = "members/"
LEDGER_KEYS = "ledger/"
PAUSE_KEY = "pause"
HOSTPAUSE_KEYS = "hostpause/"       # hostpause/HOST: {"paused": bool} (SPEC §12: --pause HOST)
SWITCHOVER_KEY = "switchover"       # the last --switchover request a member stored


def agreed_state(current, seen, quorum):
    """The state a host moves to in a cluster, or None: the state at least ``quorum``
    live members see, seen by more of them than the current one (a tie keeps it).

    ``seen`` maps each live member that sees the host to the state it sees."""
    counts = collections.Counter(seen.values())
    here = counts.get(current, 0)
    best = sorted((n, s) for s, n in counts.items() if s != current and n >= quorum and n > here)
    if not best or (len(best) > 1 and best[-1][0] == best[-2][0]):
        return None
    return best[-1][1]


def pid_alive(pid):
    """True when a process ``pid`` (an int) exists."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ClusterMember:
    """This daemon as a member of the cluster; see the comment above."""

    def __init__(self, settings, now):
        self.settings = settings
        self.node = settings.node
        self.lease = None
        self.granted = None                 # the TTL etcd granted
        self.valid_until = None             # our lease lives at least until (monotonic)
        self.renew_failed = False           # the last renewal failed: no new command
        self.next_renew = now
        self.next_put = self.next_campaign = self.next_revoke = now   # after a failed one: not before
        self.abandoned = []                 # leases we gave up that etcd may still hold
        self.role = "none"
        self.epoch = None                   # ours, as leader
        self.seq = 0                        # ledger writes sent in our epoch
        self.acting = False                 # leader with its own key in the mirror
        self.stepping = None                # {"why", "term_at", "kill_at"} while stepping down
        self.mirror = {}                    # key (relative) -> {value, lease, create, mod}
        self.revision = 0
        self.synced = False                 # a whole snapshot arrived
        self._snapshot = None
        self.view = {}                      # host -> the state we see (after our confirm)
        self.published = None               # the view etcd holds (as last acknowledged)
        self.endpoints = [{"endpoint": url, "last_ok": None, "error": None} for url in settings.etcd]
        self.requests = 0
        self.outbox = []
        self.inflight = {}                  # request id -> (op, sent, extra)
        self.ids = itertools.count(1)
        self.notes = collections.deque()    # for the master: ("acting", epoch), ("step_down", why),
        #                                     ("mirror", keys), ("written", id, result)
        self.unreachable_logged = False
        self.hostname = socket.gethostname()    # in our member key: another member of our name names us
        self.conflict = None                # why we refuse: another live member has our node name

    # -- the clock ---------------------------------------------------------------------

    @property
    def ttl(self):
        return self.granted or self.settings.ttl

    def stop_at(self):
        """No command may run from then on: half a TTL before the lease could expire."""
        return self.valid_until - self.ttl / 2.0 if self.valid_until is not None else None

    def kill_by(self):
        """A command still running then gets SIGKILL: a quarter TTL before the lease could expire."""
        return self.valid_until - self.ttl / 4.0 if self.valid_until is not None else None

    def may_start(self, now):
        """The monotonic deadline before which a command may start now, or None."""
        if not self.acting or self.stepping or self.renew_failed:
            return None
        stop = self.stop_at()
        return stop if now < stop else None

    def _request(self, op, extra=None, **fields):
        rid = next(self.ids)
        self.inflight[rid] = (op, time.monotonic(), extra)
        fields.update(t=op, id=rid)
        self.outbox.append(fields)
        return rid

    def _busy(self, op):
        return any(o == op for o, _, _ in self.inflight.values())

    def take_requests(self):
        out, self.outbox = self.outbox, []
        return out

    # -- each pass of the master's loop --------------------------------------------------

    def tick(self, now):
        """Queue what is due (renewal, our view, a campaign); step down when the clock says.
        Called only while the agent is connected."""
        if self.stepping is not None:
            return
        if self.role == "leader" and now >= self.stop_at():
            self.step_down("its lease could not be renewed in time", now)
            return
        if self.valid_until is not None and now >= self.valid_until:
            self.lost_lease("could not renew its lease", now)
        quarter = self.settings.ttl / float(RENEWS_PER_TTL)
        if not self._busy("renew") and now >= self.next_renew and not self.conflict:
            self.next_renew = now + quarter
            self._request("renew", extra=now, lease=self.lease, ttl=self.settings.ttl)
        if self.abandoned and not self._busy("revoke") and now >= self.next_revoke:
            # etcd renews every lease when it elects a raft leader: one we gave up while it
            # was unreachable would hold our old keys (the leader key!) another ttl.
            self.next_revoke = now + quarter
            self._request("revoke", extra=self.abandoned[0], lease=self.abandoned[0])
        if self.role == "none" or self.renew_failed or self.conflict:
            return
        if self.view != self.published and not self._busy("put") and now >= self.next_put:
            self._put_view()
        if self.role == "follower" and self.synced and LEADER_KEY not in self.mirror \
                and not self._busy("campaign") and now >= self.next_campaign:
            self.next_campaign = now + quarter
            self._request("campaign", lease=self.lease,
                          value={"node": self.node, "pid": os.getpid(), "since": time.time()})

    def _put_view(self):
        value = {"hosts": dict(self.view), "pid": os.getpid(), "host": self.hostname}
        self._request("put", extra=("view", dict(self.view)), key=MEMBER_KEYS + self.node,
                      value=value, lease=self.lease)

    def _check_same_node(self, keys, now):
        """Another member with our node name: both leave and refuse (other_same_node)."""
        other = other_same_node(self, keys)
        if other is None:
            return
        self.conflict = ("another member uses node = %s: pid %s on host %s; both refuse: give each "
                         "member a node name of its own ([cluster] node in checks.conf)"
                         % (self.node, other.get("pid"), other.get("host")))
        log.error("cluster %s: %s", self.settings.name, self.conflict)
        self._put_view()
        self.lost_lease(self.conflict, now)

    def set_pause(self, paused):
        """Pause or resume the whole cluster (any member may: it is the operator's word)."""
        return self.put_word(PAUSE_KEY, {"paused": bool(paused)})

    def put_word(self, key, value):
        """Store the operator's word at ``key`` (a pause, a host's pause, a switchover request):
        any member may, on no lease.  A ("paused", id, error) note follows."""
        return self._request("put", extra=("pause", None), key=key, lease=None,
                             value=dict(value, by=self.node, time=time.time()))

    def set_view(self, hosts):
        self.view = dict(hosts)

    # -- the agent's messages ----------------------------------------------------------

    def on_message(self, msg, now):
        kind = msg.get("t")
        if kind == "reply":
            entry = self.inflight.pop(msg.get("id"), None)
            if isinstance(msg.get("endpoints"), list):
                self.endpoints = msg["endpoints"]
                self.requests = msg.get("requests", self.requests)
            if entry is not None:
                getattr(self, "_on_" + entry[0])(msg, entry, now)
        elif kind == "snapshot":
            self._snapshot = self._snapshot or {}
            for kv in msg.get("kvs") or []:
                self._snapshot[kv["key"]] = kv
            if msg.get("last"):
                changed = set(self.mirror) | set(self._snapshot)
                self.mirror, self._snapshot = self._snapshot, None
                self.revision = max(self.revision, msg.get("revision") or 0)
                self.synced = True
                self._mirror_changed(changed, now)
        elif kind == "events":
            changed = set()
            for event in msg.get("events") or []:
                key = event.get("key")
                if event.get("type") == "delete":
                    self.mirror.pop(key, None)
                else:
                    self.mirror[key] = {k: event.get(k) for k in ("value", "lease", "create", "mod")}
                self.revision = max(self.revision, event.get("mod") or 0)
                changed.add(key)
            self._mirror_changed(changed, now)
        else:
            raise ProtocolError("unexpected message %r from the cluster agent" % (kind,))

    def agent_lost(self, now):
        """The agent died: what it had in hand is lost (a write of ours: unknown)."""
        self.outbox = []
        for rid, (op, sent, extra) in list(self.inflight.items()):
            self.inflight.pop(rid)
            getattr(self, "_on_" + op)({"id": rid, "error": "the cluster agent died", "unknown": True},
                                       (op, sent, extra), now)
        self.synced = False

    def _on_renew(self, msg, entry, now):
        sent = entry[2]
        if msg.get("error"):
            self.renew_failed = True
            # Try again soon: a blip must not cost the lease (each try asks every endpoint).
            self.next_renew = min(self.next_renew, now + self.settings.ttl / float(4 * RENEWS_PER_TTL))
            if not self.unreachable_logged:
                log.error("cluster: etcd unreachable (%s); no member acts without it", msg["error"])
                self.unreachable_logged = True
            return
        if msg.get("lease") != self.lease and not msg.get("granted"):
            return                          # a renewal of a lease we gave up meanwhile
        if not msg.get("ttl"):
            self.lost_lease("its lease expired", now)
            return
        if msg.get("granted"):
            if self.lease is not None:      # granted while we thought we held one: keep ours
                self.abandoned.append(msg["lease"])
                return
            self.lease = msg["lease"]
            self._set_role("follower")
            self.published = None
            log.info("cluster %s: joined as %s (lease %x, ttl %ds)", self.settings.name, self.node,
                     self.lease, msg["ttl"])
        self.granted = msg["ttl"]
        self.valid_until = max(self.valid_until or 0.0, sent + msg["ttl"])
        self.renew_failed = False
        if self.unreachable_logged:
            log.warning("cluster: etcd answers again")
            self.unreachable_logged = False

    def _on_put(self, msg, entry, now):
        what, view = entry[2]
        if what == "pause":
            self.notes.append(("paused", msg.get("id"), msg.get("error")))
        elif not msg.get("error"):
            self.published = view
        elif msg.get("status") == 404:      # our lease is gone: the key went with it
            self.lost_lease("its lease is gone", now)
        else:                               # not again at every pass while etcd fails
            self.next_put = now + self.settings.ttl / float(RENEWS_PER_TTL)

    def _on_campaign(self, msg, entry, now):
        if msg.get("won"):
            self._lead(msg["epoch"], now)
        elif msg.get("holder") and LEADER_KEY not in self.mirror and self.synced:
            # Someone holds the key our mirror lacks: the watch missed it.
            self._request("resync")
        # No answer: the mirror shows who holds the key (maybe we do).

    def _on_revoke(self, msg, entry, now):
        lease = entry[2]
        if not msg.get("error") and lease in self.abandoned:
            self.abandoned.remove(lease)

    def _on_resync(self, msg, entry, now):
        pass

    def _on_txn(self, msg, entry, now):
        if msg.get("ok"):
            result = "ok"
        elif msg.get("unknown"):
            result = "unknown"
        else:
            result = "refused"
        self.notes.append(("written", msg.get("id"), result, msg.get("error")))
        if result != "ok" and self.role == "leader":
            self.step_down("a ledger write %s: %s" % ("was lost" if result == "unknown" else "failed",
                                                       msg.get("error")), now)

    # -- leadership ----------------------------------------------------------------------

    def _lead(self, epoch, now):
        if self.role != "follower" or self.stepping is not None:
            return
        self._set_role("leader")
        self.epoch, self.acting, self.seq = epoch, False, 0
        log.warning("cluster %s: %s leads (epoch %d)", self.settings.name, self.node, epoch)
        self._check_acting(now)

    def _check_acting(self, now):
        holder = self.mirror.get(LEADER_KEY)
        if self.role != "leader" or self.acting:
            return
        if holder is not None and holder.get("create") == self.epoch and self.revision >= self.epoch:
            self.acting = True
            self.notes.append(("acting", self.epoch))

    def _mirror_changed(self, keys, now):
        self._check_same_node(keys, now)
        holder = self.mirror.get(LEADER_KEY)
        if self.lease is not None and holder is not None and holder.get("lease") == self.lease \
                and self.role == "follower" and not self.conflict:     # one that refuses leads no more
            self._lead(holder["create"], now)       # our campaign won, its answer was lost
        if self.role == "leader":
            # A mirror that has reached our epoch without our key: it expired, was
            # revoked or deleted, and another member may hold it now.
            if self.revision >= self.epoch and (holder is None or holder.get("create") != self.epoch):
                self.step_down("its leader key is gone", now)
            else:
                self._check_acting(now)
        self.notes.append(("mirror", keys))

    def step_down(self, why, now):
        """Stop acting: the master ends the running command by ``kill_at`` and calls
        ``stepped_down`` once it is gone."""
        if self.stepping is not None:
            return
        log.error("cluster %s: %s steps down: %s", self.settings.name, self.node, why)
        quarter = self.ttl / 4.0
        kill_at = now + min(ACTION_KILL_GRACE, quarter)
        if self.valid_until is not None:
            kill_at = max(now, min(kill_at, self.valid_until - quarter))
        self.stepping = {"why": why, "term_at": now, "kill_at": kill_at}
        self.acting = False
        self.notes.append(("step_down", why))

    def stepped_down(self, now):
        """The command is gone: give up the lease (and the leader key on it)."""
        self._forget_lease()
        self.stepping = None
        self.next_renew = now + self.settings.ttl / float(RENEWS_PER_TTL)

    def lost_lease(self, why, now):
        if self.role == "leader":
            self.step_down(why, now)
            return
        if self.role != "none":
            log.error("cluster %s: %s is no longer a member: %s", self.settings.name, self.node, why)
        self._forget_lease()
        self.next_renew = now

    def _forget_lease(self):
        if self.lease is not None:          # revoked as soon as etcd takes it
            self.abandoned.append(self.lease)
            self._request("revoke", extra=self.lease, lease=self.lease)
            self.next_revoke = time.monotonic() + self.settings.ttl / float(RENEWS_PER_TTL)
        self.lease = self.valid_until = self.granted = self.epoch = None
        self.acting, self.published = False, None
        if self.role != "none":
            self._set_role("none")

    def _set_role(self, role):
        """Every change of role passes here and is checked against ROLE_EDGES."""
        if role not in ROLE_EDGES[self.role]:
            raise AssertionError("cluster member %s: %s -> %s" % (self.node, self.role, role))
        self.role = role

    # -- what the master reads -----------------------------------------------------------

    def leader(self):
        """(node, epoch) of the leader the mirror shows, or (None, None)."""
        holder = self.mirror.get(LEADER_KEY)
        if holder is None or not isinstance(holder.get("value"), dict):
            return None, None
        return holder["value"].get("node"), holder.get("create")

    def views(self):
        """node -> {host: state} of every live member (ours as we see it now)."""
        out = {}
        for key, kv in self.mirror.items():
            if key.startswith(MEMBER_KEYS) and isinstance(kv.get("value"), dict):
                hosts = kv["value"].get("hosts")
                if isinstance(hosts, dict):
                    out[key[len(MEMBER_KEYS):]] = hosts
        if self.role != "none":
            out[self.node] = dict(self.view)
        else:
            out.pop(self.node, None)
        return out

    def agreement(self, states):
        """[(host, new state, [nodes that see it])] for each host whose state should move,
        given the accepted ``states`` (host -> state)."""
        views = self.views()
        hosts = set()
        for hosts_seen in views.values():
            hosts.update(hosts_seen)
        moves = []
        for host in sorted(hosts):
            seen = {node: v[host] for node, v in views.items() if isinstance(v.get(host), str)}
            state = agreed_state(states.get(host, "unknown"), seen, self.settings.quorum)
            if state is not None:
                moves.append((host, state, sorted(n for n, s in seen.items() if s == state)))
        return moves

    def paused(self):
        kv = self.mirror.get(PAUSE_KEY)
        return bool(kv and isinstance(kv.get("value"), dict) and kv["value"].get("paused"))

    def paused_hosts(self):
        return {key[len(HOSTPAUSE_KEYS):] for key, kv in self.mirror.items()
                if key.startswith(HOSTPAUSE_KEYS) and isinstance(kv.get("value"), dict)
                and kv["value"].get("paused")}

    def word(self, key):
        """The value of an operator's word (set by put_word), or None."""
        value = (self.mirror.get(key) or {}).get("value")
        return value if isinstance(value, dict) else None

    def write(self, puts, deletes=()):
        """A guarded ledger write of ours as leader (stepping down too: the run it ends is
        recorded if etcd still takes it): its request id, None when not leading."""
        if self.role != "leader":
            return None
        self.seq += 1
        return self._request("txn", epoch=self.epoch, seq=self.seq, puts=puts, deletes=list(deletes))

    def status(self, now, agent_pid=None):
        """daemon.cluster of --status --json (docs/cluster.md), a ClusterStatus."""
        node, epoch = self.leader() if self.role != "none" else (None, None)
        return ClusterStatus(
            name=self.settings.name, node=self.node,
            role="leader" if self.role == "leader" and self.stepping is None else
                 ("follower" if self.role in ("follower", "leader") else "none"),
            leader=node, epoch=epoch, quorum=self.settings.quorum,
            members={n: {"hosts": dict(sorted(h.items()))} for n, h in sorted(self.views().items())}
            if self.role != "none" else {},
            etcd=[{"endpoint": e["endpoint"],
                   "ok": e["last_ok"] is not None and now - e["last_ok"] <= self.settings.ttl}
                  for e in self.endpoints],
            ttl=self.settings.ttl, acting=self.acting, requests=self.requests, agent_pid=agent_pid)


def other_same_node(member, keys):
    """The value of the other member that has ``member``'s node name, or None.

    Our member key written on another live lease once ours was in: another member has
    our node name (a key older than ours is an earlier life's, its lease not yet expired).
    Ours goes back once (for the other to see the same), then both leave and refuse."""
    key = MEMBER_KEYS + member.node
    kv = member.mirror.get(key)
    if member.conflict or member.published is None or kv is None or key not in keys \
            or kv.get("lease") in (member.lease, None) or kv.get("lease") in member.abandoned:
        return None
    other = kv.get("value") if isinstance(kv.get("value"), dict) else {}
    if other.get("host") == member.hostname and not pid_alive(other.get("pid")):
        return None                     # our own earlier life on this host, its lease not yet gone
    return other

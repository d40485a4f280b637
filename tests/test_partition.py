"""A random partition run: three hosts, an etcd member and a hadaemon member on each.

The hosts are network namespaces on a bridge of their own (test_stack.py's Topology,
with hosts n1, n2, n3 instead of the database stack).  Each runs one etcd member and
one hadaemon member (``ttl`` TTL, ``quorum = 2``) whose toy action logs, to a file
they all share, the start, a beat every 50 ms and the end of each command with the
node and its HA_LEADER_EPOCH (test_cluster.py's ACT).  The one host they watch, db1,
is a file the test flips between master and slave before each fault, so a sequence
often runs while the fault hits.

Faults are drawn at random, each healed before the next, on a random host:

    cable      the host's eth0 down (it sees "network unreachable", the others time out)
    split      its port on the bridge disabled: both sides time out (a minority of one)
    stop       SIGSTOP of its hadaemon member, SIGCONT later (past its lease, or not)
    kill       kill -9 of its hadaemon member, started again on its state dir
    etcd-kill  kill -9 of its etcd member, started again on its data dir
    etcd-stop  SIGSTOP of its etcd member, SIGCONT later

After each, the test waits for one acting leader all three agree on.  Safety is
asserted (no two commands at once, no epoch going back, no run started twice);
availability is a figure: how many faults were followed by a new leader, and how
many of those did not touch the leader's own host (no fault there should cost a
failover).  It prints one line:

    partition: F faults (by kind), L new leaders (l after N faults not touching the
    leader's host), 0 overlapping commands, 0 epoch regressions, 0 transitions run
    twice, I interrupted runs of R (i after faults not touching the leader's host)

and a second one: the new leaders after such faults by kind, and the members' reasons
to step down (from their logs).

The etcd members run as docs/cluster.md recommends (etcd.LAN_TIMING): heartbeat 25 ms,
election timeout 250 ms and --pre-vote (etcd 3.5's default): without it a member cut off
for a second comes back with a higher term and deposes etcd's raft leader, an election
every member waits through, whatever the fault was.

HADAEMON_PARTITION_FAULTS (default 6: well under two minutes), _SEED, _TTL (default 2, as
examples/postgresql/cluster), _PROGRAM (another hadaemon.py, to measure an older one the
same way) and _LOGS (a directory the members' and etcd's logs are copied to at the end).
Needs root and ``ip netns``; skips otherwise.
"""

import collections
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from unittest import mock

import pytest

from conftest import HADAEMON, Daemon, figure, pids_in_group, wait_for
from etcd import ETCD, LAN_TIMING
import test_stack
from test_cluster import ACT, HaCluster, acting_leader
from test_stack import Topology, netns_problem, sh, sweep_stale

HOSTS = {"n1": "192.0.2.51", "n2": "192.0.2.52", "n3": "192.0.2.53"}
FAULTS = int(os.environ.get("HADAEMON_PARTITION_FAULTS") or 6)
SEED = int(os.environ.get("HADAEMON_PARTITION_SEED") or time.time())
TTL = int(os.environ.get("HADAEMON_PARTITION_TTL") or 2)
PROGRAM = os.environ.get("HADAEMON_PARTITION_PROGRAM") or str(HADAEMON)
LOGS = os.environ.get("HADAEMON_PARTITION_LOGS")
KINDS = ("cable", "split", "stop", "kill", "etcd-kill", "etcd-stop")
STEPS = 6                       # 50 ms beats per command: two commands, about 0.7 s a sequence


class Hosts(Topology):
    """test_stack's Topology with the hosts of this file (its build() reads test_stack's HOSTS)."""

    def build(self):
        with mock.patch.dict(test_stack.HOSTS, HOSTS, clear=True):
            super().build()

    def port(self, host, forwarding):
        """The host's port on the bridge: disabled, the bridge drops its frames both ways."""
        sh(["bridge", "-n", self.ns("br"), "link", "set", "dev", "v-" + host,
            "state", "3" if forwarding else "0"])


class EtcdMember:
    """One etcd member in a host, on the host's address."""

    def __init__(self, topo, host, directory):
        self.topo, self.host = topo, host
        self.url = "http://%s:2379" % HOSTS[host]
        self.data = os.path.join(directory, "etcd-" + host)
        self.log = os.path.join(directory, "etcd-%s.log" % host)
        self.proc = None
        self.started_once = False

    def start(self):
        initial = ",".join("e%s=http://%s:2380" % (h, a) for h, a in HOSTS.items())
        argv = [ETCD, "--name", "e" + self.host, "--data-dir", self.data,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", "http://%s:2380" % HOSTS[self.host],
                "--initial-advertise-peer-urls", "http://%s:2380" % HOSTS[self.host],
                "--initial-cluster", initial, "--initial-cluster-token", "partition",
                "--initial-cluster-state", "existing" if self.started_once else "new",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn"] + list(LAN_TIMING)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.topo.inside(self.host, argv), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.started_once = True

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def signal(self, sig):
        os.kill(self.proc.pid, sig)


class Partition:
    """The three hosts, their etcd members and hadaemon members, the faults."""

    def __init__(self, tmp_path):
        self.dir = tempfile.mkdtemp(prefix="hadaemon-partition-")
        self.topo = Hosts()
        self.log = pathlib.Path(self.dir) / "actions.log"
        self.world = os.path.join(self.dir, "world")
        os.mkdir(self.world)
        self.etcd = {h: EtcdMember(self.topo, h, self.dir) for h in HOSTS}
        self.daemons = {}
        self.faults = []                # what the test did, when: for the logs kept
        self.revived = []               # (host, exit status) of etcd members found gone
        for host in HOSTS:
            d = Daemon(tmp_path / host)
            d.program = PROGRAM
            d.wrap = self.topo.inside(host, [])
            d.script("checks/check_role", """
                f="%s/$1"
                echo "host=$1"
                if [ -f "$f" ]; then echo "state=$(cat "$f")"; else echo "state=down"; fi
            """ % self.world)
            d.script("actions/act", ACT.split("\n", 1)[1] % {"log": self.log, "steps": os.path.join(
                self.dir, "steps")}, shebang="#!/bin/bash")
            d.write("checks.conf", """
                [daemon]
                interval = 200ms
                confirm = 1
                workers = 1
                action_timeout = 20s

                [cluster]
                etcd = %s
                name = partition
                node = %s
                ttl = %ds
                quorum = 2

                [local]
                check_role db1
            """ % (", ".join(m.url for m in self.etcd.values()), host, TTL))
            d.write("actions.conf", "[any_to_any]\nact 1\nact 2\n")
            self.daemons[host] = d
        with open(os.path.join(self.dir, "steps"), "w") as f:
            f.write("%d\n" % STEPS)

    def start(self):
        self.topo.build()
        for m in self.etcd.values():
            m.start()
        self.wait_etcd()
        self.set("master")
        for d in self.daemons.values():
            d.start(wait=False)

    def set(self, state):
        tmp = os.path.join(self.world, ".db1")
        with open(tmp, "w") as f:
            f.write(state + "\n")
        os.replace(tmp, os.path.join(self.world, "db1"))

    # -- what the members say -------------------------------------------------------

    def etcd_healthy(self):
        """Every etcd member answers /health true (asked from inside n1: the test's own
        namespace has no way onto the bridge)."""
        urls = ",".join(m.url for m in self.etcd.values())
        r = subprocess.run(self.topo.inside("n1", ["etcdctl", "--endpoints", urls, "endpoint", "health",
                                                   "--command-timeout=1s"]),
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=20,
                           env=dict(os.environ, ETCDCTL_API="3"))
        return r.returncode == 0 and (r.stdout + r.stderr).count("is healthy") == len(HOSTS)

    def wait_etcd(self):
        """Every member healthy; one found gone with no fault on it is started again and
        counted (``revived``: on a machine many tests share, a stale pid's group kill)."""
        for m in self.etcd.values():
            if m.proc.poll() is not None:
                self.revived.append((m.host, m.proc.returncode))
                m.start()
        wait_for(self.etcd_healthy, timeout=60, interval=0.2, what="every etcd member healthy")

    def clusters(self):
        out = {}
        for host, d in self.daemons.items():
            try:
                out[host] = d.ask("status", timeout=3)["daemon"]["cluster"]
            except Exception:           # not up yet, stopped, restarting: not an answer
                pass
        return out

    def leader(self, timeout=None):
        """(node, epoch) once all three answer and agree on one acting leader."""
        def agreed():
            docs = self.clusters()
            if len(docs) != len(HOSTS):
                return None
            return acting_leader(docs)
        return wait_for(agreed, timeout=timeout or 6 * TTL + 30, interval=0.1,
                        what="one acting leader all agree on (%s)" % self.tails())

    def settled(self, state):
        """The ledger holds db1 in ``state`` and nothing is left to run, on every member."""
        for d in self.daemons.values():
            try:
                doc = d.ask("status", timeout=3)
            except Exception:
                return False
            if doc["hosts"].get("db1", {}).get("state") != state or doc["daemon"]["queue"] or \
                    any(r["state"] in ("queued", "running") for r in doc["runs"]):
                return False
        return True

    def runs(self, node):
        entries = self.daemons[node].ask("history", n=100000)["history"]
        return {e["run"]["id"]: e["run"] for e in entries if e.get("run")}

    commands = HaCluster.commands       # the shared log's commands, in the order they started
    overlaps = HaCluster.overlaps

    def tails(self):
        return "\n".join("--- %s:\n%s" % (n, d.tail(8)) for n, d in self.daemons.items())

    # -- the faults -----------------------------------------------------------------

    def inject(self, kind, host):
        """Start a fault; returns the function that heals it."""
        d, m = self.daemons[host], self.etcd[host]
        if kind == "cable":
            self.topo.cable(host, False)
            return lambda: self.topo.cable(host, True)
        if kind == "split":
            self.topo.port(host, False)
            return lambda: self.topo.port(host, True)
        if kind == "stop":
            pid = d.proc.pid
            os.kill(pid, signal.SIGSTOP)
            return lambda: os.kill(pid, signal.SIGCONT)
        if kind == "kill":
            pid = d.proc.pid
            d.kill9()
            wait_for(lambda: not (set(pids_in_group(pid)) | set(d.descendants())), timeout=15,
                     what="the killed member's processes to go")
            d.started.remove(pid)       # gone, group and all: its pid may be reused
            return lambda: d.start(wait=False)
        if kind == "etcd-kill":
            m.kill()
            return m.start
        if kind == "etcd-stop":
            m.signal(signal.SIGSTOP)
            return lambda: m.signal(signal.SIGCONT)
        raise AssertionError(kind)

    def keep_logs(self, where):
        os.makedirs(where, exist_ok=True)
        for host, d in self.daemons.items():
            shutil.copy(str(d.log_path), os.path.join(where, "%s.log" % host))
        with open(os.path.join(where, "faults.log"), "w") as f:
            f.write("".join("%s %s\n" % (time.strftime("%H:%M:%S", time.localtime(t)), what)
                            for t, what in self.faults))
        for path in [str(self.log)] + [m.log for m in self.etcd.values()]:
            if os.path.exists(path):
                shutil.copy(path, where)

    def teardown(self):
        if LOGS:
            self.keep_logs(LOGS)
        for d in self.daemons.values():
            for pid in d.started:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            d.cleanup()
        for m in self.etcd.values():
            if m.proc is not None and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(timeout=10)
        self.topo.teardown()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def partition(tmp_path):
    problem = netns_problem()
    if problem:
        pytest.skip(problem)
    if not os.path.exists(ETCD) or shutil.which("etcdctl") is None or shutil.which("bridge") is None:
        pytest.skip("needs etcd, etcdctl and bridge (iproute2)")
    sweep_stale()
    p = Partition(tmp_path)
    try:
        yield p
    finally:
        p.teardown()


def step_downs(daemons):
    """Why members stepped down, from their logs: reason (its endpoint masked) -> count."""
    reasons = collections.Counter()
    for d in daemons.values():
        for line in d.log().splitlines():
            m = re.search(r"steps down: (.*)", line)
            if m:
                reasons[re.sub(r"http://[0-9.:]+", "E", m.group(1))[:90]] += 1
    return reasons


@pytest.mark.timeout(120 + 20 * FAULTS)
def test_random_partitions(partition):
    p = partition
    rng = random.Random(SEED)
    p.start()
    leader, epoch = p.leader()
    wait_for(lambda: p.settled("master"), timeout=30, what="db1 master, nothing to run")
    state, kinds, log = "master", collections.Counter(), []
    begun = time.monotonic()
    for _ in range(FAULTS):
        kind, host = rng.choice(KINDS), rng.choice(sorted(HOSTS))
        state = "slave" if state == "master" else "master"
        p.set(state)                                    # a sequence for the fault to meet
        time.sleep(rng.uniform(0.0, 0.8))
        heal = p.inject(kind, host)
        injected = time.time()
        p.faults.append((injected, "%s %s (leader %s)" % (kind, host, leader)))
        time.sleep(rng.uniform(0.3, 1.5) * TTL)
        heal()
        p.faults.append((time.time(), "healed"))
        p.wait_etcd()
        new, new_epoch = p.leader()
        wait_for(lambda: p.settled(state), timeout=6 * TTL + 30, interval=0.1,
                 what="db1 %s, nothing left to run (%s)" % (state, p.tails()))
        kinds[kind] += 1
        log.append((kind, host, leader, host == leader, new_epoch != epoch, injected))
        leader, epoch = new, new_epoch
    took = time.monotonic() - begun

    runs = p.runs(leader)
    commands = p.commands()
    overlaps = p.overlaps(commands)
    regressions, top = [], 0
    for c in commands:
        if c.epoch < top:
            regressions.append(c)
        top = max(top, c.epoch)
    starts = collections.Counter((c.run, c.index) for c in commands)
    twice = sorted({run for (run, _), n in starts.items() if n > 1})
    away = [entry for entry in log if not entry[3]]
    interrupted = [r for r in runs.values() if r["state"] == "interrupted"]
    # each interrupted run to the fault it ended under (the last one injected before)
    under = [max((e for e in log if e[5] <= (r.get("ended") or 0)), key=lambda e: e[5], default=None)
             for r in interrupted]
    figure("partition: %d faults (%s), %d new leaders (%d after %d faults not touching the leader's "
           "host), %d overlapping commands, %d epoch regressions, %d transitions run twice, "
           "%d interrupted runs of %d (%d after faults not touching the leader's host) "
           "(seed %d, ttl %ds, %s, %.0fs)"
           % (len(log), ", ".join("%s %d" % (k, kinds[k]) for k in KINDS if kinds[k]),
              sum(e[4] for e in log), sum(e[4] for e in away), len(away), len(overlaps),
              len(regressions), len(twice), len(interrupted), len(runs),
              sum(1 for e in under if e is not None and not e[3]), SEED, TTL, os.path.relpath(PROGRAM, str(HADAEMON.parent)), took))
    by_kind = collections.Counter((e[0], e[4]) for e in away)
    figure("partition: new leaders after faults away from the leader's host, by kind: %s; "
           "step-downs: %s" % (", ".join("%s %d/%d" % (k, by_kind[(k, True)],
                                                       by_kind[(k, True)] + by_kind[(k, False)])
                                         for k in KINDS if by_kind[(k, True)] + by_kind[(k, False)]),
                               dict(step_downs(p.daemons).most_common(6))))
    if p.revived:
        figure("partition: etcd members found gone with no fault on them, started again: %s" % p.revived)
    assert not overlaps, overlaps[:5]
    assert not regressions, regressions[:5]
    assert not twice, twice
    for run in runs.values():
        assert run["state"] in ("ok", "interrupted", "failed", "skipped"), run

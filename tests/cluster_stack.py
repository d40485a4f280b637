"""The cluster stack of test_cluster_stack.py: the production shape with no single point of failure.

Four hosts made of network namespaces, as tests/test_stack.py makes them (its
Topology, Stack, Sshd, Pgbouncer, Writers and Monitor are used as they are; its
watcher is the witness here):

    db1      192.0.2.11   PostgreSQL primary, sshd, etcd member, hadaemon member "db1"
    db2      192.0.2.12   PostgreSQL synchronous standby, sshd, etcd, hadaemon "db2"
    witness  192.0.2.30   etcd member, hadaemon member "witness"; no database
    app      192.0.2.20   pgbouncer (examples/postgresql/pgbouncer.ini), the writers

The members run examples/postgresql/cluster/checks.conf over examples/postgresql
(its actions.conf, ssh_config, checks/ and actions/ as shipped), adapted only in
`node` and the etcd endpoints' addresses.

Each etcd member listens on an address of its own on its host's eth0
(192.0.2.111, .112, .130), beside the host's own: so a host can be cut from etcd
and not from the databases (``cut_from_etcd``), by routes through a neighbour
nobody is, which drop the packets silently as a broken network does (this
machine has no iptables, nftables or tc actions).  Pulling a host's cable (eth0
down) cuts both.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import hadaemon.base
import hadaemon.configfiles
from conftest import ROOT, Daemon, keygen, wait_for, with_private_run
from etcd import LAN_TIMING, EtcdCluster, Member
from pgpair import Pair
from test_cluster import acting_leader
import test_stack as st

EXAMPLE = ROOT / "examples" / "postgresql"
CLUSTER_EXAMPLE = EXAMPLE / "cluster"
HOSTS = {"db1": "192.0.2.11", "db2": "192.0.2.12", "witness": "192.0.2.30", "app": "192.0.2.20"}
MEMBERS = ("db1", "db2", "witness")
ETCD_ADDRESS = {"db1": "192.0.2.111", "db2": "192.0.2.112", "witness": "192.0.2.130"}
NOWHERE, NOWHERE_MAC = "192.0.2.99", "02:00:00:00:00:99"    # a neighbour no host is


class Hosts(st.Topology):
    """test_stack's hosts, its watcher the witness, and an etcd address on each member."""

    def ns(self, host):
        return super().ns("watcher" if host == "witness" else host)

    def build(self):
        assert {h: st.HOSTS[h] for h in ("db1", "db2", "app")} == {h: HOSTS[h] for h in ("db1", "db2", "app")}
        assert st.HOSTS["watcher"] == HOSTS["witness"]
        super().build()
        for host, addr in ETCD_ADDRESS.items():
            self.ip(host, "addr", "add", "%s/%d" % (addr, st.PREFIX), "dev", st.DEV)

    def cut_from_etcd(self, host, cut):
        """``host`` no longer reaches the other etcd members, nor they its own (both
        ways, silently); the databases, app and everything else it still reaches."""
        op = "replace" if cut else "del"
        pairs = [(host, other) for other in ETCD_ADDRESS if other != host] + \
                [(other, host) for other in ETCD_ADDRESS if other != host]
        for here, there in pairs:
            if cut:
                self.ip(here, "neigh", "replace", NOWHERE, "lladdr", NOWHERE_MAC, "dev", st.DEV,
                        "nud", "permanent")
            self.ip(here, "route", op, ETCD_ADDRESS[there] + "/32", "via", NOWHERE, "dev", st.DEV,
                    check=cut)


class HostEtcd(Member):
    """An etcd member on its host's etcd address, ports 2379 and 2380, in the host's namespace,
    with the timing docs/cluster.md recommends (LAN_TIMING: --pre-vote among it)."""

    timing = LAN_TIMING

    def __init__(self, cluster, index, host):
        super().__init__(cluster, index, 2379, 2380)
        self.host = host
        self.name = "e-" + host
        self.url = "http://%s:2379" % ETCD_ADDRESS[host]
        self.peer_url = "http://%s:2380" % ETCD_ADDRESS[host]
        self.data_dir = os.path.join(cluster.root, self.name)
        self.log_path = os.path.join(cluster.root, self.name + ".log")

    def argv(self):
        return self.cluster.topo.inside(self.host, super().argv())

    def get(self, path, post=False, timeout=1.0):
        """curl from the member's own host (the test runs outside every namespace)."""
        argv = ["curl", "-s", "-m", str(timeout)] + (["-X", "POST", "-d", "{}"] if post else [])
        return subprocess.run(self.cluster.topo.inside(self.host, argv + [self.url + path]),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout + 10).stdout

    def healthy(self):
        return '"health":"true"' in self.get("/health").replace(" ", "")


class HostEtcdCluster(EtcdCluster):
    """Three etcd members, one on each member host."""

    def __init__(self, root, topo):
        super().__init__(root)
        self.topo = topo

    def start(self, timeout=30.0, attempts=1):
        self.members = [HostEtcd(self, i, host) for i, host in enumerate(MEMBERS)]
        for m in self.members:
            m.start()
        self.wait_healthy(timeout)
        return self

    def by_host(self, host):
        return next(m for m in self.members if m.host == host)

    def status(self, m):
        """(its member id, the raft leader's) as ``m`` says, or None."""
        try:
            doc = json.loads(m.get("/v3/maintenance/status", post=True))
            return int(doc["header"]["member_id"]), int(doc["leader"])
        except (ValueError, KeyError, TypeError):
            return None

    def leader(self):
        """etcd's raft leader, or None."""
        for m in self.members:
            ids = self.status(m) if m.running() else None
            if ids and ids[0] == ids[1]:
                return m
        return None

    def move_leader(self, host):
        """Make the etcd member on ``host`` etcd's raft leader (etcdctl move-leader)."""
        target = self.by_host(host)
        for _ in range(5):
            now = self.leader()
            if now is target:
                return
            if now is not None:
                subprocess.run(self.topo.inside(now.host, [
                    "etcdctl", "--endpoints", now.url, "move-leader", "%x" % self.status(target)[0]]),
                    capture_output=True, stdin=subprocess.DEVNULL, timeout=30,
                    env=dict(os.environ, ETCDCTL_API="3"))
            time.sleep(0.2)
        wait_for(lambda: self.leader() is target, timeout=10, what="etcd's raft leader on %s" % host)


class Members:
    """The members and etcd, in the place of test_stack's one watcher: Stack.teardown
    calls ``cleanup`` before it removes the hosts."""

    def __init__(self):
        self.daemons, self.etcd = {}, None

    def cleanup(self):
        for d in self.daemons.values():
            d.cleanup()
        if self.etcd is not None:
            self.etcd.stop()


class ClusterStack(st.Stack):
    """Everything of one test: the hosts, etcd, the pair, sshd, pgbouncer, three members,
    writers; test_stack's Stack with members for its watcher (and its teardown)."""

    def __init__(self, bindir, user, template):
        super().__init__(Members(), bindir, user, template)
        self.topo = Hosts()
        self.members = self.d.daemons
        self.sshd, self.env = {}, {}

    # -- building ------------------------------------------------------------------

    def build(self):
        topo = self.topo
        topo.build()
        os.mkdir(os.path.join(self.dir, "etcd"))
        self.etcd = self.d.etcd = HostEtcdCluster(os.path.join(self.dir, "etcd"), topo).start()
        self.pair = Pair(self.bindir, self.user, network="192.0.2.0/24", servers=[
            ("db1", 5432, HOSTS["db1"], topo.ns("db1")), ("db2", 5432, HOSTS["db2"], topo.ns("db2"))])
        self.pair.build(template=self.template)
        self.key = keygen(os.path.join(self.dir, "id_ed25519"))
        self.sshd = {h: st.Sshd(topo, h, self.dir, self.key) for h in ("db1", "db2")}
        self.pgbouncer = st.Pgbouncer(topo, self.user, self.dir)
        self.admit_members()
        for node in MEMBERS:
            self.members[node] = self.install(node)

    def admit_members(self):
        """pgbouncer's admin console from every member host, not the one watcher test_stack has."""
        hba = os.path.join(self.pgbouncer.dir, "pgbouncer_hba.conf")
        with open(hba, "w") as f:
            f.write("".join("host pgbouncer pgbouncer %s/32 scram-sha-256\n" % HOSTS[h] for h in MEMBERS)
                    + "host %s postgres 127.0.0.1/32 trust\n" % st.APPDB)
        before = self.pgbouncer.log().count("SIGHUP")
        os.kill(self.pgbouncer.proc.pid, signal.SIGHUP)
        wait_for(lambda: self.pgbouncer.log().count("SIGHUP") > before, timeout=10,
                 what="pgbouncer to reload its hba file")

    def install(self, node):
        """examples/postgresql with cluster/checks.conf over its checks.conf, in a config dir
        of the member's own; only ``node`` and the etcd addresses changed."""
        d = Daemon(pathlib.Path(self.dir) / node)
        for name in ("actions.conf", "ssh_config"):
            shutil.copy(EXAMPLE / name, d.dir / name)
        for sub in ("checks", "actions"):
            shutil.copytree(EXAMPLE / sub, d.dir / sub, dirs_exist_ok=True)
        conf = (CLUSTER_EXAMPLE / "checks.conf").read_text()
        for old, new in [("node = db1 ", "node = %s " % node)] + [
                ("http://%s:2379" % HOSTS[h], "http://%s:2379" % ETCD_ADDRESS[h]) for h in MEMBERS]:
            assert old in conf, "examples/postgresql/cluster/checks.conf no longer has %r" % old
            conf = conf.replace(old, new)
        (d.dir / "checks.conf").write_text(conf)
        d.state = pathlib.Path(self.dir) / node / "s"       # short: ssh's control sockets live there
        d.state.mkdir(mode=0o700)
        shutil.copy(self.key, d.state / "id_ed25519")
        (d.state / "id_ed25519").chmod(0o600)
        (d.state / "known_hosts").write_text("".join(
            "%s %s\n" % (h, " ".join(open(str(s.host_key) + ".pub").read().split()[:2]))
            for h, s in self.sshd.items()))
        pgpass = d.state / "pgpass"
        pgpass.write_text("app:%d:pgbouncer:pgbouncer:%s\n" % (st.PGBOUNCER_PORT, st.ADMIN_PASSWORD))
        pgpass.chmod(0o600)
        config = hadaemon.configfiles.load_config(str(d.dir))
        assert (config.cluster.node, config.cluster.quorum) == (node, 2), config.cluster
        d.wrap = self.topo.inside(node, [])
        self.env[node] = dict(self.pair.client_env, PGPASSFILE=str(pgpass))
        return d

    # -- the members ------------------------------------------------------------------

    def start_member(self, node):
        d = self.members[node]
        if d.proc is not None:
            d.started = [p for p in d.started if p != d.proc.pid]     # gone: its pid may be reused
        d.start(env=self.env[node], wait=False)

    def cluster(self, node):
        """daemon.cluster of one member, None when it does not answer."""
        d = self.members[node]
        if d.proc is None or d.proc.poll() is not None:
            return None
        try:
            return d.ask("status", timeout=5)["daemon"]["cluster"]
        except (OSError, hadaemon.base.HadaemonError):
            return None

    def live(self):
        return [n for n in MEMBERS if self.members[n].proc is not None and self.members[n].proc.poll() is None]

    def leader(self, among=None, timeout=30):
        """(node, epoch) once every member of ``among`` (default: every live one) agrees on
        one acting leader."""
        def agreed():
            among_ = among or self.live()
            docs = {n: self.cluster(n) for n in among_}
            if None in docs.values():
                return None
            return acting_leader(docs)
        return wait_for(agreed, timeout=timeout, interval=0.05,
                        what="members %s to agree on a leader (%s)" % (among, self.tails()))

    def history(self, node):
        """Transitions, oldest first, each with its run, from ``node``'s copy of the ledger."""
        entries = self.members[node].ask("history", n=100000, timeout=10)["history"]
        return sorted(entries, key=lambda e: e["id"])

    def hosts(self, node):
        doc = self.members[node].ask("status", timeout=5)
        return {h: v["state"] for h, v in doc["hosts"].items()}

    def settled(self, node, expect):
        """``node``'s ledger holds ``expect`` and no run is queued or running."""
        try:
            doc = self.members[node].ask("status", timeout=5)
        except (OSError, hadaemon.base.HadaemonError):
            return False
        states = {h: v["state"] for h, v in doc["hosts"].items()}
        return all(states.get(h) == s for h, s in expect.items()) and not doc["daemon"]["queue"] \
            and all(r["state"] not in ("queued", "running") for r in doc["runs"])

    def wait_settled(self, node, expect, timeout=30):
        wait_for(lambda: self.settled(node, expect), timeout=timeout, interval=0.1,
                 what="%s to show %s with nothing left to run (%s)" % (node, expect, self.tails()))

    def tails(self):
        return "\n".join("--- %s:\n%s" % (n, d.tail(12)) for n, d in self.members.items())

    def start(self, first="db1"):
        """Every member up, ``first`` leading; db1 master with the address, db2 slave, rows
        flowing through pgbouncer."""
        self.start_member(first)
        self.leader(among=(first,))
        for node in MEMBERS:
            if node != first:
                self.start_member(node)
        assert self.leader()[0] == first
        self.wait_settled(first, {"db1": "master", "db2": "slave"})
        # The first runs: [any_to_master] puts the address on db1, [any_to_slave] makes
        # sure db2 lacks it.  (On a machine at load 20, a leader may step down while they
        # run, its lease not renewed in time: a run interrupted is no concern here, the
        # address is.)
        runs = [e["run"] for e in self.history(first) if e.get("run")]
        assert len(runs) == 2 and all(r["state"] in ("ok", "interrupted") for r in runs), runs
        for run in runs:                    # what an operator does: --rerun it
            if run["state"] == "interrupted":
                self.members[self.leader()[0]].cli("--rerun", str(run["id"]), "--wait", "--timeout", "60",
                                                   check=True)
        assert self.topo.has_vip("db1") and not self.topo.has_vip("db2")
        self.holders0 = {h: (self.topo.has_vip(h), self.topo.link_up(h)) for h in ("db1", "db2")}
        self.monitors = {h: st.Monitor(self.topo, h, self.dir) for h in ("db1", "db2")}
        self.monitors["app"] = st.Monitor(self.topo, "app", self.dir, what=("neigh",))
        self.writers = st.Writers(self.topo, self.dir)
        wait_for(lambda: len(self.writers.acked_by("db1")) >= 100, timeout=30,
                 what="100 rows acknowledged through pgbouncer (writer errors: %s)"
                 % [e for e in self.writers.events() if e[0] == "err"][-5:])
        # Whoever leads next finds its ssh connections open (checks/keep_ssh_open).
        wait_for(lambda: all(self.ssh_kept(n) == "db1 open, db2 open" for n in MEMBERS), timeout=30,
                 what="every member's ssh connections kept open (%s)" % {n: self.ssh_kept(n) for n in MEMBERS})

    def ssh_kept(self, node):
        """What ``node``'s keep_ssh_open said last (None before it ran)."""
        checks = self.members[node].ask("status", timeout=5)["checks"]
        last = next(c["last"] for c in checks if c["name"].startswith("keep_ssh_open"))
        return last and last.get("message")

    # -- faults and heals -------------------------------------------------------------

    def kill_host(self, host):
        """``host`` dies: its cable, then every process in it (postgres, sshd, etcd, member)."""
        self.topo.cable(host, False)
        self.topo.kill_host(host)

    def revive_etcd(self, host):
        m = self.etcd.by_host(host)
        if m.running():
            m.kill()
        m.proc.wait(timeout=10)
        self.etcd.restart(m)

    def restart_sshd(self, host):
        """sshd again in ``host`` (after the host died), on its config and host key."""
        s = self.sshd[host]
        s.stop()
        argv = with_private_run([st.SSHD, "-D", "-e", "-f", s.config, "-E", s.log_path])
        before = s.log().count("Server listening on")
        s.proc = subprocess.Popen(self.topo.inside(host, argv), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        wait_for(lambda: s.log().count("Server listening on") > before, timeout=15,
                 what="sshd on %s to listen again" % host)

    def rebuild(self, old, new):
        """The old primary ``old`` as a standby of ``new``: stopped if it runs, a fresh
        pg_basebackup -R from ``new`` over the network, started; then synchronous
        replication back on ``new`` (the ALTER SYSTEM of sync_off reset)."""
        servers = {"db1": self.pair.primary, "db2": self.pair.standby}
        o, n = servers[old], servers[new]
        o.stop()
        shutil.rmtree(o.datadir)
        self.pair.run([self.pair.tool("pg_basebackup"), "-h", HOSTS[new], "-p", "5432", "-U", "postgres",
                       "-D", o.datadir, "-R", "-X", "stream", "-c", "fast", "--no-sync"], netns=o.netns)
        o.configure()
        o.start()
        n.sql("ALTER SYSTEM RESET synchronous_standby_names")
        n.sql("SELECT pg_reload_conf()")
        wait_for(lambda: n.sql("SELECT state, sync_state FROM pg_stat_replication") == ["streaming|sync"],
                 timeout=60, interval=0.1, what="%s to stream synchronously from %s" % (old, new))

    def trace_tools(self, log):
        """psql and ssh (every tool the actions reach the world with) wrapped for the
        members: each use by an action run logged with its node, epoch and run, start
        and end, to ``log``: the commands as the world saw them, not as the ledger says."""
        wrap = os.path.join(self.dir, "trace")
        os.mkdir(wrap)
        for tool in ("psql", "ssh"):
            real = shutil.which(tool, path=self.pair.client_env["PATH"])
            with open(os.path.join(wrap, tool), "w") as f:
                f.write('#!/bin/sh\n'
                        '[ -n "${HA_RUN_ID:-}" ] || exec %(real)s "$@"\n'
                        'echo "start $HA_NODE $HA_LEADER_EPOCH $HA_RUN_ID $$ $(date +%%s.%%N) %(tool)s" >>%(log)s\n'
                        'rc=0; %(real)s "$@" || rc=$?\n'
                        'echo "end $HA_NODE $HA_LEADER_EPOCH $HA_RUN_ID $$ $(date +%%s.%%N) %(tool)s" >>%(log)s\n'
                        'exit $rc\n' % {"real": real, "tool": tool, "log": log})
            os.chmod(os.path.join(wrap, tool), 0o755)
        for env in self.env.values():
            env["PATH"] = wrap + ":" + env["PATH"]

    def timeline(self, server):
        """The timeline of ``server``'s WAL now (1 + the promotions it went through)."""
        return int(server.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")[0], 16) \
            if server.sql("SELECT pg_is_in_recovery()") == ["f"] else \
            int(server.sql("SELECT received_tli FROM pg_stat_wal_receiver")[0] or 0)

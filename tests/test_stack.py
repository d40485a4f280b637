"""The production shape for real: hosts made of network namespaces, a moving service address, real pgbouncer.

Each test builds the hosts itself, as Linux network namespaces joined by veth pairs
to a bridge that lives in a namespace of its own (nothing is added to this machine's
network; every name carries the test run's prefix):

    db1      192.0.2.11   PostgreSQL primary, sshd            (the service address
    db2      192.0.2.12   PostgreSQL synchronous standby, sshd  192.0.2.10 on the primary)
    app      192.0.2.20   pgbouncer (:6432, appdb -> 192.0.2.10:5432), the writers
    watcher  192.0.2.30   hadaemon on examples/postgresql, as shipped

Writers in app commit numbered rows through pgbouncer and log every acknowledged
one.  Then db1 fails, one way per test: its postmaster killed (SIGKILL), its cable
pulled (eth0 down: it runs on, unreachable; the cable comes back later), the host
dead (every process in it killed, eth0 down), or stopped by hand
(``pg_ctl stop -m fast``).  hadaemon pauses pgbouncer, takes the address off db1
(when reachable), promotes db2, puts the address on it with a gratuitous ARP and
resumes pgbouncer.  The test asserts what an operator relies on: no acknowledged
row lost, exactly one promotion, the address on db2 and never on two reachable
hosts at once (``ip monitor`` of both hosts), no write acknowledged by db1 once the
address moved and, for the cable, db1 back fenced: the address taken off it, no
neighbour sent there, a direct write to it never acknowledged.

The planned switchover (``--switchover db2``, then ``--switchover db1``) runs the
example's ``[switchover]`` with the writers writing: no write may fail or be lost,
and the old primary must stream from the new one afterwards; a second test makes
db2 too late and checks that db1 is started again and the clients let go.

The outage and its parts (detection, split into the first report that saw the
fault and confirming it; pgbouncer, address, promotion, client), the
switchover's longest write wait and its steps are figures, printed in pytest's
summary, never asserted.  ``STACK_RUNS=5`` runs each scenario five times and adds
a table of medians; ``STACK_BEFORE=1`` lets an example without ``recheck`` run
(to measure an older one with this file).  Needs root and ``ip netns``;
skips otherwise.  Stale namespaces of a killed run of this file are removed at start.
"""

import datetime
import itertools
import json
import os
import pathlib
import pwd
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import ROOT, figure, keygen, wait_for, with_private_run
from pgpair import Pair, pg_bindir

import hadaemon.configfiles

EXAMPLE = ROOT / "examples" / "postgresql"
WRITER = ROOT / "tests" / "stack_writer.py"
HOSTS = {"db1": "192.0.2.11", "db2": "192.0.2.12", "app": "192.0.2.20", "watcher": "192.0.2.30"}
VIP, PREFIX, DEV = "192.0.2.10", 24, "eth0"
PGBOUNCER_PORT, APPDB, ADMIN_PASSWORD = 6432, "appdb", "stack-secret"
NS_PREFIX = "hadaemon-stack-"
NS_RE = re.compile(r"hadaemon-stack-(\d+)-\d+-[a-z0-9]+\Z")
RUNS = int(os.environ.get("STACK_RUNS", "1"))
SSHD = "/usr/sbin/sshd"
PROGRAMS = {"ip": "iproute2", "arping": "iputils-arping", SSHD: "openssh-server",
            "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pgbouncer": "pgbouncer",
            "psql": "postgresql-client", "setpriv": "util-linux", "unshare": "util-linux",
            "timeout": "coreutils"}
_serial = itertools.count(1)


def sh(argv, check=True, timeout=30, **kw):
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError("%s exited %d: %s%s" % (" ".join(map(str, argv)), r.returncode,
                                                     r.stdout, r.stderr))
    return r


def netns_problem():
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root: the hosts are network namespaces"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    probe = "%sprobe-%d" % (NS_PREFIX, os.getpid())
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        return "ip netns add fails here: %s" % r.stderr.strip()
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, stdin=subprocess.DEVNULL)
    return None


def kill_pids(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def netns_pids(name):
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    return [int(p) for p in r.stdout.split()]


def remove_netns(name):
    """Kill what runs in network namespace ``name``, delete it and its /etc/netns files."""
    for _ in range(3):
        pids = netns_pids(name)
        if not pids:
            break
        kill_pids(pids)
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, stdin=subprocess.DEVNULL)
    shutil.rmtree("/etc/netns/" + name, ignore_errors=True)


def sweep_stale():
    """Namespaces of an earlier run of this file whose pytest is gone (killed with -9)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NS_RE.match(name)
        if m and not os.path.exists("/proc/%s" % m.group(1)):
            remove_netns(name)


class Topology:
    """The hosts: one network namespace each, a veth pair from each to a bridge in a
    namespace of its own, addresses from HOSTS, and an /etc/hosts naming them all
    (``ip netns exec`` mounts /etc/netns/NAME/hosts over /etc/hosts)."""

    def __init__(self):
        self.prefix = "%s%d-%d-" % (NS_PREFIX, os.getpid(), next(_serial))
        self.made = []
        self.observers = set()          # pids of the test's own, spared when a host dies
        self.made_etc = not os.path.isdir("/etc/netns")

    def ns(self, host):
        return self.prefix + host

    def ip(self, host, *args, check=True):
        return sh(["ip", "-n", self.ns(host)] + list(args), check=check)

    def inside(self, host, argv):
        return ["ip", "netns", "exec", self.ns(host)] + list(argv)

    def build(self):
        for host in ["br"] + list(HOSTS):
            sh(["ip", "netns", "add", self.ns(host)])
            self.made.append(self.ns(host))
            self.ip(host, "link", "set", "lo", "up")
        self.ip("br", "link", "add", "br0", "type", "bridge")
        self.ip("br", "link", "set", "br0", "up")
        names = "".join("%s %s\n" % (addr, host) for host, addr in HOSTS.items())
        for host, addr in HOSTS.items():
            self.ip("br", "link", "add", "v-" + host, "type", "veth", "peer", "name", DEV,
                    "netns", self.ns(host))
            self.ip("br", "link", "set", "v-" + host, "master", "br0", "up")
            self.ip(host, "addr", "add", "%s/%d" % (addr, PREFIX), "dev", DEV)
            self.ip(host, "link", "set", DEV, "up")
            etc = "/etc/netns/" + self.ns(host)
            os.makedirs(etc)
            with open(etc + "/hosts", "w") as f:
                f.write("127.0.0.1 localhost\n" + names)

    def pids(self, host):
        return netns_pids(self.ns(host))

    def kill_host(self, host):
        """Every process of ``host`` but the test's observers, SIGKILL, until none is left."""
        def gone():
            pids = [p for p in self.pids(host) if p not in self.observers]
            kill_pids(pids)
            return not pids
        wait_for(gone, timeout=10, interval=0.05, what="every process of %s to die" % host)

    def cable(self, host, up):
        self.ip(host, "link", "set", DEV, "up" if up else "down")

    def link_up(self, host):
        return "state UP" in self.ip(host, "link", "show", DEV).stdout

    def has_vip(self, host):
        return (" %s/%d " % (VIP, PREFIX)) in self.ip(host, "-o", "addr", "show", "dev", DEV).stdout

    def mac(self, host):
        return re.search(r"link/ether (\S+)", self.ip(host, "link", "show", DEV).stdout).group(1)

    def teardown(self):
        for name in reversed(self.made):
            remove_netns(name)
        if self.made_etc:
            try:
                os.rmdir("/etc/netns")      # unless another run of this file still uses it
            except OSError:
                pass


class Monitor:
    """``ip -ts monitor`` of one host: every change of its addresses, links and
    neighbours, with its time, for the timeline after the test."""

    def __init__(self, topo, host, directory, what=("address", "link")):
        self.host = host
        self.path = os.path.join(directory, "monitor-%s.log" % host)
        with open(self.path, "wb") as out:
            self.proc = subprocess.Popen(["ip", "-n", topo.ns(host), "-ts", "monitor"] + list(what),
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        topo.observers.add(self.proc.pid)

    def events(self):
        """(time, line) of every event so far."""
        found = []
        with open(self.path, errors="replace") as f:
            for line in f:
                m = re.match(r"\[(\S+)\] (.*)", line)
                if m:
                    found.append((datetime.datetime.fromisoformat(m.group(1)).timestamp(), m.group(2)))
        return found

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def vip_timeline(monitor, holds, up):
    """Intervals [start, end) in which the host of ``monitor`` held the address with its
    link up, from its state at the monitor's start (``holds``, ``up``) and its events."""
    spans, since = [], None
    for t, line in [(0.0, "")] + monitor.events():
        if " %s/%d " % (VIP, PREFIX) in line and (" %s " % DEV) in line:
            holds = not line.startswith("Deleted")
        elif re.match(r"\d+: %s[@:]" % DEV, line) and "<" in line:
            up = "state UP" in line
        now = holds and up
        if now and since is None:
            since = t
        elif not now and since is not None:
            spans.append((since, t))
            since = None
    if since is not None:
        spans.append((since, float("inf")))
    return spans


def overlap(a, b):
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


class Sshd:
    """An OpenSSH server in a host, on port 22 of its own network, root in by key only."""

    def __init__(self, topo, host, directory, user_key):
        self.topo, self.host = topo, host
        self.dir = os.path.join(directory, "sshd-" + host)
        os.mkdir(self.dir)
        self.host_key = keygen(os.path.join(self.dir, "host_key"))
        shutil.copy(str(user_key) + ".pub", os.path.join(self.dir, "authorized_keys"))
        self.log_path = os.path.join(self.dir, "sshd.log")
        self.config = os.path.join(self.dir, "sshd_config")
        with open(self.config, "w") as f:
            f.write("\n".join([
                "ListenAddress 0.0.0.0",
                "Port 22",
                "HostKey %s" % self.host_key,
                "AuthorizedKeysFile %s" % os.path.join(self.dir, "authorized_keys"),
                "PidFile %s" % os.path.join(self.dir, "sshd.pid"),
                "StrictModes no", "UsePAM no", "UseDNS no",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
                "PrintMotd no", "LogLevel INFO",
                # No rc files of this machine's root in the "remote" shells (see test_ssh).
                "SetEnv SHLVL=1", ""]))
        argv = with_private_run([SSHD, "-D", "-e", "-f", self.config, "-E", self.log_path])
        self.proc = subprocess.Popen(topo.inside(host, argv), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError("sshd on %s exited %s: %s %s" % (
                    host, self.proc.returncode, self.proc.stderr.read().decode(errors="replace"),
                    self.log()))
            return "Server listening on" in self.log()
        wait_for(listening, timeout=15, what="sshd on %s to listen" % host)

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc.stderr.close()


class Pgbouncer:
    """Debian's pgbouncer in app, in the foreground, as the postgres user: appdb goes to
    the service address; the admin console admits pgbouncer from the watcher only."""

    def __init__(self, topo, user, directory):
        self.dir = os.path.join(directory, "pgbouncer")
        os.mkdir(self.dir)
        # The example's pgbouncer.ini, with this test's paths and database; the
        # writers log in without password, hadaemon with one (scram-sha-256).
        ini = (EXAMPLE / "pgbouncer.ini").read_text()
        for old, new in (("/etc/pgbouncer/", self.dir + "/"), ("dbname=appdb", "dbname=postgres")):
            assert old in ini, "examples/postgresql/pgbouncer.ini no longer has %s" % old
            ini = ini.replace(old, new)
        files = {
            "pgbouncer.ini": ini + "unix_socket_dir =\npidfile = %s/pgbouncer.pid\n" % self.dir,
            "pgbouncer_hba.conf": "host pgbouncer pgbouncer %s/32 scram-sha-256\n"
                                  "host %s postgres 127.0.0.1/32 trust\n" % (HOSTS["watcher"], APPDB),
            "userlist.txt": '"pgbouncer" "%s"\n"postgres" ""\n' % ADMIN_PASSWORD,
        }
        for name, text in files.items():
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(text)
        for name in os.listdir(self.dir) + ["."]:
            os.chown(os.path.join(self.dir, name), user.pw_uid, user.pw_gid)
        self.log_path = os.path.join(self.dir, "pgbouncer.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(topo.inside("app", [
                "setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid), "--clear-groups",
                "--", "pgbouncer", os.path.join(self.dir, "pgbouncer.ini")]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError("pgbouncer exited %s: %s" % (self.proc.returncode, self.log()))
            return "listening on %s:%d" % (HOSTS["app"], PGBOUNCER_PORT) in self.log()
        wait_for(listening, timeout=15, what="pgbouncer to listen")

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class Writers:
    """``count`` stack_writer.py processes in app, through pgbouncer, each giving up
    on an answer after ``patience`` seconds."""

    def __init__(self, topo, directory, count=2, patience=5.0):
        self.paths = [os.path.join(directory, "writer-%d.log" % i) for i in range(count)]
        self.procs = []
        for i, path in enumerate(self.paths):
            with open(path + ".err", "wb") as err:
                self.procs.append(subprocess.Popen(topo.inside("app", [
                    sys.executable, str(WRITER), "127.0.0.1", str(PGBOUNCER_PORT), APPDB, "postgres",
                    str(i + 1), str(count), path, str(patience)]), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))

    def events(self):
        found = []
        for path in self.paths:
            try:
                with open(path) as f:
                    found += [line.split() for line in f if line.endswith("\n")]
            except FileNotFoundError:
                pass
        return found

    def acked(self):
        """n -> (time, server) of every acknowledged row."""
        return {int(e[1]): (float(e[2]), e[3]) for e in self.events() if e[0] == "ack"}

    def acked_by(self, server, after=0.0):
        return sorted(t for t, s in self.acked().values() if s == server and t > after)

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for proc, path in zip(self.procs, self.paths):
            with open(path + ".err") as err:
                assert proc.returncode in (0, -signal.SIGTERM, -signal.SIGKILL), \
                    "a writer failed: %s" % err.read()


class Stack:
    """Everything of one test: the hosts, the pair, sshd, pgbouncer, hadaemon, writers."""

    def __init__(self, daemon, bindir, user, template):
        self.d = daemon
        self.dir = tempfile.mkdtemp(prefix="hadaemon-stack-")
        os.chmod(self.dir, 0o755)           # pgbouncer runs as the postgres user
        self.topo = Topology()
        self.pair = self.sshd = self.pgbouncer = self.writers = self.first_report = None
        self.monitors = {}
        self.bindir, self.user, self.template = bindir, user, template

    def build(self):
        topo = self.topo
        topo.build()
        self.pair = Pair(self.bindir, self.user, network="192.0.2.0/24", servers=[
            ("db1", 5432, HOSTS["db1"], topo.ns("db1")), ("db2", 5432, HOSTS["db2"], topo.ns("db2"))])
        self.pair.build(template=self.template)
        key = keygen(os.path.join(self.dir, "id_ed25519"))
        self.sshd = {h: Sshd(topo, h, self.dir, key) for h in ("db1", "db2")}
        self.pgbouncer = Pgbouncer(topo, self.user, self.dir)
        self.install_example(key)

    def install_example(self, key):
        """examples/postgresql as shipped, in the watcher's config dir; the key and the
        pinned host keys in its state dir, where the example's ssh_config looks."""
        d = self.d
        for name in ("checks.conf", "actions.conf", "ssh_config"):
            shutil.copy(EXAMPLE / name, d.dir / name)
        for sub in ("checks", "actions"):
            shutil.copytree(EXAMPLE / sub, d.dir / sub, dirs_exist_ok=True)
        # A short state dir: the example's ssh_config keeps its shared ssh connections'
        # sockets there, and a UNIX socket path has room for 107 characters.
        d.state = pathlib.Path(self.dir) / "state"
        d.state.mkdir(mode=0o700)
        shutil.copy(key, d.state / "id_ed25519")
        (d.state / "id_ed25519").chmod(0o600)
        (d.state / "known_hosts").write_text("".join(
            "%s %s\n" % (h, " ".join(open(str(s.host_key) + ".pub").read().split()[:2]))
            for h, s in self.sshd.items()))
        pgpass = d.state / "pgpass"
        pgpass.write_text("app:%d:pgbouncer:pgbouncer:%s\n" % (PGBOUNCER_PORT, ADMIN_PASSWORD))
        pgpass.chmod(0o600)
        config = hadaemon.configfiles.load_config(str(d.dir))
        groups = {(g.interval, g.confirm, getattr(g, "recheck", None))
                  for g in config.groups if g.scope.kind == "local"}
        # The figures are for the example as shipped: checked, not assumed.
        assert groups == {(0.5, 2, 0.1)} or os.environ.get("STACK_BEFORE"), groups
        d.wrap = self.topo.inside("watcher", [])

    def start(self, patience=5.0, **env):
        """hadaemon up (``env``: more of its environment), db1 master with the address,
        db2 slave, rows flowing through pgbouncer (from writers that wait ``patience``
        seconds for an answer)."""
        d = self.d
        env = dict(self.pair.client_env, PGPASSFILE=str(d.state / "pgpass"), **env)
        d.start(env=env)
        d.wait_state("db1", "master", timeout=30)
        d.wait_state("db2", "slave", timeout=30)
        first = d.wait_runs(2, timeout=30)
        assert all(r["state"] == "ok" for r in first), json.dumps(first, indent=1)
        assert self.topo.has_vip("db1") and not self.topo.has_vip("db2")
        self.holders0 = {h: (self.topo.has_vip(h), self.topo.link_up(h)) for h in ("db1", "db2")}
        self.monitors = {h: Monitor(self.topo, h, self.dir) for h in ("db1", "db2")}
        self.monitors["app"] = Monitor(self.topo, "app", self.dir, what=("neigh",))
        self.writers = Writers(self.topo, self.dir, patience=patience)
        wait_for(lambda: len(self.writers.acked_by("db1")) >= 100, timeout=30,
                 what="100 rows acknowledged through pgbouncer (writer errors: %s)"
                 % [e for e in self.writers.events() if e[0] == "err"][-5:])

    def teardown(self):
        if self.first_report is not None:
            self.first_report.stop()
        for part in [self.writers] + list(self.monitors.values()):
            if part is not None:
                try:
                    part.stop()
                except Exception:       # teardown goes on; the test has failed already
                    pass
        self.d.cleanup()
        if self.pgbouncer is not None:
            self.pgbouncer.stop()
        for s in (self.sshd or {}).values():
            s.stop()
        if self.pair is not None:
            self.pair.teardown()
        self.topo.teardown()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_template():
    """One initdb for the whole file; each test's primary starts from a copy."""
    problem = netns_problem()
    if problem:
        pytest.skip(problem)
    # Root with namespaces: anything missing now is a broken machine, and fails loudly.
    missing = ["%s (Debian package %s)" % (p, pkg) for p, pkg in PROGRAMS.items()
               if not (os.access(p, os.X_OK) if p.startswith("/") else shutil.which(p))]
    bindir = pg_bindir()
    if bindir is None:
        missing.append("PostgreSQL's server binaries (Debian package postgresql)")
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        missing.append("the postgres user (Debian package postgresql)")
    assert not missing, "missing: %s; tests/run installs them" % ", ".join(missing)
    sweep_stale()
    directory = tempfile.mkdtemp(prefix="hadaemon-stack-initdb-")
    os.chown(directory, user.pw_uid, user.pw_gid)
    pair = Pair(bindir, user)
    try:
        pair.initdb(os.path.join(directory, "data"))
    finally:
        shutil.rmtree(pair.dir, ignore_errors=True)
    yield bindir, user, os.path.join(directory, "data")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def stack(pg_template, daemon):
    s = Stack(daemon, *pg_template)
    try:
        s.build()
        yield s
    finally:
        s.teardown()


RESULTS = {}


@pytest.fixture(scope="module", autouse=True)
def medians():
    """With STACK_RUNS > 1: the median of every figure per scenario, after the last run."""
    yield
    for way, runs in SWITCHOVERS.items():
        if len(runs) > 1:
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            figure("stack: switchover %s: median of %d runs: write outage %d ms (%d-%d), longest "
                   "write wait %d ms (%d-%d); %s, hadaemon %d ms"
                   % (way, len(runs), med["outage"], min(r["outage"] for r in runs),
                      max(r["outage"] for r in runs), med["wait"], min(r["wait"] for r in runs),
                      max(r["wait"] for r in runs),
                      ", ".join("%s %d" % (n, med[n]) for n in SWITCHOVER_STEPS), med["hadaemon"]))
    for scenario, runs in RESULTS.items():
        if len(runs) < 2:
            continue
        keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
        med = {k: statistics.median(r[k] for r in runs) for k in keys}
        figure("stack: %s: median of %d runs: outage %d ms = detection %d (first report %d + "
               "confirming %d) + pgbouncer %d + address %d + promotion %d + hadaemon %d + "
               "client %d ms (outage range %d-%d ms)"
               % (scenario, len(runs), med["outage"], med["detection"], med["first report"],
                  med["confirming"], med["pgbouncer"], med["address"], med["promotion"],
                  med["hadaemon"], med["client"],
                  min(r["outage"] for r in runs), max(r["outage"] for r in runs)))


def command_times(run):
    """[(basename, first argument, started, ended, exit, output)] of a run's commands
    that ran, logger left out."""
    found = []
    for cmd in run["commands"]:
        res = cmd.get("result")
        if res is None or cmd.get("started") is None:
            continue
        name = os.path.basename(cmd["argv"][0])
        if name == "logger":
            continue
        found.append((name, cmd["argv"][1] if len(cmd["argv"]) > 1 else "", cmd["started"],
                      cmd["started"] + res["duration"], res.get("exit"), res.get("output", "")))
    return found


def timeline(cmds, since):
    """The commands of a run, one line each, times relative to ``since`` (for messages)."""
    return "\n".join("%-16s %-7s %+.3f..%+.3f exit %s: %s" % (
        name, arg, start - since, end - since, code, out.strip().replace("\n", " | "))
        for name, arg, start, end, code, out in cmds)


class FirstReport:
    """The first report on db1 after the fault that no longer says master: the daemon's
    ``hosts.db1.last_report`` (its time is when the master had the result), read over
    the socket every 10 ms in a thread.  Only its own time is used, so the poll's
    period bounds nothing but whether it is caught before the next report replaces it
    (a recheck later, at the soonest)."""

    def __init__(self, d, since):
        self.d, self.since = d, since
        self.report = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self):
        while not self.done.wait(0.01):
            try:
                last = ((self.d.ask("status", timeout=5).get("hosts") or {}).get("db1") or {}) \
                    .get("last_report") or {}
            except Exception:           # the socket busy or gone for a moment: look again
                continue
            if last.get("state") not in (None, "master") and (last.get("time") or 0) >= self.since:
                self.report = last
                return

    def stop(self):
        self.done.set()
        self.thread.join(timeout=10)
        return self.report


def failover(s, fail):
    """Fail db1 by ``fail()``; wait until db2 took over and 100 rows went through
    pgbouncer to it; return the time of the failure."""
    d, writers = s.d, s.writers
    killed = time.time()
    s.first_report = FirstReport(d, killed)
    fail()
    d.wait_state("db1", "down", timeout=30)
    d.wait_state("db2", "master", timeout=30)
    wait_for(lambda: len(writers.acked_by("db2")) >= 100, timeout=30,
             what="100 rows acknowledged by db2 through pgbouncer (log:\n%s)" % d.tail())
    d.wait_runs(4, timeout=30)
    return killed


def check_and_report(s, scenario, killed, extra=""):
    d, topo, writers = s.d, s.topo, s.writers
    db2 = s.pair.standby
    writers.stop()
    history = json.loads(d.cli("--history", "50", "--json", check=True).stdout)[::-1]
    after = [h for h in history if h["time"] >= killed]
    down = [h for h in after if (h["host"], h["from"], h["to"]) == ("db1", "master", "down")]
    assert len(down) == 1, json.dumps(after, indent=1)
    down = down[0]
    run = down["run"]
    assert run["section"] == "master_to_down" and run["state"] == "ok", json.dumps(run, indent=1)
    cmds = command_times(run)
    assert [(c[0], c[1]) for c in cmds] == [
        ("pgbouncer_ctl", "pause"), ("remote_vip", "del"), ("promote_standby", "db2"),
        ("sync_off", "db2"), ("remote_vip", "add"), ("pgbouncer_ctl", "resume")], timeline(cmds, killed)
    promoted = [r for r in d.runs() for c in command_times(r)
                if c[0] == "promote_standby" and c[4] == 0 and "db2 promoted" in c[5]]
    assert len(promoted) == 1, promoted
    # One promotion is one timeline switch: 1 -> 2.
    assert db2.sql("SELECT pg_is_in_recovery()") == ["f"]
    assert db2.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") == ["00000002"]

    # -- the address: on db2, never on two reachable hosts ---------------------------
    assert topo.has_vip("db2") and topo.link_up("db2")
    assert not (topo.has_vip("db1") and topo.link_up("db1"))
    spans = {h: vip_timeline(s.monitors[h], *s.holders0[h]) for h in ("db1", "db2")}
    both = overlap(spans["db1"], spans["db2"])

    # -- no acknowledged row lost; none acknowledged by db1 once the failover began --
    acked = writers.acked()
    present = {int(n) for n in db2.sql("SELECT n FROM ha_rows")}
    lost = sorted(set(acked) - present)
    assert not lost, "acknowledged rows missing on db2: %s" % lost[:20]
    late = [(n, t - killed) for n, (t, srv) in acked.items() if srv == "db1" and t >= down["time"]]
    assert not late, "db1 acknowledged rows after hadaemon saw it down: %s" % late[:10]
    first_db2 = min(t for t, srv in acked.values() if srv == "db2")
    last_db1 = max(t for t, srv in acked.values() if srv == "db1")

    outage = first_db2 - killed
    first = s.first_report.stop()
    assert first is not None, "no report on db1 after the fault was seen"
    parts = {
        "outage": outage * 1000,
        "detection": (down["time"] - killed) * 1000,
        # detection = waiting for the next check (and its run) + confirming it
        "first report": (first["time"] - killed) * 1000,
        "confirming": (down["time"] - first["time"]) * 1000,
        "pgbouncer": sum(c[3] - c[2] for c in cmds if c[0] == "pgbouncer_ctl") * 1000,
        "address": sum(c[3] - c[2] for c in cmds if c[0] == "remote_vip") * 1000,
        "promotion": sum(c[3] - c[2] for c in cmds if c[0] in ("promote_standby", "sync_off")) * 1000,
        "client": (first_db2 - cmds[-1][3]) * 1000,
    }
    parts["hadaemon"] = (cmds[-1][3] - down["time"]) * 1000 - sum(
        parts[k] for k in ("pgbouncer", "address", "promotion"))
    RESULTS.setdefault(scenario, []).append(parts)
    load = open("/proc/loadavg").read().split()[0]
    figure("stack: %s: write outage %d ms (kill -> first acknowledged write through pgbouncer), "
           "%d acknowledged, %d present, %d lost, %d promotion, address on db2"
           % (scenario, outage * 1000, len(acked), len(present), len(lost), len(promoted)))
    figure("stack: %s: detection %d ms (first report %d + confirming %d), pgbouncer %d, address %d, "
           "promotion %d, hadaemon %d, client %d; last db1 ack %+d ms, address on both reachable "
           "hosts %d ms%s (load %s)"
           % (scenario, parts["detection"], parts["first report"], parts["confirming"],
              parts["pgbouncer"], parts["address"], parts["promotion"],
              parts["hadaemon"], parts["client"], (last_db1 - killed) * 1000, both * 1000, extra, load))
    return both


@pytest.mark.parametrize("run", range(RUNS))
def test_killed_postmaster(stack, run):
    """The primary's postmaster dies (SIGKILL); its host lives on: connections are refused."""
    stack.start()
    pid = stack.pair.primary.postmaster_pid()
    killed = failover(stack, lambda: os.kill(pid, signal.SIGKILL))
    both = check_and_report(stack, "killed postmaster", killed)
    assert both == 0, "the address was on db1 and db2 at once for %.3f s" % both


@pytest.mark.parametrize("run", range(RUNS))
def test_dead_host(stack, run):
    """db1 the host dies: its link goes down and, with it, every process in it."""
    stack.start()

    def die():
        stack.topo.cable("db1", False)
        stack.topo.kill_host("db1")
    killed = failover(stack, die)
    assert not stack.pair.primary.ready() and stack.pair.primary.proc.poll() is not None
    both = check_and_report(stack, "dead host", killed)
    assert both == 0, "the address was on db1 and db2 at once for %.3f s" % both


@pytest.mark.parametrize("run", range(RUNS))
def test_stopped_by_hand(stack, run):
    """The operator stops db1's PostgreSQL cleanly, without --switchover: hadaemon
    sees a primary down and fails over (what --switchover is for instead)."""
    stack.start()
    db1 = stack.pair.primary
    killed = failover(stack, lambda: stack.pair.run(
        [stack.pair.tool("pg_ctl"), "stop", "-D", db1.datadir, "-m", "fast", "-w", "-t", "30"]))
    both = check_and_report(stack, "stopped by hand", killed)
    assert both == 0, "the address was on db1 and db2 at once for %.3f s" % both


SWITCHOVER_STEPS = ["checkpoint", "hold", "stop", "promote", "address off", "address on", "resume",
                    "rejoin"]


def switchover_steps(run):
    """[(step, started, ended, exit, output)] of a [switchover] run's commands that ran,
    logger left out; a step named by SWITCHOVER_STEPS (pgbouncer_guard: the command it runs)."""
    names = {("psql",): "checkpoint", ("pgbouncer_ctl", "hold"): "hold",
             ("pg_handover", "stop"): "stop", ("promote_standby",): "promote",
             ("remote_vip", "del"): "address off", ("remote_vip", "add"): "address on",
             ("pgbouncer_ctl", "resume"): "resume", ("pg_handover", "rejoin"): "rejoin"}
    found = []
    for cmd in run["commands"]:
        res, argv = cmd.get("result"), [os.path.basename(cmd["argv"][0])] + cmd["argv"][1:]
        if res is None or cmd.get("started") is None or argv[0] == "logger":
            continue
        if argv[0] == "pgbouncer_guard":
            argv = argv[3:]
        name = names.get(tuple(argv[:1])) or names.get(tuple(argv[:2]), " ".join(argv[:2]))
        found.append((name, cmd["started"], cmd["started"] + res["duration"], res.get("exit"),
                      res.get("output", "")))
    return found


def write_waits(writers, since, until):
    """(outage, longest wait, client errors) of the writes around [since, until]: the
    longest stretch with no acknowledged write, the longest a single write waited (a
    writer sends the next one as soon as one is acknowledged), errors the writers saw."""
    per_writer, every = [], []
    for path in writers.paths:
        with open(path) as f:
            acks = [float(line.split()[2]) for line in f if line.startswith("ack ")]
        every += acks
        per_writer.append(acks)

    def longest(acks):
        return max([0.0] + [b - a for a, b in zip(acks, acks[1:]) if b >= since and a <= until])
    errors = [e for e in writers.events() if e[0] == "err" and since <= float(e[1]) <= until + 1]
    return longest(sorted(every)), max(longest(a) for a in per_writer), errors


def streams_from(standby, primary):
    """Whether ``standby`` streams from ``primary``, as both of them say."""
    receiver = standby.sql("SELECT status, sender_host FROM pg_stat_wal_receiver")
    senders = primary.sql("SELECT state FROM pg_stat_replication")
    return receiver in (["streaming|%s" % primary.name], ["streaming|%s" % primary.address]) \
        and senders == ["streaming"]


SWITCHOVERS = {}        # "to db2" -> [{figure: ms}] of every run, for the medians


def switchover(s, frm, to, median=True):
    """--switchover TO with the writers writing; assert and print what the application
    saw, and that the pair is whole again with TO the primary (its figures among the
    medians' when ``median``)."""
    d, topo, writers = s.d, s.topo, s.writers
    servers = {"db1": s.pair.primary, "db2": s.pair.standby}
    new, old = servers[to], servers[frm]
    asked = time.time()
    r = d.cli("--switchover", to, "--wait", timeout=200)
    done = time.time()
    runs = [x for x in d.runs() if x["section"].endswith("switchover") and (x["queued"] or 0) >= asked - 1]
    assert r.returncode == 0 and len(runs) == 1 and runs[0]["state"] == "ok", \
        "--switchover %s exited %d: %s%s\n%s\n%s" % (to, r.returncode, r.stdout, r.stderr,
                                                     json.dumps(runs, indent=1), d.tail())
    run = runs[0]
    steps = switchover_steps(run)
    said = "\n".join("%-12s %+.3f..%+.3f exit %s: %s" % (
        n, t0 - asked, t1 - asked, code, out.strip().replace("\n", " | ")) for n, t0, t1, code, out in steps)
    assert [x[0] for x in steps] == SWITCHOVER_STEPS, said
    # hadaemon sees it as it is, TO master and FROM a standby again; the transitions
    # the switchover caused ran no section.
    d.wait_state(to, "master", timeout=30)
    d.wait_state(frm, "slave", timeout=30)
    history = json.loads(d.cli("--history", "50", "--json", check=True).stdout)
    caused = [h for h in history if h["time"] >= run["started"] and (
        (h["host"], h["from"]) == (frm, "master") or (h["host"], h["to"]) == (to, "master"))]
    assert len(caused) == 2 and all(h["run"] is None for h in caused), json.dumps(caused, indent=1)
    wait_for(lambda: len(writers.acked_by(to, after=done)) >= 50, timeout=30,
             what="50 rows acknowledged by %s after the switchover" % to)

    outage, wait, errors = write_waits(writers, run["started"], run["ended"])
    acked = writers.acked()
    present = {int(n) for n in new.sql("SELECT n FROM ha_rows")}
    lost = sorted(set(acked) - present)
    promoted = [x for x in steps if x[0] == "promote" and "%s promoted" % to in x[4]]
    assert not lost, "acknowledged rows missing on %s: %s" % (to, lost[:20])
    assert not errors, "the writers saw errors: %s\n%s" % (errors[:10], said)
    assert len(promoted) == 1, said
    assert new.sql("SELECT pg_is_in_recovery()") == ["f"]
    assert old.sql("SELECT pg_is_in_recovery()") == ["t"]
    assert streams_from(old, new), "%s does not stream from %s" % (frm, to)
    assert topo.has_vip(to) and not topo.has_vip(frm)
    figure("stack: switchover: write outage %d ms, %d acknowledged, %d present, %d lost, %d client "
           "errors, %d promotion, address on %s, %s standby of %s"
           % (outage * 1000, len(acked), len(present), len(lost), len(errors), len(promoted), to, frm, to))
    parts = {n: 0.0 for n in SWITCHOVER_STEPS}
    for n, t0, t1, _, _ in steps:
        parts[n] += (t1 - t0) * 1000
    parts["hadaemon"] = (run["ended"] - run["started"]) * 1000 - sum(parts.values())
    parts.update(outage=outage * 1000, wait=wait * 1000)
    if median:
        SWITCHOVERS.setdefault("to " + to, []).append(parts)
    figure("stack: switchover to %s: longest write wait %d ms (target <= 2000); %s, hadaemon %d ms; "
           "--switchover --wait returned after %d ms (load %s)"
           % (to, wait * 1000, ", ".join("%s %d" % (n, parts[n]) for n in SWITCHOVER_STEPS),
              parts["hadaemon"], (done - asked) * 1000, open("/proc/loadavg").read().split()[0]))


@pytest.mark.parametrize("run", range(RUNS))
def test_planned_switchover(stack, run):
    """--switchover db2, then --switchover db1, with the writers writing through pgbouncer
    the whole time: no write fails, none is lost, one promotion each way, and the old
    primary streams from the new one afterwards, no rebuild by hand."""
    s = stack
    s.pair.primary.sql("CREATE ROLE replicator LOGIN REPLICATION")    # the example's CONNINFO
    # The writers wait for an answer as long as an application without a statement
    # timeout would (30 s, not 5): a wait is what a switchover may cost, and it is
    # printed; an error is what it must not cause.
    s.start(patience=30)
    switchover(s, "db1", "db2")
    switchover(s, "db2", "db1")
    s.writers.stop()


def test_switchover_rolled_back(stack):
    """db2 replays 30 s late (recovery_min_apply_delay), and pg_handover stop waits 1 s
    for it to replay db1's shutdown checkpoint: it starts db1 again, pgbouncer_guard
    lets the clients go, the run fails saying why; the clients saw a wait and no error.
    Then --switchover db2 goes through."""
    s = stack
    s.pair.primary.sql("CREATE ROLE replicator LOGIN REPLICATION")
    s.start(patience=30, CATCHUP_TIMEOUT="1")
    db1, db2 = s.pair.primary, s.pair.standby

    def apply_delay(value):
        db2.sql("ALTER SYSTEM SET recovery_min_apply_delay = '%s'" % value)
        db2.sql("SELECT pg_reload_conf()")
    apply_delay("30s")
    wait_for(lambda: db2.sql("SELECT now() - pg_last_xact_replay_timestamp() > interval '1 s'") == ["t"],
             timeout=30, what="db2 to replay a second late")
    asked = time.time()
    r = s.d.cli("--switchover", "db2", "--wait", timeout=200)
    done = time.time()
    # Under synchronous replication db1's first commits wait for db2 to stream again,
    # and db2 waits out its delay first (its startup process rereads the setting).
    apply_delay("0")
    run = [x for x in s.d.runs() if x["section"].endswith("switchover")][0]
    steps = switchover_steps(run)
    assert r.returncode == 1 and run["state"] == "failed", json.dumps(run, indent=1)
    assert [x[0] for x in steps] == ["checkpoint", "hold", "stop"], steps
    said = steps[-1][4]
    assert "db2 has not replayed db1's shutdown checkpoint" in said and "the primary as before" in said \
        and "appdb resumed" in said, said
    assert db1.sql("SELECT pg_is_in_recovery()") == ["f"]
    assert s.topo.has_vip("db1") and not s.topo.has_vip("db2")
    wait_for(lambda: streams_from(db2, db1), timeout=30, what="db2 to stream from db1 again")
    wait_for(lambda: len(s.writers.acked_by("db1", after=run["ended"])) >= 50, timeout=30,
             what="50 rows acknowledged by db1 after the failed switchover")
    outage, wait, errors = write_waits(s.writers, run["started"], run["ended"])
    s.d.wait_state("db1", "master", timeout=30)
    s.d.wait_state("db2", "slave", timeout=30)
    acked = s.writers.acked()
    present = {int(n) for n in db1.sql("SELECT n FROM ha_rows")}
    assert not set(acked) - present
    # db1 was accepting connections again before the clients were let go (pg_ctl start -w).
    assert not errors, "the writers saw errors: %s" % errors[:10]
    figure("stack: switchover rolled back: stop %d ms (db1 stopped, 1 s for db2, started again), "
           "longest write wait %d ms, 0 client errors, 0 lost; --switchover --wait exit 1 after %d ms"
           % ((steps[-1][2] - steps[-1][1]) * 1000, wait * 1000, (done - asked) * 1000))
    switchover(s, "db1", "db2", median=False)
    s.writers.stop()


@pytest.mark.parametrize("run", range(RUNS))
def test_pulled_cable(stack, run):
    """db1's cable is pulled: it runs on, unreachable, still holding the address and
    still a primary in its own eyes.  Then the cable comes back: db1 must not serve
    as a second primary through the address, nor take a write."""
    s = stack
    s.start()
    topo, d = s.topo, s.d
    db1 = s.pair.primary
    killed = failover(s, lambda: topo.cable("db1", False))
    assert db1.sql("SELECT pg_is_in_recovery()") == ["f"]     # alive, a primary, cut off

    back = time.time()
    topo.cable("db1", True)
    # The check reads db1 master again: [any_to_master] runs claim_vip, which takes
    # the address off it, announces it again from db2, and fails the run to show it.
    run = d.wait_runs(5, timeout=30)[-1]
    assert (run["host"], run["section"], run["state"]) == ("db1", "any_to_master", "failed"), \
        json.dumps(run, indent=1)
    claim = [c for c in command_times(run) if c[0] == "claim_vip"][0]
    assert "db1 is a second primary" in claim[5] and "removed from eth0" in claim[5], claim
    fenced = claim[3]
    assert not topo.has_vip("db1") and topo.has_vip("db2")
    wait_for(lambda: len(s.writers.acked_by("db2", after=fenced)) >= 50, timeout=30,
             what="50 more rows acknowledged by db2 after db1 came back")

    # db1 takes no write: a commit there waits for a synchronous standby that never comes.
    with pytest.raises(subprocess.TimeoutExpired):
        db1.sql("INSERT INTO ha_rows (n) VALUES (-1)", timeout=2)
    assert db1.sql("SELECT wait_event FROM pg_stat_activity "
                   "WHERE query = 'INSERT INTO ha_rows (n) VALUES (-1)'") == ["SyncRep"]

    # Nobody was sent to db1 through the address: app's neighbour entry for it never
    # named db1's link address after the failover.
    db1_mac = topo.mac("db1")
    to_db1 = [(t - killed, line) for t, line in s.monitors["app"].events()
              if line.startswith(VIP + " ") and db1_mac in line and t >= killed]
    assert not to_db1, to_db1
    both = check_and_report(s, "pulled cable", killed, extra=" (db1 back %+d ms, fenced %+d ms)" % (
        (back - killed) * 1000, (fenced - killed) * 1000))
    assert both <= fenced - back + 0.1, "db1 held the address beyond its fencing"


def test_examples_agree(tmp_path):
    """What the examples share stays one text, and examples/postgresql passes -t as shipped."""
    for name in ("move_vip", "remote_vip", "claim_vip"):
        assert (ROOT / "examples" / "vip" / "actions" / name).read_bytes() == \
            (EXAMPLE / "actions" / name).read_bytes(), "examples/*/actions/%s differ" % name
    probes = {}
    for path in (EXAMPLE / "checks" / "check_pg_role", EXAMPLE / "actions" / "promote_standby",
                 EXAMPLE / "actions" / "remote_vip"):
        m = re.search(r"\n(# reach HOST PORT:.*?\n\}\n)", path.read_text(), re.S)
        assert m, "%s: no reach() probe" % path
        probes[path.name] = m.group(1)
    assert len(set(probes.values())) == 1, "the reach() probes differ: %s" % probes
    r = subprocess.run([sys.executable, str(ROOT / "hadaemon.py"), "--config-dir", str(EXAMPLE),
                        "--state-dir", str(tmp_path / "state"), "--check-config"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

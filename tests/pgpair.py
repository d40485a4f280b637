"""A real PostgreSQL primary and synchronous hot standby for the tests, built in a temp dir.

Shared by ``test_postgresql_failover.py`` (both servers on loopback ports of this
host) and ``test_stack.py`` (each server in a network namespace of its own, on
port 5432 of its own address).  ``initdb`` the primary (trust for the test's
network only, synchronous replication so an acknowledged commit is on both),
``pg_basebackup -R`` the standby, run as the ``postgres`` user when the test runs
as root.  The test itself talks to each server over its UNIX socket, a path in the
temp dir, so it reaches a server whose network is cut.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

from conftest import alive, wait_for

PG_TOOLS = ("initdb", "postgres", "pg_basebackup", "pg_ctl", "psql", "pg_isready")


def pg_bindir():
    """The newest /usr/lib/postgresql/N/bin holding every tool we need, or None."""
    def version(path):
        try:
            return float(path.split("/")[-2])
        except ValueError:
            return 0.0
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(os.path.join(bindir, t), os.X_OK) for t in PG_TOOLS):
            return bindir
    return None


def server_setup():
    """(bindir, user to run the servers as or None), or skip the test saying what is missing."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin "
                    "(Debian's postgresql package provides them; tests/run installs it as root)")
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and initdb refuses root: no 'postgres' user to run "
                        "the servers as (Debian's postgresql package creates one)")
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop to "
                        "the postgres user")
    return bindir, user


def free_ports(n):
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pids_in(directory):
    """Pids of live processes whose cwd is ``directory`` or below (PostgreSQL's
    backends chdir to their data dir and run in sessions of their own)."""
    found = []
    prefix = directory.rstrip("/") + "/"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % name)
        except OSError:
            continue
        if (cwd == directory or cwd.startswith(prefix)) and alive(int(name)):
            found.append(int(name))
    return found


class Server:
    """One PostgreSQL server of the pair: a data dir, an address and port, a postmaster we started.

    ``netns`` names the network namespace it runs in (None: this host's own).
    """

    def __init__(self, pair, name, port, address="127.0.0.1", netns=None):
        self.pair, self.name, self.port = pair, name, port
        self.address, self.netns = address, netns
        self.datadir = os.path.join(pair.dir, name)
        self.socket_dir = os.path.join(pair.dir, name + ".run")
        self.log_path = os.path.join(pair.dir, name + ".log")
        self.proc = None

    @property
    def host(self):
        """The name hadaemon knows it by: check_pg_role's HOST:PORT for a port that is not 5432."""
        return "%s:%d" % (self.address, self.port)

    def configure(self):
        """Settings of this server's own, appended last so they win over the primary's copy."""
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
            f.write("port = %d\n"
                    "unix_socket_directories = '%s'\n"
                    "cluster_name = '%s'\n" % (self.port, self.socket_dir, self.name))

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.proc = self.pair.spawn([self.pair.tool("postgres"), "-D", self.datadir], log,
                                        netns=self.netns)
        finally:
            log.close()
        wait_for(lambda: self.proc.poll() is not None or self.ready(), timeout=30,
                 what="%s to accept connections" % self.name)
        if self.proc.poll() is not None:
            raise AssertionError("%s exited %s at start:\n%s" % (self.name, self.proc.returncode,
                                                                 self.log()))

    def ready(self):
        return subprocess.run([self.pair.tool("pg_isready"), "-q", "-h", self.socket_dir, "-p",
                               str(self.port), "-t", "2"], env=self.pair.client_env,
                              stdin=subprocess.DEVNULL, timeout=20).returncode == 0

    def postmaster_pid(self):
        with open(os.path.join(self.datadir, "postmaster.pid")) as f:
            return int(f.readline())

    def sql(self, query, timeout=20):
        """Run one statement as the superuser over the UNIX socket; its rows as a list of lines."""
        r = subprocess.run([self.pair.tool("psql"), "-h", self.socket_dir, "-p", str(self.port),
                            "-X", "-w", "-At", "-v", "ON_ERROR_STOP=1", "-c", query],
                           env=self.pair.client_env, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, "%s: %s failed: %s" % (self.name, query, r.stderr)
        return r.stdout.splitlines()

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def stop(self):
        """pg_ctl stop -m immediate, then SIGKILL whatever of it is left, by pid."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.pair.run([self.pair.tool("pg_ctl"), "stop", "-D", self.datadir,
                               "-m", "immediate", "-w", "-t", "10"], check=False, timeout=20)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.poll() is None:
                self.proc.kill()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in pids_in(self.datadir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Pair:
    """A primary and a synchronous hot standby in a temp dir the server user owns.

    ``servers``: (name, port, address, netns) of the primary, then the standby;
    default two loopback ports of this host.  ``network``: who may connect over
    TCP (pg_hba.conf, trust).
    """

    def __init__(self, bindir, user, servers=None, network="127.0.0.1/32"):
        self.bindir = bindir
        self.user = user                    # pwd entry to run the servers as, or None (ourselves)
        self.network = network
        self.dir = tempfile.mkdtemp(prefix="hadaemon-pg-")
        if user is not None:
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.server_env = {"PATH": bindir + ":/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC",
                           "HOME": self.dir}
        # Clients connect as the superuser initdb -U names; no PG* variable of
        # the caller's (PGHOST, PGSERVICE, ...) leaks in. PATH is a service's: the
        # PostgreSQL tools, then the system's, and no wrapper of a developer's
        # (pyenv's python3 shim costs 250 ms a start, the example checks run python3).
        self.client_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.client_env.update(PGUSER="postgres", PGDATABASE="postgres", PGCONNECT_TIMEOUT="5",
                               PATH=bindir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                               "/sbin:/bin")
        if servers is None:
            p1, p2 = free_ports(2)
            servers = [("db1", p1, "127.0.0.1", None), ("db2", p2, "127.0.0.1", None)]
        self.primary, self.standby = [Server(self, *spec) for spec in servers]
        self.others = []                    # other processes to kill at teardown

    def tool(self, name):
        return os.path.join(self.bindir, name)

    def as_user(self, argv, netns=None):
        """argv run as the server user (in ``netns``): setpriv and ip netns exec exec, so
        the pid is the tool's own."""
        if self.user is not None:
            argv = ["setpriv", "--reuid", str(self.user.pw_uid), "--regid", str(self.user.pw_gid),
                    "--clear-groups", "--"] + list(argv)
        if netns is not None:
            argv = ["ip", "netns", "exec", netns] + list(argv)
        return list(argv)

    def run(self, argv, check=True, timeout=60, netns=None):
        r = subprocess.run(self.as_user(argv, netns), env=self.server_env, cwd=self.dir,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("%s exited %d:\n%s%s" % (argv[0], r.returncode, r.stdout, r.stderr))
        return r

    def spawn(self, argv, log, netns=None):
        return subprocess.Popen(self.as_user(argv, netns), env=self.server_env, cwd=self.dir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def initdb(self, datadir):
        self.run([self.tool("initdb"), "-D", datadir, "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C"])

    def build(self, template=None):
        """initdb (or copy ``template``, a stopped data dir from ``initdb``), start the
        primary, base-backup the standby from it over the network, wait for it to
        stream synchronously, create the test's table."""
        p = self.primary
        for server in (self.primary, self.standby):
            os.mkdir(server.socket_dir, 0o755)
            if self.user is not None:
                os.chown(server.socket_dir, self.user.pw_uid, self.user.pw_gid)
        if template is None:
            self.initdb(p.datadir)
        else:
            self.run(["cp", "-a", template, p.datadir])
        with open(os.path.join(p.datadir, "postgresql.conf"), "a") as f:
            f.write("\n# hadaemon test\n"
                    "listen_addresses = '%s'\n"
                    "wal_level = replica\n"
                    "synchronous_standby_names = '*'\n"
                    "shared_buffers = 16MB\n"
                    "max_connections = 40\n"
                    "logging_collector = off\n"
                    % ("*" if p.netns else p.address))
        p.configure()
        with open(os.path.join(p.datadir, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all all %s trust\n"
                    "host replication all %s trust\n" % (self.network, self.network))
        p.start()
        s = self.standby
        self.run([self.tool("pg_basebackup"), "-h", p.address, "-p", str(p.port), "-U",
                  "postgres", "-D", s.datadir, "-R", "-X", "stream", "-c", "fast", "--no-sync"],
                 netns=s.netns)
        s.configure()
        s.start()

        def streaming_sync():
            return p.sql("SELECT state, sync_state FROM pg_stat_replication") == ["streaming|sync"]
        wait_for(streaming_sync, timeout=30, interval=0.1,
                 what="the standby to stream synchronously (log:\n%s)" % s.log())
        p.sql("CREATE TABLE ha_rows (n integer PRIMARY KEY, at timestamptz DEFAULT now(), "
              "server text DEFAULT current_setting('cluster_name'))")

    def teardown(self):
        for server in (self.primary, self.standby):
            server.stop()
        for proc in self.others:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        for pid in pids_in(self.dir):       # anything that still runs in there
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

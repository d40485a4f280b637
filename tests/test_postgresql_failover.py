"""PostgreSQL failover end to end: a real primary and hot standby, hadaemon on examples/postgresql.

The test builds the pair itself in a temp dir: ``initdb`` the primary (trust on
127.0.0.1 only, synchronous replication so an acknowledged commit is on both),
``pg_basebackup -R`` the standby, both on free loopback ports, run as the
``postgres`` user when the test runs as root.  A writer thread commits numbered
rows through the "middleware": a pgbouncer-style ``[databases]`` file, which it
re-reads before every row, plus a stand-in pgbouncer process that records each
SIGHUP (the reload the repoint action sends).  hadaemon runs the example config
unchanged except for the hosts and ports.  Then the primary's postmaster gets
SIGKILL, and the test asserts what an operator relies on: the standby promoted
exactly once, the middleware pointing at it, no acknowledged row lost, and the
history showing master_to_down then slave_to_master with their runs ok.

The failover figures are printed (run with ``-s`` to see them), never asserted.
"""

import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import ROOT, alive, wait_for

import hadaemon

EXAMPLE = ROOT / "examples" / "postgresql"
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
    """One PostgreSQL server of the pair: a data dir, a port, a postmaster we started."""

    def __init__(self, pair, name, port):
        self.pair, self.name, self.port = pair, name, port
        self.datadir = os.path.join(pair.dir, name)
        self.log_path = os.path.join(pair.dir, name + ".log")
        self.proc = None

    @property
    def host(self):
        """The name hadaemon knows it by: check_pg_role's HOST:PORT for a port that is not 5432."""
        return "127.0.0.1:%d" % self.port

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.proc = self.pair.spawn([self.pair.tool("postgres"), "-D", self.datadir], log)
        finally:
            log.close()
        wait_for(lambda: self.proc.poll() is not None or self.ready(), timeout=30,
                 what="%s to accept connections" % self.name)
        if self.proc.poll() is not None:
            raise AssertionError("%s exited %s at start:\n%s" % (self.name, self.proc.returncode,
                                                                 self.log()))

    def ready(self):
        return subprocess.run([self.pair.tool("pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                               str(self.port), "-t", "2"], env=self.pair.client_env,
                              stdin=subprocess.DEVNULL, timeout=20).returncode == 0

    def postmaster_pid(self):
        with open(os.path.join(self.datadir, "postmaster.pid")) as f:
            return int(f.readline())

    def sql(self, query, timeout=20):
        """Run one statement as the superuser over TCP; its rows as a list of lines."""
        r = subprocess.run([self.pair.tool("psql"), "-h", "127.0.0.1", "-p", str(self.port),
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
    """A primary and a synchronous hot standby in a temp dir the server user owns."""

    def __init__(self, bindir, user):
        self.bindir = bindir
        self.user = user                    # pwd entry to run the servers as, or None (ourselves)
        self.dir = tempfile.mkdtemp(prefix="hadaemon-pg-")
        if user is not None:
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.server_env = {"PATH": bindir + ":/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC",
                           "HOME": self.dir}
        # Clients connect as the superuser initdb -U names; no PG* variable of
        # the caller's (PGHOST, PGSERVICE, ...) leaks in.
        self.client_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.client_env.update(PGUSER="postgres", PGDATABASE="postgres", PGCONNECT_TIMEOUT="5",
                               PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        p1, p2 = free_ports(2)
        self.primary = Server(self, "db1", p1)
        self.standby = Server(self, "db2", p2)
        self.others = []                    # other processes to kill at teardown

    def tool(self, name):
        return os.path.join(self.bindir, name)

    def as_user(self, argv):
        """argv run as the server user: setpriv execs, so the pid is the tool's own."""
        if self.user is None:
            return list(argv)
        return ["setpriv", "--reuid", str(self.user.pw_uid), "--regid", str(self.user.pw_gid),
                "--clear-groups", "--"] + list(argv)

    def run(self, argv, check=True, timeout=60):
        r = subprocess.run(self.as_user(argv), env=self.server_env, cwd=self.dir,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError("%s exited %d:\n%s%s" % (argv[0], r.returncode, r.stdout, r.stderr))
        return r

    def spawn(self, argv, log):
        return subprocess.Popen(self.as_user(argv), env=self.server_env, cwd=self.dir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def build(self):
        p = self.primary
        self.run([self.tool("initdb"), "-D", p.datadir, "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C"])
        with open(os.path.join(p.datadir, "postgresql.conf"), "a") as f:
            f.write("\n# hadaemon test\n"
                    "listen_addresses = '127.0.0.1'\n"
                    "port = %d\n"
                    "unix_socket_directories = '%s'\n"
                    "wal_level = replica\n"
                    "synchronous_standby_names = '*'\n"
                    "shared_buffers = 16MB\n"
                    "max_connections = 40\n"
                    "logging_collector = off\n" % (p.port, self.dir))
        with open(os.path.join(p.datadir, "pg_hba.conf"), "w") as f:
            f.write("host all all 127.0.0.1/32 trust\n"
                    "host replication all 127.0.0.1/32 trust\n")
        p.start()
        s = self.standby
        self.run([self.tool("pg_basebackup"), "-h", "127.0.0.1", "-p", str(p.port), "-U",
                  "postgres", "-D", s.datadir, "-R", "-X", "stream", "-c", "fast", "--no-sync"])
        with open(os.path.join(s.datadir, "postgresql.conf"), "a") as f:
            f.write("port = %d\n" % s.port)
        s.start()

        def streaming_sync():
            return p.sql("SELECT state, sync_state FROM pg_stat_replication") == ["streaming|sync"]
        wait_for(streaming_sync, timeout=30, interval=0.1,
                 what="the standby to stream synchronously (log:\n%s)" % s.log())
        p.sql("CREATE TABLE ha_rows (n integer PRIMARY KEY, at timestamptz DEFAULT now())")

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


@pytest.fixture
def pg_pair():
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
    pair = Pair(bindir, user)
    try:
        pair.build()
        yield pair
    finally:
        pair.teardown()


class Middleware:
    """The pgbouncer stand-in: its [databases] file and a process that logs each SIGHUP."""

    STUB = ("import signal, sys, time\n"
            "def hup(signum, frame):\n"
            "    with open(sys.argv[1], 'a') as f:\n"
            "        f.write('%.6f\\n' % time.time())\n"
            "signal.signal(signal.SIGHUP, hup)\n"
            "open(sys.argv[2], 'w').write('ready\\n')\n"
            "while True:\n"
            "    signal.pause()\n")

    def __init__(self, directory, server, pair):
        self.db_file = directory / "databases.ini"
        self.pid_file = directory / "pgbouncer.pid"
        self.hup_log = directory / "pgbouncer.hups"
        self.db_file.write_text("; pgbouncer [databases], kept by hadaemon's repoint_pgbouncer\n"
                                "[databases]\n"
                                "appdb = host=127.0.0.1 port=%d dbname=postgres pool_size=5\n"
                                % server.port)
        started = directory / "pgbouncer.started"
        self.proc = subprocess.Popen([sys.executable, "-c", self.STUB, str(self.hup_log), str(started)],
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={"PATH": os.environ.get("PATH", "")})
        pair.others.append(self.proc)
        wait_for(started.exists, timeout=20, what="the pgbouncer stand-in to start")
        self.pid_file.write_text("%d\n" % self.proc.pid)

    def target(self):
        """(host, port) of the appdb entry."""
        text = self.db_file.read_text()
        line = [l for l in text.splitlines() if l.startswith("appdb")][0]
        host = re.search(r"\bhost=(\S+)", line).group(1)
        port = int(re.search(r"\bport=(\d+)", line).group(1))
        return host, port

    def hups(self):
        try:
            return [float(x) for x in self.hup_log.read_text().split()]
        except FileNotFoundError:
            return []


class Writer(threading.Thread):
    """Commits numbered rows, one psql per row, wherever the middleware file points.

    A row counts as acknowledged only when psql exits 0 and prints its number
    back (INSERT ... RETURNING): with synchronous replication the standby has
    it by then.  Each attempt takes a new number, so an unacknowledged commit
    never hides behind an acknowledged one.
    """

    def __init__(self, middleware, pair):
        super().__init__(daemon=True)
        self.middleware, self.pair = middleware, pair
        self.acked = {}                 # n -> (wall time, port); under ``lock``
        self.lock = threading.Lock()
        self.attempts = 0
        self.failures = 0
        self.stopping = threading.Event()

    def run(self):
        n = 0
        while not self.stopping.is_set():
            n += 1
            self.attempts += 1
            try:
                host, port = self.middleware.target()
                r = subprocess.run([self.pair.tool("psql"), "-h", host, "-p", str(port), "-X", "-w",
                                    "-At", "-c", "INSERT INTO ha_rows (n) VALUES (%d) RETURNING n" % n],
                                   env=dict(self.pair.client_env, PGCONNECT_TIMEOUT="2"),
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=10)
                ok = r.returncode == 0 and r.stdout.split()[:1] == [str(n)]
            except (subprocess.TimeoutExpired, OSError):
                ok, port = False, None
            if ok:
                with self.lock:
                    self.acked[n] = (time.time(), port)
            else:
                self.failures += 1
                self.stopping.wait(0.05)

    def on(self, port):
        """Rows acknowledged by the server on ``port``: n -> wall time."""
        with self.lock:
            return {n: t for n, (t, p) in self.acked.items() if p == port}

    def stop(self):
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the writer did not stop"


def install_example(d, pair):
    """The example config in the daemon's dir, db1 / db2 rewritten to the pair's ports."""
    shutil.copy(EXAMPLE / "actions.conf", d.dir / "actions.conf")
    for sub in ("checks", "actions"):
        shutil.copytree(EXAMPLE / sub, d.dir / sub, dirs_exist_ok=True)
    text = (EXAMPLE / "checks.conf").read_text()
    for name, server in (("db1", pair.primary), ("db2", pair.standby)):
        text, count = re.subn(r"(?m)^check_pg_role %s 5432$" % name,
                              "check_pg_role 127.0.0.1 %d" % server.port, text)
        assert count == 1, "examples/postgresql/checks.conf no longer checks %s on 5432" % name
    (d.dir / "checks.conf").write_text(text)
    config = hadaemon.load_config(str(d.dir))
    groups = {(g.interval, g.confirm) for g in config.groups if g.scope.kind == "local"}
    # The figures below are for the example as shipped: checked, not assumed.
    assert groups == {(0.5, 2)}, groups


def command_end(run, name):
    """Wall-clock time the named command of a run finished, and its result."""
    for cmd in run["commands"]:
        if os.path.basename(cmd["argv"][0]) == name:
            res = cmd["result"]
            return cmd["started"] + res["duration"], res
    raise AssertionError("run %s has no %s command: %s" % (run["id"], name, run))


def test_postgresql_failover(pg_pair, daemon):   # daemon torn down first
    d, pair = daemon, pg_pair
    db1, db2 = pair.primary, pair.standby
    middleware = Middleware(d.world, db1, pair)
    install_example(d, pair)

    writer = Writer(middleware, pair)
    writer.start()
    try:
        d.start(env=dict(pair.client_env, PGBOUNCER_DB_FILE=str(middleware.db_file),
                         PGBOUNCER_PIDFILE=str(middleware.pid_file)))
        d.wait_state(db1.host, "master", timeout=20)
        d.wait_state(db2.host, "slave", timeout=20)
        first = d.wait_runs(2, timeout=20)
        assert [r["state"] for r in first] == ["ok", "ok"], first
        assert middleware.target() == ("127.0.0.1", db1.port)
        wait_for(lambda: len(writer.on(db1.port)) >= 30, timeout=30,
                 what="30 rows acknowledged by the primary")

        # -- the failure ------------------------------------------------------------
        pid = db1.postmaster_pid()
        assert pid == db1.proc.pid
        killed = time.time()
        os.kill(pid, signal.SIGKILL)

        d.wait_state(db1.host, "down", timeout=30)
        d.wait_state(db2.host, "master", timeout=30)
        d.wait_runs(4, timeout=60)
        wait_for(lambda: middleware.target()[1] == db2.port, timeout=30,
                 what="the middleware to point at db2")
        wait_for(lambda: len(writer.on(db2.port)) >= 20, timeout=30,
                 what="20 rows acknowledged by the new primary through the middleware")
    finally:
        writer.stop()

    # -- hadaemon saw master_to_down, then slave_to_master, and both runs went fine ----
    history = json.loads(d.cli("--history", "50", "--json", check=True).stdout)[::-1]
    after = [h for h in history if h["time"] >= killed]
    assert [(h["host"], h["from"], h["to"]) for h in after] == [
        (db1.host, "master", "down"), (db2.host, "slave", "master")], after
    down, up = after
    assert down["run"]["section"] == "master_to_down" and down["run"]["state"] == "ok", down["run"]
    assert up["run"]["section"] == "slave_to_master" and up["run"]["state"] == "ok", up["run"]
    runs = d.runs()

    # The operator reads the same story from the state db once the daemon is stopped.
    assert d.stop() == 0
    offline = json.loads(d.cli("--history", "50", "--json", check=True).stdout)[::-1]
    assert [(h["id"], h["to"], h["run"]["state"]) for h in offline] == \
        [(h["id"], h["to"], h["run"]["state"]) for h in history]

    # -- promoted exactly once ------------------------------------------------------
    promotions = [r for r in runs if any(os.path.basename(c["argv"][0]) == "promote_standby"
                                         for c in r["commands"])]
    assert len(promotions) == 1, promotions
    promoted_at, res = command_end(down["run"], "promote_standby")
    assert res["exit"] == 0 and "%s promoted" % db2.host in res["output"], res
    assert db2.sql("SELECT pg_is_in_recovery()") == ["f"]
    # One promotion is one timeline switch: 1 -> 2.
    assert db2.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") == ["00000002"]
    assert not alive(pid)

    # -- the middleware points at the new primary and was told to reload ------------
    assert middleware.target() == ("127.0.0.1", db2.port)
    repointed_at, res = command_end(up["run"], "repoint_pgbouncer")
    assert "pgbouncer reloaded" in res["output"], res
    assert [t for t in middleware.hups() if t >= killed], middleware.hups()

    # -- no acknowledged commit lost -------------------------------------------------
    present = {int(n) for n in db2.sql("SELECT n FROM ha_rows")}
    acked = set(writer.acked)
    missing = sorted(acked - present)
    assert not missing, "acknowledged rows missing on the new primary: %s" % missing[:20]

    before, after_ = writer.on(db1.port), writer.on(db2.port)
    outage = min(after_.values()) - max(before.values())
    print("\npostgresql failover (interval 500ms, confirm 2): kill->down %.2fs, "
          "kill->promoted %.2fs, kill->repointed %.2fs, write outage %.2fs; "
          "rows acknowledged %d (%d before, %d after), present %d, attempts %d"
          % (down["time"] - killed, promoted_at - killed, repointed_at - killed, outage,
             len(acked), len(before), len(after_), len(present), writer.attempts))


def test_no_promotion_while_the_primary_answers(pg_pair, daemon):
    """The check loses db1 (a cut between this host and db1, say) while db1 still runs:
    hadaemon sees master_to_down, but promote_standby asks db1 itself and refuses."""
    d, pair = daemon, pg_pair
    db1, db2 = pair.primary, pair.standby
    middleware = Middleware(d.world, db1, pair)
    install_example(d, pair)
    d.start(env=dict(pair.client_env, PGBOUNCER_DB_FILE=str(middleware.db_file),
                     PGBOUNCER_PIDFILE=str(middleware.pid_file)))
    d.wait_state(db1.host, "master", timeout=20)
    d.wait_state(db2.host, "slave", timeout=20)
    d.wait_runs(2, timeout=20)

    # The check now asks a port nothing listens on, still reporting it as db1.
    dead = free_ports(1)[0]
    conf = d.dir / "checks.conf"
    text, count = re.subn(r"(?m)^check_pg_role 127\.0\.0\.1 %d$" % db1.port,
                          "check_pg_role 127.0.0.1 %d %s" % (dead, db1.host), conf.read_text())
    assert count == 1
    conf.write_text(text)
    d.cli("--reload", check=True)

    d.wait_state(db1.host, "down", timeout=30)
    run = d.wait_runs(3, timeout=60)[-1]
    assert run["section"] == "master_to_down" and run["state"] == "failed", run
    promote = [c for c in run["commands"] if os.path.basename(c["argv"][0]) == "promote_standby"][0]
    assert promote["result"]["exit"] == 1, promote
    assert "refusing: %s is still a primary" % db1.host in promote["result"]["output"], promote
    sync_off = [c for c in run["commands"] if os.path.basename(c["argv"][0]) == "sync_off"][0]
    assert sync_off["result"] is None, "sync_off ran after a refused promotion"
    # Nothing moved: one primary, one standby, clients still on db1.
    assert db1.sql("SELECT pg_is_in_recovery()") == ["f"]
    assert db2.sql("SELECT pg_is_in_recovery()") == ["t"]
    assert middleware.target() == ("127.0.0.1", db1.port)
    assert d.host_state(db2.host) == "slave"

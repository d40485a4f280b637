"""PostgreSQL failover end to end: a real primary and hot standby, hadaemon on examples/postgresql
in its repoint shape (actions-repoint.conf; test_stack.py runs its production shape, with a
service address that moves, across hosts made of network namespaces).

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

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, alive, figure, wait_for
from pgpair import Pair, free_ports, server_setup

import hadaemon.configfiles

EXAMPLE = ROOT / "examples" / "postgresql"


@pytest.fixture
def pg_pair():
    bindir, user = server_setup()
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
    """The example config in the daemon's dir, in its repoint shape (actions-repoint.conf
    as actions.conf: no service address to move on one host), db1 / db2 rewritten to
    the pair's ports."""
    shutil.copy(EXAMPLE / "actions-repoint.conf", d.dir / "actions.conf")
    for sub in ("checks", "actions"):
        shutil.copytree(EXAMPLE / sub, d.dir / sub, dirs_exist_ok=True)
    text = (EXAMPLE / "checks.conf").read_text()
    for name, server in (("db1", pair.primary), ("db2", pair.standby)):
        text, count = re.subn(r"(?m)^check_pg_role %s 5432$" % name,
                              "check_pg_role 127.0.0.1 %d" % server.port, text)
        assert count == 1, "examples/postgresql/checks.conf no longer checks %s on 5432" % name
    (d.dir / "checks.conf").write_text(text)
    config = hadaemon.configfiles.load_config(str(d.dir))
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


def test_check_pg_role_reports_the_standby_lag_in_bytes(pg_pair):
    """examples' check_pg_role: lag_bytes on the standby, 0 when it has replayed all, more
    while its replay is paused and the primary writes; none on the primary (SPEC §12's
    read backend asks /hosts/%[srv_name]/slave?lag_bytes.le=N)."""
    pair = pg_pair
    db1, db2 = pair.primary, pair.standby

    def report(server):
        out = subprocess.run([str(EXAMPLE / "checks" / "check_pg_role"), "127.0.0.1", str(server.port),
                              server.host], env=pair.client_env, capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    primary = report(db1)
    assert primary["state"] == "master" and "lag_bytes" not in primary, primary
    wait_for(lambda: report(db2).get("lag_bytes") == "0", timeout=30, what="the standby to be caught up")
    assert report(db2)["state"] == "slave"
    db2.sql("SELECT pg_wal_replay_pause()")
    db1.sql("INSERT INTO ha_rows (n) SELECT generate_series(1, 20000)")     # ~1 MB of WAL
    behind = report(db2)
    assert behind["state"] == "slave" and int(behind["lag_bytes"]) > 500000, behind
    assert "bytes behind the primary" in behind["message"], behind
    figure("check_pg_role: lag_bytes=%s on the standby, its replay paused while the primary wrote "
           "20000 rows" % behind["lag_bytes"])
    db2.sql("SELECT pg_wal_replay_resume()")
    wait_for(lambda: report(db2).get("lag_bytes") == "0", timeout=30, what="the standby to catch up")

"""The operator's surface (SPEC §6, issue 3): every command and exit code, against the real daemon.

Each test builds a small config in a temp dir (``setup_config``), drives the daemon through
check scripts that read files the test flips, and talks to it only the way an operator
would: the command line, signals, and the files in the state dir.
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

import hadaemon.base
import hadaemon.wire
import hadaemon.cli
from conftest import HADAEMON, alive, wait_for

HOSTS = ("db1", "db2")


def setup_config(d, hosts=HOSTS, confirm=1, interval="200ms", daemon="", actions=None, groups=""):
    """checks.conf with one [local] group of ``check_role HOST``; actions.conf records every transition."""
    d.role_check()
    d.recorder()
    d.write("checks.conf", "[daemon]\ninterval = %s\ntimeout = 5s\n%s\n[local]\nconfirm = %d\n%s\n%s"
            % (interval, daemon, confirm, "\n".join("check_role %s" % h for h in hosts), groups))
    d.write("actions.conf", actions if actions is not None else "[any_to_any]\nrecord %HOST% %FROM% %TO%\n")


def cli_start(d, *args):
    """``--start``; returns (CompletedProcess, daemon pid) and has teardown kill that pid."""
    result = d.cli("--start", *args)
    m = re.search(r"pid (\d+)", result.stdout)
    pid = int(m.group(1)) if m else None
    if pid:
        d.started.append(pid)
    return result, pid


def proc_stat(pid):
    """(ppid, pgrp, session) of a live process, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[2]), int(fields[3])


def gone(d):
    """Nothing of the daemon left: no pid file, no socket, no check or action process."""
    return (not (d.state / "hadaemon.pid").exists() and not (d.state / "hadaemon.sock").exists()
            and not d.descendants())


def read_notify(sock, timeout=10.0):
    """One sd_notify datagram as a list of lines, or None when none came in ``timeout``."""
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return None
    return sock.recv(4096).decode().split("\n")


def wait_notify(sock, line, timeout=15.0):
    """Read datagrams until one carries ``line``; return every datagram read, that one last."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        msg = read_notify(sock, max(0.0, deadline - time.monotonic()))
        if msg is None:
            break
        seen.append(msg)
        if line in msg:
            return seen
    raise AssertionError("no %r datagram within %ss; got %r" % (line, timeout, seen))


# -- --start, --stop --------------------------------------------------------------------------

def test_start_daemonizes_and_a_second_start_says_already_running(daemon):
    d = daemon
    setup_config(d)
    d.set("db1", "master")
    first, pid = cli_start(d)
    assert first.returncode == 0, first.stderr
    assert pid and "started (pid %d)" % pid in first.stdout
    # --start returned only once the daemon answers: no wait needed before asking.
    assert hadaemon.wire.request(str(d.state), {"cmd": "ping"})["pid"] == pid
    assert d.cli("--status").returncode == 0

    ppid, pgrp, sid = proc_stat(pid)
    assert ppid != os.getpid() and ppid != 0            # double-forked: not our child
    assert sid != pid                                   # not a session leader: no controlling tty
    assert sid != os.getsid(0) and pgrp == sid          # a session of its own
    assert not alive(sid)                               # its session leader (the first fork) is gone
    for fd in (0, 1, 2):
        assert os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/dev/null"
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    with open("/proc/%d/status" % pid) as f:
        assert re.search(r"^Umask:\s+0027$", f.read(), re.M)
    assert (d.state / "hadaemon.pid").read_text().strip() == str(pid)
    assert stat.S_IMODE(d.state.stat().st_mode) == 0o700
    assert stat.S_IMODE((d.state / "hadaemon.sock").stat().st_mode) == 0o600
    # Daemonized with no log setting: var/hadaemon.log.
    wait_for(lambda: "started (pid %d)" % pid in (d.state / "hadaemon.log").read_text(),
             what="the start line in hadaemon.log")

    second = d.cli("--start")
    assert second.returncode == 0
    assert "already running (pid %d)" % pid in second.stdout
    assert alive(pid)
    assert d.cli("--stop").returncode == 0


def test_start_leaves_no_inherited_fd_open_in_the_daemon(daemon):
    """A caller's pipe (cron, a CI runner, `$(...)`) must reach EOF once --start returns."""
    d = daemon
    setup_config(d)
    r, w = os.pipe()
    try:
        proc = subprocess.run(d.argv("--start"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, pass_fds=(w,), timeout=60)
        os.close(w)
        w = None
        pid = int(re.search(r"pid (\d+)", proc.stdout).group(1))
        d.started.append(pid)
        assert proc.returncode == 0, proc.stderr
        ready, _, _ = select.select([r], [], [], 10)
        assert ready and os.read(r, 1) == b"", "the daemon kept the caller's pipe open"
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
    assert d.cli("--stop").returncode == 0


def test_start_with_a_bad_config_fails_and_leaves_nothing_running(daemon):
    d = daemon
    setup_config(d)
    d.write("checks.conf", "[daemon]\nbogus = 1\n[local]\nno_such_check\n")
    result = d.cli("--start")
    assert result.returncode == 1
    conf = str(d.dir / "checks.conf")
    assert "%s:2: unknown key 'bogus'" % conf in result.stderr
    assert "%s:4: command not found: no_such_check" % conf in result.stderr
    assert "nothing was started" in result.stderr
    assert hadaemon.base.PidLock.holder(str(d.state)) is None
    assert not (d.state / "hadaemon.sock").exists()
    assert d.cli("--status").returncode == 3


def test_start_reports_a_daemon_that_fails_after_the_fork(daemon):
    """The config is fine but the daemon cannot set up (its socket path is taken): exit 1, the reason."""
    d = daemon
    setup_config(d)
    d.state.mkdir(mode=0o700)
    (d.state / "hadaemon.sock").mkdir()
    result = d.cli("--start")
    assert result.returncode == 1
    assert "did not start" in result.stderr and "hadaemon.sock" in result.stderr
    assert hadaemon.base.PidLock.holder(str(d.state)) is None
    assert "hadaemon failed" in (d.state / "hadaemon.log").read_text()


def test_start_refused_when_the_state_dir_is_open_to_others(daemon):
    d = daemon
    setup_config(d)
    d.state.mkdir(mode=0o755)
    d.state.chmod(0o755)
    result = d.cli("--start")
    assert result.returncode == 1
    assert "mode 0755" in result.stderr and "chmod 700" in result.stderr
    assert hadaemon.base.PidLock.holder(str(d.state)) is None


def test_stop_twice(daemon):
    d = daemon
    setup_config(d)
    d.set("db1", "master")
    result, pid = cli_start(d)
    assert result.returncode == 0, result.stderr
    workers = [w["pid"] for w in d.status()["daemon"]["workers"]]
    assert workers
    first = d.cli("--stop")
    assert first.returncode == 0, first.stderr
    assert "stopped (pid %d)" % pid in first.stdout
    # --stop returns once the daemon is gone, not merely signalled.
    assert not alive(pid)
    assert not any(alive(w) for w in workers)
    assert gone(d)
    second = d.cli("--stop")
    assert second.returncode == 0
    assert "not running" in second.stdout


def test_stop_never_signals_a_pid_it_does_not_know(daemon, monkeypatch, capsys):
    """The lock held but no pid in the file (a --pause on the db, a daemon starting): no kill(-1)."""
    import fcntl
    d = daemon
    d.state.mkdir(mode=0o700)
    fd = os.open(str(d.state / "hadaemon.pid"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    kills = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    try:
        code = hadaemon.cli.main(["--config-dir", str(d.dir), "--state-dir", str(d.state),
                              "--stop", "--timeout", "0.3"])
    finally:
        os.close(fd)
    assert code == 1
    assert kills == []
    assert "no pid" in capsys.readouterr().err


def test_stop_waits_no_longer_than_its_timeout(daemon):
    """--stop --timeout is a bound: a daemon busy finishing an action is reported, not waited for."""
    d = daemon
    d.script("actions/slow", """
        echo started >> "%s/slow.log"
        sleep 3
        echo finished >> "%s/slow.log"
    """ % (d.world, d.world))
    setup_config(d, hosts=("db1",), actions="[any_to_master]\nslow\n")
    d.start()
    d.set("db1", "master")
    wait_for(lambda: (d.world / "slow.log").exists(), timeout=15, what="the slow action to start")
    short = d.cli("--stop", "--timeout", "0.5")
    assert short.returncode == 1
    assert "still running after 500ms" in short.stderr
    full = d.cli("--stop")
    assert full.returncode == 0, full.stderr
    assert d.proc.wait(timeout=20) == 0
    assert (d.world / "slow.log").read_text().split() == ["started", "finished"]


# -- --status -----------------------------------------------------------------------------------

def test_status_while_running_and_after_stop(daemon):
    d = daemon
    setup_config(d)
    d.set("db1", "master")
    d.set("db2", "slave")
    d.start()
    d.wait_state("db1", "master")
    d.wait_state("db2", "slave")
    d.wait_runs(2)
    result = d.cli("--status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "running, pid %d" % d.proc.pid in out
    assert str(d.dir) in out
    for text in ("HOST", "db1", "master", "db2", "slave", "check_role db1", "check_role db2",
                 "[local]", "LAST TRANSITIONS", "unknown -> master", "unknown -> slave",
                 "LAST ACTION RUNS", "[any_to_any]", "ok", "ago", "in "):
        assert text in out, text

    assert d.stop() == 0
    result = d.cli("--status")
    assert result.returncode == 3
    out = result.stdout
    assert "not running" in out
    assert re.search(r"^db1\s+master\s", out, re.M)
    assert re.search(r"^db2\s+slave\s", out, re.M)
    assert "unknown -> master" in out
    doc = json.loads(d.cli("--status", "--json").stdout)
    assert doc["daemon"]["running"] is False and doc["daemon"]["pid"] is None
    assert doc["hosts"]["db1"]["state"] == "master"
    assert d.cli("--status", "--json").returncode == 3


DAEMON_FIELDS = {"running", "pid", "version", "started", "uptime", "config_dir", "state_dir",
                 "paused", "queue", "workers", "action_pid"}
HOST_FIELDS = {"state", "since", "pending", "last_report"}
CHECK_FIELDS = {"key", "name", "scope", "host", "where", "schedule", "next_run", "running",
                "runs", "skipped", "last"}
LAST_FIELDS = {"time", "duration", "exit", "signal", "reports", "message", "attributes", "rejected"}
TRANSITION_FIELDS = {"id", "time", "host", "from", "to", "check", "run"}
RUN_FIELDS = {"id", "transition", "host", "from", "to", "section", "state", "reason", "queued",
              "started", "ended", "commands"}
COMMAND_FIELDS = {"argv", "ignore", "where", "started", "result"}
RESULT_FIELDS = {"exit", "signal", "error", "duration", "output", "truncated"}


def test_status_json_schema(daemon):
    d = daemon
    # db2 is checked once an hour with confirm 2: after its first run it stays pending.
    # (It comes first: the first runs are spread over the interval, the first check at once.)
    setup_config(d, hosts=())
    d.write("checks.conf", "[daemon]\ninterval = 200ms\n[local]\ninterval = 1h\nconfirm = 2\n"
            "check_role db2\n[local]\ncheck_role db1\n")
    d.set("db1", "master")
    d.set("db2", "slave")
    d.start()
    d.wait_runs(1)
    wait_for(lambda: d.status()["hosts"].get("db2", {}).get("pending"), what="db2 pending")
    result = d.cli("--status", "--json")
    assert result.returncode == 0
    doc = json.loads(result.stdout)
    assert set(doc) == {"daemon", "hosts", "checks", "transitions", "runs"}
    daemon_doc = doc["daemon"]
    assert DAEMON_FIELDS <= set(daemon_doc)
    assert daemon_doc["running"] is True and daemon_doc["pid"] == d.proc.pid
    assert daemon_doc["version"] == hadaemon.base.__version__
    assert daemon_doc["config_dir"] == str(d.dir) and daemon_doc["state_dir"] == str(d.state)
    assert daemon_doc["paused"] is False
    assert daemon_doc["uptime"] > 0 and abs(daemon_doc["started"] - time.time()) < 3600
    assert len(daemon_doc["workers"]) == 2 and {"pid", "state"} <= set(daemon_doc["workers"][0])

    assert set(doc["hosts"]) == {"db1", "db2"}
    for host in doc["hosts"].values():
        assert HOST_FIELDS <= set(host)
    db1, db2 = doc["hosts"]["db1"], doc["hosts"]["db2"]
    assert db1["state"] == "master" and db1["pending"] is None and db1["since"] > 0
    assert db1["last_report"]["check"] == "check_role db1"
    assert db1["last_report"]["state"] == "master"
    assert db2["state"] == "unknown" and db2["pending"] == {"state": "slave", "count": 1, "window": 2}

    by_name = {c["name"]: c for c in doc["checks"]}
    assert set(by_name) == {"check_role db1", "check_role db2"}
    c1 = by_name["check_role db1"]
    assert CHECK_FIELDS <= set(c1)
    # The host its last run reported (its default host, the file name, only before a run).
    assert c1["scope"] == "local" and c1["host"] == "db1"
    assert c1["where"] == "%s:8" % (d.dir / "checks.conf")
    assert c1["schedule"] == "every 200ms" and by_name["check_role db2"]["schedule"] == "every 1h"
    assert c1["runs"] >= 1 and c1["next_run"] > time.time() - 5
    assert LAST_FIELDS <= set(c1["last"])
    assert c1["last"]["exit"] == 0 and c1["last"]["reports"] == {"db1": "master"}

    assert len(doc["transitions"]) == 1
    tr = doc["transitions"][0]
    assert TRANSITION_FIELDS <= set(tr)
    assert (tr["host"], tr["from"], tr["to"], tr["check"]) == ("db1", "unknown", "master", "check_role db1")
    run = doc["runs"][0]
    assert RUN_FIELDS <= set(run)
    assert run["id"] == tr["run"] and run["transition"] == tr["id"]
    assert run["section"] == "any_to_any" and run["state"] == "ok"
    cmd = run["commands"][0]
    assert COMMAND_FIELDS <= set(cmd) and RESULT_FIELDS <= set(cmd["result"])
    assert cmd["argv"][1:] == ["db1", "unknown", "master"] and cmd["result"]["exit"] == 0
    assert cmd["result"]["output"] == "recorded db1 unknown master\n"

    # The offline document (from the state db) has the same shape.
    assert d.stop() == 0
    offline = json.loads(d.cli("--status", "--json").stdout)
    assert set(offline) == set(doc)
    assert DAEMON_FIELDS <= set(offline["daemon"])
    assert offline["hosts"]["db2"]["pending"] == {"state": "slave", "count": 1, "window": 2}
    assert {c["name"] for c in offline["checks"]} == set(by_name)
    assert offline["transitions"][0]["id"] == tr["id"]
    assert offline["runs"][0]["state"] == "ok"


LONG_HOST = "a-rather-long-database-host-name-01.site.example.com"


def test_status_fits_in_80_columns(daemon):
    d = daemon
    d.script("actions/failing_action_with_a_long_name", "echo no; exit 3\n")
    d.role_check("check_role_with_a_rather_long_name")
    setup_config(d, daemon="workers = 7\n", hosts=("db1",),
                 groups="[local]\nhost = %s\ncheck_role_with_a_rather_long_name %s --verbose --more\n"
                 % (LONG_HOST, LONG_HOST),
                 actions="[any_to_any]\nfailing_action_with_a_long_name %HOST% %FROM% %TO%\n")
    d.set("db1", "master")
    d.set(LONG_HOST, "the-longest-state-word-anyone-would-use")
    d.start()
    d.wait_runs(2)
    assert d.cli("--pause").returncode == 0

    def lines_of(result):
        return result.stdout.splitlines()
    running = d.cli("--status")
    assert running.returncode == 0
    text = running.stdout
    assert "ACTIONS PAUSED" in text and "failed" in text
    assert re.search(r"\d\d:\d\d:\d\d", text)                 # local clock time
    tr = d.status()["transitions"][-1]
    assert time.strftime("%H:%M:%S", time.localtime(tr["time"])) in text
    assert re.search(r"\(\d+(ms|s) ago\)", text)              # and relative
    too_long = [line for line in lines_of(running) if len(line) > 80]
    assert not too_long, "\n".join(too_long)

    assert d.stop() == 0
    offline = d.cli("--status")
    assert offline.returncode == 3 and "not running" in offline.stdout
    too_long = [line for line in lines_of(offline) if len(line) > 80]
    assert not too_long, "\n".join(too_long)
    history = d.cli("--history")
    assert LONG_HOST in history.stdout


# -- --reload and SIGHUP ---------------------------------------------------------------------

def _write_new_checks(d):
    """db2's check removed; a second check of db1 added (it agrees: no transition)."""
    d.role_check("check_role2")
    d.write("checks.conf", "[daemon]\ninterval = 200ms\n[local]\ncheck_role db1\ncheck_role2 db1\n")


def _check_names(d):
    return {c["name"] for c in d.status()["checks"]}


def _reload_applied(d, before):
    """After a valid reload: the new check runs, the removed one is gone, states and history kept."""
    wait_for(lambda: any(c["name"] == "check_role2 db1" and c["last"] for c in d.status()["checks"]),
             what="the new check to report")
    after = d.status()
    assert {c["name"] for c in after["checks"]} == {"check_role db1", "check_role2 db1"}
    assert after["hosts"]["db1"]["state"] == "master"
    assert after["hosts"]["db1"]["since"] == before["hosts"]["db1"]["since"]
    assert after["hosts"]["db2"]["state"] == "slave"          # the host is kept, its check gone
    assert [t["id"] for t in after["transitions"]] == [t["id"] for t in before["transitions"]]
    assert len(d.actions_log()) == 2


def _steady(d):
    setup_config(d)
    d.set("db1", "master")
    d.set("db2", "slave")
    d.start()
    d.wait_state("db1", "master")
    d.wait_state("db2", "slave")
    d.wait_runs(2)
    return d.status()


BROKEN_CHECKS = "[daemon]\ninterval = 200ms\nflavour = vanilla\n[local]\ncheck_role db1\nmissing_check\n"


def _reload_refused(d, before):
    """The old config still runs: same checks, and they go on running."""
    runs = {c["name"]: c["runs"] for c in d.status()["checks"]}
    assert set(runs) == {"check_role db1", "check_role db2"}
    wait_for(lambda: all(c["runs"] > runs[c["name"]] for c in d.status()["checks"]),
             what="the old checks to keep running")
    assert d.status()["transitions"] == before["transitions"]


def test_reload_valid(daemon):
    d = daemon
    before = _steady(d)
    _write_new_checks(d)
    result = d.cli("--reload")
    assert result.returncode == 0, result.stderr
    assert "reloaded" in result.stdout
    _reload_applied(d, before)
    assert "configuration reloaded: 2 checks" in d.log()


def test_reload_invalid_keeps_the_old_config(daemon):
    d = daemon
    before = _steady(d)
    d.write("checks.conf", BROKEN_CHECKS)
    result = d.cli("--reload")
    assert result.returncode == 1
    conf = str(d.dir / "checks.conf")
    assert "%s:3: unknown key 'flavour'" % conf in result.stderr
    assert "%s:6: command not found: missing_check" % conf in result.stderr
    assert "keeps its old configuration" in result.stderr
    assert "reload refused: %s:3" % conf in d.log()
    _reload_refused(d, before)


def test_sighup_reloads_and_refuses_like_reload(daemon):
    d = daemon
    before = _steady(d)
    d.write("checks.conf", BROKEN_CHECKS)
    d.signal(signal.SIGHUP)
    d.wait_log("reload refused: %s:6: command not found" % (d.dir / "checks.conf"))
    _reload_refused(d, before)
    _write_new_checks(d)
    d.signal(signal.SIGHUP)
    _reload_applied(d, before)


def test_reload_when_not_running(daemon):
    d = daemon
    setup_config(d)
    result = d.cli("--reload")
    assert result.returncode == 3
    assert "not running" in result.stderr


# -- --once: cron mode ------------------------------------------------------------------------

def test_once_twice_with_confirm_2_completes_the_transition(daemon):
    d = daemon
    d.script("actions/fail", "echo cannot; exit 4\n")
    setup_config(d, hosts=("db1",), confirm=2,
                 actions="[any_to_master]\nrecord %HOST% %FROM% %TO%\n[any_to_slave]\nfail %HOST%\n")
    d.set("db1", "master")
    first = d.cli("--once")
    assert first.returncode == 0, first.stderr
    doc = d.status()
    assert doc["daemon"]["running"] is False
    assert doc["hosts"]["db1"]["state"] == "unknown"
    assert doc["hosts"]["db1"]["pending"] == {"state": "master", "count": 1, "window": 2}
    assert doc["transitions"] == [] and d.actions_log() == []
    assert gone(d)

    second = d.cli("--once")
    assert second.returncode == 0, second.stderr
    doc = d.status()
    assert doc["hosts"]["db1"]["state"] == "master" and doc["hosts"]["db1"]["pending"] is None
    assert [(t["from"], t["to"]) for t in doc["transitions"]] == [("unknown", "master")]
    assert doc["runs"][0]["state"] == "ok"
    assert len(d.actions_log()) == 1 and d.actions_log()[0].startswith("db1 unknown master |")
    assert gone(d)

    # A failed action makes the pass exit non-zero.
    d.set("db1", "slave")
    assert d.cli("--once").returncode == 0
    failed = d.cli("--once")
    assert failed.returncode == 1
    assert "failed" in failed.stderr and "exit 4" in failed.stderr
    assert d.status()["runs"][0]["state"] == "failed"


def test_once_refused_while_a_daemon_runs(daemon):
    d = daemon
    setup_config(d)
    d.start()
    result = d.cli("--once")
    assert result.returncode == 1
    assert "refusing --once" in result.stderr and "pid %d" % d.proc.pid in result.stderr
    assert d.running()


# -- --pause, --resume --------------------------------------------------------------------------

def test_pause_skips_sequences_survives_a_restart_and_resume_runs_them(daemon):
    d = daemon
    setup_config(d, hosts=("db1",))
    d.set("db1", "master")
    d.start()
    d.wait_runs(1)
    result = d.cli("--pause")
    assert result.returncode == 0 and "paused" in result.stdout
    d.set("db1", "slave")
    d.wait_state("db1", "slave")
    run = d.wait_runs(2)[-1]
    assert (run["from"], run["to"], run["state"], run["reason"]) == ("master", "slave", "skipped", "paused")
    assert run["started"] is None and all(c["result"] is None for c in run["commands"])
    assert len(d.actions_log()) == 1                              # the first run only

    assert d.stop() == 0
    d.proc = None
    d.start()
    assert d.status()["daemon"]["paused"] is True
    assert "ACTIONS PAUSED" in d.cli("--status").stdout
    d.wait_log("actions are paused")
    result = d.cli("--resume")
    assert result.returncode == 0 and "resumed" in result.stdout
    assert d.status()["daemon"]["paused"] is False
    d.set("db1", "master")
    run = d.wait_runs(3)[-1]
    assert (run["from"], run["to"], run["state"]) == ("slave", "master", "ok")
    assert d.actions_log()[-1].startswith("db1 slave master |")


def test_pause_and_resume_while_not_running_work_on_the_db(daemon):
    d = daemon
    setup_config(d, hosts=("db1",))
    result = d.cli("--pause")
    assert result.returncode == 0, result.stderr
    assert d.status()["daemon"]["paused"] is True
    d.set("db1", "master")
    d.start()
    assert d.status()["daemon"]["paused"] is True
    run = d.wait_runs(1)[0]
    assert run["state"] == "skipped" and run["reason"] == "paused"
    assert d.actions_log() == []
    assert d.stop() == 0
    assert d.cli("--resume").returncode == 0
    assert d.status()["daemon"]["paused"] is False
    assert not (d.state / "hadaemon.pid").exists()


# -- one daemon per state dir, signals, graceful stop ----------------------------------------

def test_a_second_foreground_daemon_on_the_same_state_dir_is_refused(daemon):
    d = daemon
    setup_config(d)
    d.start()
    second = subprocess.run(d.argv("--foreground"), stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=60)
    assert second.returncode == 1
    assert "already runs" in second.stderr and "pid %d" % d.proc.pid in second.stderr
    # The refused one touched nothing of the first: socket and pid file still there and answering.
    assert d.running()
    assert (d.state / "hadaemon.pid").read_text().strip() == str(d.proc.pid)
    started = d.cli("--start")
    assert started.returncode == 0 and "already running (pid %d)" % d.proc.pid in started.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_leaves_no_process_pid_file_or_socket(daemon, sig):
    d = daemon
    # A check that hangs with a child of its own, and an action that is done quickly.
    d.script("checks/check_hang", """
        sleep 60 &
        echo started >> "%s/hang.log"
        sleep 60
    """ % d.world)
    setup_config(d, hosts=("db1",), daemon="workers = 3\n",
                 groups="[local]\ntimeout = 60s\ncheck_hang\n")
    d.set("db1", "master")
    d.start()
    d.wait_runs(1)
    wait_for(lambda: (d.world / "hang.log").exists(), what="the hanging check to start")
    workers = [w["pid"] for w in d.status()["daemon"]["workers"]]
    assert len(workers) == 3 and len(d.descendants()) >= 2      # the check and its sleep
    d.signal(sig)
    assert d.proc.wait(timeout=30) == 0
    assert not any(alive(w) for w in workers)
    wait_for(lambda: gone(d), what="no process, pid file or socket left")
    assert "stopping: %s received" % signal.Signals(sig).name in d.log()


def slow_action(d, seconds):
    """actions/slow NAME: logs its start and end in world/slow.log, ``seconds`` apart."""
    d.script("actions/slow", """
        echo "start $1" >> "%s/slow.log"
        sleep %d
        echo "end $1" >> "%s/slow.log"
    """ % (d.world, seconds, d.world))


def test_graceful_stop_lets_the_running_sequence_finish(daemon, tmp_path):
    d = daemon
    slow_action(d, 2)
    setup_config(d, hosts=("db1",), actions="[any_to_master]\nslow one\nrecord %HOST% %TO%\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    d.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"})
    d.set("db1", "master")
    wait_for(lambda: (d.world / "slow.log").exists(), timeout=15, what="the slow action to start")
    d.signal(signal.SIGTERM)
    with notify:
        wait_notify(notify, "STOPPING=1")
        # systemd is told to wait for what the sequence may still take (its two
        # commands' timeouts, 60 s each, and the kills), not TimeoutStopSec's 90 s.
        extend = read_notify(notify, 5)
        assert extend and extend[0].startswith("EXTEND_TIMEOUT_USEC="), extend
        assert int(extend[0].split("=")[1]) / 1e6 >= 2 * (60 + 5), extend
        # The loop stays healthy while the sequence finishes: the watchdog goes on.
        assert read_notify(notify, 5) == ["WATCHDOG=1"]
        assert read_notify(notify, 5) == ["WATCHDOG=1"]
    assert "end one" not in (d.world / "slow.log").read_text()
    assert d.proc.wait(timeout=30) == 0
    assert (d.world / "slow.log").read_text().splitlines() == ["start one", "end one"]
    assert len(d.actions_log()) == 1
    run = d.status()["runs"][0]
    assert run["state"] == "ok", run
    assert [c["result"]["exit"] for c in run["commands"]] == [0, 0]
    assert "waiting up to" in d.log()
    assert gone(d)


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_sighup_while_stopping_is_not_read_and_the_loop_idles(daemon):
    """A reload asked for once the stop began is dropped: the loop must not spin on it
    (nor on anything else) while the running sequence finishes."""
    d = daemon
    slow_action(d, 3)
    setup_config(d, hosts=("db1",), actions="[any_to_master]\nslow one\n")
    d.start()
    d.set("db1", "master")
    wait_for(lambda: (d.world / "slow.log").exists(), timeout=15, what="the slow action to start")
    d.signal(signal.SIGTERM)
    d.wait_log("stopping: SIGTERM received")
    d.signal(signal.SIGHUP)
    cpu, wall = _cpu_seconds(d.proc.pid), time.monotonic()
    time.sleep(1.0)
    used = _cpu_seconds(d.proc.pid) - cpu
    assert "end one" not in (d.world / "slow.log").read_text()     # still stopping, measured then
    assert used < 0.5 * (time.monotonic() - wall), "the stopping master spun: %.2fs of CPU" % used
    assert d.proc.wait(timeout=30) == 0
    assert (d.world / "slow.log").read_text().splitlines() == ["start one", "end one"]
    assert "reloading the configuration" not in d.log()


# -- --history, --version, --help, --check-config ------------------------------------------

def test_history_running_and_not_running(daemon):
    d = daemon
    setup_config(d, hosts=("db1",))
    d.set("db1", "master")
    d.start()
    d.wait_runs(1)
    d.set("db1", "slave")
    d.wait_runs(2)

    def check(result, n):
        assert result.returncode == 0, result.stderr
        entries = re.findall(r"^#(\d+)\s.*db1: (\w+) -> (\w+)", result.stdout, re.M)
        assert entries == [("2", "master", "slave"), ("1", "unknown", "master")][:n]
        assert "run #2 [any_to_any]: ok" in result.stdout or n < 1
        assert "record db1 master slave  -> ok" in result.stdout

    check(d.cli("--history"), 2)
    check(d.cli("--history", "1"), 1)
    entries = json.loads(d.cli("--history", "5", "--json").stdout)
    assert [e["id"] for e in entries] == [2, 1]
    assert entries[0]["run"]["state"] == "ok" and entries[0]["run"]["commands"][0]["result"]["exit"] == 0
    assert d.stop() == 0
    check(d.cli("--history"), 2)
    check(d.cli("--history", "1"), 1)
    assert [e["id"] for e in json.loads(d.cli("--history", "--json").stdout)] == [2, 1]


def test_history_on_a_fresh_state_dir(daemon):
    setup_config(daemon)
    result = daemon.cli("--history")
    assert result.returncode == 0 and "no transitions" in result.stdout


def test_version_and_help(daemon):
    version = daemon.cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == "hadaemon " + hadaemon.base.__version__
    helptext = daemon.cli("--help")
    assert helptext.returncode == 0
    for flag in ("--start", "--foreground", "-f", "--stop", "--status", "--json", "--reload",
                 "--check-config", "-t", "--once", "--history", "--pause", "--resume", "--version",
                 "--help", "--config-dir", "--state-dir", "--timeout"):
        assert re.search(r"(^|[\s,\[])%s\b" % re.escape(flag), helptext.stdout), flag
    assert "3 not running" in helptext.stdout
    bad = daemon.cli("--stop", "--reload")
    assert bad.returncode == 2 and "not allowed with" in bad.stderr


@pytest.mark.parametrize("flag", ["--check-config", "-t"])
def test_check_config(daemon, flag):
    d = daemon
    setup_config(d)
    ok = d.cli(flag)
    assert ok.returncode == 0, ok.stderr
    assert "configuration OK: 2 checks" in ok.stdout
    d.write("actions.conf", "[any_to_master]\ntimeout = soon\nrecord\n[sideways]\nrecord\n")
    bad = d.cli(flag)
    assert bad.returncode == 1
    conf = str(d.dir / "actions.conf")
    assert "%s:2: not a duration" % conf in bad.stderr
    assert "%s:4: [sideways]" % conf in bad.stderr
    assert not d.state.exists()                   # checking starts nothing, creates nothing


# -- systemd ------------------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_notify_protocol(daemon, tmp_path, abstract):
    d = daemon
    setup_config(d)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = "hadaemon-test-%d-%d" % (os.getpid(), time.monotonic_ns())
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify")
        sock.bind(address)
    with sock:
        d.start(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}, wait=False)
        seen = wait_notify(sock, "READY=1")
        assert seen[-1] == ["READY=1", "MAINPID=%d" % d.proc.pid]
        wait_for(d.running, what="--status to answer")
        dogs = 0
        while dogs < 4:
            msg = read_notify(sock, 10)
            assert msg == ["WATCHDOG=1"], msg
            dogs += 1

        assert d.cli("--reload").returncode == 0
        seen = [m for m in wait_notify(sock, "READY=1") if m != ["WATCHDOG=1"]]
        assert seen == [["RELOADING=1"], ["READY=1"]]

        d.write("checks.conf", BROKEN_CHECKS)              # a refused reload says nothing
        assert d.cli("--reload").returncode == 1
        d.signal(signal.SIGTERM)
        seen = [m for m in wait_notify(sock, "STOPPING=1") if m != ["WATCHDOG=1"]]
        assert seen == [["STOPPING=1"]]
        assert d.proc.wait(timeout=30) == 0


# -- logging --------------------------------------------------------------------------------

def test_log_file_and_sigusr1_reopens_it(daemon, tmp_path):
    d = daemon
    logfile = tmp_path / "logs" / "ha.log"
    logfile.parent.mkdir()
    setup_config(d, hosts=("db1",), daemon="log = %s\n" % logfile)
    d.set("db1", "master")
    d.start()
    d.wait_runs(1)
    wait_for(lambda: "run 1 [any_to_any] for db1 unknown_to_master: ok" in logfile.read_text(),
             what="the run in the log file")
    text = logfile.read_text()
    # Every line: local time, level, what happened.
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO hadaemon \S+ started", text)
    assert "transition db1: unknown -> master (by check_role db1)" in text
    assert re.search(r"run 1: command 1/1 record db1 unknown master: exit 0 in \d+\.\d{3}s", text)
    assert "started" not in d.log()                      # nothing went to stderr

    rotated = tmp_path / "logs" / "ha.log.1"
    os.rename(logfile, rotated)
    d.signal(signal.SIGUSR1)
    wait_for(lambda: logfile.exists() and "log reopened" in logfile.read_text(),
             what="a new log file at the path")
    d.set("db1", "slave")
    d.wait_runs(2)
    wait_for(lambda: "unknown_to_master" not in logfile.read_text() and
             "master_to_slave: ok" in logfile.read_text(), what="the new run in the new file")
    assert "master_to_slave" not in rotated.read_text()
    # --reload reopens it too (logrotate's postrotate may use either).
    os.rename(logfile, tmp_path / "logs" / "ha.log.2")
    assert d.cli("--reload").returncode == 0
    wait_for(lambda: logfile.exists() and "configuration reloaded" in logfile.read_text(),
             what="a new log file after --reload")
    assert d.stop() == 0
    assert logfile.read_text().rstrip().endswith("INFO stopped")


def test_syslog_lines_carry_ident_facility_and_level(tmp_path, monkeypatch):
    """``log = syslog`` goes through the standard library's SysLogHandler to /dev/log.

    A test cannot bind /dev/log (nor should it), so the address is the module constant
    SYSLOG_SOCKET, pointed here at a datagram socket the test binds.
    """
    path = str(tmp_path / "devlog")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setattr(hadaemon.base, "SYSLOG_SOCKET", path)
    logger = hadaemon.base.log
    saved = list(logger.handlers), logger.level, logger.propagate
    try:
        hadaemon.base.setup_logging("syslog", str(tmp_path))
        logger.info("transition %s: %s -> %s", "db1", "slave", "master")
        logger.error("run %d failed", 3)
        first = read_notify(sock, 5)
        second = read_notify(sock, 5)
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        for handler in saved[0]:                # as it was: other tests may use caplog
            logger.addHandler(handler)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
        sock.close()
    # <facility daemon (3) * 8 + severity>: info 6 -> 30, err 3 -> 27.
    ident = "hadaemon[%d]: " % os.getpid()
    assert first == ["<30>%sINFO transition db1: slave -> master\x00" % ident]
    assert second == ["<27>%sERROR run 3 failed\x00" % ident]


def test_stop_while_checks_run_fires_no_transition(daemon):
    """A check cut short by the stop has no result: its host must not go to unknown."""
    d = daemon
    d.script("checks/check_slow", """
        sleep 0.4
        echo "state=$(cat "%s/db1")"
    """ % d.world)
    d.write("checks.conf", "[daemon]\ninterval = 100ms\n[local]\nhost = db1\ncheck_slow\n")
    d.recorder()
    d.write("actions.conf", "[any_to_any]\nrecord %HOST% %FROM% %TO%\n")
    d.set("db1", "master")
    d.start()
    d.wait_runs(1)
    wait_for(lambda: d.status()["checks"][0]["running"], what="the check to be running")
    assert d.stop() == 0
    doc = d.status()
    assert doc["hosts"]["db1"]["state"] == "master"
    assert [(t["from"], t["to"]) for t in doc["transitions"]] == [("unknown", "master")]
    assert doc["daemon"]["queue"] == []


# -- contrib: the systemd unit and the LSB init script ---------------------------------------

CONTRIB = HADAEMON.parent / "contrib"


def test_systemd_unit_runs_the_right_command():
    unit = (CONTRIB / "hadaemon.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ExecStart"].split()[-2:] == ["/opt/hadaemon/hadaemon.py", "--foreground"]
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["WatchdogSec"] == "30s"
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze")
    result = subprocess.run(["systemd-analyze", "verify", str(CONTRIB / "hadaemon.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_init_script_maps_the_lsb_verbs(daemon):
    d = daemon
    setup_config(d)
    env = dict(os.environ, HADAEMON=str(HADAEMON), PYTHON=sys.executable,
               HADAEMON_OPTS="--config-dir %s --state-dir %s" % (d.dir, d.state))

    def init(verb):
        result = subprocess.run(["sh", str(CONTRIB / "hadaemon.init"), verb], env=env,
                                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        pid = hadaemon.base.PidLock.holder(str(d.state))
        if pid and pid > 0 and pid not in d.started:
            d.started.append(pid)
        return result.returncode, result.stdout + result.stderr

    assert init("start")[0] == 0
    assert init("start") == (0, "hadaemon already running (pid %d)\n" % d.started[-1])
    assert init("status")[0] == 0
    assert init("reload") == (0, "configuration reloaded\n")
    first = d.started[-1]
    code, out = init("restart")
    assert code == 0 and "stopped (pid %d)" % first in out and d.started[-1] != first
    assert init("stop")[0] == 0 and not alive(d.started[-1])
    assert init("stop")[0] == 0                  # LSB: stopping a stopped service succeeds
    assert init("status")[0] == 3                # LSB: not running
    assert init("reload")[0] == 7                # LSB: not running, for the other verbs
    assert init("frobnicate")[0] == 2

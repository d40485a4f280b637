"""Issue 23: what a newcomer meets between the README and a first install, each driven
as a user would meet it (the command line's output, a closed pipe, -t, the README's own
commands).  The real HAProxy, promtool and Chromium ones are in test_http_daemon.py.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, figure, wait_for
from test_http import get
from test_http_daemon import free_port
from test_cluster import etcd, ha  # noqa: F401 - fixtures

README = (ROOT / "README.md").read_text()


def readme_block(after):
    """The first fenced block of README.md after the line holding ``after``."""
    rest = README[README.index(after):]
    m = re.search(r"```[a-z]*\n(.*?)```", rest, re.S)
    return m.group(1)


def two_hosts(d, actions="[any_to_master]\nrecord %HOST%\n"):
    d.role_check()
    d.recorder()
    d.write("checks.conf", "[daemon]\ninterval = 200ms\n[local]\ncheck_role db1\ncheck_role db2\n")
    d.write("actions.conf", actions)
    d.set("db1", "master")
    d.set("db2", "slave")


# -- 5: --init DIR, from the one file a wheel installs --------------------------------------

def test_init_writes_a_starter_config_that_passes_check_config_as_the_readme_shows(daemon, tmp_path):
    alone = tmp_path / "site-packages"          # what a pip install has: hadaemon.py and no config
    alone.mkdir()
    shutil.copy(ROOT / "hadaemon.py", alone / "hadaemon.py")
    block = readme_block("hadaemon --init")
    lines = [line for line in block.splitlines() if line.strip()]
    lines = lines[lines.index("$ hadaemon --init /tmp/ha"):]          # what a user types from there
    target = str(tmp_path / "ha")
    ran = 0
    for i, line in enumerate(lines):
        if not line.startswith("$ hadaemon "):
            continue
        words = line[2:].replace("/tmp/ha", target).split()
        expected = []
        for out in lines[i + 1:]:
            if out.startswith("$ "):
                break
            expected.append(out.replace("/tmp/ha", target))
        result = subprocess.run([sys.executable, str(alone / "hadaemon.py")] + words[1:], capture_output=True,
                                text=True, timeout=60, env=dict(os.environ, HADAEMON_CONFIG_DIR=""))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines() == expected, (line, result.stdout, expected)
        ran += 1
    assert ran == 2, block
    assert (tmp_path / "ha" / "checks.conf").read_text().startswith("# hadaemon starter config")
    again = subprocess.run([sys.executable, str(alone / "hadaemon.py"), "--init", target], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 1 and "refusing" in again.stderr and "nothing was written" in again.stderr
    # And it runs: the starter's check reports db1 master, db2 slave.
    d = daemon
    d.dir, d.state = tmp_path / "ha", tmp_path / "ha-state"
    d.start()
    d.wait_state("db1", "master")
    d.wait_state("db2", "slave")


# -- 6: a closed pipe ----------------------------------------------------------------------

def test_status_and_history_into_a_closed_pipe_end_quietly(daemon):
    d = daemon
    two_hosts(d)
    d.start()
    d.wait_state("db1", "master")
    for args in (["--status"], ["--history", "50"], ["--status", "--json"]):
        read, write = os.pipe()
        os.close(read)                          # `| head -1` that has read its line and gone
        try:
            result = subprocess.run(d.argv(*args), stdout=write, stderr=subprocess.PIPE, text=True,
                                    timeout=60, stdin=subprocess.DEVNULL)
        finally:
            os.close(write)
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
        assert result.stderr == "" and result.returncode == 1, (args, result)
    shell = subprocess.run("%s | head -1" % " ".join(d.argv("--history", "50")), shell=True,
                           capture_output=True, text=True, timeout=60)
    assert shell.stderr == "" and shell.stdout.count("\n") == 1, shell


# -- 7, 8: -t ----------------------------------------------------------------------------------

def test_check_config_warns_of_a_variable_naming_no_state(daemon):
    d = daemon
    two_hosts(d, actions="[slave_to_master]\nrecord start %MASTR% %MASTER% %HOST%\n"
                         "[any_to_down]\nrecord %SLAVE% %DOWN% %%literal%%\n")
    result = d.cli("-t")
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stdout
    assert warnings[0].startswith("warning: %s:2: %%MASTR%% names no state hadaemon knows of"
                                  % (d.dir / "actions.conf")), warnings
    # A state the state db holds counts, as --simulate would find it there: db3 was "standby".
    d.write("actions.conf", "[any_to_master]\nrecord %STANDBY%\n")
    assert "%STANDBY% names no state" in d.cli("-t").stdout
    d.write("checks.conf", "[daemon]\ninterval = 200ms\n[local]\ncheck_role db1\ncheck_role db3\n")
    d.set("db3", "standby")
    d.start()
    d.wait_state("db3", "standby")
    d.stop()
    assert "warning" not in d.cli("-t").stdout


def test_a_section_header_without_its_closing_bracket_is_named(daemon):
    d = daemon
    two_hosts(d, actions="[any_to_master]\nrecord %HOST%\n\n[master_to_slav\nrecord %HOST%\n")
    result = d.cli("-t")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "%s:4: a section header needs a closing ]: [master_to_slav" % (
        d.dir / "actions.conf"), result.stderr
    assert "command not found" not in result.stderr


# -- 4: the stop budget ------------------------------------------------------------------------

def test_check_config_warns_when_a_section_outlasts_stop_timeout(daemon):
    d = daemon
    two_hosts(d, actions="[any_to_master]\ntimeout = 30s\nrecord one\nrecord two\nrecord three\n"
                         "[any_to_down]\ntimeout = 10s\nrecord %HOST%\n")
    d.write("checks.conf", "[daemon]\nstop_timeout = 90s\n[local]\ncheck_role db1\n")
    result = d.cli("-t")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: %s:1: [any_to_master] may take 105s at worst (3 commands, each up to "
                        "its timeout 30s and 5s to kill it), more than stop_timeout = 90s: a stop while "
                        "it runs would be killed half-way" % (d.dir / "actions.conf")], result.stdout


# -- 12: --help says what the code does --------------------------------------------------------

def test_help_matches_the_code(daemon):
    d = daemon
    text = " ".join(d.cli("--help").stdout.split())
    assert "log every scheduling decision" not in text
    assert "each check's result" in text
    assert "3 not running (--status, --reload, --rerun)" in text
    assert "each ssh target and each etcd endpoint" in text
    assert "--init DIR" in text
    # The exit codes it names are the ones the commands give.
    assert d.cli("--reload").returncode == 3
    assert d.cli("--rerun", "1").returncode == 3
    assert d.cli("--status").returncode == 3


# -- 10, 13: what --status --json and the HTTP answers say -------------------------------------

def test_labels_a_user_can_read(daemon):
    d = daemon
    port = free_port()
    two_hosts(d)
    d.write("checks.conf", "[daemon]\nhttp = 127.0.0.1:%d\n[local]\ninterval = 100ms\n"
                           "check_role db1\ncheck_role db2\n" % port)
    d.start()
    d.wait_state("db2", "slave")
    wait_for(lambda: all(c["last"] for c in d.status()["checks"]), what="both checks to run")
    checks = d.status()["checks"]
    assert [c["host"] for c in checks] == ["db1", "db2"], checks          # not "check_role"
    status_text = d.cli("--status").stdout
    assert re.search(r"^check_role db1 +db1 +master", status_text, re.M), status_text
    metrics = get(port, "/metrics")[2].decode()
    assert 'hadaemon_check_runs_total{check="check_role db1",scope="local"}' in metrics, metrics
    assert "local|" not in metrics
    values = [line.rsplit(" ", 1)[1] for line in metrics.splitlines() if line and not line.startswith("#")]
    noisy = [v for v in values if re.search(r"\.\d{7,}", v)]
    assert not noisy, noisy                                     # 0.001114, not 0.0011140000000000002
    status, _, body = get(port, "/history?n=x")
    assert status == 400 and json.loads(body) == {"error": "n must be a whole number of transitions, got n=x"}


# -- 11: the log's order while paused ----------------------------------------------------------

def test_while_paused_the_transition_is_logged_before_its_skipped_run(daemon):
    d = daemon
    two_hosts(d, actions="[any_to_master]\nrecord %HOST%\n[any_to_down]\nrecord %NOBODY%\n")
    d.start()
    d.wait_state("db2", "slave")
    d.cli("--pause", check=True)
    d.set("db1", "slave")
    d.set("db2", "master")
    d.wait_state("db2", "master")
    wait_for(lambda: "skipped (paused)" in d.log(), what="the skipped run in the log")
    d.cli("--resume", check=True)
    d.set("db2", "down")                # a run that fails at once (an empty %NOBODY%) logs after it too
    wait_for(lambda: "is empty" in d.log(), what="the failed run in the log")
    lines = d.log().splitlines()
    for n, line in enumerate(lines):
        m = re.search(r"run (\d+) \[\w+\] for db2 \w+: (skipped|failed)", line)
        if m:
            before = [i for i, l in enumerate(lines) if "runs [" in l and "as run %s" % m.group(1) in l]
            assert before and before[0] < n, "\n".join(lines)
    assert sum(1 for line in lines if re.search(r"run \d+ \[\w+\] for db2 \w+: (skipped|failed)", line)) == 2


# -- 3: an example action fails when its effect did not happen ---------------------------------

def test_repoint_pgbouncer_fails_the_run_when_pgbouncer_was_not_reloaded(daemon, tmp_path):
    d = daemon
    shutil.copy(ROOT / "examples" / "postgresql" / "actions" / "repoint_pgbouncer", d.dir / "actions")
    databases = tmp_path / "databases.ini"
    databases.write_text("[databases]\nappdb = host=db1 port=5432 dbname=appdb\n")
    pidfile = tmp_path / "pgbouncer.pid"
    two_hosts(d, actions="[slave_to_master]\nrepoint_pgbouncer %%MASTER%% %s %s\n" % (databases, pidfile))
    d.start()
    d.wait_state("db2", "slave")
    d.set("db1", "slave")
    d.wait_state("db1", "slave")
    d.set("db2", "master")
    run = d.wait_runs(1)[-1]
    assert run["section"] == "slave_to_master" and run["state"] == "failed", run
    assert "pgbouncer not reloaded" in run["commands"][0]["result"]["output"], run
    assert "host=db2" in databases.read_text()
    # A pid file naming no process: failed too.  A live pgbouncer (here a shell that
    # notes its SIGHUP): ok, and it got the signal.
    pidfile.write_text("999999999\n")
    assert d.cli("--rerun", str(run["id"]), "--wait").returncode == 1
    hup = tmp_path / "hup"
    sleeper = subprocess.Popen(["sh", "-c", "trap 'echo hup > %s' HUP; while :; do sleep 0.05; done" % hup],
                               start_new_session=True)
    try:
        pidfile.write_text("%d\n" % sleeper.pid)
        result = d.cli("--rerun", str(run["id"]), "--wait")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(hup.exists, what="pgbouncer (the stand-in) to get its SIGHUP")
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()


# -- 13: pytest run directly -------------------------------------------------------------------

def test_pytest_without_pytest_timeout_does_not_warn_of_its_option(tmp_path):
    """``pytest`` run directly where pytest-timeout is missing (here: disabled) says what to
    install, and no ``Unknown config option: timeout``."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:timeout", "-p", "no:cacheprovider",
                             "tests/test_cron.py", "-k", "duration"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Unknown config option" not in out, out
    assert "pytest-timeout is not installed" in out and "tests/run" in out, out


# -- 13: the etcd client's name lookups are bounded by its timeout -----------------------------

def test_an_etcd_name_lookup_is_bounded_by_the_timeout(daemon, tmp_path):
    """-t --connect (2 s per endpoint) against an endpoint whose name the DNS server never
    answers: a nameserver that drops every query, in /etc/resolv.conf of a mount namespace."""
    if os.getuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private /etc/resolv.conf")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.77\noptions timeout:8 attempts:1\n")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)      # reads nothing, answers nothing
    silent.bind(("127.0.0.77", 53))
    d = daemon
    d.role_check()
    d.write("checks.conf", "[daemon]\n[cluster]\netcd = http://etcd-nowhere.example:2379\nname = c\nnode = a\n"
                           "[local]\ncheck_role db1\n")
    d.write("actions.conf", "")
    argv = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
            str(resolv)] + d.argv("-t", "--connect")
    started = time.monotonic()
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        silent.close()
    took = time.monotonic() - started
    figure("-t --connect, an etcd name the DNS server never answers: %.1fs (timeout 2s, resolver 8s)" % took)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("etcd http://etcd-nowhere.example:2379: FAILED: the name lookup of etcd-nowhere.example took "
            "longer than 2s") in result.stdout, result.stdout + result.stderr


# -- 13: two cluster members with one node name ------------------------------------------------

def test_two_members_with_one_node_name_both_refuse_naming_the_other(ha):
    cl = ha(nodes=("a", "b"))
    first, second = cl.daemons["a"], cl.daemons["b"]
    second.write("checks.conf", (second.dir / "checks.conf").read_text().replace("node = b", "node = a"))
    cl.set("db1", "master")
    cl.set("db2", "slave")
    cl.start("a")
    wait_for(lambda: (cl.status("a") or {}).get("daemon", {}).get("cluster", {}).get("role") == "leader",
             timeout=20, what="a to lead (%s)" % cl.tails())
    cl.start("b")
    for me, other in ((first, second), (second, first)):
        me.wait_log("another member uses node = a: pid %d on host %s; both refuse"
                    % (other.proc.pid, socket.gethostname()), timeout=20)
    for node in ("a", "b"):
        status = cl.status(node)
        assert status is not None, "%s does not answer: %s" % (node, cl.daemons[node].tail(80))
        cluster = status["daemon"]["cluster"]
        assert cluster["role"] == "none" and not cluster["acting"], cluster


def test_an_earlier_life_of_the_same_member_is_no_conflict():
    """A member restarted after a crash sees its old key (its old lease not yet expired):
    not another member; a live other one writing over ours is."""
    from test_cluster import Member
    t = Member()
    t.m.on_message({"t": "snapshot", "revision": t.revision, "last": True, "kvs": [
        {"key": "members/a", "value": {"hosts": {}, "pid": 999999999, "host": "elsewhere"}, "lease": 5}]},
        t.now)
    t.join()
    t.m.set_view({"db1": "master"})
    put = next(r for r in t.tick() if r["t"] == "put")
    t.reply(put)
    t.event("members/a", {"hosts": {"db1": "master"}, "pid": os.getpid(), "host": socket.gethostname()},
            lease=7)
    assert t.m.conflict is None and t.m.role == "follower"
    t.event("members/a", {"hosts": {}, "pid": 4242, "host": "db-watch2"}, lease=9)
    assert t.m.conflict.startswith("another member uses node = a: pid 4242 on host db-watch2")
    assert t.m.role == "none"
    sent = t.m.take_requests()
    assert [r["t"] for r in sent] == ["put", "revoke"] and sent[0]["lease"] == 7     # ours again, then out
    assert [r["t"] for r in t.tick(5.0)] == []                                       # and it stays out

"""Remote checks over OpenSSH, against a real sshd each test starts on a loopback port.

The sshd runs with a host key and a user key generated in a temp dir, listens on
127.0.0.1 only, logs to a file (its "Accepted publickey" lines count connections),
and is killed by pid at teardown with every session it forked.  As root it lets
root in by key only; as another user it lets that user in.  The "remote" host is
this machine, so the remote side of a check is visible in /proc (its HA_*
environment names the test's config dir, which the daemon fixture's cleanup uses).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, alive, keygen, pids_with_env, wait_for, with_private_run

sys.path.insert(0, str(ROOT))
import hadaemon.config  # noqa: E402
import hadaemon.configfiles
import hadaemon.ssh

SSHD = "/usr/sbin/sshd"
if not (os.access(SSHD, os.X_OK) and shutil.which("ssh") and shutil.which("ssh-keygen")):
    pytest.skip("OpenSSH (%s, ssh, ssh-keygen) is not installed" % SSHD, allow_module_level=True)

USER = "root" if os.getuid() == 0 else os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """host: the sshd's host key; other_host: a key that is not it; user / wrong: client keys."""
    d = tmp_path_factory.mktemp("keys")
    return {name: keygen(d / name) for name in ("host", "other_host", "user", "wrong")}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pids):
    """Every live descendant of ``pids`` (from /proc, so a tree can be killed by pid)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parents.items() if pp == pid]
        found += kids
        todo += kids
    return found


class Sshd:
    """One sshd of the test's own: start(), stop() (sessions included), accepted()."""

    def __init__(self, tmp, keys):
        self.dir = tmp / "sshd"
        self.dir.mkdir()
        self.keys = keys
        self.port = free_port()
        self.log_path = self.dir / "sshd.log"
        self.proc = None
        self.pids = []
        (self.dir / "authorized_keys").write_text(keys["user"].with_suffix(".pub").read_text())
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text("[127.0.0.1]:%d %s" % (self.port, keys["host"].with_suffix(".pub").read_text()))
        self.wrong_known_hosts = self.dir / "wrong_known_hosts"
        self.wrong_known_hosts.write_text("[127.0.0.1]:%d %s" % (
            self.port, keys["other_host"].with_suffix(".pub").read_text()))
        self.config = self.dir / "sshd_config"
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            "HostKey %s" % keys["host"],
            "AuthorizedKeysFile %s" % (self.dir / "authorized_keys"),
            "PidFile %s" % (self.dir / "sshd.pid"),
            "StrictModes no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PrintMotd no",
            "LogLevel INFO",
            # bash sources ~/.bashrc when sshd starts it, unless it is a nested shell: the
            # test's "remote host" must not run this machine's rc files (a slow pyenv init,
            # whose lock a session killed at teardown would leave behind).
            "SetEnv SHLVL=1",
            ""]))

    def argv(self):
        sshd = [SSHD, "-D", "-e", "-f", str(self.config), "-p", str(self.port), "-E", str(self.log_path)]
        wrapped = with_private_run(sshd)
        if wrapped[0] == "unshare" and not shutil.which("unshare"):
            pytest.skip("sshd needs /run/sshd and unshare(1) is missing")
        return wrapped

    def start(self):
        mark = self.log_text().count("Server listening on")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.pids.append(self.proc.pid)

        def listening():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                if "unshare" in err or "mount" in err:
                    pytest.skip("cannot give sshd a private /run: %s" % err.strip())
                raise AssertionError("sshd exited %s: %s\n%s" % (self.proc.returncode, err, self.log_text()))
            return self.log_text().count("Server listening on") > mark
        wait_for(listening, timeout=15, what="sshd to listen on port %d" % self.port)
        return self

    def stop(self):
        """Kill sshd and every session it forked (they outlive the listener otherwise)."""
        if self.proc is None:
            return
        for pid in [self.proc.pid] + children_of([self.proc.pid]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.proc.stderr.close()
        self.proc = None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def accepted(self):
        return self.log_text().count("Accepted publickey")


@pytest.fixture
def sshd(tmp_path, keys):
    s = Sshd(tmp_path, keys)
    s.start()
    yield s
    s.stop()


def group(sshd, *lines, identity=None, known_hosts=None, scope=None):
    """An [ssh:...] group for the test's sshd, as checks.conf text."""
    return "\n".join([
        "[%s]" % (scope or "ssh:%s@127.0.0.1:%d" % (USER, sshd.port)),
        "ssh_identity = %s" % (identity or sshd.keys["user"]),
        "ssh_options = -o UserKnownHostsFile=%s" % (known_hosts or sshd.known_hosts),
        "connect_timeout = 3s",
    ] + list(lines)) + "\n"


def configure(daemon, text, workers=2):
    daemon.write("checks.conf", "[daemon]\nworkers = %d\ntimeout = 8s\n\n" % workers + text)
    daemon.write("actions.conf", "")


def check_status(daemon, name):
    for c in daemon.status()["checks"]:
        if c["name"] == name:
            return c
    raise AssertionError("no check %r in the status" % name)


def last(daemon, name, pred=lambda last: True, timeout=20, what=None):
    """Wait for check ``name``'s last result to satisfy ``pred``; return it."""
    def ready():
        result = check_status(daemon, name)["last"]
        return result if result and pred(result) else None
    return wait_for(ready, timeout=timeout, what="%s (check %s; log:\n%s)" % (
        what or "a result", name, daemon.tail()))


def ssh_status(daemon):
    return daemon.status()["daemon"]["ssh"]


def wait_master(daemon, timeout=20, not_pid=None):
    """Wait until the daemon's (one) master connection is up; return its pid."""
    def up():
        masters = ssh_status(daemon)
        return (len(masters) == 1 and masters[0]["connected"] and masters[0]["pid"] != not_pid
                and masters[0]["pid"])
    return wait_for(up, timeout=timeout, what="the ssh master connection (log:\n%s)" % daemon.tail())


# -- pure parts --------------------------------------------------------------------

@pytest.mark.parametrize("name, user, host, port", [
    ("ssh:db2", None, "db2", None),
    ("ssh:postgres@db2.example.com:2222", "postgres", "db2.example.com", 2222),
    ("ssh:root@[::1]:22", "root", "::1", 22),
    ("ssh:a_b.c@10.0.0.1", "a_b.c", "10.0.0.1", None),
])
def test_parse_scope(name, user, host, port):
    scope = hadaemon.config.parse_scope(name)
    assert (scope.kind, scope.user, scope.host, scope.port) == ("ssh", user, host, port)


@pytest.mark.parametrize("name", ["ssh:", "ssh:db2:0", "ssh:db2:65536", "ssh:-oProxyCommand=x",
                                  "ssh:a@b@c", "ssh:db 2", "remote:db2"])
def test_parse_scope_refuses(name):
    with pytest.raises(ValueError):
        hadaemon.config.parse_scope(name)


@pytest.mark.parametrize("interp, run", [
    (["sh"], ["sh", "-s", "--"]),
    (["/bin/bash", "-e"], ["/bin/bash", "-e", "-s", "--"]),
    (["/usr/bin/env", "bash"], ["/usr/bin/env", "bash", "-s", "--"]),
    (["/usr/bin/env", "python3"], ["/usr/bin/env", "python3", "-"]),
    (["/usr/bin/env", "-S", "python3", "-u"], ["/usr/bin/env", "-S", "python3", "-u", "-"]),
    (["/usr/bin/perl", "-w"], ["/usr/bin/perl", "-w", "-"]),
])
def test_remote_run(interp, run):
    assert hadaemon.ssh.remote_run(interp) == run


def test_control_path_fits_a_unix_socket(tmp_path):
    g = hadaemon.config.Group(hadaemon.config.parse_scope("ssh:db2"), "x:1", 1.0, None, 1.0, 1, None)
    short = hadaemon.ssh.ssh_control_path(g, "/var/lib/hadaemon")
    assert short.startswith("/var/lib/hadaemon/ssh-") and len(short) + 17 < 108
    assert hadaemon.ssh.ssh_control_path(g, "/" + "d" * 80) is None
    other = hadaemon.config.Group(g.scope, "x:2", 1.0, None, 1.0, 1, None, ssh_options=("-o", "Port=22"))
    assert hadaemon.ssh.ssh_control_path(other, "/var/lib/hadaemon") != short


def test_config_refuses_a_binary_remote_check(daemon):
    daemon.write("checks/binary", "")
    shutil.copy("/bin/true", daemon.dir / "checks" / "binary")
    daemon.write("checks.conf", "[ssh:db2]\nbinary\n")
    daemon.write("actions.conf", "")
    result = daemon.cli("--check-config")
    assert result.returncode == 1
    assert "checks.conf:2:" in result.stderr and "is a binary" in result.stderr


# -- against a real sshd -------------------------------------------------------------

def test_remote_role_check_and_connection_reuse(daemon, sshd):
    daemon.role_check()
    configure(daemon, group(sshd, "interval = 200ms", "check_role db2"))
    daemon.set("db2", "master")
    daemon.start()
    daemon.wait_state("db2", "master", timeout=20)
    pid = wait_master(daemon)
    daemon.set("db2", "slave")
    daemon.wait_state("db2", "slave", timeout=20)

    # Connection reuse: once the master is up, many checks open no new connection.
    before_runs = check_status(daemon, "check_role db2")["runs"]
    before = sshd.accepted()
    wait_for(lambda: check_status(daemon, "check_role db2")["runs"] >= before_runs + 20, timeout=30,
             what="20 more runs")
    assert sshd.accepted() == before, sshd.log_text()
    assert [m["pid"] for m in ssh_status(daemon)] == [pid]
    result = last(daemon, "check_role db2")
    assert result["reports"] == {"db2": "slave"} and result["exit"] == 0
    print("\n%d runs after the master came up, %d new sshd connections; %d in all"
          % (check_status(daemon, "check_role db2")["runs"] - before_runs, sshd.accepted() - before,
             sshd.accepted()))


def test_arguments_environment_and_interpreters(daemon, sshd):
    daemon.script("checks/show_args", r"""
        printf 'argc=%s\n' "$#"
        i=0
        for a in "$@"; do i=$((i+1)); printf 'arg%s=[%s]\n' "$i" "$a"; done
        echo "scope=$HA_SCOPE"
        echo "ha_check=$HA_CHECK"
        echo "ha_state=$HA_STATE"
        echo "ha_host=$HA_HOST"
        echo "ha_config_dir=$HA_CONFIG_DIR"
        echo "cwd=$(pwd)"
        echo "user=$(id -un)"
        echo state=up
    """)
    daemon.script("checks/py_check", """
        import json, os, sys
        out = {"state": "up", "argc": str(len(sys.argv)), "scope": os.environ.get("HA_SCOPE"),
               "exe": sys.executable}
        out.update(("arg%d" % i, a) for i, a in enumerate(sys.argv))
        print(json.dumps(out))
    """, shebang="#!/usr/bin/env python3")
    scope = "ssh:%s@127.0.0.1:%d" % (USER, sshd.port)
    configure(daemon, group(sshd, "interval = 1s", "host = db2",
                            """show_args 'a b' "c'd" '$HOME' '*' 'e"f' 'g;h' ''""",
                            """py_check 'x y' "it's" '$PATH'"""))
    daemon.start()
    name = """show_args 'a b' "c'd" '$HOME' '*' 'e"f' 'g;h' ''"""
    attrs = last(daemon, name)["attributes"]
    assert attrs["argc"] == "7"
    assert [attrs["arg%d" % i] for i in range(1, 8)] == ["[a b]", "[c'd]", "[$HOME]", "[*]", '[e"f]',
                                                         "[g;h]", "[]"]
    assert attrs["scope"] == scope
    assert attrs["ha_check"] == name
    assert attrs["ha_host"] == "db2"
    assert attrs["ha_state"] in ("unknown", "up")
    assert attrs["ha_config_dir"] == str(daemon.dir)
    assert attrs["cwd"] == os.path.expanduser("~" + USER)       # the login user's home
    assert attrs["user"] == USER

    result = last(daemon, """py_check 'x y' "it's" '$PATH'""")
    assert result["reports"] == {"db2": "up"}
    # Read from stdin by the interpreter of its #! line: argv[0] is "-".
    attrs = result["attributes"]
    assert attrs["argc"] == "4"
    assert [attrs["arg%d" % i] for i in range(4)] == ["-", "x y", "it's", "$PATH"]
    assert result["attributes"]["scope"] == scope
    assert "python" in os.path.basename(result["attributes"]["exe"])


def test_ssh_failures_are_unknown_and_told_apart_from_check_failures(daemon, sshd):
    daemon.script("checks/db_down", """
        echo "db2 is down: no postmaster"
        exit 2
    """)
    configure(daemon,
              group(sshd, "interval = 500ms", "host = good", "db_down") + "\n"
              + group(sshd, "interval = 500ms", "host = badkey", "db_down",
                      identity=sshd.keys["wrong"]) + "\n"
              + group(sshd, "interval = 500ms", "host = badhostkey", "db_down",
                      known_hosts=sshd.wrong_known_hosts))
    daemon.start()
    daemon.wait_state("good", "down", timeout=20)

    def by_host():
        return {c["host"]: c["last"] for c in daemon.status()["checks"]}
    wait_for(lambda: all(by_host().values()), timeout=20, what="every check to report")
    results = by_host()
    # The check itself failing: its exit status and its message, no "ssh".
    assert results["good"]["reports"] == {"good": "down"}
    assert results["good"]["exit"] == 2
    assert results["good"]["message"] == "db2 is down: no postmaster"
    # ssh failing: unknown, with ssh's own words.
    assert results["badkey"]["reports"] == {"badkey": "unknown"}
    assert results["badkey"]["exit"] == 255
    assert results["badkey"]["message"].startswith("ssh failed: ")
    assert "Permission denied" in results["badkey"]["message"]
    assert results["badhostkey"]["reports"] == {"badhostkey": "unknown"}
    assert "Host key verification failed" in results["badhostkey"]["message"]
    # The good target's master connection is up; the two others keep failing (backoff).
    masters = wait_for(lambda: [m for m in ssh_status(daemon) if m["connected"]] and ssh_status(daemon),
                       timeout=20, what="the good master connection")
    assert len(masters) == 3 and sum(m["connected"] for m in masters) == 1
    daemon.wait_log("master connection failed (exit 255: %s@127.0.0.1: Permission denied" % USER)
    daemon.wait_log("Host key verification failed")


def test_sshd_stopped_mid_run_then_back(daemon, sshd):
    daemon.role_check()
    # host = db2: a failed ssh has no output to name the host, the group's host is used.
    configure(daemon, group(sshd, "interval = 250ms", "host = db2", "check_role db2"))
    daemon.set("db2", "master")
    daemon.start()
    daemon.wait_state("db2", "master", timeout=20)
    first = wait_master(daemon)

    sshd.stop()
    daemon.wait_state("db2", "unknown", timeout=20)
    result = last(daemon, "check_role db2", lambda r: "Connection refused" in (r["message"] or ""),
                  what="'Connection refused'")
    assert result["message"].startswith("ssh failed: ")
    daemon.wait_log("master connection lost")
    wait_for(lambda: not alive(first), timeout=10, what="the dead master connection to be reaped")
    assert not ssh_status(daemon)[0]["connected"]

    sshd.start()
    daemon.wait_state("db2", "master", timeout=30)
    second = wait_master(daemon, timeout=40, not_pid=first)
    assert second != first
    runs = check_status(daemon, "check_role db2")["runs"]
    before = sshd.accepted()
    wait_for(lambda: check_status(daemon, "check_role db2")["runs"] >= runs + 8, timeout=20,
             what="8 more runs")
    assert sshd.accepted() == before            # the checks ride the new master again
    assert [tr["to"] for tr in daemon.status()["transitions"]][:3] == ["master", "unknown", "master"]


def test_hung_remote_check_is_killed_and_does_not_block_the_worker(daemon, sshd):
    daemon.script("checks/hang", """
        echo "about to hang"
        sleep 60
    """)
    daemon.script("checks/tick", "echo state=up\n")
    configure(daemon, group(sshd, "interval = 500ms", "timeout = 1s", "host = stuck", "hang")
              + "\n[local]\ninterval = 200ms\nhost = local\ntick\n", workers=1)
    daemon.start()
    result = last(daemon, "hang", lambda r: r["message"] == "timed out after 1s", what="the timeout")
    assert result["reports"] == {"stuck": "unknown"}
    # One worker, and the local check goes on between the hung runs.
    ticks = check_status(daemon, "tick")["runs"]
    hangs = check_status(daemon, "hang")["runs"]
    wait_for(lambda: check_status(daemon, "tick")["runs"] >= ticks + 5
             and check_status(daemon, "hang")["runs"] >= hangs + 2, timeout=30,
             what="more runs of both checks")
    # Over there the hung check is killed too (the remote `timeout` guard), shortly after.
    daemon.stop()
    marker = "HA_CHECK=hang"
    wait_for(lambda: not [p for p in pids_with_env(marker) if alive(p)], timeout=15,
             what="the remote 'sleep 60' to be killed")


def test_master_connection_ends_with_the_daemon(daemon, sshd):
    daemon.role_check()
    configure(daemon, group(sshd, "interval = 300ms", "check_role db2"))
    daemon.set("db2", "master")
    daemon.start()
    pid = wait_master(daemon)
    control = ssh_status(daemon)[0]["control"]
    assert os.path.exists(control) and control.startswith(str(daemon.state))
    assert daemon.stop() == 0
    wait_for(lambda: not alive(pid), timeout=10, what="the master connection to end at stop")
    assert not os.path.exists(control)         # ssh removed its socket on SIGTERM
    # A crash (kill -9) of the daemon takes its master connection along (PR_SET_PDEATHSIG).
    daemon.start()
    pid = wait_master(daemon)
    daemon.kill9()
    wait_for(lambda: not alive(pid), timeout=10, what="the master connection to end with the daemon")


def test_a_target_that_never_answers_times_out(daemon, sshd):
    """A port that takes the TCP connection and never says a word: ssh's ConnectTimeout."""
    daemon.script("checks/never", "echo state=up\n")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)                           # connections complete, nobody accepts or speaks
    try:
        scope = "ssh:%s@127.0.0.1:%d" % (USER, silent.getsockname()[1])
        configure(daemon, group(sshd, "interval = 500ms", "timeout = 6s", "host = mute", "never",
                                scope=scope).replace("connect_timeout = 3s", "connect_timeout = 1s"))
        daemon.start()
        result = last(daemon, "never", what="a result")
        assert result["reports"] == {"mute": "unknown"}
        assert result["message"].startswith("ssh failed: ") and "timed out" in result["message"]
        # A check timeout shorter than the connect timeout: the check's timeout ends it.
        daemon.stop()
        configure(daemon, group(sshd, "interval = 500ms", "timeout = 1s", "host = mute", "never",
                                scope=scope))
        daemon.start()
        last(daemon, "never", lambda r: r["message"] == "timed out after 1s", what="the check timeout")
    finally:
        silent.close()


def test_reload_replaces_the_master_connection(daemon, sshd):
    daemon.role_check()
    configure(daemon, group(sshd, "interval = 300ms", "host = db2", "check_role db2"))
    daemon.set("db2", "slave")
    daemon.start()
    first = wait_master(daemon)
    old_control = ssh_status(daemon)[0]["control"]
    # Other ssh settings make another connection: the old master goes, a new one comes.
    configure(daemon, group(sshd, "interval = 300ms", "host = db2", "check_role db2").replace(
        "connect_timeout = 3s", "connect_timeout = 4s"))
    assert daemon.cli("--reload").returncode == 0
    second = wait_master(daemon, not_pid=first)
    wait_for(lambda: not alive(first), timeout=10, what="the old master connection to end")
    assert ssh_status(daemon)[0]["control"] != old_control and not os.path.exists(old_control)
    assert "ssh [ssh:%s@127.0.0.1:%d]: master connection up since" % (USER, sshd.port) in \
        daemon.cli("--status").stdout
    # Removing the group ends its master connection too.
    configure(daemon, "[local]\nhost = db2\ncheck_role db2\n")
    assert daemon.cli("--reload").returncode == 0
    wait_for(lambda: not alive(second) and ssh_status(daemon) == [], timeout=10,
             what="the master connection of the removed group to end")


def test_once_runs_remote_checks(daemon, sshd):
    daemon.role_check()
    configure(daemon, group(sshd, "host = db2", "check_role db2"))
    daemon.set("db2", "master")
    result = daemon.cli("--once")
    assert result.returncode == 0, result.stderr
    assert daemon.host_state("db2") == "master"
    assert sshd.accepted() == 1                 # no master connection for a single pass


def test_check_config_connect(daemon, sshd):
    daemon.role_check()
    configure(daemon, group(sshd, "host = db2", "check_role db2"))
    ok = daemon.cli("--check-config", "--connect")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ssh [ssh:%s@127.0.0.1:%d]" % (USER, sshd.port) in ok.stdout and ": ok in " in ok.stdout

    configure(daemon, group(sshd, "host = db2", "check_role db2") + "\n"
              + group(sshd, "host = db3", "check_role db3", identity=sshd.keys["wrong"]))
    bad = daemon.cli("--check-config", "--connect")
    assert bad.returncode == 1
    lines = [line for line in bad.stdout.splitlines() if line.startswith("ssh [")]
    assert len(lines) == 2 and ": ok in " in lines[0]
    assert "FAILED: " in lines[1] and "Permission denied" in lines[1]

    sshd.stop()
    down = daemon.cli("--check-config", "--connect")
    assert down.returncode == 1 and "Connection refused" in down.stdout
    assert daemon.cli("--check-config").returncode == 0      # without --connect: no connection
    assert daemon.cli("--connect").returncode == 2


def test_cost_per_check_with_and_without_reuse(daemon, sshd):
    """Figures, printed: the argv hadaemon runs for a check, 50 times each way."""
    check_path = daemon.role_check()
    daemon.set("db2", "master")
    config_text = group(sshd, "check_role db2")
    configure(daemon, config_text)
    config = hadaemon.configfiles.load_config(str(daemon.dir))
    check = config.checks[0]
    daemon.state.mkdir(mode=0o700)
    env = {"HA_CHECK": check.name, "HA_SCOPE": check.group.scope.name, "HA_STATE": "unknown",
           "HA_CONFIG_DIR": str(daemon.dir), "HA_STATE_DIR": str(daemon.state)}
    argv, stdin_path = hadaemon.ssh.ssh_command(check, env, str(daemon.state))
    assert stdin_path == str(check_path)
    control = hadaemon.ssh.ssh_control_path(check.group, str(daemon.state))

    def run(n):
        started = time.monotonic()
        for _ in range(n):
            with open(stdin_path, "rb") as script:
                out = subprocess.run(argv, stdin=script, capture_output=True, timeout=30)
            assert out.returncode == 0 and b"state=master" in out.stdout, out.stderr
        return (time.monotonic() - started) / n

    n = 50
    before = sshd.accepted()
    without = run(n)
    assert sshd.accepted() - before == n        # no master: one connection per check
    master = subprocess.Popen(hadaemon.ssh.ssh_master_command(check.group, control), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(control), timeout=15, what="the master's control socket")
        before = sshd.accepted()
        with_reuse = run(n)
        assert sshd.accepted() == before        # all through the one master connection
    finally:
        master.send_signal(signal.SIGTERM)
        master.wait(timeout=10)
        master.stderr.close()
    report = {"checks_each_way": n, "without_reuse_ms": round(without * 1000, 1),
              "with_reuse_ms": round(with_reuse * 1000, 1),
              "speedup": round(without / with_reuse, 1) if with_reuse else None,
              "load_avg": os.getloadavg()[0]}
    print("\nremote check cost: " + json.dumps(report))

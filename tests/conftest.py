"""Fixtures that run the real daemon: a temp config dir, a subprocess, bounded waits.

Every test that starts hadaemon gets a ``Daemon`` from the ``daemon`` fixture.  At
teardown every process it started is killed by pid: the master's process group
(master, workers, action runs) and every process whose environment names the
test's config dir (checks and action commands run in sessions of their own).

It also puts each test in its tier (the section "tiers" at the end): the tests that
start the daemon or a server are marked ``daemon``; ``tests/run --fast`` runs the rest.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
HADAEMON = ROOT / "hadaemon.py"             # the shipped file: what every daemon test runs
sys.path.insert(0, str(ROOT / "src"))       # the package: what unit tests import (import hadaemon.cron)


def load_shipped():
    """hadaemon.py, the file users run, imported as the module ``hadaemon_shipped``."""
    import importlib.util
    if "hadaemon_shipped" not in sys.modules:
        spec = importlib.util.spec_from_file_location("hadaemon_shipped", HADAEMON)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["hadaemon_shipped"] = module
    return sys.modules["hadaemon_shipped"]


def wait_for(predicate, timeout=10.0, interval=0.02, what="the condition"):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


FIGURES = []


def figure(line):
    """A figure a test measured: printed now (with -s) and in the terminal summary."""
    FIGURES.append(line)
    print(line)


def pytest_addoption(parser, pluginmanager):
    """Plain ``pytest`` without requirements-test.txt: setup.cfg's ``timeout`` (pytest-timeout's)
    would warn "Unknown config option: timeout"; known here, it is only unused."""
    if not pluginmanager.has_plugin("timeout"):
        parser.addini("timeout", "pytest-timeout's limit per test (pytest-timeout is not installed)")


def pytest_report_header(config):
    if not config.pluginmanager.has_plugin("timeout"):
        return ("pytest-timeout is not installed: no test has a time limit; tests/run installs "
                "requirements-test.txt into .venv (or pip install -r requirements-test.txt)")
    return None


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def pids_with_env(marker):
    """Pids of processes whose environment contains ``marker`` (a KEY=VALUE string)."""
    found = []
    needle = marker.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def pids_in_group(pgid):
    """Live (non-zombie) pids whose process group is ``pgid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(name))
    return found


def alive(pid):
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def keygen(path):
    """An ed25519 key pair without passphrase at ``path`` (and ``path``.pub)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hadaemon-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)
    return path


def with_private_run(argv):
    """``argv`` (an sshd command line) as it can run here.

    sshd as root wants its privilege separation dir /run/sshd; rather than create
    it on the machine, give it a private /run (a tmpfs in a mount namespace of its
    own, unshare(1)) holding one.  Unchanged when not root or /run/sshd exists.
    """
    if os.getuid() != 0 or os.path.isdir("/run/sshd"):
        return list(argv)
    script = 'mount -t tmpfs -o mode=0755 hadaemon-test /run && mkdir -m 0755 /run/sshd && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, "sshd"] + list(argv)


class Daemon:
    """One hadaemon under test, with its own config dir and state dir."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.dir = tmp_path / "conf"
        self.state = tmp_path / "state"
        self.world = tmp_path / "world"        # files the test checks read and the test flips
        for d in (self.dir / "checks", self.dir / "actions", self.world):
            d.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp_path / "daemon.log"
        self.proc = None
        self._log = None
        self.started = []                      # every master pid this Daemon started (or a test adds)
        self.python, self.program = sys.executable, HADAEMON   # what start() runs
        self.wrap = []                         # argv prefix, e.g. ip netns exec NS (it execs: same pid)

    # -- building a config --------------------------------------------------------

    def write(self, name, text):
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    def script(self, name, body, shebang="#!/bin/sh"):
        """An executable under the config dir (``checks/x``, ``actions/y``)."""
        path = self.write(name, shebang + "\n" + textwrap.dedent(body).lstrip("\n"))
        path.chmod(0o755)
        return path

    def role_check(self, name="check_role"):
        """checks/NAME HOST: reports the state written in world/HOST (``down`` if missing)."""
        return self.script("checks/" + name, """
            f="%s/$1"
            echo "host=$1"
            if [ -f "$f" ]; then echo "state=$(cat "$f")"; else echo "state=down"; fi
        """ % self.world)

    def recorder(self, name="record"):
        """actions/NAME ARGS...: appends one line ``ARGS | HA_*`` to world/actions.log."""
        return self.script("actions/" + name, """
            echo "$* | $HA_TRANSITION $HA_HOST master=$HA_MASTER slave=$HA_SLAVE run=$HA_RUN_ID" >> "%s/actions.log"
            echo "recorded $*"
        """ % self.world)

    def set(self, host, state):
        tmp = self.world / (".%s.tmp" % host)
        tmp.write_text(state + "\n")
        os.replace(tmp, self.world / host)

    def actions_log(self):
        try:
            return (self.world / "actions.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    # -- running it -----------------------------------------------------------------

    def argv(self, *args):
        return self.wrap + [self.python, str(self.program), "--config-dir", str(self.dir),
                            "--state-dir", str(self.state)] + list(args)

    def cli(self, *args, timeout=60, env=None, check=False):
        """Run one hadaemon command to completion and return the CompletedProcess."""
        full_env = dict(os.environ, **(env or {}))
        result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                                env=full_env, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError("hadaemon %s exited %d:\n%s%s" % (
                " ".join(args), result.returncode, result.stdout, result.stderr))
        return result

    def start(self, *args, env=None, wait=True, preexec=None):
        """Start ``--foreground`` in the background; wait until --status answers.

        ``preexec`` runs in the child before the exec (drop privileges, set limits).
        """
        assert self.proc is None or self.proc.poll() is not None, "already started"
        self._log = open(self.log_path, "ab")
        full_env = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen(self.argv("--foreground", *args), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=full_env, start_new_session=True, preexec_fn=preexec)
        self.started.append(self.proc.pid)
        if wait:
            wait_for(lambda: self.proc.poll() is not None or self.running(), timeout=15,
                     what="the daemon to answer --status")
            if self.proc.poll() is not None:
                raise AssertionError("daemon exited %s at start:\n%s" % (self.proc.returncode, self.log()))
        return self.proc

    def ask(self, cmd, timeout=10, **fields):
        """One control request over the socket, in-process (what --status / --history send)."""
        import hadaemon.wire
        return hadaemon.wire.request(str(self.state), dict(fields, cmd=cmd), timeout=timeout)

    def running(self):
        return (self.state / "hadaemon.sock").exists() and self.cli("--status", "--json").returncode == 0

    def status(self):
        result = self.cli("--status", "--json")
        assert result.returncode in (0, 3), result.stderr
        return json.loads(result.stdout)

    def host_state(self, host):
        return self.status()["hosts"].get(host, {}).get("state")

    def wait_state(self, host, state, timeout=10):
        return wait_for(lambda: self.host_state(host) == state, timeout=timeout,
                        what="%s to be %s (log:\n%s)" % (host, state, self.tail()))

    def runs(self):
        return self.status()["runs"]

    def wait_runs(self, n, timeout=15, final=True):
        """Wait for at least ``n`` runs (finished ones when ``final``); return them, oldest first."""
        def done():
            runs = self.runs()
            if final:
                runs = [r for r in runs if r["state"] not in ("queued", "running")]
            return runs[::-1] if len(runs) >= n else None
        return wait_for(done, timeout=timeout, what="%d finished action runs (log:\n%s)" % (n, self.tail()))

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n=30):
        return "\n".join(self.log().splitlines()[-n:])

    def wait_log(self, text, timeout=10):
        return wait_for(lambda: text in self.log(), timeout=timeout,
                        what="%r in the log (tail:\n%s)" % (text, self.tail()))

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def stop(self, timeout=30):
        """SIGTERM and wait for the exit; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill9(self):
        """SIGKILL the master alone, as a crash would."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def descendants(self):
        """Pids of live processes started for this daemon (by its environment marker)."""
        return [p for p in pids_with_env("HA_CONFIG_DIR=%s" % self.dir) if alive(p)]

    def cleanup(self):
        for pid in self.started:                # its group, and itself if it left the group
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        pid_file = self.state / "hadaemon.pid"
        try:
            pid = int(pid_file.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid not in self.started and alive(pid):
            try:                                # a daemon started with --start
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in pids_with_env("HA_CONFIG_DIR=%s" % self.dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._log:
            self._log.close()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path)
    yield d
    d.cleanup()


# -- tiers --------------------------------------------------------------------------
#
# A test that starts the daemon (hadaemon.py or the hadaemon command in a process of
# its own, for any command: --foreground, --check-config, --simulate, --help) or a
# server (sshd, postgres, etcd, haproxy, chromium, ...) is marked ``daemon``
# (setup.cfg); ``tests/run --fast`` runs the others (-m "not daemon"), in seconds.
# The mark is given here, not in each test: by the fixtures a test uses, and by the
# lists below of modules and tests that start processes themselves (and of tests that
# take a daemon fixture but start nothing).  A test left unmarked that starts one
# anyway fails (an audit hook sees it), so the fast tier stays what it says.

DAEMON_FIXTURES = {
    "daemon",                                   # conftest: one hadaemon
    "etcd", "etcd_shared", "ha",                # test_cluster: etcd members; hadaemon members
    "nobody_daemon", "small_disk",              # test_faults
    "procs",                                    # test_http_daemon: haproxy, chromium, curl
    "pg_pair",                                  # test_postgresql_failover
    "sshd",                                     # test_ssh
    "pg_template", "stack",                     # test_stack: network namespaces, postgres
    "cstack",                                   # test_cluster_stack: the same, with etcd and members
}

DAEMON_MODULES = {
    "test_bench.py",                            # bench/bench.py runs daemons
    "test_crash.py",                            # kill -9 loops: forked store writers, the daemon
    "test_flow.py",                             # forked workers; daemons
    "test_http_daemon.py",                      # the real clients (haproxy, promtool, chromium)
    "test_smoke.py",                            # the demo on a Daemon of its own
    "test_stack.py",                            # hosts of network namespaces; the examples' -t
    "test_cluster_stack.py",                    # the same hosts as a cluster (etcd, three members)
    "test_partition.py",                        # etcd and hadaemon members in network namespaces
}

DAEMON_TESTS = {                                # module::test (any parameters)
    "test_cluster.py::test_check_config_finds_the_errors",
    "test_cluster.py::test_tls_with_a_client_certificate",
    "test_http.py::test_check_config_finds_http_mistakes",
    "test_install.py::test_pip_install_gives_a_hadaemon_command",
    "test_install.py::test_copy_and_run_still_uses_its_own_folder",
    "test_notify.py::test_notify_webhook_posts_the_event_with_a_text_line",   # receivers on loopback
    "test_notify.py::test_notify_mail_through_a_local_smtp_sink",
    "test_notify.py::test_notify_log_writes_one_syslog_line_through_logger",
}


FAST_TESTS = {                                  # they take the daemon fixture for its config dir only
    "test_cli.py::test_stop_never_signals_a_pid_it_does_not_know",
    "test_whatif.py::test_each_case_of_the_precedence",
    "test_whatif.py::test_each_variable",
    "test_whatif.py::test_no_section_matches",
}


def starts_daemon(item):
    """True when ``item`` starts the daemon or a server (by its name, fixtures or module)."""
    name = "%s::%s" % (item.path.name, getattr(item, "originalname", None) or item.name)
    if name in FAST_TESTS:
        return False
    return (name in DAEMON_TESTS or item.path.name in DAEMON_MODULES
            or not DAEMON_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if starts_daemon(item):
            item.add_marker(pytest.mark.daemon)


# What only a ``daemon`` test may start: these programs, as a command or as the script
# an interpreter runs (an argument's value such as ``--output x/hadaemon.py`` is not).
DAEMON_PROGRAMS = {"hadaemon.py", "hadaemon", "bench.py", "sshd", "etcd", "postgres", "pg_ctl",
                   "initdb", "pgbouncer", "haproxy", "monit", "chromium"}

_guard = {"pid": None, "item": None, "started": []}


def _words(argv):
    """The words of a command line: an argv list, or a string for a shell (os.system, sh -c)."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        return os.fsdecode(argv).split()
    words = [os.fsdecode(arg) for arg in argv]
    if words and os.path.basename(words[0]) in ("sh", "bash", "dash"):
        words = [word for arg in words for word in arg.split()]
    return words


def _daemon_program(argv):
    """The first word of ``argv`` that runs one of DAEMON_PROGRAMS, else None."""
    words = _words(argv)
    for before, word in zip([""] + words, words):
        if os.path.basename(word) in DAEMON_PROGRAMS and (before == "-m" or not before.startswith("-")):
            return word
    return None


def _audit(event, args):
    """Audit hook: note what a test not marked ``daemon`` starts that only daemon tests may."""
    if _guard["item"] is None or os.getpid() != _guard["pid"]:
        return
    if event in ("subprocess.Popen", "os.posix_spawn", "os.system"):
        argv = args[0] if event == "os.system" else args[1]
        if _daemon_program(argv):
            _guard["started"].append(" ".join(_words(argv))[:300])
    elif event == "os.fork":
        _guard["started"].append("os.fork(): a child of the test process")


def pytest_configure(config):
    if _guard["pid"] is None:
        _guard["pid"] = os.getpid()
        sys.addaudithook(_audit)               # for the whole session: hooks cannot be removed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _guard["item"] = None if item.get_closest_marker("daemon") else item
    _guard["started"] = []
    try:
        yield
    finally:
        _guard["item"] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    started, _guard["started"] = _guard["started"], []
    if started and _guard["item"] is item:
        why = ("%s is not marked daemon (tests/run --fast runs it) but started:\n  %s\n"
               "Use a fixture of tests/conftest.py's DAEMON_FIXTURES, or name the test in its "
               "DAEMON_TESTS or its module in DAEMON_MODULES." % (item.nodeid, "\n  ".join(started)))
        if report.failed:                       # keep the test's own failure, say this too
            report.sections.append(("not marked daemon", why))
        else:
            report.outcome, report.longrepr = "failed", why

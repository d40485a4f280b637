"""Faults and bad input (SPEC §7, §8): nothing takes the daemon down, nothing is lost.

Process faults (workers, action runs and checks that misbehave, fork failing, the
disk filling up), hostile socket clients, damaged files, and the security walls.
After each, ``--status`` answers and check results still come through.
"""

import errno
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import hadaemon.base
import hadaemon.wire
from conftest import HADAEMON, Daemon, alive, wait_for

NOBODY = 65534


def check_of(status, name):
    for check in status["checks"]:
        if check["name"] == name:
            return check
    raise AssertionError("no check %r in %s" % (name, [c["name"] for c in status["checks"]]))


def last_of(d, name):
    return check_of(d.status(), name).get("last") or {}


def still_working(d, host="db1"):
    """--status answers and a flip of HOST's world file comes through as a transition."""
    now = d.host_state(host)
    new = "slave" if now == "master" else "master"
    d.set(host, new)
    d.wait_state(host, new, timeout=20)


def role_config(d, checks="", actions="", **settings):
    """checks.conf with ``check_role db1`` (and ``checks``), actions.conf with ``actions``.

    Each check is in a group that names its host, so that a run that fails (times out,
    cannot start) reports ``unknown`` for that host, not for the check's file name.
    """
    d.role_check()
    daemon = dict({"interval": "100ms", "timeout": "2s", "workers": "2"}, **settings)
    text = "[daemon]\n%s\n\n[local]\nhost = db1\ncheck_role db1\n" % "\n".join(
        "%s = %s" % kv for kv in daemon.items())
    if checks:
        text += "\n[local]\n%s\n" % checks
    d.write("checks.conf", text)
    d.write("actions.conf", actions or "")
    d.set("db1", "master")


def sleeping(d):
    """Pids of ``sleep`` processes the daemon started (checks and commands)."""
    found = []
    for pid in d.descendants():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                if f.read().split(b"\0")[0] in (b"sleep", b"/bin/sleep", b"/usr/bin/sleep"):
                    found.append(pid)
        except OSError:
            pass
    return found


def process_age(pid):
    """Seconds since ``pid`` started."""
    with open("/proc/%d/stat" % pid) as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


# ============================================================================
# Process faults
# ============================================================================

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV, signal.SIGSTOP],
                         ids=["SIGKILL", "SIGSEGV", "SIGSTOP"])
def test_worker_killed_or_hung_is_replaced_and_its_check_reported_unknown(daemon, sig):
    """A worker killed while its check runs (or stopped: hung, so the master kills it once
    the check's timeout is well past) is replaced; the check is reported unknown and the
    check's process does not outlive its worker."""
    d = daemon
    d.script("checks/hang", """
        echo "host=db2"
        if [ -f "%s/hang" ]; then exec sleep 60; fi
        echo state=up
    """ % d.world)
    # A stopped worker cannot time its check out: a short timeout, the master's watch
    # (timeout + WORKER_HANG_GRACE) does.  A killed one is killed long before its timeout.
    timeout = "2s" if sig == signal.SIGSTOP else "30s"
    role_config(d, "host = db2\ninterval = 3s\nhang", workers=3, timeout=timeout)
    d.start()
    d.wait_state("db2", "up")
    (d.world / "hang").write_text("")

    def busy_worker():
        # (A sleeper of an earlier run may be ending, its timeout passed: then look again.)
        for sleeper in sleeping(d) if check_of(d.ask("status"), "hang")["running"] else ():
            try:
                with open("/proc/%d/stat" % sleeper) as f:
                    return sleeper, int(f.read().rsplit(")", 1)[1].split()[1])    # the check's parent
            except OSError:
                continue
    sleeper, worker = wait_for(busy_worker, timeout=15, what="the hanging check to run")
    assert worker in {w["pid"] for w in d.status()["daemon"]["workers"]}
    (d.world / "hang").unlink()         # the runs after this one report up again
    os.kill(worker, sig)
    if sig == signal.SIGSTOP:
        d.wait_log("worker %d: no result of check hang 10s after its timeout; killing it" % worker,
                   timeout=30)
        how = "killed by SIGKILL"
    else:
        how = "killed by %s" % signal.Signals(sig).name
        d.wait_log("worker %d died (%s); replacing it" % (worker, how))

    def reported_unknown():             # (the next run, 3s later, reports up again: ask fast)
        status = d.ask("status")
        if any(t["host"] == "db2" and t["to"] == "unknown" for t in status["transitions"]):
            return status
    status = wait_for(reported_unknown, timeout=20, what="db2 reported unknown")
    assert "worker died (%s) while running the check" % how in check_of(status, "hang")["last"]["message"]
    # Replaced: three workers again, the dead one not among them, and its check not left running.
    wait_for(lambda: len([w for w in d.status()["daemon"]["workers"] if w["pid"] != worker]) == 3,
             what="a replacement worker")
    wait_for(lambda: not alive(sleeper), what="the dead worker's check (pid %d) to be killed" % sleeper)
    d.wait_state("db2", "up")
    still_working(d)


def test_action_run_killed_mid_sequence_is_failed(daemon):
    d = daemon
    d.recorder()
    d.script("actions/slow", "echo slow started >> %s/actions.log; exec sleep 60\n" % d.world)
    role_config(d, actions="""
        [slave_to_master]
        record first
        slow
        record never
        [master_to_slave]
        record to-slave
    """)
    d.set("db1", "slave")
    d.start()
    d.wait_state("db1", "slave")
    d.set("db1", "master")
    action_pid = wait_for(lambda: d.status()["daemon"]["action_pid"], what="the action run")
    wait_for(lambda: "slow started" in d.actions_log(), what="the slow command")
    sleeper = sleeping(d)
    assert sleeper
    os.kill(action_pid, signal.SIGKILL)
    run = d.wait_runs(1)[-1]            # unknown_to_slave has no section: the run is ours
    assert run["section"] == "slave_to_master"
    assert run["state"] == "failed" and "the action run died (killed by SIGKILL)" in run["reason"], run
    assert [c["result"] is not None for c in run["commands"]] == [True, False, False]
    assert not any("never" in line for line in d.actions_log())
    wait_for(lambda: not any(alive(p) for p in sleeper), what="the killed run's command to be killed")
    # The next sequence runs as usual.
    d.set("db1", "slave")
    wait_for(lambda: any("to-slave" in line for line in d.actions_log()), what="the next sequence")


HOSTILE = {
    # name: (script body, what its last result must say)
    "ignores_term": ("trap '' TERM; echo state=up; sleep 60; echo done", "timed out after 1s"),
    "forks_and_exits": ("sleep 300 & (sleep 301 &); sh -c 'sleep 302' & echo state=up", None),
    "closes_stdout": ("exec >&- 2>&-; sleep 60", "timed out after 1s"),
    "writes_forever": ("exec yes", "timed out after 1s"),
    "binary": ("head -c 300000 /dev/urandom", None),
    "gigabytes": ("head -c 4000000000 /dev/zero", None),
    "segfaults": ("echo state=up; kill -SEGV $$", "killed by SIGSEGV"),
    "json_garbage": ("""printf '{"state": "up", "states": [1,2' ; printf '\\377\\000\\n'""", None),
}


def test_hostile_checks_are_contained(daemon):
    """Checks that hang, fork, write forever or die are cut off; the daemon goes on."""
    d = daemon
    for name, (body, _) in HOSTILE.items():
        d.script("checks/" + name, body + "\n")
    role_config(d, "\n".join(HOSTILE), interval="300ms", timeout="1s", workers=len(HOSTILE) + 1)
    d.start()
    d.wait_state("db1", "master")

    # Each ran at least three times: no worker stays stuck past its timeout.
    def ran_thrice():
        status = d.status()
        return all((check_of(status, name)["runs"] or 0) >= 3 for name in HOSTILE) and status
    status = wait_for(ran_thrice, timeout=30, what="every hostile check to run three times")
    for name, (_, says) in HOSTILE.items():
        last = check_of(status, name)["last"]
        if says:
            assert says in (last["message"] or ""), (name, last)
    assert check_of(status, "writes_forever")["last"]["attributes"].get("truncated") in (True, "True")
    binary = check_of(status, "binary")["last"]
    assert binary["exit"] == 0 and binary["attributes"].get("truncated") in (True, "True")
    assert len(binary["message"]) <= 500
    giga = check_of(status, "gigabytes")["last"]
    assert giga["attributes"].get("truncated") in (True, "True"), giga
    assert status["hosts"]["forks_and_exits"]["state"] == "up"
    assert status["hosts"].get("segfaults", {"state": "unknown"})["state"] == "unknown"
    assert "json_garbage" in status["hosts"]            # not JSON: read as key=value lines
    # Each fault gets one clear log line when it starts (not one per run).
    for name, line in (("ignores_term", "timed out after 1s"), ("closes_stdout", "timed out after 1s"),
                       ("writes_forever", "timed out after 1s; output cut at 64 KiB"),
                       ("binary", "output cut at 64 KiB; output is not UTF-8 text"),
                       ("segfaults", "killed by SIGSEGV"), ("gigabytes", "output cut at 64 KiB")):
        lines = [x for x in d.log().splitlines() if "WARNING check %s: " % name in x]
        assert len(lines) == 1 and line in lines[0], (name, lines)

    # Nothing a check started outlives it: no process of ours is older than a
    # timeout plus the time to kill it.
    wait_for(lambda: not [p for p in d.descendants() if process_age(p) > 4],
             what="no check process older than 4s: %s" % [
                 (p, open("/proc/%d/cmdline" % p, "rb").read()) for p in d.descendants()
                 if process_age(p) > 4])
    # Workers stay small: the output cap holds (64 KiB kept, the rest read and dropped).
    for worker in d.status()["daemon"]["workers"]:
        with open("/proc/%d/status" % worker["pid"]) as f:
            rss = [int(line.split()[1]) for line in f if line.startswith("VmRSS:")][0]
        assert rss < 200 * 1024, "worker %d uses %d KiB" % (worker["pid"], rss)
    still_working(d)
    assert d.proc.poll() is None


# ============================================================================
# Fork failing, disk full
# ============================================================================

def python_for(uid):
    """A Python interpreter ``uid`` can run (pyenv under /root is out of its reach), or None."""
    for exe in (sys.executable, "/usr/bin/python3"):
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(uid)
                os.setgroups([])
                os.setuid(uid)
                os.execv(exe, [exe, "-c", "pass"])
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            return exe
    return None


@pytest.fixture
def nobody_daemon():
    """A Daemon whose config dir and program ``nobody`` can read, to run as ``nobody``."""
    if os.getuid() != 0:
        pytest.skip("needs root, to run the daemon as nobody")
    python = python_for(NOBODY)
    if python is None:
        pytest.skip("no Python that nobody may run")
    base = tempfile.mkdtemp(prefix="hadaemon-nobody-")
    d = Daemon(pathlib.Path(base))
    d.python = python
    d.program = pathlib.Path(base) / "hadaemon.py"
    shutil.copy(HADAEMON, d.program)
    yield d
    d.cleanup()
    shutil.rmtree(base, ignore_errors=True)


def chown_tree(path, uid):
    for root, dirs, files in os.walk(path):
        for name in [root] + [os.path.join(root, n) for n in dirs + files]:
            os.chown(name, uid, uid)


def test_fork_failing_is_logged_and_survived(nobody_daemon):
    """EAGAIN from fork and posix_spawn, for real: RLIMIT_NPROC counts the processes of a
    uid, and root ignores it, so the daemon runs as nobody with a limit of 8, and the test
    fills the other slots with ``sleep`` processes of nobody's, or frees them."""
    d = nobody_daemon
    d.recorder()
    role_config(d, actions="""
        [any_to_any]
        record %HOST% %FROM% %TO%
    """, workers=1, interval="200ms")
    os.chmod(str(d.world), 0o777)
    chown_tree(str(d.tmp), NOBODY)
    limit = 8

    def as_nobody(nproc=None):
        def preexec():
            if nproc:
                resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            os.setgid(NOBODY)
            os.setgroups([])
            os.setuid(NOBODY)
        return preexec
    blockers = []

    def nobody_processes():             # zombies count too, and other tests may run some
        count = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/status" % pid) as f:
                    count += any(line.startswith("Uid:") and line.split()[1] == str(NOBODY) for line in f)
            except OSError:
                pass
        return count

    def block_to(total):
        """Start ``sleep`` processes of nobody's until nobody has ``total`` processes."""
        for _ in range(total - nobody_processes()):
            blockers.append(subprocess.Popen(["sleep", "300"], preexec_fn=as_nobody()))

    def unblock():
        for proc in blockers:
            proc.kill()
            proc.wait()
        del blockers[:]
    try:
        # The master takes the last slot.  Its exec fails (EAGAIN) if one more process
        # of nobody's appears meanwhile (another test's): then try again.
        for attempt in range(5):
            block_to(limit - 1)
            try:
                d.start(preexec=as_nobody(limit), wait=False)
                break
            except BlockingIOError:
                unblock()
                time.sleep(0.5)
        wait_for(lambda: d.proc.poll() is not None or d.running(), timeout=15, what="the daemon to answer")
        d.wait_log("cannot fork a worker: too many processes (EAGAIN); retrying")
        status = d.status()
        assert status["daemon"]["workers"] == [] and status["daemon"]["running"]
        unblock()                               # room: it recovers by itself
        d.wait_state("db1", "master", timeout=20)
        assert d.wait_runs(1)[-1]["state"] == "ok"
        # Room for the master and its worker only: checks and action runs cannot start.
        block_to(limit + 1)                     # no room, even once a running check ends
        d.wait_state("db1", "unknown", timeout=20)
        last = last_of(d, "check_role db1")
        assert "cannot start" in last["message"] and "Resource temporarily unavailable" in last["message"]
        run = d.wait_runs(2)[-1]
        assert run["to"] == "unknown" and run["state"] == "failed", run
        # The action run is forked ahead of need: the one waiting since the first run
        # gets the sequence and fails at its command; had none been waiting, the fork.
        assert "cannot fork the action run" in run["reason"] or (
            "cannot start" in run["reason"] and "Resource temporarily unavailable" in run["reason"]), run
        d.wait_log("cannot fork a action: too many processes (EAGAIN)")
        unblock()                               # room again: the host and its sequence are back
        d.wait_state("db1", "master", timeout=20)
        wait_for(lambda: any("db1 unknown master" in line for line in d.actions_log()),
                 what="the next action run")
        assert d.proc.poll() is None
    finally:
        unblock()


@pytest.fixture
def small_disk(daemon):
    """The daemon's state dir on a tmpfs of 1 MiB (mounted here; skipped where we may not)."""
    d = daemon
    d.state.mkdir(mode=0o700)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d.state)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % mount.stderr.strip())
    yield d
    d.cleanup()
    subprocess.run(["umount", "-l", str(d.state)])


def fill(path):
    """Write ``path`` until the file system is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(path, "ab", buffering=0) as f:       # the last few bytes too
        try:
            while True:
                written += f.write(b"\0")
        except OSError:
            pass
    return written


def test_disk_full_is_logged_and_nothing_acknowledged_is_lost(small_disk):
    d = small_disk
    d.recorder()
    role_config(d, actions="""
        [any_to_any]
        record %HOST% %FROM% %TO%
    """)
    d.start()
    d.wait_state("db1", "master")
    d.wait_runs(1)
    fill(d.state / "filler")
    seen = []
    for state in ("slave", "master", "slave", "down", "master"):   # transitions while full
        d.set("db1", state)
        d.wait_state("db1", state)
        seen = d.status()["transitions"]
    d.wait_log("state db: cannot write in %s: No space left on device" % d.state)
    d.wait_runs(6)                  # the actions ran (their records are in memory)
    assert d.log().count("state db: cannot write") == 1, "logged once per outage"
    assert d.proc.poll() is None
    # Space is back: within a checkpoint everything is on disk, and survives kill -9.
    (d.state / "filler").unlink()
    d.wait_log("state db: writing again; everything kept in memory is on disk")
    runs = d.runs()
    d.kill9()
    d.start()
    status = d.status()
    now = {t["id"]: t for t in status["transitions"]}
    assert all(now.get(t["id"]) == t for t in seen), (seen, status["transitions"])
    now = {r["id"]: r for r in status["runs"]}
    assert all(now.get(r["id"]) == r for r in runs), (runs, status["runs"])
    assert status["hosts"]["db1"]["state"] == "master"
    assert "damaged" not in d.log()


# ============================================================================
# Hostile socket clients
# ============================================================================

def connect(d, timeout=20):
    """A connection to the daemon's socket (retried while its listen backlog is full)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(d.state / "hadaemon.sock"))
            return sock
        except BlockingIOError:         # the backlog is full: the daemon has yet to accept
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def closed_by_daemon(sock):
    """True when the daemon closed ``sock`` (EOF or reset) without a word."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return [int(line.split()[1]) for line in f if line.startswith("VmRSS:")][0]


def test_hostile_socket_clients(daemon):
    d = daemon
    role_config(d)
    d.start()
    d.wait_state("db1", "master")
    master = d.proc.pid
    idle = connect(d)                   # connects and never sends: closed after its idle time
    idle_since = time.monotonic()

    # Garbage, a JSON line that is no object, a pickle: each closes its connection.
    for payload in (b"\x00\xff\xfe garbage \x80\n", b"[1, 2, 3]\n",
                    b"cos\nsystem\n(S'touch %s/pwned'\ntR.\n" % str(d.world).encode()):
        sock = connect(d)
        sock.sendall(payload)
        assert closed_by_daemon(sock), payload
        sock.close()
    d.wait_log("(client): not a JSON line")
    d.wait_log("(client): a message must be a JSON object, got list")
    assert not (d.world / "pwned").exists()
    still_working(d)

    # Half a message, then close.
    sock = connect(d)
    sock.sendall(b'{"cmd": "sta')
    sock.close()
    still_working(d)

    # 100 MB without a newline: refused past 4 MiB, memory stays bounded.
    before = rss_kib(master)
    sock = connect(d)
    sent, chunk = 0, b"x" * (1 << 20)
    try:
        while sent < 100 << 20:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    sock.close()
    assert sent < 100 << 20, "the daemon read 100 MB of one line"
    d.wait_log("message longer than %d bytes; closed" % hadaemon.base.MAX_MESSAGE)
    grown = rss_kib(master) - before
    assert grown < 64 * 1024, "the master grew by %d KiB" % grown
    still_working(d)

    # A peer of another uid.  The socket is 0600 in a 0700 dir (under pytest's 0700
    # tmp dir, too), so nobody cannot even reach it.  To test the second wall
    # (SO_PEERCRED), the test opens the first for a moment: a hard link of the socket
    # in a dir nobody can enter, the socket's mode 0666; a child that is nobody connects.
    assert stat_mode(d.state) == 0o700 and stat_mode(d.state / "hadaemon.sock") == 0o600
    door = tempfile.mkdtemp(prefix="hadaemon-door-")
    link = os.path.join(door, "sock")
    try:
        os.link(str(d.state / "hadaemon.sock"), link)
    except OSError as exc:              # another file system
        shutil.rmtree(door)
        pytest.skip("cannot hard-link the socket into %s: %s" % (door, exc))
    os.chmod(door, 0o711)
    os.chmod(link, 0o666)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                os.setgid(NOBODY)
                os.setgroups([])
                os.setuid(NOBODY)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(20)
                sock.connect(link)
                try:
                    sock.sendall(b'{"cmd": "status"}\n')
                    refused = closed_by_daemon(sock)
                except (BrokenPipeError, ConnectionResetError):    # closed before we sent
                    refused = True
                os.write(w, b"refused" if refused else b"answered")
                code = 0
            except BaseException as exc:    # noqa: B036 - tell the test what went wrong
                os.write(w, repr(exc).encode())
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        answer = os.read(r, 100)
        os.close(r)
    finally:
        os.chmod(link, 0o600)
        shutil.rmtree(door)
    assert status == 0 and answer == b"refused", (status, answer)
    d.wait_log("refused a connection from pid %d: uid %d is not ours" % (pid, NOBODY))
    still_working(d)

    # The idle client is closed after its idle time; the others were served meanwhile.
    assert closed_by_daemon(idle)
    assert time.monotonic() - idle_since >= hadaemon.base.CLIENT_IDLE - 1
    d.wait_log("idle for %ds; closed" % hadaemon.base.CLIENT_IDLE)
    still_working(d)
    assert d.proc.poll() is None


def stat_mode(path):
    return os.stat(str(path)).st_mode & 0o777


@pytest.mark.parametrize("clients,soft,hard", [(1000, 256, None), (300, 128, 128)],
                         ids=["1000-clients-soft-limit-256", "300-clients-hard-limit-128"])
def test_many_clients_at_once(daemon, clients, soft, hard):
    """Clients connect all at once, each asks for a ping, and only then are the answers read.

    Started under a soft limit of 256 open files (systemd's default is 1024), the
    daemon raises its own and serves 1000; under a hard limit of 128 it cannot, so
    it rests its listener when out of fds (a log line per rest, not per loop pass)
    and serves the rest as fds come free.
    """
    d = daemon
    role_config(d)
    my_soft, my_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if my_hard != resource.RLIM_INFINITY and my_hard < clients + 200:
        pytest.skip("the hard limit of open files (%d) is too low for this test" % my_hard)
    if my_soft != resource.RLIM_INFINITY and my_soft < clients + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (clients + 200, my_hard))

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard or my_hard))
    try:
        d.start(preexec=limit)
        d.wait_state("db1", "master")
        socks = [connect(d) for _ in range(clients)]
        for sock in socks:
            sock.sendall(b'{"cmd": "ping"}\n')
        answered = 0
        for sock in socks:
            reader = hadaemon.wire.LineReader()
            answer = []
            while not answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer = reader.feed(data)
            answered += bool(answer and answer[0].get("ok"))
            sock.close()
        assert answered == clients
        rests = d.log().count("cannot accept connections: too many open files")
        with open("/proc/%d/limits" % d.proc.pid) as f:
            nofile = int([x for x in f if x.startswith("Max open files")][0].split()[3])
        if hard is None:
            assert nofile > soft and rests == 0
        else:
            assert nofile == hard and 1 <= rests <= 30, rests
        # What the daemon runs gets the limit it was started with.
        d.script("checks/limit", 'echo "host=db3"; echo "state=up"; echo "nofile=$(ulimit -n)"\n')
        d.write("checks.conf", d.dir.joinpath("checks.conf").read_text() + "\n[local]\nlimit\n")
        assert d.cli("--reload").returncode == 0
        d.wait_state("db3", "up")
        assert last_of(d, "limit")["attributes"]["nofile"] == str(soft)
        still_working(d)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (my_soft, my_hard))


# ============================================================================
# Damaged files
# ============================================================================

def with_history(d):
    """Start, make db1 go unknown -> master -> slave with an action run each, stop: a
    state db with something in it.  Returns --status (offline, from the db)."""
    d.recorder()
    role_config(d, actions="[any_to_any]\nrecord %HOST% %FROM% %TO%\n")
    d.start()
    d.wait_state("db1", "master")
    d.set("db1", "slave")
    d.wait_state("db1", "slave")
    d.wait_runs(2)
    assert d.stop() == 0
    return d.status()


def test_missing_state_db_is_recreated(daemon):
    d = daemon
    with_history(d)
    for path in d.state.glob("state.db*"):
        path.unlink()
    d.start()
    d.wait_log("state db: none in %s; a new one is created" % d.state)
    d.wait_state("db1", "slave")
    assert [t["from"] for t in d.status()["transitions"]] == ["unknown"]


def _truncate(path, size):
    with open(str(path), "r+b") as f:
        f.truncate(size)


def _garble(path):
    size = max(64, path.stat().st_size)
    path.write_bytes(os.urandom(size).replace(b"\n", b"\r"))


DAMAGE = {
    # case: (what is done to the files after a clean stop, why the log says it moved them)
    "dat-emptied": (lambda s: _truncate(s / "state.db.dat", 0), "its data file does not read back"),
    "dat-garbage": (lambda s: _garble(s / "state.db.dat"), "its data file does not read back"),
    "dir-and-bak-garbage": (lambda s: (_garble(s / "state.db.dir"), _garble(s / "state.db.bak")),
                            "its index does not parse"),
    "dir-halved-no-bak": (lambda s: (_truncate(s / "state.db.dir", 2), (s / "state.db.bak").unlink()),
                          "its index does not parse"),
    "dir-lines-lost-no-bak": (lambda s: ((s / "state.db.dir").write_text(
        (s / "state.db.dir").read_text().splitlines(True)[0]), (s / "state.db.bak").unlink()),
        "its index is incomplete"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_state_db_is_moved_aside(daemon, case):
    d = daemon
    with_history(d)
    damage, why = DAMAGE[case]
    damage(d.state)
    d.start()
    line = d.wait_log("state db is damaged (%s); moved aside as %s/state.db.corrupt-" % (why, d.state))
    assert "ERROR state db is damaged" in d.log() or "ERROR state db: state db is damaged" in d.log()
    moved = sorted(p.name for p in d.state.glob("state.db.corrupt-*"))
    assert moved and all(p.startswith("state.db.corrupt-2") for p in moved), moved
    d.wait_state("db1", "slave")        # a new db: it learns the world again
    still_working(d)
    assert line


def test_damaged_index_with_a_good_backup_loses_nothing(daemon):
    """After a clean stop .bak is a complete index too: with .dir cut short, a run stored
    while it ran (a checkpoint comes every 2s) whose record then grew past its space in
    the .dat file (its output) is found finished, and the rest is all there."""
    d = daemon
    d.script("actions/talk", "sleep 2.5; head -c 3000 /dev/zero | tr '\\0' x; echo\n")
    d.recorder()
    role_config(d, actions="[any_to_slave]\ntalk\n[any_to_master]\nrecord %HOST%\n")
    d.start()
    d.wait_state("db1", "master")
    d.set("db1", "slave")
    d.wait_state("db1", "slave")
    run = d.wait_runs(2)[-1]
    assert run["state"] == "ok" and len(run["commands"][0]["result"]["output"]) > 3000
    assert d.stop() == 0
    before = d.status()                 # offline, from the db
    _truncate(d.state / "state.db.dir", 10)
    after = d.status()                  # offline: what recovery reads, before anything new
    for key in ("hosts", "transitions", "runs"):
        assert after[key] == before[key], key
    d.start()
    d.wait_log("using its backup")
    assert not list(d.state.glob("*corrupt*"))
    still_working(d)


def test_damaged_journal_lines_are_skipped_and_logged(daemon):
    d = daemon
    before = with_history(d)
    with open(str(d.state / "state.db.journal"), "ab") as f:
        f.write(b'garbage\n\xff\xfe{"s": 1}\n{"s": {"host:db1": {"state": "slave"}, "queue": {}}}\n'
                b'{"s": {"host:db')          # the last line cut short, as a crash leaves it
    d.start()
    d.wait_log("state db: journal line 1 is damaged and was skipped")
    d.wait_log("state db: journal line 2 is damaged and was skipped")
    d.wait_log("state db: host:db1 holds {'state': 'slave'}, not what hadaemon writes there; dropped")
    d.wait_log("state db: queue holds {}, not what hadaemon writes there; dropped")
    assert "line 4" not in d.log()      # a torn last line is what a crash leaves: no error
    d.wait_state("db1", "slave")
    assert d.status()["transitions"][-len(before["transitions"]):] == before["transitions"]
    still_working(d)


def test_stale_pid_file_does_not_block_a_start(daemon):
    d = daemon
    with_history(d)
    # The pid of a dead process, then of a live one that is not hadaemon (ours).
    for pid in (32767 + 1000, os.getpid()):
        (d.state / "hadaemon.pid").write_text("%d\n" % pid)
        assert d.cli("--status").returncode == 3
        d.start()
        assert d.status()["daemon"]["pid"] == d.proc.pid
        assert (d.state / "hadaemon.pid").read_text().strip() == str(d.proc.pid)
        assert d.stop() == 0
    # --start too (it daemonizes): the stale file is no reason to refuse.
    (d.state / "hadaemon.pid").write_text("%d\n" % (32767 + 1000))
    result = d.cli("--start")
    assert result.returncode == 0 and "hadaemon started" in result.stdout, result
    assert d.cli("--stop").returncode == 0


@pytest.mark.parametrize("how", ["mode-0777", "mode-0750", "other-owner"])
def test_state_dir_with_wrong_permissions_is_refused(daemon, how):
    d = daemon
    role_config(d)
    d.state.mkdir(mode=0o700)
    if how == "other-owner":
        if os.getuid() != 0:
            pytest.skip("needs root to chown")
        os.chown(str(d.state), NOBODY, NOBODY)
        says = "state dir %s belongs to uid %d, not to us (uid 0)" % (d.state, NOBODY)
    else:
        mode = int(how[-4:], 8)
        os.chmod(str(d.state), mode)
        says = "state dir %s has mode %04o: it must not be open to group or others (chmod 700 %s)" % (
            d.state, mode, d.state)
    for command in ("--foreground", "--start"):
        result = d.cli(command, timeout=30)
        assert result.returncode == 1, (command, result)
        assert says in result.stderr, (command, result.stderr)
    assert not (d.state / "hadaemon.sock").exists() and not list(d.state.glob("state.db*"))


# ============================================================================
# Security
# ============================================================================

def test_state_dir_socket_and_files_are_private(daemon):
    d = daemon
    role_config(d, actions="[any_to_any]\nrecord %HOST%\n")
    d.recorder()
    d.start()
    d.wait_state("db1", "master")
    d.wait_runs(1)
    d.signal(signal.SIGUSR1)            # nothing to reopen in the foreground; harmless
    assert stat_mode(d.state) == 0o700
    assert stat_mode(d.state / "hadaemon.sock") == 0o600
    for path in d.state.iterdir():
        assert stat_mode(path) & 0o077 == 0, (path.name, oct(stat_mode(path)))


BAD_HOSTS = ["db1;rm -rf /", "../x", "db1 db2", "$(touch pwned)", "-x", "", "a/b", "x\ny", ".", "db1\x00"]
BAD_STATES = {"db9": "x_to_y", "db8": "no good", "db7": "../up", "db6": 3}


def test_bad_host_and_state_names_are_rejected_at_the_report(daemon):
    d = daemon
    report = {"states": dict([(h, "master") for h in BAD_HOSTS], **BAD_STATES)}
    d.script("checks/liar", "cat <<'EOF'\n%s\nEOF\n" % json.dumps(report))
    d.script("checks/liar_kv", "echo 'host=../etc'; echo 'state=up'\n")
    role_config(d, "liar\nliar_kv")
    d.start()
    d.wait_state("db1", "master")
    for host in BAD_HOSTS:
        d.wait_log("check liar: rejected report: bad host name %s" % hadaemon.wire._shorten(host))
    for host, state in BAD_STATES.items():
        d.wait_log("check liar: rejected report for %s: bad state %s" % (host, hadaemon.wire._shorten(state)))
    d.wait_log("check liar_kv: rejected report: bad host name '../etc'")
    assert set(d.status()["hosts"]) == {"db1"}
    assert not (d.dir / "pwned").exists()
    assert len(last_of(d, "liar")["rejected"]) == len(BAD_HOSTS) + len(BAD_STATES)


def test_action_arguments_never_pass_through_a_shell(daemon):
    d = daemon
    d.recorder()
    pwned = d.world / "pwned"
    role_config(d, actions="""
        [any_to_master]
        record '$(touch %(p)s)' "; touch %(p)s2" '`touch %(p)s3`' '|' touch %(p)s4 '&&' %%HOST%%
    """ % {"p": pwned})
    d.start()
    d.wait_state("db1", "master")
    run = d.wait_runs(1)[-1]
    assert run["state"] == "ok", run
    line = d.actions_log()[0]
    args = "$(touch %(p)s) ; touch %(p)s2 `touch %(p)s3` | touch %(p)s4 && db1" % {"p": pwned}
    assert line.startswith(args + " |"), line
    assert run["commands"][0]["argv"][1:] == ["$(touch %s)" % pwned, "; touch %s2" % pwned,
                                              "`touch %s3`" % pwned, "|", "touch", "%s4" % pwned, "&&", "db1"]
    assert not list(d.world.glob("pwned*"))

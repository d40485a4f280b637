#!/usr/bin/env python3
"""bench.py: hadaemon's speed beside the machine's limit and beside Monit.

One run measures, on this machine and under its current load:

1. limit       the floor: wall and CPU of a bare posix_spawn + waitpid of the trivial
               check (``#!/bin/sh`` printing ``state=up``), the round trip of a
               small JSON message over an AF_UNIX socket to another process, and
               the shape's floor: a bare master and worker trading a JSON job and
               result per check at 500/s, nothing else.
2. overhead    hadaemon running trivial checks at a high rate (the 500/s run of 3):
               CPU of master + workers + check processes per check execution, as a
               ratio to the bare spawn.
3. throughput  100 trivial checks at 100, 200, 500, 1000 checks/s: the rate achieved,
               skipped runs, CPU per check, and the schedule lag the daemon records
               (due -> handed to a worker; ``--status --json`` daemon.lag_ms).  Each
               rate starts slow and is reloaded to its interval, so the lag window
               holds the steady state, not the workers' start.
4. reaction    a flag-file check at interval 100ms, confirm 1, one action: from the
               transition (stamped when the check's result reached the master) to
               the start of the first action command, and from flipping the file.
5. idle        10 checks at a 10 s interval: CPU % and RSS / PSS of each process.
6. monit       /usr/bin/monit in the foreground with the same check and action at
               its fastest cycle (1 s): reaction latency and CPU per check.
7. cluster     three daemons (quorum 2, ttl 2s, interval 100ms) on a three-member
               etcd on loopback (tests/etcd.py), 200 checks/s in all besides:
               leader kill -9 -> the new leader's action (the world flipped at
               the kill), flip -> action with agreement, and etcd requests per
               second in steady state (the members' count, and etcd's own).
8. http        50 hosts (100 checks at 200 checks/s) and the HTTP server on: latency
               p50 / p99 of GET /status and GET /hosts/db1/master, one every 20 ms
               (kept-alive, and a new connection each), the schedule lag meanwhile,
               ``ab -c 20`` on /metrics, and the master's extra CPU per request.
9. scale       300, 3,000 and 10,000 trivial checks (one host each) at the same
               aggregate rate, 100 checks/s: schedule lag, master CPU %, master RSS
               and PSS, start-up (exec -> first check's result at the master), reload,
               --status and --check-config of that config.  Cost should follow the
               rate, not the count.
10. notify     200 checks/s (190 trivial at 1 s, a flag check at 100 ms) with the
               flag flipped every second, each flip a transition and a run:
               notifications off, then on (a bash receiver appending each event):
               the master's CPU, result -> action p50 / p99, and, with them on,
               the notify child's CPU (its commands' included) and an event's
               time -> its receiver.

Standard library only.  Everything runs in a temp dir; every process started is
ended by its pid; the only network is the daemon's UNIX socket (and loopback to
the cluster section's etcd and to the http section's port).

    python3 bench/bench.py                 full run (a few minutes)
    python3 bench/bench.py --quick         ~30 s smoke run (what CI runs)
    python3 bench/bench.py --json FILE     also write the figures as JSON
    python3 bench/bench.py --profile DIR   the same under cProfile (bench/profiled.py),
                                           one subdir per daemon started
    python3 bench/bench.py --only scale --window 20   one section, a shorter scale window
    BENCH_HADAEMON=/path/hadaemon.py       bench another copy (before / after a change)
"""

import argparse
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HADAEMON = os.environ.get("BENCH_HADAEMON") or os.path.join(ROOT, "hadaemon.py")
BEFORE = os.environ.get("BENCH_BEFORE")        # the versus section: that copy against HADAEMON
MONIT = "/usr/bin/monit"
CLK_TCK = os.sysconf("SC_CLK_TCK")

SECTIONS = ("limit", "throughput", "reaction", "idle", "monit", "cluster", "http", "scale", "notify",
            "versus")
TARGETS = {"overhead_ratio": 1.3, "lag_p99_ms": 20.0, "lag_rate": 500,
           "reaction_p99_ms": 5.0, "idle_master_cpu_pct": 0.2, "idle_rss_mb": 60.0,
           "http_p99_ms": 5.0,
           "idle_pss_mb": 24.0 * 1.048576,            # 24 MiB, in the MB (10^6) the bench prints
           "scale_lag_p99_ms": 5.0, "scale_lag_vs_small": 2.0, "scale_cpu_vs_small": 1.3,
           "scale_start_s": 2.0, "scale_reload_s": 2.0, "scale_check_config_s": 2.0}
AB = "/usr/bin/ab"

TRIVIAL_CHECK = "#!/bin/sh\necho state=up\n"
RATES = {False: (100, 200, 500, 1000), True: (100, 500)}      # checks/s; by --quick
SCALE = {False: (300, 3000, 10000), True: (300, 3000)}         # checks; by --quick
SCALE_RATE = 100                                               # checks/s, whatever their number


# ----------------------------------------------------------------------------
# Small helpers: /proc, percentiles, files
# ----------------------------------------------------------------------------

def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def cpu_ticks():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]                # idle + iowait
    total = sum(fields[:8])                     # up to steal; guest is already in user
    return total - idle, total


def proc_times(pid):
    """(utime+stime, cutime+cstime) of ``pid`` in seconds, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ut, st, cut, cst = (int(x) for x in fields[11:15])
    return (ut + st) / CLK_TCK, (cut + cst) / CLK_TCK


def proc_memory(pid):
    """(VmRSS, Pss) of ``pid`` in MB."""
    rss = pss = None
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024.0
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return rss, pss


def pct(values, q):
    """The q-quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def write_script(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def write_file(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def flip(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)
    return time.time()


def read_lines(path):
    try:
        with open(path) as f:
            return [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return []


def wait_for(predicate, timeout, what, interval=0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def kill_strays(marker):
    """SIGKILL, by pid, every process whose command line or environment names ``marker``."""
    needle = marker.encode()
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        for what in ("cmdline", "environ"):
            try:
                with open("/proc/%s/%s" % (name, what), "rb") as f:
                    found = needle in f.read()
            except OSError:
                found = False
            if found:
                try:
                    os.kill(int(name), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                break


# ----------------------------------------------------------------------------
# The daemons under test
# ----------------------------------------------------------------------------

def stop_process_group(proc, marker):
    """SIGTERM ``proc`` and wait, then SIGKILL its group and every process marked ``marker``."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    kill_strays(marker)


class Hadaemon:
    """One hadaemon.py --foreground in its own config dir and state dir."""

    def __init__(self, root, checks_conf, actions_conf="", launcher=(), program=None):
        self.root = root
        self.program = program or HADAEMON
        self.conf = os.path.join(root, "conf")
        self.state = os.path.join(root, "state")
        self.world = os.path.join(root, "world")
        for d in (os.path.join(self.conf, "checks"), os.path.join(self.conf, "actions"), self.world):
            os.makedirs(d, exist_ok=True)
        write_file(os.path.join(self.conf, "checks.conf"), textwrap.dedent(checks_conf))
        write_file(os.path.join(self.conf, "actions.conf"), textwrap.dedent(actions_conf))
        self.launcher = list(launcher)
        if self.launcher and self.launcher[0].endswith("profiled.py"):
            # One profile dir per daemon: each writes its own master.prof.
            self.launcher[1] = os.path.join(self.launcher[1], os.path.basename(root))
            os.makedirs(self.launcher[1], exist_ok=True)
        self.proc = None
        self.log_path = os.path.join(root, "daemon.log")

    def script(self, name, text):
        return write_script(os.path.join(self.conf, name), text)

    def start(self, wait_workers=True):
        argv = [sys.executable] + self.launcher + [self.program, "--config-dir", self.conf,
                                                   "--state-dir", self.state, "--foreground"]
        self.exec_time = time.time()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("hadaemon exited %s at start:\n%s" % (self.proc.returncode, self.tail()))
            try:
                if self.request({"cmd": "ping"}).get("ok"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("hadaemon did not answer within 20s:\n%s" % self.tail())
            time.sleep(0.02)
        self.ready_time = time.time()
        if wait_workers:
            # The workers are forked in the first pass of the loop: wait until they said hello.
            wait_for(lambda: self.worker_pids(idle_or_busy=True), 20, "the workers to connect", 0.02)
        return self

    def cli(self, *args, timeout=60):
        """hadaemon.py ARGS for this daemon's dirs: (seconds it took, CompletedProcess)."""
        argv = [sys.executable, self.program, "--config-dir", self.conf, "--state-dir", self.state] + list(args)
        t0 = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return time.monotonic() - t0, done

    def request(self, message, timeout=20.0):
        """One control message over the daemon's UNIX socket (its documented protocol)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.path.join(self.state, "hadaemon.sock"))
            sock.sendall(json.dumps(message).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = sock.recv(1 << 20)
                if not data:
                    break
                buf += data
            return json.loads(buf.decode())
        finally:
            sock.close()

    def status(self):
        return self.request({"cmd": "status"})

    def history(self, n):
        return self.request({"cmd": "history", "n": n})["history"]

    def worker_pids(self, idle_or_busy=False):
        workers = self.status()["daemon"]["workers"]
        if idle_or_busy:
            workers = [w for w in workers if w["state"] in ("idle", "busy")]
        return [w["pid"] for w in workers]

    def tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        stop_process_group(self.proc, "HA_CONFIG_DIR=" + self.conf)   # checks run in own sessions
        self.proc = None


MONIT_NOFILE = 1024


def _monit_limits():
    # Monit's child closes every fd up to the soft RLIMIT_NOFILE before it execs a
    # program (20000 close() calls per check with this machine's 20000).  Give it
    # the usual default, 1024 (also systemd's default for a service), to be fair.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, MONIT_NOFILE), hard))


class Monit:
    """/usr/bin/monit -I with its own control file, id, state and pid files in a temp dir."""

    def __init__(self, root, services):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.rc = os.path.join(root, "monitrc")
        write_file(self.rc, textwrap.dedent("""\
            set daemon 1
            set logfile {root}/monit.log
            set idfile {root}/monit.id
            set statefile {root}/monit.state
            set pidfile {root}/monit.pid
            """).format(root=root) + textwrap.dedent(services), mode=0o600)
        self.proc = None

    def start(self):
        out = open(os.path.join(self.root, "monit.out"), "ab")
        with out:
            self.proc = subprocess.Popen([MONIT, "-I", "-c", self.rc], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_monit_limits)
        time.sleep(0.2)
        if self.proc.poll() is not None:
            with open(os.path.join(self.root, "monit.out"), errors="replace") as f:
                raise RuntimeError("monit exited %s at start:\n%s" % (self.proc.returncode, f.read()))
        return self

    def stop(self):
        stop_process_group(self.proc, self.root)
        self.proc = None


# ----------------------------------------------------------------------------
# 1. The limit of this machine
# ----------------------------------------------------------------------------

def rusage_cpu(which):
    r = resource.getrusage(which)
    return r.ru_utime + r.ru_stime


def bench_spawn(script, n, pipe):
    """posix_spawn + waitpid ``n`` times; with ``pipe`` stdout is a pipe read to EOF."""
    env = dict(os.environ, HA_CHECK="check_trivial", HA_SCOPE="local", HA_STATE="up")
    self0, kids0 = rusage_cpu(resource.RUSAGE_SELF), rusage_cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    for _ in range(n):
        if pipe:
            r, w = os.pipe()
            actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_DUP2, w, 1)]
            pid = os.posix_spawn(script, [script], env, file_actions=actions, setsid=True)
            os.close(w)
            while os.read(r, 65536):
                pass
            os.close(r)
        else:
            actions = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
            pid = os.posix_spawn(script, [script], env, file_actions=actions)
        os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    parent = rusage_cpu(resource.RUSAGE_SELF) - self0
    child = rusage_cpu(resource.RUSAGE_CHILDREN) - kids0
    return {"n": n, "wall_ms": ms(wall / n), "cpu_ms": ms((parent + child) / n),
            "cpu_parent_ms": ms(parent / n), "cpu_child_ms": ms(child / n),
            "per_s_one_core": round(n / (parent + child), 1) if parent + child else None}


def bench_spawn_paced(script, rate, seconds):
    """posix_spawn + waitpid at ``rate`` per second: the machine idles between spawns,
    as it does between hadaemon's checks, and a cold start costs more than a hot loop."""
    env = dict(os.environ, HA_CHECK="check_trivial", HA_SCOPE="local", HA_STATE="up")
    actions = [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
    n = max(1, int(rate * seconds))
    self0, kids0 = rusage_cpu(resource.RUSAGE_SELF), rusage_cpu(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    for i in range(n):
        delay = start + i / float(rate) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        os.waitpid(os.posix_spawn(script, [script], env, file_actions=actions), 0)
    parent = rusage_cpu(resource.RUSAGE_SELF) - self0
    child = rusage_cpu(resource.RUSAGE_CHILDREN) - kids0
    return {"rate": rate, "n": n, "cpu_ms": ms((parent + child) / n)}


def fork_peer(target, *args):
    """A forked child running ``target(its end of a socket pair, *args)``: (our end, its pid)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            a.close()
            target(b, *args)
        except BaseException:           # noqa: B036 - the child must reach os._exit
            code = 1
        finally:
            os._exit(code)              # this must never return
    b.close()
    return a, pid


def job_message(argv):
    """A job message the size of hadaemon's for the trivial check."""
    return {"t": "job", "id": 0, "key": "local|check_trivial|check_trivial 17", "timeout": 5.0,
            "env": {"HA_CHECK": "check_trivial 17", "HA_SCOPE": "local", "HA_STATE": "up",
                    "HA_CONFIG_DIR": "/etc/hadaemon", "HA_STATE_DIR": "/etc/hadaemon/var"},
            "argv": argv}


def run_piped(script, env):
    """Spawn ``script`` as hadaemon runs a check (a session of its own, stdin /dev/null,
    stdout and stderr piped) and wait for it: (its stdout, its wait status)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)]
    pid = os.posix_spawn(script, [script], env, file_actions=actions, setsid=True)
    os.close(out_w)
    os.close(err_w)
    _, status = os.waitpid(pid, 0)
    out = os.read(out_r, 65536)
    os.read(err_r, 65536)
    os.close(out_r)
    os.close(err_r)
    return out, status


def result_message(job_id, key, out, status, started):
    """The result a worker sends for one run of the trivial check (``key=value`` output)."""
    name, _, value = out.decode().strip().partition("=")
    return {"t": "result", "job": job_id, "key": key, "data": {name: value},
            "exit": os.WEXITSTATUS(status), "started": started, "duration": time.time() - started}


def _shape_worker(sock, script):
    """bench_shape_floor's worker: a job line in, its check run, a result line out."""
    env0, buf = dict(os.environ), b""
    while True:
        while b"\n" not in buf:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
        line, buf = buf.split(b"\n", 1)
        job = json.loads(line)
        env = dict(env0)
        env.update(job["env"])
        started = time.time()
        out, status = run_piped(script, env)
        reply = result_message(job["id"], job["key"], out, status, started)
        sock.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")


def bench_shape_floor(script, rate, seconds):
    """The least hadaemon's shape can cost: a master that sends a job (a JSON line) over
    AF_UNIX at ``rate`` per second to a forked worker, which runs the check in a session
    of its own with its output piped, waits, and sends the result back (a JSON line) --
    and nothing else: no scheduler, no ledger, no timeout.  CPU per check of each."""
    a, pid = fork_peer(_shape_worker, script)
    job = job_message([script])
    n = max(1, int(rate * seconds))
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    buf, got = b"", 0

    def receive(timeout):
        nonlocal buf, got
        if ep.poll(timeout):
            data = a.recv(65536)
            if not data:
                raise RuntimeError("the shape's worker ended before its %d checks" % n)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                json.loads(line)
                got += 1
    worker0, self0 = proc_cpu(pid), rusage_cpu(resource.RUSAGE_SELF)
    start = time.monotonic()
    for i in range(n):
        due = start + i / float(rate)
        while True:
            wait = due - time.monotonic()
            receive(max(0.0, wait))
            if wait <= 0:
                break
        job["id"] = i
        a.sendall(json.dumps(job, separators=(",", ":")).encode() + b"\n")
    late = time.monotonic() + 30.0
    while got < n:
        if time.monotonic() > late:
            raise RuntimeError("the shape's worker answered %d of %d checks" % (got, n))
        receive(1.0)
    master = rusage_cpu(resource.RUSAGE_SELF) - self0
    worker, checks = proc_cpu(pid) - worker0, proc_times(pid)[1]
    a.close()
    os.waitpid(pid, 0)
    ep.close()
    return {"rate": rate, "n": n, "master_ms": ms(master / n), "worker_ms": ms(worker / n),
            "check_ms": ms(checks / n), "cpu_ms": ms((master + worker + checks) / n)}


def _echo_server(sock):
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            reply = {"t": "result", "job": msg["id"], "key": msg["key"],
                     "data": {"state": "up"}, "exit": 0, "signal": None,
                     "started": time.time(), "duration": 0.001}
            sock.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")


def bench_json_rtt(n):
    """Round trips of a job-sized JSON message to another process and back."""
    a, pid = fork_peer(_echo_server)
    job = job_message(["/etc/hadaemon/checks/check_trivial", "17"])
    self0 = rusage_cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    buf = b""
    for i in range(n):
        job["id"] = i
        a.sendall(json.dumps(job, separators=(",", ":")).encode() + b"\n")
        while b"\n" not in buf:
            buf += a.recv(65536)
        line, buf = buf.split(b"\n", 1)
        json.loads(line)
    wall = time.perf_counter() - t0
    parent = rusage_cpu(resource.RUSAGE_SELF) - self0
    a.close()
    _, _, ru = os.wait4(pid, 0)
    child = ru.ru_utime + ru.ru_stime
    return {"n": n, "wall_us": round(wall / n * 1e6, 1), "cpu_us": round((parent + child) / n * 1e6, 1),
            "bytes": len(json.dumps(job, separators=(",", ":")))}


def bench_action_start(root, n):
    """posix_spawn of the bash action used in (4) and (6) -> the time it records first."""
    world = os.path.join(root, "world")
    os.makedirs(world, exist_ok=True)
    action = write_script(os.path.join(root, "react"), REACT_ACTION.format(world=world))
    log = os.path.join(world, "actions.log")
    delays = []
    for _ in range(n):
        t = time.time()
        pid = os.posix_spawn(action, [action, "up"], dict(os.environ, HA_RUN_ID="1", HA_TO="up"))
        os.waitpid(pid, 0)
        delays.append(float(read_lines(log)[-1][0]) - t)
    return summarize(delays)


def interpreter_rss():
    """VmRSS (MB) of a bare python3, without site (-S), and with hadaemon.py imported."""
    probe = "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    out = {}
    for key, argv in (("python3", ["-c", probe]), ("python3_S", ["-S", "-c", probe]),
                      ("hadaemon_imported", ["-c", "import sys; sys.argv = ['hadaemon']; "
                                             "sys.path.insert(0, %r); import hadaemon; %s" % (ROOT, probe)])):
        text = subprocess.run([sys.executable] + argv, capture_output=True, text=True).stdout
        out[key] = round(int(text.split()[0]) / 1024.0, 1)
    return out


def section_limit(tmp, quick):
    script = write_script(os.path.join(tmp, "limit", "check_trivial"), TRIVIAL_CHECK)
    n = 150 if quick else 2000
    bench_spawn(script, 20, False)          # warm the page cache
    return {"spawn": bench_spawn(script, n, False),
            "spawn_paced": [bench_spawn_paced(script, rate, 1.0 if quick else 2.0) for rate in RATES[quick]],
            "spawn_pipe": bench_spawn(script, n, True),
            "json_rtt": bench_json_rtt(n * 2),
            "shape_floor": bench_shape_floor(script, 500, 1.0 if quick else 4.0),
            "action_start": bench_action_start(os.path.join(tmp, "limit"), 20 if quick else 100),
            "rss_mb": interpreter_rss()}


# ----------------------------------------------------------------------------
# 2 + 3. Overhead, throughput and schedule lag
# ----------------------------------------------------------------------------

def trivial_config(nchecks, interval, workers):
    lines = ["[daemon]", "workers = %d" % workers, "timeout = 5s", "",
             "[local]", "interval = %gms" % (interval * 1000)]
    lines += ["check_trivial %d" % i for i in range(nchecks)]
    return "\n".join(lines) + "\n"


def proc_cpu(pid):
    """CPU seconds ``pid`` ran, to the nanosecond (/proc/PID/schedstat; one thread)."""
    try:
        with open("/proc/%d/schedstat" % pid) as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return proc_times(pid)[0]


def children_of(pid):
    """Pids whose parent is ``pid`` (a scan of /proc)."""
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def daemon_processes(d, status):
    """name -> pid of every process of a running hadaemon: master, workers, spare action run."""
    procs = {"master": d.proc.pid}
    workers = [w["pid"] for w in status["daemon"]["workers"]]
    for i, pid in enumerate(workers):
        procs["worker%d" % (i + 1)] = pid
    others = [pid for pid in children_of(d.proc.pid) if pid not in workers]
    for i, pid in enumerate(others):
        procs["action run" if len(others) == 1 else "child%d" % (i + 1)] = pid
    return procs


def cpu_snapshot(master, workers):
    m = proc_cpu(master)
    w = c = 0.0
    for pid in workers:
        w += proc_cpu(pid)
        c += proc_times(pid)[1]     # workers reap their checks: the checks' CPU lands here
    return {"master": m, "workers": w, "checks": c}


def runs_total(status):
    checks = status["checks"]
    return sum(c["runs"] for c in checks), sum(c["skipped"] for c in checks)


def rate_run(tmp, rate, nchecks, workers, warmup, window, launcher=(), program=None, name=None):
    interval = nchecks / float(rate)
    # Start slow (the first runs are spread over a minute), then reload at the rate
    # measured: no check is due while the workers start, so the lag the daemon
    # records (its last 10000 dispatches) is the steady state, not the start-up.
    d = Hadaemon(os.path.join(tmp, name or "rate-%d" % rate), trivial_config(nchecks, 60.0, workers),
                 launcher=launcher, program=program)
    d.script("checks/check_trivial", TRIVIAL_CHECK)
    try:
        d.start()
        write_file(os.path.join(d.conf, "checks.conf"), trivial_config(nchecks, interval, workers))
        answer = d.request({"cmd": "reload"})
        if not answer.get("ok"):
            raise RuntimeError("reload refused: %s" % answer)
        time.sleep(warmup)
        st0 = d.status()
        wpids = [w["pid"] for w in st0["daemon"]["workers"]]
        c0, t0 = cpu_snapshot(d.proc.pid, wpids), time.monotonic()
        time.sleep(window)
        c1, t1 = cpu_snapshot(d.proc.pid, wpids), time.monotonic()
        st1 = d.status()
    finally:
        d.stop()
    runs0, skipped0 = runs_total(st0)
    runs1, skipped1 = runs_total(st1)
    runs = runs1 - runs0
    cpu = {k: c1[k] - c0[k] for k in c0}
    total = sum(cpu.values())
    lag = st1["daemon"]["lag_ms"]
    elapsed = t1 - t0
    return {"rate": rate, "checks": nchecks, "interval_ms": round(interval * 1000, 3),
            "workers": workers, "window_s": round(elapsed, 2), "runs": runs,
            "achieved_per_s": round(runs / elapsed, 1), "skipped": skipped1 - skipped0,
            "lag_p50_ms": lag["p50"], "lag_p99_ms": lag["p99"], "lag_max_ms": lag["max"],
            "lag_samples": lag["samples"],
            "cpu_per_check_ms": ms(total / runs) if runs else None,
            "cpu_per_check_split_ms": {k: ms(v / runs) if runs else None for k, v in cpu.items()},
            "cpu_pct": {k: round(100.0 * v / elapsed, 1) for k, v in cpu.items()},
            "worker_pids_stable": sorted(wpids) == sorted(w["pid"] for w in st1["daemon"]["workers"])}


def section_throughput(tmp, quick, workers, launcher=()):
    rates = RATES[quick]
    window = 2.0 if quick else 10.0
    warmup = 0.5 if quick else 1.0
    return [rate_run(tmp, r, 100, workers, warmup, window, launcher) for r in rates]


# ----------------------------------------------------------------------------
# 4 + 6. Reaction latency (the same flag-file check and action for both daemons)
# ----------------------------------------------------------------------------
# bash for its $EPOCHREALTIME (a builtin: no fork to read the clock).  The check
# exits 0 (up) or 2 (down), as a Nagios plugin does, and appends "TIME STATE" to
# world/checks.log as its last step; the action appends "TIME RUN STATE" to
# world/actions.log as its first.

FLAG_CHECK = """#!/bin/bash
read -r s < {world}/role || s=down
printf '%s %s\\n' "$EPOCHREALTIME" "$s" >> {world}/checks.log
[ "$s" = up ] && exit 0
exit 2
"""

REACT_ACTION = """#!/bin/bash
printf '%s %s %s\\n' "$EPOCHREALTIME" "${{HA_RUN_ID:-monit}}" "${{HA_TO:-$1}}" >> {world}/actions.log
"""


def flip_until_acted(world, n, period, timeout):
    """Flip world/role up <-> down ``n`` times; after each, wait for the action line."""
    role, actions = os.path.join(world, "role"), os.path.join(world, "actions.log")
    flips = []
    state = "up"
    for _ in range(n):
        time.sleep(random.uniform(0, period))     # land anywhere in the check's cycle
        state = "down" if state == "up" else "up"
        before = len(read_lines(actions))
        t = flip(role, state)
        wait_for(lambda: len(read_lines(actions)) > before, timeout, "the action for %s" % state)
        flips.append((t, state))
    return flips


def first_after(records, t, state):
    """The first record (time, state...) at or after ``t`` whose last word is ``state``."""
    for rec in records:
        if float(rec[0]) >= t and rec[-1] == state:
            return float(rec[0])
    return None


def summarize(values):
    return {"n": len(values), "p50_ms": ms(pct(values, 0.5)), "p99_ms": ms(pct(values, 0.99)),
            "max_ms": ms(max(values)) if values else None}


def section_reaction(tmp, quick, workers, launcher=(), program=None, load_rate=0, name="reaction"):
    """``load_rate``: trivial checks at that many a second beside the flag check (every
    100 ms, so load_rate / 10 of them), for the reaction of a daemon with work to do."""
    n = 15 if quick else 200      # a p99 of 60 would be their maximum: 200 give one
    load = "" if not load_rate else "\n[local]\ninterval = 100ms\n%s\n" % "\n".join(
        "check_trivial %d" % i for i in range(load_rate // 10))
    d = Hadaemon(os.path.join(tmp, name), """\
        [daemon]
        workers = %d

        [local]
        interval = 100ms
        confirm = 1
        host = role
        check_flag
        """ % workers + load, "[any_to_any]\nreact\n", launcher=launcher, program=program)
    d.script("checks/check_trivial", TRIVIAL_CHECK)
    d.script("checks/check_flag", FLAG_CHECK.format(world=d.world))
    d.script("actions/react", REACT_ACTION.format(world=d.world))
    flip(os.path.join(d.world, "role"), "up")
    try:
        d.start()
        # Every host's first transition (with load, check_trivial's too: its action must
        # not be taken for the first flip's, which would then wait for one never made).
        first = 2 if load_rate else 1
        wait_for(lambda: len(read_lines(os.path.join(d.world, "actions.log"))) >= first, 20,
                 "the first actions")
        flips = flip_until_acted(d.world, n, 0.1, 20)
        history = d.history(n + 10)
    finally:
        d.stop()
    actions = read_lines(os.path.join(d.world, "actions.log"))
    checks = read_lines(os.path.join(d.world, "checks.log"))
    action_start = {int(rec[1]): float(rec[0]) for rec in actions}
    t0 = flips[0][0]
    reaction, spawn, spawn_to_clock, from_check = [], [], [], []
    for tr in history:
        run = tr.get("run")
        if tr["time"] < t0 - 0.001 or not run or run["id"] not in action_start:
            continue
        start = action_start[run["id"]]
        reaction.append(start - tr["time"])
        if run["commands"] and run["commands"][0].get("started"):
            spawn.append(run["commands"][0]["started"] - tr["time"])
            spawn_to_clock.append(start - run["commands"][0]["started"])
        ends = [float(rec[0]) for rec in checks if float(rec[0]) <= tr["time"]]
        if ends:
            from_check.append(start - max(ends))
    e2e = [first_after(actions, t, s) - t for t, s in flips if first_after(actions, t, s)]
    return {"interval_ms": 100, "confirm": 1, "transitions": len(reaction), "load_per_s": load_rate,
            "result_to_action": summarize(reaction),
            "result_to_spawn": summarize(spawn),
            "spawn_to_action": summarize(spawn_to_clock),
            "check_exit_to_action": summarize(from_check),
            "flip_to_action": summarize(e2e)}


def section_versus(tmp, quick, workers, launcher=()):
    """BENCH_BEFORE=FILE: that copy and this one (HADAEMON) in turn, in one run, so that
    the machine's load falls on both alike: CPU per check at 500 checks/s, and the
    reaction with 500 checks/s beside the flag check.  None without BENCH_BEFORE."""
    if not BEFORE:
        return None
    rounds = 1 if quick else 3
    window, warmup = (2.0, 0.5) if quick else (10.0, 1.0)
    script = write_script(os.path.join(tmp, "vs-floor", "check_trivial"), TRIVIAL_CHECK)
    out = []
    for i in range(rounds):
        for side, program in (("before", BEFORE), ("after", HADAEMON)):
            # Each side's floor: the bare spawn paced at 500/s for as long as its window,
            # just before it runs (one 2 s floor for the whole run moved the ratio by 10 %
            # from run to run; one floor per round, measured 30 s before the second side,
            # moved from 0.98 to 1.19 ms from round to round on a 2-vCPU VM).
            floor = bench_spawn_paced(script, 500, window)["cpu_ms"]
            rate = rate_run(tmp, 500, 100, workers, warmup, window, launcher, program,
                            "vs-%s-rate-%d" % (side, i))
            try:
                react = section_reaction(tmp, quick, workers, launcher, program, 500,
                                         "vs-%s-reaction-%d" % (side, i))
            except RuntimeError as exc:         # a machine too busy: the CPU figures stand
                react = {"error": str(exc)}
            out.append({"side": side, "program": program, "round": i + 1, "rate": rate,
                        "reaction": react, "loadavg": loadavg(), "floor_ms": floor})
    return out


# ----------------------------------------------------------------------------
# 5. Idle cost
# ----------------------------------------------------------------------------

def section_idle(tmp, quick, workers, launcher=()):
    window = 10.0 if quick else 60.0
    d = Hadaemon(os.path.join(tmp, "idle"), trivial_config(10, 10.0, workers), launcher=launcher)
    d.script("checks/check_trivial", TRIVIAL_CHECK)
    try:
        d.start()
        time.sleep(1.0)
        st0 = d.status()
        procs = daemon_processes(d, st0)
        mpid = d.proc.pid
        kids = [pid for name, pid in procs.items() if name != "master"]
        c0, t0 = cpu_snapshot(mpid, kids), time.monotonic()
        time.sleep(window)
        c1, t1 = cpu_snapshot(mpid, kids), time.monotonic()
        mem = {name: proc_memory(pid) for name, pid in procs.items()}
        st1 = d.status()
    finally:
        d.stop()
    elapsed = t1 - t0
    runs = runs_total(st1)[0] - runs_total(st0)[0]
    # The same daemon under python3 -S: what site-packages' .pth files add to each process.
    bare = Hadaemon(os.path.join(tmp, "idle-S"), trivial_config(10, 10.0, workers), launcher=("-S",))
    bare.script("checks/check_trivial", TRIVIAL_CHECK)
    try:
        bare.start()
        time.sleep(1.0)
        no_site = [proc_memory(pid)[0] for pid in daemon_processes(bare, bare.status()).values()]
    finally:
        bare.stop()
    return {"checks": 10, "interval_s": 10, "workers": workers, "window_s": round(elapsed, 1),
            "processes": len(procs),
            "rss_total_no_site_mb": round(sum(no_site), 1),
            "runs": runs,
            "cpu_pct": {k: round(100.0 * (c1[k] - c0[k]) / elapsed, 3) for k in c0},
            "rss_mb": {k: round(v[0], 1) for k, v in mem.items()},
            "pss_mb": {k: round(v[1], 1) if v[1] is not None else None for k, v in mem.items()},
            "rss_total_mb": round(sum(v[0] for v in mem.values()), 1),
            "pss_total_mb": round(sum(v[1] or 0 for v in mem.values()), 1)}


# ----------------------------------------------------------------------------
# 6. Beside Monit
# ----------------------------------------------------------------------------

def monit_reaction(tmp, quick):
    root = os.path.join(tmp, "monit-reaction")
    world = os.path.join(root, "world")
    os.makedirs(world)
    check = write_script(os.path.join(root, "check_flag"), FLAG_CHECK.format(world=world))
    action = write_script(os.path.join(root, "react"), REACT_ACTION.format(world=world))
    flip(os.path.join(world, "role"), "up")
    m = Monit(os.path.join(root, "monit"), """\
        check program role with path "{check}"
            if status != 0 then exec "{action} down"
            else if succeeded then exec "{action} up"
        """.format(check=check, action=action))
    n = 3 if quick else 20
    try:
        m.start()
        # Two evaluated cycles before the first flip: monit has seen "up".
        wait_for(lambda: len(read_lines(os.path.join(world, "checks.log"))) >= 2, 20,
                 "monit to run the check twice", 0.05)
        flips = flip_until_acted(world, n, 1.0, 20)
    finally:
        m.stop()
    actions = read_lines(os.path.join(world, "actions.log"))
    checks = read_lines(os.path.join(world, "checks.log"))
    reaction, e2e = [], []
    for t, state in flips:
        act = first_after(actions, t, state)
        seen = first_after(checks, t, state)
        if act is None:
            continue
        e2e.append(act - t)
        if seen is not None:
            reaction.append(act - seen)
    return {"cycle_s": 1, "transitions": len(e2e), "check_exit_to_action": summarize(reaction),
            "flip_to_action": summarize(e2e)}


def monit_cpu(tmp, quick, nchecks=100):
    """``nchecks`` trivial program checks per 1 s cycle, plus one that counts the cycles."""
    root = os.path.join(tmp, "monit-cpu")
    check = write_script(os.path.join(root, "check_trivial"), TRIVIAL_CHECK)
    counter = os.path.join(root, "cycles.log")
    count = write_script(os.path.join(root, "count_cycle"),
                         "#!/bin/sh\necho state=up\necho x >> %s\n" % counter)
    services = "".join('check program trivial%d with path "%s %d"\n    if status != 0 then alert\n'
                       % (i, check, i) for i in range(nchecks))
    services += 'check program counter with path "%s"\n    if status != 0 then alert\n' % count
    m = Monit(os.path.join(root, "monit"), services)
    window = 4.0 if quick else 15.0
    try:
        m.start()
        wait_for(lambda: len(read_lines(counter)) >= 2, 20, "monit's second cycle", 0.05)
        own0, kids0 = proc_times(m.proc.pid)
        n0, t0 = len(read_lines(counter)), time.monotonic()
        time.sleep(window)
        own1, kids1 = proc_times(m.proc.pid)
        n1, t1 = len(read_lines(counter)), time.monotonic()
        rss, pss = proc_memory(m.proc.pid)
    finally:
        m.stop()
    cycles = n1 - n0
    runs = cycles * (nchecks + 1)
    cpu = (own1 - own0) + (kids1 - kids0)
    return {"checks": nchecks + 1, "window_s": round(t1 - t0, 2), "cycles": cycles, "runs": runs,
            "achieved_per_s": round(runs / (t1 - t0), 1),
            "cpu_per_check_ms": ms(cpu / runs) if runs else None,
            "cpu_per_check_split_ms": {"monit": ms((own1 - own0) / runs) if runs else None,
                                       "checks": ms((kids1 - kids0) / runs) if runs else None},
            "rss_mb": round(rss, 1), "pss_mb": round(pss, 1) if pss is not None else None}


def section_monit(tmp, quick):
    if not os.access(MONIT, os.X_OK):
        return {"skipped": "%s is not installed" % MONIT}
    version = subprocess.run([MONIT, "-V"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"version": version.replace("This is Monit version ", ""),
            "reaction": monit_reaction(tmp, quick), "cpu": monit_cpu(tmp, quick)}


# ----------------------------------------------------------------------------
# 7. Cluster: three daemons, one acting, on etcd (SPEC §10)
# ----------------------------------------------------------------------------
# The flag check of section 4 (its own world file per member, all flipped at
# once); the action appends "TIME RUN STATE NODE" to one file shared by all.

CLUSTER_ACTION = """#!/bin/bash
printf '%s %s %s %s\\n' "$EPOCHREALTIME" "$HA_RUN_ID" "$HA_TO" "$HA_NODE" >> {log}
"""
CLUSTER_TTL = 2


def cluster_config(endpoints, node, quorum):
    return """\
        [daemon]
        workers = 2

        [cluster]
        etcd = %s
        name = bench
        node = %s
        ttl = %ds
        quorum = %d

        [local]
        interval = 100ms
        host = role
        check_flag

        [local]
        interval = 300ms
        %s
        """ % (", ".join(endpoints), node, CLUSTER_TTL, quorum,
               "\n        ".join("check_trivial %d" % i for i in range(20)))


class ClusterBench:
    """Three Hadaemons (a, b, c) on one etcd; ``flip`` writes every member's world."""

    def __init__(self, root, etcd, quorum=2):
        self.log = os.path.join(root, "actions.log")
        self.members = {}
        for node in ("a", "b", "c"):
            d = Hadaemon(os.path.join(root, node), cluster_config(etcd.endpoints, node, quorum),
                         "[any_to_any]\nreact\n")
            d.script("checks/check_flag", FLAG_CHECK.format(world=d.world))
            d.script("checks/check_trivial", TRIVIAL_CHECK)
            d.script("actions/react", CLUSTER_ACTION.format(log=self.log))
            flip(os.path.join(d.world, "role"), "up")
            self.members[node] = d

    def flip(self, state):
        t = time.time()
        for d in self.members.values():
            flip(os.path.join(d.world, "role"), state)
        return t

    def clusters(self):
        out = {}
        for node, d in self.members.items():
            if d.proc is not None and d.proc.poll() is None:
                try:
                    out[node] = d.status()["daemon"]["cluster"]
                except OSError:
                    pass
        return out

    def leader(self, without=()):
        """The acting leader every live member agrees on, or None."""
        docs = self.clusters()
        names = {(c["leader"], c["epoch"]) for c in docs.values()}
        if len(names) != 1:
            return None
        node = names.pop()[0]
        if node is None or node in without or not docs.get(node, {}).get("acting"):
            return None
        if any(c["role"] != "follower" for n, c in docs.items() if n != node):
            return None
        return node

    def actions(self):
        return read_lines(self.log)

    def stop(self):
        for d in self.members.values():
            d.stop()


def cluster_failover(cl, kills):
    """Kill -9 the leader and flip the world at once: until the new leader's action."""
    took, to_status = [], []
    state = "up"
    for _ in range(kills):
        leader = wait_for(cl.leader, 30, "an agreed leader", 0.02)
        state = "down" if state == "up" else "up"
        before = len(cl.actions())
        d = cl.members[leader]
        d.proc.kill()
        t = cl.flip(state)
        t_m = time.monotonic()
        d.proc.wait()
        wait_for(lambda: cl.leader(without=(leader,)), 30, "a new leader", 0.01)
        to_status.append(time.monotonic() - t_m)
        acted = wait_for(lambda: [r for r in cl.actions()[before:] if r[2] == state], 30,
                         "the new leader's action", 0.01)
        took.append(float(acted[0][0]) - t)
        stop_process_group(d.proc, "HA_CONFIG_DIR=" + d.conf)
        d.start()                               # back, as a follower
    return {"kills": kills, "ttl_s": CLUSTER_TTL, "kill_to_action": summarize(took),
            "kill_to_leader_status": summarize(to_status)}


def cluster_flips(cl, n):
    """Flip every member's world; from the flip to the leader's action, through agreement
    (split at the transition: seen and agreed, then recorded in etcd and started)."""
    e2e, agreed, started = [], [], []
    state = "up"
    for _ in range(n):
        time.sleep(random.uniform(0, 0.1))
        state = "down" if state == "up" else "up"
        before = len(cl.actions())
        t = cl.flip(state)
        acted = wait_for(lambda: [r for r in cl.actions()[before:] if r[2] == state], 20,
                         "the action for %s" % state, 0.005)
        e2e.append(float(acted[0][0]) - t)
        history = cl.members[acted[0][3]].history(3)
        tr = next((h for h in history if h["run"] and str(h["run"]["id"]) == acted[0][1]), None)
        if tr is not None:
            agreed.append(tr["time"] - t)
            started.append(float(acted[0][0]) - tr["time"])
    return {"flip_to_action": summarize(e2e), "flip_to_transition": summarize(agreed),
            "transition_to_action": summarize(started)}


def cluster_steady(cl, etcd, window):
    """etcd requests per second while nothing changes, 200 checks/s running."""
    def counts():
        docs = cl.clusters()
        return sum(c["requests"] or 0 for c in docs.values()), \
            etcd.metric("etcd_server_proposals_committed_total")
    time.sleep(1.0)
    agents = [c["agent_pid"] for c in cl.clusters().values()]
    a0 = sum(sum(proc_times(pid)) for pid in agents)
    r0, p0, t0 = counts() + (time.monotonic(),)
    time.sleep(window)
    r1, p1, t1 = counts() + (time.monotonic(),)
    a1 = sum(sum(proc_times(pid)) for pid in agents)
    seconds = t1 - t0
    members = len(cl.clusters())
    memory = [proc_memory(pid) for pid in agents]
    return {"window_s": round(seconds, 1), "members": members, "checks_per_s": round(members * (10 + 20 / 0.3)),
            "agent_cpu_pct": round(100.0 * (a1 - a0) / len(agents) / seconds, 3),
            "agent_rss_mb": round(memory[0][0], 1), "agent_pss_mb": memory[0][1] and round(memory[0][1], 1),
            "requests_per_s": round((r1 - r0) / seconds, 2),
            "keepalives_expected_per_s": round(members * 4.0 / CLUSTER_TTL, 2),
            # every member commits every proposal: the cluster's writes are the total / 3
            "etcd_writes_per_s": round((p1 - p0) / len(etcd.members) / seconds, 2)
            if p0 is not None and p1 is not None else None}


def section_cluster(tmp, quick):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from etcd import ETCD, EtcdCluster
    if not os.access(ETCD, os.X_OK):
        return {"skipped": "%s is not installed (etcd-server)" % ETCD}
    root = os.path.join(tmp, "cluster")
    os.makedirs(os.path.join(root, "etcd"))
    etcd = EtcdCluster(os.path.join(root, "etcd"))
    cl = None
    try:
        etcd.start()
        cl = ClusterBench(root, etcd)
        for d in cl.members.values():
            d.start()
        wait_for(cl.leader, 30, "an agreed leader", 0.02)
        wait_for(lambda: cl.actions(), 30, "the first action")
        result = {"quorum": 2, "ttl_s": CLUSTER_TTL, "interval_ms": 100}
        result["steady"] = cluster_steady(cl, etcd, 4.0 if quick else 20.0)
        result["flips"] = cluster_flips(cl, 6 if quick else 30)
        result["failover"] = cluster_failover(cl, 2 if quick else 10)
        return result
    finally:
        if cl is not None:
            cl.stop()
        etcd.stop()


# ----------------------------------------------------------------------------
# 8. HTTP: the status page's server under check load
# ----------------------------------------------------------------------------

HOST_CHECK = "#!/bin/sh\necho host=$1\necho state=$2\n"


def http_config(port, hosts, interval, workers):
    lines = ["[daemon]", "workers = %d" % workers, "timeout = 5s", "http = 127.0.0.1:%d" % port, "",
             "[local]", "interval = %gms" % (interval * 1000)]
    for i in range(1, hosts + 1):
        state = "master" if i == 1 else "slave"
        lines += ["check_host db%d %s a" % (i, state), "check_host db%d %s b" % (i, state)]
    return "\n".join(lines) + "\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpClient:
    """A bare HTTP/1.1 client: one kept-alive connection, or a new one per request."""

    def __init__(self, port):
        self.port = port
        self.sock = None

    def get(self, path, keep=True):
        """Seconds from sending the request to the whole answer; raises on anything but 200/503."""
        t0 = time.perf_counter()
        if self.sock is None or not keep:
            self.close()
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n"
                          % (path.encode(), b"" if keep else b"Connection: close\r\n"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed before the answer to %s" % path)
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed in the answer to %s" % path)
            body += chunk
        took = time.perf_counter() - t0
        if status not in (200, 503):
            raise RuntimeError("%s answered %d" % (path, status))
        if not keep:
            self.close()
        return took

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def http_latency(port, path, n, keep, period=0.02):
    """``n`` GETs of ``path``, one every ``period`` (no pile-up: each waits for its answer)."""
    client, times = HttpClient(port), []
    try:
        for _ in range(n):
            t0 = time.monotonic()
            times.append(client.get(path, keep))
            pause = period - (time.monotonic() - t0)
            if pause > 0:
                time.sleep(pause)
    finally:
        client.close()
    times.sort()
    return {"requests": n, "p50_ms": ms(pct(times, 0.5)), "p99_ms": ms(pct(times, 0.99)),
            "max_ms": ms(times[-1])}


def run_ab(port, path, n, concurrency):
    result = subprocess.run([AB, "-q", "-l", "-n", str(n), "-c", str(concurrency), "-s", "10",
                             "http://127.0.0.1:%d%s" % (port, path)],
                            capture_output=True, text=True, timeout=300)
    out = result.stdout

    def field(label, cast=float):
        for line in out.splitlines():
            if line.startswith(label):
                return cast(line.split(":", 1)[1].split()[0])
        return None
    if result.returncode != 0:
        raise RuntimeError("ab failed: %s%s" % (out[-500:], result.stderr[-500:]))
    return {"requests": field("Complete requests", int), "failed": field("Failed requests", int),
            "per_s": field("Requests per second"), "mean_ms": field("Time per request"),
            "seconds": field("Time taken for tests")}


def section_http(tmp, quick, workers, launcher=()):
    hosts, rate = 50, 200
    n = 100 if quick else 1000
    port = free_port()
    d = Hadaemon(os.path.join(tmp, "http"), http_config(port, hosts, 60.0, workers), launcher=launcher)
    d.script("checks/check_host", HOST_CHECK)
    out = {"hosts": hosts, "checks": 2 * hosts, "rate": rate, "workers": workers}
    try:
        d.start()
        write_file(os.path.join(d.conf, "checks.conf"), http_config(port, hosts, 2 * hosts / rate, workers))
        if not d.request({"cmd": "reload"}).get("ok"):
            raise RuntimeError("reload refused")
        wait_for(lambda: len(d.status()["hosts"]) >= hosts, 20, "every host to report", 0.1)
        master = d.proc.pid
        quiet = 2.0 if quick else 5.0
        c0, t0 = proc_cpu(master), time.monotonic()
        time.sleep(quiet)
        base = (proc_cpu(master) - c0) / (time.monotonic() - t0)     # master CPU/s without HTTP
        runs0, t0 = runs_total(d.status())[0], time.monotonic()
        c0 = proc_cpu(master)
        for key, path, keep in (("status", "/status", True), ("host", "/hosts/db1/master", True),
                                ("host_new_connection", "/hosts/db1/master", False)):
            out[key] = http_latency(port, path, n, keep)
        c1, t1 = proc_cpu(master), time.monotonic()
        st = d.status()
        out["requests"] = 3 * n
        out["cpu_per_request_ms"] = ms((c1 - c0 - base * (t1 - t0)) / (3 * n))
        out["checks_per_s_meanwhile"] = round((runs_total(st)[0] - runs0) / (t1 - t0), 1)
        out["lag_p50_ms"], out["lag_p99_ms"] = st["daemon"]["lag_ms"]["p50"], st["daemon"]["lag_ms"]["p99"]
        out["status_bytes"] = len(json.dumps(st, separators=(",", ":")))
        if os.access(AB, os.X_OK):
            c0, t0 = proc_cpu(master), time.monotonic()
            ab = run_ab(port, "/metrics", 1000 if quick else 5000, 20)
            c1, t1 = proc_cpu(master), time.monotonic()
            ab["cpu_per_request_ms"] = ms((c1 - c0 - base * (t1 - t0)) / ab["requests"])
            lag = d.status()["daemon"]["lag_ms"]        # its last 10000 dispatches: ab's time in them
            ab["lag_p50_ms"], ab["lag_p99_ms"] = lag["p50"], lag["p99"]
            out["ab_metrics"] = ab
        else:
            out["ab_metrics"] = {"skipped": "%s is not installed (apache2-utils)" % AB}
        out["base_master_cpu_pct"] = round(100.0 * base, 2)
    finally:
        d.stop()
    return out


# ----------------------------------------------------------------------------
# 9. Scale: the count of checks grows, the rate does not
# ----------------------------------------------------------------------------
# Every check its own host (h0, h1, ...): the worst case for anything that walks
# every host or every check.  The state db is seeded with every host but h0 up, so
# the steady state has no transition; h0's first report is one, and its time in
# --history is the first check's result at the master (the start-up figure).

SEED = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("hadaemon_seeded", sys.argv[1])
ha = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ha)
ha.ensure_state_dir(sys.argv[2])
store = ha.Store(sys.argv[2])
store.open()
now = time.time()
store.commit({"host:h%d" % i: {"state": "up", "since": now, "pending": None, "count": 0}
              for i in range(1, int(sys.argv[3]))})
store.close()
"""


def scale_config(nchecks, interval, workers):
    lines = ["[daemon]", "workers = %d" % workers, "timeout = 5s", "interval = %s" % interval, ""]
    for i in range(nchecks):
        lines += ["[local]", "host = h%d" % i, "check_trivial %d" % i, ""]
    return "\n".join(lines)


def scale_run(tmp, nchecks, workers, window, quick, launcher=()):
    """``nchecks`` at SCALE_RATE checks/s: start, reload to the rate, one interval, the window."""
    interval = nchecks / float(SCALE_RATE)
    # Start with every check spread over a year: only h0's runs at once (start-up);
    # then the reload to the rate spreads them all afresh over their interval, with
    # the workers already connected, so the lag samples hold no start-up.
    d = Hadaemon(os.path.join(tmp, "scale-%d" % nchecks), scale_config(nchecks, "8760h", workers),
                 launcher=launcher)
    d.script("checks/check_trivial", TRIVIAL_CHECK)
    subprocess.run([sys.executable, "-c", SEED, HADAEMON, d.state, str(nchecks)], check=True)
    out = {"checks": nchecks, "hosts": nchecks, "interval_s": interval, "workers": workers}
    try:
        d.start(wait_workers=False)
        first = wait_for(lambda: d.history(1), 30, "the first check's transition", 0.01)[0]
        out["ready_s"] = round(d.ready_time - d.exec_time, 3)
        out["start_s"] = round(first["time"] - d.exec_time, 3)
        write_file(os.path.join(d.conf, "checks.conf"), scale_config(nchecks, "%gms" % (interval * 1000),
                                                                     workers))
        t_reload = time.monotonic()
        answer = d.request({"cmd": "reload"}, timeout=60)
        out["reload_rescheduled_s"] = round(time.monotonic() - t_reload, 3)
        if not answer.get("ok"):
            raise RuntimeError("reload refused: %s" % answer)
        # One whole interval first: every check has run, the daemon holds every last
        # result.  No request to the daemon from here to the end of the window: the
        # lag samples (all since the reload) are the daemon's own.
        time.sleep(min(interval, 2.0) if quick else interval)
        kids = children_of(d.proc.pid)          # the workers and the waiting action run
        c0, t0 = cpu_snapshot(d.proc.pid, kids), time.monotonic()
        time.sleep(window)
        c1, t1 = cpu_snapshot(d.proc.pid, kids), time.monotonic()
        rss, pss = proc_memory(d.proc.pid)
        t2 = time.monotonic()
        st1 = d.request({"cmd": "status"}, timeout=60)
        out["status_ms"] = ms(time.monotonic() - t2)
        out["status_json_kb"] = round(len(json.dumps(st1)) / 1024.0, 1)
        lag = st1["daemon"]["lag_ms"]
        runs, skipped = runs_total(st1)
        runs -= 1                               # h0's run at the start
        since_reload = t2 - t_reload
        # An unchanged reload under load: how long it takes, and what it does to the lag.
        t2 = time.monotonic()
        answer = d.request({"cmd": "reload"}, timeout=60)
        out["reload_s"] = round(time.monotonic() - t2, 3)
        time.sleep(1.0)
        out["lag_max_with_reload_ms"] = d.status()["daemon"]["lag_ms"]["max"]
        took, done = d.cli("--status")
        out["status_cli_s"] = round(took, 3)
        out["status_lines"] = len(done.stdout.splitlines())
        if done.returncode != 0:
            out["status_cli_error"] = (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]
    finally:
        d.stop()
    took, done = d.cli("--check-config")
    out["check_config_s"] = round(took, 3) if done.returncode == 0 else None
    elapsed = t1 - t0
    cpu = {k: c1[k] - c0[k] for k in c0}
    out.update({"window_s": round(elapsed, 1), "runs": runs, "skipped": skipped,
                "achieved_per_s": round(runs / since_reload, 1),
                "lag_p50_ms": lag["p50"], "lag_p99_ms": lag["p99"], "lag_max_ms": lag["max"],
                "lag_samples": lag["samples"],
                "cpu_pct": {k: round(100.0 * v / elapsed, 2) for k, v in cpu.items()},
                "master_cpu_per_check_ms": ms(cpu["master"] / (elapsed * SCALE_RATE)),
                "master_rss_mb": round(rss, 1), "master_pss_mb": round(pss, 1) if pss else None})
    return out


def section_scale(tmp, quick, workers, window=None, launcher=()):
    window = window or (4.0 if quick else 45.0)
    return [scale_run(tmp, n, workers, window, quick, launcher) for n in SCALE[quick]]


# ----------------------------------------------------------------------------
# 10. Notifications on and off (docs/notify.md)
# ----------------------------------------------------------------------------
# Section 4's flag check and action, flipped every second under 200 checks/s; the
# receiver stamps each event as it gets it.

NOTIFY_RECEIVER = """#!/bin/bash
IFS= read -r event
printf '%s %s\\n' "$EPOCHREALTIME" "$event" >> {world}/events.log
"""


def notify_config(notify, workers, interval="1s"):
    lines = ["[daemon]", "workers = %d" % workers, "timeout = 5s"]
    lines += ["notify = receive"] if notify else []
    lines += ["", "[local]", "interval = %s" % interval] + ["check_trivial %d" % i for i in range(190)]
    lines += ["", "[local]", "interval = 100ms", "host = role", "check_flag"]
    return "\n".join(lines) + "\n"


def notify_run(tmp, notify, window, workers, launcher=()):
    # Started slow and reloaded to the rate, as in section 3: the lag is the steady state's.
    d = Hadaemon(os.path.join(tmp, "notify-%s" % ("on" if notify else "off")),
                 notify_config(notify, workers, "60s"), "[any_to_any]\nreact\n", launcher=launcher)
    d.script("checks/check_trivial", TRIVIAL_CHECK)
    d.script("checks/check_flag", FLAG_CHECK.format(world=d.world))
    d.script("actions/react", REACT_ACTION.format(world=d.world))
    d.script("actions/receive", NOTIFY_RECEIVER.format(world=d.world))
    flip(os.path.join(d.world, "role"), "up")
    actions = os.path.join(d.world, "actions.log")
    try:
        d.start()
        wait_for(lambda: read_lines(actions), 20, "the first action")
        write_file(os.path.join(d.conf, "checks.conf"), notify_config(notify, workers))
        if not d.request({"cmd": "reload"}).get("ok"):
            raise RuntimeError("reload refused")
        time.sleep(2.0)
        st0 = d.status()
        workers_now = {w["pid"] for w in st0["daemon"]["workers"]}
        others0 = set(children_of(d.proc.pid)) - workers_now
        m0, t0, wall0 = proc_cpu(d.proc.pid), time.monotonic(), time.time()
        o0 = {pid: sum(proc_times(pid)) for pid in others0}
        state, n = "up", 0
        while time.monotonic() - t0 < window:
            time.sleep(max(0.0, t0 + n + 1 - time.monotonic()))     # a flip every second
            state = "down" if state == "up" else "up"
            flip(os.path.join(d.world, "role"), state)
            n += 1
        def settled():
            doc = d.status()
            return doc["hosts"]["role"]["state"] == state and not doc["daemon"]["queue"] \
                and doc["daemon"]["action_pid"] is None
        wait_for(settled, 60, "the last flip's action")
        m1, t1 = proc_cpu(d.proc.pid), time.monotonic()
        lasting = others0 & set(children_of(d.proc.pid))       # the notify child (the spare action run changes)
        other_cpu = sum(sum(proc_times(pid)) - o0[pid] for pid in lasting)
        st1 = d.status()
        history = d.history(n + 20)
        if notify:
            wait_for(lambda: d.status()["daemon"]["counters"]["notify_waiting"] == 0, 20,
                     "every event delivered")
    finally:
        d.stop()
    action_start = {int(rec[1]): float(rec[0]) for rec in read_lines(actions)}
    reaction = [action_start[tr["run"]["id"]] - tr["time"] for tr in history
                if tr.get("run") and tr["run"]["id"] in action_start and tr["time"] >= wall0]
    runs0, _ = runs_total(st0)
    runs1, _ = runs_total(st1)
    out = {"notify": notify, "flips": n, "transitions": len(reaction), "window_s": round(t1 - t0, 2),
           "checks_per_s": round((runs1 - runs0) / (t1 - t0), 1),
           "master_cpu_pct": round(100.0 * (m1 - m0) / (t1 - t0), 2),
           "result_to_action": summarize(reaction), "lag_p99_ms": st1["daemon"]["lag_ms"]["p99"]}
    if notify:
        delivered = []
        for rec in read_lines(os.path.join(d.world, "events.log")):
            event = json.loads(" ".join(rec[1:]))
            delivered.append(float(rec[0]) - event["time"])
        counted = {c["result"]: c["count"] for c in st1["daemon"]["counters"]["notify_events"]}
        out.update(events=len(delivered), event_to_receiver=summarize(delivered),
                   notify_child_cpu_pct=round(100.0 * other_cpu / (t1 - t0), 2),
                   failed=counted.get("failed"), dropped=counted.get("dropped"))
    return out


def section_notify(tmp, quick, workers, launcher=()):
    window = 5.0 if quick else 30.0
    return {"off": notify_run(tmp, False, window, workers, launcher),
            "on": notify_run(tmp, True, window, workers, launcher)}


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------

def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def derive(result):
    """The headline figures, the ratios and which targets are met."""
    out = {}
    limit = result.get("limit")
    rates = {r["rate"]: r for r in result.get("throughput", [])}
    if limit and rates:
        spawn = limit["spawn"]["cpu_ms"]
        paced = {p["rate"]: p["cpu_ms"] for p in limit.get("spawn_paced", [])}
        for r in rates.values():
            r["ratio_to_spawn"] = ratio(r["cpu_per_check_ms"], spawn)
            r["ratio_to_paced_spawn"] = ratio(r["cpu_per_check_ms"], paced.get(r["rate"]))
        head = rates.get(500) or rates[max(rates)]
        out["overhead"] = {"rate": head["rate"], "cpu_per_check_ms": head["cpu_per_check_ms"],
                           "split_ms": head["cpu_per_check_split_ms"], "spawn_cpu_ms": spawn,
                           "ratio": head["ratio_to_spawn"],
                           "ratio_to_paced_spawn": head["ratio_to_paced_spawn"],
                           "met": head["ratio_to_spawn"] is not None
                           and head["ratio_to_spawn"] <= TARGETS["overhead_ratio"]}
    if rates:
        for r in rates.values():
            r["sustained"] = (r["lag_p99_ms"] is not None and r["lag_p99_ms"] <= TARGETS["lag_p99_ms"]
                              and r["achieved_per_s"] >= 0.97 * r["rate"] and r["skipped"] == 0)
        ok = [r["rate"] for r in rates.values() if r["sustained"]]
        out["throughput"] = {"highest_sustained": max(ok) if ok else None,
                             "met": TARGETS["lag_rate"] in rates and rates[TARGETS["lag_rate"]]["sustained"]}
    reaction = result.get("reaction")
    if reaction:
        p99 = reaction["result_to_action"]["p99_ms"]
        out["reaction"] = {"p99_ms": p99, "met": p99 is not None and p99 <= TARGETS["reaction_p99_ms"]}
    idle = result.get("idle")
    if idle:
        out["idle"] = {"master_cpu_pct": idle["cpu_pct"]["master"], "rss_total_mb": idle["rss_total_mb"],
                       "met_cpu": idle["cpu_pct"]["master"] < TARGETS["idle_master_cpu_pct"],
                       "met_rss": idle["rss_total_mb"] <= TARGETS["idle_rss_mb"]}
    http = result.get("http")
    if http:
        worst = max(http["status"]["p99_ms"], http["host"]["p99_ms"])
        out["http"] = {"p99_ms": worst, "met": worst <= TARGETS["http_p99_ms"],
                       "lag_met": http["lag_p99_ms"] is not None and http["lag_p99_ms"] <= TARGETS["lag_p99_ms"]}
    scale = result.get("scale")
    if scale:
        small, big = scale[0], scale[-1]
        lag_vs = ratio(big["lag_p99_ms"], small["lag_p99_ms"])
        cpu_vs = ratio(big["cpu_pct"]["master"], small["cpu_pct"]["master"])
        slowest = max(scale, key=lambda r: r["checks"])
        out["scale"] = {
            "checks": big["checks"], "lag_p99_ms": big["lag_p99_ms"], "lag_p99_vs_smallest": lag_vs,
            "master_cpu_vs_smallest": cpu_vs,
            "met_lag": big["lag_p99_ms"] is not None and big["lag_p99_ms"] <= TARGETS["scale_lag_p99_ms"]
            and lag_vs is not None and lag_vs <= TARGETS["scale_lag_vs_small"],
            "met_cpu": cpu_vs is not None and cpu_vs <= TARGETS["scale_cpu_vs_small"],
            "met_start": slowest["start_s"] <= TARGETS["scale_start_s"],
            "met_reload": max(slowest["reload_s"], slowest["reload_rescheduled_s"]) <= TARGETS["scale_reload_s"],
            "met_check_config": slowest["check_config_s"] is not None
            and slowest["check_config_s"] <= TARGETS["scale_check_config_s"]}
    if idle:
        out["idle"]["met_pss"] = idle["pss_total_mb"] <= TARGETS["idle_pss_mb"]
    monit = result.get("monit")
    if monit and "skipped" not in monit:
        ha_cpu = (rates.get(100) or {}).get("cpu_per_check_ms")
        out["vs_monit"] = {
            "check_exit_to_action_p50": ratio(reaction and reaction["check_exit_to_action"]["p50_ms"],
                                              monit["reaction"]["check_exit_to_action"]["p50_ms"]),
            "flip_to_action_p50": ratio(reaction and reaction["flip_to_action"]["p50_ms"],
                                        monit["reaction"]["flip_to_action"]["p50_ms"]),
            "cpu_per_check_at_100_per_s": ratio(ha_cpu, monit["cpu"]["cpu_per_check_ms"])}
    return out


def fmt(value, width=9):
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "NO"
    elif isinstance(value, float):
        text = "%.3f" % value if abs(value) < 10 else "%.1f" % value
    else:
        text = str(value)
    return text.rjust(width)


def render(result):
    meta = result["meta"]
    lines = []
    add = lines.append

    def load(name):
        info = result.get("load", {}).get(name)
        if info:
            add("   [%.0f s; load average %.2f -> %.2f; machine CPU busy %.0f%%]" % (
                info["seconds"], info["loadavg_start"][0], info["loadavg_end"][0],
                info["machine_busy_pct"]))
    add("hadaemon bench  %s  %s  %d cpus  python %s  %s" % (
        meta["date"], meta["host"], meta["cpus"], meta["python"], "quick" if meta["quick"] else "full"))
    add("load average at start %s, at end %s   workers (throughput) = %d" % (
        " ".join("%.2f" % x for x in meta["loadavg_start"]),
        " ".join("%.2f" % x for x in meta.get("loadavg_end", [])), meta["workers"]))
    d = result.get("derived", {})
    limit = result.get("limit")
    if limit:
        add("")
        add("1. limit of this machine              wall        CPU")
        add("   posix_spawn+waitpid (stdout null) %s ms %s ms" % (fmt(limit["spawn"]["wall_ms"]),
                                                               fmt(limit["spawn"]["cpu_ms"])))
        add("   same, stdout piped, own session   %s ms %s ms" % (fmt(limit["spawn_pipe"]["wall_ms"]),
                                                               fmt(limit["spawn_pipe"]["cpu_ms"])))
        add("   JSON round trip over AF_UNIX      %s us %s us  (%d-byte job)" % (
            fmt(limit["json_rtt"]["wall_us"]), fmt(limit["json_rtt"]["cpu_us"]), limit["json_rtt"]["bytes"]))
        add("   same, paced at N/s (CPU only)     %s" % ", ".join(
            "%d/s %.3f ms" % (p["rate"], p["cpu_ms"]) for p in limit["spawn_paced"]))
        f = limit.get("shape_floor")
        if f:
            add("   the shape's floor at %d/s: master %s + worker %s + check %s = %s ms CPU per check"
                " (a bare master and worker, JSON over AF_UNIX, nothing else)" % (
                    f["rate"], fmt(f["master_ms"], 0), fmt(f["worker_ms"], 0), fmt(f["check_ms"], 0),
                    fmt(f["cpu_ms"], 0)))
        a = limit["action_start"]
        add("   spawn -> the bash action's clock  %s ms p50, %s ms p99" % (fmt(a["p50_ms"]), fmt(a["p99_ms"])))
        r = limit["rss_mb"]
        add("   RSS: python3 %.1f MB, python3 -S %.1f MB, python3 + import hadaemon %.1f MB" % (
            r["python3"], r["python3_S"], r["hadaemon_imported"]))
        load("limit")
    if "overhead" in d:
        o = d["overhead"]
        add("")
        add("2. per-check overhead at %d checks/s: %.3f ms CPU per check (master %.3f + workers %.3f"
            " + check %.3f)" % (o["rate"], o["cpu_per_check_ms"], o["split_ms"]["master"],
                                o["split_ms"]["workers"], o["split_ms"]["checks"]))
        add("   = %.2fx the bare spawn (target <= %.1fx: %s); %s the same spawn paced at %d/s" % (
            o["ratio"], TARGETS["overhead_ratio"], "met" if o["met"] else "NOT met",
            "%.2fx" % o["ratio_to_paced_spawn"] if o["ratio_to_paced_spawn"] else "-", o["rate"]))
    if result.get("throughput"):
        add("")
        add("3. throughput and schedule lag (100 checks; lag = due -> handed to a worker)")
        add("   %s" % "".join(h.rjust(9) for h in ("rate/s", "achieved", "skipped", "lag p50",
                                                    "lag p99", "lag max", "CPU/chk", "x spawn",
                                                    "x paced", "master%", "ok")))
        for r in result["throughput"]:
            add("   %s" % "".join(fmt(v, 9) for v in (
                r["rate"], r["achieved_per_s"], r["skipped"], r["lag_p50_ms"], r["lag_p99_ms"],
                r["lag_max_ms"], r["cpu_per_check_ms"], r.get("ratio_to_spawn"),
                r.get("ratio_to_paced_spawn"), r["cpu_pct"]["master"], r.get("sustained"))))
        add("   (lag and CPU in ms; target: 500/s with p99 lag <= 20 ms: %s)" % (
            "met" if d.get("throughput", {}).get("met") else "NOT met"))
        load("throughput")
    reaction = result.get("reaction")
    if reaction:
        add("")
        add("4. reaction (interval 100ms, confirm 1, %d transitions)   p50 ms    p99 ms    max ms"
            % reaction["transitions"])
        for key, label in (("result_to_action", "result at master -> action starts"),
                           ("result_to_spawn", "  of which: -> command about to spawn"),
                           ("spawn_to_action", "  and: spawn -> the action's clock"),
                           ("check_exit_to_action", "check exits -> action starts"),
                           ("flip_to_action", "file flipped -> action starts")):
            s = reaction[key]
            add("   %-36s %s %s %s" % (label, fmt(s["p50_ms"]), fmt(s["p99_ms"]), fmt(s["max_ms"])))
        add("   (target: p99 result -> action <= %.0f ms: %s)" % (
            TARGETS["reaction_p99_ms"], "met" if d.get("reaction", {}).get("met") else "NOT met"))
        load("reaction")
    if result.get("versus"):
        add("")
        add("10. before (%s) / after (%s), in turn at 500 checks/s" % (BEFORE, HADAEMON))
        add("   %s" % "".join(h.rjust(9) for h in ("round", "side", "CPU/chk", "master", "workers",
                                                    "check", "x paced", "lag p99", "r->act50",
                                                    "r->act99", "r->spn99", "load")))
        paced = {p["rate"]: p["cpu_ms"] for p in (result.get("limit") or {}).get("spawn_paced", [])}
        none = {"p50_ms": None, "p99_ms": None}
        for r in result["versus"]:
            rate, split, react = r["rate"], r["rate"]["cpu_per_check_split_ms"], r["reaction"]
            if "error" in react:
                react = {"result_to_action": none, "result_to_spawn": none}
            add("   %s" % "".join(fmt(v, 9) for v in (
                r["round"], r["side"], rate["cpu_per_check_ms"], split["master"], split["workers"],
                split["checks"], ratio(rate["cpu_per_check_ms"], r.get("floor_ms") or paced.get(500)),
                rate["lag_p99_ms"],
                react["result_to_action"]["p50_ms"], react["result_to_action"]["p99_ms"],
                react["result_to_spawn"]["p99_ms"], r["loadavg"][0])))
        floors = [r.get("floor_ms") for r in result["versus"]]
        add("   (CPU in ms per check; x paced: against the bare spawn paced at 500/s just before the side"
            " (%s ms; section 1's when none);" % ", ".join(
                "%.3f" % floor if floor else "-" for floor in floors))
        add("   r->act: result at the master -> the action's clock, r->spn: -> its command about to"
            " spawn, ms, with 500 checks/s beside; load: the load average after the round)")
        load("versus")
    idle = result.get("idle")
    if idle:
        add("")
        add("5. idle: %d checks every %ds, %.0f s window" % (idle["checks"], idle["interval_s"],
                                                            idle["window_s"]))
        add("   CPU %%: master %.3f, its children (workers, waiting action run) %.3f, checks %.3f" % (
            idle["cpu_pct"]["master"], idle["cpu_pct"]["workers"], idle["cpu_pct"]["checks"]))
        add("   RSS MB: %s; total %.1f (PSS total %.1f; RSS total under python3 -S %.1f)" % (
            ", ".join("%s %.1f" % kv for kv in idle["rss_mb"].items()), idle["rss_total_mb"],
            idle["pss_total_mb"], idle["rss_total_no_site_mb"]))
        add("   PSS MB: %s" % ", ".join("%s %.1f" % kv for kv in idle["pss_mb"].items()))
        add("   (targets: master < %.1f%% CPU: %s; total RSS <= %.0f MB: %s; total PSS <= 24 MiB: %s)" % (
            TARGETS["idle_master_cpu_pct"], "met" if d["idle"]["met_cpu"] else "NOT met",
            TARGETS["idle_rss_mb"], "met" if d["idle"]["met_rss"] else "NOT met",
            "met" if d["idle"]["met_pss"] else "NOT met"))
        load("idle")
    monit = result.get("monit")
    if monit:
        add("")
        if "skipped" in monit:
            add("6. beside Monit: skipped (%s)" % monit["skipped"])
        else:
            mr, mc = monit["reaction"], monit["cpu"]
            vs = d.get("vs_monit", {})
            ha_cpu = next((r for r in result.get("throughput", []) if r["rate"] == 100), {})
            add("6. beside Monit %s (set daemon 1; check program, if status != 0 then exec)" % monit["version"])
            add("                                  hadaemon      Monit   hadaemon/Monit")
            add("   check exits -> action p50 ms %s %s %s" % (
                fmt(reaction and reaction["check_exit_to_action"]["p50_ms"], 10),
                fmt(mr["check_exit_to_action"]["p50_ms"], 10), fmt(vs.get("check_exit_to_action_p50"), 10)))
            add("   file flip -> action p50 ms   %s %s %s  (interval 100ms vs cycle 1s)" % (
                fmt(reaction and reaction["flip_to_action"]["p50_ms"], 10),
                fmt(mr["flip_to_action"]["p50_ms"], 10), fmt(vs.get("flip_to_action_p50"), 10)))
            add("   CPU per check ms, ~100/s     %s %s %s" % (
                fmt(ha_cpu.get("cpu_per_check_ms"), 10), fmt(mc["cpu_per_check_ms"], 10),
                fmt(vs.get("cpu_per_check_at_100_per_s"), 10)))
            add("   (Monit: %d transitions; %d checks x %d cycles in %.1f s, RSS %.1f MB)" % (
                mr["transitions"], mc["checks"], mc["cycles"], mc["window_s"], mc["rss_mb"]))
            load("monit")
    cluster = result.get("cluster")
    if cluster:
        add("")
        if "skipped" in cluster:
            add("7. cluster: skipped (%s)" % cluster["skipped"])
        else:
            f, st = cluster["failover"], cluster["steady"]
            add("7. cluster: 3 daemons on a 3-member etcd, quorum %d, ttl %ds, interval %dms   p50 ms"
                "    p99 ms    max ms" % (cluster["quorum"], cluster["ttl_s"], cluster["interval_ms"]))
            flips = cluster["flips"]
            for s, label in ((f["kill_to_action"], "leader kill -9 -> new leader's action"),
                             (f["kill_to_leader_status"], "  (-> new leader in --status)"),
                             (flips["flip_to_action"], "file flipped -> action (agreement)"),
                             (flips["flip_to_transition"], "  of which: seen, agreed, accepted"),
                             (flips["transition_to_action"], "  and: in etcd, handed, started")):
                add("   %-38s %s %s %s" % (label, fmt(s["p50_ms"]), fmt(s["p99_ms"]), fmt(s["max_ms"])))
            add("   (%d kills; the world flipped at each kill; section 4's flip -> action: %s ms)" % (
                f["kills"], fmt(reaction and reaction["flip_to_action"]["p50_ms"], 1).strip()))
            add("   steady, %d checks/s in all: %.2f etcd requests/s from %d members (keep-alives at "
                "ttl/4: %.1f/s); etcd's own writes %s/s" % (
                    st["checks_per_s"], st["requests_per_s"], st["members"], st["keepalives_expected_per_s"],
                    fmt(st["etcd_writes_per_s"], 1).strip()))
            add("   the cluster agent (one per member): %.3f %% CPU, RSS %.1f MB, PSS %s MB" % (
                st["agent_cpu_pct"], st["agent_rss_mb"], fmt(st["agent_pss_mb"], 1).strip()))
            load("cluster")
    http = result.get("http")
    if http:
        h = d["http"]
        add("")
        add("8. http: %d hosts, %d checks at %d/s, %d workers          p50 ms    p99 ms    max ms"
            % (http["hosts"], http["checks"], http["rate"], http["workers"]))
        for key, label in (("status", "GET /status (%d bytes), kept alive" % http["status_bytes"]),
                           ("host", "GET /hosts/db1/master, kept alive"),
                           ("host_new_connection", "  the same, a new connection each")):
            s = http[key]
            add("   %-44s %s %s %s" % (label, fmt(s["p50_ms"]), fmt(s["p99_ms"]), fmt(s["max_ms"])))
        add("   meanwhile: %.1f checks/s, schedule lag p50 %s ms, p99 %s ms; master CPU %.3f ms per request"
            % (http["checks_per_s_meanwhile"], fmt(http["lag_p50_ms"], 0), fmt(http["lag_p99_ms"], 0),
               http["cpu_per_request_ms"]))
        ab = http["ab_metrics"]
        if "skipped" in ab:
            add("   ab: skipped (%s)" % ab["skipped"])
        else:
            add("   ab -c 20 -n %d /metrics: %.0f requests/s, %d failed, mean %.2f ms; master CPU %.3f ms"
                " per request" % (ab["requests"], ab["per_s"], ab["failed"], ab["mean_ms"],
                                  ab["cpu_per_request_ms"]))
            add("   schedule lag over the last 10000 dispatches, ab's included: p50 %s ms, p99 %s ms"
                % (fmt(ab["lag_p50_ms"], 0), fmt(ab["lag_p99_ms"], 0)))
        add("   (targets: p99 <= %.0f ms: %s; schedule lag p99 <= %.0f ms meanwhile: %s)" % (
            TARGETS["http_p99_ms"], "met" if h["met"] else "NOT met", TARGETS["lag_p99_ms"],
            "met" if h["lag_met"] else "NOT met"))
        load("http")
    scale = result.get("scale")
    if scale:
        add("")
        add("9. scale: the same %d checks/s spread over more checks (one host each, %d workers)"
            % (SCALE_RATE, scale[0]["workers"]))
        add("   %s" % "".join(h.rjust(9) for h in ("checks", "interval", "lag p50", "lag p99", "lag max",
                                                    "master%", "ms/chk", "RSS MB", "PSS MB", "rate/s")))
        for r in scale:
            add("   %s" % "".join(fmt(v, 9) for v in (
                r["checks"], "%gs" % r["interval_s"], r["lag_p50_ms"], r["lag_p99_ms"], r["lag_max_ms"],
                r["cpu_pct"]["master"], r["master_cpu_per_check_ms"], r["master_rss_mb"], r["master_pss_mb"],
                r["achieved_per_s"])))
        add("   %s" % "".join(h.rjust(9) for h in ("checks", "start", "reload", "resched", "lag max",
                                                    "status", "JSON", "-t", "--status", "lines")))
        add("   %s" % "".join(h.rjust(9) for h in ("", "s", "s", "s", "w/reload", "ms", "KB", "s", "s", "")))
        for r in scale:
            add("   %s" % "".join(fmt(v, 9) for v in (
                r["checks"], r["start_s"], r["reload_s"], r["reload_rescheduled_s"], r["lag_max_with_reload_ms"],
                r["status_ms"], r["status_json_kb"], r["check_config_s"], r["status_cli_s"], r["status_lines"])))
        s = d.get("scale", {})
        add("   (start: exec -> the first check's result at the master; reload: unchanged config under"
            " load; resched: the reload to the rate, every check rescheduled)")
        add("   (targets at %d checks: lag p99 <= %.0f ms and <= %.0fx the smallest run: %s; master CPU"
            " <= %.1fx: %s;" % (s.get("checks", 0), TARGETS["scale_lag_p99_ms"], TARGETS["scale_lag_vs_small"],
                                "met" if s.get("met_lag") else "NOT met (%sx)" % s.get("lag_p99_vs_smallest"),
                                TARGETS["scale_cpu_vs_small"],
                                "met" if s.get("met_cpu") else "NOT met (%sx)" % s.get("master_cpu_vs_smallest")))
        add("    start, reload, --check-config each < 2 s: %s, %s, %s)" % tuple(
            "met" if s.get(k) else "NOT met" for k in ("met_start", "met_reload", "met_check_config")))
        idle = result.get("idle")
        if idle:
            add("   footprint at rest (section 5): PSS %.1f MB, RSS %.1f MB in %d processes" % (
                idle["pss_total_mb"], idle["rss_total_mb"], idle["processes"]))
        load("scale")
    notify = result.get("notify")
    if notify:
        off, on = notify["off"], notify["on"]
        add("")
        add("10. notify: %.0f checks/s, a flip (transition and run) every second, %d flips each   "
            "off       on" % (on["checks_per_s"], on["flips"]))
        add("   transitions acted on                      %s %s" % (fmt(off["transitions"]), fmt(on["transitions"])))
        add("   master CPU %%                              %s %s" % (fmt(off["master_cpu_pct"]),
                                                                   fmt(on["master_cpu_pct"])))
        for key, label in (("p50_ms", "result -> action p50 ms"), ("p99_ms", "result -> action p99 ms"),
                           ("max_ms", "result -> action max ms")):
            add("   %-41s %s %s" % (label, fmt(off["result_to_action"][key]), fmt(on["result_to_action"][key])))
        add("   schedule lag p99 ms                       %s %s" % (fmt(off["lag_p99_ms"]), fmt(on["lag_p99_ms"])))
        add("   on: %d events, event -> receiver p50 %s ms, p99 %s ms; the notify child and its commands "
            "%.2f %% CPU; %s failed, %s dropped" % (
                on["events"], fmt(on["event_to_receiver"]["p50_ms"], 0).strip(),
                fmt(on["event_to_receiver"]["p99_ms"], 0).strip(), on["notify_child_cpu_pct"],
                on["failed"], on["dropped"]))
        load("notify")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~30 s smoke run (fewer, shorter runs)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--workers", type=int, default=4,
                   help="hadaemon workers for the throughput runs (default: %(default)s, two per core "
                        "here: a worker waits while its check runs)")
    p.add_argument("--only", metavar="LIST", help="comma-separated sections: %s" % ",".join(SECTIONS))
    p.add_argument("--profile", metavar="DIR",
                   help="run hadaemon under bench/profiled.py, cProfile stats into DIR")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--window", type=float, metavar="SECONDS",
                   help="measuring window of each scale run (default: 45, 4 with --quick)")
    p.add_argument("--scale-workers", type=int, default=4, metavar="N",
                   help="workers for the scale runs (default: %(default)s)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        p.error("unknown section(s): %s" % ", ".join(sorted(unknown)))
    launcher = ()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        launcher = (os.path.join(HERE, "profiled.py"), os.path.abspath(args.profile))
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
                       "cpus": os.cpu_count(), "python": platform.python_version(),
                       "quick": args.quick, "workers": args.workers, "loadavg_start": loadavg()}}
    tmp = tempfile.mkdtemp(prefix="hadaemon-bench-")
    started = time.monotonic()
    steps = (("limit", lambda: section_limit(tmp, args.quick)),
             ("throughput", lambda: section_throughput(tmp, args.quick, args.workers, launcher)),
             ("reaction", lambda: section_reaction(tmp, args.quick, 2, launcher)),
             ("idle", lambda: section_idle(tmp, args.quick, 2, launcher)),
             ("monit", lambda: section_monit(tmp, args.quick)),
             ("cluster", lambda: section_cluster(tmp, args.quick)),
             ("http", lambda: section_http(tmp, args.quick, args.workers, launcher)),
             ("scale", lambda: section_scale(tmp, args.quick, args.scale_workers, args.window, launcher)),
             ("notify", lambda: section_notify(tmp, args.quick, 2, launcher)),
             ("versus", lambda: section_versus(tmp, args.quick, args.workers, launcher)))
    result["load"] = {}
    try:
        for name, step in steps:
            if name not in only:
                continue
            load0, (busy0, total0), t0 = loadavg(), cpu_ticks(), time.monotonic()
            result[name] = step()
            busy1, total1 = cpu_ticks()
            # How busy the whole machine was meanwhile (us included): other load shows here.
            result["load"][name] = {"loadavg_start": load0, "loadavg_end": loadavg(),
                                    "machine_busy_pct": round(100.0 * (busy1 - busy0) / max(1, total1 - total0), 1),
                                    "seconds": round(time.monotonic() - t0, 1)}
    finally:
        kill_strays(tmp)
        if args.keep:
            print("temp dir kept: %s" % tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["meta"]["loadavg_end"] = loadavg()
    result["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    result["derived"] = derive(result)
    print(render(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Many checks on one daemon, and a small footprint (issue 14).

Functional, not timed: what the daemon does with thousands of checks and how it
keeps its processes small.  The figures (lag, CPU, memory, seconds) come from
bench/bench.py's scale and idle sections, or are printed here with figure().
"""

import os
import signal
import subprocess

from conftest import HADAEMON, alive, figure, wait_for


def cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return [word.decode() for word in f.read().split(b"\0")[:-1]]


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        return [int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS:")][0]


def test_the_daemon_drops_the_scripts_syntax_tree_and_keeps_its_python_flags(daemon):
    """Started as a script, the daemon execs python3 again (same pid, same flags, same
    arguments) to load hadaemon.py as a module: CPython would keep the script's syntax
    tree for as long as it runs, and every forked child with it."""
    d = daemon
    d.script("checks/check_up", "echo state=up\n")
    d.write("checks.conf", "[local]\ninterval = 200ms\nhost = db1\ncheck_up\n")
    d.write("actions.conf", "")
    argv = d.argv("--foreground")
    argv[1:1] = ["-S", "-X", "faulthandler"]
    with open(d.log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    d.started.append(proc.pid)
    d.wait_state("db1", "up", timeout=15)
    words = cmdline(proc.pid)
    boot = words.index("-c")
    flags = words[1:boot]             # -B too when PYTHONDONTWRITEBYTECODE is set
    assert "-S" in flags and "-X faulthandler" in " ".join(flags), words
    assert words[boot + 2] == str(HADAEMON) and words[boot + 3:] == argv[5:], words
    assert d.status()["daemon"]["pid"] == proc.pid              # the same process, exec'd in place
    workers = [w["pid"] for w in d.status()["daemon"]["workers"]]
    assert workers and all(cmdline(pid) == words for pid in workers)   # forked from the lean one
    figure("master RSS %.1f MB, a worker %.1f MB (python3 -S, one check)"
           % (rss_mb(proc.pid), rss_mb(workers[0])))
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "stopped" in d.log()


def test_a_daemon_started_with_start_runs_as_a_module_too(daemon):
    d = daemon
    d.script("checks/check_up", "echo state=up\n")
    d.write("checks.conf", "[local]\ninterval = 1s\nhost = db1\ncheck_up\n")
    d.write("actions.conf", "")
    started = d.cli("--start")
    assert started.returncode == 0, started.stderr
    pid = int((d.state / "hadaemon.pid").read_text())
    d.started.append(pid)
    words = cmdline(pid)
    boot = words.index("-c")
    assert words[boot + 2] == str(HADAEMON) and words[-1] == "--start", words
    d.wait_state("db1", "up")
    assert d.cli("--stop").returncode == 0
    wait_for(lambda: not alive(pid), what="the daemon to exit")

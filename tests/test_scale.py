"""Many checks on one daemon, and a small footprint (issue 14).

Functional, not timed: what the daemon does with thousands of checks and how it
keeps its processes small.  The figures (lag, CPU, memory, seconds) come from
bench/bench.py's scale and idle sections, or are printed here with figure().
"""

import dbm.dumb
import json
import os
import random
import signal
import socket
import subprocess
import time

import pytest

import hadaemon.base
import hadaemon.configfiles
import hadaemon.store
import hadaemon.children
import hadaemon.scheduler
import hadaemon.records
from conftest import HADAEMON, alive, figure, pids_in_group, wait_for


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
    d.script("checks/check_up", "env > \"%s/check.env\"\necho state=up\n" % d.world)
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
    # the file, then the arguments as typed: ps and pgrep -f see what the operator ran
    assert words[boot + 2] == str(HADAEMON) and words[boot + 3:] == argv[5:], words
    # The loader and the fd of its compiled code (marshalled, in a memory file) came in
    # the environment exec was given, and left it: a check never sees them.
    with open("/proc/%d/environ" % proc.pid, "rb") as f:
        given = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    assert int(given[b"HADAEMON_CODE_FD"]) > 2 and b"HADAEMON_LOADER" in given, sorted(given)
    wait_for(lambda: (d.world / "check.env").exists(), what="a check to dump its environment")
    assert "HADAEMON_" not in (d.world / "check.env").read_text()
    assert d.status()["daemon"]["pid"] == proc.pid              # the same process, exec'd in place
    workers = [w["pid"] for w in d.status()["daemon"]["workers"]]
    assert workers and all(cmdline(pid) == words for pid in workers)   # forked from the lean one
    for pid in [proc.pid] + workers:                             # the code's memory file is closed
        links = [os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)]
        assert not [link for link in links if "hadaemon-code" in link], (pid, links)
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


# ============================================================================
# Many checks: one db key each, a summary for people, reloads that keep what is known
# ============================================================================

def many_checks(d, n, interval="1s", down=(), workers=2, extra=""):
    """``n`` checks ``check_h I``, each reporting host hI: up, or down for I in ``down``."""
    d.script("checks/check_h", """
        echo "host=h$1"
        case " %s " in *" $1 "*) echo state=down ;; *) echo state=up ;; esac
    """ % " ".join(str(i) for i in down))
    d.write("checks.conf", "[daemon]\nworkers = %d\ninterval = %s\n%s\n[local]\n%s\n"
            % (workers, interval, extra, "\n".join("check_h %d" % i for i in range(1, n + 1))))
    d.write("actions.conf", "")


def ask_raw(d, text, answers, timeout=30):
    """Send ``text`` on one control connection; read ``answers`` lines back."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(d.state / "hadaemon.sock"))
        sock.sendall(text)
        buf = b""
        while buf.count(b"\n") < answers:
            data = sock.recv(1 << 20)
            if not data:
                break
            buf += data
        return [json.loads(line) for line in buf.splitlines()]
    finally:
        sock.close()


def test_the_state_db_keeps_one_key_per_check_and_host_and_dbm_reads_it(daemon):
    """Every check's last result and every host's last report is a key of its own, written
    only when it changed; a checkpoint appends to the index (.dir) instead of rewriting
    it; and the files stay a database the standard dbm.dumb opens."""
    d = daemon
    many_checks(d, 6, interval="200ms", down=(4,))
    d.start()
    wait_for(lambda: len(d.status()["hosts"]) == 6, what="six hosts reported")
    wait_for(lambda: (d.state / "state.db.dir").exists(), what="a checkpoint")
    index = (d.state / "state.db.dir").read_bytes()
    time.sleep(2 * hadaemon.base.CHECKPOINT_EVERY + 0.5)          # two more checkpoints
    later = (d.state / "state.db.dir").read_bytes()
    assert later.startswith(index) and len(later) > len(index), "the index was rewritten, not appended to"
    keys = {c["key"] for c in d.status()["checks"]}
    assert d.stop() == 0
    db = dbm.dumb.open(str(d.state / "state.db"), "r")
    try:
        values = {k.decode(): json.loads(db[k]) for k in db.keys()}
    finally:
        db.close()
    assert {"check:" + k for k in keys} <= set(values)
    assert {"report:h%d" % i for i in range(1, 7)} <= set(values)
    assert values["report:h4"]["state"] == "down" and values["host:h4"]["state"] == "down"
    assert values["check:local|check_h|check_h 4"]["reports"] == {"h4": "down"}
    assert "checks" not in values and "reports" not in values
    assert hadaemon.store.Store.read(str(d.state)) == {k: v for k, v in values.items() if k != "meta:checkpoint"}


def test_an_older_db_with_all_results_in_one_key_is_taken_over(daemon):
    """A state db of an earlier hadaemon holds every last result in one key (``checks``)
    and every last report in another (``reports``): --status reads them, and the daemon
    moves them to one key each."""
    d = daemon
    many_checks(d, 2, interval="1h")
    d.state.mkdir(mode=0o700)
    key = "local|check_h|check_h 2"
    last = {"time": 1.0e9, "duration": 0.01, "exit": 0, "signal": None, "reports": {"h2": "up"},
            "message": "from before", "attributes": {}, "rejected": []}
    store = hadaemon.store.Store(str(d.state))
    store.open()
    store.commit({"host:h2": {"state": "up", "since": 1.0e9, "pending": None, "count": 0},
                  "checks": {key: last}, "reports": {"h2": {"time": 1.0e9, "check": "check_h 2", "state": "up"}}})
    store.close()
    offline = json.loads(d.cli("--status", "--json").stdout)
    assert {c["key"]: c["last"] for c in offline["checks"]}[key]["message"] == "from before"
    assert offline["hosts"]["h2"]["last_report"]["time"] == 1.0e9
    d.start()
    assert d.stop() == 0
    data = hadaemon.store.Store.read(str(d.state))
    assert data["checks"] == {} and data["reports"] == {}
    assert data["check:" + key]["message"] == "from before"      # check_h 2 has not run yet (1h)
    assert data["report:h2"]["time"] == 1.0e9


def test_kill9_of_a_master_with_many_keys_leaves_a_db_that_opens_whole(daemon):
    """kill -9 at random moments of a master writing a check and a report key per result,
    100 a second: every restart finds the db whole (nothing moved aside, no value lost
    but soft ones of the last seconds), and every host it had accepted."""
    d = daemon
    many_checks(d, 100, interval="1s", down=range(1, 101, 10), workers=3)
    rng = random.Random(int(os.environ.get("HADAEMON_CRASH_SEED") or time.time()))
    accepted = set()
    for k in range(4):
        d.start()
        status = d.status()
        assert accepted <= {h for h, v in status["hosts"].items() if v["state"] in ("up", "down")}, k
        time.sleep(rng.uniform(0.5, 2.5))
        accepted = {h for h, v in d.status()["hosts"].items() if v["state"] in ("up", "down")}
        time.sleep(rng.uniform(0, 0.5))
        pid = d.proc.pid
        d.kill9()
        wait_for(lambda: not pids_in_group(pid), what="the killed master's children to go")
        d.started.remove(pid)
        d.proc = None
        data = hadaemon.store.Store.read(str(d.state))           # as the kill left it, before recovery
        assert {h for h in accepted if "host:" + h in data} == accepted, k
    d.start()
    wait_for(lambda: len(d.status()["hosts"]) == 100, timeout=20, what="a hundred hosts")
    assert d.stop() == 0
    assert "damaged" not in d.log() and not list(d.state.glob("*corrupt*")), d.tail()
    data = hadaemon.store.Store.read(str(d.state))
    assert len([k for k in data if k.startswith("check:")]) == 100
    assert sum(1 for k, v in data.items() if k.startswith("host:") and v["state"] == "down") == 10


def test_status_with_many_checks_lists_those_in_trouble_and_counts_the_rest(daemon):
    d = daemon
    many_checks(d, 60, interval="500ms", down=(20, 40, 60))
    d.start()
    wait_for(lambda: sum(1 for c in d.status()["checks"] if c["last"]) == 60, timeout=20,
             what="every check run once")
    doc = d.status()
    assert len(doc["checks"]) == 60 and len(doc["hosts"]) == 60      # --json: everything
    text = d.cli("--status").stdout
    lines = text.splitlines()
    assert "60 hosts: 57 up, 3 down; the 3 in trouble:" in lines, text
    assert "60 checks: 57 ok, 0 not run yet; the 3 in trouble:" in lines, text
    for i in (20, 40, 60):
        assert any(line.startswith("h%d " % i) for line in lines), text
        assert any(line.startswith("check_h %d " % i) for line in lines), text
    assert not any(line.startswith(("h1 ", "check_h 1 ")) for line in lines), text
    assert len(lines) < 40 and all(len(line) <= 80 for line in lines), text


def test_answers_come_in_order_on_one_connection_while_a_status_is_made_in_pieces(daemon):
    d = daemon
    many_checks(d, 500, interval="1h")
    d.start()
    answers = ask_raw(d, b'{"cmd": "status"}\n{"cmd": "ping"}\n{"cmd": "history", "n": 1}\n'
                         b'{"cmd": "status"}\n', 4)
    assert [sorted(a) for a in answers] == [
        ["checks", "daemon", "hosts", "runs", "transitions"], ["ok", "pid"], ["history", "ok"],
        ["checks", "daemon", "hosts", "runs", "transitions"]]
    assert len(answers[0]["checks"]) == 500 and answers[1]["pid"] == d.proc.pid


def test_a_reload_of_many_checks_keeps_what_is_known_and_reschedules_what_changed(daemon):
    d = daemon
    d.script("checks/check_up", "echo state=up\n")
    d.write("actions.conf", "")

    def write(b_interval):
        d.write("checks.conf", "[daemon]\nworkers = 2\n\n[local]\ninterval = 1h\nhost = a\n%s\n"
                "[local]\ninterval = %s\nhost = b\n%s\n"
                % ("\n".join("check_up a%d" % i for i in range(600)), b_interval,
                   "\n".join("check_up b%d" % i for i in range(600))))
    write("1h")
    d.start()
    wait_for(lambda: d.status()["hosts"].get("a", {}).get("state") == "up", what="host a up")
    before = {c["key"]: c for c in d.status()["checks"]}
    # SIGHUP and --reload at once: the one under way starts over, both are answered.
    d.signal(signal.SIGHUP)
    assert d.cli("--reload").returncode == 0
    after = {c["key"]: c for c in d.status()["checks"]}
    assert set(after) == set(before)
    assert all(after[k]["next_run"] == pytest.approx(before[k]["next_run"], abs=0.01)
               or after[k]["runs"] > before[k]["runs"] for k in before), "an unchanged check was rescheduled"
    assert all(after[k]["runs"] >= before[k]["runs"] for k in before)
    write("30m")
    assert d.cli("--reload").returncode == 0
    wait_for(lambda: "configuration reloaded: 1200 checks" in d.log(), what="the reload logged")
    now = time.time()
    changed = {c["key"]: c for c in d.status()["checks"]}
    a = [k for k in changed if "|a|" in k]
    b = sorted(changed[k]["next_run"] for k in changed if "|b|" in k)
    assert len(a) == 600 and all(changed[k]["next_run"] == pytest.approx(after[k]["next_run"], abs=0.01)
                                 for k in a if changed[k]["runs"] == after[k]["runs"])
    assert b[0] >= now - 5 and b[-1] <= now + 1800 and b[-1] - b[0] > 1500   # spread over 30 min
    assert d.status()["hosts"]["a"]["state"] == "up"


def test_the_scheduler_starts_a_check_added_back_as_a_new_one(tmp_path):
    """Pure: checks kept by a reload keep their place in the heap; a check removed and
    added back is new (its old heap entries never fire it); new ones wait in a batch
    and run spread over their interval."""
    conf = tmp_path / "conf"
    (conf / "checks").mkdir(parents=True)
    (conf / "checks" / "c").write_text("#!/bin/sh\necho state=up\n")
    (conf / "checks" / "c").chmod(0o755)
    (conf / "actions.conf").write_text("")

    def config(names):
        (conf / "checks.conf").write_text("[local]\ninterval = 10s\n%s\n" % "\n".join("c %s" % n for n in names))
        return hadaemon.configfiles.load_config(str(conf)).checks

    def run(sch, until, step=0.5, now=[0.0]):
        fired = []
        while now[0] < until:
            now[0] += step
            sch.fire_due(now[0])
            while sch.ready:
                job = sch.take(now[0], lambda host: "up", str(conf), str(tmp_path))
                fired.append((now[0], job.env["HA_CHECK"]))
                sch.finished(job.key, hadaemon.records.CheckResult.from_wire({"data": {}, "exit": 0}))
        return fired

    sch = hadaemon.scheduler.Scheduler()
    sch.configure(config(["x", "y", "z", "w"]), 0.0)
    first = run(sch, 9.5)
    assert sorted(name for _, name in first) == ["c w", "c x", "c y", "c z"]   # spread, once each
    assert len({t for t, _ in first}) == 4
    due = {rt.check.name: rt.next_due for rt in sch.runtimes.values()}
    sch.configure(config(["x", "y", "w"]), 9.5)            # z removed; the others keep their times
    assert {rt.check.name: rt.next_due for rt in sch.runtimes.values()} == \
        {name: t for name, t in due.items() if name != "c z"}
    assert [name for _, name in run(sch, 14.5)].count("c z") == 0
    sch.configure(config(["x", "y", "z", "w"]), 14.5)      # z back: new, its first run at once
    fired = run(sch, 44.5)
    per_check = {name: sum(1 for _, n in fired if n == name) for name in ("c x", "c y", "c z", "c w")}
    assert per_check == {"c x": 3, "c y": 3, "c z": 4, "c w": 3}, fired
    # Every 10 s from when it came back; its old entry (15.0, then 25.0) fires nothing.
    assert [t for t, n in fired if n == "c z"] == [15.0, 24.5, 34.5, 44.5], fired


def test_state_variables_from_the_index_are_the_variables_of_all_states():
    """Pure: what the ledger's index of hosts by state gives (made as asked) is what
    action_variables gives from every host's state."""
    rng = random.Random(7)
    for _ in range(200):
        states = {"h%d" % i: rng.choice(["master", "slave", "down", "up", "host", "a.b-c:d"])
                  for i in range(rng.randrange(0, 12))}
        host, frm, to = rng.choice(list(states) or ["h0"]), rng.choice(["slave", "any"]), "master"
        by_state = {}
        for h, st in states.items():
            by_state.setdefault(st, set()).add(h)
        lazy = hadaemon.children.StateVariables(host, frm, to, by_state)
        whole = hadaemon.children.action_variables(host, frm, to, states)
        for name in ("HOST", "FROM", "TO", "MASTER", "SLAVE", "DOWN", "UP", "A.B-C:D", "NONE"):
            assert lazy.get(name, "") == whole.get(name, ""), (name, states)
        for arg in ("%MASTER%,%SLAVE%", "%HOST% %TO%", "%A.B-C:D%", "%NONE%x", "%%"):
            assert hadaemon.children.expand_argument(arg, lazy) == hadaemon.children.expand_argument(arg, whole)

"""The engine end to end (issue 2): the real daemon in a temp dir, driven through check
scripts that read files the test flips.

Each test starts ``hadaemon.py --foreground`` with the ``daemon`` fixture and watches it
through ``--status --json``, the log, and files its check and action scripts write.
Every wait is bounded (``wait_for``); nothing asserts how long something took.
"""

import json
import os
import signal
import statistics
import subprocess
import sys

import pytest

import hadaemon.wire
from conftest import ROOT, alive, wait_for


@pytest.fixture
def daemon(daemon):
    """The conftest daemon, polled over its socket from this process: the request
    ``--status --json`` sends, without starting an interpreter per poll (the tests
    poll a lot, on a loaded 2-core machine).  ``d.start()`` still waits on the CLI."""
    daemon.status = lambda: hadaemon.wire.request(str(daemon.state), {"cmd": "status"})
    return daemon


# -- helpers ------------------------------------------------------------------------------

def configure(d, checks, actions=""):
    d.write("checks.conf", checks)
    d.write("actions.conf", actions)


def check_info(d, name, doc=None):
    """The --status entry of the check whose (normalised) line is ``name``."""
    doc = doc or d.status()
    for check in doc["checks"]:
        if check["name"] == name:
            return check
    raise AssertionError("no check %r in %s" % (name, [c["name"] for c in doc["checks"]]))


def check_runs(d, name):
    return check_info(d, name)["runs"]


def wait_check_runs(d, name, n, timeout=15):
    """Wait until check ``name`` has finished at least ``n`` runs; returns its status entry."""
    def enough():
        info = check_info(d, name)
        return info if info["runs"] >= n else None
    return wait_for(enough, timeout=timeout, what="%d runs of %s (log:\n%s)" % (n, name, d.tail()))


def transitions(d, doc=None):
    """(host, from, to) of every recorded transition, oldest first."""
    doc = doc or d.status()
    return [(t["host"], t["from"], t["to"]) for t in doc["transitions"][::-1]]


def run_by_id(d, run_id):
    for run in d.runs():
        if run["id"] == run_id:
            return run
    return None


def read_lines(path):
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def read_pids(path):
    return [int(p) for p in read_lines(path) if p.strip().isdigit()]


def seq_check(d):
    """checks/check_seq HOST: each run reports the next line of world/HOST.seq, and
    nothing at all (an empty ``states`` object) once the file is used up.  The test
    feeds a whole sequence, so the daemon sees exactly those reports in that order.
    Each run first appends a line to world/HOST.ticks."""
    d.script("checks/check_seq", """
        echo >> "%s/$1.ticks"
        f="%s/$1.seq"
        line=$(head -n 1 "$f" 2>/dev/null)
        if [ -n "$line" ]; then
            tail -n +2 "$f" > "$f.tmp" && mv "$f.tmp" "$f"
            echo "host=$1"
            echo "state=$line"
        else
            echo '{"states": {}}'
        fi
    """ % (d.world, d.world))


def feed(d, host, *states):
    """Queue reports for check_seq HOST and wait until the daemon has applied them all."""
    seq = d.world / (host + ".seq")
    empty = lambda: not seq.exists() or seq.stat().st_size == 0  # noqa: E731
    wait_for(empty, timeout=15, what="%s to be used up" % seq)
    tmp = d.world / (".%s.seq.tmp" % host)
    tmp.write_text("".join(s + "\n" for s in states))
    os.replace(tmp, seq)
    wait_for(empty, timeout=15, what="the check to read %s (log:\n%s)" % (seq, d.tail()))
    # The run that read the last line may not have reported yet, but a check never
    # overlaps itself: once the next run has started, that report has been applied.
    ticks = d.world / (host + ".ticks")
    started = len(read_lines(ticks))
    wait_for(lambda: len(read_lines(ticks)) > started, timeout=15, what="the next run of check_seq")


def stamp_script(d):
    """actions/stamp WORD: records ``RUN WORD start|end TIME`` around a short sleep."""
    d.script("actions/stamp", """
        echo "$HA_RUN_ID $1 start $(date +%%s.%%N)" >> "%s/stamps"
        sleep 0.3
        echo "$HA_RUN_ID $1 end $(date +%%s.%%N)" >> "%s/stamps"
    """ % (d.world, d.world))


# -- SPEC §4: confirm counts and flapping ---------------------------------------------------

def test_confirm_needs_reports_in_a_row_and_a_flap_never_transitions(daemon):
    d = daemon
    seq_check(d)
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        confirm = 3
        check_seq db1
    """, """
        [any_to_any]
        -true
    """)
    d.start()

    def after(*states):
        """Feed reports; return db1's (state, pending) and the transitions."""
        feed(d, "db1", *states)
        doc = d.status()
        host = doc["hosts"].get("db1", {})
        pend = host.get("pending")
        return host.get("state"), pend and (pend["state"], pend["count"]), transitions(d, doc)

    first = [("db1", "unknown", "slave")]
    both = first + [("db1", "slave", "master")]
    # The first state needs 3 reports too.
    assert after("slave", "slave") == ("unknown", ("slave", 2), [])
    assert after("slave") == ("slave", None, first)
    # Two reports of master, then slave again: the candidate is dropped.
    assert after("master") == ("slave", ("master", 1), first)
    assert after("master") == ("slave", ("master", 2), first)
    assert after("slave") == ("slave", None, first)
    # Counting starts again from one: two more masters are not enough, the third is.
    assert after("master", "master") == ("slave", ("master", 2), first)
    assert after("master") == ("master", None, both)
    # A flapping world: never three of a kind in a row, so never a transition.
    assert after("slave", "slave", "master", "slave", "down", "slave", "slave", "master",
                 "down", "down", "master", "slave", "slave", "down", "down", "slave",
                 "master") == ("master", None, both)
    assert "candidate slave dropped" in d.log()
    runs = d.wait_runs(2)
    assert [r["section"] for r in runs] == ["any_to_any", "any_to_any"]


# -- SPEC §4/§5: first reports, sections and their precedence ---------------------------------

def test_first_report_is_a_transition_from_unknown(daemon):
    d = daemon
    d.role_check()
    d.recorder()
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
        check_role db2
        check_role db3
    """, """
        [unknown_to_master]
        record unknown_to_master %HOST%

        [any_to_master]
        record any_to_master %HOST%

        [any_to_slave]
        record any_to_slave %HOST%
    """)
    d.set("db1", "master")
    d.set("db2", "slave")
    # db3 has no file: check_role reports it down, and no section matches unknown_to_down.
    d.start()
    d.wait_runs(2)
    doc = wait_for(lambda: (lambda doc: doc if len(doc["transitions"]) == 3 else None)(d.status()),
                   what="3 transitions")
    by_host = {t["host"]: t for t in doc["transitions"]}
    assert {h: (t["from"], t["to"]) for h, t in by_host.items()} == {
        "db1": ("unknown", "master"), "db2": ("unknown", "slave"), "db3": ("unknown", "down")}
    assert by_host["db3"]["run"] is None
    runs = {r["id"]: r for r in doc["runs"]}
    assert runs[by_host["db1"]["run"]]["section"] == "unknown_to_master"
    assert runs[by_host["db2"]["run"]]["section"] == "any_to_slave"
    assert all(r["state"] == "ok" for r in runs.values())
    assert sorted(line.split(" | ")[0] for line in d.actions_log()) == [
        "any_to_slave db2", "unknown_to_master db1"]
    assert "no action section matches" in d.log()


def test_most_specific_section_runs(daemon):
    d = daemon
    d.role_check()
    d.recorder()
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
        check_role db2
    """, """
        [db2: slave_to_master]
        record db2-exact

        [db2: any_to_master]
        record db2-any

        [slave_to_master]
        record exact

        [any_to_master]
        record any-to

        [slave_to_any]
        record from-any
    """)
    d.set("db1", "slave")
    d.set("db2", "slave")
    d.start()
    d.wait_state("db1", "slave")
    d.wait_state("db2", "slave")
    expected = []

    def flip(host, state, section):
        d.set(host, state)
        d.wait_state(host, state)
        if section:
            expected.append(section)
        runs = d.wait_runs(len(expected))
        assert [r["section"] for r in runs] == expected

    flip("db2", "master", "db2: slave_to_master")     # beats [db2: any_to_master], [slave_to_master]
    flip("db1", "master", "slave_to_master")          # beats [any_to_master], [slave_to_any]
    flip("db2", "down", None)                         # master_to_down: nothing matches
    flip("db2", "master", "db2: any_to_master")       # beats [any_to_master]
    flip("db1", "down", None)
    flip("db1", "master", "any_to_master")
    assert [line.split(" | ")[0] for line in d.actions_log()] == [
        "db2-exact", "exact", "db2-any", "any-to"]


# -- SPEC §5: expansion and the environment of a command ------------------------------------

def test_expansion_environment_and_empty_variable(daemon):
    d = daemon
    d.role_check()
    d.recorder()
    d.script("actions/envdump", """
        out="%s/env.$HA_RUN_ID"
        env | grep '^HA_' | sort > "$out"
        echo "cwd=$(pwd)" >> "$out"
        echo "stdin=$(readlink /proc/$$/fd/0)" >> "$out"
    """ % d.world)
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
        check_role db2
        check_role db3
    """, """
        [slave_to_master]
        record "masters=%MASTER%" slaves=%SLAVE% pct=100%% lit=%%MASTER%% %HOST%:%FROM%-%TO%
        envdump

        [any_to_down]
        record before
        record never %BACKUP%
    """)
    d.set("db1", "master")
    d.set("db2", "slave")
    d.set("db3", "slave")
    d.start()
    for host, state in (("db1", "master"), ("db2", "slave"), ("db3", "slave")):
        d.wait_state(host, state)
    d.set("db2", "master")
    run = d.wait_runs(1)[0]
    assert run["state"] == "ok", run
    assert run["commands"][0]["argv"][1:] == [
        "masters=db1,db2", "slaves=db3", "pct=100%", "lit=%MASTER%", "db2:slave-master"]
    assert d.actions_log() == [
        "masters=db1,db2 slaves=db3 pct=100% lit=%MASTER% db2:slave-master | slave_to_master db2 "
        "master=db1,db2 slave=db3 run=" + str(run["id"])]
    dump = dict(line.split("=", 1) for line in read_lines(d.world / ("env.%d" % run["id"])))
    assert dump == {
        "HA_HOST": "db2", "HA_FROM": "slave", "HA_TO": "master",
        "HA_TRANSITION": "slave_to_master", "HA_MASTER": "db1,db2", "HA_SLAVE": "db3",
        "HA_RUN_ID": str(run["id"]), "HA_CONFIG_DIR": str(d.dir), "HA_STATE_DIR": str(d.state),
        "cwd": str(d.dir), "stdin": "/dev/null"}

    # No host is "backup": the whole [any_to_down] sequence is refused, even its first command.
    d.set("db3", "down")
    d.wait_state("db3", "down")
    runs = d.wait_runs(2)
    refused = runs[-1]
    assert refused["section"] == "any_to_down"
    assert refused["state"] == "failed"
    assert "%BACKUP% is empty" in refused["reason"]
    assert refused["started"] is None
    assert all(c.get("result") is None for c in refused["commands"])
    assert len(d.actions_log()) == 1
    d.wait_log("%BACKUP% is empty")


# -- SPEC §5: serial runs, order, failures, timeouts ----------------------------------------

def parse_stamps(d):
    """[(run, word, start, end)] from world/stamps, in the order the commands started."""
    starts, spans = {}, []
    for line in read_lines(d.world / "stamps"):
        run, word, what, when = line.split()
        if what == "start":
            starts[(run, word)] = float(when)
        else:
            spans.append((int(run), word, starts.pop((run, word)), float(when)))
    assert not starts, "commands that never ended: %s" % starts
    return sorted(spans, key=lambda s: s[2])


def test_sequences_run_one_at_a_time_in_order(daemon):
    d = daemon
    d.role_check()
    stamp_script(d)
    d.script("actions/fail", 'echo "failing on purpose"; exit 1')
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
        check_role db2
    """, """
        [slave_to_master]
        stamp A
        stamp B
        -fail
        stamp C

        [master_to_slave]
        stamp X
        fail
        stamp Y
    """)
    d.set("db1", "slave")
    d.set("db2", "slave")
    d.start()
    d.wait_state("db1", "slave")
    d.wait_state("db2", "slave")
    d.set("db1", "master")
    d.set("db2", "master")
    # The second transition's sequence waits in the queue while the first runs.
    seen = wait_for(lambda: (lambda s: s if sorted(s) == ["queued", "running"] else None)(
        [r["state"] for r in d.runs()]), what="one run running and one queued")
    assert seen
    runs = d.wait_runs(2)
    assert [r["state"] for r in runs] == ["ok", "ok"]
    trs = {t["id"]: t for t in d.status()["transitions"]}
    # Runs are in transition order.
    assert [r["transition"] for r in runs] == sorted(r["transition"] for r in runs)
    assert [trs[r["transition"]]["run"] for r in runs] == [r["id"] for r in runs]
    # The ignored failure is recorded but did not stop the sequence.
    assert runs[0]["commands"][2]["ignore"] is True
    assert runs[0]["commands"][2]["result"]["error"] == "exit 1"
    assert "failing on purpose" in runs[0]["commands"][2]["result"]["output"]

    spans = parse_stamps(d)
    first, second = runs[0]["id"], runs[1]["id"]
    assert [(run, word) for run, word, _, _ in spans] == [
        (first, "A"), (first, "B"), (first, "C"), (second, "A"), (second, "B"), (second, "C")]
    for before, after in zip(spans, spans[1:]):
        assert after[2] >= before[3], "overlap: %s and %s" % (before, after)

    # A failing command without "-" stops the sequence: Y never runs.
    d.set("db1", "slave")
    run = d.wait_runs(3)[-1]
    assert run["section"] == "master_to_slave"
    assert run["state"] == "failed"
    assert "exit 1" in run["reason"] and "fail" in run["reason"]
    assert run["commands"][1]["result"]["error"] == "exit 1"
    assert run["commands"][2]["result"] is None
    words = [word for run_id, word, _, _ in parse_stamps(d) if run_id == run["id"]]
    assert words == ["X"]


def test_action_timeout_kills_the_process_group(daemon):
    d = daemon
    d.role_check()
    d.recorder()
    gc_file = d.world / "action_grandchild.pid"
    d.script("actions/hang", """
        (trap '' TERM; exec sleep 1000) &
        echo $! > "%s"
        sleep 1000
    """ % gc_file)
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
    """, """
        [any_to_down]
        timeout = 1s
        hang
        record after the hang
    """)
    d.start()
    run = d.wait_runs(1)[0]
    assert run["section"] == "any_to_down"
    assert run["state"] == "failed"
    assert "timed out after 1s" in run["reason"]
    assert run["commands"][0]["result"]["error"] == "timed out after 1s"
    assert run["commands"][1]["result"] is None
    assert d.actions_log() == []
    pid = read_pids(gc_file)[0]
    # The grandchild ignored SIGTERM; it is gone all the same.
    wait_for(lambda: not alive(pid), what="the action's grandchild %d to be killed" % pid)


# -- SPEC §2/§3: checks: timeouts, process groups, no overlap -------------------------------

def test_check_timeout_and_exit_kill_the_whole_process_group(daemon):
    d = daemon
    hang_pids = d.world / "hang.pids"
    fork_pids = d.world / "fork.pids"
    d.script("checks/check_hang", """
        (trap '' TERM; exec sleep 1000) &
        echo $! >> "%s"
        sleep 1000
    """ % hang_pids)
    d.script("checks/check_fork", """
        sleep 1000 &
        echo $! >> "%s"
        echo "host=forky"
        echo "state=up"
    """ % fork_pids)
    configure(d, """
        [daemon]
        workers = 2

        [local]
        host = hung
        interval = 300ms
        timeout = 1s
        check_hang

        [local]
        interval = 200ms
        check_fork
    """)
    d.start()
    info = wait_check_runs(d, "check_hang", 2)
    assert info["last"]["reports"] == {"hung": "unknown"}
    assert "timed out" in info["last"]["message"]
    assert info["skipped"] >= 1
    for pid in read_pids(hang_pids)[:2]:
        wait_for(lambda: not alive(pid), what="the hung check's grandchild %d to be killed" % pid)

    # A check that leaves a child holding its stdout reports at once and leaves nothing.
    d.wait_state("forky", "up")
    runs = check_runs(d, "check_fork")
    done = read_pids(fork_pids)[:runs]
    wait_check_runs(d, "check_fork", runs + 3)       # the worker is not blocked
    assert len(done) >= 1
    for pid in done:
        wait_for(lambda: not alive(pid), what="the check's grandchild %d to be killed" % pid)
    assert check_info(d, "check_fork")["last"]["reports"] == {"forky": "up"}


def test_a_check_never_overlaps_itself(daemon):
    d = daemon
    d.script("checks/check_slow", """
        mkdir "%(w)s/lock" 2>/dev/null || echo overlap >> "%(w)s/overlaps"
        echo run >> "%(w)s/slow.runs"
        sleep 0.6
        rmdir "%(w)s/lock"
        echo state=up
    """ % {"w": d.world})
    configure(d, """
        [daemon]
        workers = 3

        [local]
        interval = 200ms
        check_slow
    """)
    d.start()
    info = wait_check_runs(d, "check_slow", 3)
    assert info["skipped"] >= 2
    assert not (d.world / "overlaps").exists(), read_lines(d.world / "overlaps")
    assert d.host_state("check_slow") == "up"


# -- the worker pool --------------------------------------------------------------------------

def test_a_killed_worker_is_replaced_and_its_check_reported_unknown(daemon):
    d = daemon
    d.role_check()
    d.script("checks/check_stuck", """
        if [ -e "%(w)s/stuck" ]; then
            echo $PPID > "%(w)s/stuck.worker"
            echo $$ > "%(w)s/stuck.pid"
            sleep 1000
        fi
        echo state=up
    """ % {"w": d.world})
    configure(d, """
        [daemon]
        workers = 2

        [local]
        interval = 200ms
        check_role db1

        [local]
        host = stuck
        interval = 300ms
        timeout = 60s
        check_stuck
    """)
    d.set("db1", "master")
    d.start()
    d.wait_state("stuck", "up")
    d.wait_state("db1", "master")
    (d.world / "stuck").write_text("")
    wait_for(lambda: (d.world / "stuck.pid").exists() and read_pids(d.world / "stuck.pid"),
             what="the stuck check to start")
    worker = read_pids(d.world / "stuck.worker")[0]
    check_pid = read_pids(d.world / "stuck.pid")[0]
    before = [w["pid"] for w in d.status()["daemon"]["workers"]]
    assert worker in before and len(before) == 2
    os.remove(d.world / "stuck")
    os.kill(worker, signal.SIGKILL)

    def replaced():
        pids = [w["pid"] for w in d.status()["daemon"]["workers"]]
        return pids if len(pids) == 2 and worker not in pids else None
    after = wait_for(replaced, what="worker %d to be replaced (log:\n%s)" % (worker, d.tail()))
    assert set(after) & set(before) == set(before) - {worker}
    d.wait_log("worker %d died" % worker)
    # Its in-flight check was reported unknown, then the next run reports up again.
    wait_for(lambda: ("stuck", "up", "unknown") in transitions(d), what="stuck to go unknown")
    d.wait_state("stuck", "up")
    runs = check_runs(d, "check_role db1")
    wait_check_runs(d, "check_role db1", runs + 3)
    # The check the dead worker ran is not left behind.
    wait_for(lambda: not alive(check_pid), what="the orphaned check %d to be killed" % check_pid)


def test_checks_go_on_while_a_long_action_runs(daemon):
    d = daemon
    d.role_check()
    configure(d, """
        [daemon]
        interval = 200ms

        [local]
        check_role db1
    """, """
        [unknown_to_master]
        sleep 5
    """)
    d.set("db1", "master")
    d.start()
    run = wait_for(lambda: [r for r in d.runs() if r["state"] == "running"],
                   what="the action to start")[0]
    runs = check_runs(d, "check_role db1")
    wait_check_runs(d, "check_role db1", runs + 3)
    assert run_by_id(d, run["id"])["state"] == "running"


# -- restarts and crashes -----------------------------------------------------------------------

def test_a_restart_does_not_fire_actions_again(daemon):
    d = daemon
    d.role_check()
    d.recorder()
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
        check_role db2
    """, """
        [any_to_master]
        record %HOST% is master

        [any_to_slave]
        record %HOST% is slave
    """)
    d.set("db1", "master")
    d.set("db2", "slave")
    d.start()
    d.wait_runs(2)
    before = d.status()
    assert d.stop() == 0
    d.proc = None
    d.start()
    wait_check_runs(d, "check_role db1", 3)
    wait_check_runs(d, "check_role db2", 3)
    after = d.status()
    assert after["daemon"]["pid"] != before["daemon"]["pid"]
    assert after["transitions"] == before["transitions"]
    assert [(r["id"], r["state"]) for r in after["runs"]] == [(r["id"], r["state"]) for r in before["runs"]]
    assert {h: v["state"] for h, v in after["hosts"].items()} == {"db1": "master", "db2": "slave"}
    assert len(d.actions_log()) == 2


def test_a_queued_sequence_survives_kill_9_and_the_running_one_is_interrupted(daemon):
    d = daemon
    d.role_check()
    d.script("actions/slow", """
        echo "$HA_RUN_ID" >> "%(w)s/marker.$HA_HOST"
        echo $$ > "%(w)s/pid.$HA_HOST"
        if [ "$HA_HOST" = db1 ]; then sleep 1000; fi
    """ % {"w": d.world})
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
        check_role db2
    """, """
        [slave_to_master]
        slow
    """)
    d.set("db1", "slave")
    d.set("db2", "slave")
    d.start()
    d.wait_state("db1", "slave")
    d.wait_state("db2", "slave")
    d.set("db1", "master")
    wait_for(lambda: read_lines(d.world / "marker.db1"), what="db1's sequence to start")
    d.set("db2", "master")
    wait_for(lambda: [r for r in d.runs() if r["state"] == "queued"], what="db2's run to queue")
    runs = {r["host"]: r["id"] for r in d.runs()}
    d.kill9()
    # The run the crash interrupted ends its command: nothing runs unsupervised.
    command = read_pids(d.world / "pid.db1")[0]
    wait_for(lambda: not alive(command), what="db1's command %d to end with its master" % command)
    d.proc = None
    d.start()
    done = d.wait_runs(2)
    states = {r["host"]: r["state"] for r in done}
    assert states == {"db1": "interrupted", "db2": "ok"}
    assert {r["host"]: r["id"] for r in done} == runs
    assert read_lines(d.world / "marker.db2") == [str(runs["db2"])]
    # The interrupted run is never run again.
    wait_check_runs(d, "check_role db1", check_runs(d, "check_role db1") + 3)
    assert read_lines(d.world / "marker.db1") == [str(runs["db1"])]
    assert len(d.status()["transitions"]) == 4
    assert "interrupted" in d.log()


# -- SPEC §3: the output protocol -----------------------------------------------------------------

def test_output_protocol(daemon):
    d = daemon
    d.script("checks/check_kv", """
        echo "host = kv1"
        echo "state = Up"
        echo "role=primary"
        echo "all is well"
    """)
    d.script("checks/check_json", """
        cat <<'EOF'
        {"states": {"j1": "master", "j2": "slave"}, "message": "two at once", "lag": 3}
        EOF
    """)
    d.script("checks/check_nagios", """
        echo "CRITICAL - connection refused"
        exit 2
    """)
    d.script("checks/check_bad", """
        echo "host=$(cat "%(w)s/bad.host")"
        echo "state=$(cat "%(w)s/bad.state")"
    """ % {"w": d.world})
    d.script("checks/check_env", """
        out="%s/check.env"
        env | grep '^HA_' | sort > "$out.tmp"
        echo "cwd=$(pwd)" >> "$out.tmp"
        echo "stdin=$(readlink /proc/$$/fd/0)" >> "$out.tmp"
        mv "$out.tmp" "$out"
        echo state=up
    """ % d.world)
    (d.world / "bad.host").write_text("good1\n")
    (d.world / "bad.state").write_text("up\n")
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_kv
        check_json
        check_nagios
        check_bad

        [local]
        host = envhost
        check_env   --an  "arg with spaces"
    """)
    d.start()
    for host, state in (("kv1", "up"), ("j1", "master"), ("j2", "slave"),
                        ("check_nagios", "down"), ("good1", "up")):
        d.wait_state(host, state)
    doc = d.status()
    kv = check_info(d, "check_kv", doc)["last"]
    assert kv["attributes"] == {"role": "primary"}
    assert kv["message"] == "all is well"
    js = check_info(d, "check_json", doc)["last"]
    assert js["reports"] == {"j1": "master", "j2": "slave"}
    assert js["message"] == "two at once"
    nag = check_info(d, "check_nagios", doc)["last"]
    assert nag["exit"] == 2 and nag["message"] == "CRITICAL - connection refused"

    # What a check gets (SPEC §3); HA_STATE is its host's state when the run starts.
    d.wait_state("envhost", "up")
    name = 'check_env --an "arg with spaces"'
    wait_check_runs(d, name, check_runs(d, name) + 2)
    env = dict(line.split("=", 1) for line in read_lines(d.world / "check.env"))
    assert env == {"HA_CHECK": name, "HA_SCOPE": "local", "HA_HOST": "envhost",
                   "HA_STATE": "up", "HA_CONFIG_DIR": str(d.dir), "HA_STATE_DIR": str(d.state),
                   "cwd": str(d.dir), "stdin": "/dev/null"}

    # A bad host name, then a bad state: rejected, logged with the value, good1 stays up.
    (d.world / "bad.host").write_text("good 1\n")
    d.wait_log("bad host name 'good 1'")
    (d.world / "bad.host").write_text("good1\n")
    (d.world / "bad.state").write_text("x_to_y\n")
    d.wait_log("bad state 'x_to_y'")
    wait_check_runs(d, "check_bad", check_runs(d, "check_bad") + 2)
    doc = d.status()
    assert doc["hosts"]["good1"]["state"] == "up"
    assert doc["hosts"]["good1"]["pending"] is None
    assert "good 1" not in doc["hosts"]
    assert [t for t in transitions(d, doc) if t[0].startswith("good")] == [("good1", "unknown", "up")]
    assert check_info(d, "check_bad", doc)["last"]["rejected"]


# -- SPEC §2: the timer ---------------------------------------------------------------------------

def test_interval_checks_do_not_drift(daemon):
    d = daemon
    times = d.world / "times"
    # The check itself takes ~50 ms: a scheduler counting from the end of the last run
    # would space runs ~250 ms apart.
    d.script("checks/check_tick", """
        date +%%s.%%N >> "%s"
        sleep 0.05
        echo state=up
    """ % times)
    configure(d, """
        [daemon]
        workers = 2

        [local]
        interval = 200ms
        check_tick
    """)
    d.start()
    stamps = wait_for(lambda: (lambda t: t if len(t) >= 16 else None)(
        [float(x) for x in read_lines(times)]), timeout=30, what="16 runs")
    elapsed = stamps[-1] - stamps[0]
    expected = elapsed / 0.2 + 1
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    print("runs %d over %.3fs (expected %.1f); median gap %.3fs, max %.3fs"
          % (len(stamps), elapsed, expected, statistics.median(gaps), max(gaps)))
    assert abs(len(stamps) - expected) <= 2, (len(stamps), elapsed)
    assert 0.15 < statistics.median(gaps) < 0.235, gaps


# -- SPEC §7: the state db is readable by others ---------------------------------------------------

READ_DB = """
import json, sys
sys.path.insert(0, sys.argv[1])
import hadaemon
data = hadaemon.Store.read(sys.argv[2])
print(json.dumps(sorted((v["host"], v["from"], v["to"])
                        for k, v in data.items() if k.startswith("tr:"))))
"""


def test_the_state_db_is_readable_while_the_daemon_runs(daemon):
    d = daemon
    d.role_check()
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
        check_role db2
    """)
    d.set("db1", "master")
    d.set("db2", "slave")
    d.start()
    wait_for(lambda: len(d.status()["transitions"]) == 2, what="two transitions")
    want = [["db1", "unknown", "master"], ["db2", "unknown", "slave"]]
    for _ in range(4):      # while it keeps checkpointing
        out = subprocess.run([sys.executable, "-c", READ_DB, str(ROOT), str(d.state)],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert json.loads(out) == want
    hist = json.loads(d.cli("--history", "--json", check=True).stdout)
    assert sorted([e["host"], e["from"], e["to"]] for e in hist) == want
    assert d.running()


def test_quick_sequences_are_all_recorded(daemon):
    """A sequence that ends at once, amid a busy loop, is recorded ok (never 'died')."""
    d = daemon
    d.script("checks/check_flip", """
        n=$(cat "%(w)s/flips" 2>/dev/null || echo 0)
        echo $((n + 1)) > "%(w)s/flips"
        echo "host=flip"
        if [ $((n %% 2)) = 0 ]; then echo state=up; else echo state=down; fi
    """ % {"w": d.world})
    d.script("checks/check_noise", "echo state=up")
    noise = "\n".join("check_noise %d" % i for i in range(8))
    configure(d, """
        [daemon]
        workers = 4

        [local]
        interval = 50ms
        check_flip
        %s
    """ % noise.replace("\n", "\n        "), """
        [any_to_any]
        true
    """)
    d.start()
    runs = wait_for(lambda: (lambda done: done if len(done) >= 20 else None)(
        [r for r in d.runs() if r["state"] not in ("queued", "running")]),
        timeout=30, what="20 finished runs")
    assert [r for r in runs if r["state"] != "ok"] == []
    assert "not a child of ours" not in d.log()


def test_a_killed_action_run_leaves_no_command_behind(daemon):
    d = daemon
    d.role_check()
    d.recorder()
    d.script("actions/long", 'echo $$ > "%s/long.pid"; sleep 1000' % d.world)
    configure(d, """
        [daemon]
        interval = 100ms

        [local]
        check_role db1
    """, """
        [unknown_to_master]
        long
        record after long
    """)
    d.set("db1", "master")
    d.start()
    wait_for(lambda: read_pids(d.world / "long.pid"), what="the long command to start")
    command = read_pids(d.world / "long.pid")[0]
    runner = d.status()["daemon"]["action_pid"]
    assert runner and alive(runner)
    os.kill(runner, signal.SIGKILL)
    run = d.wait_runs(1)[0]
    assert run["state"] == "failed"
    assert "SIGKILL" in run["reason"]
    # The command the dead runner supervised does not run on unsupervised (and
    # could not overlap the next sequence).
    wait_for(lambda: not alive(command), what="the orphaned command %d to be killed" % command)
    assert d.actions_log() == []


def test_a_failed_run_reports_unknown_for_the_hosts_the_check_watches(daemon):
    """A check that names its host only in its output: its timeout is about that host."""
    daemon.script("checks/slowrole", """
        if [ -f "%s/hang" ]; then sleep 30; fi
        echo host=db1
        echo state=master
    """ % daemon.world)
    daemon.write("checks.conf", """
        [daemon]
        interval = 200ms
        timeout = 1s
        [local]
        slowrole
    """)
    daemon.write("actions.conf", "")
    daemon.start()
    daemon.wait_state("db1", "master")
    (daemon.world / "hang").write_text("")
    daemon.wait_state("db1", "unknown", timeout=20)
    hosts = daemon.status()["hosts"]
    assert "slowrole" not in hosts
    (daemon.world / "hang").unlink()
    daemon.wait_state("db1", "master", timeout=20)

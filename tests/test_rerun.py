"""--rerun (SPEC §11, issue 13): run the section of an ended run again, as a new run.

The Ledger's ``rerun`` alone first (no process: a config, a state db, pinned times),
then the command against the real daemon: a failed run re-run once the cause is
fixed (expanded against the states of now), an interrupted one (the master killed
with -9 mid-sequence, then restarted), a rerun while paused, the refusals (an unknown
id, a queued or running run, a section gone from the config), no daemon (exit 3),
and the exit codes of ``--wait`` (with ``--timeout``).
"""

import json
import re
import textwrap

import pytest

import hadaemon.configfiles
import hadaemon.store
import hadaemon.ledger
from conftest import alive, wait_for

T0 = 1_800_000_000.0


# -- the Ledger alone ---------------------------------------------------------------------

class Book:
    """A config dir, a state db and a Ledger over them, as the daemon has them."""

    def __init__(self, tmp_path, actions):
        self.root = tmp_path / "conf"
        (self.root / "actions").mkdir(parents=True)
        for name in ("note", "other"):
            path = self.root / "actions" / name
            path.write_text("#!/bin/sh\n")
            path.chmod(0o755)
        (self.root / "checks.conf").write_text("[local]\nhost = db1\n/bin/true\n"
                                               "[local]\nhost = db2\n/bin/true\n")
        self.write_actions(actions)
        self.state = tmp_path / "state"
        self.state.mkdir(mode=0o700)
        self.store = hadaemon.store.Store(str(self.state))
        self.store.open()
        self.ledger = hadaemon.ledger.Ledger(self.store, str(self.state), self.config)
        self.ledger.open(T0)
        self.checks = {c.host: c for c in self.config.checks}

    def write_actions(self, actions):
        (self.root / "actions.conf").write_text(textwrap.dedent(actions))
        self.config = hadaemon.configfiles.load_config(str(self.root))
        if getattr(self, "ledger", None) is not None:
            self.ledger.config = self.config

    def report(self, host, state, now):
        return self.ledger.report(host, state, self.checks[host], now)

    def run_to_end(self, state, now, reason=None):
        """The head of the queue runs and ends ``state``: what the master does with it."""
        run = self.ledger.head()
        self.ledger.dequeue(run, "running", None, now)
        self.ledger.finish(run, state, reason, now + 1)
        return run

    def reread(self):
        """The runs as the state db has them (what a restarted daemon reads)."""
        data = hadaemon.store.Store.read(str(self.state))
        return {v["id"]: v for k, v in data.items() if k.startswith("run:")}, data.get("queue")


def test_ledger_rerun(tmp_path):
    book = Book(tmp_path, """
        [any_to_master]
        note %HOST% master=%MASTER% slave=%SLAVE%
        """)
    ledger = book.ledger
    # Run 1: db1 became master while no host was slave: failed at once (empty %SLAVE%).
    tr = book.report("db1", "master", T0)
    first = ledger.runs[tr.run]
    assert first.state == "failed" and "%SLAVE% is empty" in first.reason
    # The world moves on: db2 is a slave now.  The rerun expands against that.
    book.report("db2", "slave", T0 + 1)
    rerun = ledger.rerun(first.id, T0 + 2)
    assert rerun.id == 2 and rerun.rerun_of == 1 and rerun.state == "queued"
    assert (rerun.host, rerun.frm, rerun.to, rerun.section, rerun.transition) == \
        ("db1", "unknown", "master", "any_to_master", tr.id)
    assert rerun.commands[0].argv[1:] == ["db1", "master=db1", "slave=db2"]
    assert rerun.env["HA_RUN_ID"] == "2" and rerun.env["HA_SLAVE"] == "db2"
    assert ledger.queue == [2] and rerun.queued == T0 + 2
    runs, queue = book.reread()             # committed before the answer goes out
    assert runs[2]["rerun_of"] == 1 and queue == [2]
    assert hadaemon.ledger.summarize_run(rerun)["rerun_of"] == 1
    assert hadaemon.ledger.summarize_run(first)["rerun_of"] is None

    # Queued or running: refused; once ended, a rerun of the rerun is fine.
    with pytest.raises(ValueError, match=r"run #2 is queued"):
        ledger.rerun(2, T0 + 3)
    run = ledger.head()
    ledger.dequeue(run, "running", None, T0 + 3)
    with pytest.raises(ValueError, match=r"run #2 is running"):
        ledger.rerun(2, T0 + 3)
    ledger.finish(run, "ok", None, T0 + 4)
    assert ledger.rerun(2, T0 + 5).rerun_of == 2
    book.run_to_end("ok", T0 + 6)

    # Unknown ids.
    for bad in (0, -1, 99):
        with pytest.raises(ValueError, match=r"no run #%d" % bad):
            ledger.rerun(bad, T0 + 7)

    # Paused: recorded skipped (paused), not queued.
    ledger.set_paused(True)
    paused = ledger.rerun(1, T0 + 8)
    assert (paused.state, paused.reason, paused.rerun_of) == ("skipped", "paused", 1)
    assert ledger.queue == []
    ledger.set_paused(False)

    # The section by name, in the current config: changed commands are taken ...
    book.write_actions("""
        [any_to_master]
        other %HOST%
        """)
    changed = ledger.rerun(1, T0 + 9)
    assert changed.commands[0].argv[0].endswith("/actions/other")
    book.run_to_end("ok", T0 + 10)
    # ... a section no longer there is refused, even if another would match now.
    book.write_actions("""
        [db1: any_to_any]
        note %HOST%
        """)
    with pytest.raises(ValueError, match=r"section \[any_to_master\] of run #1 is no longer in"):
        ledger.rerun(1, T0 + 11)
    assert ledger.queue == [] and max(ledger.runs) == 5

    # History: each transition with its run and its reruns.
    entry = [e for e in ledger.history(10) if e["id"] == tr.id][0]
    assert entry["run"]["id"] == 1
    assert [(r["id"], r["rerun_of"]) for r in entry["reruns"]] == [(2, 1), (3, 2), (4, 1), (5, 1)]


# -- the command against the daemon --------------------------------------------------------

def rerun_config(d):
    """db1 and db2 by check_role; [any_to_master] runs actions/gate HOST.

    gate: records its run, then fails while world/fail exists, waits while
    world/hold exists (up to 60 s), else exits 0.
    """
    d.role_check()
    d.script("actions/gate", """
        echo "$HA_RUN_ID $* slave=$HA_SLAVE" >> "%(w)s/gate.log"
        echo $$ > "%(w)s/gate.pid"
        [ -f "%(w)s/fail" ] && { echo "told to fail"; exit 4; }
        n=0
        while [ -f "%(w)s/hold" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
        echo "done"
    """ % {"w": d.world})
    d.write("checks.conf", "[daemon]\ninterval = 200ms\n[local]\ncheck_role db1\ncheck_role db2\n")
    d.write("actions.conf", "[any_to_master]\ngate %HOST% %SLAVE%\n")


def gate_log(d):
    try:
        return (d.world / "gate.log").read_text().splitlines()
    except FileNotFoundError:
        return []


def gate_pid(d):
    """The pid the gate wrote (None until it wrote it whole)."""
    try:
        text = (d.world / "gate.pid").read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.endswith("\n") else None


def run_by_id(d, run_id):
    for run in d.status()["runs"]:
        if run["id"] == run_id:
            return run
    raise AssertionError("no run #%s in --status" % run_id)


def test_rerun_of_a_failed_run_against_the_states_of_now(daemon):
    d = daemon
    rerun_config(d)
    d.set("db1", "master")          # db2 has no file: down, so no host is slave
    d.start()
    first = d.wait_runs(1)[0]
    assert (first["state"], first["section"]) == ("failed", "any_to_master")
    assert first["reason"].startswith("%SLAVE% is empty") and gate_log(d) == []
    d.set("db2", "slave")           # fixed: the rerun expands against the states of now
    d.wait_state("db2", "slave")

    result = d.cli("--rerun", str(first["id"]), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr
    new = first["id"] + 1
    assert "run #%d queued: rerun of #%d [any_to_master] for db1 unknown -> master" \
        % (new, first["id"]) in result.stdout
    assert "run #%d [any_to_master]: ok (rerun of #%d)\n  gate db1 db2  -> ok\n" % (new, first["id"]) \
        in result.stdout
    run = run_by_id(d, new)
    assert (run["rerun_of"], run["state"], run["host"], run["from"], run["to"]) == \
        (first["id"], "ok", "db1", "unknown", "master")
    # HA_RUN_ID is the new run's; %SLAVE% is what it is now.
    assert gate_log(d)[-1] == "%d db1 db2 slave=db2" % new
    assert run["commands"][0]["argv"][1:] == ["db1", "db2"]

    status = d.cli("--status").stdout
    assert re.search(r"^%d\s+\[any_to_master\]\s+db1\s+ok \(rerun of #%d\)" % (new, first["id"]),
                     status, re.M), status
    history = d.cli("--history").stdout
    assert "run #%d [any_to_master]: ok (rerun of #%d)" % (new, first["id"]) in history
    entries = json.loads(d.cli("--history", "--json").stdout)
    entry = [e for e in entries if e["run"] and e["run"]["id"] == first["id"]][0]
    assert [(r["id"], r["rerun_of"]) for r in entry["reruns"]] == [(new, first["id"])]
    assert "run %d: rerun of #%d [any_to_master] for db1 unknown_to_master, by request: queued" \
        % (new, first["id"]) in d.log()
    assert d.stop() == 0
    # Without the daemon: --status and --history from the db say the same.
    assert "ok (rerun of #%d)" % first["id"] in d.cli("--status").stdout
    assert "run #%d [any_to_master]: ok (rerun of #%d)" % (new, first["id"]) in d.cli("--history").stdout
    # No daemon: --rerun needs one.
    result = d.cli("--rerun", str(first["id"]))
    assert result.returncode == 3 and "not running" in result.stderr


def test_rerun_of_an_interrupted_run(daemon):
    d = daemon
    rerun_config(d)
    d.set("db2", "slave")
    (d.world / "hold").write_text("")
    d.start()
    d.wait_state("db2", "slave")        # before db1 is master: %SLAVE% is db2
    d.set("db1", "master")
    command = wait_for(lambda: gate_pid(d), what="the gate to start")
    run_id = int(gate_log(d)[0].split()[0])
    d.kill9()
    wait_for(lambda: not alive(command), what="the gate %d to end with its master" % command)
    d.proc = None
    d.start()
    assert run_by_id(d, run_id)["state"] == "interrupted"
    (d.world / "hold").unlink()
    result = d.cli("--rerun", str(run_id), "--wait", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    run = run_by_id(d, run_id + 1)
    assert (run["rerun_of"], run["state"]) == (run_id, "ok")
    assert gate_log(d) == ["%d db1 db2 slave=db2" % run_id, "%d db1 db2 slave=db2" % (run_id + 1)]


def test_rerun_refusals_and_wait_exit_codes(daemon):
    d = daemon
    rerun_config(d)
    d.set("db2", "slave")
    d.start()
    d.wait_state("db2", "slave")
    d.set("db1", "master")
    first = d.wait_runs(1)[0]
    assert first["state"] == "ok"

    result = d.cli("--rerun", "99")
    assert result.returncode == 1 and "no run #99" in result.stderr

    # Running, then queued behind it: both refused.
    (d.world / "hold").write_text("")
    assert d.cli("--rerun", str(first["id"])).returncode == 0
    running = first["id"] + 1
    wait_for(lambda: run_by_id(d, running)["state"] == "running", what="the rerun to run")
    result = d.cli("--rerun", str(running))
    assert result.returncode == 1 and "run #%d is running" % running in result.stderr
    assert d.cli("--rerun", str(first["id"])).returncode == 0
    queued = running + 1
    result = d.cli("--rerun", str(queued))
    assert result.returncode == 1 and "run #%d is queued" % queued in result.stderr
    # --wait --timeout on a run that does not end in time: 1, saying what it is.
    result = d.cli("--rerun", str(first["id"]), "--wait", "--timeout", "0.5")
    assert result.returncode == 1
    assert "run #%d still queued after 0.5s" % (queued + 1) in result.stderr
    (d.world / "hold").unlink()
    d.wait_runs(4)

    # --wait on a run that fails: 1, with its reason.
    (d.world / "fail").write_text("")
    result = d.cli("--rerun", str(first["id"]), "--wait")
    assert result.returncode == 1
    assert re.search(r"^run #\d+ \[any_to_master\]: failed \(rerun of #%d\) \(.*exit 4"
                     % first["id"], result.stdout, re.M), result.stdout
    (d.world / "fail").unlink()

    # Paused: recorded skipped (paused); with or without --wait, exit 1.
    assert d.cli("--pause").returncode == 0
    for args in ((), ("--wait",)):
        result = d.cli("--rerun", str(first["id"]), *args)
        assert result.returncode == 1
        assert "recorded as skipped (paused): actions are paused" in result.stdout
    skipped = d.status()["runs"][0]
    assert (skipped["state"], skipped["reason"], skipped["rerun_of"]) == ("skipped", "paused", first["id"])
    assert d.cli("--resume").returncode == 0

    # A section gone from the config (after a reload): refused, saying so.
    d.write("actions.conf", "[any_to_any]\ngate %HOST%\n")
    assert d.cli("--reload").returncode == 0
    result = d.cli("--rerun", str(first["id"]))
    assert result.returncode == 1
    assert "section [any_to_master] of run #%d is no longer in" % first["id"] in result.stderr

    # Usage.
    assert d.cli("--wait").returncode == 2
    assert d.cli("--rerun", "x").returncode == 2

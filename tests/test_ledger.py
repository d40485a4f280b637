"""The Ledger alone: reports in, transitions and runs out (SPEC §4, §5), no process started.

Each test builds a real config dir and a real state db in a temp dir, drives reports
through ``Ledger.report`` with pinned times, and reads what it decided; some reopen
the state db as a restarted daemon would.
"""

import textwrap

import pytest

import hadaemon.configfiles
import hadaemon.store
import hadaemon.ledger

T0 = 1_800_000_000.0        # the wall clock the tests hand in


def write_config(root, actions, confirm=2, history=50):
    """checks.conf with db1 (confirm ``confirm``) and db2 (confirm 1); actions.conf as given."""
    (root / "checks.conf").write_text(textwrap.dedent("""\
        [daemon]
        history = %d

        [local]
        confirm = %d
        host = db1
        /bin/true

        [local]
        confirm = 1
        host = db2
        /bin/true
        """ % (history, confirm)))
    (root / "actions.conf").write_text(textwrap.dedent(actions))
    return hadaemon.configfiles.load_config(str(root))


class World:
    """A config, a state db and a ledger over them; ``reopen`` is a restart."""

    def __init__(self, tmp_path, actions="", **kw):
        self.root = tmp_path / "conf"
        self.root.mkdir()
        self.state = tmp_path / "state"
        self.state.mkdir(mode=0o700)
        self.config = write_config(self.root, actions, **kw)
        self.checks = {c.host: c for c in self.config.checks}
        self.store = None
        self.ledger = None
        self.reopen()

    def reopen(self):
        """As a restart would: a new Store and Ledger over the same files (no checkpoint first)."""
        if self.store is not None and self.store.jfd is not None:
            import os
            os.close(self.store.jfd)        # a kill -9: nothing flushed, nothing closed
            os.close(self.store.files.dat_fd)
        self.store = hadaemon.store.Store(str(self.state))
        self.store.open()
        self.ledger = hadaemon.ledger.Ledger(self.store, str(self.state), self.config)
        self.ledger.open(T0)
        return self.ledger

    def report(self, host, state, when=T0):
        return self.ledger.report(host, state, self.checks[host], when)

    def host(self, host):
        return self.ledger.hosts.get(host)


def test_confirm_counts_reports_in_a_row(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n", confirm=3)
    assert w.report("db1", "master", T0) is None
    assert w.host("db1") == {"state": "unknown", "since": None, "pending": "master", "count": 1}
    assert w.report("db1", "master", T0 + 1) is None
    assert w.host("db1")["count"] == 2
    tr = w.report("db1", "master", T0 + 2)
    assert (tr["host"], tr["from"], tr["to"], tr["time"]) == ("db1", "unknown", "master", T0 + 2)
    assert w.host("db1") == {"state": "master", "since": T0 + 2, "pending": None, "count": 0}
    assert [t["id"] for t in w.ledger.transitions] == [tr["id"]]


def test_a_flapping_host_never_moves_and_its_own_state_drops_the_candidate(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n", confirm=2)
    w.report("db1", "master")
    w.report("db1", "master")
    assert w.ledger.state_of("db1") == "master"
    for i in range(10):                     # slave, down, slave, down, ...: never twice in a row
        assert w.report("db1", "slave" if i % 2 else "down", T0 + i) is None
        assert w.host("db1")["count"] == 1
    assert w.ledger.state_of("db1") == "master"
    w.report("db1", "master", T0 + 20)      # its own state again: the candidate goes
    assert w.host("db1")["pending"] is None and w.host("db1")["count"] == 0
    assert len(w.ledger.transitions) == 1


def test_a_host_never_seen_is_unknown_and_its_first_state_is_a_transition(tmp_path):
    w = World(tmp_path, "[unknown_to_master]\n/bin/echo hello %HOST%\n")
    assert w.ledger.state_of("db2") == "unknown"
    assert w.report("db2", "unknown") is None       # unknown about an unknown host: nothing
    assert w.host("db2") is None and not w.ledger.transitions
    tr = w.report("db2", "master")                  # confirm 1 for db2
    assert (tr["from"], tr["to"]) == ("unknown", "master")
    run = w.ledger.runs[tr["run"]]
    assert run["section"] == "unknown_to_master" and run["state"] == "queued"
    assert run["commands"][0]["argv"][1:] == ["hello", "db2"]
    assert w.ledger.queue == [run["id"]]


PRECEDENCE = ["db2: slave_to_master", "db2: any_to_master", "db2: slave_to_any", "db2: any_to_any",
              "slave_to_master", "any_to_master", "slave_to_any", "any_to_any"]


@pytest.mark.parametrize("winner", range(len(PRECEDENCE)))
def test_the_first_section_by_precedence_runs(tmp_path, winner):
    # The winner and every section below it exist (plus sections for other hosts and
    # transitions, which never match); the winner must be the one that runs.
    text = "[db1: slave_to_master]\n/bin/false\n[master_to_slave]\n/bin/false\n"
    for name in PRECEDENCE[winner:]:
        text += "[%s]\n/bin/echo %s\n" % (name, name.replace(" ", ""))
    w = World(tmp_path, text)
    w.report("db2", "slave")                        # (its run may match a section too)
    tr = w.report("db2", "master")
    assert (tr["from"], tr["to"]) == ("slave", "master")
    assert w.ledger.runs[tr["run"]]["section"] == PRECEDENCE[winner]


def test_no_section_records_the_transition_without_a_run(tmp_path):
    w = World(tmp_path, "[db1: slave_to_master]\n/bin/true\n")
    tr = w.report("db2", "master")
    assert tr["run"] is None and not w.ledger.runs and not w.ledger.queue
    assert list(w.ledger.transitions) == [tr]


def test_variables_are_the_states_after_the_transition(tmp_path):
    w = World(tmp_path, """\
        [slave_to_master]
        /bin/echo %HOST% %FROM% %TO% m=%MASTER% s=%SLAVE% d=%DOWN% 100%%
        """, confirm=1)
    w.checks["db3"] = w.checks["db2"]
    for host, state in (("db1", "master"), ("db2", "slave"), ("db3", "slave"), ("db1", "down")):
        w.report(host, state)
    tr = w.report("db2", "master")
    run = w.ledger.runs[tr["run"]]
    assert run["commands"][0]["argv"][1:] == ["db2", "slave", "master", "m=db2", "s=db3", "d=db1", "100%"]
    env = run["env"]
    assert (env["HA_HOST"], env["HA_FROM"], env["HA_TO"], env["HA_TRANSITION"]) == \
        ("db2", "slave", "master", "slave_to_master")
    assert (env["HA_MASTER"], env["HA_SLAVE"], env["HA_RUN_ID"]) == ("db2", "db3", str(run["id"]))


def test_an_empty_variable_refuses_the_whole_sequence(tmp_path):
    w = World(tmp_path, """\
        [any_to_master]
        /bin/echo first
        /bin/echo promote %MASTER% over %SLAVE%
        """)
    tr = w.report("db2", "master")          # no host is a slave: %SLAVE% is empty
    run = w.ledger.runs[tr["run"]]
    assert run["state"] == "failed"
    assert "%SLAVE% is empty" in run["reason"] and "actions.conf:3" in run["reason"]
    assert w.ledger.queue == [] and w.ledger.head() is None


def test_while_paused_runs_are_skipped_and_the_pause_survives_a_restart(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n")
    w.ledger.set_paused(True)
    tr = w.report("db2", "master")
    run = w.ledger.runs[tr["run"]]
    assert (run["state"], run["reason"]) == ("skipped", "paused")
    assert w.ledger.queue == []
    w.reopen()
    assert w.ledger.paused
    w.ledger.set_paused(False)
    w.reopen()
    assert not w.ledger.paused
    tr = w.report("db2", "slave")
    assert w.ledger.runs[tr["run"]]["state"] == "queued"


def test_the_queue_survives_a_kill_and_a_running_run_is_interrupted(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n/bin/true\n", confirm=1)
    ids = [w.report("db1", "master")["run"], w.report("db2", "slave")["run"],
           w.report("db2", "master", T0 + 5)["run"]]
    assert w.ledger.queue == ids
    first = w.ledger.head()
    w.ledger.dequeue(first, "running", None, T0 + 6)
    w.ledger.command_started(first, 0, T0 + 6)
    w.ledger.command_ended(first, 0, {"exit": 0, "error": None, "duration": 0.01, "output": "hi\n"})
    ledger = w.reopen()                     # killed mid-sequence: journal only
    assert ledger.queue == ids[1:]
    run = ledger.runs[ids[0]]
    assert run["state"] == "interrupted" and "died" in run["reason"]
    assert run["commands"][0]["result"]["output"] == "hi\n" and "result" not in run["commands"][1]
    assert [ledger.runs[i]["state"] for i in ids[1:]] == ["queued", "queued"]
    assert ledger.head()["id"] == ids[1]
    assert ledger.state_of("db2") == "master" and ledger.meta["next_run"] == ids[-1] + 1
    # A restart never fires a transition by itself: the states are simply there.
    assert ledger.report("db2", "master", w.checks["db2"], T0 + 9) is None


def test_a_run_goes_queued_running_ok_and_is_counted(tmp_path):
    w = World(tmp_path, "[any_to_master]\n/bin/true\n")
    tr = w.report("db2", "master")
    run = w.ledger.head()
    assert run["id"] == tr["run"]
    w.ledger.dequeue(run, "running", None, T0 + 1)
    assert run["started"] == T0 + 1 and w.ledger.queue == []
    with pytest.raises(AssertionError):
        w.ledger.dequeue(run, "running", None, T0 + 1)     # no longer first in the queue
    w.ledger.finish(run, "ok", None, T0 + 2)
    assert (run["state"], run["ended"]) == ("ok", T0 + 2)
    with pytest.raises(AssertionError):
        w.ledger.finish(run, "failed", "twice", T0 + 3)     # ok is final
    assert w.ledger.run_counts == {("any_to_master", "ok"): 1}
    assert w.ledger.transition_counts == {("db2", "unknown", "master"): 1}
    entry = w.ledger.history(5)[0]
    assert entry["id"] == tr["id"] and entry["run"]["state"] == "ok" and "env" not in entry["run"]


def test_history_is_capped_in_memory_and_in_the_db(tmp_path):
    w = World(tmp_path, "[any_to_any]\n", confirm=1, history=3)
    for i in range(8):
        w.report("db2", "master" if i % 2 else "slave", T0 + i)
    assert [t["id"] for t in w.ledger.transitions] == [6, 7, 8]
    assert sorted(r["id"] for r in w.ledger.runs.values()) == [6, 7, 8]
    ledger = w.reopen()
    assert [t["id"] for t in ledger.transitions] == [6, 7, 8]
    assert ledger.status(last=2)["transitions"][0]["id"] == 8

"""The Ledger alone: reports in, transitions and runs out (SPEC §4, §5), no process started;
and a cluster member's ledger over a real ClusterMember whose role is set by hand (no etcd).

Each test builds a real config dir and a real state db in a temp dir, drives reports
through ``Ledger.report`` with pinned times, and reads what it decided; some reopen
the state db as a restarted daemon would.
"""

import textwrap

import pytest

import hadaemon.configfiles
import hadaemon.store
import hadaemon.ledger
import hadaemon.ledger_store
import hadaemon.cluster_member
import hadaemon.cluster_ledger
import hadaemon.cluster_link
import hadaemon.actions
import hadaemon.wire
from hadaemon.config import ClusterSettings

T0 = 1_800_000_000.0        # the wall clock the tests hand in


def write_config(root, actions, confirm=2, history=50):
    """checks.conf with db1 (confirm ``confirm``) and db2 (confirm 1); actions.conf as given."""
    (root / "checks.conf").write_text(textwrap.dedent("""\
        [daemon]
        history = %d

        [local]
        confirm = %s
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
    assert w.host("db1") == {"state": "unknown", "since": None, "pending": "master", "count": 1, "window": 3}
    assert w.report("db1", "master", T0 + 1) is None
    assert w.host("db1")["count"] == 2
    tr = w.report("db1", "master", T0 + 2)
    assert (tr.host, tr.frm, tr.to, tr.time) == ("db1", "unknown", "master", T0 + 2)
    assert w.host("db1") == {"state": "master", "since": T0 + 2, "pending": None, "count": 0}
    assert [t.id for t in w.ledger.transitions] == [tr.id]


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
    assert (tr.frm, tr.to) == ("unknown", "master")
    run = w.ledger.runs[tr.run]
    assert run.section == "unknown_to_master" and run.state == "queued"
    assert run.commands[0].argv[1:] == ["hello", "db2"]
    assert w.ledger.queue == [run.id]


def test_a_status_made_over_several_passes_shows_the_hosts_as_its_runs_and_queue(tmp_path):
    # The socket's --status is made in pieces, the loop going on between them (control.py,
    # ANSWER_SLICE): its runs and queue are taken with the first, its hosts were read
    # later, so a transition made between showed a host moved with no run queued or
    # running (NOTE-cstack finding 5: the nemesis read a leader "settled" then).
    w = World(tmp_path, "[any_to_any]\n/bin/true\n", confirm=1)
    first = w.report("db1", "master")
    hosts, queue = w.ledger.host_entries(), list(w.ledger.daemon_status()["queue"])
    assert queue == [first.run]
    later = w.report("db1", "slave", T0 + 1)                # a pass of the loop between pieces
    assert later is not None and w.ledger.queue == [first.run, later.run]
    assert [(name, entry["state"]) for name, entry in hosts] == [("db1", "master")]
    assert w.ledger.host_status("db1")["state"] == "slave"


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
    assert (tr.frm, tr.to) == ("slave", "master")
    assert w.ledger.runs[tr.run].section == PRECEDENCE[winner]


def test_no_section_records_the_transition_without_a_run(tmp_path):
    w = World(tmp_path, "[db1: slave_to_master]\n/bin/true\n")
    tr = w.report("db2", "master")
    assert tr.run is None and not w.ledger.runs and not w.ledger.queue
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
    run = w.ledger.runs[tr.run]
    assert run.commands[0].argv[1:] == ["db2", "slave", "master", "m=db2", "s=db3", "d=db1", "100%"]
    env = run.env
    assert (env["HA_HOST"], env["HA_FROM"], env["HA_TO"], env["HA_TRANSITION"]) == \
        ("db2", "slave", "master", "slave_to_master")
    assert (env["HA_MASTER"], env["HA_SLAVE"], env["HA_RUN_ID"]) == ("db2", "db3", str(run.id))


def test_an_empty_variable_refuses_the_whole_sequence(tmp_path):
    w = World(tmp_path, """\
        [any_to_master]
        /bin/echo first
        /bin/echo promote %MASTER% over %SLAVE%
        """)
    tr = w.report("db2", "master")          # no host is a slave: %SLAVE% is empty
    run = w.ledger.runs[tr.run]
    assert run.state == "failed"
    assert "%SLAVE% is empty" in run.reason and "actions.conf:3" in run.reason
    assert w.ledger.queue == [] and w.ledger.head() is None


def test_while_paused_runs_are_skipped_and_the_pause_survives_a_restart(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n")
    w.ledger.set_paused(True)
    tr = w.report("db2", "master")
    run = w.ledger.runs[tr.run]
    assert (run.state, run.reason) == ("skipped", "paused")
    assert w.ledger.queue == []
    w.reopen()
    assert w.ledger.paused
    w.ledger.set_paused(False)
    w.reopen()
    assert not w.ledger.paused
    tr = w.report("db2", "slave")
    assert w.ledger.runs[tr.run].state == "queued"


def test_the_queue_survives_a_kill_and_a_running_run_is_interrupted(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n/bin/true\n", confirm=1)
    ids = [w.report("db1", "master").run, w.report("db2", "slave").run,
           w.report("db2", "master", T0 + 5).run]
    assert w.ledger.queue == ids
    first = w.ledger.head()
    w.ledger.dequeue(first, "running", None, T0 + 6)
    w.ledger.command_started(first, 0, T0 + 6)
    w.ledger.command_ended(first, 0, {"exit": 0, "error": None, "duration": 0.01, "output": "hi\n"})
    ledger = w.reopen()                     # killed mid-sequence: journal only
    assert ledger.queue == ids[1:]
    run = ledger.runs[ids[0]]
    assert run.state == "interrupted" and "died" in run.reason
    assert run.commands[0].result.output == "hi\n" and run.commands[1].result is None
    assert [ledger.runs[i].state for i in ids[1:]] == ["queued", "queued"]
    assert ledger.head().id == ids[1]
    assert ledger.state_of("db2") == "master" and ledger.meta["next_run"] == ids[-1] + 1
    # A restart never fires a transition by itself: the states are simply there.
    assert ledger.report("db2", "master", w.checks["db2"], T0 + 9) is None


def test_a_run_goes_queued_running_ok_and_is_counted(tmp_path):
    w = World(tmp_path, "[any_to_master]\n/bin/true\n")
    tr = w.report("db2", "master")
    run = w.ledger.head()
    assert run.id == tr.run
    w.ledger.dequeue(run, "running", None, T0 + 1)
    assert run.started == T0 + 1 and w.ledger.queue == []
    with pytest.raises(AssertionError):
        w.ledger.dequeue(run, "running", None, T0 + 1)     # no longer first in the queue
    w.ledger.finish(run, "ok", None, T0 + 2)
    assert (run.state, run.ended) == ("ok", T0 + 2)
    with pytest.raises(AssertionError):
        w.ledger.finish(run, "failed", "twice", T0 + 3)     # ok is final
    assert w.ledger.run_counts == {("any_to_master", "ok"): 1}
    assert w.ledger.transition_counts == {("db2", "unknown", "master"): 1}
    entry = w.ledger.history(5)[0]
    assert entry["id"] == tr.id and entry["run"]["state"] == "ok" and "env" not in entry["run"]


def test_history_is_capped_in_memory_and_in_the_db(tmp_path):
    w = World(tmp_path, "[any_to_any]\n", confirm=1, history=3)
    for i in range(8):
        w.report("db2", "master" if i % 2 else "slave", T0 + i)
    assert [t.id for t in w.ledger.transitions] == [6, 7, 8]
    assert sorted(r.id for r in w.ledger.runs.values()) == [6, 7, 8]
    ledger = w.reopen()
    assert [t.id for t in ledger.transitions] == [6, 7, 8]
    assert ledger.recent(last=2)["transitions"][0]["id"] == 8


# -- the cluster's ledger, no etcd: a real ClusterMember with its role set by hand ----------

class FakeChild:
    """The waiting action run, as ActionRuns sees it: connected, no sequence yet."""
    conn, run_id, pgid = "conn", None, None


class FakePool:
    sock_path = None

    def __init__(self):
        self.child, self.children = None, {}

    def action_child(self):
        return self.child

    def runner(self, config_dir):
        self.child = self.child or FakeChild()
        return self.child

    def fork(self, kind, *args):
        return None                     # the cluster agent: these tests are its answers


class FakeServer:
    def __init__(self):
        self.sent = []

    def send(self, conn, msg):
        self.sent.append((conn, msg))


class ClusterWorld(World):
    """A member ``node`` of cluster c over the same config and state db, with its role,
    epoch and mirror set by hand (what etcd and the agent would have made)."""

    def __init__(self, tmp_path, actions="", node="a", role="leader", epoch=5, **kw):
        self.node, self.role, self.epoch = node, role, epoch
        super().__init__(tmp_path, actions, **kw)

    def reopen(self):
        self.store = hadaemon.store.Store(str(self.state))
        self.store.open()
        settings = ClusterSettings(etcd=("http://127.0.0.1:1",), name="c", node=self.node, quorum=1)
        self.member = m = hadaemon.cluster_member.ClusterMember(settings, 0.0)
        etcd = hadaemon.cluster_ledger.EtcdStore(hadaemon.ledger_store.LocalStore(self.store), m)
        self.ledger = hadaemon.ledger.Ledger(etcd, str(self.state), self.config)
        self.ledger.open(T0, acting=False)
        m.role, m.lease = self.role, 7
        if self.role == "leader":
            m.acting, m.epoch = True, self.epoch
        self.pool, self.server = FakePool(), FakeServer()
        self.link = hadaemon.cluster_link.ClusterLink(self.ledger, self.pool, self.server)
        self.runs = hadaemon.actions.ActionRuns(self.ledger, self.pool, self.server, self.link)
        return self.ledger

    def agree(self, now=T0):
        self.link.agree(now)

    def take_over(self, now=T0):
        self.link.take_over(now)

    def flush(self):
        return self.ledger.store.flush()

    def written(self, rid, result="ok"):
        self.ledger.store.written(rid, result)

    def start(self, config=None):
        """One pass of the acting leader's start of the next run."""
        self.runs.start_next(config or self.config)

    def handed(self, host, state):
        """``host`` reported in ``state``, agreed, its run written to etcd and handed to its
        action run (the pool's child): that run."""
        self.report(host, state)
        self.agree()
        self.start()
        self.written(self.txns()[-1]["id"])
        self.start()
        return self.ledger.runs[1]

    def mirror(self, key, value, mod=10):
        self.member.mirror[key] = {"value": value, "lease": 0, "create": mod, "mod": mod}

    def mirror_event(self, key, value, mod=10):
        """etcd's watch says ``key`` changed: one pass of the link over the note."""
        self.mirror(key, value, mod)
        self.member.notes.append(("mirror", [key]))
        self.link.tick(0.0)

    def txns(self):
        return [r for r in self.member.outbox if r["t"] == "txn"]


def test_cluster_a_members_report_changes_its_view_and_accepts_nothing(tmp_path):
    w = ClusterWorld(tmp_path, "[any_to_any]\n/bin/true\n", node="b", role="follower")
    assert w.report("db2", "master") is None                # confirm 1: b sees it
    assert w.member.view == {"db2": "master"}
    assert w.report("db1", "master") is None                # confirm 2: 1/2, not seen yet
    assert w.member.view == {"db2": "master"}
    assert w.ledger.hosts == {} and not w.ledger.transitions and not w.ledger.runs
    assert w.ledger.reports["db1"]["state"] == "master"
    w.agree()                                               # a follower moves nothing
    assert not w.ledger.transitions and not w.txns()


def test_cluster_the_leader_accepts_what_quorum_sees_in_one_txn_guarded_by_its_epoch(tmp_path):
    w = ClusterWorld(tmp_path, "[any_to_master]\n/bin/echo %HOST% %MASTER%\n", epoch=5)
    w.report("db2", "master")
    assert not w.ledger.transitions                         # seen, not accepted
    w.agree(T0 + 1)
    tr = w.ledger.transitions[-1]
    assert (tr.host, tr.frm, tr.to, tr.check, tr.time) == \
        ("db2", "unknown", "master", "cluster: a", T0 + 1)
    run = w.ledger.runs[tr.run]
    assert run.state == "queued" and w.ledger.queue == [run.id]
    assert run.variables["HOST"] == "db2" and run.variables["MASTER"] == "db2"
    assert not w.txns()                                     # gathered until the pass ends
    rid = w.flush()
    [txn] = w.txns()
    assert txn["id"] == rid and txn["epoch"] == 5
    assert txn["puts"]["ledger/host/db2"] == {"state": "master", "since": T0 + 1}
    assert txn["puts"]["ledger/tr/0000000001"]["run"] == run.id
    assert txn["puts"]["ledger/run/%010d" % run.id]["state"] == "queued"
    assert txn["puts"]["ledger/queue"] == [run.id]
    assert txn["puts"]["ledger/meta"] == {"next_transition": 2, "next_run": run.id + 1}


def test_cluster_take_over_interrupts_a_run_of_an_earlier_leader(tmp_path):
    w = ClusterWorld(tmp_path, "[any_to_any]\n/bin/true\n", epoch=9)
    run = {"id": 1, "transition": 1, "host": "db2", "from": "unknown", "to": "master",
           "section": "any_to_any", "state": "running", "reason": None, "queued": T0,
           "started": T0, "ended": None, "env": {}, "commands": [], "node": "b", "epoch": 4}
    w.mirror("ledger/run/0000000001", run)
    w.mirror("ledger/meta", {"next_transition": 2, "next_run": 2})
    w.take_over(T0 + 3)
    got = w.ledger.runs[1]
    assert (got.state, got.reason, got.ended) == \
        ("interrupted", "its leader (b, epoch 4) lost the lead while it ran", T0 + 3)
    w.flush()
    assert w.txns()[-1]["puts"]["ledger/run/0000000001"]["state"] == "interrupted"


def test_cluster_a_run_starts_from_this_members_config_and_is_handed_once_etcd_has_it(tmp_path):
    w = ClusterWorld(tmp_path, "[any_to_master]\n/bin/echo old %HOST%\n", epoch=5)
    w.report("db2", "master")
    w.agree()
    w.flush()
    (w.root / "actions.conf").write_text("[any_to_master]\n/bin/echo new %HOST% %MASTER%\n")
    config = hadaemon.configfiles.load_config(str(w.root))
    w.start(config)
    run = w.ledger.runs[1]
    assert run.state == "running" and w.pool.child.run_id == 1
    assert run.commands[0].argv[1:] == ["new", "db2", "db2"]     # expanded in its config
    assert (run.node, run.epoch) == ("a", 5)
    assert (run.env["HA_CLUSTER"], run.env["HA_NODE"], run.env["HA_LEADER_EPOCH"]) == \
        ("c", "a", "5")
    rid = w.txns()[-1]["id"]
    assert w.txns()[-1]["puts"]["ledger/run/0000000001"]["state"] == "running"
    w.start(config)
    assert w.server.sent == []                              # not before etcd acknowledged it
    w.written(rid)
    w.start(config)
    [(conn, msg)] = w.server.sent
    assert msg["t"] == "run" and msg["run"]["id"] == 1 and msg["run"]["confirm"] is True


def test_cluster_a_command_ended_by_a_step_down_is_interrupted_not_failed(tmp_path, caplog):
    # The step-down's SIGTERM ends the command (exit 143) and the action run says
    # "failed"; the ledger (and its log line) say interrupted, as the next leader would.
    w = ClusterWorld(tmp_path, "[any_to_master]\n/bin/sleep 9\n", epoch=5)
    run = w.handed("db2", "master")
    w.member.step_down("its lease could not be renewed in time", 100.0)
    with caplog.at_level("INFO", logger="hadaemon"):
        w.runs.event(w.pool.child, {"t": "done", "run": 1, "result": "failed",
                                    "reason": "actions.conf:2: exit 143 (sleep)"})
    assert run.state == "interrupted"
    assert run.reason == "the leader stepped down: its lease could not be renewed in time " \
                         "(actions.conf:2: exit 143 (sleep))"
    assert any("interrupted (the leader stepped down" in r.getMessage() for r in caplog.records)
    assert not any(": failed (" in r.getMessage() for r in caplog.records)
    # Not stepping down, a failed command is a failed run.
    (tmp_path / "w2").mkdir()
    w2 = ClusterWorld(tmp_path / "w2", "[any_to_master]\n/bin/false\n", epoch=5)
    w2.handed("db2", "master")
    w2.runs.event(w2.pool.child, {"t": "done", "run": 1, "result": "failed", "reason": "exit 1"})
    assert (w2.ledger.runs[1].state, w2.ledger.runs[1].reason) == ("failed", "exit 1")


def test_cluster_an_action_runs_end_after_its_run_was_interrupted_is_no_crash(tmp_path):
    # A leader that steps down and takes over again interrupts its own running run
    # (take_over) before the SIGTERM'd action run says "done": that late word is logged,
    # the run stays interrupted, and the master goes on.
    w = ClusterWorld(tmp_path, "[any_to_master]\n/bin/sleep 9\n", epoch=5)
    run = w.handed("db2", "master")
    w.ledger.interrupt_running(lambda r: "its leader lost the lead while it ran", 100.0)
    assert run.state == "interrupted"
    w.runs.event(w.pool.child, {"t": "done", "run": 1, "result": "interrupted", "reason": "SIGTERM"})
    assert (run.state, run.reason) == ("interrupted", "its leader lost the lead while it ran")


def test_cluster_a_run_whose_section_this_member_lacks_fails(tmp_path):
    w = ClusterWorld(tmp_path, "[any_to_master]\n/bin/true\n", epoch=5)
    w.report("db2", "master")
    w.agree()
    (w.root / "actions.conf").write_text("[any_to_slave]\n/bin/true\n")
    config = hadaemon.configfiles.load_config(str(w.root))
    w.start(config)
    run = w.ledger.runs[1]
    assert run.state == "failed" and w.pool.child is None
    assert run.reason == "no section [any_to_master] in this member's %s" % (w.root / "actions.conf")


def test_cluster_a_restart_fires_no_transition_while_a_candidate_is_counted(tmp_path):
    # B1: a host with only a pending candidate was published as "unknown", and the
    # leader moved it there (docs/configuration.md: a restart never fires a transition).
    w = ClusterWorld(tmp_path, "[any_to_any]\n/bin/true\n", epoch=5)
    w.mirror("ledger/host/db1", {"state": "master", "since": T0 - 60})
    w.mirror("ledger/host/db2", {"state": "slave", "since": T0 - 60})
    w.take_over()
    assert w.ledger.states() == {"db1": "master", "db2": "slave"}
    w.report("db1", "master")                               # confirm 2: 1/2
    w.report("db2", "slave")                                # confirm 1: seen
    assert w.member.view == {"db2": "slave"}
    w.agree()
    assert not w.ledger.transitions
    w.report("db1", "master")
    assert w.member.view == {"db1": "master", "db2": "slave"}
    w.agree()
    assert not w.ledger.transitions and w.ledger.host_status("db1")["pending"] is None


def test_cluster_a_run_started_in_a_big_pass_is_handed_once_etcd_has_it(tmp_path):
    # B2: the start's own change filled the txn, which was sent inside put(); flush()
    # then found nothing and the run stayed running, never handed.
    w = ClusterWorld(tmp_path, "[h0: any_to_any]\n/bin/true\n", epoch=5)
    w.ledger.agree([("h0", "master", ["a"])], T0)
    w.flush()
    w.ledger.agree([("h%d" % i, "master", ["a"]) for i in range(1, 32)], T0 + 1)
    w.start()
    assert w.ledger.runs[1].state == "running"
    [txn] = [t for t in w.txns() if t["puts"].get("ledger/run/0000000001", {}).get("state") == "running"]
    w.start()
    assert w.server.sent == []                              # not before etcd acknowledged it
    w.written(txn["id"])
    w.start()
    [(conn, msg)] = w.server.sent
    assert msg["run"]["id"] == 1 and msg["run"]["state"] == "running"


def test_cluster_a_followers_last_reports_survive_the_leaders_changes(tmp_path):
    # B3: every ledger change a follower mirrored wiped every host's last report.
    w = ClusterWorld(tmp_path, "[any_to_any]\n/bin/true\n", node="b", role="follower")
    w.mirror_event("ledger/host/db1", {"state": "master", "since": T0 - 60})
    assert w.ledger.state_of("db1") == "master"
    w.report("db1", "master", T0 + 1)
    w.mirror_event("ledger/host/db2", {"state": "slave", "since": T0 + 2})
    assert w.ledger.state_of("db2") == "slave"
    assert w.ledger.host_status("db1")["last_report"] == {"time": T0 + 1, "check": w.checks["db1"].name,
                                                          "state": "master"}


def test_cluster_a_section_is_found_by_name_at_start_as_a_rerun_finds_it(tmp_path):
    # B4: the start demanded that the run's section also win by precedence in this
    # member's config, so a rerun of a section a more specific one now overrides failed.
    w = ClusterWorld(tmp_path, "[any_to_master]\n/bin/echo general %HOST%\n", epoch=5)
    run = w.handed("db2", "master")
    w.ledger.finish(run, "failed", "it failed", T0 + 1)
    w.pool.child = None                                     # which exits
    (w.root / "actions.conf").write_text("[any_to_master]\n/bin/echo general %HOST%\n"
                                         "[db2: any_to_master]\n/bin/echo special\n")
    w.ledger.config = config = hadaemon.configfiles.load_config(str(w.root))
    again = w.ledger.rerun(1, T0 + 2)
    assert again.section == "any_to_master"
    w.start(config)
    assert again.state == "running", again.reason
    assert again.commands[0].argv[1:] == ["general", "db2"]


# -- The check flow's part: what a worker may hold, and a held result come late --------

class _Quiet:
    """Notifications' part in the check flow, without a state db of events."""

    def check_ran(self, rt, result):
        pass


def _flow(w):
    import hadaemon.checkflow
    import hadaemon.scheduler
    scheduler = hadaemon.scheduler.Scheduler()
    scheduler.configure(w.config.checks, 100.0)
    flow = hadaemon.checkflow.CheckFlow(scheduler, None, None, w.ledger, _Quiet(), lambda: ("/c", "/s"))
    return scheduler, flow


def _run(scheduler, flow, host, state, ended):
    """db1's or db2's check handed (as the flow hands it) and its result back; the Job."""
    import hadaemon.records
    rt = next(rt for rt in scheduler.runtimes.values() if rt.check.host == host)
    scheduler.enqueue(rt, 100.0)
    job = scheduler.take(100.0, flow.ledger.state_of, "/c", "/s", flow.quiet)
    return job, hadaemon.records.CheckResult(job.id, job.key, {"state": state}, False, 0, None,
                                             ended - 0.01, 0.01, None, None, _print(state))


def _print(state):
    """The print a worker sends of a clean run that said ``state=STATE``."""
    import hadaemon.wire
    return hadaemon.wire.output_print(0, b"state=%s\n" % state.encode())


def test_a_job_may_be_held_only_while_its_reports_would_change_nothing(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n", confirm=2)
    scheduler, flow = _flow(w)
    for i in range(2):                          # unknown -> up (confirm 2)
        job, result = _run(scheduler, flow, "db1", "up", T0 + i)
        assert job.same is None                 # nothing said yet, then a candidate pending
        flow.result(job, result)
    assert w.ledger.state_of("db1") == "up"
    job, result = _run(scheduler, flow, "db1", "up", T0 + 2)
    assert job.same == _print("up")             # up again changes nothing
    flow.result(job, result)
    w.report("db1", "down", T0 + 3)             # another check: a candidate pending
    job, _ = _run(scheduler, flow, "db1", "up", T0 + 4)
    assert job.same is None                     # now its up drops the candidate: at once


def test_a_check_whose_clean_run_had_no_print_takes_the_next_one_s(tmp_path):
    """Its worker sends no print of a run with stderr; the next run that says the same,
    clean, gives the print its later jobs carry (the master makes none itself)."""
    w = World(tmp_path, "[any_to_any]\n/bin/true\n", confirm=1)
    scheduler, flow = _flow(w)
    job, result = _run(scheduler, flow, "db1", "up", T0)
    flow.result(job, result._replace(stderr="careful", fingerprint=None))
    job, result = _run(scheduler, flow, "db1", "up", T0 + 1)
    assert job.same is None                     # nothing to hold it against yet
    flow.result(job, result)
    job, _ = _run(scheduler, flow, "db1", "up", T0 + 2)
    assert job.same == _print("up")


def test_a_held_result_that_comes_after_a_newer_report_of_its_host_is_not_applied(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n", confirm=2)
    scheduler, flow = _flow(w)
    for i in range(3):
        job, result = _run(scheduler, flow, "db1", "up", T0 + i)
        flow.result(job, result)
    held, result = _run(scheduler, flow, "db1", "up", T0 + 10)      # ran, ended at T0 + 10
    assert held.same is not None
    w.report("db1", "down", T0 + 11)            # another check's report, made after it ended
    flow.result(held, result)                   # the held one comes in now
    assert w.host("db1")["pending"] == "down"   # in run order it came first: the candidate stays
    assert scheduler.runtimes[held.key].runs == 4      # and the run is counted, its last kept
    flow.result(*_run(scheduler, flow, "db1", "up", T0 + 12))      # up: the candidate goes
    assert w.host("db1")["pending"] is None
    # One handed while quiet that ended after the other's report is applied: its up,
    # made after that down, drops the candidate.
    job, result = _run(scheduler, flow, "db1", "up", T0 + 21)
    assert job.same is not None
    w.report("db1", "down", T0 + 20)
    flow.result(job, result)
    assert w.host("db1")["pending"] is None and w.ledger.state_of("db1") == "up"

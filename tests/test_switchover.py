"""Planned switchover and maintenance of one host (SPEC §12, issue 21).

The rules alone first (no process: a config, a state db, pinned times): --at's
TIME, every refusal and the words that say what to fix, the re-check when the run
starts, the expected transitions that run no section (and the one in the window
that is not expected, which runs its own), the settle time, a failed run ending
the expectation, a schedule that comes due or was missed, --cancel, host pauses.
Then the daemon: a switchover end to end with --wait, refusals and exit codes,
--at across a restart, --cancel, a host paused across a restart.  The cluster's
(a request on a follower run by the leader, host pauses cluster-wide) is in
test_cluster.py's style, on a real etcd, at the end.
"""

import datetime
import json
import os
import textwrap
import time

import pytest

import hadaemon.configfiles
import hadaemon.store
import hadaemon.ledger
import hadaemon.switchover
from hadaemon.actions import Alone
from hadaemon.base import ConfigError
from conftest import wait_for

T0 = 1_800_000_000.0

ACTIONS = """
    [any_to_any]
    note %HOST% %FROM% %TO%

    [switchover]
    note swo %FROM% %TO% %HOST% %MASTER% %SLAVE%
    """


# -- the rules alone ------------------------------------------------------------------------

class Book:
    """A config dir, a state db and a Ledger over them, as the daemon has them."""

    def __init__(self, tmp_path, actions=ACTIONS, daemon="interval = 10s\n"):
        self.root = tmp_path / "conf"
        (self.root / "actions").mkdir(parents=True)
        path = self.root / "actions" / "note"
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
        (self.root / "checks.conf").write_text(
            "[daemon]\n%s[local]\nhost = db1\n/bin/true\n[local]\nhost = db2\n/bin/true\n"
            "[local]\nhost = db3\ninterval = 2s\n/bin/false\n" % daemon)
        (self.root / "actions.conf").write_text(textwrap.dedent(actions))
        self.config = hadaemon.configfiles.load_config(str(self.root))
        self.state = tmp_path / "state"
        self.state.mkdir(mode=0o700, exist_ok=True)
        self.open()

    def open(self):
        """The ledger as a (re)started daemon reads it."""
        self.store = hadaemon.store.Store(str(self.state))
        self.store.open()
        self.ledger = hadaemon.ledger.Ledger(self.store, str(self.state), self.config)
        self.ledger.open(T0)
        self.desk = hadaemon.switchover.SwitchoverDesk(self.ledger, Alone())
        self.checks = {c.host: c for c in self.config.checks}

    def close(self):
        self.store.close()

    def report(self, host, state, now):
        return self.ledger.report(host, state, self.checks[host], now)

    def pair(self, now=T0):
        """db1 master, db2 slave (their runs ended ok)."""
        self.report("db1", "master", now)
        self.report("db2", "slave", now)
        while self.ledger.head() is not None:
            self.run_to_end("ok", now)

    def run_to_end(self, state, now, reason=None):
        run = self.ledger.head()
        self.start(run, now)
        self.ledger.finish(run, state, reason, now + 1)
        return run

    def start(self, run, now):
        """What ActionRuns.start_next does with the head of the queue: the re-check, then start."""
        why = hadaemon.switchover.cannot_start(self.ledger, run, now)
        if why:
            self.ledger.dequeue(run, why[0], why[1], now)
            return False
        self.ledger.start(run, self.ledger.commands_for(run, self.config), None, str(self.root), now)
        return True

    def ask(self, to, now, **fields):
        return self.desk.answer(dict(fields, cmd="switchover", op="ask", to=to), now)


def test_parse_at():
    now = datetime.datetime(2026, 12, 6, 13, 30, 20).timestamp()
    at = hadaemon.switchover.parse_at
    assert at("14:05", now) == datetime.datetime(2026, 12, 6, 14, 5).timestamp()
    assert at("13:30", now) == datetime.datetime(2026, 12, 7, 13, 30).timestamp()     # the next
    assert at("2027-01-02 03:04", now) == datetime.datetime(2027, 1, 2, 3, 4).timestamp()
    assert at("+10m", now) == now + 600 and at("+90s", now) == now + 90
    for bad in ("25:00", "tomorrow", "+", "+10x", "2026-13-01 10:00", ""):
        with pytest.raises(ValueError, match=r"bad TIME|duration"):
            at(bad, now)


def test_the_config_keys_and_sections(tmp_path):
    book = Book(tmp_path, ACTIONS + "\n[db2: switchover]\nnote %TO%\n",
                daemon="switchover_role = Primary\nswitchover_candidate = replica\nswitchover_settle = 5s\n")
    d = book.config.daemon
    assert (d.switchover_role, d.switchover_candidate, d.switchover_settle) == ("primary", "replica", 5.0)
    assert book.config.switchover_section("db2").name == "db2: switchover"
    assert book.config.switchover_section("db1").name == "switchover"
    assert book.config.section_for("db1", "master", "slave").name == "any_to_any"
    defaults = Book(tmp_path / "d").config.daemon
    assert (defaults.switchover_role, defaults.switchover_candidate, defaults.switchover_settle) == \
        ("master", "slave", 30.0)
    (book.root / "checks.conf").write_text("[daemon]\nswitchover_role = a_to_b\nswitchover_settle = x\n")
    with pytest.raises(ConfigError) as err:
        hadaemon.configfiles.load_config(str(book.root))
    text = "\n".join(err.value.errors)
    assert "checks.conf:2: switchover_role must be a state word, got 'a_to_b'" in text
    assert "checks.conf:3:" in text


REFUSALS = [
    # (what the test does first, host asked, --from, the reason's words)
    ("no section", "db2", None, "has no [switchover] section (nor [db2: switchover]): add one"),
    ("", "db9", None, "db9 has never been seen: no check has reported it (hosts known: db1, db2)"),
    ("db2 down", "db2", None, "db2 is down, not slave (switchover_candidate = slave): only a slave "
                              "can take the master role"),
    ("", "db1", None, "db1 is already master (switchover_role = master): nothing to move"),
    ("db1 slave", "db2", None, "no hosts are master (switchover_role = master): a switchover moves "
                               "the role from the one host that holds it"),
    ("db3 master", "db2", None, "2 hosts are master (db1, db3)"),
    ("", "db2", "db3", "--from db3, but db1 is the master (leave out --from, or name db1)"),
    ("old report", "db2", None, "db2's last report is 41 s old (its check interval is 10 s): is its "
                                "check running?"),
    ("paused", "db2", None, "actions are paused (hadaemon --resume, then ask again)"),
    ("db1 paused", "db2", None, "actions are paused for db1 (hadaemon --resume db1, then ask again)"),
    ("queued", "db2", None, "switchover run #3 (db1 -> db2) is queued: wait for it to end, or "
                            "hadaemon --switchover --cancel"),
    ("scheduled", "db2", None, "a switchover db1 -> db2 is scheduled at "),
]


@pytest.mark.parametrize("setup,to,frm,words", REFUSALS, ids=[r[0] or r[3][:20] for r in REFUSALS])
def test_every_refusal_says_what_to_fix_and_queues_nothing(tmp_path, setup, to, frm, words):
    book = Book(tmp_path, "[any_to_any]\nnote\n" if setup == "no section" else ACTIONS)
    book.pair()
    now = T0 + 1
    if setup in ("db2 down", "db1 slave", "db3 master"):
        host, state = setup.split()
        book.report(host, state, now)
    elif setup == "old report":
        now = T0 + 41
    elif setup == "paused":
        book.ledger.set_paused(True)
    elif setup == "db1 paused":
        book.ledger.store.set_hosts_paused(["db1"], True)
    elif setup in ("queued", "scheduled"):
        first = book.ask("db2", now, at=now + 3600 if setup == "scheduled" else None)
        assert first["ok"], first
    runs, queue, sched = dict(book.ledger.runs), list(book.ledger.queue), book.ledger.book.get("scheduled")
    answer = book.ask(to, now, **{"from": frm})
    assert answer["ok"] is False and words in answer["errors"][0], answer
    assert (dict(book.ledger.runs), book.ledger.queue, book.ledger.book.get("scheduled")) == (runs, queue, sched)


def test_a_switchover_runs_and_its_own_transitions_run_no_section(tmp_path):
    book = Book(tmp_path)
    book.pair()
    answer = book.ask("db2", T0 + 1)
    assert answer["ok"] and answer["stored"] and answer["run"]["state"] == "queued", answer
    run = book.ledger.runs[answer["run"]["id"]]
    assert (run.section, run.host, run.frm, run.to, run.transition) == ("switchover", "db2", "db1", "db2", None)
    assert run.summary()["switchover"] == {"from": "db1", "to": "db2"}
    assert run.env["HA_TRANSITION"] == "switchover" and (run.env["HA_FROM"], run.env["HA_TO"],
                                                         run.env["HA_HOST"]) == ("db1", "db2", "db2")
    # db3 turns up while it waits: the variables are the states when it starts.
    book.report("db3", "slave", T0 + 2)             # its own run queued after the switchover
    assert book.start(run, T0 + 3)
    assert run.commands[0].argv[1:] == ["swo", "db1", "db2", "db2", "db1", "db2,db3"]
    assert run.env["HA_SLAVE"] == "db2,db3"
    # Its own two transitions are recorded, with its id, and run nothing; db1 going on
    # from slave, and db3's, run their sections.
    tr1 = book.report("db1", "slave", T0 + 4)
    tr2 = book.report("db2", "master", T0 + 4)
    assert (tr1.run, tr1.switchover, tr2.run, tr2.switchover) == (None, run.id, None, run.id)
    assert tr2.to_json()["switchover"] == run.id
    book.ledger.finish(run, "ok", None, T0 + 5)
    unrelated = book.report("db3", "down", T0 + 6)
    assert unrelated.run is not None and unrelated.switchover is None
    again = book.report("db1", "down", T0 + 7)      # FROM's second transition: its section
    assert again.run is not None and again.switchover is None
    # The history: the switchover is an entry of its own, in time order.
    entries = book.ledger.history(20)
    kinds = [(e["id"], e.get("switchover")) for e in entries]
    assert kinds[:6] == [(again.id, None), (unrelated.id, None), (tr2.id, run.id), (tr1.id, run.id),
                         (3, None), (None, {"from": "db1", "to": "db2"})], kinds     # 3: db3's
    # It all survives a restart (the book with the rest).
    book.close()
    book.open()
    assert book.ledger.book["expect"]["to_done"] and book.ledger.transitions[-3].switchover == run.id


def test_the_settle_time_and_a_failed_run_end_the_expectation(tmp_path):
    book = Book(tmp_path, daemon="switchover_settle = 10s\n")
    book.pair()
    run = book.ledger.runs[book.ask("db2", T0 + 1)["run"]["id"]]
    book.run_to_end("ok", T0 + 1)                   # ended at T0 + 2: expected until T0 + 12
    assert book.report("db1", "slave", T0 + 12).switchover == run.id
    late = book.report("db2", "master", T0 + 12.5)
    assert late.switchover is None and late.run is not None
    # A new switchover during the settle time is fine; one that fails ends it at once.
    book.run_to_end("ok", T0 + 13)
    second = book.ledger.runs[book.ask("db1", T0 + 14)["run"]["id"]]
    assert book.start(second, T0 + 15)
    first = book.report("db2", "slave", T0 + 16)
    assert first.switchover == second.id
    book.ledger.finish(second, "failed", "x", T0 + 17)
    after = book.report("db1", "master", T0 + 18)
    assert after.switchover is None and after.run is not None
    assert book.ledger.book["expect"] is None


def test_every_refusal_is_checked_again_when_the_run_starts(tmp_path):
    book = Book(tmp_path)
    book.pair()
    run = book.ledger.runs[book.ask("db2", T0 + 1)["run"]["id"]]
    book.ledger.store.set_hosts_paused(["db2"], True)        # a pause begun meanwhile
    assert not book.start(run, T0 + 2)
    assert run.state == "failed" and run.reason.startswith("actions are paused for db2") and not run.commands[0].started
    assert book.ledger.book.get("expect") is None and book.ledger.queue == []
    book.ledger.store.set_hosts_paused(["db2"], False)
    # db2 went down meanwhile: failed, saying so; nothing expected.
    run = book.ledger.runs[book.ask("db2", T0 + 3)["run"]["id"]]
    book.report("db2", "down", T0 + 4)              # (its own run is queued after it)
    assert not book.start(book.ledger.head(), T0 + 4)
    assert run.state == "failed" and run.reason.startswith("db2 is down, not slave"), run.reason


def test_a_schedule_comes_due_is_missed_or_cancelled(tmp_path):
    book = Book(tmp_path)
    book.pair()
    answer = book.ask("db2", T0 + 1, at=T0 + 100)
    assert answer["scheduled"] == {"from": "db1", "to": "db2", "at": T0 + 100} and answer["run"] is None
    assert book.ledger.daemon_status()["switchover"] == answer["scheduled"]
    book.desk.tick(T0 + 99)
    assert book.ledger.queue == []
    # It survives a restart, and is queued when it comes due (its refusals checked then).
    book.close()
    book.open()
    book.report("db2", "slave", T0 + 99)
    book.desk.tick(T0 + 101)
    run = book.ledger.runs[book.ledger.queue[0]]
    assert run.switchover["request"] == answer["request"] and book.ledger.book["scheduled"] is None
    assert book.desk.request_state(answer["request"])["run"]["id"] == run.id
    # --cancel drops a queued one ...
    cancel = book.desk.answer({"cmd": "switchover", "op": "cancel"}, T0 + 102)
    assert cancel["ok"] and cancel["cancelled"] == "db1 -> db2 (run #%d, queued)" % run.id
    assert run.state == "skipped" and "cancelled" in run.reason and book.ledger.queue == []
    # ... and a scheduled one; with none left it says so.
    book.ask("db2", T0 + 103, at=T0 + 200)
    cancel = book.desk.answer({"cmd": "switchover", "op": "cancel"}, T0 + 104)
    assert cancel["cancelled"].startswith("db1 -> db2 scheduled at") and book.ledger.book["scheduled"] is None
    again = book.desk.answer({"cmd": "switchover", "op": "cancel"}, T0 + 105)
    assert not again["ok"] and "nothing to cancel" in again["errors"][0]
    # A time more than 60 s past when the daemon first can act: dropped, nothing queued.
    book.ask("db2", T0 + 106, at=T0 + 300)
    book.report("db2", "slave", T0 + 361)
    book.desk.tick(T0 + 361)
    assert book.ledger.book["scheduled"] is None and book.ledger.queue == []
    # One that comes due while a refusal holds: recorded failed, with the reason.
    book.ask("db2", T0 + 362, at=T0 + 400)
    book.ledger.set_paused(True)
    book.report("db2", "slave", T0 + 400)
    book.desk.tick(T0 + 400)
    last = list(book.ledger.runs.values())[-1]
    assert last.switchover and last.state == "failed" and last.reason.startswith("actions are paused")


def test_host_pause_skips_that_hosts_runs_and_survives_a_restart(tmp_path):
    book = Book(tmp_path)
    book.pair()
    answer = book.desk.answer({"cmd": "hostpause", "hosts": ["db2", "db7"], "paused": True}, T0)
    assert answer["paused_hosts"] == ["db2", "db7"]
    book.close()
    book.open()
    assert book.ledger.store.paused_hosts() == {"db2", "db7"} and not book.ledger.paused
    tr = book.report("db2", "down", T0 + 1)
    run = book.ledger.runs[tr.run]
    assert (run.state, run.reason) == ("skipped", "paused db2")
    other = book.ledger.runs[book.report("db1", "slave", T0 + 1).run]
    assert other.state == "queued"
    assert book.ledger.host_status("db2")["paused"] and not book.ledger.host_status("db1")["paused"]
    assert book.ledger.daemon_status()["paused_hosts"] == ["db2", "db7"]
    # Queued before the pause: skipped when its turn comes.
    book.ledger.store.set_hosts_paused(["db1"], True)
    book.start(other, T0 + 2)
    assert (other.state, other.reason) == ("skipped", "paused db1")
    # The global switch never changes a host's pause.
    book.ledger.set_paused(True)
    book.ledger.set_paused(False)
    assert book.ledger.store.paused_hosts() == {"db1", "db2", "db7"}
    bad = book.desk.answer({"cmd": "hostpause", "hosts": ["db1;x"], "paused": True}, T0)
    assert not bad["ok"] and bad["usage"]


def test_status_page_metrics_and_rerun_show_it(tmp_path):
    import hadaemon.client
    import hadaemon.http_views
    book = Book(tmp_path)
    book.pair()
    book.ledger.store.set_hosts_paused(["db2", "db9"], True)
    book.ledger.store.set_hosts_paused(["db2"], False)
    book.ledger.store.set_hosts_paused(["db1"], True)
    book.desk.answer({"cmd": "hostpause", "hosts": ["db1"], "paused": False}, T0)
    answer = book.ask("db2", T0 + 1, at=T0 + 7200)
    book.ledger.store.set_hosts_paused(["db2"], True)
    book.close()
    doc, _ = hadaemon.client.offline_status(str(book.state), book.config)
    assert doc["daemon"]["switchover"] == answer["scheduled"] and doc["daemon"]["paused_hosts"] == ["db2", "db9"]
    assert doc["hosts"]["db2"]["paused"] is True and doc["hosts"]["db1"]["paused"] is False
    text = hadaemon.client.render_status(doc)
    assert "ACTIONS PAUSED FOR db2, db9 (hadaemon --resume HOST...)" in text
    assert "switchover db1 -> db2 scheduled at " in text and "\ndb2 PAUSED " in text, text
    metrics = hadaemon.http_views.render_metrics(doc)
    for host, value in (("db1", 0), ("db2", 1), ("db9", 1)):
        assert 'hadaemon_host_paused{host="%s"} %d\n' % (host, value) in metrics, metrics
    page = hadaemon.http_views.render_page(doc, T0)
    assert "ACTIONS PAUSED FOR db2, db9" in page and "switchover db1 &rarr; db2 scheduled at" in page
    # A switchover's run is not re-run: it is asked again.
    book.open()
    book.ledger.store.set_hosts_paused(["db2"], False)
    run = book.ledger.queue_switchover("db1", "db2", "r", "a refusal", T0 + 2)     # failed at once
    with pytest.raises(ValueError, match=r"run #%d is a switchover: ask for it again" % run.id):
        book.ledger.rerun(run.id, T0 + 3)


# -- the daemon ------------------------------------------------------------------------------

def pair_config(d, settle="30s"):
    """db1, db2, db3 by check_role; every transition records itself; [switchover] records,
    then flips FROM to slave and TO to master (the checks see it while it runs)."""
    d.role_check()
    d.recorder()
    d.script("actions/flip", """
        echo slave > "%(w)s/.$1" && mv "%(w)s/.$1" "%(w)s/$1"
        echo master > "%(w)s/.$2" && mv "%(w)s/.$2" "%(w)s/$2"
        sleep 1
    """ % {"w": d.world})
    d.write("checks.conf", """
        [daemon]
        interval = 200ms
        switchover_settle = %s
        [local]
        check_role db1
        check_role db2
        check_role db3
    """ % settle)
    d.write("actions.conf", """
        [any_to_any]
        record %HOST% %FROM% %TO%

        [switchover]
        record swo %FROM% %TO% %HOST% %MASTER% %SLAVE%
        flip %FROM% %TO%
    """)
    d.set("db1", "master")
    d.set("db2", "slave")
    d.set("db3", "slave")


def start_pair(d):
    d.start()
    d.wait_runs(3)


def test_a_switchover_end_to_end_with_wait(daemon):
    d = daemon
    pair_config(d)
    result = d.cli("--switchover", "db2")
    assert result.returncode == 3 and "not running" in result.stderr, result
    start_pair(d)
    # Refused: exit 1 with the reason, nothing queued; bad arguments: exit 2.
    for args, code, words in [
            (("db1",), 1, "db1 is already master (switchover_role = master): nothing to move"),
            (("db9",), 1, "db9 has never been seen"),
            (("db2", "--from", "db3"), 1, "--from db3, but db1 is the master"),
            (("db;2",), 2, "bad host name 'db;2'"),
            (("db2", "--from", "a b"), 2, "bad host name 'a b'"),
            (("db2", "--at", "25:99"), 2, "bad TIME '25:99'"),
            (("--cancel",), 1, "nothing to cancel"),
            (("db2", "--cancel"), 2, "--switchover --cancel takes no host")]:
        result = d.cli("--switchover", *args)
        assert result.returncode == code and words in result.stderr, (args, result)
    assert len(d.runs()) == 3
    result = d.cli("--switchover", "db2", "--wait", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "switchover db1 -> db2: run #4 queued" in result.stdout
    assert "run #4 [switchover]: ok\n  record swo db1 db2 db2 db1 db2,db3  -> ok\n  flip db1 db2  -> ok" \
        in result.stdout, result.stdout
    d.wait_state("db1", "slave")
    d.wait_state("db2", "master")
    # An unrelated transition in the settle time runs its section.
    d.set("db3", "down")
    wait_for(lambda: any(line.startswith("db3 slave down") for line in d.actions_log()), timeout=10,
             what="db3's own section to run")
    log = d.actions_log()
    assert "swo db1 db2 db2 db1 db2,db3 | switchover db2 master=db1 slave=db2,db3 run=4" in log, log
    assert not any(line.startswith(("db1 master", "db2 slave")) for line in log), log
    doc = d.status()
    swo = [r for r in doc["runs"] if r["id"] == 4][0]
    assert swo["switchover"] == {"from": "db1", "to": "db2"} and swo["section"] == "switchover"
    own = [t for t in doc["transitions"] if t.get("switchover") == 4]
    assert sorted((t["host"], t["from"], t["to"], t["run"]) for t in own) == [
        ("db1", "master", "slave", None), ("db2", "slave", "master", None)]
    history = json.loads(d.cli("--history", "--json", check=True).stdout)
    assert [e["switchover"] for e in history if isinstance(e.get("switchover"), dict)] == \
        [{"from": "db1", "to": "db2"}]
    text = d.cli("--history", check=True).stdout
    assert "switchover db1 -> db2 (asked)" in text and "expected by switchover run #4: no action section" in text
    # And back, with --from; then a failing one: --wait exits 1 and the usual sections take over.
    result = d.cli("--switchover", "db1", "--from", "db2", "--wait", "--timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    d.wait_state("db1", "master")
    d.script("actions/flip", "exit 3\n")
    result = d.cli("--switchover", "db2", "--wait", "--timeout", "30")
    assert result.returncode == 1 and "[switchover]: failed" in result.stdout, result.stdout + result.stderr
    d.set("db1", "slave")
    d.set("db2", "master")
    wait_for(lambda: {"db1 master slave", "db2 slave master"} <= {line.split(" |")[0] for line in d.actions_log()},
             timeout=10, what="the usual sections after a failed switchover")


def test_at_survives_a_restart_and_cancel(daemon):
    d = daemon
    pair_config(d)
    start_pair(d)
    result = d.cli("--switchover", "db2", "--at", "+1h")
    assert result.returncode == 0 and "switchover db1 -> db2 scheduled at " in result.stdout, result
    sched = d.status()["daemon"]["switchover"]
    assert (sched["from"], sched["to"]) == ("db1", "db2") and 3590 < sched["at"] - time.time() <= 3600
    assert "switchover db1 -> db2 scheduled at" in d.cli("--status").stdout
    result = d.cli("--switchover", "db2")
    assert result.returncode == 1 and "is scheduled at" in result.stderr and "--cancel first" in result.stderr
    result = d.cli("--switchover", "--cancel")
    assert result.returncode == 0 and "cancelled" in result.stdout, result
    assert d.status()["daemon"]["switchover"] is None
    # Scheduled, then the daemon stops and starts again before the time: it runs then.
    result = d.cli("--switchover", "db2", "--at", "+4s")
    assert result.returncode == 0, result
    at = d.status()["daemon"]["switchover"]["at"]
    assert d.stop() == 0
    d.proc = None
    assert d.status()["daemon"]["switchover"]["at"] == at        # the state db has it
    d.start()
    run = wait_for(lambda: [r for r in d.runs() if r.get("switchover") and r["state"] == "ok"], timeout=20,
                   what="the scheduled switchover to run after the restart (%s)" % d.tail())[0]
    assert run["queued"] >= at and d.status()["daemon"]["switchover"] is None
    assert "switchover scheduled: db1 -> db2" in d.log()


def test_host_pause_across_a_restart(daemon):
    d = daemon
    pair_config(d)
    start_pair(d)
    result = d.cli("--pause", "db2")
    assert result.returncode == 0 and "actions paused for db2" in result.stdout, result
    assert d.cli("--pause", "db2", "no;pe").returncode == 2
    d.stop()
    d.proc = None
    result = d.cli("--pause", "db3")                    # no daemon: written to the state db
    assert result.returncode == 0, result
    doc = d.status()
    assert doc["daemon"]["paused_hosts"] == ["db2", "db3"] and doc["hosts"]["db2"]["paused"]
    d.start()
    doc = d.status()
    assert doc["daemon"]["paused_hosts"] == ["db2", "db3"] and not doc["daemon"]["paused"]
    assert "db2 PAUSED" in d.cli("--status").stdout
    d.set("db2", "down")
    d.set("db1", "slave")
    runs = d.wait_runs(5)
    by_host = {r["host"]: r for r in runs[3:]}
    assert (by_host["db2"]["state"], by_host["db2"]["reason"]) == ("skipped", "paused db2")
    assert by_host["db1"]["state"] == "ok"
    # The global switch leaves host pauses alone; --resume HOST ends one.
    assert d.cli("--pause").returncode == 0 and d.cli("--resume").returncode == 0
    assert d.status()["daemon"]["paused_hosts"] == ["db2", "db3"]
    assert d.cli("--resume", "db2", "db3").returncode == 0
    assert d.status()["daemon"]["paused_hosts"] == [] and not d.status()["hosts"]["db2"]["paused"]
    d.set("db2", "slave")
    assert d.wait_runs(6)[-1]["host"] == "db2" and d.wait_runs(6)[-1]["state"] == "ok"


# -- a cluster (SPEC §12's cluster paragraph), on a real etcd ---------------------------------

@pytest.fixture
def etcd(tmp_path):
    """Three etcd members of this test's own (tests/etcd.py)."""
    from etcd import ETCD, EtcdCluster
    if not os.path.exists(ETCD):
        pytest.skip("etcd-server is not installed")
    cluster = EtcdCluster(tmp_path / "etcd")
    os.mkdir(cluster.root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_a_cluster_takes_the_request_anywhere_and_pauses_hosts_everywhere(tmp_path, etcd):
    """A follower takes --switchover (and --wait), the leader runs it once, its own
    transitions run nothing on any member; --pause HOST on another follower pauses
    that host cluster-wide; a scheduled switchover and host pauses show on every
    member from its copy of the ledger."""
    from test_cluster import HaCluster
    cl = HaCluster(tmp_path, etcd, hosts=("db1", "db2"))
    shared = tmp_path / "swo.log"
    worlds = " ".join(str(d.world) for d in cl.daemons.values())
    try:
        for d in cl.daemons.values():
            d.script("actions/flip", """
                echo "$HA_NODE $HA_TRANSITION $HA_FROM $HA_TO $*" >> "%s"
                for w in %s; do
                    echo slave > "$w/.$1" && mv "$w/.$1" "$w/$1"
                    echo master > "$w/.$2" && mv "$w/.$2" "$w/$2"
                done
                sleep 1
            """ % (shared, worlds))
            d.write("actions.conf", "[any_to_any]\nact 1\n[switchover]\nflip %FROM% %TO%\n")
        cl.set("db1", "master")
        cl.set("db2", "slave")
        cl.start()
        leader, _ = cl.leader()
        cl.wait_settled({"db1": "master", "db2": "slave"})
        follower, other = [n for n in cl.daemons if n != leader]
        before = len(cl.commands())
        result = cl.daemons[follower].cli("--switchover", "db2", "--wait", "--timeout", "60")
        assert result.returncode == 0, result.stdout + result.stderr + cl.tails()
        assert "[switchover]: ok on %s, epoch" % leader in result.stdout, result.stdout
        cl.wait_settled({"db1": "slave", "db2": "master"})
        lines = shared.read_text().splitlines()
        assert lines == ["%s switchover db1 db2 db1 db2" % leader], lines
        assert len(cl.commands()) == before         # its own transitions ran no [any_to_any]
        for node in cl.daemons:                     # every member's copy
            doc = cl.status(node)
            swo = [r for r in doc["runs"] if r.get("switchover")]
            assert [(r["switchover"], r["state"], r["node"]) for r in swo] == \
                [({"from": "db1", "to": "db2"}, "ok", leader)], (node, swo)
            own = sorted((t["host"], t["to"]) for t in doc["transitions"] if t.get("switchover") == swo[0]["id"])
            assert own == [("db1", "slave"), ("db2", "master")], (node, doc["transitions"])
        # A refusal on a member is its own: exit 1, nothing stored.
        result = cl.daemons[other].cli("--switchover", "db2")
        assert result.returncode == 1 and "db2 is already master" in result.stderr, result

        # Host pause on the other follower: cluster-wide, on every member's status.
        result = cl.daemons[other].cli("--pause", "db1")
        assert result.returncode == 0 and "cluster test: actions paused for db1" in result.stdout, result
        wait_for(lambda: all(cl.status(n)["daemon"]["paused_hosts"] == ["db1"] and
                             cl.status(n)["hosts"]["db1"]["paused"] for n in cl.daemons), timeout=10,
                 what="every member to show db1 paused")
        cl.set("db1", "down")
        cl.wait_settled({"db1": "down"})
        run = [r for r in cl.status(follower)["runs"] if r["host"] == "db1"][0]
        assert (run["state"], run["reason"]) == ("skipped", "paused db1")
        assert len(cl.commands()) == before
        # A scheduled switchover shows on every member; --cancel on another drops it.
        cl.daemons[leader].cli("--resume", "db1", check=True)
        cl.set("db1", "slave")
        cl.wait_settled({"db1": "slave"})
        result = cl.daemons[follower].cli("--switchover", "db1", "--at", "+1h")
        assert result.returncode == 0, result
        wait_for(lambda: all((cl.status(n)["daemon"]["switchover"] or {}).get("to") == "db1"
                             for n in cl.daemons), timeout=10, what="every member to show the schedule")
        assert "switchover db2 -> db1 scheduled at" in cl.daemons[other].cli("--status").stdout
        assert cl.daemons[other].cli("--switchover", "--cancel").returncode == 0
        wait_for(lambda: all(cl.status(n)["daemon"]["switchover"] is None for n in cl.daemons),
                 timeout=10, what="every member to show it cancelled")
        assert cl.daemons[leader].cli("--switchover", "--cancel").returncode == 1
    finally:
        cl.cleanup()

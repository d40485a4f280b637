"""The typed records (src/hadaemon/records.py): each conversion round trip, the wire
forms byte for byte as the dicts built by hand before them, and malformed messages
read the way the master always read them.

No processes.
"""

import json
import time

import pytest

import hadaemon.base
import hadaemon.client
import hadaemon.config
import hadaemon.cluster_member
import hadaemon.pool
import hadaemon.records
import hadaemon.scheduler
import hadaemon.store
import hadaemon.wire
from hadaemon.base import run_steps
from hadaemon.records import CheckResult, ClusterStatus, DaemonBlock, Job, StatusDoc

enc = hadaemon.wire.encode_message


# -- Job ------------------------------------------------------------------------------

ENV = {"HA_CHECK": "check_role db1", "HA_SCOPE": "local", "HA_STATE": "master",
       "HA_CONFIG_DIR": "/etc/hadaemon", "HA_STATE_DIR": "/var/lib/hadaemon"}


def test_job_to_wire_is_the_message_the_scheduler_built():
    job = Job(7, "k1", ["/bin/check", "db1"], ENV, 10.0, at=123.5, same=42)
    assert enc(job.to_wire()) == enc({"t": "job", "id": 7, "at": 123.5, "same": 42, "key": "k1",
                                      "timeout": 10.0, "env": ENV, "argv": ["/bin/check", "db1"]})
    ssh = Job(8, "k2", ["ssh", "-T", "db1", "sh"], ENV, 5.0, "/bin/check", True, 9.0)
    assert enc(ssh.to_wire()) == enc({"t": "job", "id": 8, "at": 9.0, "same": None, "key": "k2",
                                      "timeout": 5.0, "env": ENV, "argv": ["ssh", "-T", "db1", "sh"],
                                      "stdin": "/bin/check", "ssh": True})


@pytest.mark.parametrize("job", [
    Job(7, "k1", ["/bin/check"], ENV, 10.0, at=5.5, same=3),
    Job(8, "k2", ["ssh", "db1"], ENV, 5.0, "/bin/check", True),
    Job(9, "k3", ["ssh", "db1"], ENV, 5.0, None, True),
])
def test_job_round_trip_leaves_the_masters_own_fields_behind(job):
    handed = Job(**{**job.__dict__, "sent": 12.5, "sent_wall": time.time()})
    msg = json.loads(enc(handed.to_wire()))
    assert "sent" not in msg and "sent_wall" not in msg
    assert Job.from_wire(msg) == job


@pytest.mark.parametrize("missing", ["id", "at", "key", "argv", "env", "timeout"])
def test_a_job_without_a_field_is_refused(missing):
    msg = Job(7, "k1", ["/bin/check"], ENV, 10.0).to_wire()
    del msg[missing]
    with pytest.raises(KeyError):
        Job.from_wire(msg)


def test_pool_hands_the_job_and_keeps_its_times(tmp_path):
    pool = hadaemon.pool.Pool(str(tmp_path / "sock"), str(tmp_path))
    child = hadaemon.pool.Child(4242, "worker", "idle", 0.0)
    job = Job(3, "k", ["/bin/true"], ENV, 10.0)
    assert pool.hand(child, job, 55.0) == enc(job.to_wire())
    assert child.jobs == {3: job} and job.sent == 55.0 and job.sent_wall is not None
    assert child.state == "busy"
    later = Job(4, "k2", ["/bin/true"], ENV, 10.0, at=56.0)
    pool.hand(child, later, 55.0)                   # a worker is handed jobs ahead
    assert list(child.jobs) == [3, 4] and child.state == "busy"


def _check(name, host="db1", group_host="db1"):
    group = hadaemon.config.Group(hadaemon.config.Scope("local"), "checks.conf:1", 1.0, None, 5.0, 1, group_host)
    return hadaemon.config.Check("local|%s|%s" % (host, name), name, ("/bin/check", "é", name), host, group,
                                 "checks.conf:2")


def test_the_schedulers_job_line_is_the_message_encoded():
    # The part after the id is kept per check: the line must stay what to_wire()
    # encodes whatever changed between runs (HA_STATE, the dirs, a reload).
    checks = [_check("check_role db1"), _check("ünïcode \u2028 \\ \"q\"", "db2", "db2"),
              _check("no HA_HOST", "db3", None)]
    scheduler = hadaemon.scheduler.Scheduler()
    scheduler.configure(checks, 100.0)
    states = {"db1": "master", "db2": "standby"}
    sent = []

    def run_all(config_dir="/conf", state_dir="/state"):
        for rt in scheduler.runtimes.values():
            scheduler.enqueue(rt, 1000.0)
        while scheduler.ready:
            job = scheduler.take(1000.0, lambda host: states.get(host, "unknown"), config_dir, state_dir)
            assert job.line is not None and job.to_line() == job.line == enc(job.to_wire())
            sent.append(job)
            scheduler.finished(job.key, CheckResult(job.id, job.key, {}, False, 0, None, 1.0, 0.1, None))

    run_all()
    kept = [rt.job_tail for rt in scheduler.runtimes.values()]
    assert all(kept)
    run_all()                                           # made from what was kept
    assert [rt.job_tail for rt in scheduler.runtimes.values()] == kept
    states["db1"] = "standby"                           # HA_STATE changed
    run_all()
    run_all(config_dir="/other")
    run_all(state_dir="/other")
    run_all()
    changed = hadaemon.config.Check(**dict(checks[0].__dict__, argv=("/bin/other",)))
    scheduler.swap(run_steps(scheduler.plan_steps([changed] + checks[1:])), 200.0)    # a reload
    run_all()
    assert sent[-3].argv == ["/bin/other"] and b'"argv":["/bin/other"]' in sent[-3].line
    assert len({job.id for job in sent}) == len(sent) == 21


def test_a_result_that_says_the_same_again_makes_what_the_whole_way_makes(caplog):
    # Scheduler.finished takes what a clean run said before when the next says the
    # same: its reports, last and log must be what deriving it all again gives.
    up = {"state": "up", "lag": "3", "message": "fine"}
    runs = [(up, 0, False, None), (up, 0, False, None), (up, 0, False, "a warning\n"), (up, 0, False, None),
            (up, 1, False, None), (up, 1, False, None), ({"state": "unknown"}, None, True, None), (up, 0, False, None),
            (up, 0, False, None), (dict(up, host="db9"), 0, False, None), (dict(up, host="db9"), 0, False, None),
            ({"host": "b a d"}, 0, False, None), ({"host": "b a d"}, 0, False, None),
            ({"state": "up", "n": 1}, 0, False, None), ({"state": "up", "n": 1.0}, 0, False, None),
            ({"state": "up", "n": True}, 0, False, None), ({"lag": "3", "state": "up", "message": "fine"}, 0, False, None),
            ({}, 2, False, None), ({}, 2, False, None), (up, True, False, None), (up, 1, False, None)]
    made = []
    for whole_way in (False, True):
        scheduler = hadaemon.scheduler.Scheduler()
        scheduler.configure([_check("c")], 100.0)
        rt = scheduler.runtimes["local|db1|c"]
        caplog.clear()
        out = []
        for i, (data, code, failed, stderr) in enumerate(runs):
            if whole_way:
                rt.said = None
            result = CheckResult.from_wire(json.loads(enc(dict(RESULT, job=i, data=data, exit=code,
                                                                failed=failed, started=1000.0 + i,
                                                                duration=0.01 * i, stderr=stderr))))
            rt_, reports = scheduler.finished("local|db1|c", result)
            out.append((reports, enc(rt.last), rt.hosts, rt.runs))
        made.append((out, [(r.levelname, r.getMessage()) for r in caplog.records]))
    assert made[0] == made[1]
    assert len([1 for record in made[0][1] if "rejected report" in record[1]]) == 2
    shortcuts = sum(1 for (a, _, _, _), (b, _, _, _) in zip(made[0][0], made[0][0][1:]) if a is b)
    assert shortcuts == 8       # runs 2, 3, 4, 6, 9, 11, 19, 21: the same data and exit as a clean run


def test_pool_manage_retires_the_extra_idle_the_late_and_the_hung(tmp_path, monkeypatch):
    # Its one look at the children each pass: who is counted, who is killed.
    signalled = []
    monkeypatch.setattr(hadaemon.pool.Child, "signal", lambda child, sig, deadline: signalled.append((child.pid, sig)))
    pool = hadaemon.pool.Pool(str(tmp_path / "sock"), str(tmp_path))
    pool.spawn_after = pool.runner_after = float("inf")         # nothing is forked here
    Child = hadaemon.pool.Child
    for child in (Child(1, "worker", "idle", 0.0), Child(2, "worker", "starting", 0.0),
                  Child(3, "worker", "busy", 0.0, jobs={1: Job(1, "k", [], ENV, 10.0, sent=40.0)}),
                  # hung by its time, but it answered since: its check started no earlier
                  Child(4, "worker", "busy", 0.0, jobs={2: Job(2, "k", [], ENV, 10.0, sent=40.0)},
                        answered=80.0),
                  Child(5, "worker", "exiting", 0.0), Child(6, "action", "starting", 0.0),
                  Child(7, "worker", "idle", 0.0), Child(8, "worker", "starting", 95.0)):
        pool.children[child.pid] = child
    config = hadaemon.config.Config(str(tmp_path), hadaemon.config.DaemonSettings(workers=5), [], [], {})
    pool.manage(config, 100.0, ssh=False)           # 6 live workers: 1 idle too many
    assert signalled == [(1, 15), (2, 9), (3, 9)]
    assert [pool.children[pid].state for pid in range(1, 9)] == [
        "exiting", "exiting", "exiting", "busy", "exiting", "starting", "idle", "starting"]
    del signalled[:]
    pool.manage(config, 100.0, ssh=False)           # 3 live, none late or hung
    assert signalled == []


# -- CheckResult -------------------------------------------------------------------------

RESULT = {"t": "result", "job": 3, "key": "k", "data": {"state": "up", "lag": "3"}, "failed": False,
          "exit": 0, "signal": None, "started": 1700000000.25, "duration": 0.004512, "trouble": None}


@pytest.mark.parametrize("msg", [
    RESULT,
    dict(RESULT, stderr="warning: something\n"),
    dict(RESULT, data={"state": "unknown", "message": "timed out after 10s"}, failed=True, exit=None,
         signal=9, trouble="timed out after 10s; output cut at 64 KiB"),
])
def test_check_result_round_trip(msg):
    result = CheckResult.from_wire(json.loads(enc(msg)))
    assert isinstance(result, CheckResult)
    assert enc(result.to_wire()) == enc(msg)        # same keys, same order, same values


def test_check_result_as_run_check_made_it():
    # The worker's message before the record: stderr only when the check wrote some.
    result = CheckResult(3, "k", {"state": "up"}, False, 0, None, 1.5, 0.25, None)
    assert list(result.to_wire()) == ["t", "job", "key", "data", "failed", "exit", "signal",
                                      "started", "duration", "trouble"]
    assert "stderr" not in result.to_wire()
    assert result._replace(stderr="oops").to_wire()["stderr"] == "oops"


@pytest.mark.parametrize("field, sent, read", [
    # What Scheduler.finished did with each field of a worker's message, kept.
    ("data", ["not", "a", "dict"], {}),
    ("data", "state=up", {}),
    ("data", None, {}),
    ("exit", "0", None),
    ("exit", 1.0, None),
    ("exit", 2, 2),
    ("failed", "yes", False),
    ("failed", 1, False),
    ("failed", True, True),
    ("trouble", 42, None),
    ("trouble", "cut short", "cut short"),
    ("stderr", "", None),
    ("stderr", "err", "err"),
    ("signal", "KILL", "KILL"),          # kept as sent (only the log line asks for an int)
])
def test_check_result_reads_a_malformed_message_as_the_master_always_did(field, sent, read):
    result = CheckResult.from_wire(dict(RESULT, **{field: sent}))
    assert getattr(result, field) == read
    assert type(getattr(result, field)) is type(read)


def test_check_result_of_a_message_missing_everything():
    result = CheckResult.from_wire({})
    assert result == CheckResult(None, None, {}, False, None, None, None, None, None, None)


def test_a_result_for_another_job_is_refused_by_the_pool(tmp_path):
    pool = hadaemon.pool.Pool(str(tmp_path / "sock"), str(tmp_path))
    child = hadaemon.pool.Child(4242, "worker", "idle", 0.0)
    job = Job(3, "k", ["/bin/true"], ENV, 10.0)
    pool.hand(child, job, 1.0)
    for msg in (dict(RESULT, job=4), dict(RESULT, t="hello"), {"job": 3}):
        with pytest.raises(hadaemon.base.ProtocolError):
            pool.job_done(child, msg)
    for msg in ({"t": "back", "jobs": [4]}, {"t": "back", "jobs": 3}, {"t": "back"}):
        with pytest.raises(hadaemon.base.ProtocolError):
            pool.given_back(child, msg)
    assert pool.job_done(child, RESULT) is job and child.jobs == {} and child.state == "idle"


def test_a_same_message_is_the_result_its_job_expected(tmp_path):
    pool = hadaemon.pool.Pool(str(tmp_path / "sock"), str(tmp_path))
    child = hadaemon.pool.Child(4242, "worker", "idle", 0.0)
    job = Job(3, "k", ["/bin/true"], ENV, 10.0, same=77)
    job.said = ((("state", "up"), ("lag", "3")), 0)
    pool.hand(child, job, 1.0)
    msg = {"t": "same", "job": 3, "started": 1700000000.25, "duration": 0.004512}
    assert pool.job_done(child, msg) is job
    result = CheckResult.from_same(job, msg)
    assert result == CheckResult(3, "k", {"state": "up", "lag": "3"}, False, 0, None, 1700000000.25,
                                 0.004512, None, None, 77)      # its print: the one it was handed
    assert CheckResult.from_same(job, {"t": "same", "job": 3, "started": "x"}).started is None


def test_the_result_of_a_worker_that_died():
    job = Job(3, "k", ["/bin/true"], ENV, 10.0, sent=100.0, sent_wall=1700000000.0)
    result = CheckResult.lost(job, "killed by SIGKILL", 102.5)
    assert result.data == {"state": "unknown", "message": "worker died (killed by SIGKILL) while running the check"}
    assert result.failed is True and result.exit is None and result.signal is None
    assert result.started == 1700000000.0 and result.duration == 2.5
    assert result.trouble is None and result.stderr is None
    ahead = Job(3, "k", ["/bin/true"], ENV, 10.0, at=101.0, sent=100.0, sent_wall=1700000000.0)
    result = CheckResult.lost(ahead, "killed by SIGKILL", 102.5)      # handed ahead: from its time
    assert result.started == 1700000001.0 and result.duration == 1.5


def test_to_last_is_the_checks_last_as_status_shows_it():
    data = {"state": "up", "host": "db1", "message": "m" * 600, "lag": "x" * 300, "n": [1] * 100}
    data.update(("a%02d" % i, i) for i in range(30))
    result = CheckResult(3, "k", data, False, 0, None, 1.5, 0.25, None, "e" * 3000)
    last = result.to_last([("db1", "up")], ["rejected report: bad host name '../x'"])
    assert list(last) == ["time", "duration", "exit", "signal", "reports", "message", "attributes",
                          "rejected", "stderr"]
    assert (last["time"], last["duration"], last["exit"], last["signal"]) == (1.5, 0.25, 0, None)
    assert last["reports"] == {"db1": "up"} and last["message"] == "m" * 500
    assert last["rejected"] == ("rejected report: bad host name '../x'",)
    assert last["stderr"] == "e" * 500
    # At most 20 of the output's fields, state/states/host/message left out; strings cut at
    # 200, other values shown by repr and cut.
    assert list(last["attributes"]) == ["lag", "n"] + ["a%02d" % i for i in range(15)]
    assert last["attributes"]["lag"] == "x" * 200
    assert last["attributes"]["n"] == hadaemon.wire._shorten([1] * 100, 200)
    assert last["attributes"]["a03"] == "3"
    assert "stderr" not in result._replace(stderr=None).to_last([], [])
    assert result._replace(data={"message": 5}).to_last([], [])["message"] is None


# -- The status document ------------------------------------------------------------------

SETTINGS = hadaemon.config.ClusterSettings(etcd=("http://10.0.0.1:2379", "http://10.0.0.2:2379"),
                                           name="c", node="a", ttl=6, quorum=2)


def online_daemon(cluster=None):
    return DaemonBlock(running=True, pid=123, version="1.0", started=1700000000.0, uptime=5.5,
                       config_dir="/etc/hadaemon", state_dir="/var/lib/hadaemon",
                       lag_ms={"p50": 0.1}, http="http://127.0.0.1:8080/", counters={"transitions": []},
                       paused=False, queue=[4], workers=[{"pid": 5, "state": "idle"}], action_pid=None,
                       ssh=[], cluster=cluster)


def old_daemon_block(cluster=None):
    """Master.daemon_status as it was built before the record, for a key-by-key comparison."""
    daemon = {"running": True, "pid": 123, "version": "1.0", "started": 1700000000.0, "uptime": 5.5,
              "config_dir": "/etc/hadaemon", "state_dir": "/var/lib/hadaemon", "lag_ms": {"p50": 0.1},
              "http": "http://127.0.0.1:8080/", "counters": {"transitions": []}}
    daemon.update({"paused": False, "queue": [4]})
    daemon.update({"workers": [{"pid": 5, "state": "idle"}], "action_pid": None, "ssh": []})
    daemon["cluster"] = cluster
    daemon.update({"switchover": None, "paused_hosts": []})     # SPEC §12
    return daemon


HOSTS = [("db%d" % i, {"state": "up", "since": 1.0 * i, "pending": None, "last_report": None})
         for i in range(7)]
CHECKS = [{"key": "k%d" % i, "name": "c %d" % i, "last": None} for i in range(5)]
TRANSITIONS = [{"id": 2, "time": 2.0, "host": "db1", "from": "unknown", "to": "up", "check": "c", "run": None}]
RUNS = [{"id": 1, "state": "ok", "commands": []}]


def test_daemon_block_is_the_dict_the_master_built():
    assert enc(online_daemon().to_wire()) == enc(old_daemon_block())


def test_cluster_block_is_the_members_status_with_the_agents_pid():
    member = hadaemon.cluster_member.ClusterMember(SETTINGS, 100.0)
    status = member.status(100.0, 77)
    assert isinstance(status, ClusterStatus)
    old = {"name": "c", "node": "a", "role": "none", "leader": None, "epoch": None, "quorum": 2,
           "members": {}, "etcd": [{"endpoint": "http://10.0.0.1:2379", "ok": False},
                                   {"endpoint": "http://10.0.0.2:2379", "ok": False}],
           "ttl": 6, "acting": False, "requests": member.requests}
    assert enc(status.to_wire()) == enc(dict(old, agent_pid=77))
    assert member.status(100.0).agent_pid is None
    assert enc(online_daemon(status).to_wire()) == enc(old_daemon_block(dict(old, agent_pid=77)))


def test_offline_cluster_block_has_the_online_keys():
    offline = ClusterStatus.offline(SETTINGS).to_wire()
    assert offline == {"name": "c", "node": "a", "role": "none", "leader": None, "epoch": None,
                       "quorum": 2, "members": {}, "ttl": 6, "acting": False, "requests": None,
                       "agent_pid": None, "etcd": [{"endpoint": "http://10.0.0.1:2379", "ok": False},
                                                   {"endpoint": "http://10.0.0.2:2379", "ok": False}]}
    online = hadaemon.cluster_member.ClusterMember(SETTINGS, 100.0).status(100.0)
    assert list(offline) == list(online.to_wire())


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_status_pieces_are_the_old_spliced_line_and_the_dict(step, monkeypatch):
    monkeypatch.setattr(hadaemon.wire, "ANSWER_STEP", step)
    for cluster in (None, ClusterStatus.offline(SETTINGS)):
        def doc():
            return StatusDoc(TRANSITIONS, RUNS, online_daemon(cluster), iter(HOSTS), iter(CHECKS))
        pieces = list(doc().pieces())
        assert len(pieces) > 4
        line = b"".join(pieces)
        # What Master.status_stream spliced before: encode_message(...)[:-2] + the rest.
        old = enc({"transitions": TRANSITIONS, "runs": RUNS,
                   "daemon": old_daemon_block(cluster and cluster.to_wire())})[:-2] + b',"hosts":'
        old += b"".join(hadaemon.wire.json_pieces(iter(HOSTS), as_object=True)) + b',"checks":'
        old += b"".join(hadaemon.wire.json_pieces(iter(CHECKS), as_object=False)) + b"}\n"
        assert line == old
        assert line == enc(doc().to_wire())
        assert list(json.loads(line)) == ["transitions", "runs", "daemon", "hosts", "checks"]


def test_offline_daemon_block_has_the_online_keys_and_values(tmp_path):
    class Ledger:
        def daemon_status(self):
            return {"paused": True, "queue": [3, 4]}

    class Config:
        config_dir = "/etc/hadaemon"
        cluster = SETTINGS
    block = DaemonBlock.offline(str(tmp_path), Config, Ledger()).to_wire()
    assert list(block) == list(online_daemon().to_wire())
    assert block == {"running": False, "pid": None, "version": hadaemon.base.__version__,
                     "started": None, "uptime": None, "config_dir": "/etc/hadaemon",
                     "state_dir": str(tmp_path), "lag_ms": None, "http": None, "counters": None,
                     "paused": True, "queue": [3, 4], "workers": [], "action_pid": None, "ssh": [],
                     "cluster": ClusterStatus.offline(SETTINGS).to_wire(), "switchover": None,
                     "paused_hosts": []}
    Config.cluster = None
    assert DaemonBlock.offline(str(tmp_path), Config, Ledger()).cluster is None
    assert DaemonBlock.offline(str(tmp_path), None, Ledger()).config_dir is None


def test_offline_status_from_a_state_db(tmp_path):
    store = hadaemon.store.Store(str(tmp_path))
    store.open()
    store.commit({"host:db1": {"state": "master", "since": 5.0, "pending": "slave", "count": 1},
                  "meta": {"next_transition": 1, "next_run": 1, "paused": True}})
    store.close()
    doc, ledger = hadaemon.client.offline_status(str(tmp_path))
    assert list(doc) == ["transitions", "runs", "daemon", "hosts", "checks"]
    assert doc["hosts"] == {"db1": {"state": "master", "since": 5.0,
                                    "pending": {"state": "slave", "count": 1}, "last_report": None,
                                    "paused": False}}
    assert doc["daemon"]["running"] is False and doc["daemon"]["paused"] is True
    assert doc["daemon"]["state_dir"] == str(tmp_path) and doc["checks"] == []


# -- Transition, Run, RunCommand, CommandResult ---------------------------------------------
#
# Their JSON is the state db's value (tr:N, run:N), the wire form of --status --json,
# --history and HTTP, and (a run's outputs cut) etcd's: byte for byte the dicts the
# Ledger built by hand before them.

from hadaemon.records import CommandResult, Run, RunCommand, Transition   # noqa: E402

TR = {"id": 7, "time": 1700000000.5, "host": "db2", "from": "slave", "to": "master",
      "check": "check_role db2", "run": 3}
RESULT_JSON = {"exit": 0, "signal": None, "error": None, "duration": 0.012, "output": "promoted\n",
               "truncated": False}
RUN = {"id": 3, "transition": 7, "host": "db2", "from": "slave", "to": "master",
       "section": "db2: any_to_master", "state": "queued", "reason": None, "queued": 1700000000.5,
       "started": None, "ended": None,
       "env": {"HA_HOST": "db2", "HA_FROM": "slave", "HA_TO": "master", "HA_RUN_ID": "3"},
       "commands": [{"argv": ["/etc/hadaemon/actions/promote", "db2"], "ignore": False, "timeout": 60.0,
                     "where": "actions.conf:2"},
                    {"argv": ["/etc/hadaemon/actions/notify"], "ignore": True, "timeout": 60.0,
                     "where": "actions.conf:3"}]}
RAN = dict(RUN, state="failed", reason="actions.conf:3: exit 1 (notify)", started=1700000001.0,
           ended=1700000002.0, commands=[
               dict(RUN["commands"][0], started=1700000001.0, result=RESULT_JSON),
               dict(RUN["commands"][1], started=1700000001.5,
                    result=dict(RESULT_JSON, exit=1, error="exit 1", output="x" * 5000))])


def round_trip(record_type, value):
    """The value as the state db holds it, read and written again."""
    stored = json.loads(enc(value))
    return record_type.from_json(stored)


def test_transition_round_trip_is_byte_for_byte():
    tr = round_trip(Transition, TR)
    assert tr == Transition(7, 1700000000.5, "db2", "slave", "master", "check_role db2", 3)
    assert enc(tr.to_json()) == enc(TR)
    no_run = dict(TR, run=None, check="cluster: a,b")
    assert enc(round_trip(Transition, no_run).to_json()) == enc(no_run)


@pytest.mark.parametrize("value", [
    RUN,                                                # queued, as new_run made it
    RAN,                                                # ran: commands started, results
    dict(RUN, rerun_of=1),                              # --rerun
    dict(RUN, variables={"HOST": "db2", "MASTER": "db2", "SLAVE": ""}),   # a cluster's, queued
    dict(RAN, variables={"HOST": "db2"}, node="a", epoch=5),             # ... run by leader a
    dict(RAN, rerun_of=2, variables={}, node="b", epoch=None),
])
def test_run_round_trip_is_byte_for_byte(value):
    run = round_trip(Run, value)
    assert isinstance(run.commands[0], RunCommand)
    assert enc(run.to_json()) == enc(value)             # same keys, same order, same values
    assert run.to_json() == value


def test_run_fields_and_its_commands():
    run = round_trip(Run, RAN)
    assert (run.id, run.transition, run.host, run.frm, run.to, run.section) == \
        (3, 7, "db2", "slave", "master", "db2: any_to_master")
    assert (run.rerun_of, run.variables, run.node, run.epoch) == (None, None, None, None)
    assert run.commands[0] == RunCommand(["/etc/hadaemon/actions/promote", "db2"], False, 60.0,
                                         "actions.conf:2", 1700000001.0,
                                         CommandResult(0, None, None, 0.012, "promoted\n", False))
    assert round_trip(Run, RUN).commands[1].result is None


def test_a_command_as_expand_commands_made_it():
    made = {"argv": ["/bin/echo", "db2"], "ignore": False, "timeout": 10.0, "where": "actions.conf:2"}
    cmd = RunCommand.from_json(made)
    assert (cmd.started, cmd.result) == (None, None)
    assert enc(cmd.to_json()) == enc(made)
    cmd.started = 5.0
    assert list(cmd.to_json()) == ["argv", "ignore", "timeout", "where", "started"]


def test_command_result_from_the_action_runs_end_message():
    msg = {"t": "end", "run": 3, "index": 0, "exit": 1, "signal": None, "error": "exit 1",
           "timed_out": False, "duration": 0.5, "truncated": True,
           "output": "y" * (hadaemon.base.OUTPUT_CAP + 10)}
    result = CommandResult.from_event(msg)
    assert result == CommandResult(1, None, "exit 1", 0.5, "y" * hadaemon.base.OUTPUT_CAP, True)
    assert list(result.to_json()) == ["exit", "signal", "error", "duration", "output", "truncated"]
    assert CommandResult.from_json(json.loads(enc(result.to_json()))) == result
    # As command_ended read it: an output that is not a string is none; truncated a bool.
    odd = CommandResult.from_event({"exit": 0, "output": 42, "truncated": 1})
    assert (odd.output, odd.truncated, odd.error, odd.duration) == ("", True, None, None)


def old_etcd_run(run):
    """cluster_ledger._etcd_run as it was, over a run dict."""
    run = dict(run, commands=[dict(c) for c in run.get("commands", [])])
    for cmd in run["commands"]:
        result = cmd.get("result")
        if result and len(result.get("output") or "") > hadaemon.records.ETCD_OUTPUT_CAP:
            cmd["result"] = dict(result, output=result["output"][:hadaemon.records.ETCD_OUTPUT_CAP],
                                 truncated=True)
    return run


@pytest.mark.parametrize("value", [RUN, RAN, dict(RAN, variables={"HOST": "db2"}, node="a", epoch=5)])
def test_run_to_etcd_cuts_the_outputs_as_etcd_run_did(value):
    run = round_trip(Run, value)
    assert enc(run.to_etcd()) == enc(old_etcd_run(value))
    assert run.to_json() == value                       # the run itself keeps its whole output
    if value is RAN:
        cut = run.to_etcd()["commands"][1]["result"]
        assert (len(cut["output"]), cut["truncated"]) == (hadaemon.records.ETCD_OUTPUT_CAP, True)
        assert run.to_etcd()["commands"][0]["result"] == RESULT_JSON
    # etcd's form read back (ledger_from_etcd) is a run like any.
    assert Run.from_json(json.loads(enc(run.to_etcd()))).id == run.id


@pytest.mark.parametrize("confirm", [False, True])
def test_run_to_action_is_the_run_message_and_action_main_reads_it(confirm):
    run = round_trip(Run, dict(RUN, state="running", started=1700000001.0))
    msg = {"t": "run", "run": run.to_action(confirm)}
    before = dict(RUN, state="running", started=1700000001.0)
    assert enc(msg) == enc({"t": "run", "run": dict(before, confirm=True) if confirm else before})
    got, asks = Run.from_action(json.loads(enc(msg))["run"])
    assert got == run and asks is confirm


def old_summarize_run(run):
    """ledger.summarize_run as it was, over a run dict."""
    summary = {k: run.get(k) for k in ("id", "transition", "host", "from", "to", "section",
                                       "state", "reason", "queued", "started", "ended", "rerun_of")}
    summary["commands"] = [{"argv": c["argv"], "ignore": c["ignore"], "where": c.get("where"),
                            "started": c.get("started"), "result": c.get("result")}
                           for c in run.get("commands", [])]
    if "node" in run:
        summary["node"], summary["epoch"] = run["node"], run.get("epoch")
    return summary


@pytest.mark.parametrize("value", [RUN, RAN, dict(RAN, rerun_of=1),
                                  dict(RAN, variables={"HOST": "db2"}, node="a", epoch=5)])
def test_run_summary_is_what_summarize_run_made(value):
    import hadaemon.ledger
    run = round_trip(Run, value)
    assert enc(run.summary()) == enc(old_summarize_run(value))
    assert enc(hadaemon.ledger.summarize_run(run)) == enc(old_summarize_run(value))
    assert enc(hadaemon.ledger.summarize_run(value)) == enc(old_summarize_run(value))   # its JSON


BAD_TRANSITIONS = [
    "tr", ["id", 1], None, {},
    dict(TR, id="7"), dict(TR, time="noon"), dict(TR, time=True), dict(TR, host=None),
    dict(TR, **{"from": 1}), dict(TR, to=["master"]), dict(TR, run="3"),
]
BAD_RUNS = [
    "run", None, [], dict(RUN, id=None), dict(RUN, state="done"), dict(RUN, state=None),
    dict(RUN, env=[]), dict(RUN, host=1), dict(RUN, section=None), dict(RUN, commands=None),
    dict(RUN, commands=["/bin/true"]), dict(RUN, commands=[{"argv": []}]),
    dict(RUN, commands=[{"argv": ["/bin/echo", 1]}]), dict(RUN, commands=[{"argv": "/bin/true"}]),
    dict(RUN, commands=[dict(RUN["commands"][0], result="exit 0")]),
]


@pytest.mark.parametrize("value", BAD_TRANSITIONS)
def test_a_malformed_transition_is_refused(value):
    assert not Transition.well_formed(value)
    assert not hadaemon.store.well_formed("tr:7", value)
    with pytest.raises(ValueError):
        Transition.from_json(value)


@pytest.mark.parametrize("value", BAD_RUNS)
def test_a_malformed_run_is_refused(value):
    assert not Run.well_formed(value)
    assert not hadaemon.store.well_formed("run:3", value)
    with pytest.raises(ValueError):
        Run.from_json(value)


def test_a_state_db_with_malformed_records_loads_without_them(tmp_path):
    import os
    import hadaemon.cluster_ledger
    import hadaemon.ledger
    store = hadaemon.store.Store(str(tmp_path))
    store.open()
    store.commit({"tr:1": TR, "run:3": RAN, "tr:2": dict(TR, id=8, run="x"),
                  "run:4": dict(RUN, id=4, state="done"), "meta": {"next_transition": 9, "next_run": 5}})
    os.close(store.jfd)                 # killed: the journal holds all of it
    os.close(store.files.dat_fd)
    again = hadaemon.store.Store(str(tmp_path))
    again.open()
    assert "tr:2" not in again.data and "run:4" not in again.data
    notes = [n for n in again.notes if "not what hadaemon writes there; dropped" in n]
    assert sorted(n.split(" ")[0] for n in notes) == ["run:4", "tr:2"]
    ledger = hadaemon.ledger.Ledger(again, str(tmp_path))
    ledger.open(1700000010.0)
    assert list(ledger.transitions) == [Transition.from_json(TR)]
    assert list(ledger.runs) == [3] and ledger.runs[3].to_json() == RAN
    # etcd: a hand-edited value of the wrong shape is no ledger key either.
    key = hadaemon.cluster_member.LEDGER_KEYS + "run/0000000004"
    assert hadaemon.cluster_ledger.ledger_from_etcd(key, dict(RUN, state="done"), 100) is None
    assert hadaemon.cluster_ledger.ledger_from_etcd(key, RUN, 100) == ("run:4", RUN)

"""``recheck`` (docs/configuration.md): a pending candidate's check runs again soon.

The Scheduler alone first (no process: the times are handed in), then the daemon:
a confirmation made by rechecks inside an hourly schedule, beside one made by the
schedule; the steady state, which runs no more checks with ``recheck`` than
without; ``--status`` while a check is rechecked; ``cron`` refused.  Times are
printed; what is asserted are counts that only the rule can give.
"""

import json
import time

from conftest import figure, wait_for

import hadaemon.config
import hadaemon.records
import hadaemon.scheduler


def _check(interval=1.0, recheck=0.1, confirm=3):
    group = hadaemon.config.Group(hadaemon.config.Scope("local"), "checks.conf:1", interval, None, 5.0,
                                  confirm, "h", recheck=recheck)
    return hadaemon.config.Check("local|h|c", "c", ("/bin/true",), "h", group, "checks.conf:2")


def _run(s, now, state="down"):
    """Hand out the ready check at ``now`` and give back its result; its runtime."""
    job = s.take(now, lambda host: "up", "/conf", "/state")
    assert job is not None, "nothing was due at %s" % now
    result = hadaemon.records.CheckResult(job.id, job.key, {"state": state}, False, 0, None,
                                          now, 0.01, None)
    rt, reports = s.finished(job.key, result)
    assert reports == [("h", state)]
    return rt


def test_a_recheck_replaces_the_scheduled_runs_until_the_candidate_is_settled():
    s = hadaemon.scheduler.Scheduler()
    s.configure([_check()], now=100.0)
    s.fire_due(100.0)
    rt = _run(s, 100.0)
    s.recheck(rt, True, 100.05)                 # its report left a candidate pending
    assert rt.rechecking and s.next_due() == 100.05 + 0.1
    s.fire_due(100.14)
    assert not s.ready                          # not yet
    s.fire_due(100.15)
    rt = _run(s, 100.15)
    s.recheck(rt, True, 100.95)                 # a long run: the recheck comes after 101.0
    s.fire_due(101.0)                           # its scheduled run: the recheck runs instead
    assert not s.ready and rt.skipped == 0
    s.fire_due(101.05)
    rt = _run(s, 101.05)
    s.recheck(rt, False, 101.1)                 # confirmed (or cleared): back on the schedule
    assert not rt.rechecking and rt.recheck_at is None
    assert s.next_due() == 102.0                # the schedule never moved
    s.fire_due(101.9)
    assert not s.ready
    s.fire_due(102.0)
    _run(s, 102.0)
    assert rt.runs == 4 and rt.skipped == 0


def test_no_recheck_without_the_setting_or_under_once():
    for scheduler, check in ((hadaemon.scheduler.Scheduler(), _check(recheck=None)),
                             (hadaemon.scheduler.Scheduler(once=True), _check())):
        scheduler.configure([check], now=100.0)
        scheduler.fire_due(100.0)
        rt = _run(scheduler, 100.0)
        scheduler.recheck(rt, True, 100.05)
        assert not rt.rechecking and not scheduler.rechecks


def test_status_shows_a_check_being_rechecked():
    import hadaemon.client
    import hadaemon.http_views
    entry = {"next_run": time.time() + 0.1, "rechecking": True, "running": False}
    assert hadaemon.client._next_column(entry) == "recheck"
    assert hadaemon.http_views._next_run(entry, time.time()).startswith("rechecking: ")
    assert not hadaemon.http_views._next_run(dict(entry, rechecking=False), time.time()).startswith("rech")


def _stamping_check(d):
    """checks/check_role HOST: stamps each run's start in world/runs-HOST, reports world/HOST."""
    d.script("checks/check_role", """
        date +%%s.%%N >> "%s/runs-$1"
        echo "host=$1"
        if [ -f "%s/$1" ]; then echo "state=$(cat "%s/$1")"; else echo "state=down"; fi
    """ % (d.world, d.world, d.world))


def _runs(d, host):
    try:
        return [float(t) for t in (d.world / ("runs-" + host)).read_text().split()]
    except FileNotFoundError:
        return []


def _entry(status, host):
    return next(c for c in status["checks"] if c["host"] == host)


def test_confirmation_with_and_without_recheck(daemon):
    """Both hosts report ``up`` from the start: the first accepted state is a candidate
    confirmed like any (confirm = 3).  ``fast`` runs every hour, so its three runs can
    only be rechecks; ``slow`` waits for two more of its 400 ms intervals."""
    d = daemon
    _stamping_check(d)
    d.write("checks.conf", """
        [local]
        interval = 1h
        confirm = 3
        recheck = 100ms
        host = fast
        check_role fast

        [local]
        interval = 400ms
        confirm = 3
        host = slow
        check_role slow
    """)
    d.write("actions.conf", "")
    d.set("fast", "up")
    d.set("slow", "up")
    d.start()
    d.wait_state("fast", "up", timeout=20)
    d.wait_state("slow", "up", timeout=20)
    status = d.status()
    tr = {t["host"]: t["time"] for t in status["transitions"]}
    fast, slow = _runs(d, "fast"), _runs(d, "slow")
    before = [t for t in fast if t <= tr["fast"]]
    assert len(before) == 3, (fast, tr)         # an hourly check ran three times: rechecks
    entry = _entry(status, "fast")
    assert entry["runs"] == 3 and not entry["rechecking"], entry     # back on its schedule
    assert len([t for t in slow if t <= tr["slow"]]) == 3, (slow, tr)
    figure("recheck: confirm = 3 took %d ms with recheck = 100ms (an hourly check), %d ms on "
           "the schedule alone (interval 400ms); from the first run's start to the transition"
           % ((tr["fast"] - fast[0]) * 1000, (tr["slow"] - slow[0]) * 1000))


def test_steady_state_runs_no_more_checks(daemon):
    d = daemon
    _stamping_check(d)
    d.write("checks.conf", """
        [daemon]
        interval = 200ms
        [local]
        recheck = 100ms
        host = a
        check_role a
        [local]
        host = b
        check_role b
    """)
    d.write("actions.conf", "")
    d.set("a", "up")
    d.set("b", "up")
    begun = time.monotonic()
    d.start()
    d.wait_state("a", "up", timeout=20)
    wait_for(lambda: len(_runs(d, "a")) >= 10, timeout=30, what="10 runs of check a")
    status = d.status()
    elapsed = time.monotonic() - begun
    a, b = _entry(status, "a"), _entry(status, "b")
    # A fixed rate runs at most one check per interval since the start: a recheck in
    # the steady state would be one more.
    assert a["runs"] <= elapsed / 0.2 + 1, (a, elapsed)
    assert not a["rechecking"] and not b["rechecking"]
    figure("recheck: steady state, %.1f s at 200 ms: %d runs with recheck = 100ms, %d without"
           % (elapsed, a["runs"], b["runs"]))


def test_status_says_rechecking_until_the_candidate_goes(daemon):
    d = daemon
    _stamping_check(d)
    d.write("checks.conf", """
        [local]
        interval = 1h
        confirm = 1000
        recheck = 200ms
        host = p
        check_role p
    """)
    d.write("actions.conf", "")
    d.set("p", "up")                    # p is unknown: up stays a candidate, 1000 to go
    d.start()
    wait_for(lambda: _entry(d.status(), "p")["runs"] >= 2, timeout=20, what="a recheck of p")
    status = d.status()
    entry = _entry(status, "p")
    assert entry["rechecking"] and status["hosts"]["p"]["pending"]["state"] == "up", entry
    assert "recheck" in d.cli("--status", check=True).stdout
    d.set("p", "unknown")               # its own state again: the candidate is dropped
    wait_for(lambda: not _entry(d.status(), "p")["rechecking"], timeout=20,
             what="p back on its schedule (log:\n%s)" % d.tail())
    runs = len(_runs(d, "p"))
    time.sleep(0.6)                     # three rechecks' worth: none comes, the next run is in 1h
    assert len(_runs(d, "p")) == runs
    assert d.status()["hosts"]["p"]["pending"] is None


def test_cron_refuses_recheck(daemon):
    d = daemon
    d.role_check()
    d.write("checks.conf", """
        [local]
        cron = */5 * * * *
        recheck = 1s
        check_role x
    """)
    d.write("actions.conf", "")
    r = d.cli("--check-config")
    assert r.returncode != 0
    assert "%s/checks.conf:3: recheck is for interval checks" % d.dir in r.stdout + r.stderr, \
        json.dumps([r.stdout, r.stderr])

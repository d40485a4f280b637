"""No single point of failure, proven whole: the production shape as a cluster (tests/cluster_stack.py).

db1 and db2 (PostgreSQL, sshd, an etcd member and a hadaemon member each), the
witness (an etcd member and a hadaemon member) and app (pgbouncer, two writers),
as network namespaces.  The members run examples/postgresql/cluster.  One fault
per test, the leader placed where it matters:

1. db1's postmaster killed (db1's member leads): one failover;
2. db1 the host dies while its member leads (primary, leader and an etcd member
   at once): one failover, once the lease expired;
3. db1's cable pulled while its member leads: it stops acting, the majority fails
   over; the cable back, db1 is fenced and its member follows;
4. the witness dies while its member leads: a new leader, nothing fails over;
5. etcd loses quorum (two etcd members killed): no member acts, nothing fails
   over, writes on db1 go on;
6. the leader's host (the witness) cut from etcd but not from the databases: it
   stops acting within its lease, another member leads, nothing runs twice.

Each prints one line: ``cluster-stack: SCENARIO: write outage X ms (fault -> first
acknowledged write through pgbouncer), N acknowledged, N present, 0 lost, P
promotion(s), address on HOST``.  For 4-6 the outage is the longest pause between
two acknowledged writes from the fault until the end.  Asserted: no acknowledged row
lost, the address never on two reachable hosts, the promotion count, no run twice;
timings are printed, never asserted.  ``CSTACK_RUNS=5`` runs each five times and
prints medians.  Needs root and ``ip netns``; skips otherwise.
"""

import os
import signal
import statistics
import subprocess
import time

import pytest

from conftest import figure, wait_for
from cluster_stack import ClusterStack, MEMBERS
from test_stack import command_times, overlap, pg_template, timeline, vip_timeline  # noqa: F401

RUNS = int(os.environ.get("CSTACK_RUNS", "1"))
TTL = 2
RESULTS = {}


@pytest.fixture
def cstack(pg_template):
    s = ClusterStack(*pg_template)
    try:
        s.build()
        yield s
    finally:
        s.teardown()


@pytest.fixture(scope="module", autouse=True)
def medians():
    """With CSTACK_RUNS > 1: the median outage per scenario, after the last run."""
    yield
    for scenario, runs in RESULTS.items():
        if len(runs) > 1:
            figure("cluster-stack: %s: median of %d runs: write outage %d ms (range %d-%d ms)%s"
                   % (scenario, len(runs), statistics.median(r["outage"] for r in runs),
                      min(r["outage"] for r in runs), max(r["outage"] for r in runs),
                      "".join(", %s %d ms" % (k, statistics.median(r[k] for r in runs))
                              for k in runs[0] if k != "outage")))


def longest_pause(acked, since, until):
    """The longest time without an acknowledged row between ``since`` and ``until``."""
    times = sorted(t for t, _ in acked.values() if since <= t <= until)
    edges = [since] + times + [until]
    return max(b - a for a, b in zip(edges, edges[1:]))


def new_entries(s, node, since):
    return [e for e in s.history(node) if e["time"] >= since]


def report(s, scenario, fault, primary, promotions, parts=None, extra=""):
    """Stop the writers, check every acknowledged row on ``primary`` (db1 or db2), the
    promotions and the address; print the scenario's line."""
    server = s.pair.primary if primary == "db1" else s.pair.standby
    end = time.time()
    s.writers.stop()
    acked = s.writers.acked()
    present = {int(n) for n in server.sql("SELECT n FROM ha_rows")}
    lost = sorted(set(acked) - present)
    assert not lost, "acknowledged rows missing on %s: %s" % (primary, lost[:20])
    assert server.sql("SELECT pg_is_in_recovery()") == ["f"]
    assert s.timeline(server) == 1 + promotions, "timeline %d: not %d promotion(s)" % (
        s.timeline(server), promotions)
    other = "db2" if primary == "db1" else "db1"
    assert s.topo.has_vip(primary) and s.topo.link_up(primary)
    assert not (s.topo.has_vip(other) and s.topo.link_up(other))
    spans = {h: vip_timeline(s.monitors[h], *s.holders0[h]) for h in ("db1", "db2")}
    both = overlap(spans["db1"], spans["db2"])
    if promotions:
        outage = min(t for t, srv in acked.values() if srv == primary and t > fault) - fault
    else:
        outage = longest_pause(acked, fault, end)
    parts = dict(parts or {}, outage=outage * 1000)
    RESULTS.setdefault(scenario, []).append(parts)
    load = open("/proc/loadavg").read().split()[0]
    figure("cluster-stack: %s: write outage %d ms (fault -> first acknowledged write through pgbouncer), "
           "%d acknowledged, %d present, %d lost, %d promotion%s, address on %s"
           % (scenario, outage * 1000, len(acked), len(present), len(lost), promotions,
              "" if promotions == 1 else "s", primary))
    figure("cluster-stack: %s: %s; address on both reachable hosts %d ms%s (ttl %ds, load %s)"
           % (scenario, ", ".join("%s %d ms" % (k, v) for k, v in parts.items() if k != "outage") or "-",
              both * 1000, extra, TTL, load))
    return both


def failover_run(s, since, leader_before):
    """The one master_to_down of db1 since ``since``: its run ok, the example's six
    commands, on a member other than ``leader_before`` when that one lost the lead."""
    node = s.leader()[0]
    entries = new_entries(s, node, since)
    down = [e for e in entries if (e["host"], e["from"], e["to"]) == ("db1", "master", "down")]
    assert len(down) == 1, entries
    run = down[0]["run"]
    assert run["section"] == "master_to_down" and run["state"] == "ok", run
    cmds = command_times(run)
    assert [(c[0], c[1]) for c in cmds] == [
        ("pgbouncer_ctl", "pause"), ("remote_vip", "del"), ("promote_standby", "db2"),
        ("sync_off", "db2"), ("remote_vip", "add"), ("pgbouncer_ctl", "resume")], timeline(cmds, since)
    return down[0], run, cmds


def wait_failover(s, fault):
    s.wait_settled(s.leader(among=[m for m in MEMBERS if s.cluster(m)])[0], {"db1": "down", "db2": "master"},
                   timeout=60)
    wait_for(lambda: len(s.writers.acked_by("db2")) >= 100, timeout=30,
             what="100 rows acknowledged by db2 through pgbouncer (%s)" % s.tails())


def failover_parts(down, run, cmds, fault, first_db2):
    return {"detection": (down["time"] - fault) * 1000,
            "actions": (cmds[-1][3] - cmds[0][2]) * 1000,
            "client": (first_db2 - cmds[-1][3]) * 1000}


@pytest.mark.parametrize("run", range(RUNS))
def test_killed_postmaster(cstack, run):
    """db1's postmaster dies while db1's member leads: the leader itself fails over."""
    s = cstack
    s.start(first="db1")
    pid = s.pair.primary.postmaster_pid()
    fault = time.time()
    os.kill(pid, signal.SIGKILL)
    wait_failover(s, fault)
    down, run_, cmds = failover_run(s, fault, "db1")
    assert run_["node"] == "db1", run_
    first = min(s.writers.acked_by("db2"))
    both = report(s, "killed postmaster", fault, "db2", 1, failover_parts(down, run_, cmds, fault, first))
    assert both == 0, "the address was on db1 and db2 at once for %.3f s" % both

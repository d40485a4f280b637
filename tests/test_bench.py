"""The benchmark keeps running (bench/bench.py --quick), and what it found stays fixed.

No timed assertions here: the bench prints figures, people judge them.
"""

import json
import os
import signal
import subprocess
import sys

from conftest import ROOT, alive, wait_for

sys.path.insert(0, str(ROOT / "bench"))
import bench  # noqa: E402  (the benchmark module, for its /proc helpers)

SECTIONS = {
    "limit": ["spawn.cpu_ms", "spawn.wall_ms", "spawn_pipe.cpu_ms", "json_rtt.cpu_us",
              "json_rtt.wall_us", "action_start.p50_ms", "rss_mb.python3", "shape_floor.master_ms",
              "shape_floor.worker_ms", "shape_floor.check_ms", "shape_floor.cpu_ms"],
    "reaction": ["result_to_action.p50_ms", "result_to_action.p99_ms", "result_to_spawn.p50_ms",
                 "check_exit_to_action.p50_ms", "flip_to_action.p50_ms", "transitions"],
    "idle": ["cpu_pct.master", "cpu_pct.workers", "rss_mb.master", "rss_total_mb", "pss_total_mb"],
    "cluster": ["failover.kill_to_action.p50_ms", "failover.kill_to_action.max_ms",
                "failover.kill_to_leader_status.p50_ms", "flips.flip_to_action.p50_ms",
                "flips.flip_to_transition.p50_ms", "flips.transition_to_action.p50_ms",
                "steady.requests_per_s", "steady.keepalives_expected_per_s", "steady.etcd_writes_per_s"],
    "http": ["status.p50_ms", "status.p99_ms", "host.p50_ms", "host.p99_ms", "host_new_connection.p99_ms",
             "lag_p99_ms", "cpu_per_request_ms", "checks_per_s_meanwhile", "status_bytes"],
    "notify": ["off.master_cpu_pct", "on.master_cpu_pct", "off.result_to_action.p99_ms",
               "on.result_to_action.p99_ms", "on.event_to_receiver.p99_ms", "on.notify_child_cpu_pct"],
}


def _get(doc, dotted):
    for part in dotted.split("."):
        doc = doc[part]
    return doc


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_bench_quick_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(out.read_text())
    for section, fields in SECTIONS.items():
        for field in fields:
            assert _number(_get(doc[section], field)), (section, field, doc[section])
    assert len(doc["throughput"]) >= 2
    for run in doc["throughput"]:
        for field in ("rate", "achieved_per_s", "runs", "lag_p50_ms", "lag_p99_ms", "cpu_per_check_ms",
                      "ratio_to_spawn"):
            assert _number(run[field]), (field, run)
        assert run["runs"] > 0
    overhead = doc["derived"]["overhead"]
    assert _number(overhead["ratio"]) and _number(overhead["cpu_per_check_ms"])
    assert doc["reaction"]["transitions"] >= 10
    assert _number(doc["meta"]["loadavg_start"][0])
    ab = doc["http"]["ab_metrics"]
    if "skipped" not in ab:
        assert _number(ab["per_s"]) and _number(ab["cpu_per_request_ms"]) and ab["failed"] == 0, ab
    assert isinstance(doc["derived"]["http"]["met"], bool)
    monit = doc["monit"]
    if "skipped" not in monit:
        assert _number(monit["reaction"]["check_exit_to_action"]["p50_ms"])
        assert _number(monit["cpu"]["cpu_per_check_ms"])
        assert _number(doc["derived"]["vs_monit"]["cpu_per_check_at_100_per_s"])
    # Scale: the same rate over ever more checks (300 and 3,000 in a quick run).
    assert [run["checks"] for run in doc["scale"]] == [300, 3000]
    for run in doc["scale"]:
        for field in ("lag_p50_ms", "lag_p99_ms", "lag_max_ms", "cpu_pct.master", "master_rss_mb",
                      "master_pss_mb", "start_s", "reload_s", "reload_rescheduled_s", "check_config_s",
                      "status_ms", "status_cli_s", "achieved_per_s"):
            assert _number(_get(run, field)), (field, run)
        assert run["runs"] > 0 and run["status_lines"] > 0
    assert _number(doc["derived"]["scale"]["master_cpu_vs_smallest"])
    assert _number(doc["idle"]["pss_mb"]["master"]) and isinstance(doc["derived"]["idle"]["met_pss"], bool)
    # The table names each section and the load it ran under.
    for heading in ("1. limit", "2. per-check overhead", "3. throughput", "4. reaction", "5. idle",
                    "6. beside Monit", "7. cluster", "8. http", "9. scale", "load average"):
        assert heading in result.stdout, heading


def test_paired_measures_both_copies_in_the_same_window(tmp_path):
    """bench/paired.py: one line per copy per round, each with its CPU per check."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "paired.py"), str(ROOT / "hadaemon.py"),
                             str(ROOT / "hadaemon.py"), "--rounds", "1", "--window", "1", "--rate", "100"],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = [line.split() for line in result.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2, result.stdout
    for words in rounds:
        figures = dict(zip(words[3::2], words[4::2]))
        assert set(figures) == {"master", "workers", "check", "master+workers"}, words
        assert all(float(v) > 0 for v in figures.values()), words


def test_shapes_measures_each_shape_against_the_paced_spawn(tmp_path):
    """bench/shapes.py: per round, the paced spawn and the three shapes, each with its
    CPU per check and its ratio; the worker-timer shapes end only when every result
    reached their master."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "shapes.py"), "--rounds", "1",
                             "--seconds", "0.5", "--rate", "200"],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    rounds = {line.split()[2]: line.split() for line in result.stdout.splitlines() if line.startswith("round ")}
    assert sorted(rounds) == ["batched", "paced", "shape", "timer"], result.stdout
    for name, words in rounds.items():
        assert words[-1] == "paced" and words[-2].endswith("x"), words
        if name != "paced":
            figures = dict(zip(words[3:9:2], words[4:9:2]))
            assert set(figures) == {"master", "worker", "check"}, words
            assert float(figures["worker"]) > 0 and float(figures["check"]) > 0, words


def test_reload_spreads_checks_whose_interval_changed(daemon):
    """A reload that changes a group's interval must not make all its checks due at once.

    They used to be: all scheduled at the reload instant, then in lockstep forever
    (a burst of every check each interval), which the bench saw as 40 ms of lag.
    """
    d = daemon
    d.script("checks/check_up", "echo state=up\n")
    d.write("actions.conf", "")
    checks = "".join("check_up %d\n" % i for i in range(10))
    d.write("checks.conf", "[daemon]\nworkers = 1\n\n[local]\ninterval = 60s\n" + checks)
    d.start()
    d.write("checks.conf", "[daemon]\nworkers = 1\n\n[local]\ninterval = 20s\n" + checks)
    assert d.cli("--reload").returncode == 0
    due = sorted(c["next_run"] for c in d.status()["checks"])
    assert len(due) == 10
    # Spread over the new 20 s interval (2 s apart), not all due at the reload.
    assert due[-1] - due[0] > 10, due


def test_an_action_run_waits_forked_ahead_and_a_dead_one_is_replaced(daemon):
    """The action run is forked before it is needed (no fork between a result and its
    sequence); one that dies while it waits is logged and replaced, and runs still run."""
    d = daemon
    d.role_check()
    d.recorder()
    d.write("checks.conf", "[daemon]\nworkers = 1\n\n[local]\ninterval = 200ms\ncheck_role db1\n")
    d.write("actions.conf", "[any_to_any]\nrecord %HOST% %FROM% %TO%\n")
    d.set("db1", "master")
    d.start()
    d.wait_runs(1)

    def spare():
        workers = [w["pid"] for w in d.status()["daemon"]["workers"]]
        others = [pid for pid in bench.children_of(d.proc.pid) if pid not in workers and alive(pid)]
        return others[0] if len(others) == 1 else None
    first = wait_for(spare, what="one action run waiting")
    assert d.status()["daemon"]["action_pid"] is None      # waiting is not running
    os.kill(first, signal.SIGKILL)
    d.wait_log("action run %d died waiting for a sequence" % first)
    second = wait_for(lambda: spare() not in (None, first) and spare(), timeout=15,
                      what="a new action run waiting")
    d.set("db1", "slave")
    runs = d.wait_runs(2)
    assert runs[-1]["state"] == "ok" and runs[-1]["to"] == "slave", runs[-1]
    assert any("db1 master slave" in line for line in d.actions_log())
    assert second != first

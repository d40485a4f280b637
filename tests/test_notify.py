"""Notifications (SPEC §12, docs/notify.md): the queue and the ledger's events alone, the
examples against real local receivers, then the daemon: order and seq across a restart,
a hanging command, retries, kill -9 with undelivered events, --notify-test, check events.
(The cluster's leader event: tests/test_cluster.py.)"""

import email
import http.server
import json
import os
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time

import pytest

import hadaemon.configfiles
import hadaemon.ledger
import hadaemon.notify_queue
import hadaemon.store
from conftest import ROOT, alive, figure, wait_for
from test_ledger import World

EXAMPLES = ROOT / "examples" / "notify" / "actions"


# -- the queue alone --------------------------------------------------------------------

def open_queue(state, cap=hadaemon.notify_queue.NOTIFY_CAP):
    """A Store over ``state`` and a NotifyQueue in it, as the daemon opens them."""
    store = hadaemon.store.Store(str(state))
    store.open()
    queue = hadaemon.notify_queue.NotifyQueue(store, cap)
    queue.open()
    return store, queue


def test_seq_grows_by_one_and_what_waits_survives_a_kill(tmp_path):
    store, queue = open_queue(tmp_path)
    for kind in ("daemon", "transition", "run"):
        queue.push({"kind": kind, "time": 1.0, "node": "n"})
    assert [e["seq"] for e in queue.waiting] == [1, 2, 3]
    assert queue.finish(1, "ok") and not queue.finish(3, "ok")     # only the head leaves
    os.close(store.jfd)                 # a kill -9: nothing checkpointed, nothing closed
    store, queue = open_queue(tmp_path)
    assert [(e["seq"], e["kind"]) for e in queue.waiting] == [(2, "transition"), (3, "run")]
    assert queue.push({"kind": "daemon", "time": 2.0, "node": "n"})["seq"] == 4
    store.close()


def test_at_most_1000_wait_the_oldest_dropped_and_counted(tmp_path):
    store, queue = open_queue(tmp_path)
    for i in range(1005):
        queue.push({"kind": "check", "time": float(i), "node": "n"})
    assert len(queue.waiting) == 1000 and queue.head()["seq"] == 6
    assert queue.status()["notify_events"][2] == {"result": "dropped", "count": 5}
    assert queue.status()["notify_waiting"] == 1000
    store.close()
    store, queue = open_queue(tmp_path)
    assert [e["seq"] for e in queue.waiting] == list(range(6, 1006))
    store.close()


def test_the_ledger_tells_each_transition_then_its_run(tmp_path):
    w = World(tmp_path, "[any_to_any]\n/bin/true\n", confirm=1)
    events = []
    w.ledger.notify = lambda kind, **keys: events.append(dict(keys, kind=kind))
    tr = w.report("db2", "master")
    assert events == [{"kind": "transition", "host": "db2", "from": "unknown", "to": "master",
                       "check": "/bin/true", "id": tr.id, "run": tr.run, "switchover": None}]
    run = w.ledger.head()
    w.ledger.start(run, run.commands, None, str(w.root), 1.0)
    w.ledger.finish(run, "ok", None, 2.0)
    w.ledger.set_paused(True)
    w.report("db2", "slave")            # skipped at once: told after its transition
    assert [(e["kind"], e.get("result")) for e in events[1:]] == [
        ("run", "running"), ("run", "ok"), ("transition", None), ("run", "skipped")]
    assert events[-1]["reason"] == "paused"


def test_notify_is_looked_up_like_an_action_command(tmp_path):
    (tmp_path / "actions").mkdir()
    (tmp_path / "actions" / "tell").write_text("#!/bin/sh\n")
    (tmp_path / "actions" / "tell").chmod(0o755)
    (tmp_path / "actions.conf").write_text("")
    (tmp_path / "checks.conf").write_text("[daemon]\nnotify = tell --to 'a b'\nnotify_timeout = 3s\n")
    daemon = hadaemon.configfiles.load_config(str(tmp_path)).daemon
    assert daemon.notify == (str(tmp_path / "actions" / "tell"), "--to", "a b")
    assert daemon.notify_timeout == 3.0
    (tmp_path / "checks.conf").write_text("[daemon]\nnotify = nowhere\nnotify_timeout = 0s\n")
    with pytest.raises(hadaemon.base.ConfigError) as err:
        hadaemon.configfiles.load_config(str(tmp_path))
    assert sorted(e.split(": ", 1)[0] for e in err.value.errors) == ["%s/checks.conf:2" % tmp_path,
                                                               "%s/checks.conf:3" % tmp_path]
    assert [e for e in err.value.errors if "command not found: nowhere (looked in actions/" in e]


# -- the examples, each against a real receiver ---------------------------------------------

EVENT = {"kind": "run", "seq": 7, "time": 1796000000.5, "node": "watcher-a", "run": 3,
         "section": "slave_to_master", "host": "db2", "result": "failed", "reason": "exit 1"}


def run_example(name, *args, env=None):
    return subprocess.run([str(EXAMPLES / name)] + list(args), input=json.dumps(EVENT), text=True,
                          capture_output=True, timeout=30, env=dict(os.environ, **(env or {})))


class Hook(http.server.BaseHTTPRequestHandler):
    answer = 200
    got = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.got.append((self.path, self.headers["Content-Type"], json.loads(body)))
        self.send_response(Hook.answer)
        self.end_headers()

    def log_message(self, *args):
        pass


def serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def test_notify_webhook_posts_the_event_with_a_text_line():
    server = serve(http.server.HTTPServer(("127.0.0.1", 0), Hook))
    url = "http://127.0.0.1:%d/hooks/abc" % server.server_address[1]
    try:
        Hook.got, Hook.answer = [], 200
        result = run_example("notify_webhook", url)
        assert result.returncode == 0, result.stderr
        path, ctype, body = Hook.got[0]
        assert (path, ctype) == ("/hooks/abc", "application/json")
        assert body == dict(EVENT, text="hadaemon watcher-a #7: run 3 [slave_to_master] for db2: "
                                        "failed (exit 1)")
        Hook.answer = 500
        result = run_example("notify_webhook", url)
        assert result.returncode == 1 and "500" in result.stderr
    finally:
        server.shutdown()
        server.server_close()
    result = run_example("notify_webhook", url)             # nobody listens any more
    assert result.returncode == 1 and "cannot POST" in result.stderr


class SmtpSink(socketserver.StreamRequestHandler):
    """Just enough SMTP for smtplib: every command accepted, each message kept."""
    mails = []

    def handle(self):
        self.wfile.write(b"220 sink ESMTP\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = self.rfile.readline()
                    if not chunk:
                        return
                    data += chunk
                SmtpSink.mails.append(email.message_from_bytes(data[:-5]))
                self.wfile.write(b"250 kept\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


def test_notify_mail_through_a_local_smtp_sink():
    server = serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), SmtpSink))
    relay = "127.0.0.1:%d" % server.server_address[1]
    try:
        SmtpSink.mails = []
        result = run_example("notify_mail", "oncall@example.com", env={"HADAEMON_SMTP_RELAY": relay})
        assert result.returncode == 0, result.stderr
        result = run_example("notify_mail", "a@example.com", "b@example.com", "--relay", relay,
                             "--from", "ha@example.com")
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()
        server.server_close()
    first, second = SmtpSink.mails
    assert first["Subject"].replace("\r", "").replace("\n", "") == "[PROBLEM] hadaemon watcher-a #7: run 3 [slave_to_master] for db2: " \
                               "failed (exit 1)"
    assert first["To"] == "oncall@example.com"
    assert (second["To"], second["From"]) == ("a@example.com, b@example.com", "ha@example.com")
    body = first.get_payload(decode=True).decode()
    assert json.loads(body.split("\n", 2)[2]) == EVENT
    result = run_example("notify_mail", "x@example.com", "--relay", relay)     # gone
    assert result.returncode == 1 and "cannot mail" in result.stderr


def test_notify_log_writes_one_syslog_line_through_logger(tmp_path):
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        result = run_example("notify_log", "-u", path)
        assert result.returncode == 0, result.stderr
        line = sock.recv(65536).decode()
    # <28>: facility daemon (3) * 8 + warning (4), for a failed run
    assert line.startswith("<28>") and "hadaemon" in line
    assert line.endswith("hadaemon watcher-a #7: run 3 [slave_to_master] for db2: failed (exit 1)")
    result = run_example("notify_log", "-u", str(tmp_path / "nobody.sock"), "--socket-errors=on")
    assert result.returncode != 0


# -- the daemon ------------------------------------------------------------------------------

NOTE = """
    echo "$HA_EVENT $HA_SEQ $(pwd)" >> "%(world)s/env.log"
    cat >> "%(world)s/events.log"
"""


def setup(daemon, notify="note", extra="", actions="[any_to_master]\nrec %HOST%\n", checks=None):
    daemon.role_check()
    daemon.script("actions/rec", 'date +%%s.%%N >> "%s/actions.log"\n' % daemon.world)
    daemon.script("actions/note", NOTE % {"world": daemon.world})
    daemon.write("checks.conf", """
        [daemon]
        interval = 100ms
        workers = 1
        %s
        %s

        [local]
        %s
    """ % ("notify = %s" % notify if notify else "", extra, checks or "check_role db1"))
    daemon.write("actions.conf", actions)


def events(daemon, name="events.log"):
    try:
        lines = (daemon.world / name).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def wait_events(daemon, test, what, timeout=20):
    return wait_for(lambda: test(events(daemon)), timeout=timeout,
                    what="%s (events: %s)" % (what, [(e["seq"], e["kind"]) for e in events(daemon)]))


def kinds(evs):
    return [(e["kind"], e.get("event") or e.get("result") or e.get("to")) for e in evs]


def test_events_come_in_seq_order_across_a_restart(daemon):
    setup(daemon)
    daemon.set("db1", "master")
    daemon.start()
    wait_events(daemon, lambda e: ("run", "ok") in kinds(e), "the run's end")
    daemon.cli("--pause", check=True)
    daemon.cli("--resume", check=True)
    daemon.cli("--reload", check=True)
    wait_events(daemon, lambda e: ("daemon", "reloaded") in kinds(e), "the reload")
    assert daemon.stop() == 0
    daemon.start()
    daemon.set("db1", "slave")
    wait_events(daemon, lambda e: ("transition", "slave") in kinds(e), "the second transition")
    status = daemon.status()
    assert daemon.stop() == 0
    evs = events(daemon)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert kinds(evs) == [("daemon", "started"), ("transition", "master"), ("run", "running"),
                          ("run", "ok"), ("daemon", "paused"), ("daemon", "resumed"),
                          ("daemon", "reloaded"), ("daemon", "stopping"), ("daemon", "started"),
                          ("transition", "slave"), ("daemon", "stopping")]
    tr = evs[1]
    assert {k: tr[k] for k in ("host", "from", "to", "check", "id", "run", "switchover")} == {
        "host": "db1", "from": "unknown", "to": "master", "check": "check_role db1", "id": 1,
        "run": 1, "switchover": None}
    assert {k: evs[3][k] for k in ("run", "section", "host")} == {"run": 1, "section": "any_to_master",
                                                                 "host": "db1"}
    assert all(e["node"] == socket.gethostname() and abs(e["time"] - time.time()) < 600 for e in evs)
    env = (daemon.world / "env.log").read_text().splitlines()
    assert env == ["%s %d %s" % (e["kind"], e["seq"], daemon.dir) for e in evs]
    counted = {c["result"]: c["count"] for c in status["daemon"]["counters"]["notify_events"]}
    assert counted["failed"] == counted["dropped"] == 0 and counted["ok"] >= 2


def result_to_action(daemon, flips):
    """Flip db1 master <-> slave ``flips`` times; each transition's time to its command's start."""
    took = []
    for i in range(flips):
        state = "slave" if i % 2 == 0 else "master"
        known = daemon.ask("history", n=1)["history"][0]["id"]

        def ended():
            newest = daemon.ask("history", n=1)["history"][0]
            return newest if newest["id"] > known and newest["run"]["state"] not in ("queued", "running") \
                else None
        daemon.set("db1", state)
        entry = wait_for(ended, timeout=15, what="the flip's run to end")
        assert entry["to"] == state and entry["run"]["state"] == "ok"
        took.append(entry["run"]["commands"][0]["started"] - entry["time"])
    return took


def test_a_hanging_notify_command_delays_no_check_and_no_action(daemon):
    """The notify command hangs on the first event: checks and actions go on as before."""
    daemon.script("actions/hang", 'echo $$ > "%s/hang.pid"\nexec sleep 600\n' % daemon.world)
    setup(daemon, notify="hang", extra="notify_timeout = 1h",
          actions="[any_to_any]\nrec %HOST%\n")
    daemon.set("db1", "master")
    daemon.start()
    pid = int(wait_for(lambda: (daemon.world / "hang.pid").exists() and
                       (daemon.world / "hang.pid").read_text().strip(), what="the notify command"))
    hung = result_to_action(daemon, 6)
    assert os.path.exists("/proc/%d" % pid), "the notify command no longer hangs"
    assert daemon.status()["daemon"]["counters"]["notify_waiting"] >= 6 * 3
    # The same flips with no notify command (a reload takes it away).
    daemon.write("checks.conf", (daemon.dir / "checks.conf").read_text().replace("notify = hang", ""))
    daemon.cli("--reload", check=True)
    without = result_to_action(daemon, 6)
    assert daemon.stop() == 0               # the hung receiver holds up the stop for 5 s at most
    assert "events not delivered; they are delivered after the next start" in daemon.log()
    figure("notify: transition -> its command's start, median of 6: %.1f ms while the notify command "
           "hangs, %.1f ms with no notify command" % (statistics.median(hung) * 1000,
                                                    statistics.median(without) * 1000))


def test_a_command_that_fails_twice_then_succeeds_and_one_given_up(daemon):
    daemon.script("actions/flaky", """
        seq=$HA_SEQ
        n=$(cat "%(world)s/tries.$seq" 2>/dev/null || echo 0); n=$((n + 1))
        echo $n > "%(world)s/tries.$seq"
        date +%%s.%%N >> "%(world)s/times.$seq"
        [ -f "%(world)s/never" ] && { echo "the receiver says no"; exit 3; }
        [ "$seq" != 1 ] || [ $n -ge 3 ] || exit 1
        cat >> "%(world)s/events.log"
    """ % {"world": daemon.world})
    setup(daemon, notify="flaky")
    daemon.set("db1", "master")
    daemon.start()
    wait_events(daemon, lambda e: len(e) >= 1, "the first event", timeout=30)
    assert (daemon.world / "tries.1").read_text().strip() == "3"
    times = [float(t) for t in (daemon.world / "times.1").read_text().split()]
    log = daemon.log()
    assert "event 1 (daemon): try 1 of 4 failed: exit 1; again in 1s" in log
    assert "event 1 (daemon): try 2 of 4 failed: exit 1; again in 2s" in log
    figure("notify: retries of one event came %.2f s and %.2f s after the try before (1 s, 2 s asked)"
           % (times[1] - times[0], times[2] - times[1]))
    wait_events(daemon, lambda e: ("run", "ok") in kinds(e), "the run's end", timeout=60)
    assert [e["seq"] for e in events(daemon)] == [1, 2, 3, 4]
    (daemon.world / "never").write_text("")
    daemon.set("db1", "slave")
    daemon.wait_log("event 5 (transition) dropped after 4 tries: exit 3", timeout=30)
    assert "try 3 of 4 failed: exit 3 (the receiver says no); again in 4s" in daemon.log()
    counted = {c["result"]: c["count"] for c in daemon.status()["daemon"]["counters"]["notify_events"]}
    assert (counted["ok"], counted["failed"]) == (4, 1)


def test_kill_9_with_undelivered_events_delivers_them_after_the_restart(daemon):
    daemon.script("actions/gated", """
        while [ ! -f "%(world)s/gate" ]; do sleep 0.02; done
        cat >> "%(world)s/events.log"
    """ % {"world": daemon.world})
    setup(daemon, notify="gated", actions="[any_to_any]\nrec %HOST%\n")
    daemon.set("db1", "master")
    daemon.start()
    for state in ("slave", "master", "slave"):
        daemon.set("db1", state)
        daemon.wait_state("db1", state)
    wait_for(lambda: daemon.status()["daemon"]["counters"]["notify_waiting"] >= 13,
             what="13 events waiting")
    daemon.kill9()
    wait_for(lambda: not daemon.descendants(), what="the daemon's children to go")
    assert events(daemon) == []
    (daemon.world / "gate").write_text("")
    daemon.start()
    evs = wait_events(daemon, lambda e: len(e) >= 14 and e, "the events and the new start")
    flip = [("transition", "slave"), ("run", "running"), ("run", "ok"),
            ("transition", "master"), ("run", "running"), ("run", "ok")]
    assert kinds(evs) == [("daemon", "started"), ("transition", "master"), ("run", "running"),
                          ("run", "ok")] + flip + flip[:3] + [("daemon", "started")]
    assert [e["seq"] for e in evs] == list(range(1, 15))     # in seq order, none twice
    figure("notify: 13 events waiting at kill -9, delivered in seq order after the restart")


def test_notify_test_runs_the_command_once_without_a_daemon(daemon):
    setup(daemon)
    result = daemon.cli("--notify-test")
    assert result.returncode == 0, result.stderr
    (event,) = events(daemon)
    assert (event["kind"], event["seq"], event["node"]) == ("test", 0, socket.gethostname())
    assert "notify command: %s/actions/note" % daemon.dir in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("exit 0 in ")
    assert not (daemon.state / "hadaemon.sock").exists()
    daemon.script("actions/note", "echo refused by the receiver\nexit 4\n")
    result = daemon.cli("--notify-test")
    assert result.returncode == 1 and "  | refused by the receiver" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("exit 4 in ")
    setup(daemon, extra="notify_timeout = 300ms")
    daemon.script("actions/note", "exec sleep 30\n")
    result = daemon.cli("--notify-test")
    assert result.returncode == 1 and "timed out after 300ms in " in result.stdout
    setup(daemon, notify=None)
    result = daemon.cli("--notify-test")
    assert result.returncode == 1 and "no notify command" in result.stderr


def test_a_notify_child_that_dies_is_replaced_and_its_command_killed(daemon):
    daemon.script("actions/gated", """
        echo $$ >> "%(world)s/pids"
        while [ ! -f "%(world)s/gate" ]; do sleep 0.02; done
        cat >> "%(world)s/events.log"
    """ % {"world": daemon.world})
    setup(daemon, notify="gated")
    daemon.set("db1", "master")
    daemon.start()
    pids = lambda: (daemon.world / "pids").read_text().split() if (daemon.world / "pids").exists() else []  # noqa: E731
    command = int(wait_for(pids, what="the notify command")[0])
    with open("/proc/%d/stat" % command) as f:
        child = int(f.read().rsplit(")", 1)[1].split()[1])
    assert child != daemon.proc.pid
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not alive(command), what="the master to kill the command the child left")
    daemon.wait_log("notify child %d died (killed by SIGKILL); replacing it" % child)
    wait_for(lambda: len(pids()) == 2, what="a new child to try the event again")
    (daemon.world / "gate").write_text("")
    evs = wait_events(daemon, lambda e: ("run", "ok") in kinds(e) and e, "the events")
    assert [e["seq"] for e in evs] == [1, 2, 3, 4] and evs[0]["event"] == "started"


def test_a_check_in_trouble_is_told_once_until_it_runs_cleanly(daemon):
    daemon.script("checks/moody", """
        case "$(cat "%s/mood" 2>/dev/null)" in
            hang) exec sleep 10 ;;
            bad) echo "host=db1;rm"; echo "state=up" ;;
            *) echo "host=db1"; echo "state=up" ;;
        esac
    """ % daemon.world)
    setup(daemon, checks="timeout = 200ms\n        moody")
    (daemon.world / "mood").write_text("hang")
    daemon.start()
    wait_events(daemon, lambda e: [x for x in e if x["kind"] == "check"], "a check event")
    runs = lambda: daemon.status()["checks"][0]["runs"]     # noqa: E731
    after = runs() + 3
    wait_for(lambda: runs() >= after, what="three more runs of the check")
    (daemon.world / "mood").write_text("ok")
    wait_events(daemon, lambda e: ("transition", "up") in kinds(e), "the check to run cleanly")
    (daemon.world / "mood").write_text("bad")
    wait_events(daemon, lambda e: len([x for x in e if x["kind"] == "check"]) == 2, "a second check event")
    checks = [e for e in events(daemon) if e["kind"] == "check"]
    assert checks[0]["check"] == "moody" and checks[0]["message"] == "timed out after 200ms"
    assert "db1;rm" in checks[1]["message"]


def test_switchover_and_host_pause_events(daemon):
    setup(daemon, actions="[switchover]\nrec %TO%\n", checks="check_role db1\ncheck_role db2")
    daemon.set("db1", "master")
    daemon.set("db2", "slave")
    daemon.start()
    wait_events(daemon, lambda e: {("transition", "master"), ("transition", "slave")} <= set(kinds(e)),
                "both hosts seen")
    daemon.cli("--switchover", "db2", "--at", "+1h", check=True)
    daemon.cli("--switchover", "--cancel", check=True)
    daemon.cli("--pause", "db2", check=True)
    daemon.cli("--resume", "db2", check=True)
    wait_events(daemon, lambda e: ("daemon", "resumed") in kinds(e), "the host's resume")
    assert daemon.stop() == 0
    evs = [e for e in events(daemon) if e["kind"] in ("switchover", "daemon")][1:-1]
    assert [(e["kind"], e["event"]) for e in evs] == [("switchover", "scheduled"), ("switchover", "cancelled"),
                                                     ("daemon", "paused"), ("daemon", "resumed")]
    assert [(e["from"], e["to"]) for e in evs[:2]] == [("db1", "db2")] * 2
    assert evs[0]["at"] == evs[1]["at"] and evs[0]["at"] > time.time() + 3000
    assert [e["hosts"] for e in evs[2:]] == [["db2"], ["db2"]]

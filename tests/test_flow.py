"""The check flow (docs/HACKING.md: the check flow): jobs handed ahead, run at their
time, unchanged results held and sent together, late jobs given back.

A worker first, forked on one end of a socketpair with the test as its master:
what it runs when, and what it sends in which order.  Then the daemon: a slow check
beside quick ones, and the results of a steady state that all reach --status.
Asserted are orders and lower bounds, which a slow machine cannot break.
"""

import os
import signal
import socket
import time

from conftest import figure, wait_for

import hadaemon.children
import hadaemon.records
import hadaemon.wire

ENV = {"HA_CHECK": "c", "HA_SCOPE": "local", "HA_STATE": "up", "HA_CONFIG_DIR": "/", "HA_STATE_DIR": "/"}
UP = hadaemon.wire.output_print(0, b"state=up\n")     # /bin/echo state=up, exit 0


class WorkerUnderTest:
    """A forked Worker whose master is this test (``with``: killed at the end)."""

    def __init__(self, slot=None):
        ours, theirs = socket.socketpair()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                ours.close()
                code = hadaemon.children.Worker(hadaemon.wire.Channel(theirs), slot).serve()
            finally:
                os._exit(code or 0)
        theirs.close()
        self.sock, self.reader, self.ids = ours, hadaemon.wire.LineReader(), iter(range(1, 1000))

    def send(self, argv, at, same=None, timeout=5.0):
        job = hadaemon.records.Job(next(self.ids), "k", argv, ENV, timeout, at=at, same=same)
        self.sock.sendall(job.to_line())
        return job.id

    def receive(self, n, timeout=10.0):
        """The next ``n`` messages, each with when it came (monotonic)."""
        got, deadline = [], time.monotonic() + timeout
        self.sock.settimeout(0.1)
        while len(got) < n:
            assert time.monotonic() < deadline, "only %d of %d messages: %s" % (len(got), n, got)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            assert data, "the worker hung up"
            now = time.monotonic()
            got.extend((now, msg) for msg in self.reader.feed(data))
        return got

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def test_jobs_run_at_their_time_earliest_first_and_answer_in_that_order():
    with WorkerUnderTest() as w:
        now = time.monotonic()
        late = w.send(["/bin/echo", "state=up"], now + 0.3)
        early = w.send(["/bin/echo", "state=up"], now + 0.15)
        got = w.receive(2)
        assert [msg["job"] for _, msg in got] == [early, late]
        starts = [msg["started"] for _, msg in got]
        # Wall clock of each start against the monotonic time it was given.
        offset = time.time() - time.monotonic()
        assert starts[0] >= now + 0.15 + offset - 0.005 and starts[1] >= now + 0.3 + offset - 0.005


def test_a_result_that_says_what_was_expected_is_held_and_a_change_is_not():
    with WorkerUnderTest() as w:
        now = time.monotonic()
        held = w.send(["/bin/echo", "state=up"], now, same=UP)
        w.send(["/bin/echo", "state=up"], now + 5.0)        # keeps the queue from emptying
        (came, msg), = w.receive(1)
        assert msg == {"t": "same", "job": held, "started": msg["started"], "duration": msg["duration"]}
        ended = now + msg["duration"]
        assert came - ended >= hadaemon.children.HOLD * 0.9, "sent %.3fs after its run" % (came - ended)
        print(figure("held result sent %.1f ms after its run" % ((came - ended) * 1000)))

        # A run that says something else goes at once, with the held ones before it.
        now = time.monotonic()
        first = w.send(["/bin/echo", "state=up"], now, same=UP)
        changed = w.send(["/bin/echo", "state=down"], now, same=UP)      # right after it
        got = w.receive(2)
        assert [(msg["t"], msg["job"]) for _, msg in got] == [("same", first), ("result", changed)]
        assert got[1][1]["data"] == {"state": "down"}
        # The two came in one write: the held one did not wait out its HOLD.
        assert got[0][0] == got[1][0]


def test_a_clean_result_carries_its_print_and_only_its_very_bytes_are_held():
    with WorkerUnderTest() as w:
        now = time.monotonic()
        clean = w.send(["/bin/echo", "state=up"], now)
        # It reads the same (a blank line is nothing), but its bytes are not those of UP.
        blank = w.send(["/bin/sh", "-c", "echo state=up; echo"], now, same=UP)
        noisy = w.send(["/bin/sh", "-c", "echo state=up; echo careful >&2"], now, same=UP)
        got = [msg for _, msg in w.receive(3)]
        assert [(msg["t"], msg["job"]) for msg in got] == [("result", clean), ("result", blank), ("result", noisy)]
        assert got[0]["print"] == UP
        assert got[1]["data"] == {"state": "up"} and got[1]["print"] == hadaemon.wire.output_print(0, b"state=up\n\n")
        # A run with stderr is not clean: no print, so its like is never held.
        assert got[2]["stderr"] == "careful\n" and "print" not in got[2]


def test_a_job_goes_to_the_first_worker_free_at_its_time():
    from hadaemon.checkflow import first_free
    from hadaemon.pool import Child
    a, b, c = (Child(pid, "worker", "idle", 0.0) for pid in (11, 12, 13))
    assert first_free([a, b, c], 10.0) is a         # all free: the first, always
    a.free_at = 10.5
    assert first_free([a, b, c], 10.0) is b         # the first still runs then
    assert first_free([a, b, c], 10.5) is a         # and is free again by then
    b.free_at, c.free_at = 11.0, 10.7
    assert first_free([a, b, c], 10.2) is a         # none free: the one free soonest


def test_jobs_that_cannot_start_in_time_are_given_back():
    with WorkerUnderTest() as w:
        now = time.monotonic()
        slow = w.send(["/bin/sleep", "0.6"], now)
        behind = [w.send(["/bin/echo", "state=up"], now + 0.05), w.send(["/bin/echo", "state=up"], now + 0.1)]
        later = w.send(["/bin/echo", "state=up"], now + 2.0)    # not late: it stays
        got = w.receive(3)
        backs = [msg for _, msg in got if msg["t"] == "back"]
        assert sorted(job for msg in backs for job in msg["jobs"]) == behind
        came, msg = got[-1]
        assert msg["t"] == "result" and msg["job"] == slow
        assert all(t < came for t, m in got if m["t"] == "back")      # while the slow one ran
        (_, msg), = w.receive(1)
        assert msg["job"] == later


def test_the_worker_says_which_job_runs_in_its_shared_page():
    import mmap
    import struct
    slot = mmap.mmap(-1, 16)
    check_pid = None
    try:
        with WorkerUnderTest(slot) as w:
            w.send(["/bin/sleep", "5"], time.monotonic())
            wait_for(lambda: struct.unpack_from("qq", slot, 0)[1] == 1 and struct.unpack_from("qq", slot, 0)[0] > 1,
                     what="job 1 and the pid of its check in the shared page")
            check_pid = struct.unpack_from("qq", slot, 0)[0]
            assert check_pid > 1 and os.getpgid(check_pid) == check_pid
    finally:
        if check_pid:
            os.killpg(check_pid, signal.SIGKILL)


# -- The daemon ----------------------------------------------------------------------

def test_a_slow_check_does_not_hold_up_the_others(daemon):
    """Two workers; a check that takes 1.5 s every 2 s beside ten quick ones every
    100 ms: the jobs queued behind the slow one go back and run on the other worker."""
    d = daemon
    d.script("checks/slow", "sleep 1.5\necho state=up\n")
    d.script("checks/quick", 'echo "host=$1"\necho state=up\n')
    d.write("checks.conf", "[daemon]\nworkers = 2\n\n[local]\ninterval = 2s\nhost = s\nslow\n\n"
            "[local]\ninterval = 100ms\n%s\n" % "\n".join("quick q%d" % i for i in range(10)))
    d.write("actions.conf", "")
    d.start()

    def quick_runs():
        return sum(c["runs"] for c in d.status()["checks"] if c["name"].startswith("quick"))
    wait_for(lambda: check_runs(d, "slow") >= 2, timeout=20, what="two runs of the slow check")
    before, t0 = quick_runs(), time.monotonic()
    wait_for(lambda: check_runs(d, "slow") >= 4, timeout=20, what="two more runs of the slow check")
    status = d.status()
    ran = quick_runs() - before
    elapsed = time.monotonic() - t0
    lag = status["daemon"]["lag_ms"]
    print(figure("quick checks: %d runs in %.2f s (%.0f%% of their schedule); lag p50 %s p99 %s max %s ms"
                 % (ran, elapsed, 100.0 * ran / (elapsed * 100), lag["p50"], lag["p99"], lag["max"])))
    # Held up behind each 1.5 s run, the quick checks would lose a good part of their runs.
    assert ran >= elapsed * 100 * 0.8, [(c["name"], c["runs"], c["skipped"]) for c in status["checks"]]
    # A run whose last is queued behind the slow one when it is due is skipped (it never
    # bursts): a few at each slow run, not the runs of its 1.5 s.
    skipped = sum(c["skipped"] for c in status["checks"] if c["name"].startswith("quick"))
    runs = sum(c["runs"] for c in status["checks"] if c["name"].startswith("quick"))
    print(figure("quick checks: %d skipped of %d runs, %d runs of the slow one"
                 % (skipped, runs, check_runs(d, "slow"))))
    assert skipped <= runs * 0.05


def test_a_light_load_runs_on_one_worker(daemon):
    """Four workers, four quick checks 50 ms apart: one worker runs them, which stays
    warm (dealt in turn, each worker woke for every fourth; bench/worker.py)."""
    d = daemon
    d.script("checks/quick", 'echo "$PPID" >> "%s/ran"\necho "host=$1"\necho state=up\n' % d.world)
    d.write("checks.conf", "[daemon]\nworkers = 4\n\n[local]\ninterval = 200ms\n"
            + "".join("quick q%d\n" % i for i in range(4)))
    d.write("actions.conf", "")
    d.start()
    ran = d.world / "ran"
    wait_for(lambda: ran.exists() and len(ran.read_text().split()) >= 40, timeout=20, what="40 runs")
    workers = ran.read_text().split()
    most = max(workers.count(pid) for pid in set(workers))
    print(figure("a light load: %d of %d runs on one worker, %d workers ran any"
                 % (most, len(workers), len(set(workers)))))
    assert most >= len(workers) * 0.75, workers


def check_runs(d, name):
    return next(c["runs"] for c in d.status()["checks"] if c["name"] == name)


def test_every_held_result_reaches_the_master(daemon):
    """Unchanged results are held and sent together, none lost: each check's runs and
    its last run's time move on, and a change still comes through."""
    d = daemon
    d.role_check()
    d.set("db1", "master")
    d.write("checks.conf", "[daemon]\nworkers = 2\n\n[local]\ninterval = 100ms\n"
            + "".join("check_role db%d\n" % i for i in range(1, 6)))
    d.write("actions.conf", "")
    d.start()
    d.wait_state("db1", "master")
    first = {c["key"]: (c["runs"], c["last"]["time"]) for c in d.status()["checks"]}
    wait_for(lambda: all(c["runs"] >= first[c["key"]][0] + 5 and c["last"]["time"] > first[c["key"]][1]
                         for c in d.status()["checks"]), timeout=10, what="five more runs of each check")
    d.set("db1", "slave")
    d.wait_state("db1", "slave")

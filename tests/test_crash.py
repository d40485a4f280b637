"""Crash consistency (SPEC §7): kill -9 at random moments loses nothing acknowledged.

Two layers, each measured with many kills:

- the state store alone: a forked writer commits a deterministic sequence of
  changes (small and large values, growing and shrinking ones, new keys, soft
  values, checkpoints and compactions) and acknowledges each commit on a pipe;
  it is SIGKILLed at a random moment, and the recovered db must hold exactly the
  acknowledged prefix (or one commit more, the one in flight).  And a damaged db
  being moved aside and rebuilt is killed in the middle of it.
- the daemon: checks every 100 ms whose states flip, an action sequence per
  transition, the master killed at random moments (while it runs, and while it
  recovers at start) and restarted; after each restart every transition and run
  seen before the kill is still there, queued runs run, killed runs are
  ``interrupted`` and never run again, no action line appears twice, and nothing
  the daemon started outlives it.
"""

import collections
import json
import os
import random
import signal
import struct
import time

import pytest

import hadaemon.base
import hadaemon.store
import hadaemon.ledger
from conftest import figure, pids_in_group, wait_for

SEED = int(os.environ.get("HADAEMON_CRASH_SEED") or time.time())


# ============================================================================
# The store alone
# ============================================================================

def store_op(seed, i):
    """Commit number ``i`` of the writer: a deterministic dict of key -> value."""
    rng = random.Random(seed * 1000003 + i)
    changes = {}
    for _ in range(rng.choice((1, 1, 1, 2, 4))):
        key = "k:%d" % rng.randrange(48)
        # Sizes cross dbm.dumb's 512-byte blocks both ways (in-place shrink, relocation)
        # and reach past a page, so a write(2) of a commit can be cut by the kill.
        size = rng.choice((0, 20, 300, 500, 700, 1500, 5000, 20000))
        changes[key] = {"i": i, "pad": "x" * size}
    return changes


def store_writer(state_dir, seed, first, ack_fd):
    """The forked child: recover, then commit from ``first`` on, ack each, until killed."""
    store = hadaemon.store.Store(state_dir)
    store.open()
    rng = random.Random(seed ^ first)
    i = first
    while True:
        store.commit(store_op(seed, i))
        os.write(ack_fd, struct.pack("=I", i))
        if rng.random() < 0.3:
            store.soft("soft:%d" % rng.randrange(3), {"i": i, "pad": "s" * rng.choice((10, 900, 3000))})
        if rng.random() < 0.2:
            store.checkpoint()
        i += 1


def test_store_survives_kill9(tmp_path):
    """Hundreds of kill -9 of a process writing the store: the acknowledged prefix survives."""
    kills = int(os.environ.get("HADAEMON_STORE_KILLS") or 400)
    rng = random.Random(SEED)
    state_dir = str(tmp_path / "state")
    os.mkdir(state_dir, 0o700)
    model, done = {}, 0             # the state after ``done`` commits
    lost, seen = [], collections.Counter()
    deadline = time.monotonic() + 60
    for k in range(kills):
        if time.monotonic() > deadline:
            break
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # the writer: never returns
            code = 1
            try:
                os.close(r)
                store_writer(state_dir, SEED, done + 1, w)
            finally:
                os._exit(code)
        os.close(w)
        # Kill early (during recovery and its checkpoint) or later (while committing).
        time.sleep(rng.choice((0.0, 0.002, 0.005)) if k % 3 == 0 else rng.uniform(0.005, 0.04))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), "the writer died by itself: status %#x" % status
        acks = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            acks += chunk
        os.close(r)
        acked = struct.unpack("=%dI" % (len(acks) // 4), acks[:len(acks) // 4 * 4])
        assert list(acked) == list(range(done + 1, done + 1 + len(acked)))
        n = done + len(acked)
        for i in range(done + 1, n + 1):
            model.update(store_op(SEED, i))
        # What the kill left, as recovery reads it (nothing written).
        try:
            with open(os.path.join(state_dir, "state.db.journal"), "rb") as f:
                journal = f.read()
        except FileNotFoundError:       # killed before it made one
            journal = b""
        store = hadaemon.store.Store(state_dir)
        suffix, _, _, full = store.load()
        seen["index from .bak (killed in sync)"] += suffix == ".bak"
        seen["compaction cut short"] += full
        seen["journal line cut short"] += bool(journal) and not journal.endswith(b"\n")
        seen["damage notes"] += sum("damaged" in note or "lost" in note for note in store.notes)
        for key, value in store.data.items():
            if key.startswith("soft:"):
                assert isinstance(value, dict) and value["pad"].strip("s") == ""
        got = {key: v for key, v in store.data.items() if key.startswith("k:")}
        if got == model:
            done = n
            continue
        nxt = dict(model, **store_op(SEED, n + 1))
        if got == nxt:                                  # the commit in flight made it
            model, done = nxt, n + 1
            continue
        lost.append("kill %d, after %d acknowledged commits: %s differ" % (
            k + 1, n, sorted(key for key in set(model) | set(got) if got.get(key) != model.get(key))[:5]))
        model, done = got, n + 1        # go on from what is there, to count every loss
    figure("store: %d kills, %d commits acknowledged, %d recoveries lost some, %d damage notes; "
           "kills hit: %s (seed %d)" % (k + 1, done, len(lost), seen.pop("damage notes"),
                                        ", ".join("%s %d" % kv for kv in sorted(seen.items())), SEED))
    assert not lost, "\n".join(lost[:10])
    assert not list(tmp_path.glob("state/*corrupt*")), "a plain kill -9 made the db look damaged"


def test_a_commit_journals_only_what_was_committed(tmp_path):
    """A transition's commit does not wait for the soft values (every check's last since
    the checkpoint): the checkpoint journals them, before it writes them in place."""
    store = hadaemon.store.Store(str(tmp_path))
    store.open()
    for i in range(100):
        store.soft("check:%d" % i, {"i": i})
    store.commit({"k:1": {"i": 1}})
    with open(store.journal_path) as f:
        journal = f.read()
    assert '"k:1"' in journal and "check:" not in journal
    store.soft("check:7", {"i": 70})
    store.commit({"k:1": {"i": 2}})         # a key committed again: its newer value
    store.checkpoint()
    os.close(store.jfd)                             # a kill -9: nothing more written
    os.close(store.files.dat_fd)
    again = hadaemon.store.Store(str(tmp_path))
    again.open()
    assert again.data["k:1"] == {"i": 2} and again.data["check:7"] == {"i": 70}
    assert again.data["check:99"] == {"i": 99}


def test_store_repair_survives_kill9(tmp_path):
    """A damaged db is moved aside and rebuilt from what could be read: a kill -9 in the
    middle of that rebuild must not leave only the journal's last commits."""
    rng = random.Random(SEED)
    state_dir = str(tmp_path / "state")
    os.mkdir(state_dir, 0o700)
    keys = {"k:%d" % i: {"i": i, "pad": "x" * rng.choice((10, 700, 3000))} for i in range(200)}
    rounds = kills = 0
    while rounds < 40:
        rounds += 1
        for path in os.listdir(state_dir):
            os.unlink(os.path.join(state_dir, path))
        store = hadaemon.store.Store(state_dir)
        store.open()
        store.commit(keys)
        store.checkpoint()
        store.commit({"k:last": {"i": rounds}})     # in the journal only
        store.close()
        with open(os.path.join(state_dir, "state.db.journal"), "ab") as f:
            f.write(b'{"s": {"k:journal": {"i": 1}}}\n')
        # One value unreadable: the db is moved aside, the rest is kept.
        index = hadaemon.store.Store(state_dir)
        index.load()
        pos, size = index.files.index["k:0"]
        with open(os.path.join(state_dir, "state.db.dat"), "r+b") as f:
            f.seek(pos)
            f.write(b"\xff" * size)
        pid = os.fork()
        if pid == 0:
            try:
                hadaemon.store.Store(state_dir).open()
                time.sleep(10)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 0.004))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        store = hadaemon.store.Store(state_dir)
        store.open()                    # recovers whatever the kill left
        want = dict(keys, **{"k:last": {"i": rounds}, "k:journal": {"i": 1}})
        del want["k:0"]                 # the damaged one
        got = {k: v for k, v in store.data.items() if k.startswith("k:")}
        store.close()
        assert got == want, "round %d: %d keys lost (seed %d)" % (rounds, len(set(want) - set(got)), SEED)
    figure("store repair: %d kills while a damaged db was moved aside and rebuilt, nothing readable lost"
           % kills)


# ============================================================================
# The daemon
# ============================================================================

KILLS = int(os.environ.get("HADAEMON_CRASH_KILLS") or 100)
LATER = {"queued": {"queued", "running", "ok", "failed", "interrupted"},
         "running": {"running", "ok", "failed", "interrupted"}}
RUN_FIXED = ("id", "transition", "host", "from", "to", "section", "queued")


def crash_config(d):
    d.write("checks.conf", """
        [daemon]
        interval = 100ms
        timeout = 3s
        workers = 3
        action_timeout = 5s
        history = 5000

        [local]
        flip db1 400
        flip db2 700
    """)
    d.write("actions.conf", """
        [any_to_any]
        step a
        step b
    """)
    # A state that flips with the clock: master and slave in turn every PERIOD ms,
    # unless world/hold.HOST pins it (to let the queue drain at the end).
    d.script("checks/flip", """
        echo "host=$1"
        if [ -f "%(w)s/hold.$1" ]; then echo "state=$(cat "%(w)s/hold.$1")"; exit 0; fi
        t=$(date +%%s%%3N)
        if [ $(( t / $2 %% 2 )) = 0 ]; then echo state=master; else echo state=slave; fi
    """ % {"w": d.world})
    d.script("actions/step", """
        echo "$HA_RUN_ID $1" >> "%s/actions.log"
        sleep 0.1
    """ % d.world)


def history_of(entries):
    """(transitions by id, runs by id) from --history entries."""
    trs, runs = {}, {}
    for entry in entries:
        run = entry.get("run")
        trs[entry["id"]] = dict(entry, run=run["id"] if run else None)
        if run:
            runs[run["id"]] = run
    return trs, runs


def offline_history(state_dir):
    """The same, read straight from the state db files (no daemon, nothing written)."""
    data = hadaemon.store.Store.read(state_dir)
    trs = sorted((v for k, v in data.items() if k.startswith("tr:")), key=lambda r: r["id"])
    runs = collections.OrderedDict(sorted((v["id"], v) for k, v in data.items() if k.startswith("run:")))
    return history_of(hadaemon.ledger.history_entries(trs, runs, len(trs)))


def compare(seen_trs, seen_runs, trs, runs, where):
    """Problems with what was seen before a kill, as it is now; empty when all is there."""
    problems = []
    for tr_id, tr in seen_trs.items():
        if trs.get(tr_id) != tr:
            problems.append("%s: transition %d was %r, now %r" % (where, tr_id, tr, trs.get(tr_id)))
    for run_id, run in seen_runs.items():
        now = runs.get(run_id)
        if now is None:
            problems.append("%s: run %d is gone (was %s)" % (where, run_id, run["state"]))
            continue
        if any(now[k] != run[k] for k in RUN_FIXED):
            problems.append("%s: run %d changed: %r -> %r" % (where, run_id, run, now))
        if now["state"] not in LATER.get(run["state"], {run["state"]}):
            problems.append("%s: run %d went %s -> %s" % (where, run_id, run["state"], now["state"]))
        elif run["state"] not in LATER and now != run:
            problems.append("%s: finished run %d changed: %r -> %r" % (where, run_id, run, now))
        for before, after in zip(run["commands"], now["commands"]):
            for key in ("started", "result"):
                if before[key] is not None and after[key] != before[key]:
                    problems.append("%s: run %d command %s %s changed" % (where, run_id, before["argv"], key))
    return problems


def leftovers(d, master_pid):
    """Processes that outlive a killed master: its workers and action run (its process
    group) and the checks and commands they started (their own sessions, by env)."""
    return sorted(set(pids_in_group(master_pid)) | set(d.descendants()))


def test_daemon_survives_kill9(daemon):
    """SIGKILL the master at random moments, restart it, and find everything it showed."""
    d = daemon
    crash_config(d)
    rng = random.Random(SEED)
    seen_trs, seen_runs = {}, {}
    carried = set()             # runs seen queued right before a kill
    running = set()             # runs seen running right before the last kill
    interrupted_lines = {}      # run -> its action lines when it was found interrupted
    problems = []
    kills = startup_kills = 0
    slowest_exit = 0.0
    begun = time.monotonic()

    def ready():
        try:
            return d.ask("ping", timeout=2).get("ok")
        except (OSError, hadaemon.base.HadaemonError):
            return d.proc.poll() is not None

    def snapshot():
        trs, runs = history_of(d.ask("history", n=100000)["history"])
        return trs, runs, d.ask("status")

    for k in range(KILLS + 1):
        lines_at_start = set(d.actions_log())     # no action process of the last master is left
        d.start(wait=False)
        pid = d.proc.pid
        during_recovery = k < KILLS and k % 4 == 3
        if during_recovery:
            # Kill while it recovers: right after it took the lock, in its first ms.
            pid_file = d.state / "hadaemon.pid"
            wait_for(lambda: d.proc.poll() is not None or
                     (pid_file.exists() and pid_file.read_text().strip() == str(pid)),
                     timeout=15, interval=0.002, what="the pid file")
            time.sleep(rng.uniform(0, 0.03))
        else:
            wait_for(ready, timeout=15, interval=0.01, what="the daemon to answer (log:\n%s)" % d.tail())
            assert d.proc.poll() is None, "the daemon exited at restart %d:\n%s" % (k, d.tail())
            trs, runs, status = snapshot()
            where = "after restart %d" % k
            problems += compare(seen_trs, seen_runs, trs, runs, where)
            # What ran when the master died is interrupted (or had finished), never running.
            problems += ["%s: run %d is %s" % (where, r, runs[r]["state"]) for r in running
                         if runs[r]["state"] not in ("ok", "failed", "interrupted")]
            for run in runs.values():
                if run["state"] == "interrupted" and run["id"] not in interrupted_lines:
                    interrupted_lines[run["id"]] = {line for line in lines_at_start
                                                    if line.split()[0] == str(run["id"])}
            seen_trs, seen_runs = trs, runs
            if k == KILLS:
                break
            time.sleep(rng.uniform(0.05, 0.4) if rng.random() > 0.04 else rng.uniform(2.0, 2.5))
            trs, runs, status = snapshot()
            problems += compare(seen_trs, seen_runs, trs, runs, "while running %d" % k)
            seen_trs, seen_runs = trs, runs
            carried |= set(status["daemon"]["queue"])
            running = {r["id"] for r in runs.values() if r["state"] == "running"}
            time.sleep(rng.uniform(0, 0.03))
        if d.proc.poll() is not None:
            pytest.fail("the daemon exited by itself before kill %d:\n%s" % (k + 1, d.tail()))
        d.kill9()
        kills += 1
        startup_kills += during_recovery
        died = time.monotonic()
        wait_for(lambda: not leftovers(d, pid), timeout=15,
                 what="the processes of killed master %d to go: %s" % (pid, leftovers(d, pid)))
        slowest_exit = max(slowest_exit, time.monotonic() - died)
        d.started.remove(pid)   # gone, group and all: its pid may be reused
        # The db as the kill left it opens and holds everything seen, before any recovery.
        trs, runs = offline_history(str(d.state))
        problems += compare(seen_trs, seen_runs, trs, runs, "on disk after kill %d" % kills)
        assert not problems, "\n".join(problems[:20])

    # Let it settle: pin the states, let the queue drain, stop, and read it all back.
    for host, state in (("db1", "master"), ("db2", "slave")):
        (d.world / ("hold." + host)).write_text(state)

    def drained():
        status = d.ask("status")
        return not status["daemon"]["queue"] and status["daemon"]["action_pid"] is None and \
            all(r["state"] not in ("queued", "running") for r in status["runs"])
    wait_for(drained, timeout=60, interval=0.1, what="the action queue to drain (log:\n%s)" % d.tail())
    assert d.stop() == 0
    result = d.cli("--history", "100000", "--json", check=True)      # offline, from the db
    trs, runs = history_of(json.loads(result.stdout))
    problems += compare(seen_trs, seen_runs, trs, runs, "at the end")
    lost_transitions = sum(1 for p in problems if "transition" in p)

    # Transition ids have no gap; the state db never looked damaged.
    assert sorted(trs) == list(range(1, len(trs) + 1)), "transition ids have gaps"
    assert "damaged" not in d.log() and not list(d.state.glob("*corrupt*")), d.tail()

    # Every run queued before a kill ran after the restart; none is left queued.
    for run_id in carried:
        run = runs[run_id]
        assert run["state"] in ("ok", "failed", "interrupted") and run["started"], run
    assert all(r["state"] in ("ok", "failed", "interrupted") for r in runs.values())

    # No action ran twice: one line per run and command; an ok run has both lines; an
    # interrupted one has what it got to before the kill, and never a line after it.
    lines = collections.Counter(d.actions_log())
    duplicates = sum(n - 1 for n in lines.values() if n > 1)
    assert all(int(line.split()[0]) in runs for line in lines), "action lines of unknown runs"
    interrupted = 0
    for run in runs.values():
        mine = {line for line in lines if line.split()[0] == str(run["id"])}
        if run["state"] == "ok":
            assert mine == {"%d a" % run["id"], "%d b" % run["id"]}, (run, mine)
        elif run["state"] == "interrupted":
            interrupted += 1
            assert "the daemon died" in run["reason"], run
            assert mine == interrupted_lines[run["id"]], "interrupted run %d ran again" % run["id"]
    figure("crash: %d kills, %d restarts, %d lost transitions, %d duplicate actions, %d interrupted runs"
           % (kills, kills, lost_transitions, duplicates, interrupted))
    figure("crash: %d of the kills during recovery, %d transitions, %d runs (%d ok), %d runs queued "
           "at a kill ran after it, killed master's processes gone within %.2fs, %.0fs (seed %d)"
           % (startup_kills, len(trs), len(runs), sum(r["state"] == "ok" for r in runs.values()),
              len(carried), slowest_exit, time.monotonic() - begun, SEED))
    assert not problems, "\n".join(problems[:20])
    assert duplicates == 0

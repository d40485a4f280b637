#!/usr/bin/env python3
"""worker.py: the real check Worker alone, fed by a bare master: its CPU per check.

    python3 bench/worker.py [A.py [B.py]] [--rate 500] [--seconds 4] [--rounds 4]

Each hadaemon.py given (default: the one at the root) has its own ``Worker`` forked
and fed as the check flow feeds it: every 0.1 s a batch of the jobs due in the next
0.1 s, 100 checks of the trivial check in turn, each job carrying the print of its
check's last result (``same``) once there is one, so the worker holds what did not
change.  The bare master reads what comes back and nothing more.  With two files the
rounds alternate A, B, A, B..., so that the machine's load falls on both alike.

Printed per round, ms of CPU per check: the worker's own, its checks' (reaped by it),
and the whole against the paced bare spawn of the same check (bench.py's floor),
measured just before the round.  The worker's part is what this is for: bench.py's
versus section has the master's and the daemon's whole.
"""

import argparse
import importlib.util
import json
import os
import select
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (bench.py beside this file)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 0.1              # seconds: the master's pass, and how far ahead it hands jobs
CHECKS = 100


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(sock, module):
    """The forked worker: ``module``'s Worker on its end of the socket pair."""
    module.Worker(module.Channel(sock)).serve()


def result_print(module, msg):
    """The print the master would hand with the check's next job: the worker's own when
    it sends one, else made from the data as the master of that copy makes it."""
    if "print" in msg:
        return msg["print"]
    return module.result_print(msg["data"], msg["exit"])


def one_round(module, script, rate, seconds, workers=1):
    """``workers`` Workers of ``module`` fed at ``rate`` in all for ``seconds``, the jobs
    dealt in turn (as the fewest-jobs rule deals them at a steady rate): CPU per check."""
    forked = [bench.fork_peer(serve, module) for _ in range(workers)]
    socks = [sock for sock, _ in forked]
    pids = [pid for _, pid in forked]
    readers = {sock: module.LineReader() for sock in socks}
    env = {"HA_SCOPE": "local", "HA_STATE": "up", "HA_CONFIG_DIR": "/etc/hadaemon",
           "HA_STATE_DIR": "/etc/hadaemon/var"}
    prints, answered, sent = {}, 0, 0
    warmup = 0.5
    start = time.monotonic() + STEP
    end = start + warmup + seconds
    c0 = None

    def cpu():
        pairs = [bench.proc_times(pid) for pid in pids]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    try:
        next_pass = start - STEP
        while True:
            now = time.monotonic()
            if c0 is None and now >= start + warmup:
                c0, answered0 = cpu(), answered
            if now >= end:
                break
            if now >= next_pass:
                lines = [[] for _ in socks]
                horizon = next_pass + STEP
                while start + sent / rate < horizon:
                    key = "local|check_trivial|check_trivial %d" % (sent % CHECKS)
                    job = {"t": "job", "id": sent + 1, "at": start + sent / rate,
                           "same": prints.get(key), "key": key, "timeout": 5.0,
                           "env": dict(env, HA_CHECK="check_trivial %d" % (sent % CHECKS)),
                           "argv": [script]}
                    lines[sent % workers].append(json.dumps(job, separators=(",", ":")).encode() + b"\n")
                    sent += 1
                for sock, some in zip(socks, lines):
                    sock.sendall(b"".join(some))
                next_pass += STEP
            readable, _, _ = select.select(socks, [], [], max(0.0, next_pass - time.monotonic()))
            for sock in readable:
                data = sock.recv(1 << 20)
                if not data:
                    raise RuntimeError("a worker went away")
                for msg in readers[sock].feed(data):
                    answered += 1
                    if msg.get("t") == "result":
                        prints[msg["key"]] = result_print(module, msg)
        c1, answered1 = cpu(), answered
    finally:
        for sock in socks:
            sock.close()        # a worker leaves at EOF; killed if it has not in 10 s
        deadline = time.monotonic() + 10.0
        for pid in pids:
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
    n = answered1 - answered0
    return {"worker": (c1[0] - c0[0]) / n * 1000, "check": (c1[1] - c0[1]) / n * 1000, "n": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", default=[os.path.join(ROOT, "hadaemon.py")])
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1, help="jobs dealt in turn to this many")
    args = ap.parse_args()
    modules = [load(path, "hadaemon_%d" % i) for i, path in enumerate(args.files)]
    with tempfile.TemporaryDirectory() as tmp:
        script = bench.write_script(os.path.join(tmp, "check_trivial"), bench.TRIVIAL_CHECK)
        sums = [[] for _ in modules]
        for r in range(args.rounds):
            for i, module in enumerate(modules):
                floor = bench.bench_spawn_paced(script, args.rate, 2.0)["cpu_ms"]
                f = one_round(module, script, args.rate, args.seconds, args.workers)
                sums[i].append(f["worker"])
                print("round %d  %s  worker %.3f  check %.3f  = %.3f  %.2fx paced (%.3f)  [%d checks]" % (
                    r + 1, "AB"[i] if len(modules) > 1 else "-", f["worker"], f["check"],
                    f["worker"] + f["check"], (f["worker"] + f["check"]) / floor, floor, f["n"]),
                    flush=True)
        for i, values in enumerate(sums):
            values.sort()
            print("%s  worker median %.3f ms per check (%s)" % (
                args.files[i], values[len(values) // 2], " ".join("%.3f" % v for v in values)))


if __name__ == "__main__":
    main()

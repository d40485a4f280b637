#!/usr/bin/env python3
"""paired.py: two copies of hadaemon side by side, CPU per check of each in the same window.

    python3 bench/paired.py OLD/hadaemon.py hadaemon.py [--rounds 3] [--window 10] [--rate 500]

Each round starts both daemons (100 trivial checks, 4 workers, the order swapped every
round), reloads both to ``rate`` checks/s, waits a second, and reads the CPU of each
one's master, workers and checks over the same ``window``.  The machine's load falls
on both alike, so the two repeat within 1-2 % of each other where bench.py's versus
section, which runs them in turn, moves by 5 %.  It measures a change to the cost of a
check, not the cost itself: both daemons together run twice the rate.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (bench.py beside this file)


def one_round(tmp, programs, rate, window, index):
    """[{master, workers, checks}] in ms per check, one per program, both measured at once."""
    daemons = []
    try:
        for i, program in enumerate(programs):
            d = bench.Hadaemon(os.path.join(tmp, "r%d-%d" % (index, i)), bench.trivial_config(100, 60.0, 4),
                               program=program)
            d.script("checks/check_trivial", bench.TRIVIAL_CHECK)
            daemons.append(d)
            d.start()
        for d in daemons:
            bench.write_file(os.path.join(d.conf, "checks.conf"), bench.trivial_config(100, 100.0 / rate, 4))
            answer = d.request({"cmd": "reload"})
            if not answer.get("ok"):
                raise RuntimeError("reload refused: %s" % answer)
        time.sleep(1.0)
        before = []
        for d in daemons:
            status = d.status()
            workers = [w["pid"] for w in status["daemon"]["workers"]]
            before.append((d, workers, bench.cpu_snapshot(d.proc.pid, workers), bench.runs_total(status)[0]))
        time.sleep(window)
        out = []
        for d, workers, cpu0, runs0 in before:
            cpu1, runs = bench.cpu_snapshot(d.proc.pid, workers), bench.runs_total(d.status())[0] - runs0
            out.append({k: (cpu1[k] - cpu0[k]) / runs * 1000.0 for k in cpu0})
        return out
    finally:
        for d in daemons:
            d.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("programs", nargs=2, metavar="HADAEMON_PY")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=float, default=10.0, help="seconds measured per round")
    p.add_argument("--rate", type=int, default=500, help="checks/s of each daemon")
    args = p.parse_args()
    programs = [os.path.abspath(x) for x in args.programs]
    tmp = tempfile.mkdtemp(prefix="hadaemon-paired-")
    print("ms of CPU per check at %d checks/s each; load average at start %s" % (
        args.rate, " ".join("%.2f" % x for x in bench.loadavg())))
    for i in range(args.rounds):
        order = [0, 1] if i % 2 == 0 else [1, 0]
        result = dict(zip(order, one_round(tmp, [programs[k] for k in order], args.rate, args.window, i)))
        for k, program in enumerate(programs):
            r = result[k]
            print("round %d  %-40s master %.3f  workers %.3f  check %.3f  master+workers %.3f" % (
                i + 1, program, r["master"], r["workers"], r["checks"], r["master"] + r["workers"]))
    print("load average at end %s" % " ".join("%.2f" % x for x in bench.loadavg()))


if __name__ == "__main__":
    main()
